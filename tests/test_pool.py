"""Phase 1: magnitude pruning reaches its measured target; members are independent clones of the baseline."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CLONES

from prune2edge import cli, config, executors, models, pool, prune


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build("small_cnn", (8, 8, 1), 10, width=8, depth=2)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pruner_reaches_measured_sparsity(scope):
    model = tiny_model()
    pruner = prune.MagnitudePruner(models.prunable(model), 0.8, "polynomial", scope, end_step=10)
    pruner.update(0.8)
    measured = models.sparsity(model)
    assert measured["overall"] >= 0.8
    if scope == "layer":
        assert all(s >= 0.8 for s in measured["layers"].values())
    else:  # one threshold: the surviving weights are the largest overall
        kept = torch.cat([w[w != 0].abs() for w in models.prunable(model).values()])
        assert kept.numel() <= 0.2 * sum(w.numel() for w in models.prunable(model).values()) + 1


def test_pruner_keeps_the_largest_weights():
    model = tiny_model()
    w = models.prunable(model)["features.0.0"]
    before = w.detach().abs().clone()
    prune.MagnitudePruner({"w": w}, 0.5, "constant", "layer", 1).update(0.5)
    assert before[w == 0].max() <= before[w != 0].min()


def test_schedules():
    p = prune.MagnitudePruner({}, 0.9, "polynomial", "layer", end_step=100)
    targets = [p.target(t) for t in range(0, 121, 10)]
    assert targets[0] == 0 and targets[10] == pytest.approx(0.9) and targets[-1] == 0.9
    assert all(a <= b for a, b in itertools.pairwise(targets))
    assert p.target(50) == pytest.approx(0.9 * (1 - 0.5**3))
    assert prune.MagnitudePruner({}, 0.7, "constant", "layer", 100).target(0) == 0.7


def test_masks_hold_during_training_and_are_permanent():
    model = tiny_model()
    params = models.prunable(model)
    pruner = prune.MagnitudePruner(params, 0.6, "constant", "layer", 1)
    pruner.update(0.6)
    zeros = {n: (w == 0).clone() for n, w in params.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for step in range(1, 4):
        model(torch.randn(4, 1, 8, 8)).sum().backward()
        opt.step()
        pruner(step, 3)
    assert all(bool((w[zeros[n]] == 0).all()) for n, w in params.items())
    # plain tensors in the state dict: no masks, hooks or *_orig parameters left behind
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict()) and not model._forward_pre_hooks


def test_plan_spreads_sparsity_and_is_seeded():
    cfg = config.load(overrides={"pool": {"size": 10, "sparsity": [0.5, 0.9], "include_parent": False}})
    plans = pool.plan(cfg)
    s = sorted(p.sparsity for p in plans)
    assert all(0.5 + 0.04 * i <= v <= 0.5 + 0.04 * (i + 1) for i, v in enumerate(s))  # one per tenth of the range
    assert plans == pool.plan(cfg) and plans != pool.plan(cfg.model_copy(update={"seed": 1}))
    assert len({p.seed for p in plans}) == 10


def prepared_copy(demo_run: Path, folder: Path, pool_keys: dict) -> Path:
    """The demo run up to its baseline, without its pool, configured for the pool ``pool_keys``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("splits.npz", "preprocess.json", "dataset.json"):
        shutil.copy(demo_run / name, folder / name)
    shutil.copytree(demo_run / "baseline", folder / "baseline")
    (folder / "config.yaml").write_text(config.yaml_text(config.load(cli.DEMO_CONFIG, {"pool": pool_keys})))
    return folder


def test_members_are_clones_of_the_baseline_not_chained(demo_run, tmp_path):
    """Training member 3 alone, with no other member present, gives exactly member 3 trained after members 0-2."""
    after = prepared_copy(demo_run, tmp_path / "after", CLONES)
    plans = pool.plan(config.load(after / "config.yaml"))
    for plan in plans[:4]:
        pool.train_member(after, plan)
    run_dir = prepared_copy(demo_run, tmp_path / "alone", CLONES)
    info = pool.train_member(run_dir, plans[3])
    alone = torch.load(run_dir / "pool" / plans[3].name / "model.pt", weights_only=True)
    full = torch.load(after / "pool" / plans[3].name / "model.pt", weights_only=True)
    assert all(torch.equal(alone[k], full[k]) for k in full)
    assert info.measured_sparsity["overall"] >= plans[3].sparsity - 0.01
    assert sorted(p.name for p in (run_dir / "pool").iterdir()) == [plans[3].name]


def test_process_pool_executor_runs_members(demo_run, tmp_path):
    run_dir = prepared_copy(demo_run, tmp_path, {**CLONES, "size": 3})
    cfg = config.load(run_dir / "config.yaml", {"cluster": {"k": 3}})
    (run_dir / "pool" / "m000").mkdir(parents=True)
    shutil.copy(demo_run / "pool" / "m000" / "member.json", run_dir / "pool" / "m000" / "member.json")
    with executors.make_executor(2) as ex:
        assert not isinstance(ex, executors.InProcessExecutor)
        members = pool.build(run_dir, cfg, ex, progress=False)
    assert [m.name for m in members] == ["m000", "m001", "m002"]
    assert not (run_dir / "pool" / "m000" / "model.pt").exists()  # finished member kept, not recomputed
    plans = pool.plan(cfg)
    for m, p in zip(members[1:], plans[1:]):
        assert m.measured_sparsity["overall"] >= p.sparsity - 0.01
        assert m.val_acc_fp32 > 0.8 and (run_dir / "pool" / p.name / "model.pt").exists()


def test_distillation_changes_the_member(demo_run, tmp_path):
    """A clone distilled from its baseline (pool.distill 0.7) differs from the same clone fine-tuned on labels alone."""
    trained = {}
    for distill in (0.7, 0.0):
        run_dir = prepared_copy(demo_run, tmp_path / str(distill), {**CLONES, "distill": distill})
        plan = pool.plan(config.load(run_dir / "config.yaml"))[0]
        info = pool.train_member(run_dir, plan)
        trained[distill] = torch.load(run_dir / "pool" / plan.name / "model.pt", weights_only=True)
        assert info.measured_sparsity["overall"] >= plan.sparsity - 0.01 and info.val_acc_fp32 > 0.8
    assert not all(torch.equal(trained[0.7][k], trained[0.0][k]) for k in trained[0.0])  # another loss, other weights
