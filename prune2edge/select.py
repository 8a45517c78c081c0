"""Phase 4: choose which members vote, one per cluster or by a comparison strategy; on a fleet of devices,
each chosen member also gets a device it fits (:func:`assign`)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from .cluster import features
from .vote import accuracy, vote

STRATEGIES = ("accuracy-first", "diversity-first", "top-k", "random", "greedy")


def _eligible(accs: np.ndarray, labels: list[int], max_acc_gap: float, usable: np.ndarray) -> dict[int, np.ndarray]:
    """Per cluster, its usable members whose accuracy is within ``max_acc_gap`` of the best usable member's
    (none: an outlier cluster)."""
    best = accs[usable].max()
    ok = usable & (accs >= best - max_acc_gap - 1e-12)  # no rounding error may exclude a member exactly at the gap
    labels_arr = np.asarray(labels)
    return {c: np.flatnonzero((labels_arr == c) & ok) for c in sorted(set(labels))}


def slots(
    strategy: str,
    proba: np.ndarray,
    y: np.ndarray,
    labels: list[int],
    *,
    method: str = "kmeans-onehot",
    rule: str = "soft",
    seed: int = 0,
    max_acc_gap: float = 0.02,
    fits: np.ndarray | None = None,
) -> list[list[int]]:
    """What ``strategy`` picks, as slots: each slot's candidate members, most preferred first.

    ``accuracy-first``: one slot per cluster, its members by validation accuracy. ``diversity-first``: by
    distance to the cluster's centre (ties to the more accurate). Both take only members within
    ``max_acc_gap`` of the best member's validation accuracy, and skip a cluster that has none (see
    :func:`skipped`). The others fill as many one-member slots as there are clusters: ``top-k`` by
    accuracy, ``random`` (seeded), ``greedy`` forward selection maximising the ensemble's accuracy
    (Caruana et al. 2004, without replacement). With ``fits[member, device]``, only members that fit a
    device are candidates, and the one-member strategies pass over a member that no free device fits.
    """
    usable = np.ones(len(proba), bool) if fits is None else fits.any(1)
    labels_arr = np.asarray(labels)
    accs = np.array([accuracy(p, y) for p in proba])
    k = len(set(labels))
    pool = np.flatnonzero(usable).tolist()

    def placeable(members: list[int]) -> bool:
        return fits is None or len(assign([[m] for m in members], fits)) == len(members)

    if strategy == "accuracy-first":
        return [
            sorted(ok, key=lambda i: (-accs[i], i))
            for ok in _eligible(accs, labels, max_acc_gap, usable).values()
            if len(ok)
        ]
    if strategy == "diversity-first":
        f = features(proba, method)
        out = []
        for c, ok in _eligible(accs, labels, max_acc_gap, usable).items():
            if len(ok):
                dist = np.linalg.norm(f[ok] - f[labels_arr == c].mean(0), axis=1)
                out.append(
                    [
                        ok[j]
                        for j in sorted(range(len(ok)), key=lambda j: (round(float(dist[j]), 9), -accs[ok[j]], ok[j]))
                    ]
                )
        return out
    rng = np.random.default_rng([seed, 4])
    if strategy == "top-k":
        order = sorted(pool, key=lambda i: (-accs[i], i))
    elif strategy == "random":
        first = rng.choice(pool, min(k, len(pool)), replace=False).tolist()  # then, for the unplaceable, a shuffle
        order = first + [i for i in rng.permutation(pool).tolist() if i not in first]
    elif strategy == "greedy":
        order = None
    else:
        raise ValueError(f"unknown selection strategy '{strategy}': use one of {STRATEGIES}")
    chosen: list[int] = []
    while len(chosen) < k:
        rest = [i for i in (order if order is not None else pool) if i not in chosen and placeable(chosen + [i])]
        if not rest:
            break
        chosen.append(
            rest[0]
            if order is not None
            else max(rest, key=lambda i: (accuracy(vote(proba[chosen + [i]], rule), y), accs[i], -i))
        )
    return [[i] for i in chosen]


def assign(slots: list[list[int]], fits: np.ndarray) -> dict[int, int]:
    """Member -> device, for the members of ``slots`` and the devices of ``fits[member, device]``.

    Each device runs at most one member, and only one that fits it. As many slots as possible get a
    device; among such assignments, the one whose members rank best in their slots (least sum of ranks).
    """
    n_dev = fits.shape[1]
    big = sum(len(s) for s in slots) + 1  # one more slot placed always outweighs any ranks
    cost = np.full((len(slots), n_dev), big)
    member = {}
    for g, candidates in enumerate(slots):
        for d in range(n_dev):
            rank = next((r for r, m in enumerate(candidates) if fits[m, d]), None)
            if rank is not None:
                cost[g, d], member[g, d] = rank, candidates[rank]
    return {int(member[g, d]): int(d) for g, d in zip(*linear_sum_assignment(cost)) if (g, d) in member}


def select(
    strategy: str,
    proba: np.ndarray,
    y: np.ndarray,
    labels: list[int],
    *,
    method: str = "kmeans-onehot",
    rule: str = "soft",
    seed: int = 0,
    max_acc_gap: float = 0.02,
    fits: np.ndarray | None = None,
) -> list[int]:
    """Indices of the chosen members, from validation probabilities ``[M, N, K]`` and cluster labels: each
    slot's first candidate (:func:`slots`), or with ``fits[member, device]`` the members :func:`assign` places."""
    s = slots(strategy, proba, y, labels, method=method, rule=rule, seed=seed, max_acc_gap=max_acc_gap, fits=fits)
    return sorted(int(i) for i in (assign(s, fits) if fits is not None else [c[0] for c in s]))


def skipped(
    proba: np.ndarray,
    y: np.ndarray,
    labels: list[int],
    max_acc_gap: float,
    names: list[str],
    usable: np.ndarray | None = None,
) -> list[dict]:
    """The clusters ``accuracy-first`` and ``diversity-first`` leave out, each with its members and why
    (only ``usable`` members count: those that fit a device)."""
    usable = np.ones(len(proba), bool) if usable is None else np.asarray(usable, bool)
    accs = np.array([accuracy(p, y) for p in proba])
    top = max(np.flatnonzero(usable), key=lambda i: (accs[i], -i))
    out = []
    for c, ok in _eligible(accs, labels, max_acc_gap, usable).items():
        if not len(ok):
            idx = np.flatnonzero(np.asarray(labels) == c)
            if not usable[idx].any():
                out.append(
                    {
                        "cluster": int(c),
                        "members": [names[i] for i in idx],
                        "reason": "none of its members fits a device's budget (see devices.ruled_out)",
                    }
                )
                continue
            best = max(idx[usable[idx]], key=lambda i: (accs[i], -i))
            out.append(
                {
                    "cluster": int(c),
                    "members": [names[i] for i in idx],
                    "best_member": names[best],
                    "best_val_acc": float(accs[best]),
                    "pool_best": names[top],
                    "pool_best_val_acc": float(accs[top]),
                    "reason": f"its best member {names[best]} (val {accs[best]:.4f}) is more than select.max_acc_gap = "
                    f"{max_acc_gap:g} below the pool's best, {names[top]} (val {accs[top]:.4f})",
                }
            )
    return out


def sweep(
    proba: np.ndarray,
    y: np.ndarray,
    method: str,
    rule: str,
    seed: int,
    k_max: int,
    max_acc_gap: float = 0.02,
    fits: np.ndarray | None = None,
) -> dict[str, list[list[int]]]:
    """For k = 1..k_max: the members each strategy picks (and places, with ``fits``) when the pool is cut into k clusters."""
    from .cluster import cluster

    out: dict[str, list[list[int]]] = {s: [] for s in STRATEGIES}
    for k in range(1, min(k_max, len(proba)) + 1):
        labels = cluster(proba, method, k, seed=seed)["labels"]
        for s in STRATEGIES:
            out[s].append(
                select(s, proba, y, labels, method=method, rule=rule, seed=seed, max_acc_gap=max_acc_gap, fits=fits)
            )
    return out


def curve(
    proba: np.ndarray, y: np.ndarray, picks: list[list[int]], rule: str = "soft", weights: np.ndarray | None = None
) -> list[dict]:
    """Validation accuracy of each pick of a :func:`sweep` (``k`` clusters), voting by ``rule`` (and ``weights``)."""
    return [
        {
            "k": k,
            "members": idx,
            "val_acc": accuracy(vote(proba[idx], rule, None if weights is None else weights[idx]), y),
        }
        for k, idx in enumerate(picks, 1)
    ]


def best_k(points: list[dict]) -> int:
    """The k of a :func:`curve` whose ensemble is the most accurate; ties go to the smaller k."""
    return max(points, key=lambda p: (p["val_acc"], -p["k"]))["k"]
