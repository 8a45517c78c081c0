"""The runtimes a member runs on: one int8 ONNX file (standard ONNX, :mod:`prune2edge.qdq`) in any of them.

``onnxruntime`` comes with the core install; ``openvino`` (Intel CPUs and GPUs, the OpenVINO CPU plugin) and
``reference`` (the ONNX reference evaluator: slow, for checking) come with the extras :data:`EXTRAS` names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .. import cores
from ..errors import UserError
from .vote import softmax

Runner = Callable[[np.ndarray], np.ndarray]  # preprocessed NCHW float32 images -> the model's logits
EXTRAS = {"onnxruntime": None, "openvino": "openvino", "reference": "reference"}  # runtime -> its pip extra


# ONNX Runtime's int8 kernels in high precision: on x86 CPUs with AVX2 but no VNNI, its default u8 x s8 kernels add
# pairs of products in 16 bits, which saturate for 8-bit weights, and a member then disagreed with OpenVINO and the
# ONNX reference on up to 0.45 % of images (none with this entry, for 1.1-1.2x the batch-1 latency of a digits
# member, the two timed alone side by side)
HIGH_PRECISION = {"session.x64quantprecision": "1"}


def session_options(threads: int = 0) -> ort.SessionOptions:
    """The options of every ONNX Runtime session prune2edge makes: ``threads`` intra-op threads (0: the free cores,
    :func:`prune2edge.cores.free`), warnings off, :data:`HIGH_PRECISION`."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or cores.free()
    opts.log_severity_level = 3
    for key, value in HIGH_PRECISION.items():
        opts.add_session_config_entry(key, value)
    return opts


def session(model: Path | str | bytes, threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime CPU session on an ONNX file or its bytes, with :func:`session_options`."""
    return ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), session_options(threads), providers=["CPUExecutionProvider"]
    )


def of_session(sess: ort.InferenceSession) -> Runner:
    """The runner of an ONNX Runtime session."""
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _onnxruntime(onnx_bytes: bytes, threads: int) -> Runner:
    return of_session(session(onnx_bytes, threads))


def _openvino(onnx_bytes: bytes, threads: int) -> Runner:
    import openvino

    core = openvino.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads or cores.free()}
    compiled = core.compile_model(core.read_model(onnx_bytes), "CPU", config)
    return lambda x: compiled(x)[0]


def _reference(onnx_bytes: bytes, threads: int) -> Runner:
    import onnx
    from onnx.reference import ReferenceEvaluator

    ref = ReferenceEvaluator(onnx.load_from_string(onnx_bytes))
    name = ref.input_names[0]
    return lambda x: ref.run(None, {name: x})[0]


LOADERS = {"onnxruntime": _onnxruntime, "openvino": _openvino, "reference": _reference}
CHECK_IMAGES = 128  # validation images each shipped member is run on, on every runtime installed where it is built


def load_tflite(tflite_bytes: bytes, threads: int = 1) -> Runner:
    """A full-integer int8 ``.tflite`` (:func:`prune2edge.export.to_tflite`) on LiteRT's interpreter, with
    ``threads`` threads (0: the free cores): it takes preprocessed NCHW float32 images, quantises them with the
    file's input scale and zero point, and returns the dequantised logits."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise UserError("LiteRT is not installed here: pip install 'prune2edge[litert]'") from None
    it = Interpreter(model_content=tflite_bytes, num_threads=threads or cores.free())
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    (s_in, z_in), (s_out, z_out) = inp["quantization"], out["quantization"]
    batch = [0]  # the batch size the interpreter's tensors are allocated for

    def run(x: np.ndarray) -> np.ndarray:
        if len(x) != batch[0]:
            it.resize_tensor_input(inp["index"], [len(x), *x.shape[2:], x.shape[1]])
            it.allocate_tensors()
            batch[0] = len(x)
        q = np.clip(np.rint(x.transpose(0, 2, 3, 1) / s_in) + z_in, -128, 127).astype(np.int8)
        it.set_tensor(inp["index"], q)
        it.invoke()
        return (it.get_tensor(out["index"]).astype(np.float32) - z_out) * s_out

    return run


def load(onnx_bytes: bytes, runtime: str = "onnxruntime", threads: int = 1) -> Runner:
    """The model ``onnx_bytes`` ready to run on ``runtime`` with ``threads`` threads (0: the free cores)."""
    if runtime not in LOADERS:
        raise UserError(f"unknown runtime '{runtime}': use {', '.join(LOADERS)}")
    try:
        return LOADERS[runtime](onnx_bytes, threads)
    except ImportError:
        raise UserError(
            f"runtime '{runtime}' is not installed here: pip install 'prune2edge[{EXTRAS[runtime]}]'"
        ) from None


def compare(proba: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How class probabilities from one runtime agree with another's on the same images (``[..., N, K]``): the
    share of equal argmax and the largest difference of a probability."""
    return {
        "agreement": float((proba.argmax(-1) == reference.argmax(-1)).mean()),
        "max_proba_diff": float(np.abs(proba - reference).max()),
    }


def version(runtime: str) -> str:
    """The version of an installed runtime's package."""
    from importlib.metadata import version as package_version

    return package_version({"reference": "onnx"}.get(runtime, runtime))


def verify(onnx_bytes: bytes, x: np.ndarray) -> dict[str, dict]:
    """How each runtime installed here runs the model on the preprocessed images ``x``, against ONNX Runtime
    (:func:`compare`, with the runtime's version and the number of images); runtimes not installed are left out."""
    proba = {}
    for runtime in LOADERS:
        try:
            proba[runtime] = softmax(load(onnx_bytes, runtime)(x))
        except UserError:  # not installed here (ONNX Runtime always is)
            continue
    return {r: compare(p, proba["onnxruntime"]) | {"images": len(x), "version": version(r)} for r, p in proba.items()}
