"""Combining members' class probabilities into one decision. Needs only numpy (edge devices run it)."""
from __future__ import annotations

import numpy as np

RULES = ("soft", "hard")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def vote(proba: np.ndarray, rule: str = "soft", weights: np.ndarray | None = None) -> np.ndarray:
    """Members' probabilities ``[M, N, K]`` -> ensemble scores ``[N, K]``; the decision is their argmax.

    ``soft``: weighted mean of probabilities. ``hard``: weighted count of each member's argmax,
    normalised to sum to 1; ties go to the lowest class index (``argmax`` takes the first maximum).
    """
    proba = np.asarray(proba, np.float64)
    m, _, k = proba.shape
    w = np.ones(m) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (m,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {m} non-negative numbers with a positive sum, got {w}")
    w = w / w.sum()
    if rule == "soft":
        return np.tensordot(w, proba, axes=1)
    if rule == "hard":
        onehot = np.eye(k)[proba.argmax(-1)]  # [M, N, K]
        return np.round(np.tensordot(w, onehot, axes=1), 12)  # rounding makes equal weighted counts exact ties
    raise ValueError(f"unknown voting rule '{rule}': use one of {RULES}")


def accuracy(scores: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows whose argmax equals the label."""
    return float((np.asarray(scores).argmax(-1) == y).mean())


def disagreement(proba: np.ndarray) -> np.ndarray:
    """Pairwise fraction of inputs on which two members' argmax labels differ: ``[M, N, K]`` -> ``[M, M]``."""
    labels = np.asarray(proba).argmax(-1)
    return (labels[:, None, :] != labels[None, :, :]).mean(-1)
