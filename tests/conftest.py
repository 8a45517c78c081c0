"""Shared fixtures: one real demo run per test session, reused by every test that needs artifacts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prune2edge import cli, config, pipeline

os.environ.setdefault("PYTHONUNBUFFERED", "1")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run of the demo config (digits): baseline, pool, int8, selection, bundle, metrics."""
    run_dir = tmp_path_factory.mktemp("demo")
    pipeline.run(config.load(cli.DEMO_CONFIG), run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="session")
def cifar_shaped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole run on synthetic 32x32 RGB images (4 classes: a bright square in one quadrant), ResNet-8; its data is
    ``synthetic.npz`` beside the run folder."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 480)
    x = rng.integers(0, 120, (480, 32, 32, 3), dtype=np.uint8)
    for i, c in enumerate(y):
        r, s = divmod(int(c), 2)
        x[i, 16 * r : 16 * r + 16, 16 * s : 16 * s + 16, c % 3] += 120
    run = tmp_path_factory.mktemp("cifar_shaped")
    np.savez(run / "synthetic.npz", x_train=x[:400], y_train=y[:400], x_test=x[400:], y_test=y[400:])
    cfg = config.load(
        None,
        {
            "data": {"name": "npz", "path": str(run / "synthetic.npz")},
            "model": {"arch": "resnet8", "kwargs": {"width": 8}},
            "train": {"epochs": 2, "batch_size": 64},
            "pool": {"size": 3, "sparsity": 0.5, "epochs": 1.0, "batch_size": 64},
            "cluster": {"k": 2, "k_max": 3},
        },
    )
    pipeline.run(cfg, run / "run", progress=False)
    return run / "run"


def prune2edge_cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run the real command line in a subprocess, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "prune2edge.cli", *args], capture_output=True, text=True, timeout=timeout, **kw
    )
