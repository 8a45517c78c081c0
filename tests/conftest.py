"""Shared fixtures: one real demo run (and one CIFAR-shaped run) per version of the code, reused by every test
that needs artifacts, in every pytest process: `make test`'s two rounds and their xdist workers share them."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from prune2edge import cli, config, pipeline

os.environ.setdefault("PYTHONUNBUFFERED", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_RUNS = ROOT / ".pytest_cache" / "shared-runs"
# The paper's family, as the demo ran it before it took the default recipe: 12 clones of the parent pruned to 75-92 %,
# fine-tuned 3-6 epochs learning from its soft outputs too; for the tests about clones, on the demo's parent
CLONES = {"family": "clones", "size": 12, "sparsity": [0.75, 0.92], "epochs": [3, 6], "lr": [0.01, 0.05],
          "batch_size": [32, 64], "lr_schedule": "onecycle", "distill": 0.7}  # fmt: skip


def code_version() -> str:
    """A digest of the package's code and configs and of this file: a shared run is made again when they change."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    for path in sorted((ROOT / "prune2edge").rglob("*")):
        if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
            h.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return h.hexdigest()[:16]


def shared_run(name: str, make: Callable[[Path], None]) -> Path:
    """``SHARED_RUNS/<name>-<code version>``, made by ``make(folder)`` by the first process that asks (the others
    wait on a lock), and moved into place only once complete."""
    SHARED_RUNS.mkdir(parents=True, exist_ok=True)
    done = SHARED_RUNS / f"{name}-{code_version()}"
    with open(SHARED_RUNS / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            for old in SHARED_RUNS.glob(f"{name}-*"):  # other versions of the code
                shutil.rmtree(old, ignore_errors=True)
            work = SHARED_RUNS / f".{name}-{os.getpid()}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            make(work)
            work.rename(done)
    return done


@pytest.fixture(scope="session")
def demo_run() -> Path:
    """A complete run of the demo config (digits): baseline, pool, int8, selection, bundle, metrics."""
    return shared_run("demo", lambda d: pipeline.run(config.load(cli.DEMO_CONFIG), d, progress=False))


@pytest.fixture(scope="session")
def clone_demo_run() -> Path:
    """The demo's data and parent with the clone pool it ran before the default recipe (k = 5): a bundle of five
    members, for roll-outs that give devices members other versions did not run."""
    overrides = {
        "pool": CLONES,
        "cluster": {"method": "kmeans-onehot", "k": 5},
        "select": {"strategy": "accuracy-first"},
    }
    return shared_run("clone-demo", lambda d: pipeline.run(config.load(cli.DEMO_CONFIG, overrides), d, progress=False))


def _cifar_shaped(run: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 480)
    x = rng.integers(0, 120, (480, 32, 32, 3), dtype=np.uint8)
    for i, c in enumerate(y):
        r, s = divmod(int(c), 2)
        x[i, 16 * r : 16 * r + 16, 16 * s : 16 * s + 16, c % 3] += 120
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


@pytest.fixture(scope="session")
def cifar_shaped_run() -> Path:
    """A whole run on synthetic 32x32 RGB images (4 classes: a bright square in one quadrant), ResNet-8; its data is
    ``synthetic.npz`` beside the run folder."""
    return shared_run("cifar_shaped", _cifar_shaped) / "run"


def prune2edge_cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run the real command line in a subprocess, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "prune2edge.cli", *args], capture_output=True, text=True, timeout=timeout, **kw
    )


SHARED = {"demo_run", "cifar_shaped_run", "clone_demo_run"}


def pytest_collection_modifyitems(config, items) -> None:
    """Test files in the order `make test`'s workers take them (it passes --no-loadscope-reorder): first the file
    with the most slow tests among those that need a shared run, so that one worker starts its build at once; then
    the files that need none, slowest first, which the other worker runs meanwhile; then the rest, slowest first.
    (Both workers began with files that need the demo run, and one waited about 45 s on the other's build.)"""
    files: dict[Path, list] = {}
    for item in items:
        files.setdefault(item.path, []).append(item)

    def needs(path: Path) -> bool:
        return any(SHARED & set(i.fixturenames) for i in files[path])

    def slow(path: Path) -> int:
        return -sum(i.get_closest_marker("slow") is not None for i in files[path])

    lead = sorted((p for p in files if needs(p)), key=slow)[:1]
    order = lead + sorted((p for p in files if p not in lead), key=lambda p: (needs(p), slow(p)))
    items[:] = [i for p in order for i in files[p]]
