"""Quantisation-aware training of low-bit weights, and the int8 ONNX model that holds exactly the trained values.

While a member trains, every Conv2d and Linear weight is fake-quantised per output channel to ``bits`` bits (the
layer that holds the most weights optionally to fewer, :func:`layer_bits`: mixed precision where the bytes are):
symmetric, scale = max |w| / :func:`levels` over the channel, rounded to the nearest step in the forward pass and
passed straight through in the backward pass (STE, Bengio et al. 2013). Baked, the weights are those grid values.

Batch-norm folding multiplies each output channel by one factor, so the folded convolution ONNX Runtime quantises
still holds ``bits``-bit integers per channel, at another scale. Its per-channel int8 quantisation rounds them to
the int8 grid instead; :func:`snap_onnx` rewrites each int8 weight tensor (and the int32 bias whose scale depends on
it) so that the shipped model holds exactly the trained integers: at most 2 x levels + 1 (about 2^bits) distinct
values per channel, which the shipped encoding (an index per weight into the tensor's distinct values) stores in
about ``bits`` bits. ``bits`` go in steps of 0.5: 3.5 bits are 11 values.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn.utils import parametrize

from . import models, qdq

GRID_TOLERANCE = 1e-3  # |w / scale - round(w / scale)| above this: not on the grid


def levels(bits: float) -> int:
    """The largest integer of a symmetric ``bits``-bit grid: round(2^(bits-1)) - 1, so 2 x levels + 1 values (7 and
    15 values for 4 bits; 5 and 11 for 3.5)."""
    return round(2 ** (bits - 1)) - 1


CLIP_RATIOS = torch.linspace(0.5, 1.0, 11)  # the clipping ranges ``mse`` scales try, as fractions of max |w|


def channel_scale(w: torch.Tensor, bits: float, scale: str = "max") -> torch.Tensor:
    """Per-output-channel step of the grid, shaped to broadcast against ``w``: ``max`` |w| / levels, or with
    ``mse`` the step of the clipping range in :data:`CLIP_RATIOS` that rounds the channel with the least squared
    error (weights beyond it clip to the end of the grid)."""
    flat = w.detach().flatten(1)
    amax = flat.abs().amax(1).clamp_min(1e-12)
    step = amax / levels(bits)
    if scale == "mse":
        steps = CLIP_RATIOS.to(w.device)[:, None] * step  # ratios x channels
        q = torch.clamp(torch.round(flat / steps[..., None]), -levels(bits), levels(bits)) * steps[..., None]
        step = steps.gather(0, ((q - flat) ** 2).sum(-1).argmin(0, keepdim=True))[0]
    return step.view(-1, *[1] * (w.dim() - 1))


def fake_quantize(w: torch.Tensor, bits: float, scale: str = "max") -> torch.Tensor:
    """``w`` rounded to its per-channel ``bits``-bit grid (:func:`channel_scale`) in the forward pass, the identity
    in the backward pass."""
    step = channel_scale(w, bits, scale)
    q = torch.clamp(torch.round(w / step), -levels(bits), levels(bits)) * step
    return w + (q - w).detach()


class FakeQuant(nn.Module):
    """Parametrisation of a weight: fake-quantised once switched on. The switch is a buffer, so a checkpoint taken
    mid-training restores it, and read as a tensor, so a ``torch.compile``d network keeps one graph across it."""

    def __init__(self, bits: float, scale: str = "max"):
        super().__init__()
        self.bits, self.scale = bits, scale
        self.register_buffer("on", torch.tensor(False))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.where(self.on, fake_quantize(w, self.bits, self.scale), w)


def layer_bits(model: nn.Module, bits: float, largest: float = 0) -> dict[str, float]:
    """The grid's bits of every Conv2d and Linear layer of ``model``, by module name: ``bits``, but ``largest`` (when
    not 0) for the layer holding the most weights (the first of equals)."""
    weights = models.prunable(model)
    out = dict.fromkeys(weights, bits)
    if largest:
        out[max(weights, key=lambda n: weights[n].numel())] = largest
    return out


def attach(model: nn.Module, bits: dict[str, float], scale: str = "max") -> list[FakeQuant]:
    """Parametrise the Conv2d and Linear weights of ``model`` named in ``bits`` (:func:`layer_bits`) with a
    (switched-off) :class:`FakeQuant` at their bits and ``scale``. The ``Parameter`` objects stay the same, so an
    optimiser or pruner holding them keeps working."""
    quants = []
    for name, b in bits.items():
        quants.append(FakeQuant(b, scale))
        parametrize.register_parametrization(model.get_submodule(name), "weight", quants[-1])
    return quants


class Switch:
    """``after_step`` hook that turns fake-quantisation on from step ``start`` of the training on."""

    def __init__(self, quants: list[FakeQuant], start: int):
        self.quants, self.start = quants, start

    def __call__(self, step: int, total: int) -> None:
        if step >= self.start and not bool(self.quants[0].on):
            for q in self.quants:
                q.on.fill_(True)


def bake(model: nn.Module) -> None:
    """Remove the parametrisations, leaving each weight at its (fake-)quantised value: plain tensors on the grid."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def grid_integers(w: np.ndarray, bits: Collection[float]) -> tuple[np.ndarray, np.ndarray]:
    """The integers and per-channel scales (axis 0) of a weight on the coarsest per-channel grid of ``bits`` bits
    that holds it; ValueError when none does."""
    flat = w.reshape(len(w), -1).astype(np.float64)
    amax = np.abs(flat).max(1)
    for b in sorted(bits):
        scale = np.where(amax > 0, amax / levels(b), 1.0)
        k = flat / scale[:, None]
        if np.abs(k - np.rint(k)).max(initial=0.0) <= GRID_TOLERANCE:
            return np.rint(k).astype(np.int8).reshape(w.shape), scale
    on = " or ".join(f"{b:g}" for b in sorted(bits))
    raise ValueError(f"weights are not on a {on}-bit grid per output channel: train the model with QAT first")


def _set(inits: dict[str, onnx.TensorProto], name: str, value: np.ndarray) -> None:
    inits[name].CopyFrom(numpy_helper.from_array(value, name))


def snap_onnx(int8_path: Path, fp32_path: Path, bits: Collection[float]) -> int:
    """Rewrite the int8 weights of ``int8_path`` (the QDQ model of ``fp32_path``, :mod:`prune2edge.qdq`) as the
    exact integers and per-channel scales of the fp32 model's weights on their grids of ``bits`` bits
    (:func:`grid_integers`), rescaling each int32 bias and its scale (input scale x weight scale); in place. Returns
    the number of weight tensors rewritten. ValueError when a weight is on none of the grids."""
    fp32 = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(fp32_path)).graph.initializer}
    model = onnx.load(str(int8_path))
    inits = {t.name: t for t in model.graph.initializer}
    found = qdq.layers(model)
    for node, weight, bias in found:
        w_name, s_name = weight.input[0], weight.input[1]
        source = fp32.get(w_name.removesuffix("_quantized"))
        if source is None:
            raise ValueError(f"'{int8_path}': cannot find the fp32 weight of {node.op_type} '{node.name}'")
        old = numpy_helper.to_array(inits[w_name])
        old_scale = numpy_helper.to_array(inits[s_name]).astype(np.float64)
        w = source if source.shape == old.shape else source.T  # a Gemm weight may be stored transposed
        axis = next((a.i for a in weight.attribute if a.name == "axis"), 1)  # the output channels
        k, scale = grid_integers(np.moveaxis(w, axis, 0), bits)
        _set(inits, w_name, np.moveaxis(k, 0, axis).astype(np.int8))
        _set(inits, s_name, scale.astype(np.float32).reshape(old_scale.shape))
        if bias is not None:
            ratio = scale / old_scale.reshape(-1)  # the bias scale follows the weight scale
            b_scale = numpy_helper.to_array(inits[bias.input[1]]).astype(np.float64)
            b = numpy_helper.to_array(inits[bias.input[0]]).astype(np.float64)
            _set(inits, bias.input[0], np.rint(b / ratio).astype(np.int32))
            _set(inits, bias.input[1], (b_scale * ratio).astype(np.float32))
    onnx.save(model, str(int8_path))
    return len(found)
