"""Pruning while a member trains: magnitude pruning on a schedule (with optional prune-and-regrow), fixed
anti-random masks that overlap as little as possible across members, and leaving the parent's basin (shrink and
perturb, re-initialised layers) before training."""

from __future__ import annotations

import math

import torch

from . import models


class MagnitudePruner:
    """Zeroes the smallest-magnitude weights, raising sparsity on a schedule while training runs.

    ``polynomial``: s(t) = s_f * (1 - (1 - t / t_end)^3), the cubic schedule of Zhu & Gupta (2017),
    reached at ``t_end`` and held after. ``constant``: s_f from the first step. Masks are recomputed
    from current magnitudes about 20 times during the ramp and re-applied after every step.
    ``fixed``: masks chosen in advance (anti-random), held from the first step instead of magnitude ranking.
    ``regrow`` > 0: after ``t_end``, every ``regrow_every`` steps each layer drops that fraction of its active
    weights (smallest magnitude) and regrows as many inactive ones (largest gradient magnitude, starting at zero),
    the fraction decaying with a cosine to zero at 3/4 of the steps after ``t_end`` (RigL, Evci et al. 2020): the
    mask explores at constant sparsity, then settles.
    """

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        final: float,
        schedule: str,
        scope: str,
        end_step: int,
        noise: float = 0.0,
        seed: int = 0,
        fixed: dict[str, torch.Tensor] | None = None,
        regrow: float = 0.0,
        regrow_every: int = 100,
    ):
        self.params, self.final, self.schedule, self.scope = params, final, schedule, scope
        self.end_step = max(1, end_step)
        self.every = max(1, self.end_step // 20)
        self.fixed, self.regrow, self.regrow_every = fixed, regrow, max(1, regrow_every)
        self.masks: dict[str, torch.Tensor] = {}
        # mask perturbation: rank |w| * exp(noise * eps) with eps ~ N(0, 1) drawn once per weight and member
        gen = torch.Generator().manual_seed(seed)
        self.noise = (
            {n: torch.exp(noise * torch.randn(w.shape, generator=gen)) for n, w in params.items()}
            if noise > 0
            else None
        )

    def scores(self) -> dict[str, torch.Tensor]:
        return {
            n: w.detach().abs() * self.noise[n].to(w.device) if self.noise else w.detach().abs()
            for n, w in self.params.items()
        }

    def target(self, step: int) -> float:
        if self.schedule == "constant" or step >= self.end_step:
            return self.final
        return self.final * (1 - (1 - step / self.end_step) ** 3)

    @torch.no_grad()
    def update(self, sparsity: float) -> None:
        if self.fixed is not None:
            self.masks = {n: m.to(w.device) for (n, w), m in zip(self.params.items(), self.fixed.values())}
            self.apply()
            return
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
            w = self.params[n]
            if m.device != w.device:  # the network moved to the training device after the masks were made
                self.masks[n] = m = m.to(w.device)
            w.mul_(m)

    @torch.no_grad()
    def regrow_masks(self, fraction: float) -> None:
        """Drop ``fraction`` of each layer's active weights (smallest |w|) and grow as many (largest |grad|)."""
        for n, w in self.params.items():
            m = self.masks.get(n)
            k = int(fraction * int(m.sum())) if m is not None and w.grad is not None else 0
            if k == 0:
                continue
            flat = m.flatten()
            drop = torch.where(flat, w.detach().abs().flatten(), torch.inf).topk(k, largest=False).indices
            grow = torch.where(flat, -torch.inf, w.grad.abs().flatten()).topk(k).indices
            flat = flat.clone()
            flat[drop], flat[grow] = False, True
            self.masks[n] = flat.view(m.shape)
        self.apply()

    def finish(self) -> None:
        """The final masks: the target sparsity by magnitude, or the fixed / regrown masks as they stand."""
        if self.fixed is None and not self.regrow:
            self.update(self.final)
        else:
            self.apply()

    def __call__(self, step: int, total: int) -> None:
        if not self.masks and step > 1:  # resumed mid-run: the masks are what the zeros say at today's target
            self.update(self.target(step))
        self.apply()  # first undo the optimiser's step on pruned weights: they never grow back
        if step <= self.end_step and (step % self.every == 0 or step == self.end_step):
            self.update(self.target(step))
        if self.regrow and step in self.regrow_steps(total):
            stop = self.end_step + round(0.75 * (total - self.end_step))
            self.regrow_masks(
                self.regrow * 0.5 * (1 + math.cos(math.pi * (step - self.end_step) / (stop - self.end_step)))
            )

    def regrow_steps(self, total: int) -> range:
        """The steps that move the mask: every ``regrow_every`` from the end of the ramp to 3/4 of what is left."""
        return range(
            self.end_step + self.regrow_every, self.end_step + round(0.75 * (total - self.end_step)), self.regrow_every
        )


def antirandom_masks(
    params: dict[str, torch.Tensor], keep: list[float], index: int, seed: int, weighted: bool = False
) -> dict[str, torch.Tensor]:
    """Member ``index``'s masks when the members keep fractions ``keep`` of every layer with as little overlap as
    possible (Prune and Tune ensembles, Whitaker & Whitley 2022).

    Per layer, one order of the weights is drawn from the pool's ``seed`` (a random permutation, or, ``weighted``,
    sampling without replacement with probability proportional to |w|), and the members take consecutive stretches
    of it, wrapping around: disjoint while the fractions sum to at most 1, each weight shared by as few members as
    the fractions allow otherwise.
    """
    gen = torch.Generator().manual_seed(seed)
    start = sum(keep[:index])
    masks = {}
    for n, w in params.items():
        size = w.numel()
        if weighted:  # Gumbel top-k: descending log|w| + Gumbel noise samples without replacement, p ~ |w|
            u = torch.rand(size, generator=gen).clamp_min(1e-12)
            order = torch.argsort(w.detach().abs().flatten().log() - (-u.log()).log(), descending=True)
        else:
            order = torch.randperm(size, generator=gen)
        first, last = round(start * size), round((start + keep[index]) * size)  # shared bounds: no double counting
        mask = torch.zeros(size, dtype=torch.bool)
        mask[order[torch.arange(first, last) % size]] = True
        masks[n] = mask.view(w.shape)
    return masks


@torch.no_grad()
def leave_basin(
    model: torch.nn.Module, fresh: torch.nn.Module, shrink: float, perturb: float, reinit_last: int
) -> None:
    """Push a member's start away from the baseline: the last ``reinit_last`` prunable layers take ``fresh``'s
    initial weights; every other parameter becomes ``shrink * w + perturb * w_fresh`` (shrink and perturb, Ash &
    Adams 2020, with the noise drawn as a new initialisation of the same network)."""
    reinit = set(list(models.prunable(model))[-reinit_last:]) if reinit_last else set()
    fresh_params = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        if name.rpartition(".")[0] in reinit:
            p.copy_(fresh_params[name])
        elif shrink != 1.0 or perturb:
            p.mul_(shrink).add_(fresh_params[name], alpha=perturb)
