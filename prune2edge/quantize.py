"""Phase 2: export to ONNX and full-integer static post-training quantisation with ONNX Runtime.

Weights become per-channel int8, activations uint8 (QOperator format: QLinearConv, QGemm, ...),
calibrated on training images with the inference preprocessing. Every model is gated on
validation data: int8 accuracy against fp32, and fp32/int8 agreement. A model that fails is
retried with other calibration settings, then dropped, and the record says so.
"""
from __future__ import annotations

import collections
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from tqdm.auto import tqdm

from . import store
from .bundle import predict_proba, session
from .vote import accuracy

# tried in order until one passes the gate
ATTEMPTS = (
    {"calibration": "minmax", "reduce_range": False},
    {"calibration": "percentile", "reduce_range": False},
    {"calibration": "minmax", "reduce_range": True},
)
METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
INT8_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearGlobalAveragePool", "QLinearMul",
            "QLinearConcat", "QLinearAveragePool", "QLinearLeakyRelu", "QLinearSigmoid", "ConvInteger", "MatMulInteger"}
FLOAT_COMPUTE_OPS = {"Conv", "Gemm", "MatMul", "ConvTranspose"}


def export_onnx(model: torch.nn.Module, path: Path, image_shape: tuple[int, int, int]) -> None:
    """fp32 ONNX with input ``input`` [N, C, H, W] and output ``logits``; batch-norm folded into convolutions."""
    h, w, c = image_shape
    model = model.cpu().eval()
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, c, h, w),), str(tmp), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    tmp.replace(path)


class _Calibration(CalibrationDataReader):
    def __init__(self, x: np.ndarray, batch: int = 32):
        self.batches = iter([{"input": x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def quantize_onnx(fp32: Path, int8: Path, calib: np.ndarray, calibration: str = "minmax", reduce_range: bool = False) -> None:
    """Static int8 quantisation of an fp32 ONNX model: int8 per-channel weights, uint8 activations."""
    tmp = int8.with_suffix(".tmp.onnx")
    logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs advice on every call
    quantize_static(str(fp32), str(tmp), _Calibration(calib), quant_format=QuantFormat.QOperator, per_channel=True,
                    reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=METHODS[calibration])
    tmp.replace(int8)


def op_counts(path: Path) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node))


def quantize_model(folder: Path, model: torch.nn.Module, image_shape: tuple[int, int, int], calib: np.ndarray,
                   x_val: np.ndarray, y_val: np.ndarray, max_drop: float, min_agreement: float) -> dict:
    """Export, quantise and gate one model in ``folder``; writes fp32.onnx, int8.onnx, val_proba.npy, quant.json."""
    fp32, int8 = folder / "fp32.onnx", folder / "int8.onnx"
    export_onnx(model, fp32, image_shape)
    p32 = predict_proba(session(fp32), x_val)
    acc32 = accuracy(p32, y_val)
    attempts = []
    for setting in ATTEMPTS:
        quantize_onnx(fp32, int8, calib, **setting)
        p8 = predict_proba(session(int8), x_val)
        acc8, agree = accuracy(p8, y_val), float((p8.argmax(1) == p32.argmax(1)).mean())
        passed = acc8 >= acc32 - max_drop and agree >= min_agreement
        attempts.append({**setting, "val_acc_int8": acc8, "agreement": agree, "passed": passed})
        if passed:
            break
    ops = op_counts(int8)
    record = {
        "status": "ok" if attempts[-1]["passed"] else "dropped",
        "attempts": attempts,
        "val_acc_fp32": acc32,
        "val_acc_int8": attempts[-1]["val_acc_int8"],
        "agreement": attempts[-1]["agreement"],
        "bytes": {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size,
                  "fp32_gzip": store.gzip_size(fp32), "int8_gzip": store.gzip_size(int8)},
        "ops": ops,
        "full_integer": not (FLOAT_COMPUTE_OPS & set(ops)) and bool(INT8_OPS & set(ops)),
    }
    np.save(folder / "val_proba.npy", p8.astype(np.float32))
    store.write_json(folder / "quant.json", record)
    return record


def quantize_all(run_dir: Path, cfg: dict, members: list[dict], progress: bool = True) -> dict[str, dict]:
    """Quantise the baseline and every pool member not yet done; returns records by name (``baseline`` first)."""
    q = cfg["quantize"]
    x_train, _ = store.tensors(run_dir, "train")
    rng = np.random.default_rng([cfg["seed"], 2])
    calib = x_train[rng.choice(len(x_train), min(q["calibration_size"], len(x_train)), replace=False)].numpy()
    x_val, y_val = store.tensors(run_dir, "val")
    x_val, y_val = x_val.numpy(), y_val.numpy()
    image_shape = tuple(store.read_json(run_dir / "baseline" / "model.json")["image_shape"])
    folders = {"baseline": run_dir / "baseline", **{m["name"]: run_dir / "pool" / m["name"] for m in members}}
    records = {}
    for name, folder in tqdm(folders.items(), desc="quantise", disable=not progress, unit="model"):
        if (folder / "quant.json").exists():
            records[name] = store.read_json(folder / "quant.json")
            continue
        model = store.load_baseline(run_dir)
        model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
        records[name] = quantize_model(folder, model, image_shape, calib, x_val, y_val, q["max_drop"], q["min_agreement"])
    return records
