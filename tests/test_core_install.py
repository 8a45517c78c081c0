"""The core install (`pip install .`, no extras) is what runs a bundle and a fleet node: a fresh virtual environment
that has neither torch nor scikit-learn, scipy, matplotlib or onnx runs `prune2edge predict` and a fleet of
`prune2edge node` processes on a real bundle against a real Mosquitto, and the commands that train name the extra
they need. The bundle is made here, by the shared demo run, with the training code of the environment under test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_fleet import mosquitto_exe  # noqa: F401 (the fixture: fails when Mosquitto is not installed)

from prune2edge.cli import NEEDS_TRAIN, TRAINING_MODULES
from prune2edge.runtime.bundle import Bundle, read_manifest
from prune2edge.runtime.fleet import Broker, Link, Mosquitto, Topics

pytestmark = [pytest.mark.venv, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
# what `pip install .` brings, and prune2edge
CORE = {"numpy", "onnxruntime", "paho-mqtt", "click", "pillow", "cryptography"}


def run(*args, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> Path:
    """A fresh virtual environment holding `pip install <this repository>` and nothing else; its bin/ folder."""
    tmp = tmp_path_factory.mktemp("core-install")
    src = tmp / "src"  # a copy of the sources: pip builds in the tree it is given (build/, *.egg-info)
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "prune2edge", src / "prune2edge", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp / "venv"
    start = time.monotonic()
    # No pip of its own (ensurepip takes seconds): this environment's pip installs into it. pip still builds the
    # package in an isolated build environment and takes every dependency from the index, as `pip install .` does;
    # --no-compile leaves the .pyc files of numpy and onnxruntime to be written on use (half the time).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    r = run(
        sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--quiet", "--no-compile",
        "--disable-pip-version-check", src,
        timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    site = next((venv / "lib").glob("python3*/site-packages"))
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    print(f"\ncore install: {time.monotonic() - start:.1f} s, {size / 2**20:.0f} MiB in site-packages")
    return venv / "bin"


def test_the_core_install_holds_no_training_package(core):
    code = (
        "import importlib.metadata as md, importlib.util as u, json, sys\n"
        "import prune2edge, prune2edge.runtime.bundle, prune2edge.runtime.fleet, prune2edge.cli\n"
        "print(json.dumps({'found': [m for m in sys.argv[1:] if u.find_spec(m)],\n"
        "                  'dists': sorted(d.metadata['Name'].lower() for d in md.distributions())}))\n"
    )
    r = run(core / "python", "-c", code, *TRAINING_MODULES)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["found"] == [], f"the core install has training packages: {got['found']}"
    assert CORE | {"prune2edge"} <= set(got["dists"]), got["dists"]
    assert not {"torch", "scikit-learn", "scipy", "matplotlib", "onnx"} & set(got["dists"]), got["dists"]


def test_predict_on_the_core_install(core, demo_run, tmp_path):
    bundle = Bundle.load(demo_run / "bundle")  # here, with the training environment's prune2edge
    x = np.load(demo_run / "test.npz")["x"][:60, :, :, 0]  # grey digits, 8x8, as a camera would save them
    np.savez(tmp_path / "frames.npz", x=x)
    Image.fromarray(x[0]).save(tmp_path / "frame.png")
    r = run(core / "prune2edge", "predict", demo_run / "bundle", "frame.png", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r2 = run(core / "prune2edge", "predict", demo_run / "bundle", "frames.npz", "--json", cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    rows = [json.loads(line) for line in (r.stdout + r2.stdout).splitlines()]
    assert [row["input"] for row in rows] == ["frame.png"] + [f"frames.npz[{i}]" for i in range(len(x))]
    d = bundle.decide(np.concatenate([x[:1], x]))
    assert [row["status"] for row in rows] == ["review" if v else "decided" for v in d.review]
    assert [row["class"] for row in rows] == [None if v else int(k) for k, v in zip(d.classes, d.review)]
    assert [row["label"] for row in rows] == [None if v else bundle.classes[k] for k, v in zip(d.classes, d.review)]
    assert [row["votes"] for row in rows] == d.votes.tolist()
    assert [row["margin"] for row in rows] == [round(float(m), 4) for m in d.margin]


def test_a_fleet_of_core_install_nodes_classifies_like_the_bundle(core, demo_run, tmp_path, mosquitto_exe):  # noqa: F811
    """`prune2edge fleet` of the core install: one `prune2edge node` process per member (started with the core
    install's Python) and an aggregator, on a real Mosquitto; every decision is the offline ensemble's."""
    bundle = demo_run / "bundle"
    z = np.load(demo_run / "test.npz")
    x, y = z["x"][:120], z["y"][:120]
    np.savez(tmp_path / "frames.npz", x=x, y=y)
    out = tmp_path / "decisions.jsonl"
    with Mosquitto(tmp_path / "broker") as broker:
        r = run(
            core / "prune2edge", "fleet", bundle, "--broker", broker.url, "--fleet", "core",
            "--classify", tmp_path / "frames.npz", "--out", out,
            timeout=180,
        )  # fmt: skip
    assert r.returncode == 0, r.stderr
    ids = [e["id"] for e in read_manifest(bundle)["members"]]
    assert f"fleet 'core': {len(ids)} nodes ({', '.join(ids)}) and an aggregator on {broker.url}" in r.stderr
    got = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda row: row["index"])
    assert [row["index"] for row in got] == list(range(len(x)))
    assert all(row["voted"] == ids for row in got), "every node voted on every frame"
    d = Bundle.load(bundle).decide(x)
    assert [row["status"] for row in got] == ["review" if v else "decided" for v in d.review]
    assert [row["class"] for row in got] == [None if v else int(k) for k, v in zip(d.classes, d.review)]
    assert f"{len(x)} frames: {int((~d.review).sum())} decided, {int(d.review.sum())} to review" in r.stderr


def test_a_deployed_node_of_the_core_install_takes_a_signed_version(core, demo_run, tmp_path, mosquitto_exe):  # noqa: F811
    """`prune2edge node --trust --store` of the core install starts empty, receives a version signed with an ed25519
    key that openssl made (published over the broker by the training environment), checks it and runs it."""
    if not shutil.which("openssl"):
        pytest.fail("openssl is needed to make the test key")
    key, pub = tmp_path / "release.pem", tmp_path / "release.pub.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", key], check=True)
    subprocess.run(["openssl", "pkey", "-in", key, "-pubout", "-out", pub], check=True)
    member = read_manifest(demo_run / "bundle")["members"][0]["id"]
    statuses: list[dict] = []
    with Mosquitto(tmp_path / "broker") as broker:
        fleet = ["--broker", broker.url, "--fleet", "core"]
        watch = Link(
            Broker.parse(broker.url), "test-core-watch", [Topics("core").status("d1")],
            lambda _, payload: statuses.append(json.loads(payload) if payload else {}),
        ).start()  # fmt: skip
        (tmp_path / "d1").mkdir()
        node = subprocess.Popen(
            [core / "prune2edge", "node", "--trust", pub, "--store", "store", "--device", "d1", *fleet],
            cwd=tmp_path / "d1", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            publish = [sys.executable, "-m", "prune2edge.cli", "publish", demo_run / "bundle", "--key", key]
            r = subprocess.run([*publish, "--assign", f"d1={member}", *fleet], capture_output=True, text=True)
            assert r.returncode == 0 and "version 1 published" in r.stderr, r.stderr
            deadline = time.monotonic() + 60
            while not any(st.get("running") == [1] for st in statuses):
                assert time.monotonic() < deadline and node.poll() is None, f"no version 1 on d1: {statuses}"
                time.sleep(0.05)
        finally:
            node.terminate()
            out = node.communicate(timeout=30)[0]
            watch.stop()
    running = next(st for st in statuses if st.get("running") == [1])
    assert running["models"]["1"]["member"] == member and "version 1 ready" in out, out
    assert (tmp_path / "d1" / "store").is_dir()


@pytest.mark.parametrize(
    "args",
    [
        ["demo"],
        ["run", "my.yaml"],
        ["evaluate", "BUNDLE", "--data", "npz:frames.npz"],
        ["report", "RUN"],
        ["classify", "digits", "--broker", "mqtt://127.0.0.1:9"],  # a dataset of scikit-learn's
    ],
    ids=lambda args: args[0],
)
def test_what_needs_training_says_which_extra(core, demo_run, tmp_path, args):
    np.savez(tmp_path / "frames.npz", x_test=np.zeros((2, 8, 8), np.uint8), y_test=np.zeros(2, np.int64))
    args = [{"BUNDLE": demo_run / "bundle", "RUN": demo_run}.get(a, a) for a in args]
    r = run(core / "prune2edge", *args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith(f"error: {NEEDS_TRAIN} (") and r.stderr.endswith(" is not installed)\n"), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("runtime", ["openvino", "reference"])
def test_a_node_without_its_runtime_says_which_extra(core, demo_run, runtime):
    member = read_manifest(demo_run / "bundle")["members"][0]["id"]
    r = run(
        core / "prune2edge", "node", demo_run / "bundle", "--member", member, "--runtime", runtime,
        "--broker", "mqtt://127.0.0.1:9",
    )  # fmt: skip
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr == f"error: runtime '{runtime}' is not installed here: pip install 'prune2edge[{runtime}]'\n"
