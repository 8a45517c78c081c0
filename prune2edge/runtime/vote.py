"""Combining members' class probabilities into one decision. Needs only numpy (edge devices run it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RULES = ("soft", "hard")
AGREEMENT = (
    "margin of the vote: the winning class's ensemble score minus the runner-up's (soft: mean member "
    "probabilities; hard: share of the member votes; weighted when the vote is), in [0, 1]; a frame whose "
    "margin is below the abstain threshold goes to review"
)


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


def margin(scores: np.ndarray) -> np.ndarray:
    """The vote's agreement per row: the highest score minus the second highest (see :data:`AGREEMENT`)."""
    scores = np.asarray(scores)
    if scores.shape[-1] < 2:
        return scores[..., 0]
    top2 = np.partition(scores, -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


@dataclass(frozen=True)
class Decisions:
    """One row per frame: the ensemble's class, its ``confidence`` (the class's ensemble score), ``votes`` (members
    whose own top class it is, of ``members``), the ``margin`` (:data:`AGREEMENT`) and ``review`` (margin below the
    abstain threshold: the frame gets no class)."""

    classes: np.ndarray
    confidence: np.ndarray
    votes: np.ndarray
    members: int
    margin: np.ndarray
    review: np.ndarray
    abstain_below: float


def decide(
    proba: np.ndarray, rule: str = "soft", weights: np.ndarray | None = None, abstain_below: float = 0.0
) -> Decisions:
    """Members' probabilities ``[M, N, K]`` -> the ensemble's :class:`Decisions` under ``rule`` (see :func:`vote`)."""
    proba = np.asarray(proba)
    scores = vote(proba, rule, weights)
    classes = scores.argmax(1)
    agree = margin(scores)
    return Decisions(
        classes=classes,
        confidence=scores[np.arange(len(classes)), classes],
        votes=(proba.argmax(-1) == classes).sum(0),
        members=len(proba),
        margin=agree,
        review=agree < abstain_below,
        abstain_below=float(abstain_below),
    )


def accuracy(scores: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows whose argmax equals the label."""
    return float((np.asarray(scores).argmax(-1) == y).mean())


def disagreement(proba: np.ndarray) -> np.ndarray:
    """Pairwise fraction of inputs on which two members' argmax labels differ: ``[M, N, K]`` -> ``[M, M]``."""
    labels = np.asarray(proba).argmax(-1)
    return (labels[:, None, :] != labels[None, :, :]).mean(-1)
