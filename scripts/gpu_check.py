#!/usr/bin/env python3
"""The GPU check (issue 21): on a CUDA machine, in one call, every measurement the GPU path still lacks.

Steps, in order (``--only`` picks some; the pipeline decodes first when it has to):

1. decode: the CIFAR-10 JPEG mosaic carried with the checkout (``--mosaic``) into npz files, with its decode.py;
2. tests: the CUDA-only tests (``pytest -m cuda tests/test_train.py``); on a GPU none may be skipped;
3. speed: ``bench/speed.py --devices cuda`` for small_cnn and resnet20 and their pools at batch 128 and 512, every
   loop (reference, fit, fit with torch.compile, fit as a CUDA graph, fit_group in lockstep) into
   bench/results/speed-cuda.json (100 steps a network, 20 a pool member, 2 rounds: ``--speed-args`` changes them);
   a loop that fails or is missing fails the step;
4. pipeline: configs/cifar10-resnet20.yaml in full on the decoded data with ``bench/cifar10.py`` (seed 0, label
   ``cuda``: baseline, pool, quantise, select, bundle, evaluate), timed, into
   bench/results/cifar10-resnet20-cuda.json. It runs with ``train.compile`` and ``pool.compile`` set to
   ``cuda-graph``, the fastest step (the plain loop's 160-epoch baseline alone would take about 9 minutes at the
   13,000 images/s a probe measured); ``--set KEY=VALUE`` adds overrides, ``--set train.compile=none --set
   pool.compile=none`` goes back to the config's loop.

Without CUDA it stops at once with one line and exit status 2: it never skips. ``--smoke`` runs the same steps on
the CPU at tiny settings (2 members, a few steps, batch 4 and 8; the CUDA-only tests and loops are reported as not
run); tests/test_gpu_check.py runs it. Every step writes ``WORK/gpu-check.json`` (status, seconds, numbers of each
step; a later call adds to it) and appends its output to ``WORK/gpu-check.log``; ``--export DIR`` copies those, the
tests' JUnit XML and the results files to DIR after every step, so a call cut short still returns what it did.
Exit status: 0 when every step passed, 1 when one failed, 2 when it could not start.

Before the GPU call, here (once per checkout; gpu-data/ is ignored by git, never commit it):

    mkdir -p gpu-data && cp -rf ../shared/data/cifar10-mosaic gpu-data/ && chmod -R u+w gpu-data

The GPU call, from the repository root, with the ignored folder gpu-data/cifar10-mosaic carried along (39 MB), and
``$OUT`` a folder whose files come back:

    python3 scripts/gpu_check.py --export "$OUT"                  # meant to fit in about 10 minutes (not yet timed)
    python3 scripts/gpu_check.py --only tests,speed --export "$OUT"  # or in two calls: the quick steps, then
    python3 scripts/gpu_check.py --only pipeline --export "$OUT"     # the pipeline (on the same machine it resumes)

Afterwards copy speed-cuda.json and cifar10-resnet20-cuda.json into bench/results/; ``python bench/speed.py
--report`` writes the Training speed section of docs/RESULTS.md, and the pipeline's section is at the end of its
output in gpu-check.log. On the CPU: ``python scripts/gpu_check.py --smoke --mosaic DIR --work DIR``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("decode", "tests", "speed", "pipeline")  # in this order
ARCHS = ("small_cnn", "resnet20")
CUDA_TESTS = ("tests/test_train.py",)  # where the tests marked ``cuda`` live
CONFIG = "configs/cifar10-resnet20.yaml"
SINGLE_LOOPS = {"cpu": ("reference", "fit"), "cuda": ("reference", "fit", "fit, compile", "fit, cuda-graph")}
POOL_LOOPS = ("reference", "fit", "fit_group (lockstep)")
NEEDS = ("numpy", "torch", "onnx", "onnxruntime", "sklearn", "scipy", "yaml", "click", "tqdm", "PIL", "matplotlib")
NEEDS += ("jinja2", "pytest")


@dataclass(frozen=True)
class Mode:
    """What one mode runs: the device, bench/speed.py's arguments and the pipeline's overrides."""

    name: str
    device: str
    batches: tuple[int, ...]
    speed: tuple[str, ...]
    pipeline: tuple[str, ...]


CUDA = Mode(
    "cuda",
    "cuda",
    (128, 512),
    ("--devices", "cuda", "--cuda-steps", "100", "--pool-steps", "20", "--repeats", "2"),
    ("train.compile=cuda-graph", "pool.compile=cuda-graph"),
)
SMOKE = Mode(
    "smoke",
    "cpu",
    (4, 8),
    ("--devices", "cpu", "--threads", "1", "--steps", "1", "--pool-steps", "1", "--repeats", "1", "--pool-size", "2"),
    (
        "device=cpu",
        "data.max_train=100",
        "train.epochs=2",
        "train.cycles=2",
        "pool.snapshots=2",
        "pool.size=2",
        "pool.epochs=[0.5,0.5]",
        "pool.min_steps=0",  # a smoke run: members as short as their epochs say
        "cluster.k=2",
        "cluster.k_max=2",
        "quantize.calibration_size=16",
        "bundle.latency_runs=5",
    ),
)


class Failed(Exception):
    """A step that did not pass: the message says what went wrong; ``details`` what it measured before."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


@dataclass
class Check:
    """One call of this script: its mode and folders, and the summary it keeps."""

    mode: Mode
    mosaic: Path
    work: Path
    results: Path
    sets: list[str]
    speed_args: str
    export: Path | None
    summary: dict = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.work / "cifar10"

    @property
    def log(self) -> Path:
        return self.work / "gpu-check.log"

    def run(self, cmd: list[str]) -> int:
        """``cmd`` from the repository root, the checkout importable; its output to the console and the log."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with self.log.open("a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in p.stdout:
                sys.stdout.write(line)
                log.write(line)
            return p.wait()


def decode(c: Check) -> tuple[str, dict]:
    script = c.mosaic / "decode.py"
    if c.run([sys.executable, rel(script), rel(c.data)]):
        raise Failed(f"{script} failed (its output is in {c.log})")
    import numpy as np

    counts = {}
    for split in ("train", "test"):
        with np.load(c.data / f"cifar10_{split}.npz") as z:
            x, y = z[f"x_{split}"], z[f"y_{split}"]
        if x.shape[1:] != (32, 32, 3) or x.dtype != np.uint8 or len(x) != len(y):
            raise Failed(
                f"decoded {split} split: {x.shape} {x.dtype} images, {len(y)} labels; expected N x 32 x 32 x 3"
            )
        counts[split] = len(x)
    if (c.mosaic / "labels.npz").exists():
        with np.load(c.mosaic / "labels.npz") as z:
            expected = {"train": int(z["n_train"]), "test": int(z["n_test"])}
        if counts != expected:
            raise Failed(f"decoded {counts} images, labels.npz says {expected}")
    return "ok", {"data": rel(c.data), "train_images": counts["train"], "test_images": counts["test"]}


def junit(path: Path) -> dict[str, str]:
    """Each test case's outcome in a JUnit XML report: passed, skipped, failed or error."""
    out = {}
    for case in ET.parse(path).iter("testcase"):
        kinds = [e.tag for e in case if e.tag in ("skipped", "failure", "error")]
        out[f"{case.get('classname')}::{case.get('name')}"] = (
            {"failure": "failed"}.get(kinds[0], kinds[0]) if kinds else "passed"
        )
    return out


def tests(c: Check) -> tuple[str, dict]:
    xml = c.work / "cuda-tests.xml"
    xml.unlink(missing_ok=True)
    rc = c.run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={rel(xml)}", *CUDA_TESTS]
    )
    cases = junit(xml) if xml.exists() else {}
    if not cases:
        raise Failed(f"no test marked cuda was collected from {', '.join(CUDA_TESTS)} (pytest exit {rc})")
    by = {k: sorted(n for n, o in cases.items() if o == k) for k in ("passed", "skipped", "failed", "error")}
    details = {"collected": len(cases), **{f"{k}_tests": v for k, v in by.items()}}
    broken = by["failed"] + by["error"]
    if broken or rc != 0:
        raise Failed(
            f"{len(broken)} of {len(cases)} CUDA-only tests failed (pytest exit {rc}): {', '.join(broken)}", details
        )
    if by["skipped"] and c.mode.device == "cuda":
        raise Failed(f"{len(by['skipped'])} of {len(cases)} CUDA-only tests were skipped on a CUDA machine", details)
    return ("not run (skipped: no CUDA)" if by["skipped"] else "ok"), details


def speed(c: Check) -> tuple[str, dict]:
    archs, batches = ",".join(ARCHS), ",".join(map(str, c.mode.batches))
    cmd = [sys.executable, "bench/speed.py", *c.mode.speed, "--archs", archs, "--pool-archs", archs]
    path = c.results / f"speed-{c.mode.device}.json"
    cmd += ["--batch-sizes", batches, "--results", rel(c.results), "--no-docs", *shlex.split(c.speed_args)]
    if c.run(cmd) or not path.exists():
        raise Failed(f"bench/speed.py failed (its output is in {c.log})")
    rows = json.loads(path.read_text())["rows"]
    done = [r for r in rows if "error" not in r]
    cases = sorted({r["case"] for r in rows})
    details: dict = {
        "results_file": rel(path),
        "images_per_s": {
            case: {r["loop"]: round(r["images_per_s"]) for r in done if r["case"] == case} for case in cases
        },
        "not_run": [f"{loop}: CUDA only" for loop in SINGLE_LOOPS["cuda"] if loop not in SINGLE_LOOPS[c.mode.device]],
    }
    fastest = max((r for r in done if r["case"].startswith("resnet20")), key=lambda r: r["images_per_s"], default=None)
    if fastest:
        details["resnet20_fastest"] = {k: fastest[k] for k in ("case", "loop", "images_per_s")}
    if fastest and c.mode.device == "cuda":  # the target for one H100/H200-class GPU
        details["resnet20_ge_40000_images_per_s"] = fastest["images_per_s"] >= 40_000
    if broken := broken_loops(rows, c.mode.device, 2 * len(ARCHS) * len(c.mode.batches)):
        raise Failed(f"{len(broken)} loops failed or are missing: {'; '.join(broken)}", {**details, "broken": broken})
    return "ok", details


def broken_loops(rows: list[dict], device: str, cases: int) -> list[str]:
    """What is wrong with bench/speed.py's rows: loops that failed, loops missing, networks or pools missing."""
    seen = {(r["case"], r["loop"]) for r in rows}
    out = [f"{r['case']} / {r['loop']}: {r['error']}" for r in rows if "error" in r]
    for case in sorted({r["case"] for r in rows}):
        loops = POOL_LOOPS if case.startswith("pool of") else SINGLE_LOOPS[device]
        out += [f"{case} / {loop}: missing" for loop in loops if (case, loop) not in seen]
    if len({r["case"] for r in rows}) != cases:
        out.append(f"{len({r['case'] for r in rows})} networks and pools measured, {cases} expected")
    return out


def pipeline(c: Check) -> tuple[str, dict]:
    name = f"cifar10-resnet20-{c.mode.name}"
    out = c.work / "runs" / name
    resumed = (out / "seed0" / "metrics.json").exists()
    sets = [*c.mode.pipeline, *c.sets]
    cmd = [sys.executable, "bench/cifar10.py", "--config", CONFIG, "--label", c.mode.name, "--seeds", "0"]
    cmd += ["--data", rel(c.data), "--out", rel(out), "--results", rel(c.results), "--no-docs"]
    cmd += [x for s in sets for x in ("--set", s)]
    path = c.results / f"{name}.json"
    t0 = time.perf_counter()
    rc = c.run(cmd)
    wall = time.perf_counter() - t0
    if rc or not path.exists():
        raise Failed(f"bench/cifar10.py failed (exit {rc}; its output is in {c.log}); run again to resume")
    r = json.loads(path.read_text())["runs"]["0"]
    target = {"wall_le_600_s": wall <= 600} if c.mode.device == "cuda" else {}  # the target on one GPU
    return "ok", {
        "results_file": rel(path),
        "set": sets,
        "wall_s": round(wall, 1),
        "resumed_a_finished_run": resumed,
        **target,
        "phase_seconds": r["seconds"],
        "baseline_fp32_test_acc": r["baseline_fp32_test_acc"],
        "baseline_int8_test_acc": r["baseline_int8_test_acc"],
        "member_test_acc_int8_mean": r["member_test_acc_int8_mean"],
        "ensemble_test_acc": r["selected"]["test_acc"],
        "ensemble_members": r["selected"]["members"],
    }


RUNS = {"decode": decode, "tests": tests, "speed": speed, "pipeline": pipeline}


def rel(path: Path) -> str:
    """A path as given to the benches and written into results: relative to the repository where it lies inside it
    (the commands run from there), so that the results name nothing of the machine they ran on."""
    return os.path.relpath(path, ROOT) if path.resolve().is_relative_to(ROOT) else str(path)


def preflight(mode: Mode, mosaic: Path) -> str | None:
    """Why this machine cannot run the check, in one line, or None."""
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        return f"gpu_check: {', '.join(missing)} not installed for {sys.executable}: install them (pip install -e .)"
    import torch

    if mode.device == "cuda" and not torch.cuda.is_available():
        return (
            f"gpu_check: CUDA is not available (torch {torch.__version__} sees no GPU): run this on a CUDA machine, "
            "or pass --smoke to run the same steps on the CPU"
        )
    if not (mosaic / "decode.py").exists():
        return (
            f"gpu_check: no CIFAR-10 mosaic at {mosaic} (decode.py missing): copy it there first, "
            "mkdir -p gpu-data && cp -rf ../shared/data/cifar10-mosaic gpu-data/, or pass --mosaic DIR"
        )
    return None


def machine(mode: Mode) -> dict:
    import torch

    gpu = torch.cuda.get_device_name() if mode.device == "cuda" else None
    return {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}


def save(c: Check) -> None:
    """The summary into WORK/gpu-check.json, and everything worth keeping into the export folder."""
    (c.work / "gpu-check.json").write_text(json.dumps(c.summary, indent=2) + "\n")
    if c.export is None:
        return
    c.export.mkdir(parents=True, exist_ok=True)
    files = [c.work / "gpu-check.json", c.log, c.work / "cuda-tests.xml"]
    files += [c.results / f"speed-{c.mode.device}.json", c.results / f"cifar10-resnet20-{c.mode.name}.json"]
    for f in files:
        if f.exists():
            shutil.copy2(f, c.export / f.name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the same steps on the CPU at tiny settings")
    ap.add_argument("--mosaic", type=Path, default=ROOT / "gpu-data" / "cifar10-mosaic", help="the mosaic folder")
    ap.add_argument(
        "--work", type=Path, help="decoded data, runs, summary (default gpu-data/work, smoke: gpu-data/smoke)"
    )
    ap.add_argument("--only", help=f"comma-separated steps of {', '.join(STEPS)} (default all)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a pipeline override (repeatable)")
    ap.add_argument("--speed-args", default="", help="more bench/speed.py arguments, e.g. '--cuda-steps 50'")
    ap.add_argument("--export", type=Path, help="copy the summary, log and results files here after every step")
    args = ap.parse_args()
    steps = args.only.split(",") if args.only else list(STEPS)
    if unknown := [s for s in steps if s not in STEPS]:
        ap.error(f"--only: unknown step {', '.join(unknown)}; the steps are {', '.join(STEPS)}")
    if "pipeline" in steps and "decode" not in steps:
        steps.insert(0, "decode")
    mode = SMOKE if args.smoke else CUDA
    work = (args.work or ROOT / "gpu-data" / ("smoke" if args.smoke else "work")).resolve()
    if why := preflight(mode, args.mosaic.resolve()):
        print(why, file=sys.stderr)
        return 2
    results = work / "results" if args.smoke else ROOT / "bench" / "results"
    c = Check(mode, args.mosaic.resolve(), work, results, args.set, args.speed_args, args.export)
    work.mkdir(parents=True, exist_ok=True)
    earlier = json.loads((work / "gpu-check.json").read_text()) if (work / "gpu-check.json").exists() else {}
    argv = [a.replace(str(args.export), "OUT") if args.export else a for a in sys.argv[1:]]  # OUT: the machine's
    c.summary = {
        "mode": mode.name,
        **machine(mode),
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["python", "scripts/gpu_check.py", *argv]),
        "steps": earlier.get("steps", {}) if earlier.get("mode") == mode.name else {},
    }
    t_all = time.perf_counter()
    for step in sorted(steps, key=STEPS.index):
        print(f"[gpu_check] {step} ({time.perf_counter() - t_all:.0f} s in)", flush=True)
        t0 = time.perf_counter()
        try:
            status, details = RUNS[step](c)
            line = status
        except Failed as e:
            status, details, line = "failed", {**e.details, "error": str(e)}, f"FAILED: {e}"
        except Exception as e:  # a step that breaks unforeseen is recorded too, and the next one still runs
            status, details, line = "failed", {"error": f"{type(e).__name__}: {e}"}, f"FAILED: {type(e).__name__}: {e}"
        seconds = time.perf_counter() - t0
        c.summary["steps"][step] = {"status": status, "seconds": round(seconds, 1), **details}
        print(f"[gpu_check] {step}: {line} ({seconds:.0f} s)", flush=True)
        save(c)
    failed = [s for s in steps if c.summary["steps"][s]["status"] == "failed"]
    verdict = f"FAILED: {', '.join(failed)}" if failed else "every step passed"
    print(f"[gpu_check] {verdict} ({time.perf_counter() - t_all:.0f} s); summary: {work / 'gpu-check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
