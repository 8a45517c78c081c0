"""Training: resuming a killed run, batched augmentation, members in lockstep, and the CUDA step (graph, compile)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from prune2edge import config, models, prune, train
from prune2edge.errors import UserError


class Killed(Exception):
    pass


def test_killed_training_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 3, 16, 16, generator=gen), torch.randint(0, 4, (300,), generator=gen)
    s = train.TrainSettings.of(epochs=3.5, batch_size=64, lr=0.05, schedule="onecycle")

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return models.build("small_cnn", (16, 16, 3), 4, width=8, depth=2)

    whole = fresh()
    expected = train.fit(whole, x, y, s, seed=1, augment="crop_flip", progress=False)

    def die_in_epoch_3(step: int, total: int) -> None:
        if step == 12:  # 5 steps an epoch: epochs 1 and 2 are checkpointed
            raise Killed

    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(Killed):
        train.fit(
            fresh(), x, y, s, seed=1, augment="crop_flip", after_step=die_in_epoch_3, checkpoint=ckpt, progress=False
        )
    assert ckpt.exists()
    resumed, ran = fresh(), []
    history = train.fit(
        resumed,
        x,
        y,
        s,
        seed=1,
        augment="crop_flip",
        checkpoint=ckpt,
        progress=False,
        after_step=lambda step, total: ran.append(step),
    )
    assert ran == list(range(11, 19))  # only what the checkpoint lacked: epoch 3 and the half epoch 4
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    assert [h["steps"] for h in history] == [h["steps"] for h in expected] == [5, 10, 15, 18]
    assert [h["train_loss"] for h in history] == pytest.approx([h["train_loss"] for h in expected])
    assert history[-1]["seconds"] >= history[1]["seconds"]


@pytest.mark.parametrize("kind", ["crop", "crop_flip"])
def test_batched_augmentation_equals_the_per_image_crop_and_flip(kind):
    x = torch.randn(40, 3, 20, 12, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(5)
    p = 20 // 8
    padded = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")
    dy, dx = torch.randint(0, 2 * p + 1, (2, len(x)), generator=gen).tolist()
    flip = torch.rand(len(x), generator=gen) < 0.5 if kind == "crop_flip" else torch.zeros(len(x), dtype=torch.bool)
    expected = torch.stack([padded[i, :, dy[i] : dy[i] + 20, dx[i] : dx[i] + 12] for i in range(len(x))])
    expected = torch.where(flip[:, None, None, None], expected.flip(3), expected)
    got = train.augment_batch(x, kind, torch.Generator().manual_seed(5))
    assert torch.equal(got, expected)
    assert not torch.equal(got, x)


def _data(n: int = 300, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def _member(spec: dict, device: str = "cpu") -> tuple[torch.nn.Module, prune.MagnitudePruner, train.TrainSettings]:
    """A fresh network (same initial weights every time) with its pruning hook, as the pool makes one."""
    torch.manual_seed(0)
    model = models.build("small_cnn", (16, 16, 3), 4, width=8, depth=2).to(device)
    pruner = prune.MagnitudePruner(models.prunable(model), spec["sparsity"], "polynomial", "layer", end_step=8)
    pruner.update(pruner.target(0))
    s = train.TrainSettings.of(
        epochs=spec["epochs"],
        batch_size=spec["batch_size"],
        lr=spec["lr"],
        schedule=spec["schedule"],
        label_smoothing=spec.get("label_smoothing", 0.0),
    )
    return model, pruner, s


# different learning rates, schedules, seeds, epochs (members finish at different steps) and batch sizes (run apart)
GROUP = [
    {"lr": 0.05, "epochs": 2, "batch_size": 64, "seed": 1, "sparsity": 0.5, "schedule": "onecycle"},
    {
        "lr": 0.01,
        "epochs": 1.5,
        "batch_size": 64,
        "seed": 2,
        "sparsity": 0.8,
        "schedule": "cosine",
        "label_smoothing": 0.1,
    },
    {"lr": 0.02, "epochs": 2, "batch_size": 32, "seed": 3, "sparsity": 0.7, "schedule": "restarts"},
]


def test_members_trained_in_lockstep_equal_members_trained_alone(tmp_path):
    x, y = _data()
    alone = []
    for spec in GROUP:
        model, pruner, s = _member(spec)
        history = train.fit(model, x, y, s, seed=spec["seed"], augment="crop_flip", after_step=pruner, progress=False)
        alone.append((model, history))
    members = []
    for spec in GROUP:  # each pruning hook acts on its own member's parameters, as in the pool
        model, pruner, s = _member(spec)
        members.append(train.Member(model, x, y, s, spec["seed"], pruner))
    histories = train.fit_group(members, augment="crop_flip", progress=False)
    for (model, history), m, got, spec in zip(alone, members, histories, GROUP):
        assert [h["steps"] for h in got] == [h["steps"] for h in history]
        assert [h["train_loss"] for h in got] == pytest.approx([h["train_loss"] for h in history], rel=1e-4)
        for (name, a), b in zip(model.state_dict().items(), m.model.state_dict().values()):
            assert torch.allclose(a, b, atol=1e-4), name
        assert models.sparsity(m.model)["overall"] == pytest.approx(spec["sparsity"], abs=0.01)
        assert models.sparsity(m.model)["layers"] == models.sparsity(model)["layers"]
        # afterwards each member owns its weights: saving one does not save the whole group
        torch.save(model.state_dict(), tmp_path / "alone.pt")
        torch.save(m.model.state_dict(), tmp_path / "group.pt")
        assert (tmp_path / "group.pt").stat().st_size == (tmp_path / "alone.pt").stat().st_size


def test_compile_settings_are_checked():
    assert config.load(None, {"train": {"compile": "torch"}, "pool": {"compile": "torch"}}).pool.compile == "torch"
    with pytest.raises(UserError, match="train.compile.*needs device: cuda"):
        config.load(None, {"train": {"compile": "cuda-graph"}})
    with pytest.raises(UserError, match="pool.compile"):
        config.load(None, {"pool": {"compile": "graph"}})
    with pytest.raises(ValueError, match="CUDA"):
        x, y = _data(64)
        train.fit(_member(GROUP[0])[0], x, y, train.TrainSettings.of(compile="cuda-graph"), seed=0, progress=False)


@pytest.mark.parametrize("kind", ["onecycle", "cosine", "constant", "restarts"])
def test_schedules_fill_a_tensor_learning_rate_in_place(kind):
    """What a captured CUDA step relies on: the rate it reads is one tensor, refilled by the schedule every step."""
    rates = []
    for lr in (0.1, torch.tensor(0.1)):
        w = torch.nn.Parameter(torch.zeros(3))
        opt = torch.optim.SGD([w], lr=lr, momentum=0.9, nesterov=True)
        sched = train.make_schedule(opt, kind, total=20, cycles=2, cycle_momentum=False)
        tensor = opt.param_groups[0]["lr"]
        seen = []
        for _ in range(19):
            w.grad = torch.ones(3)
            opt.step()
            sched.step()
            seen.append(float(opt.param_groups[0]["lr"]))
        assert opt.param_groups[0]["lr"] is tensor or not torch.is_tensor(lr)
        rates.append(seen)
    assert rates[1] == pytest.approx(rates[0], abs=1e-7)
    assert kind == "constant" or len(set(rates[0])) > 5  # the rate does change


def cuda(test: Callable) -> Callable:
    """A CUDA-only test: skipped without a GPU; ``pytest -m cuda`` selects them (scripts/gpu_check.py runs them)."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU path is tested above)")
    return pytest.mark.cuda(skip(test))


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    """Equal up to a relative difference of the whole tensor (a pruning mask may flip at its threshold)."""
    return float((a.double() - b.double()).norm()) <= rel * float(a.double().norm()) + 1e-6


@cuda
@pytest.mark.parametrize(
    "compile_, optimizer, rel", [("cuda-graph", "sgd", 1e-3), ("cuda-graph", "adam", 1e-3), ("torch", "sgd", 1e-2)]
)
def test_cuda_graph_and_compiled_steps_equal_the_eager_step(compile_, optimizer, rel):
    x, y = _data()  # 300 images, batch 64: every epoch ends with a partial batch, which runs eagerly between replays
    spec = {
        "lr": 0.05,
        "epochs": 3,
        "batch_size": 64,
        "sparsity": 0.7,
        "schedule": "cosine",
    }  # the rate changes every step
    trained = []
    for mode in ("none", compile_):
        model, pruner, s = _member(spec, "cuda")
        s.optimizer, s.compile = optimizer, mode
        history = train.fit(
            model, x, y, s, seed=1, augment="crop_flip", device="cuda", after_step=pruner, progress=False
        )
        trained.append((model, history))
    (eager, h_eager), (fast, h_fast) = trained
    assert [h["steps"] for h in h_fast] == [h["steps"] for h in h_eager] == [5, 10, 15]
    for (name, a), b in zip(eager.state_dict().items(), fast.state_dict().values()):
        assert a.dtype == b.dtype and (a.dtype == torch.long or a.dtype == torch.float32), (
            name
        )  # fp32 master weights and BN
        assert close(a, b, rel), name  # a frozen learning rate (cosine: it changes every step) would fail this
    assert models.sparsity(fast)["overall"] == pytest.approx(0.7, abs=0.01)
    assert not torch.allclose(
        eager.state_dict()["head.2.weight"], _member(spec, "cuda")[0].state_dict()["head.2.weight"]
    )


@cuda
def test_lockstep_on_cuda_follows_each_member_alone():
    x, y = _data()
    alone = []
    for spec in GROUP:
        model, pruner, s = _member(spec, "cuda")
        train.fit(
            model, x, y, s, seed=spec["seed"], augment="crop_flip", device="cuda", after_step=pruner, progress=False
        )
        alone.append(model)
    members = []
    for spec in GROUP:
        model, pruner, s = _member(spec, "cuda")
        members.append(train.Member(model, x, y, s, spec["seed"], pruner))
    train.fit_group(members, augment="crop_flip", device="cuda", progress=False)
    for model, m in zip(alone, members):  # bf16 forward passes of a grouped and a plain convolution: looser tolerance
        for (name, a), b in zip(model.state_dict().items(), m.model.state_dict().values()):
            assert close(a, b, 2e-2), name
