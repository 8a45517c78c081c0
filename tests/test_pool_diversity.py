"""Pool options: baseline snapshots (cosine restarts), mask perturbation, distillation; fast, on tiny data."""

from __future__ import annotations

import pytest
import torch

from prune2edge import config, executors, models, pipeline, pool, prune, store, train
from prune2edge.cli import parse_settings
from prune2edge.errors import UserError


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build("small_cnn", (8, 8, 1), 10, width=8, depth=2)


def test_restarts_schedule_cycles_to_zero_and_back():
    total, cycles = 120, 3
    f = [train.restarts_factor(s, total, cycles) for s in range(total)]
    ends = [39, 79, 119]
    assert all(f[e] < 0.01 for e in ends)
    assert f[40] == pytest.approx(1.0) and f[80] == pytest.approx(1.0)
    assert f[0] < 1 and max(f[:40]) == pytest.approx(1.0)  # warm-up in the first cycle only
    assert all(0 <= v <= 1 for v in f)


def test_snapshot_saver_saves_evenly_spaced_checkpoints(tmp_path):
    model = tiny_model()
    saver = pool.SnapshotSaver(model, tmp_path, 4)
    seen = {}
    for step in range(1, 101):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        saver(step, 100)
        seen[step] = next(model.parameters()).detach().clone()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["snapshot1.pt", "snapshot2.pt", "snapshot3.pt"]
    for j, step in ((1, 25), (2, 50), (3, 75)):
        state = torch.load(tmp_path / f"snapshot{j}.pt", weights_only=True)
        assert torch.equal(next(iter(state.values())), seen[step])
    none = pool.SnapshotSaver(model, tmp_path / "none", 0)
    for step in range(1, 11):
        none(step, 10)
    assert not (tmp_path / "none").exists()


def test_plan_sources_round_robin_and_other_settings_unchanged():
    cfg = config.load(None, {"pool": {"family": "clones", "size": 7}})
    base = pool.plan(cfg)
    assert all(m.source == 0 for m in base)
    snap = pool.plan(config.load(None, {"pool": {"family": "clones", "size": 7, "snapshots": 3}}))
    assert [m.source for m in snap] == [3, 2, 1, 3, 2, 1, 3]
    strip = lambda ms: [(m.seed, m.sparsity, m.epochs, m.lr, m.batch_size) for m in ms]  # noqa: E731
    assert strip(base) == strip(snap)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_mask_noise_changes_which_weights_survive_but_not_how_many(scope):
    masks = []
    for seed in (1, 2):
        model = tiny_model()
        p = prune.MagnitudePruner(models.prunable(model), 0.8, "constant", scope, 1, noise=1.0, seed=seed)
        p.update(0.8)
        assert models.sparsity(model)["overall"] >= 0.8 - 1e-6
        masks.append(torch.cat([m.flatten() for m in p.masks.values()]))
    overlap = (masks[0] & masks[1]).sum() / masks[0].sum()
    assert overlap < 0.9
    # noise 0 is plain magnitude pruning, bit for bit
    a, b = tiny_model(), tiny_model()
    prune.MagnitudePruner(models.prunable(a), 0.7, "constant", scope, 1).update(0.7)
    prune.MagnitudePruner(models.prunable(b), 0.7, "constant", scope, 1, noise=0.0, seed=5).update(0.7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize(
    "key,value",
    [
        ("pool.snapshots", 1),
        ("pool.snapshots", -2),
        ("pool.snapshots", 2.5),
        ("pool.mask_noise", -0.1),
        ("train.cycles", 0),
        ("train.schedule", "sgdr"),
        ("pool.distill", 1.5),
        ("pool.distill_temperature", 0),
    ],
)
def test_config_rejects_bad_diversity_settings(key, value):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        config.load(None, parse_settings([f"{key}={value}"]))


def test_snapshot_members_clone_different_checkpoints(tmp_path):
    cfg = config.load(
        None,
        {
            "data": {"name": "digits", "max_train": 200},
            "model": {"kwargs": {"width": 8, "depth": 2}},
            "train": {"epochs": 3, "batch_size": 64, "schedule": "restarts", "cycles": 3},
            "pool": {
                **config.clone_family({}),
                "size": 3,
                "snapshots": 3,
                "sparsity": 0.5,
                "epochs": 0.2,
                "min_steps": 0,  # a fifth of an epoch, as planned
                "lr": 0.001,
                "batch_size": 64,
                "mask_noise": 0.5,
            },
            "cluster": {"k": 2, "k_max": 3},
        },
    )
    run = tmp_path / "run"
    pipeline.prepare(run, cfg)
    pipeline.baseline(run, cfg, progress=False)
    assert sorted(p.name for p in (run / "baseline").glob("snapshot*.pt")) == ["snapshot1.pt", "snapshot2.pt"]
    first = [store.load_baseline(run, j).state_dict()["head.2.weight"] for j in (1, 2, 3)]
    assert not torch.equal(first[0], first[1]) and torch.equal(
        first[2], store.load_baseline(run).state_dict()["head.2.weight"]
    )
    members = pool.build(run, cfg, executors.InProcessExecutor(), progress=False)
    assert [m.source for m in members] == [3, 2, 1]
    assert all(abs(m.measured_sparsity["overall"] - 0.5) < 0.01 for m in members)
    assert store.read_json(run / "baseline" / "model.json")["snapshots"] == 3


def test_missing_snapshot_is_a_clear_error(tmp_path):
    cfg = config.load(
        None,
        {
            "data": {"name": "digits", "max_train": 200},
            "model": {"kwargs": {"width": 8, "depth": 2}},
            "train": {"epochs": 1, "batch_size": 64},
        },
    )
    run = tmp_path / "run"
    pipeline.prepare(run, cfg)
    pipeline.baseline(run, cfg, progress=False)
    with pytest.raises(UserError, match="snapshot"):
        store.load_baseline(run, 2)


def test_distillation_pulls_the_student_towards_the_teacher():
    """Trained on labels that are pure noise, a student distilled from a teacher learns the teacher's decisions;
    the same student trained on the labels alone does not."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1, 8, 8, generator=gen)
    noise = torch.randint(0, 10, (512,), generator=gen)
    rule = (x.flatten(1) @ torch.randn(64, 10, generator=gen)).argmax(1)
    teacher = tiny_model(seed=1)
    train.fit(teacher, x, rule, train.TrainSettings.of(epochs=20, batch_size=64, lr=0.05), seed=0, progress=False)
    decided = train.predict_proba(teacher, x).argmax(1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}

    def agreement(distill: float) -> float:
        student = tiny_model(seed=2)
        s = train.TrainSettings.of(epochs=15, batch_size=64, lr=0.05, distill=distill, temperature=2.0)
        train.fit(student, x, noise, s, seed=0, teacher=teacher, progress=False)
        return float((train.predict_proba(student, x).argmax(1) == decided).mean())

    assert agreement(1.0) > 0.5 > 0.25 > agreement(0.0)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the teacher is only read
