"""`prune2edge export --format tflite`: every member of the digits demo bundle as a full-integer int8 .tflite (int8
input and output, as TFLite Micro takes them), run by LiteRT's interpreter, votes like its ONNX model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from ai_edge_litert.interpreter import Interpreter
from conftest import prune2edge_cli

from prune2edge import export, qdq
from prune2edge.runtime import runtimes
from prune2edge.runtime.bundle import Bundle, member_onnx, predict_proba, read_manifest, session

MIN_AGREEMENT = 0.99  # argmax of each .tflite member against its ONNX model, over the test split


@pytest.mark.slow
@pytest.mark.parametrize("run_name", ["demo_run", "cifar_shaped_run"])
def test_tflite_members_vote_like_their_onnx_models(run_name: str, request: pytest.FixtureRequest, tmp_path):
    run = request.getfixturevalue(run_name)
    bundle, spec = run / "bundle", "digits" if run_name == "demo_run" else f"npz:{run.parent / 'synthetic.npz'}"
    r = prune2edge_cli("export", str(bundle), "--format", "tflite", "--out", str(tmp_path), "--data", spec)
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "export.json").read_text())
    x = Bundle.load(bundle).preprocess(np.load(run / "test.npz")["x"])
    for e in read_manifest(bundle)["members"]:
        got = record["members"][e["id"]]
        assert got["bytes"] == (tmp_path / got["path"]).stat().st_size
        print(f"{e['id']}: {got['bytes']:,} B as .tflite (MLPerf Tiny's int8 ResNet-8: {export.MLPERF_TINY_BYTES:,} B)")
        expected = predict_proba(session(member_onnx(bundle, e)), x).argmax(1)
        it = Interpreter(model_path=str(tmp_path / got["path"]))
        assert it.get_input_details()[0]["dtype"] == it.get_output_details()[0]["dtype"] == np.int8
        tflite = runtimes.load_tflite((tmp_path / got["path"]).read_bytes())
        one, logits = tflite(x[:1]), tflite(x)  # batch 1, then the whole split: the runner re-allocates
        np.testing.assert_allclose(one[0], logits[0])
        agreement = (logits.argmax(1) == expected).mean()
        print(f"{run_name} {e['id']}: .tflite argmax = ONNX's on {100 * agreement:.2f} % of {len(x)} test images")
        assert agreement >= MIN_AGREEMENT, (e["id"], agreement)
    assert f"{tmp_path / 'm'}" in r.stdout and "MLPerf Tiny" in r.stdout


def test_the_float_model_computes_what_the_int8_model_does(demo_run):
    bundle = demo_run / "bundle"
    e = read_manifest(bundle)["members"][0]
    int8 = member_onnx(bundle, e)
    model = export.float_model(int8)
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & set(qdq.QDQ_OPS) and {"Conv", "Relu", "Gemm"} <= ops, ops
    x = Bundle.load(bundle).preprocess(np.load(demo_run / "test.npz")["x"])
    agree = predict_proba(session(model.SerializeToString()), x).argmax(1) == predict_proba(session(int8), x).argmax(1)
    assert agree.mean() >= MIN_AGREEMENT
