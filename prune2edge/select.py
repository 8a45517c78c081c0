"""Phase 4: choose which members vote, one per cluster or by a comparison strategy."""
from __future__ import annotations

import numpy as np

from .cluster import features
from .vote import accuracy, vote

STRATEGIES = ("accuracy-first", "diversity-first", "top-k", "random", "greedy")


def _eligible(accs: np.ndarray, labels: list[int], max_acc_gap: float) -> dict[int, np.ndarray]:
    """Per cluster, its members whose accuracy is within ``max_acc_gap`` of the best member's (none: an outlier cluster)."""
    ok = accs >= accs.max() - max_acc_gap - 1e-12  # no rounding error may exclude a member exactly at the gap
    labels_arr = np.asarray(labels)
    return {c: np.flatnonzero((labels_arr == c) & ok) for c in sorted(set(labels))}


def select(strategy: str, proba: np.ndarray, y: np.ndarray, labels: list[int], *, method: str = "kmeans-onehot",
           rule: str = "soft", seed: int = 0, max_acc_gap: float = 0.02) -> list[int]:
    """Indices of the chosen members, from validation probabilities ``[M, N, K]`` and cluster labels.

    ``accuracy-first``: the most accurate member of each cluster. ``diversity-first``: the member
    nearest each cluster's centre (ties to the more accurate). Both take only members within
    ``max_acc_gap`` of the best member's validation accuracy, and skip a cluster that has none
    (its slot stays empty: see :func:`skipped`). The others pick as many members as there are
    clusters: ``top-k`` by accuracy, ``random`` (seeded), ``greedy`` forward selection maximising
    the ensemble's accuracy (Caruana et al. 2004, without replacement).
    """
    labels_arr = np.asarray(labels)
    accs = np.array([accuracy(p, y) for p in proba])
    clusters = sorted(set(labels))
    k = len(clusters)
    if strategy == "accuracy-first":
        chosen = [max(ok, key=lambda i: (accs[i], -i)) for ok in _eligible(accs, labels, max_acc_gap).values() if len(ok)]
    elif strategy == "diversity-first":
        f = features(proba, method)
        chosen = []
        for c, ok in _eligible(accs, labels, max_acc_gap).items():
            if len(ok):
                dist = np.linalg.norm(f[ok] - f[labels_arr == c].mean(0), axis=1)
                nearest = min(range(len(ok)), key=lambda j: (round(float(dist[j]), 9), -accs[ok[j]], ok[j]))
                chosen.append(ok[nearest])
    elif strategy == "top-k":
        chosen = sorted(range(len(accs)), key=lambda i: (-accs[i], i))[:k]
    elif strategy == "random":
        chosen = np.random.default_rng([seed, 4]).choice(len(accs), k, replace=False).tolist()
    elif strategy == "greedy":
        chosen = []
        for _ in range(k):
            rest = [i for i in range(len(accs)) if i not in chosen]
            chosen.append(max(rest, key=lambda i: (accuracy(vote(proba[chosen + [i]], rule), y), accs[i], -i)))
    else:
        raise ValueError(f"unknown selection strategy '{strategy}': use one of {STRATEGIES}")
    return sorted(int(i) for i in chosen)


def skipped(proba: np.ndarray, y: np.ndarray, labels: list[int], max_acc_gap: float, names: list[str]) -> list[dict]:
    """The clusters ``accuracy-first`` and ``diversity-first`` leave out, each with its members and why."""
    accs = np.array([accuracy(p, y) for p in proba])
    top = int(np.argmax(accs))
    out = []
    for c, ok in _eligible(accs, labels, max_acc_gap).items():
        if not len(ok):
            idx = np.flatnonzero(np.asarray(labels) == c)
            best = max(idx, key=lambda i: (accs[i], -i))
            out.append({"cluster": int(c), "members": [names[i] for i in idx], "best_member": names[best],
                        "best_val_acc": float(accs[best]), "pool_best": names[top], "pool_best_val_acc": float(accs[top]),
                        "reason": f"its best member {names[best]} (val {accs[best]:.4f}) is more than select.max_acc_gap = "
                                  f"{max_acc_gap:g} below the pool's best, {names[top]} (val {accs[top]:.4f})"})
    return out


def sweep(proba: np.ndarray, y: np.ndarray, method: str, rule: str, seed: int, k_max: int,
          max_acc_gap: float = 0.02) -> dict[str, list[list[int]]]:
    """For k = 1..k_max: the members each strategy picks when the pool is cut into k clusters."""
    from .cluster import cluster

    out: dict[str, list[list[int]]] = {s: [] for s in STRATEGIES}
    for k in range(1, min(k_max, len(proba)) + 1):
        labels = cluster(proba, method, k, seed=seed)["labels"]
        for s in STRATEGIES:
            out[s].append(select(s, proba, y, labels, method=method, rule=rule, seed=seed, max_acc_gap=max_acc_gap))
    return out


def curve(proba: np.ndarray, y: np.ndarray, picks: list[list[int]], rule: str = "soft",
          weights: np.ndarray | None = None) -> list[dict]:
    """Validation accuracy of each pick of a :func:`sweep` (``k`` clusters), voting by ``rule`` (and ``weights``)."""
    return [{"k": k, "members": idx, "val_acc": accuracy(vote(proba[idx], rule, None if weights is None else weights[idx]), y)}
            for k, idx in enumerate(picks, 1)]


def best_k(points: list[dict]) -> int:
    """The k of a :func:`curve` whose ensemble is the most accurate; ties go to the smaller k."""
    return max(points, key=lambda p: (p["val_acc"], -p["k"]))["k"]
