"""Pool methods that leave the baseline's basin: anti-random masks, shrink-and-perturb / re-initialised layers,
fresh (wider) students, prune-and-regrow, and one cyclical run. Each is tested for what it promises, on tiny data."""

from __future__ import annotations

import itertools

import pytest
import torch

from prune2edge import config, executors, models, pipeline, pool, prune, store
from prune2edge.errors import UserError


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build("small_cnn", (8, 8, 1), 10, width=8, depth=2)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple:
    """A prepared run with a trained baseline on 300 digits (the pool is left to each test)."""
    cfg = config.load(
        None,
        {
            "data": {"name": "digits", "max_train": 300},
            "model": {"kwargs": {"width": 8, "depth": 2}},
            "train": {"epochs": 4, "batch_size": 64},
            # min_steps 0: each member trains its epochs' few steps (these tests check the methods, not recovery)
            "pool": {
                **config.clone_family({}),  # the family these methods move away from the parent
                **{"size": 3, "sparsity": 0.7, "epochs": 1.0, "lr": 0.02, "batch_size": 64, "min_steps": 0},
            },
            "cluster": {"k": 2, "k_max": 3},
        },
    )
    run = tmp_path_factory.mktemp("basins")
    pipeline.prepare(run, cfg)
    pipeline.baseline(run, cfg, progress=False)
    return run, cfg


def configured(run, cfg: config.Config, tmp_path, **pool_opts) -> tuple:
    """A copy of the tiny run whose config sets these pool options."""
    import shutil

    new = tmp_path / "run"
    shutil.copytree(run, new)
    cfg = config.load(None, config.merged(cfg, {"pool": pool_opts}))
    (new / "config.yaml").write_text(config.yaml_text(cfg))
    return new, cfg


def flat_masks(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([m.flatten() for m in masks.values()])


@pytest.mark.parametrize("weighted", [False, True])
def test_antirandom_masks_are_disjoint_while_the_kept_fractions_fit(weighted):
    params = models.prunable(tiny_model())
    keep = [0.3, 0.25, 0.2]
    masks = [flat_masks(prune.antirandom_masks(params, keep, i, seed=7, weighted=weighted)) for i in range(3)]
    for a, b in itertools.combinations(masks, 2):
        assert not (a & b).any()  # pairwise overlap 0
    total = sum(w.numel() for w in params.values())
    for m, f in zip(masks, keep):
        assert abs(int(m.sum()) / total - f) < 0.01
    # the same seed gives the same masks in every member's job; another seed other masks
    assert torch.equal(masks[1], flat_masks(prune.antirandom_masks(params, keep, 1, seed=7, weighted=weighted)))
    assert not torch.equal(masks[1], flat_masks(prune.antirandom_masks(params, keep, 1, seed=8, weighted=weighted)))


def test_antirandom_overlap_is_as_small_as_the_fractions_allow():
    params = models.prunable(tiny_model())
    masks = torch.stack([flat_masks(prune.antirandom_masks(params, [0.5] * 3, i, seed=0)) for i in range(3)])
    count = masks.sum(0)  # members keeping each weight: 3 x 0.5 = 1.5 per weight, so 1 or 2, never 0 or 3
    assert count.min() >= 1 and count.max() <= 2


def test_weighted_antirandom_gives_the_first_members_the_larger_weights():
    params = models.prunable(tiny_model())
    keep = [0.2] * 5
    mean_abs = []
    for i in range(5):
        masks = prune.antirandom_masks(params, keep, i, seed=0, weighted=True)
        mean_abs.append(float(torch.cat([params[n].detach().abs()[m] for n, m in masks.items()]).mean()))
    assert mean_abs[0] > mean_abs[-1]


def test_antirandom_members_keep_disjoint_weights_after_training(tiny_run, tmp_path):
    run, cfg = configured(*tiny_run, tmp_path, mask="antirandom", sparsity=0.7)
    members = pool.build(run, cfg, executors.InProcessExecutor(), progress=False)
    alive = [
        flat_masks({n: w != 0 for n, w in models.prunable(store.load_member(run, m.name)).items()}) for m in members
    ]
    for a, b in itertools.combinations(alive, 2):
        assert not (a & b).any()  # 3 x 30 % kept: the trained members share no weight
    assert all(abs(m.measured_sparsity["overall"] - 0.7) < 0.02 for m in members)


def test_shrink_and_perturb_start_is_exactly_lambda_w_plus_sigma_fresh():
    base, fresh = tiny_model(0), tiny_model(1)
    model = tiny_model(0)
    prune.leave_basin(model, fresh, shrink=0.6, perturb=0.05, reinit_last=0)
    for (n, p), b, f in zip(model.named_parameters(), base.parameters(), fresh.parameters()):
        assert torch.allclose(p, 0.6 * b + 0.05 * f, atol=1e-7), n
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), base.buffers()))  # BatchNorm statistics kept


def test_reinit_last_replaces_exactly_the_last_layers():
    base, fresh = tiny_model(0), tiny_model(1)
    model = tiny_model(0)
    prune.leave_basin(model, fresh, shrink=1.0, perturb=0.0, reinit_last=2)
    last = set(list(models.prunable(model))[-2:])
    fresh_p = dict(fresh.named_parameters())
    for (n, p), b in zip(model.named_parameters(), base.parameters()):
        expected = fresh_p[n] if n.rpartition(".")[0] in last else b
        assert torch.equal(p, expected), n
    assert len(last) == 2


def test_perturbed_member_starts_where_configured(tiny_run, tmp_path):
    run, cfg = configured(*tiny_run, tmp_path, shrink=0.5, perturb=0.1)
    plan = pool.plan(cfg)[1]
    src = pool.RunInputs.load(run)
    model, fixed = pool.start_model(src, plan)
    base, fresh = store.load_baseline(run), src.fresh(plan.seed)
    assert fixed is None
    for p, b, f in zip(model.parameters(), base.parameters(), fresh.parameters()):
        assert torch.allclose(p, 0.5 * b + 0.1 * f, atol=1e-7)


def test_fresh_wider_students_are_built_recorded_and_reloaded(tiny_run, tmp_path):
    run, cfg = configured(*tiny_run, tmp_path, family="independent", member_kwargs={"width": 12}, distill=0.5, size=2)
    plan = pool.plan(cfg)[0]
    src = pool.RunInputs.load(run)
    model, _ = pool.start_model(src, plan)
    assert model.features[0][0].out_channels == 12
    assert torch.equal(models.prunable(model)["head.2"], models.prunable(src.fresh(plan.seed, {"width": 12}))["head.2"])
    members = pool.build(run, cfg, executors.InProcessExecutor(), progress=False)
    assert members[0].model_kwargs == {"width": 12}
    reloaded = store.load_member(run, members[0].name)
    assert reloaded.features[0][0].out_channels == 12
    assert abs(models.sparsity(reloaded)["overall"] - 0.7) < 0.02


def test_regrow_moves_the_mask_at_constant_sparsity():
    torch.manual_seed(0)
    model = tiny_model()
    params = models.prunable(model)
    pruner = prune.MagnitudePruner(params, 0.8, "constant", "layer", end_step=1, regrow=0.3, regrow_every=1)
    pruner.update(0.8)
    before = flat_masks(pruner.masks).clone()
    counts = {n: int(m.sum()) for n, m in pruner.masks.items()}
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(1, 11):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        pruner(step, 20)
        assert {n: int(m.sum()) for n, m in pruner.masks.items()} == counts  # constant sparsity
        assert all(((w != 0) <= pruner.masks[n]).all() for n, w in params.items())
    after = flat_masks(pruner.masks)
    assert (before & ~after).any() and (after & ~before).any()  # weights left and others grew


def test_cyclical_pool_takes_one_member_per_cycle_from_one_run(tiny_run, tmp_path):
    run, cfg = configured(*tiny_run, tmp_path, cyclical=True, sparsity=[0.6, 0.7])
    members = pool.build(run, cfg, executors.InProcessExecutor(), progress=False)
    assert [m.name for m in members] == ["m000", "m001", "m002"]
    assert all(m.cyclical and m.sparsity == max(p.sparsity for p in pool.plan(cfg)) for m in members)
    states = [store.load_member(run, m.name).state_dict() for m in members]
    assert not torch.equal(states[0]["head.2.weight"], states[2]["head.2.weight"])
    assert all(m.measured_sparsity["overall"] >= m.sparsity - 0.01 for m in members)
    assert not (run / "pool" / "cyclical.pt").exists()
    # a member deleted after the run is made again by the same command, identical to the first time
    first = store.read_json(run / "pool" / "m001" / "member.json")
    (run / "pool" / "m001" / "member.json").unlink()
    again = pool.build(run, cfg, executors.InProcessExecutor(), progress=False)
    assert again[1].val_acc_fp32 == first["val_acc_fp32"]


@pytest.mark.parametrize(
    "opts,key",
    [
        ({"family": "independent", "perturb": 0.1}, "pool.family"),
        ({"member_kwargs": {"width": 4}, "family": "clones"}, "pool.member_kwargs"),
        ({"cyclical": True, "mask": "antirandom", "family": "clones"}, "pool.cyclical"),
        ({"cyclical": True, "family": "clones", "weight_bits": 4}, "pool.cyclical"),  # trains no QAT
        ({"mask": "random"}, "pool.mask"),
        ({"shrink": 1.5}, "pool.shrink"),
        ({"regrow": 1.0}, "pool.regrow"),
        ({"reinit_last": -1}, "pool.reinit_last"),
    ],
)
def test_config_rejects_bad_or_conflicting_basin_options(opts, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        config.load(None, {"pool": opts})


def test_regrow_that_could_never_move_the_mask_is_a_clear_error(tiny_run, tmp_path):
    run, cfg = configured(*tiny_run, tmp_path, regrow=0.3, regrow_every=1000)
    with pytest.raises(UserError, match="pool.regrow_every"):
        pool.train_member(run, pool.plan(cfg)[0])


def test_regrow_member_keeps_other_weights_than_plain_pruning_at_the_same_sparsity(tiny_run, tmp_path):
    alive = {}
    for regrow in (0.0, 0.5):
        run, cfg = configured(
            *tiny_run, tmp_path / str(regrow), regrow=regrow, regrow_every=1, prune_end=0.2, epochs=2.0
        )
        info = pool.train_member(run, pool.plan(cfg)[0])
        alive[regrow] = flat_masks({n: w != 0 for n, w in models.prunable(store.load_member(run, info.name)).items()})
        assert abs(info.measured_sparsity["overall"] - 0.7) < 0.02
    assert (alive[0.5] & ~alive[0.0]).sum() > 0.05 * alive[0.0].sum()  # explored: weights plain pruning had dropped
