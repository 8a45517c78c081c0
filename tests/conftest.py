"""Shared fixtures: one real demo run per test session, reused by every test that needs artifacts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prune2edge import cli, config, pipeline

os.environ.setdefault("PYTHONUNBUFFERED", "1")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run of the demo config (digits): baseline, pool, int8, selection, bundle, metrics."""
    run_dir = tmp_path_factory.mktemp("demo")
    pipeline.run(config.load(cli.DEMO_CONFIG), run_dir, progress=False)
    return run_dir


def prune2edge_cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run the real command line in a subprocess, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "prune2edge.cli", *args], capture_output=True, text=True, timeout=timeout, **kw
    )
