"""scripts/gpu_check.py: its smoke mode end to end on the CPU (so the GPU check cannot rot), its refusal without
CUDA, and the checks it makes of bench/speed.py's rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import gpu_check
import speed

ROOT = gpu_check.ROOT

# A stand-in for the mosaic folder's decode.py (which lives outside the repository): the same command line, and npz
# files of the same names and keys, with tiny CIFAR-shaped images (a colour per class plus noise).
FAKE_DECODE = """
import sys
from pathlib import Path

import numpy as np

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
labels = np.load(Path(__file__).resolve().parent / "labels.npz")
gen = np.random.default_rng(0)
means = gen.integers(0, 256, (10, 1, 1, 3))


def images(y):
    return np.clip(means[y] + gen.normal(0, 30, (len(y), 32, 32, 3)), 0, 255).astype(np.uint8)


np.savez(out / "cifar10_train.npz", x_train=images(labels["y_train"]), y_train=labels["y_train"])
np.savez(out / "cifar10_test.npz", x_test=images(labels["y_test"]), y_test=labels["y_test"],
         label_names=labels["label_names"])
"""


def fake_mosaic(folder: Path, n_train: int = 300, n_test: int = 100) -> Path:
    folder.mkdir()
    (folder / "decode.py").write_text(FAKE_DECODE)
    names = np.array([f"class{i}" for i in range(10)])
    y_train, y_test = np.arange(n_train) % 10, np.arange(n_test) % 10
    np.savez(folder / "labels.npz", y_train=y_train, y_test=y_test, label_names=names, n_train=n_train, n_test=n_test)
    return folder


def gpu_check_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The script in a subprocess, this checkout importable, its output captured."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_smoke_mode_runs_every_step_end_to_end(tmp_path):
    untouched = [ROOT / "bench" / "results" / "speed-cpu.json", ROOT / "docs" / "RESULTS.md"]
    before = [p.read_bytes() for p in untouched]
    mosaic, work, export = fake_mosaic(tmp_path / "mosaic"), tmp_path / "work", tmp_path / "out"
    p = gpu_check_cli("--smoke", "--mosaic", str(mosaic), "--work", str(work), "--export", str(export))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "[gpu_check] every step passed" in p.stdout
    summary = json.loads((work / "gpu-check.json").read_text())
    steps = summary["steps"]
    assert summary["mode"] == "smoke" and list(steps) == list(gpu_check.STEPS)

    assert steps["decode"]["status"] == "ok"
    assert (steps["decode"]["train_images"], steps["decode"]["test_images"]) == (300, 100)

    t = steps["tests"]  # the CUDA-only tests are collected and, without a GPU, reported as not run
    assert t["collected"] >= 4 and all("test_train" in n for n in t["skipped_tests"] + t["passed_tests"])
    if not torch.cuda.is_available():
        assert t["status"].startswith("not run") and len(t["skipped_tests"]) == t["collected"]

    s = steps["speed"]
    assert s["status"] == "ok" and len(s["images_per_s"]) == 2 * len(gpu_check.ARCHS) * len(gpu_check.SMOKE.batches)
    for case, loops in s["images_per_s"].items():
        expected = gpu_check.POOL_LOOPS if case.startswith("pool of") else gpu_check.SINGLE_LOOPS["cpu"]
        assert sorted(loops) == sorted(expected) and all(v > 0 for v in loops.values()), case
    assert s["not_run"] == ["fit, compile: CUDA only", "fit, cuda-graph: CUDA only"]

    r = steps["pipeline"]
    assert r["status"] == "ok" and r["wall_s"] > 0 and not r["resumed_a_finished_run"]
    assert {"baseline", "pool", "quantize", "select", "bundle", "evaluate"} <= set(r["phase_seconds"])
    assert r["ensemble_members"] and 0 <= r["ensemble_test_acc"] <= 1
    result = json.loads((work / "results" / "cifar10-resnet20-smoke.json").read_text())
    assert result["config"] == gpu_check.CONFIG and result["config_resolved"]["model"]["arch"] == "resnet20"

    exported = {"gpu-check.json", "gpu-check.log", "cuda-tests.xml", "speed-cpu.json", "cifar10-resnet20-smoke.json"}
    assert {f.name for f in export.iterdir()} == exported
    assert [p.read_bytes() for p in untouched] == before  # smoke results stay in the work folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_stops_at_once_with_one_line(tmp_path):
    work = tmp_path / "work"
    p = gpu_check_cli("--mosaic", str(fake_mosaic(tmp_path / "mosaic")), "--work", str(work))
    assert p.returncode == 2
    assert p.stderr.startswith("gpu_check: CUDA is not available") and len(p.stderr.strip().splitlines()) == 1
    assert not work.exists() and "[gpu_check]" not in p.stdout


def test_a_missing_mosaic_is_named_with_how_to_copy_it(tmp_path):
    p = gpu_check_cli("--smoke", "--mosaic", str(tmp_path / "nowhere"), "--work", str(tmp_path / "work"))
    assert p.returncode == 2 and "no CIFAR-10 mosaic at" in p.stderr and "cp -rf" in p.stderr


def test_broken_loops_names_failed_missing_and_absent_rows():
    def row(case: str, loop: str, **kw) -> dict:
        return {"case": case, "loop": loop, "images_per_s": 1.0, **kw}

    rows = [row("resnet20, batch 128", loop) for loop in gpu_check.SINGLE_LOOPS["cuda"]]
    rows += [row("pool of 8 x resnet20, batch 128", loop) for loop in ("reference", "fit")]
    assert gpu_check.broken_loops(rows, "cuda", 2) == [
        "pool of 8 x resnet20, batch 128 / fit_group (lockstep): missing"
    ]
    rows[1] = {"case": "resnet20, batch 128", "loop": "fit", "error": "RuntimeError: boom"}
    assert gpu_check.broken_loops(rows, "cuda", 3) == [
        "resnet20, batch 128 / fit: RuntimeError: boom",
        "pool of 8 x resnet20, batch 128 / fit_group (lockstep): missing",
        "2 networks and pools measured, 3 expected",
    ]


def test_a_loop_that_fails_becomes_a_row_with_its_error_and_the_others_are_timed():
    def make(x: torch.Tensor, y: torch.Tensor) -> dict:
        return {"reference": lambda: lambda: None, "broken": lambda: lambda: 1 / 0}

    data = torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    out = speed.rows("net", make, data, data, 4, 1, 45_000, 2, "cpu", 1, 4)
    assert [r["loop"] for r in out] == ["broken", "reference"]
    assert out[0]["error"] == "ZeroDivisionError: division by zero" and "images_per_s" not in out[0]
    assert len(out[1]["seconds"]) == 2 and out[1]["speedup_vs_reference"] == 1.0 and out[1]["batch_size"] == 4
