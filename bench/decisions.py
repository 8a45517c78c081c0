"""Decisions that say how sure they are, measured on finished runs: for each abstain target, the threshold chosen on
validation and, on the test split, the share of frames decided and their accuracy; the expected calibration error;
the accuracy with members missing. The ensemble is ranked by its vote's margin, the fp32 baseline by its top
probability.

    python bench/decisions.py runs/bench/cifar10-cpu-cb-perturb          # seeds 0, 1, 2 of configs/cifar10-cpu-clones.yaml
    python bench/decisions.py runs/bench/X --seeds 0 --targets 0.9,0.99

Uses the pipeline's own functions (``evaluate.decision_metrics``, ``evaluate.degradation``): thresholds from the
selected members' int8 validation probabilities (``pool/*/val_proba.npy``) and the baseline's fp32 ONNX run on the
recorded validation split; the test split only through the run's ``test.npz`` and ``test_scores.npz``. Trains
nothing and writes nothing into the runs. Writes ``bench/results/decisions-<variant>.json`` and the
``## Decisions: ...`` section of docs/RESULTS.md.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import numpy as np
from common import (
    RESULTS,
    ROOT,
    add_config,
    add_seeds,
    aggregate,
    argparser,
    command_line,
    machine,
    pm,
    publish,
    rel,
    write_result,
)

from prune2edge import config, evaluate, selective, ship, store
from prune2edge.records import read_quantised, read_selection
from prune2edge.runtime.bundle import predict_proba, session
from prune2edge.runtime.vote import vote

MODELS = (("ensemble", "ensemble (vote margin)"), ("baseline_fp32", "baseline fp32 (top probability)"))


def differences(run_cfg: config.Config, reference: Path) -> list[str]:
    """The settings in which a run's config differs from a reference config (seed and data files aside), as
    ``key: reference -> run``."""
    ref = config.load(reference, {"seed": run_cfg.seed, "data": {"path": run_cfg.data.path}})
    return config.differences(ref, run_cfg)


def measure_run(run_dir: Path, targets: list[float], reference: Path) -> dict:
    """Decision metrics of one finished run at each target, its calibration and its degradation."""
    cfg = config.load(run_dir / "config.yaml")
    metrics = store.read_json(run_dir / "metrics.json")
    chosen, rule = read_selection(run_dir).selected, cfg.vote.rule
    weights = ship.vote_weights({n: read_quantised(run_dir / "pool" / n) for n in chosen}, chosen, cfg.vote.weighted)
    x_val, y_val = store.split(run_dir, "val")
    ens_val = vote(np.stack([np.load(run_dir / "pool" / n / "val_proba.npy") for n in chosen]), rule, weights)
    base_val = predict_proba(session(run_dir / "baseline" / "fp32.onnx"), store.preprocessing(run_dir).apply(x_val))
    scores = np.load(run_dir / "test_scores.npz")
    y_test = np.load(run_dir / "test.npz")["y"]
    names = list(scores["names"])
    members_test = scores["members"][[names.index(n) for n in chosen]]
    assert np.allclose(vote(members_test, rule, weights), scores["ensemble"], atol=1e-5), "test scores disagree"
    by_target = {
        t: evaluate.decision_metrics(ens_val, scores["ensemble"], base_val, scores["baseline_fp32"], y_val, y_test, t)
        for t in targets
    }
    first = by_target[targets[0]]
    g = evaluate.degradation(members_test, y_test, rule, weights, cfg.seed)
    best = evaluate.best_member(metrics["members"])
    return {
        "run_dir": rel(run_dir),
        "seed": cfg.seed,
        "config_differences": differences(cfg, reference),
        "n_val": len(y_val),
        "n_test": len(y_test),
        "members": chosen,
        "rule": rule,
        **{
            name: {
                "test_acc": first[name]["test_acc"],
                "ece": first[name]["ece"],
                "aurc": first[name]["aurc"],
                "curve": first[name]["curve"],
            }
            for name, _ in MODELS
        },
        "targets": {
            f"{t:g}": {
                name: {"threshold": d[name]["threshold"], "at_threshold": d[name]["at_threshold"]} for name, _ in MODELS
            }
            for t, d in by_target.items()
        },
        "degradation": {
            "k": g["k"],
            "default_quorum": g["default_quorum"],
            "missing": {str(r["missing"]): r for r in g["rows"]},
            "baseline_fp32_test_acc": metrics["baseline"]["test_acc_fp32"],
            "best_member": {"name": best["name"], "test_acc_int8": best["test_acc_int8"]},
        },
    }


def markdown(result: dict) -> str:
    a, default = result["aggregate"], f"{result['default_target']:g}"
    runs = list(result["runs"].values())
    k = runs[0]["degradation"]["k"]
    same = all(not r["config_differences"] for r in runs)
    lines = [
        result["title"],
        "",
        f"- machine: {result['machine']}; date: {result['date']}; seeds: {', '.join(map(str, result['seeds']))}",
        f"- command: `{result['command']}`",
        f"- runs: `{result['runs_dir']}/seed<S>`, config "
        + (
            f"`{result['reference']}` (every setting)"
            if same
            else f"differs from `{result['reference']}`: see the JSON"
        ),
        f"- validation {runs[0]['n_val']} images (chooses every threshold), test {runs[0]['n_test']} images (only "
        f"scores); mean ± sd over the seeds; the ensemble is the shipped one ({runs[0]['rule']} vote, k = {k})",
        "- agreement: the vote's margin, the winning class's score minus the runner-up's; a frame whose margin is "
        "below the threshold goes to review. Threshold: the lowest margin at which the decided validation frames "
        "reach the target accuracy (the baseline: the same rule on its top probability)",
        "",
        "| target (validation) | model | threshold | validation decided % | test decided % | test accuracy of the decided % |",
        "|---|---|---|---|---|---|",
    ]
    for t in result["targets"]:
        key = f"{t:g}"
        for name, label in MODELS:
            p = f"targets.{key}.{name}"
            lines.append(
                f"| {key}{' (default)' if key == default else ''} | {label} | {pm(a, p + '.threshold.abstain_below', 1, 3)} "
                f"| {pm(a, p + '.threshold.val_coverage', 100, 1)} | {pm(a, p + '.at_threshold.coverage', 100, 1)} "
                f"| {pm(a, p + '.at_threshold.accuracy')} |"
            )
    e, b = (f"targets.{default}.{name}.at_threshold" for name, _ in MODELS)
    if f"{e}.coverage" in a and f"{b}.coverage" in a:
        fewer = "the ensemble" if a[f"{e}.coverage"]["mean"] > a[f"{b}.coverage"]["mean"] else "the baseline"
        lines += [
            "",
            f"At the default target ({default}), the ensemble decides {pm(a, e + '.coverage', 100, 1)} % of the test "
            f"frames at {pm(a, e + '.accuracy')} %, the fp32 baseline {pm(a, b + '.coverage', 100, 1)} % at "
            f"{pm(a, b + '.accuracy')} %: {fewer} sends fewer frames to review.",
        ]
    lines += [
        "",
        f"| model | test accuracy, every frame % | ECE ({selective.ECE_BINS} bins) | AURC |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {label} | {pm(a, name + '.test_acc')} | {pm(a, name + '.ece', 1, 4)} | {pm(a, name + '.aurc', 1, 4)} |"
        for name, label in MODELS
    ]
    lines += [
        "",
        f"- ECE: {selective.ECE_BINNING}. AURC: the mean, over n, of the error rate of the n surest test frames",
        "",
        f"Accuracy as members drop out (test %, mean / min / max over which of the {k} are missing):",
        "",
        "| members missing | mean | min | max |",
        "|---|---|---|---|",
    ]
    for j in range(k):
        p = f"degradation.missing.{j}"
        below = " (below the default quorum)" if runs[0]["degradation"]["missing"][str(j)]["below_quorum"] else ""
        lines.append(f"| {j}{below} | {pm(a, p + '.mean')} | {pm(a, p + '.min')} | {pm(a, p + '.max')} |")
    lines += [
        f"| baseline fp32 | {pm(a, 'degradation.baseline_fp32_test_acc')} | | |",
        f"| best single member (by validation) | {pm(a, 'degradation.best_member.test_acc_int8')} | | |",
        "",
        f"- raw numbers: `{result['results_file']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparser(__doc__)
    ap.add_argument(
        "runs",
        nargs="?",
        default=str(ROOT / "runs" / "bench" / "cifar10-cpu-cb-perturb"),
        help="a bench directory holding seed<S>/ run directories",
    )
    add_seeds(ap)
    add_config(ap, "the config the runs should match; its vote.target_accuracy is the default target")
    ap.add_argument("--targets", default="0.9,0.99", help="targets besides the default (comma-separated)")
    args = ap.parse_args()

    runs_dir, seeds = Path(args.runs), args.seeds
    default = config.load(args.config).vote.target_accuracy
    if default is None:
        sys.exit(f"{args.config} sets no vote.target_accuracy, so its bundles have no default threshold")
    targets = sorted({default, *(float(t) for t in args.targets.split(",") if t.strip())})
    runs = {}
    for seed in seeds:
        run_dir = runs_dir / f"seed{seed}"
        if not (run_dir / "metrics.json").exists():
            sys.exit(f"'{run_dir}' is not a finished run (no metrics.json)")
        print(f"[decisions] {run_dir}", flush=True)
        runs[str(seed)] = measure_run(run_dir, targets, Path(args.config))
    name = runs_dir.name
    results_file = RESULTS / f"decisions-{name}.json"
    result = {
        "title": f"## Decisions: abstain, calibration, members missing ({name})",
        "runs_dir": rel(runs_dir),
        "reference": rel(args.config),
        "seeds": seeds,
        "targets": targets,
        "default_target": default,
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "command": command_line(),
        "results_file": rel(results_file),
        "runs": runs,
        "aggregate": aggregate(runs),
    }
    write_result(results_file, result)
    publish(result["title"], markdown(result), not args.no_docs)


if __name__ == "__main__":
    main()
