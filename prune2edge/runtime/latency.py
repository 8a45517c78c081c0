"""Inference latency at batch 1, measured with ONNX Runtime (one thread) on this machine, as the bundle records it."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .runtimes import Runner, of_session, session

WARMUP = 5  # untimed runs first: the first runs of a session pay for allocation


def machine() -> str:
    """This machine in words: CPU model, logical CPUs, OS."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def measure(models: Mapping[str, Path | str | bytes], x: np.ndarray, runs: int) -> dict[str, float]:
    """Median milliseconds of one ONNX Runtime run at batch 1 and one thread for each named model
    (:func:`measure_runners`)."""
    return measure_runners({n: of_session(session(m, threads=1)) for n, m in models.items()}, x, runs)


def measure_runners(runners: Mapping[str, Runner], x: np.ndarray, runs: int) -> dict[str, float]:
    """Median milliseconds of one run at batch 1 for each named runner (:mod:`prune2edge.runtime.runtimes`), over ``runs``
    timed runs after :data:`WARMUP` untimed ones; the preprocessed images ``x`` (NCHW float32) are fed one per run,
    in turn. The models run interleaved, one run each in turn, so that a machine slowing down or speeding up (other
    jobs, clock changes) shifts them all alike and their ratios hold."""
    times: dict[str, list[float]] = {n: [] for n in runners}
    for i in range(WARMUP + runs):
        for n, run in runners.items():
            image = x[i % len(x)][None]
            t0 = time.perf_counter()
            run(image)
            if i >= WARMUP:
                times[n].append(time.perf_counter() - t0)
    return {n: 1000 * float(np.median(t)) for n, t in times.items()}


def describe(runs: int) -> dict:
    """How :func:`measure` measured, for the manifest."""
    return {
        "batch": 1,
        "threads": 1,
        "runs": runs,
        "warmup": WARMUP,
        "statistic": "median",
        "order": "all models interleaved, one run each in turn",
        "unit": "ms",
        "input": "preprocessed validation images, one per run in turn",
        "onnxruntime": ort.__version__,
        "machine": machine(),
    }
