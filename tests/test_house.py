"""The package's shape: every function reads on a screen or two, and the edge runtime (what a device runs) imports
no training library."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "prune2edge"
MAX_LINES = 60


def test_no_function_in_the_package_is_over_60_lines():
    long = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert not long, "split these into functions that each do one thing:\n" + "\n".join(long)


TRAINING = ("torch", "sklearn", "scipy", "matplotlib", "onnx", "pydantic", "yaml", "tensorflow", "openvino")


def test_the_runtime_imports_no_training_library():
    """Every module of prune2edge/runtime/, imported in a fresh interpreter, brings in none of :data:`TRAINING`
    (onnx, pydantic and yaml: not in the core install either)."""
    modules = sorted(
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in (PACKAGE / "runtime").rglob("*.py")
    )
    code = (
        f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(modules) >= 10 and not set(TRAINING) & set(json.loads(r.stdout)), r.stdout


def test_every_results_section_is_linked_from_the_summary():
    """docs/RESULTS.md: every ``##`` section, and every one of the superseded results in docs/RESULTS-history.md, is
    reachable from the Summary (GitHub's heading anchors)."""
    docs = PACKAGE.parent / "docs"
    text = (docs / "RESULTS.md").read_text()
    start = text.index("## Summary")
    summary = text[start : text.index("\n## ", start + 1)]
    unlinked = []
    for name in ("RESULTS.md", "RESULTS-history.md"):
        lines = (docs / name).read_text().splitlines()
        heads = [line[3:] for line in lines if line.startswith("## ") and line != "## Summary"]
        link = "#" if name == "RESULTS.md" else f"{name}#"
        anchors = {h: re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}
        unlinked += [f"{name}: {h}" for h, a in anchors.items() if f"({link}{a})" not in summary]
    assert len(summary) < 5000 and not unlinked, f"link these sections from the Summary of docs/RESULTS.md: {unlinked}"


def test_the_repository_tracks_no_environment_or_run_outputs():
    """What setup and runs make (the virtual environment, run directories, caches) is never committed: a tracked
    ``.venv`` link replaced the working environment of whoever checked it out."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=PACKAGE.parent, capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    made = [p for p in tracked if p.split("/")[0] in (".venv", "runs", ".pytest_cache", "gpu-data")]
    assert tracked and not made, f"remove these from git (git rm --cached): {made[:10]}"
