"""Baseline networks in plain ``torch.nn``, and loading a network the user brings."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from .errors import UserError


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A fast CNN for 2 CPU cores: conv-bn-relu stages, each followed by a 2x2 max-pool, then global average pool.

    ``stem_pool``: a 2x2 max-pool right after the first convolution, so every later stage runs at half the
    resolution: about 4x fewer multiply-adds for the same width (twice the width at the cost of the default).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, depth: int = 3, stem_pool: bool = False):
        super().__init__()
        layers, c = [conv_bn(in_channels, width)], width
        if stem_pool:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        for i in range(depth):
            layers += [conv_bn(c, width * 2 ** (i + 1)), nn.MaxPool2d(2, ceil_mode=True)]
            c = width * 2 ** (i + 1)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet v1 for CIFAR (He et al. 2016): a 3x3 stem, 3 stages of ``blocks`` basic blocks of ``width``, 2x and 4x
    ``width`` channels (the later two at stride 2, with 1x1 projection shortcuts), global average pool, dense.

    ``resnet20``: 3 blocks per stage. ``resnet8``: 1 block per stage, MLPerf Tiny's image-classification reference
    (``resnet_v1_eembc``; its projection shortcuts carry a bias where these carry a batch norm: 78,042 parameters
    against 78,666, the same 12.5 M multiply-adds at 32x32x3)."""

    def __init__(self, in_channels: int, num_classes: int, blocks: int = 3, width: int = 16):
        super().__init__()
        layers, c = [conv_bn(in_channels, width)], width
        for stage, w in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                layers.append(BasicBlock(c, w, 2 if stage and not b else 1))
                c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class KerasCifar10CNN(nn.Module):
    """The Keras ``cifar10_cnn`` example: two conv-conv-pool-dropout blocks, dense 512, dropout, dense."""

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int]):
        super().__init__()
        if min(image_size) < 10:
            raise UserError(f"keras_cifar10_cnn needs images of at least 10x10, got {image_size}; use small_cnn")
        r = nn.ReLU
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            r(),
            nn.Conv2d(32, 32, 3),
            r(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
            nn.Conv2d(32, 64, 3, padding=1),
            r(),
            nn.Conv2d(64, 64, 3),
            r(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
            nn.Flatten(),
        )
        with torch.no_grad():
            n = self.features(torch.zeros(1, in_channels, *image_size)).shape[1]
        self.head = nn.Sequential(nn.Linear(n, 512), r(), nn.Dropout(0.5), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": lambda c, k, hw, **kw: SmallCNN(c, k, **kw),
    "resnet20": lambda c, k, hw, **kw: ResNet(c, k, **{"blocks": 3, **kw}),
    "resnet8": lambda c, k, hw, **kw: ResNet(c, k, **{"blocks": 1, **kw}),
    "keras_cifar10_cnn": lambda c, k, hw, **kw: KerasCifar10CNN(c, k, hw, **kw),
}


def build(arch: str, image_shape: tuple[int, int, int], num_classes: int, **kwargs) -> nn.Module:
    """A fresh network for HWC images; ``arch`` is a built-in name or ``module.path:factory`` (called with kwargs)."""
    h, w, c = image_shape
    try:
        if arch in ARCHS:
            model = ARCHS[arch](c, num_classes, (h, w), **kwargs)
        elif ":" in arch:
            mod, _, fn = arch.partition(":")
            model = getattr(importlib.import_module(mod), fn)(**kwargs)
        else:
            raise UserError(f"unknown model.arch '{arch}': use {', '.join(ARCHS)} or 'module.path:factory'")
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import model factory '{arch}' ({e}); is the module on PYTHONPATH?") from None
    except TypeError as e:
        raise UserError(f"model '{arch}' rejected its arguments {kwargs} ({e}); check model: in the config") from None
    check_shapes(model, image_shape, num_classes)
    return model


def check_shapes(model: nn.Module, image_shape: tuple[int, int, int], num_classes: int) -> None:
    """Fail clearly when the network cannot take these images or gives the wrong number of outputs."""
    h, w, c = image_shape
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, c, h, w))
    except RuntimeError as e:
        raise UserError(f"the model cannot take images of shape {h}x{w}x{c} (HWC): {str(e).splitlines()[0]}") from None
    finally:
        model.train(was_training)
    if tuple(out.shape) != (2, num_classes):
        raise UserError(
            f"the model outputs shape {tuple(out.shape[1:])} per image but the data has {num_classes} classes"
        )


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """Load a state_dict saved with ``torch.save(model.state_dict(), path)`` (read with weights_only=True)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except FileNotFoundError:
        raise UserError(f"model weights not found: '{path}'") from None
    except (RuntimeError, ValueError, KeyError, EOFError) as e:
        raise UserError(f"cannot load weights '{path}' into the model: {str(e).splitlines()[0]}") from None
    return model


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weights that magnitude pruning acts on: every Conv2d and Linear weight, by module name."""
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def sparsity(model: nn.Module) -> dict:
    """Measured fraction of exact zeros per prunable layer and over all of them, read from the weights."""
    layers = {n: float((w == 0).sum()) / w.numel() for n, w in prunable(model).items()}
    zeros = sum(float((w == 0).sum()) for w in prunable(model).values())
    total = sum(w.numel() for w in prunable(model).values())
    return {"overall": zeros / total, "layers": layers}


@torch.no_grad()
def shaped_like(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` with each layer resized to the shapes of ``state`` (a channel-pruned member's weights: fewer
    filters and inputs), then loaded with it."""
    for name, m in model.named_modules():
        w = state.get(f"{name}.weight" if name else "weight")
        if (
            w is None
            or not isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d))
            or w.shape == m.weight.shape
        ):
            continue
        if isinstance(m, nn.Conv2d):
            m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = w.shape
        else:
            m.num_features = w.shape[0]
        for key, _ in m.named_parameters(recurse=False):
            setattr(m, key, nn.Parameter(torch.empty_like(state[f"{name}.{key}"])))
        for key, t in m.named_buffers(recurse=False):
            if t is not None and t.dim() > 0:
                setattr(m, key, torch.empty_like(state[f"{name}.{key}"]))
    model.load_state_dict(state)
    return model
