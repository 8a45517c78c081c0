"""Benchmark reference rows (bench/reference.py) on two tiny real runs of the digits demo config: the deep ensemble
is the soft vote of the seeds' fp32 baselines, the compute-matched baseline trains the asked epochs from the baseline
once and is read from its cache after, one member is the shipped k = 1 pick, and the ablation table takes the rows."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prune2edge import cli, config, pipeline, report, store, train
from prune2edge.runtime.bundle import predict_proba, session
from prune2edge.runtime.vote import accuracy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import ablations
import cifar10
import reference

pytestmark = pytest.mark.slow  # every test here reads two real runs made for this module

TINY = {
    "model": {"kwargs": {"width": 8, "depth": 2}},
    "train": {"epochs": 2},
    # two pruned clones of half an epoch each, no floor
    "pool": {"family": "clones", "size": 2, "epochs": [0.5, 0.5], "min_steps": 0, "distill": 0.0},
    "cluster": {"k": 2, "k_max": 2},
    "quantize": {"calibration_size": 64, "max_drop": 1.0, "min_agreement": 0.0},
}


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A variant folder with two seeds of a tiny real run (2 baseline epochs, 2 members of half an epoch, every member kept)."""
    out = tmp_path_factory.mktemp("variant")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "write", lambda run_dir: None)  # the HTML report is not under test and takes seconds
        for seed in (0, 1):
            pipeline.run(config.load(cli.DEMO_CONFIG, {**TINY, "seed": seed}), out / f"seed{seed}", progress=False)
    return out


def test_deep_ensemble_is_the_soft_vote_of_the_seeds_fp32_baselines(variant):
    runs = [variant / "seed0", variant / "seed1"]
    de = reference.deep_ensemble(runs)
    x, y = store.split(runs[0], "test")
    proba = [predict_proba(session(d / "baseline" / "fp32.onnx"), store.preprocessing(d).apply(x)) for d in runs]
    single = [accuracy(p, y) for p in proba]
    assert de["k"] == 2
    assert de["test_acc"] == accuracy((proba[0] + proba[1]) / 2, y)
    assert de["baseline_test_acc"] == single
    assert de["gain_vs_mean_baseline_fp32"] == pytest.approx(de["test_acc"] - np.mean(single))
    assert de["mean_disagreement"] == pytest.approx((proba[0].argmax(1) != proba[1].argmax(1)).mean())
    assert de["bytes"] == sum((d / "baseline" / "fp32.onnx").stat().st_size for d in runs)
    assert (de["bytes_vs_baseline_fp32"], de["cost_vs_baseline"]) == (2, 1)


def test_deep_ensemble_refuses_runs_scored_on_other_labels(variant, tmp_path):
    other = tmp_path / "seed9"
    shutil.copytree(variant / "seed1", other)
    test = dict(np.load(other / "test.npz"))
    test["y"] = np.roll(test["y"], 1)
    np.savez(other / "test.npz", **test)
    with pytest.raises(SystemExit, match="other test labels"):
        reference.deep_ensemble([variant / "seed0", other])


def test_compute_matched_trains_the_pools_epochs_from_the_baseline_once(variant, monkeypatch):
    run = variant / "seed0"
    cfg = config.load(run / "config.yaml")
    assert reference.pool_epochs(run) == 1.0  # two members of half an epoch
    started, real_fit = {}, train.fit

    def spy(model, x, y, settings, **kw):
        started.update(weights={k: v.clone() for k, v in model.state_dict().items()}, settings=settings, n=len(x))
        return real_fit(model, x, y, settings, **kw)

    monkeypatch.setattr(train, "fit", spy)
    first = reference.compute_matched(run)
    baseline = torch.load(run / "baseline" / "model.pt", weights_only=True)
    assert all(torch.equal(started["weights"][k], v) for k, v in baseline.items())
    assert vars(started["settings"]) == {**vars(train.TrainSettings.of(cfg.train)), "epochs": 1.0}
    assert started["n"] == len(np.load(run / "splits.npz")["train"])
    steps_per_epoch = -(-started["n"] // cfg.train.batch_size)
    assert first["epochs"] == 1.0 and first["history"][-1]["steps"] == steps_per_epoch

    folder = run / "reference" / "compute-matched-1ep"
    assert sorted(p.name for p in folder.iterdir()) == ["model.pt", "result.json"]  # the checkpoint is gone
    model = store.load_baseline(run)
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    x_test, y_test = store.tensors(run, "test")
    assert first["test_acc"] == accuracy(train.predict_proba(model, x_test), y_test.numpy())

    monkeypatch.setattr(train, "fit", lambda *a, **kw: pytest.fail("retrained a cached compute-matched baseline"))
    assert reference.compute_matched(run) == first

    monkeypatch.setattr(train, "fit", spy)
    half = reference.compute_matched(run, epochs=0.5)
    assert half["epochs"] == 0.5 and half["history"][-1]["steps"] == round(0.5 * steps_per_epoch)
    assert (run / "reference" / "compute-matched-0.5ep" / "model.pt").exists()


class Killed(Exception):
    pass


def test_a_killed_compute_matched_training_resumes_from_its_last_epoch(variant, monkeypatch):
    run, real_fit, ran = variant / "seed1", train.fit, []

    def die_in_epoch_2(step: int, total: int) -> None:
        if step == total - 1:
            raise Killed

    monkeypatch.setattr(train, "fit", lambda *a, **kw: real_fit(*a, **kw, after_step=die_in_epoch_2))
    with pytest.raises(Killed):
        reference.compute_matched(run, epochs=2)
    folder = reference.cache(run, 2)
    assert (folder / "checkpoint.pt").exists() and not (folder / "result.json").exists()
    monkeypatch.setattr(
        train, "fit", lambda *a, **kw: real_fit(*a, **kw, after_step=lambda step, total: ran.append(step))
    )
    result = reference.compute_matched(run, epochs=2)
    steps_per_epoch = result["history"][0]["steps"]
    assert ran == list(range(steps_per_epoch + 1, 2 * steps_per_epoch + 1))  # epoch 2 only: epoch 1 was kept
    assert [h["epoch"] for h in result["history"]] == [1, 2] and not (folder / "checkpoint.pt").exists()


def test_one_member_is_the_shipped_strategys_k1_pick_alone(variant):
    run = variant / "seed0"
    one = reference.one_member(run)
    quant = {p.parent.name: store.read_json(p) for p in sorted((run / "pool").glob("*/quant.json"))}
    assert one["strategy"] == "accuracy-first"
    assert one["member"] == max(quant, key=lambda n: quant[n]["val_acc_int8"])  # one cluster: the best on validation
    x, y = store.split(run, "test")
    member = predict_proba(session(run / "pool" / one["member"] / "int8.onnx"), store.preprocessing(run).apply(x))
    assert one["test_acc"] == accuracy(member, y)
    assert one["bytes"] == (run / "pool" / one["member"] / "int8.p2e").stat().st_size  # the bytes as shipped
    assert one["bytes_vs_baseline_fp32"] == one["bytes"] / (run / "baseline" / "fp32.onnx").stat().st_size


def test_reference_rows_reach_the_results_section_and_the_ablation_table(variant, tmp_path):
    ref = {
        **reference.reference(variant, [0, 1]),
        "machine": "m",
        "date": "d",
        "command": "python bench/reference.py v",
        "results_file": "bench/results/v-reference.json",
    }
    de, cm = ref["deep_ensemble"], ref["aggregate"]["compute_matched.test_acc"]
    cached = [
        store.read_json(variant / f"seed{s}" / "reference" / "compute-matched-1ep" / "result.json") for s in (0, 1)
    ]
    assert cm["mean"] == pytest.approx(np.mean([c["test_acc"] for c in cached]))
    text = reference.markdown(ref)
    assert text.startswith(reference.TITLE) and f"| {100 * de['test_acc']:.2f} |" in text
    assert f"{100 * cm['mean']:.2f} ± {100 * cm['sd']:.2f}" in text

    runs = {str(s): cifar10.summarise_run(variant / f"seed{s}") for s in (0, 1)}
    method = {
        "name": "v",
        "seeds": [0, 1],
        "runs": runs,
        "aggregate": cifar10.aggregate(runs),
        "command": "python bench/cifar10.py",
        "config_resolved": config.as_dict(config.load(variant / "seed0" / "config.yaml")),
    }
    summary = cifar10.markdown(
        method
        | {"targets": cifar10.targets(method["aggregate"]), "machine": "m", "date": "d", "config": "c.yaml"}
        | {"set": [], "results_file": "r.json"}
    )
    slowest = [
        max(store.read_json(variant / f"seed{s}" / "metrics.json")["latency"]["members"].values()) for s in (0, 1)
    ]
    assert f"(slowest {np.mean(slowest):.3f} ± {np.std(slowest, ddof=1):.3f})" in summary
    lines = ablations.table([method], [ref]).splitlines()
    h = lines.index(ablations.HEADER[0])
    deep, matched, one, row = lines[h + 2 : h + 6]  # the reference rows come first, then the method
    assert deep.startswith("| **deep ensemble**: 2 fp32 baselines") and f"| {100 * de['test_acc']:.2f} (k=2) |" in deep
    assert matched.startswith("| **compute-matched baseline**") and f"| {100 * cm['mean']:.2f} ± " in matched
    assert one.startswith("| **one member** of v") and row.startswith("| v | 0, 1 |")
    ablations.figure([method], [ref], tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_a_results_file_keeps_the_other_seeds_of_its_config(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    old = {"config": "c.yaml", "set": ["a=1"], "command": "python bench/cifar10.py --seeds 0", "runs": {"0": {"x": 0}}}
    path.write_text(json.dumps(old))
    new = {"1": {"x": 1, "set": ["a=1"], "command": "python bench/cifar10.py --seeds 1"}}
    both = cifar10.merged(path, "c.yaml", new)
    assert list(both) == ["0", "1"] and both["0"] == {"set": ["a=1"], "command": old["command"], "x": 0}
    assert cifar10.merged(path, "other.yaml", new) == new  # another config's file is not mixed in
    assert cifar10.merged(path, "c.yaml", {"0": {"x": 9}}) == {"0": {"x": 9}}  # a seed run again replaces its run


def test_frontier_rows_figure_and_advice_come_from_the_runs(variant: Path, tmp_path: Path) -> None:
    import frontier

    runs = {str(s): cifar10.summarise_run(variant / f"seed{s}") for s in (0, 1)}
    made = {"machine": "this machine", "config_resolved": {"model": {"arch": "small_cnn"}}}
    result = {"runs": runs, **made}
    weaker = {
        s: {**r, "selected": {**r["selected"], "test_acc": r["selected"]["test_acc"] - 0.01}} for s, r in runs.items()
    }
    rival = frontier.method_row("rival-qat3-2x", {"runs": weaker, **made}, {})
    rivals = frontier.best_rivals(
        {"rival-qat3-2x": {"runs": weaker, **made}, "indep-qat3-2x": result}
    )  # pools are no rivals
    # the rival counts for its budget and every larger one, within its training budget and every larger one
    assert rival["budget"] is not None  # the tiny runs' members fit the largest budget
    assert {b for b, _ in rivals} == {b for b in frontier.BUDGETS if b >= rival["budget"]}
    assert {c for _, c in rivals} == {c for c in frontier.COSTS if c >= rival["cost"]}
    row = frontier.method_row("indep-qat3-2x", result, rivals)
    accs = [r["selected"]["test_acc"] for r in runs.values()]
    assert row["seeds"] == [0, 1] and row["test_acc"]["mean"] == pytest.approx(100 * np.mean(accs), abs=1e-3)
    assert row["gain_vs_single_points"]["mean"] == pytest.approx(1.0) and rival["gain_vs_single_points"] is None
    largest = max(r["selected"]["max_member_shipped_vs_baseline_fp32"] for r in runs.values())
    assert row["bytes_per_member"] == round(largest, 4) and row["budget"] == next(
        (b for b in frontier.BUDGETS if largest <= b), None
    )
    assert row["cost_measured_as"] == {"0": "cpu", "1": "cpu"}  # these runs recorded CPU seconds
    cpu = store.read_json(variant / "seed0" / "cpu_seconds.json")
    spent = sum(cpu[k] for k in ("pool", "quantize", "select"))
    assert frontier.cost(runs["0"])[1] == pytest.approx(spent / cpu["baseline"])
    assert len(row["mcnemar_p"]) == 2 and row["latency_ratio"] > 0
    rows = frontier.reference_rows({"indep-qat3-2x": result}) + [row, rival]
    assert rows[0]["method"] == "parent" and rows[0]["gain_points"]["mean"] == 0
    parents = [r["baseline_fp32_test_acc"] for r in runs.values()]
    assert rows[0]["seeds"] == [0, 1] and rows[0]["test_acc"]["mean"] == pytest.approx(100 * np.mean(parents), abs=1e-3)
    first = frontier.headline(rows)  # the README's first screen, from the same rows
    assert first.startswith(frontier.HEADLINE) and f"| fp32 parent | 2 | {rows[0]['test_acc']['mean']:.2f} |" in first
    if row["budget"] == 0.10 and row["cost"] <= 2:
        assert "(`indep-qat3-2x`)" in first and "Goal (+1.5 points" in first
    table = frontier.markdown(rows)
    assert table.count("\n| ") >= len(rows) + 1 and "indep-qat3-2x" in table
    assert "- latest run on this machine: indep-qat3-2x, rival-qat3-2x" in table
    advice = frontier.advice(rows)
    if row["budget"] is not None and row["cost"] <= 2:  # the best non-rival row of its budget is named
        assert "`indep-qat3-2x`" in advice
    assert "rival-qat3-2x" not in advice
    frontier.figure(rows, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
