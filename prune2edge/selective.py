"""Deciding or abstaining: the abstain threshold (chosen on validation), risk–coverage curves and calibration error.

A score ranks frames by how sure a model is (the ensemble: the vote's margin, :data:`prune2edge.runtime.vote.AGREEMENT`;
one model: its top probability). Frames scoring at least the threshold are *decided*, the rest go to review;
*coverage* is the share decided. Needs only numpy.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15
ECE_BINNING = (
    f"{ECE_BINS} equal-width bins of the top score, [0, 1/{ECE_BINS}], (1/{ECE_BINS}, 2/{ECE_BINS}], ..., "
    f"({ECE_BINS - 1}/{ECE_BINS}, 1]; ECE = sum over bins of (frames in the bin / all frames) * "
    "|accuracy - mean top score| in the bin"
)
CURVE_COVERAGES = tuple(round(0.05 * i, 2) for i in range(1, 21))


def risk_coverage(score: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage ``n/N`` and accuracy of the ``n`` highest-scoring frames, for n = 1..N (ties in input order)."""
    order = np.argsort(-np.asarray(score, np.float64), kind="stable")
    n = np.arange(1, len(order) + 1)
    return n / len(order), np.cumsum(np.asarray(correct, np.float64)[order]) / n


def curve_points(score: np.ndarray, correct: np.ndarray, coverages: tuple[float, ...] = CURVE_COVERAGES) -> list[dict]:
    """The risk–coverage curve at fixed ``coverages``: accuracy of the top ``ceil(c * N)`` frames by score."""
    _, acc = risk_coverage(score, correct)
    return [{"coverage": c, "accuracy": float(acc[max(1, int(np.ceil(c * len(acc) - 1e-9))) - 1])} for c in coverages]


def aurc(score: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk–coverage curve: the mean, over n = 1..N, of the error rate of the n highest-scoring frames."""
    return float(1 - risk_coverage(score, correct)[1].mean())


def choose_threshold(score: np.ndarray, correct: np.ndarray, target_accuracy: float) -> dict:
    """The abstain threshold that decides the most validation frames while they stay at least ``target_accuracy``
    right: the lowest score of the decided frames (0 when every frame is decided). When no threshold reaches the
    target, the one with the best accuracy of its decided frames (ties to more frames), with ``target_met`` false."""
    score, correct = np.asarray(score, np.float64), np.asarray(correct, bool)
    order = np.argsort(-score, kind="stable")
    s = score[order]
    acc = np.cumsum(correct[order]) / np.arange(1, len(s) + 1)
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last frame of each run of equal scores
    met = ends[acc[ends] >= target_accuracy - 1e-12]
    i = int(met.max()) if met.size else int(ends[np.flatnonzero(acc[ends] == acc[ends].max()).max()])
    threshold = 0.0 if i == len(s) - 1 else float(s[i])
    return {
        "abstain_below": threshold,
        "target_accuracy": float(target_accuracy),
        "target_met": bool(met.size),
        "val_coverage": (i + 1) / len(s),
        "val_accuracy": float(acc[i]),
        "n_val": len(s),
    }


def operating_point(score: np.ndarray, correct: np.ndarray, threshold: float) -> dict:
    """Coverage and accuracy of the decided frames (score >= ``threshold``; accuracy None when none is decided)."""
    decided = np.asarray(score) >= threshold
    correct = np.asarray(correct, bool)
    return {
        "coverage": float(decided.mean()),
        "accuracy": float(correct[decided].mean()) if decided.any() else None,
        "decided": int(decided.sum()),
        "n": len(decided),
    }


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per non-empty bin of :data:`ECE_BINNING`: its range, frame count, mean top score and accuracy."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    return [
        {
            "low": float(edges[b]),
            "high": float(edges[b + 1]),
            "n": int((which == b).sum()),
            "confidence": float(confidence[which == b].mean()),
            "accuracy": float(correct[which == b].mean()),
        }
        for b in range(bins)
        if (which == b).any()
    ]


def calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of top scores (:data:`ECE_BINNING`)."""
    return float(
        sum(b["n"] * abs(b["accuracy"] - b["confidence"]) for b in calibration_bins(confidence, correct, bins))
        / len(confidence)
    )
