"""Training loop shared by the baseline and the pool's fine-tuning: seeded, augmented, scheduled.

On CUDA the forward pass runs under bf16 autocast (weights, optimiser state and BatchNorm statistics stay fp32),
the optimiser is fused and reads its learning rate from a device tensor, and ``compile`` can add
``torch.compile`` or capture the whole step as a CUDA graph. :func:`fit_group` trains several members at once.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import config, store
from .runtime.vote import accuracy


@dataclass
class TrainSettings:
    """How to fit one network: the keys of a config's ``train:`` section (its defaults: :meth:`of`; ``augment`` is
    ``fit``'s, resolved for the images by :func:`augment_kind`) and distillation from a teacher."""

    epochs: float
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    label_smoothing: float
    cycles: int
    compile: str  # "torch": torch.compile the network; "cuda-graph": replay the whole step as a CUDA graph
    distill: float = 0.0  # weight of the teacher's softened outputs in the loss (fit's ``teacher``)
    temperature: float = 4.0

    @classmethod
    def of(cls, section: config.Train | None = None, **changes: Any) -> TrainSettings:
        """A ``train:`` section's settings (the defaults without one), with ``changes``."""
        return cls(**{**(section or config.Train()).model_dump(exclude={"augment"}), **changes})


def augment_kind(setting: str, image_shape: tuple[int, int, int]) -> str:
    """``auto`` means random crop + flip for colour images of 16 px or more, nothing otherwise."""
    if setting != "auto":
        return setting
    h, w, c = image_shape
    return "crop_flip" if c == 3 and min(h, w) >= 16 else "none"


def augment_batch(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to 1/8 of the side (reflect padding), and horizontal flips for ``crop_flip``.

    The whole batch in a few tensor ops on ``x``'s device (one gather, no per-image loop); ``gen`` is a CPU
    generator, so the same seed gives the same crops and flips on every device."""
    if kind == "none":
        return x
    n, c, h, w = x.shape
    p = max(1, h // 8)
    padded = nn.functional.pad(x, (p, p, p, p), mode="reflect")
    dy, dx = torch.randint(0, 2 * p + 1, (2, n), generator=gen).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    if kind == "crop_flip":
        flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def restarts_factor(step: int, total: int, cycles: int, warmup: float = 0.1) -> float:
    """Cosine annealing with warm restarts (SGDR; snapshot ensembles): ``cycles`` equal cycles, each from the
    peak down to zero, the first after a linear warm-up over ``warmup`` of it. Cycle ends are the snapshots."""
    length = total / max(1, cycles)
    c = min(int(step // length), cycles - 1)
    t = (step - c * length) / length
    if c == 0 and t < warmup:
        return min(1.0, (step + 1) / (warmup * length))
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_schedule(
    opt: torch.optim.Optimizer, kind: str, total: int, cycles: int = 1, cycle_momentum: bool = True
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule over ``total`` steps; ``onecycle`` also cycles the momentum unless told not to."""
    if kind == "restarts":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: restarts_factor(s, total, cycles))
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=[float(g["lr"]) for g in opt.param_groups],
            total_steps=total,
            pct_start=0.25,
            cycle_momentum=cycle_momentum,
        )
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def make_optimizer(params: list[nn.Parameter], s: TrainSettings, device: str) -> torch.optim.Optimizer:
    """Nesterov SGD or AdamW. On CUDA the update is fused and the learning rate lives in a device tensor, which
    the schedule fills in place: a captured step (``compile: cuda-graph``) reads the current rate at every replay."""
    if torch.device(device).type != "cuda":
        lr, kw = s.lr, {}
    else:
        lr, kw = torch.tensor(s.lr, device=device), {"fused": True}
        if s.optimizer == "adam":
            kw["capturable"] = s.compile == "cuda-graph"
    if s.optimizer == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=s.weight_decay, **kw)
    return torch.optim.SGD(
        params, lr=lr, momentum=s.momentum, nesterov=s.momentum > 0, weight_decay=s.weight_decay, **kw
    )


def autocast(device: str) -> torch.autocast:
    """bf16 autocast on CUDA, without the weight-cast cache (so that a CUDA graph may capture it); off elsewhere."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=kind == "cuda", cache_enabled=False)


def loss_of(out: torch.Tensor, y: torch.Tensor, s: TrainSettings, soft: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy with label smoothing; with the teacher's softened outputs ``soft``, mixed with distillation:
    (1 - distill) * CE + distill * T^2 * KL(teacher || model) at temperature T (Hinton et al. 2015)."""
    loss = nn.functional.cross_entropy(out, y, label_smoothing=s.label_smoothing)
    if soft is None:
        return loss
    kl = nn.functional.kl_div(torch.log_softmax(out / s.temperature, 1), soft, reduction="batchmean")
    return (1 - s.distill) * loss + s.distill * s.temperature**2 * kl


def teacher_soft(teacher: nn.Module | None, xb: torch.Tensor, s: TrainSettings) -> torch.Tensor | None:
    """The teacher's softened outputs for a distillation loss, or None without a teacher or ``s.distill``."""
    if teacher is None or not s.distill:
        return None
    with torch.no_grad():
        return torch.softmax(teacher(xb) / s.temperature, 1)


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, s: TrainSettings, device: str, teacher: nn.Module | None = None
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One optimiser step on a batch (forward, loss, backward, update); returns the detached loss and outputs.
    With ``s.compile == "torch"`` the network runs ``torch.compile``d."""
    forward = torch.compile(model) if s.compile == "torch" else model

    def step(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(device):
            out = forward(xb)
            loss = loss_of(out, yb, s, teacher_soft(teacher, xb, s))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach(), out.detach()

    return step


class CudaGraphStep:
    """A training step captured once as a CUDA graph and replayed (``compile: cuda-graph``).

    The first ``warmup`` calls run eagerly on a side stream: they are real steps, and they create the optimiser
    state. The next call with ``batch_size`` images captures the step on static input tensors; later calls of
    that size copy their batch into them and replay. Other sizes (an epoch's partial last batch) run eagerly.
    Whatever changes between steps must be read from tensors: the learning rate is (:func:`make_optimizer`).
    """

    def __init__(
        self,
        step: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        batch_size: int,
        warmup: int = 3,
    ):
        self.step, self.batch_size, self.warmup = step, batch_size, warmup
        self.side = torch.cuda.Stream()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if len(xb) != self.batch_size or self.calls <= self.warmup:
            return self.eager(xb, yb)
        if self.graph is None:
            self.inputs = (xb.clone(), yb.clone())
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.step(*self.inputs)
        else:
            self.inputs[0].copy_(xb)
            self.inputs[1].copy_(yb)
        self.graph.replay()
        return self.outputs

    def eager(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            out = self.step(xb, yb)
        torch.cuda.current_stream().wait_stream(self.side)
        return out


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    s: TrainSettings,
    *,
    seed: int,
    augment: str = "none",
    device: str = "cpu",
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    after_step: Callable[[int, int], None] | None = None,
    teacher: nn.Module | None = None,
    checkpoint: Path | None = None,
    desc: str = "train",
    progress: bool = True,
) -> list[dict]:
    """Train in place on preprocessed NCHW tensors; returns one history row per epoch.

    ``epochs`` may be fractional (a partial last epoch). ``after_step(step, total)`` runs after
    every optimiser step (the pool uses it to apply pruning masks). With a ``teacher`` and ``s.distill`` > 0 the
    loss mixes in distillation (:func:`loss_of`).
    With a ``checkpoint`` path, the whole training state is saved there after every epoch and, when the file
    exists, training continues from it: a killed run resumes where its last epoch ended, to the same weights.
    ``s.compile == "cuda-graph"`` (CUDA only) replays each step as a CUDA graph (:class:`CudaGraphStep`); the
    one-cycle schedule then holds the momentum at ``s.momentum``, since the captured update cannot change it.
    """
    if s.compile == "cuda-graph" and torch.device(device).type != "cuda":
        raise ValueError(f"compile 'cuda-graph' needs a CUDA device, not '{device}'")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(device, memory_format=torch.channels_last)  # NHWC convolutions: faster on CPU (oneDNN) and GPU
    x, y = x.to(device), y.to(device)  # the training split lives on the device; batches are taken there by index
    steps_per_epoch = max(1, math.ceil(len(x) / s.batch_size))
    total = max(1, round(s.epochs * steps_per_epoch))
    opt, sched, step_fn = _stepper(model, s, device, total, teacher)
    state = {"model": model, "optimizer": opt, "schedule": sched}
    history, step = _resume(checkpoint, state, gen, device)
    starts = clock_starts(history[-1] if history else None)
    bar = tqdm(total=total, initial=step, desc=desc, disable=not progress, leave=False, unit="step")
    while step < total:
        model.train()
        order = torch.randperm(len(x), generator=gen).to(device)
        step, sums = _epoch(x, y, order, s.batch_size, (step, total), step_fn, sched, augment, gen, after_step, bar)
        row = {"epoch": len(history) + 1, "steps": step, **sums, **elapsed(starts)}
        if x_val is not None and y_val is not None:
            row["val_acc"] = accuracy(predict_proba(model, x_val, device=device), y_val.numpy())
        bar.set_postfix({k: round(v, 4) for k, v in row.items() if k in ("train_loss", "val_acc")})
        history.append(row)
        if checkpoint is not None and step < total:
            store.write_state(
                checkpoint,
                {k: v.state_dict() for k, v in state.items()}
                | {"generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "history": history, "step": step},
            )
    bar.close()
    model.to(memory_format=torch.contiguous_format)
    return history


def clock_starts(last: dict | None) -> tuple[float, float]:
    """The wall and CPU clocks' starts, so that they count from the first start of a training whose killed attempt
    saved ``last`` (its last history row; None: a first start)."""
    last = last or {}
    return time.perf_counter() - last.get("seconds", 0.0), time.process_time() - last.get("cpu_seconds", 0.0)


def elapsed(starts: tuple[float, float]) -> dict[str, float]:
    """A history row's seconds since ``starts``: wall, and this process's CPU."""
    return {"seconds": time.perf_counter() - starts[0], "cpu_seconds": time.process_time() - starts[1]}


def _stepper(model: nn.Module, s: TrainSettings, device: str, total: int, teacher: nn.Module | None) -> tuple:
    """:func:`fit`'s optimiser, its schedule over ``total`` steps, and the training step (distilling from
    ``teacher`` where ``s.distill``; replayed as a CUDA graph where ``s.compile`` is ``cuda-graph``)."""
    graph = s.compile == "cuda-graph"
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], s, device)
    sched = make_schedule(opt, s.schedule, total, s.cycles, cycle_momentum=not graph)
    if teacher is not None and s.distill:
        teacher.eval().to(device)
    else:
        teacher = None
    step_fn = train_step(model, opt, s, device, teacher)
    return opt, sched, CudaGraphStep(step_fn, s.batch_size) if graph else step_fn


def _epoch(
    x: torch.Tensor,
    y: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    steps: tuple[int, int],
    step_fn: Callable,
    sched,
    augment: str,
    gen: torch.Generator,
    after_step: Callable[[int, int], None] | None,
    bar,
) -> tuple[int, dict]:
    """One pass of :func:`fit` over the data in ``order``, from ``steps = (step, total)`` until the pass or the
    steps end: the step reached, and the pass's mean training loss and accuracy."""
    step, total = steps
    seen = 0
    loss_sum = torch.zeros((), device=x.device)  # running sums stay on the device: no sync per step
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for i in range(0, len(x), batch_size):
        if step >= total:
            break
        idx = order[i : i + batch_size]
        xb = augment_batch(x[idx], augment, gen).contiguous(memory_format=torch.channels_last)
        yb = y[idx]
        loss, out = step_fn(xb, yb)
        sched.step()
        step += 1
        if after_step is not None:
            after_step(step, total)
        seen += len(idx)
        loss_sum += loss * len(idx)
        correct += (out.argmax(1) == yb).sum()
        bar.update(1)
    return step, {"train_loss": float(loss_sum) / seen, "train_acc": int(correct) / seen}


def _resume(checkpoint: Path | None, state: dict, gen: torch.Generator, device: str) -> tuple[list[dict], int]:
    """Where :func:`fit` continues: the history and step saved in ``checkpoint`` (loaded into the model, optimiser
    and schedule of ``state``, the data order's generator and torch's RNG), or none and 0."""
    if checkpoint is None or not checkpoint.exists():
        return [], 0
    saved = torch.load(checkpoint, map_location=device, weights_only=False)
    for key, obj in state.items():
        obj.load_state_dict(saved[key])
    gen.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    return saved["history"], saved["step"]


@dataclass
class Member:
    """One network of a lockstep group (:func:`fit_group`), with what ``fit`` would take for it."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    settings: TrainSettings
    seed: int
    after_step: Callable[[int, int], None] | None = None


class _Lane:
    """One member's own progress through a group's training: its data order, augmentation, optimiser, schedule."""

    def __init__(self, m: Member, x: torch.Tensor, y: torch.Tensor, device: str):
        self.m, self.x, self.y, self.s = m, x, y, m.settings
        self.gen = torch.Generator().manual_seed(m.seed)
        self.total = max(1, round(self.s.epochs * max(1, math.ceil(len(x) / self.s.batch_size))))
        self.opt = make_optimizer([p for p in m.model.parameters() if p.requires_grad], self.s, device)
        self.sched = make_schedule(self.opt, self.s.schedule, self.total, self.s.cycles)
        self.step, self.pos, self.history = 0, 0, []

    def batch(self, augment: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos == 0:
            self.order = torch.randperm(len(self.x), generator=self.gen).to(self.x.device)
            self.seen, self.loss_sum, self.correct = (
                0,
                torch.zeros((), device=self.x.device),
                torch.zeros((), dtype=torch.long, device=self.x.device),
            )
        idx = self.order[self.pos : self.pos + self.s.batch_size]
        self.pos += len(idx)
        return augment_batch(self.x[idx], augment, self.gen), self.y[idx]

    def update(
        self, grads: dict[str, torch.Tensor], loss: torch.Tensor, out: torch.Tensor, yb: torch.Tensor, t0: float
    ) -> None:
        """The member's optimiser step on its gradients, then its hook and running sums."""
        for name, p in self.m.model.named_parameters():
            p.grad = grads[name]
        self.opt.step()
        self.sched.step()
        self.step += 1
        if self.m.after_step is not None:
            self.m.after_step(self.step, self.total)
        self.seen += len(yb)
        self.loss_sum += loss * len(yb)
        self.correct += (out.argmax(1) == yb).sum()
        if self.pos >= len(self.x) or self.step >= self.total:
            self.history.append(
                {
                    "epoch": len(self.history) + 1,
                    "steps": self.step,
                    "train_loss": float(self.loss_sum) / self.seen,
                    "train_acc": int(self.correct) / self.seen,
                    "seconds": time.perf_counter() - t0,
                }
            )
            self.pos = 0


def _lockstep(
    forward: Callable,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    rows: list[int],
    batches: dict[int, tuple[torch.Tensor, torch.Tensor]],
    settings: list[TrainSettings],
    teacher: nn.Module | None,
    device: str,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Forward and backward of the members ``rows`` of the stacked weights on their batches (of one size) in one
    vmapped call; gradients land in ``params[k].grad`` at those rows. Returns their losses and detached outputs."""
    every = len(rows) == len(next(iter(params.values())))
    idx = torch.tensor(rows, device=device)
    p = params if every else {k: v[idx] for k, v in params.items()}
    b = buffers if every else {k: v[idx] for k, v in buffers.items()}
    xb = torch.stack([batches[i][0] for i in rows])
    yb = torch.stack([batches[i][1] for i in rows])
    with autocast(device):
        out = forward(p, b, xb)
        losses = [loss_of(out[j], yb[j], s, teacher_soft(teacher, xb[j], s)) for j, s in enumerate(settings)]
    torch.stack(losses).sum().backward()
    if not every:
        with torch.no_grad():
            for k, v in b.items():
                buffers[k][idx] = v  # the BatchNorm statistics of these members were updated in the copy
    return [loss.detach() for loss in losses], out.detach()


def fit_group(
    members: list[Member],
    *,
    augment: str = "none",
    device: str = "cpu",
    teacher: nn.Module | None = None,
    desc: str = "group",
    progress: bool = True,
) -> list[list[dict]]:
    """Train several networks of one architecture at once on one device; one ``fit`` history per member.

    Each member follows its own settings (learning rate, schedule, epochs, batch size, distillation), draws its
    own data order and augmentation from its own seed, and runs its own ``after_step`` hook, as
    ``fit(m.model, m.x, m.y, m.settings, seed=m.seed, after_step=m.after_step, augment=..., device=..., teacher=...)``
    would, to float tolerance. Their forward and backward passes run together: ``torch.func.vmap`` over the stacked
    weights, in one call for the members that take a batch of the same size at that step. While training, each
    member's parameters and buffers are views into the stacked tensors, so a hook that changes its member's
    weights in place (the pool's pruning masks) changes what is trained; afterwards they own their storage again.
    Unlike ``fit``: no checkpoint, no validation, no ``compile``; dropout draws differ from a member trained alone.
    """
    if not members:
        return []
    torch.manual_seed(members[0].seed)
    t0 = time.perf_counter()
    on_device: dict[int, torch.Tensor] = {}  # shared training data is moved once
    for m in members:
        m.model.to(device)
    lanes = [
        _Lane(m, on_device.setdefault(id(m.x), m.x.to(device)), on_device.setdefault(id(m.y), m.y.to(device)), device)
        for m in members
    ]
    base = copy.deepcopy(members[0].model).to("meta").train()
    params, buffers = torch.func.stack_module_state([m.model for m in members])
    for i, m in enumerate(members):  # each member's tensors become its row of the stacked ones
        for name, t in [*m.model.named_parameters(), *m.model.named_buffers()]:
            t.data = (params[name] if name in params else buffers[name]).data[i]
    forward = torch.vmap(lambda p, b, x: torch.func.functional_call(base, (p, b), (x,)), randomness="different")
    if teacher is not None:
        teacher.eval().to(device)
    bar = tqdm(total=sum(lane.total for lane in lanes), desc=desc, disable=not progress, leave=False, unit="step")
    while active := [i for i, lane in enumerate(lanes) if lane.step < lane.total]:
        batches = {i: lanes[i].batch(augment) for i in active}
        for size in sorted({len(yb) for _, yb in batches.values()}):
            rows = [i for i in active if len(batches[i][1]) == size]
            losses, out = _lockstep(
                forward, params, buffers, rows, batches, [lanes[i].s for i in rows], teacher, device
            )
            for j, i in enumerate(rows):
                lanes[i].update({k: v.grad[i] for k, v in params.items()}, losses[j], out[j], batches[i][1], t0)
                bar.update(1)
            for v in params.values():
                v.grad = None
    bar.close()
    for m in members:  # each member owns its tensors again (saving one must not save the whole group)
        for t in [*m.model.parameters(), *m.model.buffers()]:
            t.data, t.grad = t.data.clone(), None
    return [lane.history for lane in lanes]


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, device: str = "cpu", batch_size: int = 512) -> np.ndarray:
    """Softmax probabilities of a torch network in eval mode."""
    model.eval().to(device)
    out = [torch.softmax(model(x[i : i + batch_size].to(device)), 1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()
