"""Phase 3: group pool members by how they predict on the validation split."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score

from .runtime.vote import disagreement
from .ship import SIGNIFICANCE, most_votes


def features(proba: np.ndarray, method: str) -> np.ndarray:
    """One row per member: one-hot predictions (default), probabilities, or the raw predicted-label vector (paper)."""
    m, n, k = proba.shape
    if method == "kmeans-proba":
        return proba.reshape(m, n * k)
    if method == "kmeans-labels":
        return proba.argmax(-1).astype(np.float64)
    return np.eye(k)[proba.argmax(-1)].reshape(m, n * k)


def _fit(proba: np.ndarray, method: str, k: int, seed: int) -> np.ndarray:
    if k == 1:
        return np.zeros(len(proba), int)
    if method == "agglomerative":
        model = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average")
        return model.fit_predict(disagreement(proba))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # identical members: fewer distinct clusters than k
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features(proba, method))


def cluster(proba: np.ndarray, method: str, k: int | str, k_max: int | None = None, seed: int = 0) -> dict:
    """Cluster members ``[M, N, K]`` (``method``, ``k`` and ``k_max`` as in the config's ``cluster:``, which holds
    their defaults); ``k="silhouette"`` picks the k in 2..k_max (None: every k below M) with the best silhouette.

    (``cluster.k: auto``, k chosen on the selected ensemble's validation accuracy, is :func:`choose_k`.)

    With k at least the number of members, each member is a cluster of its own, even where members predict alike.
    Returns ``labels`` (renumbered 0..k-1 in order of first appearance), ``k`` and the silhouette scores tried.
    """
    m = len(proba)
    scores: dict[int, float] = {}
    if k == "silhouette":
        dist = disagreement(proba) if method == "agglomerative" else None
        for kk in range(2, min(k_max or m, m - 1) + 1):
            labels = _fit(proba, method, kk, seed)
            if len(set(labels)) > 1:
                scores[kk] = float(
                    silhouette_score(dist, labels, metric="precomputed")
                    if dist is not None
                    else silhouette_score(features(proba, method), labels)
                )
        k = max(scores, key=scores.get) if scores else 1
    labels = np.arange(m) if int(k) >= m else _fit(proba, method, int(k), seed)  # k >= m: each member alone
    order = {c: i for i, c in enumerate(dict.fromkeys(labels.tolist()))}
    labels = np.array([order[c] for c in labels])
    return {
        "method": method,
        "k": int(labels.max()) + 1,
        "k_requested": int(k),
        "labels": labels.tolist(),
        "silhouette": scores,
    }


def choose_k(setting: int | str, curve: list[dict], n: int) -> tuple[int | str, str]:
    """The k to cluster ``n`` members into, by ``cluster.k``, and why: an integer (at most n); ``silhouette``, left
    to :func:`cluster` (the best-separated clustering); ``auto``, from ``curve`` (``select.curve``: each k's
    selected ensemble, its validation accuracy and ``p_lead`` over the ensemble of the most votes): the most votes,
    unless a smaller ensemble beats it beyond chance (``p_lead`` < ``ship.SIGNIFICANCE``), then the most accurate of
    those (ties to the smaller k)."""
    if setting != "auto":
        return (setting, "cluster.k: silhouette") if setting == "silhouette" else (min(int(setting), n), "cluster.k")
    most = curve[most_votes([len(p["members"]) for p in curve])]
    ahead = [p for p in curve if p["val_acc"] > most["val_acc"] and p["p_lead"] < SIGNIFICANCE]
    if ahead:
        p = max(ahead, key=lambda p: (p["val_acc"], -p["k"]))
        return p["k"], (
            f"k = {p['k']}: its ensemble beats the {len(most['members'])} votes of k = {most['k']} on validation "
            f"beyond chance ({100 * p['val_acc']:.2f}% vs {100 * most['val_acc']:.2f}%, p = {p['p_lead']:.2g})"
        )
    rival = max(curve, key=lambda p: (p["val_acc"], -p["k"]))
    why = (
        f"; k = {rival['k']} scores {100 * rival['val_acc']:.2f}% vs {100 * most['val_acc']:.2f}% on validation, a "
        f"lead chance gives often enough (p = {rival['p_lead']:.2g}, needs < {SIGNIFICANCE:g}): more validation "
        "images (data.val_fraction) would settle it"
        if rival["val_acc"] > most["val_acc"]
        else ""
    )
    return most["k"], f"k = {most['k']}: the most votes ({len(most['members'])}), as no smaller ensemble beats it{why}"
