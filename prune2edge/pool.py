"""Phase 1: a pool of pruned members derived from the baseline, each trained with its own settings.

By default every member is cloned from the baseline (never from another member), pruned by L1 magnitude on a
gradual schedule while it fine-tunes, and saved with its masks made permanent (plain zeros). The ``pool:``
options move members into other basins: anti-random masks, shrink-and-perturb or re-initialised last layers,
fresh initialisations distilled from the baseline, prune-and-regrow, and one cyclical run whose low points
are the members. Members are jobs run through an executor (in-process, local processes, or Ray tasks on a
cluster), written atomically by this process and never recomputed.
"""

from __future__ import annotations

import math
import queue
import time
from concurrent.futures import Executor, Future
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import config, models, prune, qat, records, store, train
from .errors import UserError
from .executors import RayExecutor
from .prune import ChannelPruner, MagnitudePruner, antirandom_masks, leave_basin
from .runtime.preprocess import Preprocessing
from .runtime.vote import accuracy


@dataclass
class MemberPlan:
    """Everything that makes one member differ from the others."""

    index: int
    seed: int
    sparsity: float
    epochs: float
    lr: float
    batch_size: int
    bootstrap: bool
    source: int = (
        0  # the baseline checkpoint it is cloned from: 0 the final baseline, j >= 1 snapshot j (pool.snapshots)
    )
    parent: bool = False  # the baseline itself in an independent pool (pool.include_parent)

    @property
    def name(self) -> str:
        return f"m{self.index:03d}"


def plan(cfg: config.Config) -> list[MemberPlan]:
    """Sample each member's settings from the ``pool:`` ranges (sparsity stratified over its range)."""
    p, n = cfg.pool, cfg.pool.size
    rng = np.random.default_rng([cfg.seed, 1])
    lo, hi = p.sparsity
    strata = (np.arange(n) + rng.uniform(size=n)) / n
    sparsity = lo + (hi - lo) * rng.permutation(strata)
    (elo, ehi), (llo, lhi), batches, snaps = p.epochs, p.lr, p.batch_size, p.snapshots
    # with snapshots, members take the checkpoints in turn from the last (the baseline itself) backwards
    plans = [
        MemberPlan(
            i,
            int(rng.integers(2**31)),
            round(float(sparsity[i]), 4),
            round(float(rng.uniform(elo, ehi)), 2),
            float(np.exp(rng.uniform(np.log(llo), np.log(lhi)))),
            int(rng.choice(batches)),
            bool(p.bootstrap),
            snaps - i % snaps if snaps else 0,
        )
        for i in range(n)
    ]
    if p.include_parent:  # the parent only needs the QAT part of a member's training, at a tenth of its rate
        qat_epochs = round(plans[0].epochs * (1 - p.qat_start), 2) if qat_bits(p, True)[0] else 0.0
        sparsity = plans[0].sparsity if qat_epochs else 0.0  # a parent that trains no more is not pruned either
        plans[0] = replace(plans[0], parent=True, sparsity=sparsity, epochs=qat_epochs, lr=plans[0].lr * PARENT_LR)
    return plans


def qat_bits(p: config.Pool, parent: bool) -> tuple[float, float]:
    """A member's QAT grid (``pool.weight_bits``, ``pool.largest_layer_bits``; 0: none, quantised after training to
    int8): the parent as a member trains none with ``pool.parent_qat: false``."""
    return (0.0, 0.0) if parent and not p.parent_qat else (p.weight_bits, p.largest_layer_bits)


PARENT_LR = 0.1  # the parent as a member fine-tunes (QAT) at this fraction of the pool's learning rate, cosine


class SnapshotSaver:
    """``after_step`` hook of the baseline's training: saves ``snapshot<j>.pt`` at steps j/n of it, j = 1..n-1
    (snapshot n is the final baseline, ``model.pt``). ``n`` < 2 saves nothing."""

    def __init__(self, model: torch.nn.Module, folder: Path, n: int):
        self.model, self.folder, self.n = model, Path(folder), n

    def __call__(self, step: int, total: int) -> None:
        for j in range(1, self.n):
            if step == max(1, round(total * j / self.n)):
                store.write_state(
                    self.folder / store.SNAPSHOT.format(j),
                    {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                )


@dataclass
class RunInputs:
    """Everything training a member reads from its run, in memory, so that a job needs no access to the run
    directory (a Ray task on another machine): the config, the raw training and validation splits with the fitted
    preprocessing, the image shape, and the baseline's record and weights (each checkpoint members start from)."""

    cfg: config.Config
    baseline_record: dict
    image_shape: tuple[int, int, int]
    preprocessing: Preprocessing
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    states: dict[int, dict[str, torch.Tensor]]

    @classmethod
    def load(cls, run_dir: Path) -> RunInputs:
        """Read them from a prepared run directory whose baseline is trained."""
        cfg = config.load(run_dir / store.CONFIG)
        sources = {0} | {m.source for m in plan(cfg)}
        return cls(
            cfg,
            store.read_json(run_dir / store.BASELINE / store.PARENT_RECORD),
            tuple(store.read_json(run_dir / store.DATASET)["image_shape"]),
            store.preprocessing(run_dir),
            {name: store.split(run_dir, name) for name in ("train", "val")},
            {s: store.load_baseline(run_dir, s).state_dict() for s in sources},
        )

    def tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``train`` or ``val`` split, preprocessed, as (NCHW float32, int64) tensors."""
        x, y = self.splits[name]
        return torch.from_numpy(self.preprocessing.apply(x)), torch.tensor(y)

    def _network(self, overrides: dict | None = None) -> torch.nn.Module:
        b = self.baseline_record
        return models.build(
            b["arch"], tuple(b["image_shape"]), b["num_classes"], **{**b["kwargs"], **(overrides or {})}
        )

    def baseline(self, source: int = 0) -> torch.nn.Module:
        """The baseline network (``source`` 0), or the checkpoint ``source`` of its training (``pool.snapshots``)."""
        model = self._network()
        model.load_state_dict(self.states[source])
        return model

    def fresh(self, seed: int, overrides: dict | None = None) -> torch.nn.Module:
        """A new initialisation (seeded) of the baseline's architecture, with ``overrides`` of its kwargs."""
        torch.manual_seed(seed)
        return self._network(overrides)


def start_model(src: RunInputs, member: MemberPlan) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None]:
    """A member's network before training, and its fixed (anti-random) masks if the pool uses them."""
    cfg = src.cfg
    p = cfg.pool
    if p.family == "independent" and not member.parent:
        model = src.fresh(member.seed, p.member_kwargs)
    else:
        model = src.baseline(member.source)
    fixed = None
    if p.mask != "magnitude":  # drawn from the starting weights, before they leave the basin
        plans = plan(cfg)
        fixed = antirandom_masks(
            models.prunable(model),
            [1 - m.sparsity for m in plans],
            member.index,
            seed=int(np.random.default_rng([cfg.seed, 5]).integers(2**31)),
            weighted=p.mask == "antirandom-weighted",
        )
    if p.family == "clones" and (p.shrink != 1.0 or p.perturb or p.reinit_last):
        leave_basin(model, src.fresh(member.seed), p.shrink, p.perturb, p.reinit_last)
    return model, fixed


def _settings(
    p: config.Pool, epochs: float, lr: float, batch_size: int, schedule: str, cycles: int = 1
) -> train.TrainSettings:
    return train.TrainSettings.of(
        epochs=epochs,
        batch_size=batch_size,
        optimizer=p.optimizer,
        lr=lr,
        momentum=p.momentum,
        weight_decay=p.weight_decay,
        schedule=schedule,
        cycles=cycles,
        label_smoothing=p.label_smoothing,
        distill=p.distill,
        temperature=p.distill_temperature,
        compile=p.compile,
    )


def _pruner(
    model: torch.nn.Module,
    p: config.Pool,
    sparsity: float,
    total: int,
    seed: int,
    fixed: dict[str, torch.Tensor] | None = None,
    example: torch.Tensor | None = None,
) -> MagnitudePruner | ChannelPruner:
    """The member's pruner over ``total`` steps, ramping over the first ``prune_end`` of them (whole channels with
    ``pool.structure: channels``, traced on ``example`` inputs); a clear error when ``pool.regrow`` is set but no
    step would move the mask."""
    if p.structure == "channels":
        end = round(p.prune_end * total)
        return ChannelPruner(
            model, example, sparsity, end, p.criterion, p.reduce, p.mask_noise, seed, p.channel_multiple
        )
    pruner = MagnitudePruner(
        models.prunable(model),
        sparsity,
        p.schedule,
        p.scope,
        round(p.prune_end * total),
        noise=p.mask_noise,
        seed=seed,
        fixed=fixed,
        regrow=p.regrow,
        regrow_every=p.regrow_every,
    )
    if p.regrow and not pruner.regrow_steps(total):
        raise UserError(
            f"pool.regrow is {p.regrow:g} but no step would regrow: after the pruning ramp (pool.prune_end = "
            f"{p.prune_end:g} of {total} steps) fewer than pool.regrow_every = {p.regrow_every} steps are "
            "left to explore; lower pool.regrow_every or pool.prune_end, or train longer (pool.epochs)"
        )
    pruner.update(pruner.target(0))
    return pruner


def measure(model: torch.nn.Module, record: dict, x_val: torch.Tensor, y_val: torch.Tensor) -> tuple[bytes, dict]:
    """A trained member's state_dict (``torch.save`` bytes) and its record with the measured sparsity and fp32
    validation accuracy added."""
    state = store.state_bytes({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    was_training = model.training
    info = {
        **record,
        "measured_sparsity": models.sparsity(model),
        "val_acc_fp32": accuracy(
            train.predict_proba(model, x_val, device=next(model.parameters()).device), y_val.numpy()
        ),
    }
    model.train(was_training)
    return state, info


def write_member(run_dir: Path, state: bytes, info: dict) -> records.Member:
    """Write ``pool/<name>/model.pt`` and then ``member.json`` (a member exists once its record does)."""
    store.write_bytes(run_dir / store.POOL / info["name"] / store.WEIGHTS, state)
    member = records.write_member(run_dir, info)
    member_checkpoint(run_dir, member.name).unlink(missing_ok=True)
    return member


def member_steps(epochs: float, n_train: int, batch_size: int, min_steps: int) -> int:
    """A member's fine-tuning budget in optimiser steps: its sampled epochs over ``n_train`` images, and at least
    ``min_steps`` (``pool.min_steps``; 0: no floor).

    Recovering from pruning takes a number of optimiser steps that hardly depends on the dataset's size, while an
    epoch is 8 steps on 1,000 images and 350 on CIFAR-10: a fixed 1-2 epochs starves a member on a small dataset
    and is ample on a large one. A floor keeps the epochs where they already give enough steps and lifts only the
    starved members. It is chosen before training, not by training until validation accuracy is back near the
    parent's: the learning-rate schedule and the pruning ramp need the length in advance, the budget stays the same
    on every executor and resume, and validation, which the gates and the selection score members on, does not
    also decide when each member stops (which would flatter the members it stopped at a lucky step)."""
    return max(1, round(epochs * math.ceil(n_train / batch_size)), min_steps)


def fit_member(source: Path | RunInputs, member: MemberPlan) -> tuple[bytes, dict]:
    """Start, prune (and with ``pool.weight_bits`` fake-quantise) and train one member from its run (a directory on
    this machine, or the run's inputs); returns its state_dict as ``torch.save`` bytes and its record, for
    :func:`write_member`. From a directory, a killed member resumes from ``pool/<name>/checkpoint.pt``."""
    src = source if isinstance(source, RunInputs) else RunInputs.load(source)
    checkpoint = None if isinstance(source, RunInputs) else member_checkpoint(source, member.name)
    p = src.cfg.pool
    starts = train.clock_starts(_last_row(checkpoint))
    x, y = src.tensors("train")
    if member.bootstrap:
        idx = torch.from_numpy(np.random.default_rng(member.seed).integers(0, len(y), len(y)))
        x, y = x[idx], y[idx]
    model, fixed = start_model(src, member)
    if member.parent and member.epochs == 0:  # the parent as a member without QAT: as it is, not pruned either
        kept = {"epochs": 0, "steps": 0, "history": [], **train.elapsed(starts)}
        return measure(model.cpu(), _record(src, member, model, x[:1], kept), *src.tensors("val"))
    floor = 0 if member.parent else p.min_steps  # the parent as a member is already trained
    total = member_steps(member.epochs, len(x), member.batch_size, floor)
    epochs = total / math.ceil(len(x) / member.batch_size)  # the floor's steps, as train.fit counts them
    hooks = _hooks(model, p, member, total, fixed, x[:2])

    def after_step(step: int, steps: int) -> None:
        for hook in hooks:
            hook(step, steps)

    history = train.fit(
        model,
        x,
        y,
        _settings(p, epochs, member.lr, member.batch_size, "cosine" if member.parent else p.lr_schedule),
        seed=member.seed,
        augment=train.augment_kind(p.augment, src.image_shape),
        device=src.cfg.device,
        after_step=after_step,
        teacher=src.baseline() if p.distill else None,
        checkpoint=checkpoint,
        desc=member.name,
        progress=False,
    )
    hooks[0].finish()
    qat.bake(model)
    model.cpu()
    if p.structure == "channels":  # the zeroed channels cut out: a smaller dense network
        prune.compact(model, x[:2])
    trained = {"epochs": epochs, "steps": total, "history": history, **train.elapsed(starts)}
    return measure(model, _record(src, member, model, x[:1], trained), *src.tensors("val"))


def _record(src: RunInputs, member: MemberPlan, model: torch.nn.Module, example: torch.Tensor, trained: dict) -> dict:
    """A trained member's record (before :func:`measure` adds its accuracy): its plan, how the pool shaped it, and
    ``trained``: the epochs and steps as trained (planned, or more where pool.min_steps lifted them), the history
    and seconds."""
    p = src.cfg.pool
    return {
        **asdict(member),
        "name": member.name,
        "model_kwargs": p.member_kwargs if p.family == "independent" and not member.parent else {},
        **dict(zip(("weight_bits", "largest_layer_bits"), qat_bits(p, member.parent))),
        "planned_epochs": member.epochs,
        "epochs": trained["epochs"],
        "steps": trained["steps"],
        "structure": p.structure,
        **(
            {"macs_vs_parent": prune.macs_of(model, example) / prune.macs_of(src.baseline(), example)}
            if p.structure == "channels"
            else {}
        ),
        "history": trained["history"],
        "seconds": trained["seconds"],
        "cpu_seconds": trained["cpu_seconds"],
    }


def _hooks(
    model: torch.nn.Module,
    p: config.Pool,
    member: MemberPlan,
    total: int,
    fixed: dict[str, torch.Tensor] | None,
    example: torch.Tensor,
) -> list:
    """What runs after each of a member's ``total`` training steps: its pruner (first: :meth:`finish` ends it), then,
    with ``pool.weight_bits``, the switch that turns quantisation-aware training on at ``pool.qat_start`` (at once
    for the parent as a member); attached after the pruner took the weights, it keeps masking the latent fp32 ones."""
    hooks = [_pruner(model, p, member.sparsity, total, member.seed, fixed, example=example)]
    weight_bits, largest = qat_bits(p, member.parent)
    if weight_bits:
        start = 0 if member.parent else round(p.qat_start * total)
        bits = qat.layer_bits(model, weight_bits, largest)
        hooks.append(qat.Switch(qat.attach(model, bits, p.qat_scale), start))
        hooks[-1](0, total)  # on from the first step when it starts at 0
    return hooks


def member_checkpoint(run_dir: Path, name: str) -> Path:
    """Where a member's training state is saved after every epoch while it trains (removed once it is written)."""
    return run_dir / store.POOL / name / store.CHECKPOINT


def _last_row(path: Path | None) -> dict | None:
    """The last history row a killed attempt saved in a checkpoint (None without one)."""
    if path is None or not path.exists():
        return None
    history = torch.load(path, map_location="cpu", weights_only=False)["history"]
    return history[-1] if history else None


def checkpoint_clock(path: Path | None) -> tuple[float, float]:
    """Training seconds a killed attempt saved in a checkpoint, wall and CPU (0 without one, and CPU 0 in a checkpoint
    from before it was recorded): they count in the member's time."""
    row = _last_row(path) or {}
    return row.get("seconds", 0.0), row.get("cpu_seconds", 0.0)


def train_member(run_dir: Path, member: MemberPlan) -> records.Member:
    """Train one member and write ``pool/<name>/`` (``member.json`` last)."""
    return write_member(run_dir, *fit_member(run_dir, member))


def train_cyclical(run_dir: Path, plans: list[MemberPlan]) -> list[records.Member]:
    """One run from the baseline with a cosine learning-rate cycle per member; at each cycle's low point the
    current (pruned) network is saved as the next member (fast geometric ensembling, Garipov et al. 2018).

    Pruning ramps to the highest sampled sparsity within ``prune_end`` of the first cycle; every cycle lasts member
    0's steps (:func:`member_steps`) at member 0's peak learning rate. The run resumes from its last finished epoch after a kill."""
    src = RunInputs.load(run_dir)
    p, lead, n = src.cfg.pool, plans[0], len(plans)
    sparsity = max(m.sparsity for m in plans)
    t0, c0 = time.perf_counter(), time.process_time()
    x, y = src.tensors("train")
    x_val, y_val = src.tensors("val")
    model, _ = start_model(src, lead)
    cycle = member_steps(lead.epochs, len(x), lead.batch_size, p.min_steps)
    epochs = cycle / math.ceil(len(x) / lead.batch_size)
    pruner = _pruner(model, p, sparsity, cycle, lead.seed)  # the ramp is within the first cycle
    infos: dict[int, records.Member] = {}

    def after_step(step: int, total_steps: int) -> None:
        pruner(step, total_steps)
        j = step * n // total_steps - 1
        if step * n % total_steps == 0 and not (run_dir / store.POOL / plans[j].name / store.MEMBER_RECORD).exists():
            record = {
                **asdict(plans[j]),
                "sparsity": sparsity,
                "planned_epochs": lead.epochs,
                "epochs": epochs,
                "steps": cycle,
                "lr": lead.lr,
                "batch_size": lead.batch_size,
                "name": plans[j].name,
                "model_kwargs": {},
                "cyclical": True,
                "seconds": (time.perf_counter() - t0) / (j + 1),
                "cpu_seconds": (time.process_time() - c0) / (j + 1),
            }  # per cycle so far
            infos[j] = write_member(run_dir, *measure(model, record, x_val, y_val))

    train.fit(
        model,
        x,
        y,
        _settings(p, n * epochs, lead.lr, lead.batch_size, "restarts", n),
        seed=lead.seed,
        augment=train.augment_kind(p.augment, src.image_shape),
        device=src.cfg.device,
        after_step=after_step,
        teacher=src.baseline() if p.distill else None,
        checkpoint=run_dir / store.POOL / store.CYCLICAL,
        desc="cyclical",
        progress=False,
    )
    (run_dir / store.POOL / store.CYCLICAL).unlink(missing_ok=True)
    return [infos.get(i) or records.read_member(run_dir, m.name) for i, m in enumerate(plans)]


def build(run_dir: Path, cfg: config.Config, executor: Executor, progress: bool = True) -> list[records.Member]:
    """Train every member not yet on disk and write each here as it arrives; return all members' records in index
    order. A job's failure is raised after the other jobs have finished and been saved."""
    plans, p = plan(cfg), cfg.pool
    done = {
        m.name: records.read_member(run_dir, m.name)
        for m in plans
        if (run_dir / store.POOL / m.name / store.MEMBER_RECORD).exists()
    }
    todo = [m for m in plans if m.name not in done]
    bar = tqdm(total=len(plans), initial=len(done), desc="pool", disable=not progress, unit="member")
    # a cyclical pool is one job that makes (and writes) every member; otherwise one job per member, which returns
    # the member for this process to write; Ray tasks read the run's inputs from Ray's object store, put there once
    if p.cyclical:
        jobs = [(train_cyclical, run_dir, plans)] if todo else []
    else:
        source = executor.put(RunInputs.load(run_dir)) if todo and isinstance(executor, RayExecutor) else run_dir
        jobs = [(fit_member, source, m) for m in todo]
    finished: queue.SimpleQueue[Future] = queue.SimpleQueue()
    failures: list[BaseException] = []

    def save(f: Future) -> None:
        if f.exception() is not None:
            failures.append(f.exception())
            return
        for member in f.result() if p.cyclical else [write_member(run_dir, *f.result())]:
            done[member.name] = member
            bar.set_postfix(
                last=member.name,
                sparsity=round(member.measured_sparsity["overall"], 3),
                val=round(member.val_acc_fp32, 4),
            )
        bar.n = len(done)
        bar.refresh()

    saved = 0
    for fn, src, arg in jobs:
        executor.submit(fn, src, arg).add_done_callback(finished.put)
        while not finished.empty():  # the in-process executor has run it already: save it before the next one
            save(finished.get())
            saved += 1
    for _ in range(len(jobs) - saved):
        save(finished.get())
    bar.close()
    if failures:
        raise failures[0]
    return [done[m.name] for m in plans]
