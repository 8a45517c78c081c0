"""Quantisation-aware members: the exported int8 weights lie exactly on the trained grid, int8 and fake-quantised
outputs agree, an independent pool trains and resumes after a kill with its true cost, bad values are refused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper

from prune2edge import config, executors, models, pipeline, pool, qat, qdq, quantize, store, train
from prune2edge.errors import UserError
from prune2edge.runtime.bundle import predict_proba, session

QAT_POOL = {"family": "independent", "weight_bits": 4, "qat_start": 0.5, "size": 2, "sparsity": 0.0, "parent_qat": True}


def test_fake_quantize_rounds_to_the_channel_grid_and_passes_the_gradient_straight_through():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3, requires_grad=True)
    q = qat.fake_quantize(w, 3)
    scale = w.detach().abs().flatten(1).amax(1) / 3
    k = q.detach() / scale.view(-1, 1, 1, 1)
    assert torch.allclose(k, k.round(), atol=1e-5) and k.abs().max() == 3
    assert all(len(torch.unique(k[c].round())) <= 7 for c in range(6))
    (q * torch.arange(q.numel()).view(q.shape)).sum().backward()
    assert torch.equal(w.grad, torch.arange(q.numel(), dtype=torch.float32).view(q.shape))


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """A tiny digits run whose pool is the parent and two independent members, trained with 4-bit QAT, quantised."""
    cfg = config.load(
        None,
        {
            "data": {"name": "digits", "max_train": 400},
            "model": {"kwargs": {"width": 8, "depth": 2}},
            "train": {"epochs": 6, "batch_size": 64},
            "pool": {
                **QAT_POOL,
                "size": 3,
                "include_parent": True,
                "epochs": 6.0,
                "lr": 0.05,
                "batch_size": 64,
                "lr_schedule": "onecycle",
            },
            "cluster": {"k": 2, "k_max": 3},
        },
    )
    run = tmp_path_factory.mktemp("qat")
    pipeline.prepare(run, cfg)
    pipeline.baseline(run, cfg, progress=False)
    members = pool.build(run, cfg, executors.InProcessExecutor(), progress=False)
    quant = quantize.quantize_all(run, cfg, members, progress=False)
    return run, cfg, members, quant


def test_exported_int8_weights_lie_exactly_on_the_qat_grid(qat_run):
    run, _, members, quant = qat_run
    for m in members:
        folder = run / "pool" / m.name
        fp32_model = onnx.load(str(folder / "fp32.onnx"))
        fp32 = {t.name: numpy_helper.to_array(t) for t in fp32_model.graph.initializer}
        fp32_layers = [n for n in fp32_model.graph.node if n.op_type in ("Conv", "Gemm")]
        int8 = onnx.load(str(folder / "int8.onnx"))
        inits = {t.name: numpy_helper.to_array(t) for t in int8.graph.initializer}
        layers = qdq.layers(int8)
        assert len(layers) == len(fp32_layers) == len(models.prunable(store.load_member(run, m.name)))
        made_by = {o: n for n in int8.graph.node for o in n.output}
        for (node, weight, bias), source in zip(layers, fp32_layers):
            k, scale = inits[weight.input[0]], inits[weight.input[1]]
            assert k.dtype == np.int8 and np.abs(k).max() <= 7
            assert all(len(np.unique(row)) <= 15 for row in k.reshape(len(k), -1))
            dequantised = k.astype(np.float64) * scale.reshape(-1, *[1] * (k.ndim - 1))
            # the float weights ONNX Runtime started from (batch-norm folded) are exactly these grid values
            assert np.allclose(dequantised, fp32[source.input[1]], rtol=1e-5, atol=1e-7)
            # the int32 bias keeps its value, at the scale integer kernels assume: input scale x weight scale
            b_scale = inits[bias.input[1]]
            assert np.allclose(b_scale, inits[made_by[node.input[0]].input[1]] * scale, rtol=1e-6)
            assert np.abs(inits[bias.input[0]] * b_scale - fp32[source.input[2]]).max() <= b_scale.max()
        q = quant[m.name]
        assert q.weight_bits == 4 and q.full_integer and q.bits_per_weight_shipped < 8
        assert q.bytes.shipped < quant["baseline"].bytes.shipped


def test_int8_outputs_agree_with_the_fake_quantised_network(qat_run):
    run, _, members, quant = qat_run
    x_val, _ = store.tensors(run, "val")
    for m in members:
        torch_proba = train.predict_proba(store.load_member(run, m.name), x_val)
        int8_proba = predict_proba(session(run / "pool" / m.name / "int8.onnx"), x_val.numpy())
        # the weights are identical (above); what differs is ONNX Runtime's uint8 activations
        assert (torch_proba.argmax(1) == int8_proba.argmax(1)).mean() >= 0.9
        assert np.abs(torch_proba - int8_proba).max(1).mean() < 0.05
        assert quant[m.name].agreement >= 0.9 and quant[m.name].status == "ok"


def test_independent_members_start_from_their_own_initialisation_and_the_parent_from_itself(qat_run):
    run, cfg, members, _ = qat_run
    src = pool.RunInputs.load(run)
    plans = pool.plan(cfg)
    starts = [models.prunable(pool.start_model(src, p)[0])["head.2"] for p in plans]
    base = models.prunable(src.baseline())["head.2"]
    assert torch.equal(starts[0], base) and plans[0].parent and not plans[1].parent
    assert not torch.equal(starts[1], starts[2]) and not torch.equal(starts[1], base)
    # the parent trains only the QAT part of a member's schedule, at a tenth of its learning rate
    assert plans[0].epochs == 3.0 and plans[0].lr == pytest.approx(0.005) and plans[1].epochs == 6.0
    assert all(m.weight_bits == 4 and m.history[-1]["steps"] > 0 for m in members)
    assert members[0].history[-1]["steps"] < members[1].history[-1]["steps"]


@pytest.mark.parametrize(
    "pruned", [{}, {"structure": "channels", "sparsity": (0.5, 0.5), "criterion": "taylor"}], ids=["dense", "channels"]
)
def test_the_parent_without_qat_is_the_baseline_quantised_to_int8(qat_run, tmp_path, pruned):
    run, cfg, _, _ = qat_run
    cfg = cfg.model_copy(update={"pool": cfg.pool.model_copy(update={"parent_qat": False, **pruned})})
    parent = pool.plan(cfg)[0]
    # no training: the pool's cost is the other members'; nor pruning in a pruned pool (taylor would need gradients)
    assert parent.parent and parent.epochs == 0 and parent.sparsity == 0
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("pool"))
    (copy / store.CONFIG).write_text(config.yaml_text(cfg))
    record = pool.write_member(copy, *pool.fit_member(copy, parent))
    assert (record.weight_bits, record.steps, record.history) == (0, 0, [])
    base = store.load_baseline(copy).state_dict()
    assert all(torch.equal(v, base[k]) for k, v in store.load_member(copy, "m000").state_dict().items())
    quant = quantize.quantize_all(copy, cfg, [record], progress=False)
    assert quant["m000"].weight_bits == 8 and quant["m000"].status == "ok"  # post-training int8, like the baseline
    assert quant["m000"] == quant["baseline"]  # the baseline's int8 model, copied, not made again
    for f in ("fp32.onnx", "int8.onnx", "int8.p2e", "val_proba.npy", "quant.json"):
        assert (copy / "pool" / "m000" / f).read_bytes() == (copy / "baseline" / f).read_bytes()


def test_snap_refuses_weights_off_the_grid(tmp_path):
    torch.manual_seed(0)
    model = models.build("small_cnn", (8, 8, 1), 3, width=4, depth=1)
    quantize.export_onnx(model, tmp_path / "fp32.onnx", (8, 8, 1))
    quantize.quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", np.random.rand(8, 1, 8, 8).astype("f4"))
    with pytest.raises(ValueError, match="not on a 4-bit grid"):
        qat.snap_onnx(tmp_path / "int8.onnx", tmp_path / "fp32.onnx", {4})


def test_mse_scales_clip_to_a_finer_grid_that_rounds_with_less_error():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    err = {s: ((qat.fake_quantize(w, 3, s) - w) ** 2).flatten(1).sum(1) for s in ("max", "mse")}
    assert (err["mse"] <= err["max"] + 1e-6).all() and err["mse"].sum() < 0.8 * err["max"].sum()
    step = qat.channel_scale(w, 3, "mse").flatten()
    assert (step < w.abs().flatten(1).amax(1) / 3).any()  # some channels clipped
    k = qat.fake_quantize(w, 3, "mse") / step.view(-1, 1, 1, 1)
    assert torch.allclose(k, k.round(), atol=1e-4) and (k.abs().flatten(1).amax(1).round() == 3).all()


@pytest.mark.parametrize("scale", ["max", "mse"])
def test_the_largest_layer_ships_on_its_own_coarser_grid(tmp_path, scale):
    torch.manual_seed(0)
    model = models.build("small_cnn", (8, 8, 1), 3, width=4, depth=2)
    bits = qat.layer_bits(model, 4, 2)
    weights = models.prunable(model)
    largest = max(weights, key=lambda n: weights[n].numel())
    assert bits[largest] == 2 and {b for n, b in bits.items() if n != largest} == {4}
    qat.Switch(qat.attach(model, bits, scale), 0)(0, 1)
    qat.bake(model)
    quantize.export_onnx(model.eval(), tmp_path / "fp32.onnx", (8, 8, 1))
    quantize.quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", np.random.rand(8, 1, 8, 8).astype("f4"))
    assert qat.snap_onnx(tmp_path / "int8.onnx", tmp_path / "fp32.onnx", {2, 4}) == len(weights)
    ints = sorted(
        (numpy_helper.to_array(t) for t in quantize.int8_weights(onnx.load(str(tmp_path / "int8.onnx")))), key=np.size
    )
    assert set(np.unique(ints[-1])) == {-1, 0, 1}  # the largest layer: 2 bits
    assert all(np.abs(k).max() == 7 for k in ints[:-1])  # the others: 4 bits, each channel reaching its maximum


def test_half_bit_grids_hold_about_two_to_the_bits_values(tmp_path):
    assert [qat.levels(b) for b in (2, 2.5, 3, 3.5, 4, 8)] == [1, 2, 3, 5, 7, 127]
    torch.manual_seed(0)
    model = models.build("small_cnn", (8, 8, 1), 3, width=4, depth=2)
    qat.Switch(qat.attach(model, qat.layer_bits(model, 4, 3.5), "max"), 0)(0, 1)
    qat.bake(model)
    quantize.export_onnx(model.eval(), tmp_path / "fp32.onnx", (8, 8, 1))
    quantize.quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", np.random.rand(8, 1, 8, 8).astype("f4"))
    qat.snap_onnx(tmp_path / "int8.onnx", tmp_path / "fp32.onnx", {3.5, 4})
    largest = max(quantize.int8_weights(onnx.load(str(tmp_path / "int8.onnx"))), key=lambda t: len(t.raw_data))
    k = numpy_helper.to_array(largest)
    assert set(np.unique(k)) <= set(range(-5, 6)) and all(np.abs(c).max() == 5 for c in k)  # 11 values, each channel


@pytest.mark.parametrize(
    "opts,message",
    [
        ({"weight_bits": 1}, "config key 'pool.weight_bits' must be 0 (off: int8 post-training quantisation) or"),
        ({"weight_bits": 9}, "config key 'pool.weight_bits' must be 0"),
        ({"weight_bits": 1.5}, "config key 'pool.weight_bits' must be 0"),
        ({"weight_bits": 3.3}, "or a number of bits from 2 to 8 in steps of 0.5"),
        ({"largest_layer_bits": 9, "weight_bits": 4}, "config key 'pool.largest_layer_bits' must be 0"),
        ({"largest_layer_bits": 3, "weight_bits": 0}, "config key 'pool.largest_layer_bits' needs quantisation-aware"),
        ({"qat_scale": "lsq"}, "config key 'pool.qat_scale' must be one of ['max', 'mse']"),
        ({"family": "independant"}, "config key 'pool.family' must be one of ['clones', 'independent']"),
        ({"qat_start": 1.0}, "config key 'pool.qat_start' must lie in [0.0, 1.0)"),
        (
            {"include_parent": True, "family": "clones"},
            "config key 'pool.include_parent' makes the baseline one member of an independent",
        ),
    ],
)
def test_bad_qat_values_get_one_line_errors(opts, message):
    with pytest.raises(UserError) as e:
        config.load(None, {"pool": opts})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_independent_pool_resumes_a_member_killed_mid_training_and_counts_its_whole_cost(tmp_path):
    cfg = {
        "data": {"name": "digits", "max_train": 300},
        "model": {"kwargs": {"width": 8, "depth": 2}},
        "train": {"epochs": 3, "batch_size": 64},
        "pool": {**QAT_POOL, "epochs": 80.0, "lr": 0.05, "batch_size": 64},
        "cluster": {"k": 2, "k_max": 2},
        "bundle": {"latency_runs": 5},
    }  # 80 epochs of 5 steps: the kill comes one poll after the first saved epoch, long before the last
    path = tmp_path / "qat.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "prune2edge.cli", "run", str(path), "--out", str(run_dir), "--quiet"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = pool.member_checkpoint(run_dir, "m000")
    deadline = time.time() + 240
    while not checkpoint.exists() or pool.checkpoint_clock(checkpoint)[0] <= 0:
        assert proc.poll() is None and time.time() < deadline, "run ended or stalled before m000 saved an epoch"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "pool" / "m000" / "member.json").exists()
    shutil.copy(checkpoint, tmp_path / "killed.pt")
    saved = torch.load(tmp_path / "killed.pt", weights_only=False)
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    m0 = store.read_json(run_dir / "pool" / "m000" / "member.json")
    assert m0["history"][: len(saved["history"])] == saved["history"]  # continued, not restarted
    assert m0["seconds"] >= saved["history"][-1]["seconds"] and not checkpoint.exists()
    assert m0["cpu_seconds"] >= saved["history"][-1]["cpu_seconds"] > 0  # CPU seconds too, across the kill
    records = [store.read_json(f) for f in (run_dir / "pool").glob("*/member.json")]
    assert store.read_json(run_dir / "timings.json")["pool"] >= sum(r["seconds"] for r in records)
    assert store.read_json(run_dir / "cpu_seconds.json")["pool"] >= sum(r["cpu_seconds"] for r in records)
    metrics = store.read_json(run_dir / "metrics.json")
    assert {m["name"] for m in metrics["members"]} == {"m000", "m001"}
