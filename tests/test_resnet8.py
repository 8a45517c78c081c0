"""MLPerf Tiny's ResNet-8 built in: its size and work, exported and quantised like the others; bytes as run."""

from pathlib import Path

import numpy as np
import torch

from prune2edge import cost, models, prune, quantize, store
from prune2edge.runtime import bundle
from prune2edge.runtime.bundle import read_manifest


def test_resnet8_has_the_references_work_at_32x32x3(tmp_path):
    net = models.build("resnet8", (32, 32, 3), 10)
    assert sum(p.numel() for p in net.parameters()) == 78_042  # the Keras reference: 78,666 (biases, not BN)
    path = tmp_path / "fp32.onnx"
    quantize.export_onnx(net, path, (32, 32, 3))
    assert cost.macs(path) == prune.macs_of(net, torch.zeros(1, 3, 32, 32)) == 12_501_632  # 12.5 M


def test_resnet8_exports_and_quantises_to_an_int8_model_that_follows_it(tmp_path):
    torch.manual_seed(0)
    net = models.build("resnet8", (32, 32, 3), 10, width=8).eval()  # any width: the rival's scaled ResNet-8
    for m in net.modules():  # batch norms as training leaves them (fresh ones fold to equal biases, which the
        if isinstance(m, torch.nn.BatchNorm2d):  # exporter shares between convolutions)
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2), m.bias.data.normal_(0, 0.1)
    x = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    quantize.export_onnx(net, fp32, (32, 32, 3))
    quantize.quantize_onnx(fp32, int8, x[:32])
    p32 = bundle.predict_proba(bundle.session(fp32), x)
    p8 = bundle.predict_proba(bundle.session(int8), x)
    with torch.no_grad():
        np.testing.assert_allclose(p32, torch.softmax(net(torch.from_numpy(x)), 1).numpy(), atol=1e-4)
    assert p8.shape == (64, 10) and np.corrcoef(p32.ravel(), p8.ravel())[0, 1] > 0.9
    assert int8.stat().st_size < fp32.stat().st_size


def test_a_members_bytes_as_run_are_the_file_the_runtime_loads(demo_run: Path):
    manifest = read_manifest(demo_run / "bundle")
    for e in manifest["members"]:
        loaded = bundle.member_onnx(demo_run / "bundle", e)  # what the edge runtime hands ONNX Runtime
        assert e["onnx_bytes"] == len(loaded) == (store.model_dir(demo_run, e["id"]) / store.INT8).stat().st_size
        assert e["bytes"] == (demo_run / "bundle" / e["path"]).stat().st_size < e["onnx_bytes"]
