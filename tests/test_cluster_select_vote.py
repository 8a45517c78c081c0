"""Phases 3-4: clustering groups near-duplicates, each strategy picks what it promises, votes are exact."""

from __future__ import annotations

import numpy as np
import pytest

from prune2edge import cluster, select
from prune2edge.runtime.vote import accuracy, disagreement, vote


def family_pool(seed: int = 0):
    """Nine members in three families: members of a family make the same mistakes, families differ."""
    rng = np.random.default_rng(seed)
    n, k = 300, 4
    y = rng.integers(0, k, n)
    proba = []
    for fam in range(3):
        wrong = rng.random(n) < 0.25  # this family's mistakes
        for member in range(3):
            labels = np.where(wrong, (y + 1 + fam) % k, y)
            flip = rng.random(n) < 0.02 * (member + 1)  # members differ slightly within a family
            labels = np.where(flip, (labels + 1) % k, labels)
            p = np.full((n, k), 0.1 / (k - 1))
            p[np.arange(n), labels] = 0.9
            proba.append(p)
    return np.stack(proba), y


@pytest.mark.parametrize("method", ["kmeans-onehot", "kmeans-proba", "kmeans-labels", "agglomerative"])
def test_clusters_recover_the_families(method):
    proba, _ = family_pool()
    labels = cluster.cluster(proba, method, k=3)["labels"]
    assert [len(set(labels[i : i + 3])) for i in (0, 3, 6)] == [1, 1, 1] and len(set(labels)) == 3


def test_k_silhouette():
    proba, _ = family_pool()
    result = cluster.cluster(proba, "kmeans-onehot", k="silhouette", k_max=6)
    assert result["k"] == 3 and max(result["silhouette"], key=result["silhouette"].get) == 3
    assert set(result["silhouette"]) == {2, 3, 4, 5, 6}


def test_accuracy_first_and_diversity_first():
    proba, y = family_pool()
    labels = cluster.cluster(proba, "kmeans-onehot", k=3)["labels"]
    accs = [accuracy(p, y) for p in proba]
    best = select.select(
        "accuracy-first", proba, y, labels, max_acc_gap=1.0
    )  # no outliers here: tests/test_select_safety.py
    assert best == [max(range(f, f + 3), key=lambda i: accs[i]) for f in (0, 3, 6)]
    central = select.select("diversity-first", proba, y, labels, max_acc_gap=1.0)
    assert len(central) == 3 and sorted({labels[i] for i in central}) == [0, 1, 2]
    feats = cluster.features(proba, "kmeans-onehot")
    for i in central:
        members = [j for j in range(9) if labels[j] == labels[i]]
        centre = feats[members].mean(0)
        assert np.linalg.norm(feats[i] - centre) <= min(np.linalg.norm(feats[j] - centre) for j in members) + 1e-9


def test_comparison_strategies():
    proba, y = family_pool()
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    accs = np.array([accuracy(p, y) for p in proba])
    assert select.select("top-k", proba, y, labels) == sorted(np.argsort(-accs, kind="stable")[:3].tolist())
    r = select.select("random", proba, y, labels, seed=5)
    assert len(set(r)) == 3 and r == select.select("random", proba, y, labels, seed=5)
    greedy = select.select("greedy", proba, y, labels)
    assert len(greedy) == 3
    assert accuracy(vote(proba[greedy]), y) >= accuracy(vote(proba[select.select("top-k", proba, y, labels)]), y)
    with pytest.raises(ValueError, match="unknown selection strategy"):
        select.select("best", proba, y, labels)


def test_sweep_covers_each_k():
    proba, y = family_pool()
    sweep = select.sweep(proba, y, "kmeans-onehot", "soft", 0, k_max=4, max_acc_gap=1.0)
    assert set(sweep) == set(select.STRATEGIES)
    assert [len(picks) for picks in sweep["accuracy-first"]] == [1, 2, 3, 4]


def test_soft_and_hard_votes():
    p = np.array([[[0.6, 0.4, 0.0]], [[0.0, 0.55, 0.45]], [[0.1, 0.0, 0.9]]])
    assert np.allclose(vote(p, "soft"), p.mean(0))
    # hard: one vote each for classes 0, 1, 2 -> a three-way tie goes to the lowest index
    assert vote(p, "hard").argmax(1).tolist() == [0]
    assert vote(p[1:], "hard").argmax(1).tolist() == [1]
    assert vote(p, "hard", weights=[1, 1, 3]).argmax(1).tolist() == [2]
    w = np.array([0.2, 0.3, 0.5])
    assert np.allclose(vote(p, "soft", w), np.tensordot(w, p, axes=1))
    with pytest.raises(ValueError, match="weights"):
        vote(p, "soft", [1, -1, 1])


def test_disagreement_matrix():
    p = np.eye(3)[np.array([[0, 1, 2, 0], [0, 1, 2, 1], [1, 1, 1, 1]])]
    d = disagreement(p)
    assert d.tolist() == [[0, 0.25, 0.75], [0.25, 0, 0.5], [0.75, 0.5, 0]]
