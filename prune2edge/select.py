"""Phase 4: choose which members vote, one per cluster or by a comparison strategy."""
from __future__ import annotations

import numpy as np

from .cluster import features
from .vote import accuracy, vote

STRATEGIES = ("accuracy-first", "diversity-first", "top-k", "random", "greedy")


def select(strategy: str, proba: np.ndarray, y: np.ndarray, labels: list[int], *, method: str = "kmeans-onehot",
           rule: str = "soft", seed: int = 0) -> list[int]:
    """Indices of the chosen members, from validation probabilities ``[M, N, K]`` and cluster labels.

    ``accuracy-first``: the most accurate member of each cluster. ``diversity-first``: the member
    nearest each cluster's centre (ties to the more accurate). The others pick as many members as
    there are clusters: ``top-k`` by accuracy, ``random`` (seeded), ``greedy`` forward selection
    maximising the ensemble's accuracy (Caruana et al. 2004, without replacement).
    """
    labels_arr = np.asarray(labels)
    accs = np.array([accuracy(p, y) for p in proba])
    clusters = sorted(set(labels))
    k = len(clusters)
    if strategy == "accuracy-first":
        chosen = [max(np.flatnonzero(labels_arr == c), key=lambda i: (accs[i], -i)) for c in clusters]
    elif strategy == "diversity-first":
        f = features(proba, method)
        chosen = []
        for c in clusters:
            idx = np.flatnonzero(labels_arr == c)
            dist = np.linalg.norm(f[idx] - f[idx].mean(0), axis=1)
            nearest = min(range(len(idx)), key=lambda j: (round(float(dist[j]), 9), -accs[idx[j]], idx[j]))
            chosen.append(idx[nearest])
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


def sweep(proba: np.ndarray, y: np.ndarray, method: str, rule: str, seed: int, k_max: int) -> dict[str, list[list[int]]]:
    """For k = 1..k_max: the members each strategy picks when the pool is cut into k clusters."""
    from .cluster import cluster

    out: dict[str, list[list[int]]] = {s: [] for s in STRATEGIES}
    for k in range(1, min(k_max, len(proba)) + 1):
        labels = cluster(proba, method, k, seed=seed)["labels"]
        for s in STRATEGIES:
            out[s].append(select(s, proba, y, labels, method=method, rule=rule, seed=seed))
    return out
