"""CIFAR-10 benchmark: run one config for several seeds and summarise what each run measured.

    python bench/cifar10.py                                   # configs/cifar10-cpu.yaml, seeds 0 1 2
    python bench/cifar10.py --config configs/cifar10-paper.yaml --seeds 0
    python bench/cifar10.py --label mask-noise --set pool.mask_noise=0.5 --seeds 0   # an ablation

Each seed runs into its own directory (``<out>/seed<S>``) with the pipeline's CLI; re-running skips
finished seeds and phases (the pipeline resumes). Every number in the summary is read from the runs'
``metrics.json`` and ``timings.json``; nothing is recomputed from the test split here. Writes
``bench/results/<config>[-<label>].json`` (``cifar10-`` prefixed when the config's name lacks it) and replaces its own ``## CIFAR-10: ...`` section
of ``docs/RESULTS.md`` (other sections are left as they are).
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml
from common import (
    RESULTS,
    ROOT,
    add_config,
    add_data,
    add_seeds,
    aggregate,
    argparser,
    command_line,
    data_paths,
    machine,
    pm,
    publish,
    rel,
    shipped_bytes,
    write_result,
)

STRATEGIES = ("accuracy-first", "diversity-first", "top-k", "random", "greedy")
POOL_PHASES = ("pool", "quantize", "select")  # select = cluster + select


def share_baseline(src: Path, dst: Path) -> None:
    """Copy a finished baseline (weights, record, snapshots) of the same seed into a fresh run directory."""
    if (dst / "baseline" / "model.json").exists() or not (src / "baseline" / "model.json").exists():
        return
    (dst / "baseline").mkdir(parents=True, exist_ok=True)
    for f in ["model.pt", *(p.name for p in (src / "baseline").glob("snapshot*.pt")), "model.json"]:
        shutil.copy2(src / "baseline" / f, dst / "baseline" / f)


def same_baseline(a: dict, b: dict) -> bool:
    """Whether run ``a`` may reuse run ``b``'s baseline: same seed, data, network and training (``train.cycles``
    only matters for the restarts schedule), and ``b`` saved every snapshot ``a`` clones from."""
    train = lambda c: {k: v for k, v in c["train"].items() if k != "cycles" or c["train"]["schedule"] == "restarts"}  # noqa: E731
    need, have = a["pool"]["snapshots"], b["pool"]["snapshots"]

    def data(c: dict) -> dict:
        path = c["data"]["path"]
        paths = path if isinstance(path, list) else [path]
        return {**c["data"], "path": sorted(os.path.realpath(ROOT / p) for p in paths)}

    return (
        a["seed"] == b["seed"]
        and a["model"] == b["model"]
        and data(a) == data(b)
        and train(a) == train(b)
        and (need == 0 or need == have)
    )


def summarise_run(run_dir: Path, baseline_seconds: float | None = None) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    t = json.loads((run_dir / "timings.json").read_text())
    b = m["baseline"]
    base_fp32_bytes = b["bytes"]["fp32"]
    e = m["ensemble"]
    selected = [x for x in m["members"] if x["selected"]]
    by_name = {x["name"]: x for x in m["members"]}
    base_s = t["baseline"] if baseline_seconds is None else baseline_seconds
    pool_s = sum(t[p] for p in POOL_PHASES)
    cpu = run_dir / "cpu_seconds.json"  # the run's own process CPU seconds per phase, where it recorded them
    return {
        "run_dir": rel(run_dir),
        **({"cpu_seconds": json.loads(cpu.read_text())} if cpu.exists() else {}),
        "baseline_fp32_test_acc": b["test_acc_fp32"],
        "baseline_int8_test_acc": b["test_acc_int8"],
        "baseline_bytes": {k: b["bytes"][k] for k in ("fp32", "int8", "int8_gzip")},
        "members": [
            {
                "name": x["name"],
                "test_acc_int8": x["test_acc_int8"],
                "sparsity": x["sparsity_measured"],
                "selected": x["selected"],
                "source": x["plan"].get("source", 0),
                "status": x["status"],
                "full_integer": x["full_integer"],
            }
            for x in m["members"]
        ],
        "member_test_acc_int8_mean": statistics.mean(x["test_acc_int8"] for x in m["members"]),
        "member_sparsity_mean": statistics.mean(x["sparsity_measured"] for x in m["members"]),
        "pool_vote_test_acc": m["pool_vote"]["test_acc"],
        "pool_mean_disagreement": m["pool_vote"].get("mean_disagreement"),
        "pool_vote_minus_mean_member": m["pool_vote"].get("vote_minus_mean_member"),
        "strategy": e["strategy"],
        "k": e["k"],
        "ensemble_test_acc": {s: v["test_acc"] for s, v in m["strategies"].items()},
        "ensemble_val_acc": {s: v["val_acc"] for s, v in m["strategies"].items()},
        "ensemble_mean_disagreement": {s: v.get("mean_disagreement") for s, v in m["strategies"].items()},
        "ensemble_vote_minus_mean_member": {s: v.get("vote_minus_mean_member") for s, v in m["strategies"].items()},
        "ensemble_mcnemar_p": {s: v.get("mcnemar_p_vs_baseline_fp32") for s, v in m["strategies"].items()},
        "selected": {
            "members": e["members"],
            "mean_disagreement": e["mean_disagreement"],
            "mean_member_test_acc": e["mean_member_test_acc"],
            "test_acc": e["test_acc"],
            "gain_vs_baseline_fp32": e["gain_vs_baseline_fp32"],
            "mcnemar_p": e["mcnemar_p_vs_baseline_fp32"],
            "bytes": [
                {
                    "name": x["name"],
                    **{k: x["bytes"][k] for k in ("fp32", "int8", "int8_gzip", "shipped") if k in x["bytes"]},
                }
                for x in selected
            ],
            "max_member_int8_gzip_vs_baseline_fp32": max(x["bytes"]["int8_gzip"] for x in selected) / base_fp32_bytes,
            "ensemble_int8_gzip_vs_baseline_fp32": sum(x["bytes"]["int8_gzip"] for x in selected) / base_fp32_bytes,
            "max_member_shipped_vs_baseline_fp32": max(shipped_bytes(x["bytes"]) for x in selected) / base_fp32_bytes,
            "ensemble_shipped_vs_baseline_fp32": sum(shipped_bytes(x["bytes"]) for x in selected) / base_fp32_bytes,
            "all_int8": all(x["full_integer"] and x["status"] == "ok" for x in selected),
        },
        # accuracy against ensemble size: each strategy's pick for k = 1..k_max clusters (from metrics.json "curves")
        "curves": {
            s: [
                {
                    "k": c["k"],
                    "test_acc": c["test_acc"],
                    "val_acc": c["val_acc"],
                    "shipped_vs_baseline_fp32": sum(shipped_bytes(by_name[n]["bytes"]) for n in c["members"])
                    / base_fp32_bytes,
                }
                for c in picks
            ]
            for s, picks in m.get("curves", {}).items()
        },
        "seconds": {**t, "baseline_used_for_ratio": base_s, "pool_quantize_select": pool_s},
        "pool_cost_vs_baseline": pool_s / base_s if base_s else None,
        **({"latency_ms": latency_summary(m["latency"])} if "latency" in m else {}),
    }


def latency_summary(t: dict) -> dict:
    """Batch-1, one-thread latencies from ``metrics.json`` (runs made before they were measured have none)."""
    ms = list(t["members"].values())
    return {
        "runs": t["runs"],
        "member_max": max(ms),
        "member_mean": statistics.mean(ms),
        "baseline_int8": t["baseline_int8_ms"],
        "baseline_fp32": t["baseline_fp32_ms"],
    }


def best_strategy(agg: dict) -> str:
    """The selection strategy with the highest mean soft-vote test accuracy over the seeds."""
    return max(STRATEGIES, key=lambda s: agg[f"ensemble_test_acc.{s}.soft"]["mean"])


def targets(agg: dict) -> dict:
    """The issue-9 limits that one variant can check alone: each member at most 5 % of the baseline's fp32 ONNX as
    shipped, and pool + quantise + select at most 1x the baseline's training time. (Reaching the deep ensemble is
    checked against bench/reference.py's rows, in the ablation table.)"""
    g = lambda k: agg[k]["mean"]  # noqa: E731
    best = best_strategy(agg)
    return {
        "best_strategy_soft": best,
        "best_gain_points": 100 * (g(f"ensemble_test_acc.{best}.soft") - g("baseline_fp32_test_acc")),
        "max_member_shipped_vs_baseline_fp32": g("selected.max_member_shipped_vs_baseline_fp32"),
        "member_le_5pct": g("selected.max_member_shipped_vs_baseline_fp32") <= 0.05,
        "pool_cost_vs_baseline": g("pool_cost_vs_baseline"),
        "pool_cost_le_1x": g("pool_cost_vs_baseline") <= 1.0,
    }


def markdown(result: dict) -> str:
    a, t = result["aggregate"], result["targets"]
    title = f"## CIFAR-10: {result['name']}"
    lines = [
        title,
        "",
        f"- machine: {result['machine']}; date: {result['date']}; seeds: {', '.join(map(str, result['seeds']))}",
        f"- command: `{result['command']}`",
        f"- config: `{result['config']}`" + (f", overrides: `{' '.join(result['set'])}`" if result["set"] else ""),
        "- the CPU was shared with other jobs while this ran; wall-clock numbers are noisy",
        "",
        "| | test accuracy % (mean ± sd) |",
        "|---|---|",
        f"| baseline fp32 | {pm(a, 'baseline_fp32_test_acc')} |",
        f"| baseline int8 | {pm(a, 'baseline_int8_test_acc')} |",
        f"| pool members int8 (mean) | {pm(a, 'member_test_acc_int8_mean')} |",
        f"| pool vote (all members, soft) | {pm(a, 'pool_vote_test_acc')} |",
    ]
    for s in STRATEGIES:
        lines.append(
            f"| ensemble {s}: soft / hard | {pm(a, f'ensemble_test_acc.{s}.soft')} / {pm(a, f'ensemble_test_acc.{s}.hard')} |"
        )
    lines += [
        "",
        f"- selected ensemble ({result['runs'][str(result['seeds'][0])]['strategy']}, k = {pm(a, 'k', 1, 1)}): "
        f"gain vs baseline fp32 {pm(a, 'selected.gain_vs_baseline_fp32')} points, McNemar p per seed "
        f"{', '.join(format(r['selected']['mcnemar_p'], '.2g') for r in result['runs'].values())}; "
        f"mean pairwise disagreement {pm(a, 'selected.mean_disagreement', 1, 3)} "
        f"(whole pool {pm(a, 'pool_mean_disagreement', 1, 3)}); vote minus mean member "
        f"{pm(a, 'pool_vote_minus_mean_member')} points (pool)",
        f"- member sparsity {pm(a, 'member_sparsity_mean')} %; largest selected member as shipped = "
        f"{pm(a, 'selected.max_member_shipped_vs_baseline_fp32')} % of the baseline's fp32 ONNX "
        f"({pm(a, 'baseline_bytes.fp32', 1 / 1024, 1)} KiB; int8+gzip: "
        f"{pm(a, 'selected.max_member_int8_gzip_vs_baseline_fp32')} %); selected ensemble as shipped = "
        f"{pm(a, 'selected.ensemble_shipped_vs_baseline_fp32')} %",
        f"- seconds: baseline {pm(a, 'seconds.baseline_used_for_ratio', 1, 0)}, pool {pm(a, 'seconds.pool', 1, 0)}, "
        f"quantise {pm(a, 'seconds.quantize', 1, 0)}, cluster+select {pm(a, 'seconds.select', 1, 0)}, "
        f"evaluate {pm(a, 'seconds.evaluate', 1, 0)}; pool+quantise+select = {pm(a, 'pool_cost_vs_baseline', 1, 2)} x baseline",
        f"- limits: member <= 5 % as shipped: {'met' if t['member_le_5pct'] else 'NOT met'}; pool cost <= 1x: "
        f"{'met' if t['pool_cost_le_1x'] else 'NOT met'}; best strategy ({t['best_strategy_soft']}, soft, chosen on test: "
        f"for comparison only) {t['best_gain_points']:+.2f} points",
        *(
            [
                f"- int8 latency at batch 1, one thread (ms; median of {int(a['latency_ms.runs']['mean'])} runs "
                f"on the run's machine, measured while other jobs ran): selected members "
                f"{pm(a, 'latency_ms.member_mean', 1, 3)} (slowest {pm(a, 'latency_ms.member_max', 1, 3)}); "
                f"baseline int8 {pm(a, 'latency_ms.baseline_int8', 1, 3)}, fp32 {pm(a, 'latency_ms.baseline_fp32', 1, 3)}"
            ]
            if "latency_ms.member_max" in a
            else []
        ),
        f"- raw numbers: `{result['results_file']}`",
        "",
    ]
    curve = curve_rows(result["runs"], "greedy")
    if curve:
        lines += [
            "Accuracy against ensemble size (greedy selection on validation, soft vote; mean over seeds): "
            "k, test accuracy %, gain over baseline fp32 (points), ensemble as shipped, % of baseline fp32",
            "",
            "| k | test acc | gain | bytes % |",
            "|---|---|---|---|",
        ]
        lines += [f"| {k} | {100 * acc:.2f} | {100 * gain:+.2f} | {100 * b:.1f} |" for k, acc, gain, b in curve] + [""]
    return "\n".join(lines)


def curve_rows(runs: dict[str, dict], strategy: str) -> list[tuple[int, float, float, float]]:
    """(k, mean test acc, mean gain vs baseline fp32, mean bytes ratio) for the k every seed reached."""
    curves = [r["curves"].get(strategy, []) for r in runs.values()]
    if not curves or not all(curves):
        return []
    out = []
    for i in range(min(len(c) for c in curves)):
        pts = [c[i] for c in curves]
        base = [r["baseline_fp32_test_acc"] for r in runs.values()]
        out.append(
            (
                pts[0]["k"],
                statistics.mean(p["test_acc"] for p in pts),
                statistics.mean(p["test_acc"] - b for p, b in zip(pts, base)),
                statistics.mean(p["shipped_vs_baseline_fp32"] for p in pts),
            )
        )
    return out


def merged(results_file: Path, config: str, runs: dict[str, dict]) -> dict[str, dict]:
    """This invocation's runs with the other seeds already in ``results_file`` for the same config and label (one
    invocation per seed may run side by side); each run keeps the settings and command it ran with."""
    if not results_file.exists():
        return runs
    old = json.loads(results_file.read_text())
    if old.get("config") != config:
        return runs
    kept = {s: {"set": old["set"], "command": old["command"], **r} for s, r in old["runs"].items() if s not in runs}
    return dict(sorted({**kept, **runs}.items(), key=lambda kv: int(kv[0])))


def main() -> None:
    ap = argparser(__doc__)
    add_config(ap)
    add_seeds(ap)
    add_data(ap)
    ap.add_argument("--out", default=None, help="runs go to OUT/seed<S> (default runs/bench/<config>[-<label>])")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--label", default=None, help="names a variant (an ablation): results file and RESULTS.md section")
    ap.add_argument(
        "--name", default=None, help="the results file, runs folder and section (default <config>[-<label>])"
    )
    ap.add_argument(
        "--baseline-from",
        default=None,
        help="reuse the finished baselines in DIR/seed<S> (same seed, data, "
        "model, train settings); the pool-cost ratio then uses that run's baseline seconds",
    )
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--results", default=str(RESULTS), help="folder of the results file")
    args = ap.parse_args()

    stem = Path(args.config).stem
    name = args.name or stem + (f"-{args.label}" if args.label else "")
    out = Path(args.out) if args.out else ROOT / "runs" / "bench" / name
    seeds = args.seeds
    paths = data_paths(args.data)
    runs: dict[str, dict] = {}
    for seed in seeds:
        run_dir = out / f"seed{seed}"
        cmd = [
            sys.executable,
            "-m",
            "prune2edge.cli",
            "run",
            args.config,
            "--out",
            str(run_dir),
            "--seed",
            str(seed),
            "--data-path",
            ",".join(paths),
            "--quiet",
            *[x for s in args.set for x in ("--set", s)],
        ]
        if args.workers:
            cmd += ["--workers", str(args.workers)]
        base_s = None
        if args.baseline_from:
            from prune2edge import config as cfgmod
            from prune2edge.cli import parse_settings

            src = Path(args.baseline_from) / f"seed{seed}"
            mine = cfgmod.load(args.config, {**parse_settings(args.set), "seed": seed, "data": {"path": paths}})
            mine, theirs = cfgmod.as_dict(mine), cfgmod.as_dict(cfgmod.load(src / "config.yaml"))
            if not same_baseline(mine, theirs):
                sys.exit(f"--baseline-from {src}: its seed, data, model or train settings differ from this run's")
            base_s = json.loads((src / "timings.json").read_text())["baseline"]
            if base_s < 1:
                sys.exit(f"--baseline-from {src}: that run reused its baseline too; name the run that trained it")
            share_baseline(src, run_dir)
        if not (run_dir / "metrics.json").exists():
            print(f"[bench] seed {seed}: {shlex.join(cmd)}", flush=True)
            rc = subprocess.run(cmd, cwd=ROOT).returncode
            if not (run_dir / "metrics.json").exists():
                sys.exit(f"[bench] seed {seed} failed (exit {rc}) before writing metrics.json; re-run to resume")
            if rc:
                print(
                    f"[bench] seed {seed}: the run exited with {rc} after metrics.json (a later phase failed)",
                    flush=True,
                )
        runs[str(seed)] = {**summarise_run(run_dir, base_s), "set": args.set, "command": command_line()}
        if base_s is not None:
            src = Path(args.baseline_from) / f"seed{seed}"
            runs[str(seed)]["baseline_from"] = rel(src)
            if (src / "cpu_seconds.json").exists():
                runs[str(seed)]["baseline_cpu_seconds"] = json.loads((src / "cpu_seconds.json").read_text())["baseline"]
    results_file = Path(args.results) / (f"{name}.json" if name.startswith("cifar10") else f"cifar10-{name}.json")
    resolved = yaml.safe_load((out / f"seed{seeds[0]}" / "config.yaml").read_text())  # this invocation's config
    runs = merged(results_file, rel(args.config), runs)
    seeds = sorted(int(s) for s in runs)
    agg = aggregate(runs)
    resolved["data"]["path"] = [rel(p) for p in resolved["data"]["path"]]
    result = {
        "name": name,
        "config": rel(args.config),
        "set": args.set,
        "seeds": seeds,
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "command": command_line(),
        "config_resolved": resolved,
        "results_file": rel(results_file),
        "runs": runs,
        "aggregate": agg,
        "targets": targets(agg),
    }
    write_result(results_file, result)
    publish(f"## CIFAR-10: {name}", markdown(result), not args.no_docs)


if __name__ == "__main__":
    main()
