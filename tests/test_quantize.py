"""Phase 2: full-integer ONNX models, sizes recorded, a gate that retries or drops collapsed models, codebooks,
and the shipped encoding."""

from __future__ import annotations

import itertools
import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from prune2edge import UserError, config, models, qdq, quantize, records, store
from prune2edge.pool import MagnitudePruner
from prune2edge.runtime.bundle import decode, predict_proba, session
from prune2edge.runtime.vote import accuracy


def test_members_are_full_integer_and_sizes_are_measured(demo_run):
    for folder in [demo_run / "baseline", *sorted((demo_run / "pool").iterdir())]:
        q = records.read_quantised(folder)
        ops = quantize.op_counts(folder / "int8.onnx")
        assert ops["Conv"] >= 4 and ops["Gemm"] == 1 and ops["DequantizeLinear"] > ops["QuantizeLinear"], ops
        model = onnx.load(str(folder / "int8.onnx"))
        assert q.full_integer and q.ops == ops and qdq.full_integer(model)
        assert not qdq.full_integer(onnx.load(str(folder / "fp32.onnx")))
        assert (q.format, q.opset, q.domains) == ("onnx-qdq", qdq.OPSET, ["ai.onnx"])
        graph = model.graph
        conv_weights = {i.name: i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
        assert len(conv_weights) >= 5  # int8 weight tensors, stored as int8
        b = q.bytes
        assert b.fp32 == (folder / "fp32.onnx").stat().st_size and b.int8 == (folder / "int8.onnx").stat().st_size
        assert b.int8 < 0.3 * b.fp32 and b.int8_gzip == store.gzip_size(folder / "int8.onnx")
        assert (folder / "quant.json").read_text() == json.dumps(q.to_json(), indent=2)  # the record is the file


def test_int8_agrees_with_fp32_on_validation(demo_run):
    q = records.read_quantised(demo_run / "pool" / "m000")
    assert q.status == "ok" and q.agreement >= 0.9
    assert q.val_acc_int8 >= q.val_acc_fp32 - 0.03


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
    first = rec.attempts[0]
    assert first["calibration"] == "minmax" and not first["passed"] and first["val_acc_int8"] < 0.9
    assert len(rec.attempts) >= 2
    assert rec.status == ("ok" if rec.attempts[-1]["passed"] else "dropped")
    # an impossible gate: every setting is tried, then the model is dropped
    rec = quantize.quantize_model(tmp_path, model, (6, 6, 1), calib, x_val, y_val, max_drop=-1.0, min_agreement=1.0)
    assert rec.status == "dropped" and len(rec.attempts) == len(quantize.ATTEMPTS)
    assert store.read_json(tmp_path / "quant.json")["status"] == "dropped"


def test_onnx_fp32_matches_torch(demo_run):
    from prune2edge.store import load_baseline, tensors

    model = load_baseline(demo_run).eval()
    x, _ = tensors(demo_run, "val")
    with torch.no_grad():
        ref = torch.softmax(model(x), 1).numpy()
    out = predict_proba(session(demo_run / "baseline" / "fp32.onnx"), x.numpy())
    assert np.allclose(ref, out, atol=1e-4)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A small CNN (12x10 RGB, 5 classes) pruned to 80 % by magnitude, quantised without and with codebooks.
    Returns ``{bits: (folder, record)}`` and the validation data (labelled by the fp32 model itself)."""
    torch.manual_seed(0)
    model = models.build("small_cnn", (12, 10, 3), 5, width=8, depth=2).eval()
    MagnitudePruner(models.prunable(model), 0.8, "constant", "layer", 1).update(0.8)
    x = np.random.default_rng(0).normal(size=(128, 3, 12, 10)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    out = {}
    for bits in (0, 2, 4):
        folder = tmp_path_factory.mktemp(f"bits{bits}")
        out[bits] = (
            folder,
            quantize.quantize_model(
                folder, model, (12, 10, 3), x[:64], x[64:], y[64:], max_drop=1.0, min_agreement=0.0, codebook_bits=bits
            ),
        )
    return out, x[64:], y[64:]


def weights(path) -> dict[str, np.ndarray]:
    return {t.name: np.frombuffer(t.raw_data, np.int8) for t in quantize.int8_weights(onnx.load(str(path)))}


def test_codebooks_share_at_most_2_to_the_bits_values_per_layer_and_keep_every_zero(quantized):
    runs, _, _ = quantized
    plain = weights(runs[0][0] / "int8.onnx")
    assert len(plain) == 4  # three Conv weights and the Gemm weight
    for bits in (2, 4):
        folder, rec = runs[bits]
        assert rec.codebook_bits == bits and quantize.op_counts(folder / "int8.onnx") == rec.ops == runs[0][1].ops
        for name, q in weights(folder / "int8.onnx").items():
            assert len(np.unique(plain[name])) > 2**bits  # the codebook had work to do
            assert len(np.unique(q)) <= 2**bits and 0 in q
            assert np.array_equal(q == 0, plain[name] == 0)  # every pruned weight stays zero, and only those
            assert np.array_equal(np.sign(q), np.sign(plain[name]))


def test_kmeans_1d_is_the_exact_optimum():
    rng = np.random.default_rng(1)
    values = np.unique(rng.integers(-60, 60, 12))
    values = values[values != 0]
    counts = rng.integers(1, 20, len(values))
    for k in (2, 3, 4):
        best = np.inf
        for cuts in itertools.combinations(range(1, len(values)), k - 1):
            groups = np.split(np.arange(len(values)), cuts)
            if any(values[g].min() < 0 < values[g].max() for g in groups):
                continue
            best = min(best, sum(np.cov(values[g], aweights=counts[g], bias=True) * counts[g].sum() for g in groups))
        centres = quantize.kmeans_1d(values, counts, k)
        assert len(np.unique(centres)) == k and (np.sign(centres) == np.sign(values)).all()
        error = float((counts * (values - centres) ** 2).sum())
        assert best <= error <= best + counts.sum() * 0.25  # the optimum, up to rounding centres to integers


def test_the_gate_measures_the_snapped_model(quantized):
    runs, x_val, y_val = quantized
    p32 = predict_proba(session(runs[2][0] / "fp32.onnx"), x_val)
    for folder, rec in runs.values():
        p8 = predict_proba(session(folder / "int8.onnx"), x_val)
        assert rec.val_acc_int8 == accuracy(p8, y_val) == rec.attempts[-1]["val_acc_int8"]
        assert rec.agreement == float((p8.argmax(1) == p32.argmax(1)).mean())
        assert np.array_equal(np.load(folder / "val_proba.npy"), p8)


def test_shipped_file_decodes_to_the_exact_int8_onnx(quantized):
    rescore = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "rescore.py"))
    for folder, rec in quantized[0].values():
        shipped = (folder / quantize.SHIPPED).read_bytes()
        assert rec.bytes.shipped == len(shipped)
        assert decode(shipped) == rescore["decode"](shipped) == (folder / "int8.onnx").read_bytes()
    fp32 = (folder / "fp32.onnx").read_bytes()  # no int8 weights at all: the whole file is the rest
    assert decode(quantize.encode(fp32)) == fp32


def test_codebooks_ship_fewer_bytes(quantized):
    shipped = {bits: rec.bytes.shipped for bits, (_, rec) in quantized[0].items()}
    assert shipped[2] < shipped[4] < shipped[0]
    assert all(rec.bytes.shipped < rec.bytes.int8_gzip for _, rec in quantized[0].values())


def test_codebooks_are_for_members_and_the_baseline_stays_plain_int8(demo_run, tmp_path):
    run = tmp_path / "run"
    for f in (
        "config.yaml",
        "dataset.json",
        "splits.npz",
        "preprocess.json",
        "baseline/model.pt",
        "baseline/model.json",
        "pool/m000/model.pt",
        "pool/m000/member.json",
    ):
        (run / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(demo_run / f, run / f)
    cfg = config.load(demo_run / "config.yaml", {"quantize": {"codebook_bits": 3}})
    members = [records.read_member(run, "m000")]
    quant = quantize.quantize_all(run, cfg, members, progress=False)
    assert quant["baseline"].codebook_bits == 0 and quant["m000"].codebook_bits == 3
    assert max(len(np.unique(q)) for q in weights(run / "baseline" / "int8.onnx").values()) > 8
    assert max(len(np.unique(q)) for q in weights(run / "pool" / "m000" / "int8.onnx").values()) <= 8
    plain = store.read_json(demo_run / "pool" / "m000" / "quant.json")
    assert plain["codebook_bits"] == 0 and quant["m000"].bytes.shipped < plain["bytes"]["shipped"]


@pytest.mark.parametrize("bits", [1, 9, -2, 2.0, True, "4"])
def test_codebook_bits_must_be_off_or_2_to_8(bits):
    with pytest.raises(
        UserError, match="config key 'quantize.codebook_bits' must be 0 \\(off\\) or an integer from 2 to 8"
    ):
        config.load(overrides={"quantize": {"codebook_bits": bits}})


def test_compact_names_shrink_the_model_and_keep_its_outputs(quantized, tmp_path):
    runs, x_val, _ = quantized
    quantize.quantize_onnx(runs[0][0] / "fp32.onnx", tmp_path / "int8.onnx", x_val[:32])
    shutil.copyfile(tmp_path / "int8.onnx", tmp_path / "compact.onnx")
    quantize.compact(tmp_path / "compact.onnx")
    before, after = (predict_proba(session(tmp_path / f), x_val) for f in ("int8.onnx", "compact.onnx"))
    assert np.array_equal(before, after)
    sizes = {f: (tmp_path / f).stat().st_size for f in ("int8.onnx", "compact.onnx")}
    assert sizes["compact.onnx"] < 0.95 * sizes["int8.onnx"], sizes
    model = onnx.load(str(tmp_path / "compact.onnx"))
    assert not model.graph.value_info and [v.name for v in model.graph.output] == ["logits"]
    assert {len(t.name) for t in model.graph.initializer} <= {2, 3}  # t0 .. t99
