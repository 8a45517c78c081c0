"""Pruning while a member trains: magnitude pruning on a schedule (with optional prune-and-regrow), fixed
anti-random masks that overlap as little as possible across members, and leaving the parent's basin (shrink and
perturb, re-initialised layers) before training."""

from __future__ import annotations

import math

import torch

from . import config, models
from .errors import UserError


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
        regrow_every: int = config.default("pool.regrow_every"),
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


def _channel_groups(model: torch.nn.Module, example: torch.Tensor):
    """The dependency graph of ``model`` and its groups of coupled channels (a layer's outputs and whatever shares
    them: its batch norm, the next layer's inputs, a residual addition), leaving out the output layer's outputs."""
    import torch_pruning as tp

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    if not layers:
        raise UserError(f"{type(model).__name__} has no Conv2d or Linear layer whose channels could be removed")
    try:
        with torch.enable_grad():  # the graph is traced through autograd
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    except Exception as e:  # a network torch-pruning cannot trace: name it and what went wrong
        raise UserError(f"cannot prune the channels of {type(model).__name__}: {type(e).__name__}: {e}") from None
    out = layers[-1]
    groups = [
        g
        for g in graph.get_all_groups(root_module_types=[torch.nn.Conv2d, torch.nn.Linear])
        if not any(d.target.module is out and d.handler.__name__ == "prune_out_channels" for d, _ in g)
    ]
    real = set(model.modules())
    for g in groups:
        for d, _ in g:
            m = d.target.module
            if m in real and not isinstance(m, PRUNABLE) and any(True for _ in m.parameters(recurse=False)):
                raise UserError(
                    f"cannot prune the channels of {type(model).__name__}: layer '{d.target.name.split(' ')[0]}' "
                    f"({type(m).__name__}) shares them and only {', '.join(t.__name__ for t in PRUNABLE)} can be cut; "
                    "use pool.structure: weights"
                )
    return graph, groups


PRUNABLE = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)


def _outputs(group) -> list[tuple[torch.nn.Module, str]]:
    """The (module, parameter) pairs whose rows are a group's channels: weights and biases of the layers and batch
    norms whose outputs they are."""
    out = []
    for d, _ in group:
        m = d.target.module
        if d.handler.__name__ == "prune_out_channels" and isinstance(m, PRUNABLE):
            out += [(m, p) for p in ("weight", "bias") if getattr(m, p, None) is not None]
    return out


def _off(n: int, fraction: float, multiple: int) -> int:
    """How many of ``n`` channels to switch off for ``fraction``, keeping a multiple of ``multiple`` (the widths
    int8 kernels run fastest at) and at least one such multiple, or all ``n`` where there are fewer."""
    if n <= multiple:  # one channel, or fewer than one multiple: the group keeps them all
        return 0
    keep = max(multiple, multiple * round(n * (1 - fraction) / multiple))
    return n - min(n, keep)


@torch.no_grad()
def _dead(group) -> torch.Tensor:
    """Which of a group's channels have every output weight and bias zero (their outputs are zero)."""
    rows = [getattr(m, p).detach().cpu() for m, p in _outputs(group)]
    return torch.stack([r.flatten(1).abs().sum(1) if r.dim() > 1 else r.abs() for r in rows]).sum(0) == 0


def macs_of(model: torch.nn.Module, example: torch.Tensor) -> int:
    """Multiply-adds of one input through the model's convolutions and linear layers (forward hooks)."""
    total = 0

    def hook(m: torch.nn.Module, _, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, torch.nn.Conv2d):
            total += out[:1].numel() * m.in_channels // m.groups * math.prod(m.kernel_size)
        elif isinstance(m, torch.nn.Linear):
            total += out[:1].numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was = model.training
    with torch.no_grad():
        model.eval()(example[:1])
    model.train(was)
    for h in handles:
        h.remove()
    return total


class ChannelPruner:
    """Removes whole channels while a member trains: every group of coupled channels loses the same fraction, the
    one that takes the network's multiply-adds (or weights) down by ``target``; the channels of least importance
    (L1 or L2 norm of the group's weights, or Taylor: |w * grad|) times a noise fixed per member (``noise``: members
    drop different channels among near-ties) are zeroed on the cubic schedule of :class:`MagnitudePruner`, and
    :func:`compact` cuts them out once training ends, leaving a smaller dense network."""

    def __init__(
        self,
        model: torch.nn.Module,
        example: torch.Tensor,
        target: float,
        end_step: int,
        criterion: str = config.default("pool.criterion"),
        measure: str = config.default("pool.reduce"),
        noise: float = 0.0,
        seed: int = 0,
        multiple: int = 1,
    ):
        import torch_pruning as tp

        self.model, self.example, self.end_step, self.multiple = model, example, max(1, end_step), multiple
        _, self.groups = _channel_groups(model, example)
        self.importance = (
            tp.importance.GroupTaylorImportance()
            if criterion == "taylor"
            else tp.importance.GroupMagnitudeImportance(p=1 if criterion == "l1" else 2)
        )
        gen = torch.Generator().manual_seed(seed)
        self.noise = [torch.exp(noise * torch.randn(len(g[0][1]), generator=gen)) for g in self.groups]
        self.fraction = self._fraction_for(target, measure)
        self.masks = [~_dead(g) for g in self.groups]  # a resumed member's channels that are already off stay off
        self._updates = {round(self.end_step * k / 20) for k in range(21)}

    def _fraction_for(self, target: float, measure: str) -> float:
        """The fraction of each group's channels to remove so that the network's multiply-adds (or weights) fall by
        ``target`` (bisection on compacted copies)."""
        import copy

        def cost(m: torch.nn.Module) -> int:
            return macs_of(m, self.example) if measure == "macs" else sum(p.numel() for p in m.parameters())

        full, lo, hi = cost(self.model), 0.0, 1.0
        for _ in range(12):
            mid = (lo + hi) / 2
            trial = copy.deepcopy(self.model)
            _, groups = _channel_groups(trial, self.example)
            for g in groups:
                n = len(g[0][1])
                for m, p in _outputs(g):
                    with torch.no_grad():
                        getattr(m, p)[: _off(n, mid, self.multiple)] = 0
            if 1 - cost(compact(trial, self.example)) / full < target:
                lo = mid
            else:
                hi = mid
        return hi

    def target(self, step: int) -> float:
        t = min(step, self.end_step) / self.end_step
        return self.fraction * (1 - (1 - t) ** 3)

    def update(self, fraction: float) -> None:
        """Choose which channels are off: per group, the least important, at most all but one."""
        for i, g in enumerate(self.groups):
            n = len(g[0][1])
            k = _off(n, fraction, self.multiple)
            score = self.importance(g).detach().cpu() * self.noise[i]
            score[~self.masks[i]] = -1.0  # once off, off
            mask = torch.ones(n, dtype=torch.bool)
            mask[torch.argsort(score)[:k]] = False
            self.masks[i] = mask

    @torch.no_grad()
    def apply(self) -> None:
        for g, mask in zip(self.groups, self.masks):
            for m, p in _outputs(g):
                getattr(m, p)[~mask.to(getattr(m, p).device)] = 0

    def __call__(self, step: int, total: int) -> None:
        if step in self._updates:
            self.update(self.target(step))
        self.apply()

    def finish(self) -> None:
        self.update(self.fraction)
        self.apply()


@torch.no_grad()
def compact(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """``model`` with every channel whose outputs are zero in all its coupled layers cut out (in place): the same
    function as a smaller dense network."""
    graph, groups = _channel_groups(model, example.to(next(model.parameters()).device))
    cuts = []
    for g in groups:
        dead = _dead(g)
        if dead.any() and not dead.all():
            root = g[0][0]
            cuts.append((root.target.module, root.handler, dead.nonzero().flatten().tolist()))
    for module, handler, idxs in cuts:
        graph.get_pruning_group(module, handler, idxs=idxs).prune()
    return model
