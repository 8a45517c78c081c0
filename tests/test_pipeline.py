"""End to end: the demo meets its targets, the CLI re-scores it, and a killed run resumes to identical metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import prune2edge_cli

from prune2edge import UserError, cli, config, data, pipeline, store, summary


def test_demo_run_meets_its_targets(demo_run):
    m = store.read_json(demo_run / "metrics.json")
    base, ens = m["baseline"], m["ensemble"]
    assert ens["test_acc"] >= base["test_acc_fp32"] - 0.005, "ensemble more than 0.5 points under the fp32 baseline"
    kept = [x for x in m["members"] if x["status"] == "ok"]
    assert len(kept) >= ens["k"] >= 2
    for member in m["members"]:
        assert member["full_integer"]
        assert member["sparsity_measured"] >= member["sparsity_target"] - 0.01
        # as shipped: the int8 parent (m000) about a quarter of its fp32 bytes, a 4-bit member about an eighth
        assert member["bytes"]["shipped"] < (0.3 if member["plan"]["parent"] else 0.15) * base["bytes"]["fp32"]
    assert ens["bytes"]["int8_gzip"] == sum(x["bytes"]["int8_gzip"] for x in m["members"] if x["selected"])
    assert set(m["strategies"]) == {"accuracy-first", "diversity-first", "top-k", "random", "greedy"}
    assert 0 <= ens["mcnemar_p_vs_baseline_fp32"] <= 1
    assert m["shipped"]["val_acc"] >= base["val_acc_int8"]  # never less than the int8 parent on validation


def test_run_records_splits_and_the_scored_test_set(demo_run):
    splits = np.load(demo_run / "splits.npz")
    assert not set(splits["train"]) & set(splits["val"])
    info = store.read_json(demo_run / "dataset.json")
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (
        info["n_train"],
        info["n_val"],
        info["n_test"],
    )
    test = np.load(demo_run / "test.npz")
    assert test["x"].shape == (450, 8, 8, 1) and test["x"].dtype == np.uint8 and len(test["y"]) == 450
    for name in (
        "config.yaml",
        "preprocess.json",
        "baseline/model.pt",
        "baseline/fp32.onnx",
        "selection.json",
        "timings.json",
    ):
        assert (demo_run / name).exists(), name
    umask = os.umask(0)
    os.umask(umask)
    for name in ("metrics.json", "report.html", "bundle/manifest.json"):  # readable as open() would make them, not 0600
        assert (demo_run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_cli_evaluate_and_predict_match_the_run(demo_run, tmp_path):
    m = store.read_json(demo_run / "metrics.json")
    out = prune2edge_cli("evaluate", str(demo_run / "bundle"), "--data", "digits")
    assert out.returncode == 0 and "warning" not in out.stderr, out.stderr
    assert f"ensemble test accuracy: {m['shipped']['test_acc']:.4f} on 450 images" in out.stdout
    test = np.load(demo_run / "test.npz")
    np.save(tmp_path / "few.npy", test["x"][:5])
    out = prune2edge_cli("predict", str(demo_run / "bundle"), str(tmp_path / "few.npy"), "--json")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    scores = np.load(demo_run / "test_scores.npz")["ensemble"][:5]
    assert [r["class"] for r in rows] == scores.argmax(1).tolist()


SMALL = {
    "seed": 1,
    "data": {"name": "digits"},
    "model": {"arch": "small_cnn", "kwargs": {"width": 8, "depth": 2}},
    "train": {"epochs": 4, "batch_size": 64},
    "pool": {"size": 6, "sparsity": [0.6, 0.8], "epochs": [2, 3], "lr": [0.01, 0.03], "batch_size": [32]},
    "cluster": {"k": 3},
}


def comparable(metrics: dict) -> dict:
    """Metrics without wall-clock times (phase timings, measured latencies and memory, the pool's seconds)."""
    clock = ("median_seconds", "seconds", "parent_seconds", "vs_parent_time")
    macs = {n: c["macs"] for n, c in metrics["cost"]["members"].items()}  # counted, not timed: must be the same
    metrics = dict(
        metrics,
        timings=None,
        latency=None,
        cost=macs,
        pool={k: v for k, v in metrics["pool"].items() if k not in clock},
    )
    metrics["members"] = [dict(x, fine_tune_seconds=None) for x in metrics["members"]]
    return metrics


@pytest.mark.slow
def test_kill_mid_pool_then_rerun_gives_identical_metrics(tmp_path):
    # one thread in every process: CPU training is bit-identical for a given thread count only, and without it each
    # run takes the cores that are free when it starts (one in CI beside the other worker, or two)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    ref = prune2edge_cli("run", str(cfg), "--out", str(tmp_path / "ref"), "--quiet", env=env)
    assert ref.returncode == 0, ref.stderr
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prune2edge.cli", "run", str(cfg), "--out", str(run_dir), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 240
    while not (run_dir / "pool" / "m001" / "member.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended or stalled before the pool"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name for p in (run_dir / "pool").iterdir() if (p / "member.json").exists()}
    assert 2 <= len(done) < 6 and not (run_dir / "metrics.json").exists()
    before = {n: (run_dir / "pool" / n / "model.pt").stat().st_mtime_ns for n in done}
    again = prune2edge_cli("run", str(cfg), "--out", str(run_dir), "--quiet", env=env)
    assert again.returncode == 0, again.stderr
    assert {n: (run_dir / "pool" / n / "model.pt").stat().st_mtime_ns for n in done} == before  # not recomputed
    assert comparable(store.read_json(run_dir / "metrics.json")) == comparable(
        store.read_json(tmp_path / "ref" / "metrics.json")
    )
    # the pool's time counts the members trained before the kill too
    member_seconds = sum(store.read_json(f)["seconds"] for f in (run_dir / "pool").glob("*/member.json"))
    assert store.read_json(run_dir / "timings.json")["pool"] >= member_seconds
    # a run directory belongs to one config
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**SMALL, "seed": 2}))
    out = prune2edge_cli("run", str(changed), "--out", str(run_dir))
    assert (
        out.returncode == 2
        and "holds a run with a different config (seed: 1 -> 2, from that run's to this one)" in out.stderr
    )


@pytest.mark.parametrize(
    "config_text, message",
    [
        ("pool: {sizee: 3}", "unknown config key 'pool.sizee'; known keys in pool: size,"),
        ("pool: {sparsity: [0.5, 1.0]}", "config key 'pool.sparsity' must lie in [0.0, 1.0)"),
        ("pool: {sparsity: -0.1}", "config key 'pool.sparsity' must lie in [0.0, 1.0)"),
        ("pool: {size: 4}\ncluster: {k: 6}", "'cluster.k' is 6, larger than the pool (pool.size = 4)"),
        ("select: {strategy: best}", "config key 'select.strategy' must be one of ['accuracy-first'"),
        ("data: {name: npz, path: /nonexistent/x.npz}", "npz file not found: '/nonexistent/x.npz'"),
        (
            "data: {name: cifar10, path: /nonexistent}",
            "cifar10 not found: expected '/nonexistent/cifar-10-batches-py/data_batch_1'",
        ),
        ("model: {arch: keras_cifar10_cnn}", "keras_cifar10_cnn needs images of at least 10x10, got (8, 8)"),
        ("model: {arch: nosuchmodule:make}", "cannot import model factory 'nosuchmodule:make'"),
        ("pool: [1, 2]", "config key 'pool' must be a mapping"),
        (":\n  - ]", "is not valid YAML"),
    ],
)
def test_bad_config_gets_a_clear_error_without_traceback(tmp_path, config_text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(config_text)
    out = prune2edge_cli("run", str(cfg), "--out", str(tmp_path / "run"))
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_bad_dataset_files_get_a_clear_error(tmp_path):
    np.savez(
        tmp_path / "labels.npz",
        x_train=np.zeros((20, 8, 8), np.uint8),
        y_train=np.arange(20) % 12,
        x_test=np.zeros((4, 8, 8), np.uint8),
        y_test=np.arange(4),
        label_names=np.array(list("abcdefghij")),
    )
    (tmp_path / "corrupt.npz").write_bytes(b"\x00" * 100)
    for name, message in (
        ("labels.npz", "train labels out of range: found 0..11, expected 0..9 (10 classes)"),
        ("corrupt.npz", "cannot read npz file"),
    ):
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(yaml.safe_dump({"data": {"name": "npz", "path": str(tmp_path / name)}}))
        out = prune2edge_cli("run", str(cfg), "--out", str(tmp_path / name / "run"))
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_bad_inputs_to_predict(demo_run, tmp_path):
    np.save(tmp_path / "wrong.npy", np.zeros((3, 9, 9), np.uint8))
    out = prune2edge_cli("predict", str(demo_run / "bundle"), str(tmp_path / "wrong.npy"))
    assert out.returncode == 2 and "images have shape (3, 9, 9) but the model takes (8, 8, 1)" in out.stderr
    import shutil

    shutil.copytree(demo_run / "bundle", tmp_path / "bundle")
    victim = sorted((tmp_path / "bundle" / "members").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    np.save(tmp_path / "ok.npy", np.zeros((1, 8, 8), np.uint8))
    out = prune2edge_cli("predict", str(tmp_path / "bundle"), str(tmp_path / "ok.npy"))
    assert out.returncode == 2 and f"member '{victim.stem}' was altered" in out.stderr and "Traceback" not in out.stderr
    out = prune2edge_cli("predict", str(tmp_path), str(tmp_path / "ok.npy"))
    assert out.returncode == 2 and "is not a bundle: no manifest.json" in out.stderr


def invoke(*args: str):
    """The real command line, in this process (faster than a subprocess for many small error cases)."""
    return CliRunner().invoke(cli.main, list(args))


def truncated_npz(path):
    x = np.random.default_rng(0).integers(0, 256, (400, 8, 8), dtype=np.uint8)
    np.savez_compressed(path, x=x, y=np.arange(400) % 10)
    path.write_bytes(path.read_bytes()[:3000])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text("x_train,y_train\n1,2\n"), "it is not a numpy .npz or .npy file but a text file"),
        (lambda p: p.write_bytes(b"\x00" * 64), "it is not a numpy .npz or .npy file but a file that starts with"),
        (truncated_npz, "it is truncated or damaged; write or copy it again"),
    ],
)
def test_a_bad_npz_gets_a_clear_error_in_every_command(demo_run, tmp_path, make, message):
    bad = tmp_path / "bad.npz"
    make(bad)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"name": "npz", "path": str(bad)}}))
    bundle = str(demo_run / "bundle")
    for args in (
        ["run", str(cfg), "--out", str(tmp_path / "run")],
        ["evaluate", bundle, "--data", f"npz:{bad}"],
        ["predict", bundle, str(bad)],
        ["classify", "--broker", "mqtt://127.0.0.1:9", str(bad)],
    ):
        out = invoke(*args)
        assert out.exit_code == 2 and f"cannot read npz file '{bad}'" in out.stderr and message in out.stderr, (
            args,
            out.stderr,
        )


def test_evaluate_refuses_other_classes_and_warns_at_chance(demo_run, tmp_path):
    d = data.load_digits()
    bundle = str(demo_run / "bundle")

    def evaluate_on(name: str, **arrays):
        np.savez(
            tmp_path / name,
            **{"x_train": d.x_train, "y_train": d.y_train, "x_test": d.x_test, "y_test": d.y_test, **arrays},
        )
        return invoke("evaluate", bundle, "--data", f"npz:{tmp_path / name}")

    out = evaluate_on("pets.npz", y_train=d.y_train % 2, y_test=d.y_test % 2, label_names=np.array(["cat", "dog"]))
    assert (
        out.exit_code == 2
        and "the data's 2 classes are not the model's 10: the data has cat, dog, the model 0, 1, 2" in out.stderr
    )
    out = evaluate_on("reordered.npz", label_names=np.array(list("1023456789")))
    assert out.exit_code == 2 and "the model's classes in another order (data: 1, 0, 2" in out.stderr
    out = evaluate_on("twelve.npz", y_test=np.where(d.y_test == 9, 11, d.y_test))
    assert out.exit_code == 2 and "the data's labels run 0..11, but the model has 10 classes" in out.stderr
    out = evaluate_on("shifted.npz", y_test=(d.y_test + 1) % 10)  # numbered classes, in another order
    assert out.exit_code == 2 and "the data names no classes and test accuracy 0.0" in out.stderr
    assert "no better than chance (0.1022" in out.stderr and "pass --same-classes" in out.stderr
    out = invoke("evaluate", bundle, "--data", f"npz:{tmp_path / 'shifted.npz'}", "--same-classes")
    assert out.exit_code == 0 and "ensemble test accuracy: 0.0" in out.stdout
    assert "warning: test accuracy 0.0" in out.stderr and "no better than chance (0.1022" in out.stderr
    assert "Likely causes: the data orders its classes differently from the bundle" in out.stderr
    out = evaluate_on("two.npz", y_test=d.y_test % 2)  # unnamed labels of 2 classes cannot be the bundle's 10
    assert out.exit_code == 2 and "its labels hold 2 of the bundle's 10 (0, 1, 2" in out.stderr
    out = invoke("evaluate", bundle, "--data", str(tmp_path / "shifted.npz"))
    assert out.exit_code == 2 and f"write 'npz:{tmp_path / 'shifted.npz'}'" in out.stderr


def test_evaluate_says_what_it_scored(demo_run, tmp_path):
    d = data.load_digits()
    np.savez(tmp_path / "frames.npz", x=d.x_test, y=d.y_test)
    n, bundle, frames = len(d.y_test), str(demo_run / "bundle"), f"npz:{tmp_path / 'frames.npz'}"
    carved = len(data.carve_indices(d.y_test, data.TEST_FRACTION, "frames")[1])
    out = invoke("evaluate", bundle, "--data", frames)
    assert out.exit_code == 0 and out.stdout.startswith(f"scored: {carved} of the data's {n} images: it has no test")
    assert "--all scores every image\n" in out.stdout and f"on {carved} images" in out.stdout
    out = invoke("evaluate", bundle, "--data", frames, "--all")
    assert out.stdout.splitlines()[0] == f"scored: all {n} images of the data (it has no test split)"
    assert f"on {n} images" in out.stdout
    out = invoke("evaluate", bundle, "--data", "digits")
    assert out.stdout.splitlines()[0] == f"scored: the data's test split, {n} images"


def test_copies_across_splits_are_reported_in_dataset_json_and_the_summary(demo_run, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 8, 8), dtype=np.uint8)
    x[50:56] = x[:6]  # six images saved twice
    np.savez(tmp_path / "parts.npz", x=x, y=np.arange(60) % 3)
    cfg = config.load(None, {"data": {"name": "npz", "path": str(tmp_path / "parts.npz")}})
    pipeline.prepare(tmp_path / "run", cfg)
    info = store.read_json(tmp_path / "run" / "dataset.json")
    splits = np.load(tmp_path / "run" / "splits.npz")
    assert info["test_split"] == "carved: 0.2 of the source, stratified, seed 0" and len(splits["carved_test"]) == 12
    test = set(splits["carved_test"].tolist())
    train = set(
        np.setdiff1d(np.arange(60), splits["carved_test"])[np.concatenate([splits["train"], splits["val"]])].tolist()
    )
    crossing = sum((a in test) != (b in test) for a, b in zip(range(6), range(50, 56)))  # the copies split train/test
    assert crossing and info["duplicates"]["train/test"] + info["duplicates"]["val/test"] == crossing
    assert len(train | test) == 60
    [w] = info["warnings"]
    assert w["kind"] == "duplicates" and "exact copies across the splits" in w["message"]
    m = store.read_json(demo_run / "metrics.json")
    assert f"WARNING: {w['message']}" in summary.table(dict(m, dataset=info))  # the run's summary shows it
    np.savez(tmp_path / "run" / "splits.npz", **dict(splits, carved_test=splits["carved_test"][::-1]))
    with pytest.raises(UserError, match="the test split carved from the data now differs from the one"):
        store.dataset(str(tmp_path / "run"))
