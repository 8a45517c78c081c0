"""Training loop shared by the baseline and the pool's fine-tuning: seeded, augmented, scheduled."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import store
from .vote import accuracy


@dataclass
class TrainSettings:
    """How to fit a network; the ``train:`` section of a config, also sampled per pool member."""

    epochs: float = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    augment: str = "auto"
    label_smoothing: float = 0.0
    cycles: int = 1
    distill: float = 0.0  # weight of the teacher's softened outputs in the loss (fit's ``teacher``)
    temperature: float = 4.0


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


def make_schedule(opt: torch.optim.Optimizer, kind: str, total: int, cycles: int = 1) -> torch.optim.lr_scheduler.LRScheduler:
    if kind == "restarts":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: restarts_factor(s, total, cycles))
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total, pct_start=0.25)
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


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
    loss is (1 - distill) * cross-entropy + distill * T^2 * KL(teacher || model) at temperature T (Hinton et al. 2015).
    With a ``checkpoint`` path, the whole training state is saved there after every epoch and, when the file
    exists, training continues from it: a killed run resumes where its last epoch ended, to the same weights.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(device, memory_format=torch.channels_last)  # NHWC convolutions: faster on CPU (oneDNN) and GPU
    x, y = x.to(device), y.to(device)  # the training split lives on the device; batches are taken there by index
    steps_per_epoch = max(1, math.ceil(len(x) / s.batch_size))
    total = max(1, round(s.epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, nesterov=s.momentum > 0, weight_decay=s.weight_decay)
    sched = make_schedule(opt, s.schedule, total, s.cycles)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=s.label_smoothing)
    distill = s.distill if teacher is not None else 0.0
    if distill:
        teacher.eval().to(device)
    history, step, t0 = [], 0, time.perf_counter()
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["schedule"])
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        history, step = saved["history"], saved["step"]
        t0 -= history[-1]["seconds"]  # seconds in the history keep counting from the first start
    bar = tqdm(total=total, initial=step, desc=desc, disable=not progress, leave=False, unit="step")
    while step < total:
        model.train()
        order = torch.randperm(len(x), generator=gen).to(device)
        seen = 0
        loss_sum = torch.zeros((), device=device)  # running sums stay on the device: no sync per step
        correct = torch.zeros((), dtype=torch.long, device=device)
        for i in range(0, len(x), s.batch_size):
            if step >= total:
                break
            idx = order[i:i + s.batch_size]
            xb = augment_batch(x[idx], augment, gen).contiguous(memory_format=torch.channels_last)
            yb = y[idx]
            out = model(xb)
            loss = loss_fn(out, yb)
            if distill:
                with torch.no_grad():
                    soft = torch.softmax(teacher(xb) / s.temperature, 1)
                kl = nn.functional.kl_div(torch.log_softmax(out / s.temperature, 1), soft, reduction="batchmean")
                loss = (1 - distill) * loss + distill * s.temperature ** 2 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if after_step is not None:
                after_step(step, total)
            seen += len(idx)
            loss_sum += loss.detach() * len(idx)
            correct += (out.argmax(1) == yb).sum()
            bar.update(1)
        row = {"epoch": len(history) + 1, "steps": step, "train_loss": float(loss_sum) / seen, "train_acc": int(correct) / seen,
               "seconds": time.perf_counter() - t0}
        if x_val is not None and y_val is not None:
            row["val_acc"] = accuracy(predict_proba(model, x_val, device=device), y_val.numpy())
        bar.set_postfix({k: round(v, 4) for k, v in row.items() if k in ("train_loss", "val_acc")})
        history.append(row)
        if checkpoint is not None and step < total:
            store.write_state(checkpoint, {"model": model.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                                           "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                                           "history": history, "step": step})
    bar.close()
    model.to(memory_format=torch.contiguous_format)
    return history


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, device: str = "cpu", batch_size: int = 512) -> np.ndarray:
    """Softmax probabilities of a torch network in eval mode."""
    model.eval().to(device)
    out = [torch.softmax(model(x[i:i + batch_size].to(device)), 1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()
