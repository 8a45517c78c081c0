"""Channel-pruned members (pool.structure: channels): smaller dense networks, not zeros in a network of the same size."""

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CLONES
from torch import nn

from prune2edge import UserError, cli, config, cost, models, pipeline, prune, quantize, store
from prune2edge.runtime.bundle import predict_proba, read_manifest, session

TOLERANCE = 0.05  # channels come in whole units: a member removes the requested fraction of multiply-adds +- 5 points
ARCHS = (("small_cnn", (16, 16, 3)), ("resnet20", (16, 16, 3)), ("keras_cifar10_cnn", (12, 12, 3)))


def pruned(
    arch: str, shape: tuple[int, int, int], target: float, tmp_path
) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A random-weight network of ``arch``, its copy with ``target`` of its multiply-adds pruned away on the
    member's schedule over 50 steps of (no) training, and the images it was traced on."""
    torch.manual_seed(0)
    parent = models.build(arch, shape, 5)
    h, w, c = shape
    x = torch.randn(16, c, h, w)
    with torch.no_grad():  # batch norms as after training: their own scales and statistics
        for m in parent.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
        parent.train()(x)
    member = models.build(arch, shape, 5)
    member.load_state_dict(parent.state_dict())
    pruner = prune.ChannelPruner(member, x[:2], target, end_step=40, criterion="l2", noise=0.1, seed=3)
    for step in range(1, 51):
        pruner(step, 50)
    pruner.finish()
    prune.compact(member, x[:2])
    return parent.eval(), member.eval(), x


@pytest.mark.parametrize("arch, shape", ARCHS)
def test_a_pruned_member_of_each_builtin_is_smaller_in_work_exports_and_quantises(arch, shape, tmp_path):
    parent, member, x = pruned(arch, shape, 0.5, tmp_path)
    removed = 1 - prune.macs_of(member, x) / prune.macs_of(parent, x)
    assert abs(removed - 0.5) <= TOLERANCE, removed
    assert sum(p.numel() for p in member.parameters()) < 0.7 * sum(p.numel() for p in parent.parameters())
    assert models.sparsity(member)["overall"] < 0.05  # dense: the channels are gone, not zeroed
    n = len(x)
    rng = np.random.default_rng(0)
    calib, y = x.numpy(), rng.integers(0, 5, n)
    rec = quantize.quantize_model(tmp_path, member, shape, calib, calib, y, max_drop=1.0, min_agreement=0.0)
    onnx_macs = cost.macs(tmp_path / store.FP32)
    assert onnx_macs == prune.macs_of(member, x)  # the ONNX graph does the smaller work
    with torch.no_grad():
        p_torch = torch.softmax(member(x), 1).numpy()
    p_fp32 = predict_proba(session(tmp_path / store.FP32), calib)
    p_int8 = predict_proba(session(tmp_path / store.INT8), calib)
    assert (p_fp32.argmax(1) == p_torch.argmax(1)).all() and np.abs(p_fp32 - p_torch).max() < 1e-4
    assert (p_int8.argmax(1) == p_torch.argmax(1)).mean() >= 0.8 and rec.status in ("ok", "dropped")
    state = {k: v.clone() for k, v in member.state_dict().items()}
    again = models.shaped_like(models.build(arch, shape, 5), state).eval()  # as store.load_member rebuilds it
    with torch.no_grad():
        assert torch.equal(again(x), member(x))


def test_cutting_the_zeroed_channels_keeps_the_function():
    torch.manual_seed(1)
    net = models.build("resnet20", (16, 16, 3), 4).eval()
    x = torch.randn(8, 3, 16, 16)
    pruner = prune.ChannelPruner(net, x[:2], 0.6, end_step=1)
    pruner.finish()  # every channel due off is zeroed, none cut yet
    with torch.no_grad():
        masked = net(x)
        prune.compact(net, x[:2])
        assert torch.allclose(net(x), masked, atol=1e-5)
    assert 1 - prune.macs_of(net, x) / prune.macs_of(models.build("resnet20", (16, 16, 3), 4), x) > 0.5


def test_members_with_other_noise_keep_other_channels():
    keep = []
    for seed in (1, 2):
        torch.manual_seed(0)
        net = models.build("small_cnn", (16, 16, 3), 5)
        x = torch.randn(4, 3, 16, 16)
        pruner = prune.ChannelPruner(net, x[:2], 0.5, end_step=1, noise=0.5, seed=seed)
        pruner.finish()
        keep.append(torch.cat(pruner.masks))
    assert (keep[0] != keep[1]).any() and keep[0].sum() == keep[1].sum()


class Grouped(nn.Module):
    """A network whose channels pass through a GroupNorm, which channel pruning cannot cut."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(1, 8, 3), nn.GroupNorm(2, 8), nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).mean((2, 3)))


def make_grouped() -> nn.Module:
    return Grouped()


def test_a_network_it_cannot_prune_gives_a_one_line_error_naming_the_layer(tmp_path):
    with pytest.raises(UserError) as e:
        prune.ChannelPruner(Grouped(), torch.zeros(2, 1, 8, 8), 0.5, end_step=10)
    message = str(e.value)
    assert "layer 'norm' (GroupNorm)" in message and "pool.structure: weights" in message and "\n" not in message
    (tmp_path / "grouped_net.py").write_text(
        "from torch import nn\n\n" + "\n\n".join(inspect.getsource(o) for o in (Grouped, make_grouped))
    )
    out = subprocess.run(
        [sys.executable, "-m", "prune2edge.cli", "run", str(cli.DEMO_CONFIG), "--out", str(tmp_path / "run"), "--quiet"]
        + [
            "--set",
            "model.arch=grouped_net:make_grouped",
            "--set",
            "model.kwargs={}",
            "--set",
            "pool.structure=channels",
        ]
        + ["--set", "pool.size=2", "--set", "cluster.k=1", "--set", "train.epochs=1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])},
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "layer 'norm' (GroupNorm)" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_config_checks_the_channel_keys():
    with pytest.raises(UserError, match="config key 'pool.structure' must be one of \\['weights', 'channels'\\]"):
        config.load(None, {"pool": {"structure": "filters"}})
    with pytest.raises(UserError, match="config key 'pool.structure' channels cuts filters .* pool.mask: magnitude"):
        config.load(None, {"pool": {"structure": "channels", "mask": "antirandom"}})
    with pytest.raises(UserError, match="config key 'pool.criterion' must be one of \\['l1', 'l2', 'taylor'\\]"):
        config.load(None, {"pool": {"criterion": "l3"}})


@pytest.mark.slow
def test_a_channel_pruned_pool_runs_through_the_pipeline_and_ships_less_work(tmp_path):
    cfg = config.load(
        cli.DEMO_CONFIG,
        {
            "pool": {**CLONES, "structure": "channels", "sparsity": 0.5, "size": 3, "criterion": "taylor"},
            "cluster": {"k": 2},
        },
    )
    cfg = config.load(None, config.merged(cfg, {"select": {"fallback": False}}))
    pipeline.run(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    manifest, metrics = read_manifest(run / "bundle"), store.read_json(run / "metrics.json")
    for e in manifest["members"]:
        info = store.read_json(run / "pool" / e["id"] / "member.json")
        assert info["structure"] == "channels" and abs(1 - info["macs_vs_parent"] - 0.5) <= TOLERANCE
        assert abs(metrics["cost"]["members"][e["id"]]["vs_parent_int8"]["macs"] - info["macs_vs_parent"]) < 1e-9
        member, parent = store.load_member(run, e["id"]), store.load_baseline(run)
        assert sum(p.numel() for p in member.parameters()) < sum(p.numel() for p in parent.parameters())
    assert metrics["shipped"]["kind"] != "parent" and metrics["ensemble"]["test_acc"] > 0.8
