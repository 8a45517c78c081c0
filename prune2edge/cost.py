"""What a model costs the device that runs it, beside its latency (:mod:`prune2edge.runtime.latency`): the multiply-adds
of one image, counted from its ONNX graph, and the peak memory of an ONNX Runtime session that runs it.

Both are measured on the model as exported: zeros of an unstructured sparse member still cost multiply-adds and
memory (ONNX Runtime's dense kernels compute them), which is what structured (channel) pruning is for."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from .runtime.runtimes import HIGH_PRECISION


def macs(model: Path | str) -> int:
    """Multiply-adds of one image through the convolutions and matrix products of an fp32 ONNX model (batch 1;
    count a member's fp32.onnx: its int8 model keeps the same layers)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    graph = shape_inference.infer_shapes(onnx.load(str(model))).graph
    values = (*graph.value_info, *graph.input, *graph.output)
    shapes = {v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim] for v in values}
    shapes |= {t.name: list(numpy_helper.to_array(t).shape) for t in graph.initializer}
    total = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        out, w = shapes.get(node.output[0]), shapes.get(node.input[1])
        if out is None or w is None:
            raise ValueError(f"{model}: no shape for the {node.op_type} node '{node.name}'")
        if node.op_type == "Conv":  # out [1, C_out, *spatial], weight [C_out, C_in / groups, *kernel]
            total += math.prod(out[1:]) * math.prod(w[1:])
        else:  # out [1, N], weight [K, N] (Gemm with transB: [N, K])
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            total += math.prod(out) * (w[1] if node.op_type == "Gemm" and trans_b else w[0])
    return int(total)


# run in a fresh interpreter, so that nothing else this process loaded counts: resident memory (KiB) after importing
# onnxruntime, with the peak reset there (Linux: /proc/self/clear_refs), and the peak once a session made from the
# model (with the config entries prune2edge's sessions carry) has run batch 1 a few times
PROBE = """
import json, sys
import numpy as np, onnxruntime as ort
def status(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key + ":")))
path, shape, entries = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
for key, value in entries.items():
    o.add_session_config_entry(key, value)
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
x = np.zeros(shape, np.float32)
for _ in range(5):
    s.run(None, {s.get_inputs()[0].name: x})
print(json.dumps([before, status("VmHWM")]))
"""


def memory(model: Path | str, image: np.ndarray) -> dict:
    """Peak resident memory of running ``model`` at batch 1 on one thread, in MiB, measured in a fresh process
    (Linux): ``session_mb``, what making the session and running it adds to a process that has imported ONNX
    Runtime, and ``process_mb``, that process's peak. ``image`` is one preprocessed input (C, H, W)."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(model), json.dumps([1, *image.shape]), json.dumps(HIGH_PRECISION)],
        capture_output=True,
        text=True,
        check=True,
    )
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    return {"session_mb": round((after - before) / 1024, 3), "process_mb": round(after / 1024, 3)}


def of(folder: Path, image: np.ndarray) -> dict:
    """A model folder's cost per image: ``macs`` (of its fp32.onnx) and ``memory_mb`` (the session's share of peak
    memory running its int8.onnx, :func:`memory`)."""
    from .store import FP32, INT8

    return {"macs": macs(folder / FP32), "memory_mb": memory(folder / INT8, image)["session_mb"]}


DESCRIBE = {
    "macs": "multiply-adds of one image through the convolutions and matrix products (fp32 ONNX graph)",
    "memory": "peak resident MiB that making an ONNX Runtime session (1 thread) of the int8 model and running "
    "batch 1 adds to a fresh process that has imported ONNX Runtime (Linux /proc)",
}
