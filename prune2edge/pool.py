"""Phase 1: a pool of magnitude-pruned clones of the baseline, each fine-tuned with its own settings.

Every member is cloned from the baseline (never from another member), pruned by L1 magnitude on a
gradual schedule while it fine-tunes, and saved with its masks made permanent (plain zeros).
Members are independent jobs run through an executor, written atomically and never recomputed.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import models, store, train
from .vote import accuracy


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
    source: int = 0  # the baseline checkpoint it is cloned from: 0 the final baseline, j >= 1 snapshot j (pool.snapshots)

    @property
    def name(self) -> str:
        return f"m{self.index:03d}"


def plan(cfg: dict) -> list[MemberPlan]:
    """Sample each member's settings from the ``pool:`` ranges (sparsity stratified over its range)."""
    p, n = cfg["pool"], cfg["pool"]["size"]
    rng = np.random.default_rng([cfg["seed"], 1])
    lo, hi = (p["sparsity"] if isinstance(p["sparsity"], list) else [p["sparsity"]] * 2)
    strata = (np.arange(n) + rng.uniform(size=n)) / n
    sparsity = lo + (hi - lo) * rng.permutation(strata)
    elo, ehi = p["epochs"] if isinstance(p["epochs"], list) else [p["epochs"]] * 2
    llo, lhi = p["lr"] if isinstance(p["lr"], list) else [p["lr"]] * 2
    batches = p["batch_size"] if isinstance(p["batch_size"], list) else [p["batch_size"]]
    snaps = p["snapshots"]
    # with snapshots, members take the checkpoints in turn from the last (the baseline itself) backwards
    return [MemberPlan(i, int(rng.integers(2**31)), round(float(sparsity[i]), 4), round(float(rng.uniform(elo, ehi)), 2),
                       float(np.exp(rng.uniform(np.log(llo), np.log(lhi)))), int(rng.choice(batches)), bool(p["bootstrap"]),
                       snaps - i % snaps if snaps else 0)
            for i in range(n)]


class MagnitudePruner:
    """Zeroes the smallest-magnitude weights, raising sparsity on a schedule while training runs.

    ``polynomial``: s(t) = s_f * (1 - (1 - t / t_end)^3), the cubic schedule of Zhu & Gupta (2017),
    reached at ``t_end`` and held after. ``constant``: s_f from the first step. Masks are recomputed
    from current magnitudes about 20 times during the ramp and re-applied after every step.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], final: float, schedule: str, scope: str, end_step: int,
                 noise: float = 0.0, seed: int = 0):
        self.params, self.final, self.schedule, self.scope = params, final, schedule, scope
        self.end_step = max(1, end_step)
        self.every = max(1, self.end_step // 20)
        self.masks: dict[str, torch.Tensor] = {}
        # mask perturbation: rank |w| * exp(noise * eps) with eps ~ N(0, 1) drawn once per weight and member
        gen = torch.Generator().manual_seed(seed)
        self.noise = {n: torch.exp(noise * torch.randn(w.shape, generator=gen)) for n, w in params.items()} if noise > 0 else None

    def scores(self) -> dict[str, torch.Tensor]:
        return {n: w.detach().abs() * self.noise[n] if self.noise else w.detach().abs() for n, w in self.params.items()}

    def target(self, step: int) -> float:
        if self.schedule == "constant" or step >= self.end_step:
            return self.final
        return self.final * (1 - (1 - step / self.end_step) ** 3)

    @torch.no_grad()
    def update(self, sparsity: float) -> None:
        if sparsity <= 0:
            return
        score = self.scores()
        if self.scope == "global":
            flat = torch.cat([v.flatten() for v in score.values()])
            k = max(1, math.ceil(sparsity * flat.numel()))
            cut = {n: flat.kthvalue(k).values for n in self.params}
        else:
            cut = {n: v.flatten().kthvalue(max(1, math.ceil(sparsity * v.numel()))).values for n, v in score.items()}
        self.masks = {n: score[n] > cut[n] for n in self.params}
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for n, m in self.masks.items():
            self.params[n].mul_(m)

    def __call__(self, step: int, total: int) -> None:
        self.apply()  # first undo the optimiser's step on pruned weights: they never grow back
        if step <= self.end_step and (step % self.every == 0 or step == self.end_step):
            self.update(self.target(step))


class SnapshotSaver:
    """``after_step`` hook of the baseline's training: saves ``snapshot<j>.pt`` at steps j/n of it, j = 1..n-1
    (snapshot n is the final baseline, ``model.pt``). ``n`` < 2 saves nothing."""

    def __init__(self, model: torch.nn.Module, folder: Path, n: int):
        self.model, self.folder, self.n = model, Path(folder), n

    def __call__(self, step: int, total: int) -> None:
        for j in range(1, self.n):
            if step == max(1, round(total * j / self.n)):
                store.write_state(self.folder / f"snapshot{j}.pt", {k: v.detach().cpu() for k, v in self.model.state_dict().items()})


def train_member(run_dir: Path, member: MemberPlan) -> dict:
    """Clone the baseline, prune and fine-tune it, and write ``pool/<name>/`` (``member.json`` last)."""
    from . import config

    cfg = config.load(run_dir / "config.yaml")
    p = cfg["pool"]
    out = run_dir / "pool" / member.name
    t0 = time.perf_counter()
    x, y = store.tensors(run_dir, "train")
    if member.bootstrap:
        idx = torch.from_numpy(np.random.default_rng(member.seed).integers(0, len(y), len(y)))
        x, y = x[idx], y[idx]
    model = store.load_baseline(run_dir, member.source)
    settings = train.TrainSettings(epochs=member.epochs, batch_size=member.batch_size, optimizer=p["optimizer"], lr=member.lr,
                                   momentum=p["momentum"], weight_decay=p["weight_decay"], schedule=p["lr_schedule"],
                                   label_smoothing=p["label_smoothing"], distill=p["distill"], temperature=p["distill_temperature"],
                                   compile=p["compile"])
    total = max(1, round(member.epochs * math.ceil(len(x) / member.batch_size)))
    pruner = MagnitudePruner(models.prunable(model), member.sparsity, p["schedule"], p["scope"], round(p["prune_end"] * total),
                             noise=p["mask_noise"], seed=member.seed)
    pruner.update(pruner.target(0))
    history = train.fit(model, x, y, settings, seed=member.seed, augment=train.augment_kind(p["augment"], store.split(run_dir, "train")[0].shape[1:]),
                        device=cfg["device"], after_step=pruner, teacher=store.load_baseline(run_dir) if p["distill"] else None,
                        desc=member.name, progress=False)
    pruner.update(member.sparsity)
    model.cpu()
    x_val, y_val = store.tensors(run_dir, "val")
    info = {**asdict(member), "name": member.name, "measured_sparsity": models.sparsity(model),
            "val_acc_fp32": accuracy(train.predict_proba(model, x_val), y_val.numpy()),
            "history": history, "seconds": time.perf_counter() - t0}
    out.mkdir(parents=True, exist_ok=True)
    store.write_state(out / "model.pt", model.state_dict())
    store.write_json(out / "member.json", info)
    return info


class InProcessExecutor(Executor):
    """Runs each job at submit time in this process: the default, and the simplest to debug."""

    def submit(self, fn, /, *args, **kwargs) -> Future:  # type: ignore[override]
        f: Future = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - handed to the caller through the future
            f.set_exception(e)
        return f


def _limit_threads(n: int) -> None:
    torch.set_num_threads(n)


def make_executor(workers: int) -> Executor:
    """The seam where member jobs run: in-process for 1 worker, else a local process pool."""
    if workers <= 1:
        return InProcessExecutor()
    threads = max(1, (os.cpu_count() or 1) // workers)
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_limit_threads, initargs=(threads,))


def build(run_dir: Path, cfg: dict, executor: Executor, progress: bool = True) -> list[dict]:
    """Train every member not yet on disk; return all members' records in index order."""
    plans = plan(cfg)
    done = {m.name: store.read_json(run_dir / "pool" / m.name / "member.json")
            for m in plans if (run_dir / "pool" / m.name / "member.json").exists()}
    todo = [m for m in plans if m.name not in done]
    bar = tqdm(total=len(plans), initial=len(done), desc="pool", disable=not progress, unit="member")

    def record(f: Future) -> None:
        if f.exception() is None:
            info = f.result()
            done[info["name"]] = info
            bar.set_postfix(last=info["name"], sparsity=round(info["measured_sparsity"]["overall"], 3), val=round(info["val_acc_fp32"], 4))
            bar.update(1)

    futures = []
    for m in todo:
        futures.append(executor.submit(train_member, run_dir, m))
        futures[-1].add_done_callback(record)
    for f in futures:
        f.result()  # raises the first member's failure, after the others have finished and been saved
    bar.close()
    return [done[m.name] for m in plans]
