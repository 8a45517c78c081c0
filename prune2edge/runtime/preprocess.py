"""Raw pixels to model input: the one preprocessing used for training, calibration and inference.

Needs only numpy, so an edge device can run it. Two steps, both written into every bundle manifest:
:class:`InputSteps` brings raw images of any size to the model's input contract (resize, colour; uint8),
then :class:`Preprocessing` normalises them: ``x = (raw * scale - mean[c]) / std[c]``, NHWC -> NCHW, float32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UserError

COLORS = ("grey", "rgb")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, as Pillow's convert("L")
RESIZE = (
    "area: along each axis (n_in -> n_out pixels, s = n_in / n_out), output pixel i is the mean of the input "
    "over [i * s, (i + 1) * s], each input pixel k weighted by the length of [k, k + 1] inside it, divided by s; "
    "rows first, then columns"
)
STEPS = (
    "with 4 channels and 'color' set, the 4th (alpha) is dropped; 'color' grey: RGB -> luma 0.299 R + 0.587 G + "
    "0.114 B; resize to 'size' [h, w] (stretched, no crop) with the 'resize' filter; 'color' rgb: grey repeated "
    "to 3 channels; computed in float32 from the uint8 pixels, rounded to the nearest integer (ties to even) and "
    "clipped to 0..255 once at the end. A step whose input already matches is skipped, so images already of the "
    "model's size and colour pass unchanged. null: as stored (the images must already match)"
)


def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of the area filter (:data:`RESIZE`): each row sums to 1."""
    s = n_in / n_out
    start = np.arange(n_out, dtype=np.float64)[:, None] * s
    k = np.arange(n_in, dtype=np.float64)[None, :]
    return (np.clip(np.minimum(k + 1, start + s) - np.maximum(k, start), 0, None) / s).astype(np.float32)


@dataclass(frozen=True)
class InputSteps:
    """What raw images go through before :class:`Preprocessing`: resized to ``size`` (h, w) and converted to
    ``color`` (``grey`` or ``rgb``); None keeps them as stored. The model's input contract (:data:`STEPS`)."""

    size: tuple[int, int] | None = None
    color: str | None = None

    @classmethod
    def from_config(cls, data: dict) -> InputSteps:
        """From ``data.image_size`` (int or [h, w]) and ``data.color``."""
        size = data.get("image_size")
        return cls(None if size is None else (size, size) if isinstance(size, int) else tuple(size), data.get("color"))

    def to_config(self) -> dict:
        """As ``data.image_size`` and ``data.color``."""
        return {"image_size": None if self.size is None else list(self.size), "color": self.color}

    def to_dict(self) -> dict:
        return {
            "size": None if self.size is None else list(self.size),
            "color": self.color,
            "resize": RESIZE,
            "formula": STEPS,
        }

    @classmethod
    def from_dict(cls, d: dict | None) -> InputSteps:
        """From :meth:`to_dict`; None (a bundle made before these steps existed) keeps images as stored."""
        d = d or {}
        return cls(None if d.get("size") is None else tuple(d["size"]), d.get("color"))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """uint8 NHWC images -> uint8 NHWC images of ``size`` and ``color`` (:data:`STEPS`)."""
        if self.color and x.shape[-1] == 4:
            x = x[..., :3]
        if self.color and x.shape[-1] not in (1, 3):
            raise UserError(
                f"images have {x.shape[-1]} channels; color: {self.color} converts images of 1 (grey), "
                "3 (RGB) or 4 (RGBA) channels"
            )
        to_grey = self.color == "grey" and x.shape[-1] == 3
        resize = self.size is not None and tuple(x.shape[1:3]) != tuple(self.size)
        if to_grey or resize:
            h, w = self.size if resize else x.shape[1:3]
            out = np.empty((len(x), h, w, 1 if to_grey else x.shape[-1]), np.uint8)
            rows, cols = (area_weights(x.shape[1], h), area_weights(x.shape[2], w).T) if resize else (None, None)
            chunk = max(1, (1 << 22) // int(np.prod(x.shape[1:])))  # about 16 MB of float32 at a time
            for i in range(0, len(x), chunk):
                f = x[i : i + chunk].astype(np.float32)
                if to_grey:
                    f = f @ LUMA[:, None]
                if resize:
                    f = (rows @ f.transpose(0, 3, 1, 2) @ cols).transpose(0, 2, 3, 1)
                out[i : i + chunk] = np.clip(np.rint(f), 0, 255)
            x = out
        if self.color == "rgb" and x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        return x


def check_images(x, shape: tuple[int, ...], steps: InputSteps | None = None) -> np.ndarray:
    """Raw images -> uint8 NHWC of the model's ``shape`` (HWC), through ``steps``; or a clear error.

    Takes a batch (NHWC, or NHW for grey), one image (HWC or HW), or a list of images; with ``steps`` that
    resize or convert, images of any size and colour. RGBA images lose their alpha for a 3-channel model.
    """
    steps = steps or InputSteps()
    if isinstance(x, (list, tuple)):
        shapes = {np.shape(img) for img in x}
        if len(shapes) > 1 and steps.size is None and steps.color is None:
            raise UserError(
                f"the images mix shapes {sorted(shapes)}, and this model takes {tuple(shape)} (HWC) as "
                "stored (it was made without data.image_size and data.color)"
            )
        if len(shapes) > 1:
            return np.concatenate([check_images(img, shape, steps) for img in x])
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise UserError(f"images have dtype {x.dtype}; the bundle takes raw uint8 pixels")
    if steps.size is None and steps.color is None:  # as stored: the images must have the model's shape
        if shape[-1] == 1 and x.shape[-2:] == tuple(shape[:2]):
            x = x[..., None]
        if x.shape == tuple(shape) or (shape[-1] == 3 and x.shape == (*shape[:2], 4)):
            x = x[None]
    elif x.ndim == 2:  # one grey image
        x = x[None, ..., None]
    elif x.ndim == 3:  # one HWC image, or a batch of grey ones
        x = x[None] if x.shape[-1] in (1, 3, 4) else x[..., None]
    if shape[-1] == 3 and x.ndim == 4 and x.shape[-1] == 4:
        x = x[..., :3]  # RGBA: drop alpha
    if x.ndim == 4:
        x = steps.apply(x)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
        hint = ""
        if x.ndim == 4 and steps.size is None and x.shape[1:3] != tuple(shape[:2]):
            hint = "; a model made with data.image_size resizes images of any size"
        elif x.ndim == 4 and steps.color is None and x.shape[-1] != shape[-1]:
            hint = "; a model made with data.color converts grey and RGB images"
        raise UserError(f"images have shape {tuple(x.shape)} but the model takes {tuple(shape)} (HWC) per image{hint}")
    return x


@dataclass(frozen=True)
class Preprocessing:
    """Per-channel normalisation of raw NHWC pixel values."""

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, raw: np.ndarray, scale: float) -> Preprocessing:
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
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(float(d["scale"]), tuple(d["mean"]), tuple(d["std"]))
