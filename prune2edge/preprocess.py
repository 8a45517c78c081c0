"""Raw pixels to model input: the one preprocessing used for training, calibration and inference.

Needs only numpy, so an edge device can run it. The same rule is written into every bundle
manifest: ``x = (raw * scale - mean[c]) / std[c]``, then NHWC -> NCHW, float32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Preprocessing:
    """Per-channel normalisation of raw NHWC pixel values."""

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, raw: np.ndarray, scale: float) -> "Preprocessing":
        """Per-channel mean and std of ``raw * scale`` (training images only)."""
        x = raw.reshape(-1, raw.shape[-1]).astype(np.float64) * scale
        std = np.maximum(x.std(axis=0), 1e-6)
        return cls(float(scale), tuple(float(v) for v in x.mean(axis=0)), tuple(float(v) for v in std))

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """uint8 NHWC images -> float32 NCHW model input."""
        x = raw.astype(np.float32) * np.float32(self.scale)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            layout_in="NHWC",
            dtype_in="uint8",
            layout_out="NCHW",
            dtype_out="float32",
            formula="x = (raw * scale - mean[c]) / std[c], computed in float32; then transpose NHWC -> NCHW",
        )
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(float(d["scale"]), tuple(d["mean"]), tuple(d["std"]))
