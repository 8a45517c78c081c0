"""What every bench script shares: where things are, what a result records about how it was made, one command-line
style, and writing results files and sections of docs/RESULTS.md (or of the README, for its generated sections).

A bench script is run as ``python bench/X.py`` (which puts bench/ on ``sys.path``, so ``from common import ...``
and the other benches import as siblings) and imports ``prune2edge`` as installed (``pip install -e .``, or the
repository root on ``PYTHONPATH``); none of them edits ``sys.path``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"  # every bench's numbers, as JSON
RESULTS_MD = ROOT / "docs" / "RESULTS.md"  # every bench's section
README = ROOT / "README.md"  # its generated sections: bench/frontier.py
CONFIG = ROOT / "configs" / "cifar10-cpu.yaml"  # the default config of the CIFAR-10 benches
DATA = ROOT.parent / "shared" / "data" / "cifar10"  # where the CIFAR-10 benches look for the npz parts


# ---------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------


def argparser(description: str | None, *, docs: bool = True) -> argparse.ArgumentParser:
    """A bench's parser: its module docstring as the help text (layout kept) and, for a bench that writes a section
    of docs/RESULTS.md (``docs``), ``--no-docs``."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if docs:
        ap.add_argument("--no-docs", action="store_true", help="do not touch docs/RESULTS.md")
    return ap


def seed_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (blanks ignored)."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, got '{text}'") from None


def add_seeds(ap: argparse.ArgumentParser, default: str = "0,1,2") -> None:
    """``--seeds``, read as a list of integers."""
    ap.add_argument("--seeds", type=seed_list, default=default, help=f"comma-separated seeds (default {default})")


def add_config(ap: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--config``, by default configs/cifar10-cpu.yaml."""
    ap.add_argument("--config", default=str(CONFIG), help=help or f"the config (default {rel(CONFIG)})")


def add_data(ap: argparse.ArgumentParser) -> None:
    """``--data``: the folder of the CIFAR-10 npz parts."""
    ap.add_argument("--data", default=str(DATA), help="folder holding the CIFAR-10 .npz parts")


def data_paths(folder: str) -> list[str]:
    """The npz files of a ``--data`` folder, sorted; exits with a message where there are none."""
    paths = sorted(glob.glob(os.path.join(folder, "*.npz")))
    if not paths:
        sys.exit(f"no .npz files in '{folder}' (pass --data DIR holding the CIFAR-10 npz parts)")
    return paths


# ---------------------------------------------------------------------------------------------------------------
# what a result records
# ---------------------------------------------------------------------------------------------------------------


def rel(path: str | Path) -> str:
    """A path as written into results: relative to the repository, so the JSON names nothing of this machine."""
    return os.path.relpath(path, ROOT)


def command_line() -> str:
    """How this script was invoked, as written into results (``OMP_NUM_THREADS`` included when set)."""
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return (threads + f"python {rel(sys.argv[0])} " + shlex.join(sys.argv[1:])).strip()


def cpu_model() -> str:
    """The CPU's model name (from ``lscpu``), or ``unknown CPU``."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except (OSError, subprocess.CalledProcessError, AttributeError):
        return "unknown CPU"


def machine() -> str:
    """The machine as a result names it: CPU model and core count."""
    return f"{cpu_model()}, {os.cpu_count()} cores"


# ---------------------------------------------------------------------------------------------------------------
# numbers over seeds
# ---------------------------------------------------------------------------------------------------------------


def shipped_bytes(sizes: dict) -> int:
    """A model's bytes as shipped: ``shipped`` where its record has it, else int8 + gzip."""
    return sizes.get("shipped", sizes["int8_gzip"])


def _scalars(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def aggregate(runs: dict[str, dict]) -> dict:
    """mean and sd (n - 1) over seeds of every scalar field the runs share."""
    flat = [_scalars(r) for r in runs.values()]
    keys = [k for k in flat[0] if all(k in f for f in flat)]
    return {
        k: {
            "mean": statistics.mean(f[k] for f in flat),
            "sd": statistics.stdev(f[k] for f in flat) if len(flat) > 1 else 0.0,
        }
        for k in keys
    }


def pm(agg: dict, key: str, scale: float = 100, digits: int = 2) -> str:
    """``mean ± sd`` of an aggregated number, scaled; ``n/a`` where it is missing."""
    if key not in agg:
        return "n/a"
    return f"{scale * agg[key]['mean']:.{digits}f} ± {scale * agg[key]['sd']:.{digits}f}"


# ---------------------------------------------------------------------------------------------------------------
# writing results and sections
# ---------------------------------------------------------------------------------------------------------------


def write_result(path: Path, result: dict) -> None:
    """A bench's numbers as JSON under bench/results/."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def publish(title: str, text: str, docs: bool = True) -> None:
    """Print a bench's markdown and, with ``docs``, make it the ``title`` section of docs/RESULTS.md."""
    print(text)
    if docs:
        replace_section(RESULTS_MD, title, text)


def replace_section(path: Path, title: str, text: str) -> None:
    """Replace the section that starts with ``title`` (up to the next ``## ``), or append it."""
    old = path.read_text() if path.exists() else "# Results\n"
    parts = re.split(r"(?m)^(?=## )", old)
    for i, p in enumerate(parts):
        if p.splitlines()[0].strip() == title if p.strip() else False:
            parts[i] = text + "\n"
            break
    else:
        parts.append(("\n" if not old.endswith("\n\n") else "") + text + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts))
