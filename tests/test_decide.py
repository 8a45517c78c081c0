"""Decisions that say how sure they are: the vote's margin and votes, `review` below a threshold chosen on validation
only, in the bundle, `predict`, and the fleet; risk–coverage, calibration, degradation and latency in metrics.json."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import prune2edge_cli
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
from test_fleet import Listener, broker, members, mosquitto_exe  # noqa: F401 (broker, mosquitto_exe: fixtures)

from prune2edge import UserError, cli, config, data, pipeline, records, selective, store
from prune2edge.runtime import latency
from prune2edge.runtime.bundle import Bundle, decode, read_manifest
from prune2edge.runtime.fleet import Broker, LocalFleet, Topics, dumps, encode_frame
from prune2edge.runtime.vote import decide, vote

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import decisions


def test_decide_reports_votes_margin_and_review():
    p = np.array(
        [
            [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]],  # member 0: class 0, class 1
            [[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]],  # member 1: class 0, class 0
            [[0.2, 0.7, 0.1], [0.2, 0.7, 0.1]],
        ]
    )  # member 2: class 1, class 1
    soft = decide(p, "soft", abstain_below=0.2)
    assert soft.classes.tolist() == [0, 1] and soft.votes.tolist() == [2, 2] and soft.members == 3
    assert np.allclose(soft.confidence, [0.5, 19 / 30]) and np.allclose(soft.margin, [0.5 - 0.4, 19 / 30 - 0.8 / 3])
    assert soft.review.tolist() == [True, False]
    hard = decide(p, "hard", abstain_below=0.5)
    assert hard.classes.tolist() == [0, 1] and np.allclose(hard.margin, [1 / 3, 1 / 3]) and hard.review.all()
    weighted = decide(p, "hard", weights=np.array([1.0, 1.0, 4.0]))  # member 2 outweighs the others
    assert weighted.classes.tolist() == [1, 1] and weighted.votes.tolist() == [1, 2]
    assert np.allclose(weighted.margin, [2 / 6, 4 / 6]) and not weighted.review.any()


def test_threshold_decides_the_most_frames_that_reach_the_target():
    score, right = np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 1, 0, 1, 0], bool)
    t = selective.choose_threshold(score, right, 0.75)  # the top 4 are 3/4 right
    assert t["abstain_below"] == 0.6 and t["val_coverage"] == 0.8 and t["val_accuracy"] == 0.75 and t["target_met"]
    assert selective.choose_threshold(score, right, 1.0)["abstain_below"] == 0.8
    assert selective.choose_threshold(score, np.ones(5, bool), 0.99)["abstain_below"] == 0.0  # all right: decide all
    tie = selective.choose_threshold(np.array([0.9, 0.9, 0.5]), np.array([1, 0, 1], bool), 0.9)  # ties go together
    assert not tie["target_met"] and tie["abstain_below"] == 0.0 and tie["val_accuracy"] == pytest.approx(2 / 3)
    assert selective.operating_point(score, right, 0.6) == {"coverage": 0.8, "accuracy": 0.75, "decided": 4, "n": 5}
    assert selective.operating_point(score, right, 0.95)["accuracy"] is None


def test_calibration_error_by_hand():
    conf = np.array([0.05, 0.5, 0.52, 0.95, 1.0, 1 / 15])
    right = np.array([0, 1, 0, 1, 1, 1], bool)
    # bins of width 1/15, (low, high]: {0.05, 1/15} in the first, {0.5, 0.52} in (7/15, 8/15], {0.95, 1.0} in the last
    expected = (2 * abs(0.5 - (0.05 + 1 / 15) / 2) + 2 * abs(0.5 - 0.51) + 2 * abs(1 - 0.975)) / 6
    assert selective.calibration_error(conf, right) == pytest.approx(expected)
    coverage, acc = selective.risk_coverage(np.array([0.2, 0.9, 0.5]), np.array([0, 1, 1], bool))
    assert coverage.tolist() == [1 / 3, 2 / 3, 1] and acc.tolist() == [1, 1, 2 / 3]


def test_bundle_decide_agrees_with_its_members(demo_run):
    b = Bundle.load(demo_run / "bundle")
    x = np.load(demo_run / "test.npz")["x"]
    members, scores = b.member_proba(x), b.predict_proba(x)
    top2 = np.sort(scores, 1)[:, -2:]
    cut = float(np.median(top2[:, 1] - top2[:, 0]))
    d = b.decide(x, cut)
    assert np.array_equal(d.classes, b.predict(x)) and np.array_equal(d.confidence, scores.max(1))
    assert np.array_equal(d.votes, (members.argmax(-1) == d.classes).sum(0)) and d.members == len(b.sessions)
    assert np.allclose(d.margin, top2[:, 1] - top2[:, 0]) and np.array_equal(d.review, d.margin < cut)
    assert 0 < d.review.sum() < len(x)
    manifest = read_manifest(demo_run / "bundle")
    assert b.decide(x[:5]).abstain_below == manifest["vote"]["abstain_below"] == b.threshold()
    with pytest.raises(
        UserError, match=r"abstain threshold \(--abstain-below\) is a margin of the vote, from 0 .* to 1; got 1.5"
    ):
        b.decide(x[:5], 1.5)


def test_a_bundle_without_a_threshold_decides_every_frame(demo_run, tmp_path):
    shutil.copytree(demo_run / "bundle", tmp_path / "bundle")
    manifest = read_manifest(tmp_path / "bundle")
    for key in ("abstain_below", "abstain", "agreement"):
        del manifest["vote"][key]
    (tmp_path / "bundle" / "manifest.json").write_text(json.dumps(manifest))
    d = Bundle.load(tmp_path / "bundle").decide(np.load(demo_run / "test.npz")["x"])
    assert d.abstain_below == 0.0 and not d.review.any()


def test_threshold_is_chosen_on_validation_only(demo_run, tmp_path):
    """The same run on data whose test labels and images are scrambled gets the same threshold; other validation
    labels give another one."""
    digits = data.load_digits()
    val = np.load(demo_run / "splits.npz")["val"]
    y_val_changed = digits.y_train.copy()
    y_val_changed[val[:30]] = (y_val_changed[val[:30]] + 1) % 10
    rng = np.random.default_rng(0)
    variants = {
        "same": (digits.x_test, digits.y_test, digits.y_train),
        "test scrambled": (
            rng.integers(0, 17, digits.x_test.shape).astype(np.uint8),
            rng.permutation(digits.y_test),
            digits.y_train,
        ),
        "validation changed": (digits.x_test, digits.y_test, y_val_changed),
    }
    selection = records.read_selection(demo_run)
    members_ = [records.read_member(demo_run, p.parent.name) for p in sorted((demo_run / "pool").glob("*/member.json"))]
    quant = {m.name: records.read_quantised(demo_run / "pool" / m.name) for m in members_}
    chosen = {}
    for name, (x_test, y_test, y_train) in variants.items():
        run = tmp_path / name.replace(" ", "-")
        run.mkdir()
        for f in ("splits.npz", "preprocess.json", "dataset.json"):
            shutil.copy(demo_run / f, run / f)
        shutil.copytree(demo_run / "pool", run / "pool")
        shutil.copytree(demo_run / "baseline", run / "baseline")
        np.savez(run / "data.npz", x_train=digits.x_train, y_train=y_train, x_test=x_test, y_test=y_test)
        cfg = config.load(
            demo_run / "config.yaml",
            {
                "data": {"name": "npz", "path": str(run / "data.npz")},
                "vote": {"target_accuracy": 0.999},
                "bundle": {"latency_runs": 3},
            },
        )
        (run / "config.yaml").write_text(config.yaml_text(cfg))
        chosen[name] = pipeline.make_bundle(run, cfg, selection, members_, quant)["vote"]["abstain"]
    assert chosen["same"]["target_accuracy"] == 0.999 and chosen["same"]["n_val"] == len(val)
    assert chosen["test scrambled"] == chosen["same"]
    assert chosen["validation changed"] != chosen["same"]


def test_metrics_hold_decisions_degradation_and_latency(demo_run):
    m, manifest = store.read_json(demo_run / "metrics.json"), read_manifest(demo_run / "bundle")
    cfg = config.load(demo_run / "config.yaml")
    y = np.load(demo_run / "test.npz")["y"]
    scores = np.load(demo_run / "test_scores.npz")
    d = m["decisions"]
    assert d["target_accuracy"] == cfg.vote.target_accuracy
    assert d["ensemble"]["threshold"] == manifest["vote"]["abstain"]  # evaluation and bundle: the same choice
    for name in ("ensemble", "baseline_fp32"):
        r, right = d[name], scores[name].argmax(1) == y
        assert r["curve"][-1] == {"coverage": 1.0, "accuracy": r["test_acc"]} and r["test_acc"] == right.mean()
        assert r["ece"] == pytest.approx(selective.calibration_error(scores[name].max(1), right))
        op = r["at_threshold"]
        assert 0 <= op["coverage"] <= 1 and op["n"] == len(y)
    g = m["degradation"]
    chosen = m["ensemble"]["members"]
    accs = [x["test_acc_int8"] for x in m["members"] if x["name"] in chosen]
    assert g["k"] == len(chosen) == len(g["rows"]) and [r["missing"] for r in g["rows"]] == list(range(len(chosen)))
    together = vote(scores["members"][[list(scores["names"]).index(n) for n in chosen]], m["ensemble"]["rule"])
    assert g["rows"][0]["mean"] == g["rows"][0]["min"] == (together.argmax(1) == y).mean()
    last = g["rows"][-1]
    assert last["subsets"] == len(chosen) and (last["min"], last["max"]) == (min(accs), max(accs))
    assert last["mean"] == pytest.approx(np.mean(accs))
    assert [r["subsets"] for r in g["rows"]] == [math.comb(len(chosen), j) for j in range(len(chosen))]
    assert (
        g["best_member"]["test_acc_int8"]
        == next(x for x in m["members"] if x["name"] == g["best_member"]["name"])["test_acc_int8"]
    )
    t = manifest["latency"]
    assert t["runs"] == cfg.bundle.latency_runs and t["batch"] == 1 and t["threads"] == 1
    assert t["onnxruntime"] == ort.__version__ and t["baseline_fp32_ms"] > 0 and t["baseline_int8_ms"] > 0
    assert all(0 < e["latency_ms"] < 1e4 for e in manifest["members"])
    assert m["latency"]["members"] == {e["id"]: e["latency_ms"] for e in manifest["members"]}


def test_latency_comes_from_running_the_model(demo_run):
    x = store.preprocessing(demo_run).apply(np.load(demo_run / "test.npz")["x"][:4])
    entry = read_manifest(demo_run / "bundle")["members"][0]
    shipped = decode((demo_run / "bundle" / entry["path"]).read_bytes())
    t = latency.measure({"member": shipped, "parent": demo_run / "baseline" / "int8.onnx"}, x, 3)
    assert set(t) == {"member", "parent"} and all(v > 0 for v in t.values())
    with pytest.raises(InvalidArgument, match="invalid dimensions"):  # ONNX Runtime runs the model on the images
        latency.measure({"parent": demo_run / "baseline" / "fp32.onnx"}, x[:, :, :4], 3)


def test_config_checks_the_new_keys():
    with pytest.raises(UserError, match=r"'vote.target_accuracy' must be null .* or an accuracy in \(0, 1\], got 1.5"):
        config.load(overrides={"vote": {"target_accuracy": 1.5}})
    with pytest.raises(UserError, match=r"'bundle\.latency_runs' must be a positive integer, got 0"):
        config.load(overrides={"bundle": {"latency_runs": 0}})
    assert config.load(overrides={"vote": {"target_accuracy": None}}).vote.target_accuracy is None


def test_predict_cli_marks_review(demo_run):
    bundle, test = demo_run / "bundle", demo_run / "test.npz"
    b = Bundle.load(bundle)
    x = np.load(test)["x"]
    margins = b.decide(x).margin
    cut = float(np.quantile(margins, 0.1))
    r = prune2edge_cli("predict", str(bundle), str(test), "--json", "--abstain-below", str(cut))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == len(x) and {"review", "decided"} == {row["status"] for row in rows}
    for row, k, mg in zip(rows, b.predict(x), margins):
        assert row["status"] == ("review" if mg < cut else "decided") and row["margin"] == round(float(mg), 4)
        assert row["class"] == (None if mg < cut else k) and 1 <= row["votes"] <= row["members"] == len(b.sessions)
    default = prune2edge_cli("predict", str(bundle), f"{test}", "--json")
    assert {json.loads(line)["abstain_below"] for line in default.stdout.splitlines()} == {b.threshold()}
    bad = prune2edge_cli("predict", str(bundle), str(test), "--abstain-below", "2")
    assert bad.returncode == 2 and "abstain threshold (--abstain-below) is a margin of the vote" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.broker
def test_fleet_sends_a_split_vote_to_review(demo_run, broker, tmp_path):  # noqa: F811 (the fixture)
    bundle = demo_run / "bundle"
    ids = members(bundle)[:2]
    sha = {e["id"]: e["sha256"] for e in read_manifest(bundle)["members"]}
    t, url = Topics("abstain"), Broker.parse(broker.url)
    lf = LocalFleet(bundle, url, "abstain", members=ids, timeout_ms=2000, workdir=tmp_path / "fleet", abstain_below=0.5)
    lf.spawn("aggregator")  # no nodes: the test plays them
    try:
        lf.wait_ready(roles=["aggregator"])
        listener = Listener(url, [t.results, t.aggregator])
        for frame, classes in (("f-split", (3, 5)), ("f-agree", (3, 3))):
            listener.link.publish(t.frames, encode_frame(frame, np.zeros((8, 8, 1), np.uint8)))
            for member, k in zip(ids, classes):
                p = np.full(10, 0.02)
                p[k] = 0.82
                listener.link.publish(
                    t.votes,
                    dumps(
                        {"frame": frame, "member": member, "proba": p.tolist(), "sha256": sha[member], "infer_ms": 1.0}
                    ),
                )
        listener.wait(lambda: {"f-split", "f-agree"} <= {r["frame"] for r in listener.on(t.results)})
        res = {r["frame"]: r for r in listener.on(t.results)}
        split, agree = res["f-split"], res["f-agree"]
        assert split["status"] == "review" and split["class"] is None and split["label"] is None
        assert split["votes"] == 1 and split["margin"] == 0 and split["confidence"] == pytest.approx(0.42)
        assert agree["status"] == "decided" and agree["class"] == 3 and agree["votes"] == 2
        assert agree["margin"] == pytest.approx(0.8) and agree["abstain_below"] == 0.5
        assert listener.on(t.aggregator)[-1]["abstain_below"] == 0.5
        listener.link.stop()
    finally:
        lf.stop()


def test_bench_numbers_are_the_runs_own(demo_run):
    """bench/decisions.py measures a finished run with the pipeline's functions: at the config's target it gets the
    run's own metrics.json numbers, and it writes a section from them."""
    m = store.read_json(demo_run / "metrics.json")
    target = m["decisions"]["target_accuracy"]
    run = decisions.measure_run(demo_run, [0.5, target], cli.DEMO_CONFIG)
    assert run["config_differences"] == []
    for name, _ in decisions.MODELS:
        assert run["targets"][f"{target:g}"][name] == {
            k: m["decisions"][name][k] for k in ("threshold", "at_threshold")
        }
        assert run[name]["ece"] == m["decisions"][name]["ece"]
    assert run["degradation"]["missing"]["0"] == m["degradation"]["rows"][0]
    assert decisions.differences(
        config.load(demo_run / "config.yaml", {"vote": {"rule": "hard"}}), cli.DEMO_CONFIG
    ) == ["vote.rule: 'soft' -> 'hard'"]
    result = {
        "title": "## Decisions: test",
        "runs_dir": "x",
        "reference": "demo.yaml",
        "seeds": [0],
        "targets": [0.5, target],
        "default_target": target,
        "machine": "m",
        "date": "d",
        "command": "c",
        "results_file": "r",
        "runs": {"0": run},
        "aggregate": decisions.aggregate({"0": run}),
    }
    text = decisions.markdown(result)
    assert f"| {target:g} (default) | ensemble (vote margin) |" in text and "(every setting)" in text
