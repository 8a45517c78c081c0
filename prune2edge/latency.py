"""Inference latency at batch 1, measured with ONNX Runtime (one thread) on this machine, as the bundle records it."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .bundle import session

WARMUP = 5  # untimed runs first: the first runs of a session pay for allocation


def machine() -> str:
    """This machine in words: CPU model, logical CPUs, OS."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def measure(model: Path | str | bytes, x: np.ndarray, runs: int) -> float:
    """Median milliseconds of one ``session.run`` at batch 1 and one thread, over ``runs`` timed runs after
    :data:`WARMUP` untimed ones; the preprocessed images ``x`` (NCHW float32) are fed one per run, in turn."""
    sess = session(model, threads=1)
    name = sess.get_inputs()[0].name
    times = []
    for i in range(WARMUP + runs):
        feed = {name: x[i % len(x)][None]}
        t0 = time.perf_counter()
        sess.run(None, feed)
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def describe(runs: int) -> dict:
    """How :func:`measure` measured, for the manifest."""
    return {
        "batch": 1,
        "threads": 1,
        "runs": runs,
        "warmup": WARMUP,
        "statistic": "median",
        "unit": "ms",
        "input": "preprocessed validation images, one per run in turn",
        "onnxruntime": ort.__version__,
        "machine": machine(),
    }
