"""Bundle members for runtimes that do not read ONNX: LiteRT (TensorFlow Lite, and TFLite Micro on
microcontrollers) as full-integer int8 ``.tflite`` files, int8 input and output.

A member's int8 ONNX model is turned back into float ONNX (:func:`float_model`: its weights are the int8 grid
values, so a QAT member keeps its trained grid up to TFLite's own per-channel scale), converted by onnx2tf
(ONNX -> TensorFlow -> the TFLite converter) and quantised there again, per channel, calibrated on training images
of ``--data`` through the bundle's input steps and preprocessing. Needs the ``[litert]`` extra.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import data
from .errors import UserError
from .runtime.bundle import Bundle, member_onnx
from .store import write_json

FORMATS = ("tflite",)
CALIBRATION_IMAGES = 256  # training images the TFLite converter calibrates activations on
MLPERF_TINY_BYTES = 98_496  # MLPerf Tiny's image-classification reference (ResNet-8), its int8 .tflite


def _dequantised_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Float values of the outputs of DequantizeLinear nodes that read an initializer (weights and biases)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            q, scale = inits[n.input[0]].astype(np.float64), inits[n.input[1]].astype(np.float64)
            zero = inits[n.input[2]].astype(np.float64) if len(n.input) > 2 and n.input[2] else 0.0
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1) % max(q.ndim, 1)
            shape = [-1 if i == axis else 1 for i in range(q.ndim)] if np.ndim(scale) else []
            out[n.output[0]] = ((q - np.reshape(zero, shape)) * np.reshape(scale, shape)).astype(np.float32)
    return out


def float_model(onnx_bytes: bytes) -> onnx.ModelProto:
    """The int8 QDQ model as float ONNX: each weight and bias its dequantised value, each activation's
    QuantizeLinear -> DequantizeLinear pair dropped, or a Relu where it clipped at zero (the quantiser folds a ReLU
    into a uint8 zero point of 0)."""
    model = onnx.load_from_string(onnx_bytes)
    graph, weights = model.graph, _dequantised_weights(model)
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    made_by = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    nodes, alias = [], {}
    for n in graph.node:
        if n.op_type == "QuantizeLinear" or n.output[0] in weights:
            continue
        if n.op_type != "DequantizeLinear":
            nodes.append(n)
            continue
        q = made_by[n.input[0]]
        zero = inits[q.input[2]] if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
        source = alias.get(q.input[0], q.input[0])
        if zero.min() == np.iinfo(zero.dtype).min or n.output[0] in outputs:
            op = "Relu" if zero.min() == np.iinfo(zero.dtype).min else "Identity"
            nodes.append(helper.make_node(op, [source], [n.output[0]]))
        else:
            alias[n.output[0]] = source
    for n in nodes:
        n.input[:] = [alias.get(i, i) for i in n.input]
    used = {i for n in nodes for i in n.input}
    new_inits = [numpy_helper.from_array(v, k) for k, v in weights.items() if k in used]
    new_inits += [t for t in graph.initializer if t.name in used and t.name not in weights]
    out = helper.make_graph(nodes, graph.name, graph.input, graph.output, new_inits)
    return helper.make_model(out, opset_imports=model.opset_import, ir_version=model.ir_version)


def to_tflite(onnx_bytes: bytes, calibration: np.ndarray, path: Path) -> Path:
    """Write the int8 ONNX model as a full-integer int8 ``.tflite`` (int8 input and output) to ``path``,
    calibrated on ``calibration`` (preprocessed NCHW float32 images)."""
    try:
        import onnx2tf
    except ImportError:
        raise UserError("exporting to tflite needs the LiteRT extra: pip install 'prune2edge[litert]'") from None
    with tempfile.TemporaryDirectory(prefix="p2e-tflite-") as tmp:
        tmp = Path(tmp)
        onnx.save(float_model(onnx_bytes), str(tmp / "model.onnx"))
        np.save(tmp / "calibration.npy", calibration.transpose(0, 2, 3, 1))  # onnx2tf calibrates NHWC
        with contextlib.redirect_stdout(io.StringIO()):  # onnx2tf and TensorFlow print pages of progress
            onnx2tf.convert(
                input_onnx_file_path=str(tmp / "model.onnx"),
                output_folder_path=str(tmp / "out"),
                output_integer_quantized_tflite=True,
                quant_type="per-channel",
                input_quant_dtype="int8",
                output_quant_dtype="int8",
                custom_input_op_name_np_data_path=[["input", str(tmp / "calibration.npy"), [[[[0.0]]]], [[[[1.0]]]]]],
                non_verbose=True,
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp / "out" / "model_full_integer_quant.tflite", path)
    return path


def calibration_images(x_train: np.ndarray) -> np.ndarray:
    """The training images a .tflite is calibrated on: :data:`CALIBRATION_IMAGES` of them, drawn with a fixed seed."""
    return x_train[np.random.default_rng(0).permutation(len(x_train))[:CALIBRATION_IMAGES]]


def export_bundle(bundle_dir: Path | str, fmt: str, out: Path | str, spec: dict) -> dict:
    """Write every member of a bundle as ``fmt`` into ``out`` (``<id>.tflite``) and ``out/export.json`` (sizes,
    beside MLPerf Tiny's reference); ``spec``: the dataset whose training images calibrate them."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}': use {', '.join(FORMATS)}")
    bundle_dir, out = Path(bundle_dir), Path(out)
    b = Bundle.load(bundle_dir)
    ds = data.load({**spec, **b.steps.to_config()} if b.steps.size or b.steps.color else spec)
    calibration = b.preprocess(calibration_images(ds.x_train))
    members = {}
    for e in b.manifest["members"]:
        path = to_tflite(member_onnx(bundle_dir, e), calibration, out / f"{e['id']}.tflite")
        members[e["id"]] = {"path": path.name, "bytes": path.stat().st_size}
    record = {
        "format": fmt,
        "input": "int8 NHWC: the manifest's preprocessing, then quantised with the file's input scale and zero point",
        "output": "int8 logits: dequantise with the file's output scale and zero point, then softmax",
        "calibration_images": len(calibration),
        "mlperf_tiny_reference_bytes": MLPERF_TINY_BYTES,
        "members": members,
    }
    write_json(out / "export.json", record)
    return record
