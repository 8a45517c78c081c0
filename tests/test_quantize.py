"""Phase 2: full-integer ONNX models, three sizes recorded, and a gate that retries or drops collapsed models."""
from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from prune2edge import quantize, store
from prune2edge.bundle import predict_proba, session


def test_members_are_full_integer_and_sizes_are_measured(demo_run):
    for folder in [demo_run / "baseline", *sorted((demo_run / "pool").iterdir())]:
        q = store.read_json(folder / "quant.json")
        ops = quantize.op_counts(folder / "int8.onnx")
        assert ops.get("QLinearConv", 0) >= 4 and "QGemm" in ops, ops
        assert not {"Conv", "Gemm", "MatMul"} & set(ops), f"float compute left in {folder.name}: {ops}"
        assert q["full_integer"] and q["ops"] == ops
        graph = onnx.load(str(folder / "int8.onnx")).graph
        conv_weights = {i.name: i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
        assert len(conv_weights) >= 5  # int8 weight tensors, stored as int8
        b = q["bytes"]
        assert b["fp32"] == (folder / "fp32.onnx").stat().st_size and b["int8"] == (folder / "int8.onnx").stat().st_size
        assert b["int8"] < 0.3 * b["fp32"] and b["int8_gzip"] == store.gzip_size(folder / "int8.onnx")


def test_int8_agrees_with_fp32_on_validation(demo_run):
    q = store.read_json(demo_run / "pool" / "m000" / "quant.json")
    assert q["status"] == "ok" and q["agreement"] >= 0.9
    assert q["val_acc_int8"] >= q["val_acc_fp32"] - 0.03


class Outlier(nn.Module):
    """A network whose activations have one huge outlier channel: min-max calibration then wastes the int8 range."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def test_gate_retries_then_drops_and_records_every_attempt(tmp_path):
    model = Outlier().eval()
    rng = np.random.default_rng(0)
    x_val = rng.normal(size=(64, 1, 6, 6)).astype(np.float32)
    y_val = model(torch.from_numpy(x_val)).argmax(1).numpy()
    calib = x_val.copy()
    calib[0] *= 1e4  # one wild calibration image: the first setting (min-max) collapses
    rec = quantize.quantize_model(tmp_path, model, (6, 6, 1), calib, x_val, y_val, max_drop=0.02, min_agreement=0.95)
    first = rec["attempts"][0]
    assert first["calibration"] == "minmax" and not first["passed"] and first["val_acc_int8"] < 0.9
    assert len(rec["attempts"]) >= 2
    assert rec["status"] == ("ok" if rec["attempts"][-1]["passed"] else "dropped")
    # an impossible gate: every setting is tried, then the model is dropped
    rec = quantize.quantize_model(tmp_path, model, (6, 6, 1), calib, x_val, y_val, max_drop=-1.0, min_agreement=1.0)
    assert rec["status"] == "dropped" and len(rec["attempts"]) == len(quantize.ATTEMPTS)
    assert store.read_json(tmp_path / "quant.json")["status"] == "dropped"


def test_onnx_fp32_matches_torch(demo_run):
    from prune2edge.store import load_baseline, tensors

    model = load_baseline(demo_run).eval()
    x, _ = tensors(demo_run, "val")
    with torch.no_grad():
        ref = torch.softmax(model(x), 1).numpy()
    out = predict_proba(session(demo_run / "baseline" / "fp32.onnx"), x.numpy())
    assert np.allclose(ref, out, atol=1e-4)
