"""Ablation table and trade-off figure from bench/results/cifar10-*.json (written by bench/cifar10.py); replaces
the ``## CIFAR-10: ablations`` section of docs/RESULTS.md and writes docs/figures/cifar10-tradeoff.png.

    python bench/ablations.py cifar10-cpu cifar10-cpu-clones cifar10-cpu-mask-noise ...
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10 import ROOT, best_strategy, replace_section  # noqa: E402

TITLE = "## CIFAR-10: ablations"
FIGURE = ROOT / "docs" / "figures" / "cifar10-tradeoff.png"


def row(r: dict) -> str:
    a = r["aggregate"]
    f = lambda k, s=100, d=2: (f"{s * a[k]['mean']:.{d}f}" + (f" ± {s * a[k]['sd']:.{d}f}" if len(r["seeds"]) > 1 else "")  # noqa: E731
                               if k in a else "n/a")
    best = best_strategy(a)
    gain = 100 * (a[f"ensemble_test_acc.{best}.soft"]["mean"] - a["baseline_fp32_test_acc"]["mean"])
    shared = " (baseline shared)" if any("baseline_from" in x for x in r["runs"].values()) else ""
    return (f"| {r['name']}{shared} | {', '.join(map(str, r['seeds']))} | {f('baseline_fp32_test_acc')} | "
            f"{f('member_test_acc_int8_mean')} | {f('member_sparsity_mean', 100, 1)} | {f('pool_vote_test_acc')} | "
            f"{f('pool_mean_disagreement', 1, 3)} | {f('pool_vote_minus_mean_member')} | "
            f"{f('selected.test_acc')} (k={f('k', 1, 1)}) | {best}: {f(f'ensemble_test_acc.{best}.soft')} ({gain:+.2f}) | "
            f"{f('selected.ensemble_int8_gzip_vs_baseline_fp32', 100, 1)} | {f('pool_cost_vs_baseline', 1, 2)} | {epoch_cost(r):.2f} |")


def epoch_cost(r: dict) -> float:
    """Fine-tuning epochs of the whole pool over the baseline's training epochs (the planned compute ratio)."""
    c = r["config_resolved"]
    e = c["pool"]["epochs"] if isinstance(c["pool"]["epochs"], list) else [c["pool"]["epochs"]] * 2
    return c["pool"]["size"] * (e[0] + e[1]) / 2 / c["train"]["epochs"]


def best_point(r: dict) -> dict:
    """Best soft-vote strategy of a variant: gain over its baseline (points), its bytes and the pipeline cost, mean and sd over seeds."""
    best = best_strategy(r["aggregate"])
    per_seed = []
    for run in r["runs"].values():
        pick = next((c for c in run.get("curves", {}).get(best, []) if c["k"] == run["k"]), None)
        nbytes = pick["int8_gzip_vs_baseline_fp32"] if pick else run["selected"]["ensemble_int8_gzip_vs_baseline_fp32"]
        per_seed.append((100 * (run["ensemble_test_acc"][best]["soft"] - run["baseline_fp32_test_acc"]), 100 * nbytes,
                         run["pool_cost_vs_baseline"]))
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    cols = list(zip(*per_seed))
    return {"name": r["name"].removeprefix("cifar10-cpu-") if r["name"] != "cifar10-cpu" else "cifar10-cpu (default)",
            "strategy": best, **{k: statistics.mean(c) for k, c in zip(("gain", "bytes", "cost"), cols)},
            **{f"{k}_sd": sd(c) for k, c in zip(("gain", "bytes", "cost"), cols)}}


def figure(rows: list[dict]) -> None:
    """Gain of each variant's best strategy against ensemble bytes and against pipeline cost, with the targets."""
    points = [best_point(r) for r in rows]
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    for ax, key, label, limit in zip(fig.subplots(1, 2), ("bytes", "cost"),
                                     ("selected ensemble int8+gzip, % of the baseline's fp32 ONNX",
                                      "pool + quantise + select wall time / baseline training time"), (25, 1.5)):
        for p in points:
            ax.errorbar(p[key], p["gain"], xerr=p[f"{key}_sd"], yerr=p["gain_sd"], fmt="o", capsize=3)
            ax.annotate(p["name"], (p[key], p["gain"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.axhline(3, color="green", ls="--", lw=1, label="target: +3 points")
        ax.axhline(0, color="grey", lw=1, label="baseline fp32")
        ax.axvline(limit, color="red", ls=":", lw=1, label=f"limit: {limit:g}{' %' if key == 'bytes' else ' x'}")
        ax.set_xlabel(label)
        if key == "bytes":
            ax.set_xscale("log")
            ax.set_xticks([10, 15, 25, 50, 100, 200], ["10", "15", "25", "50", "100", "200"], minor=False)
            ax.minorticks_off()
        ax.set_ylabel("best strategy's gain over baseline fp32 (points)")
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
    fig.suptitle("CIFAR-10 on 2 CPU cores: accuracy gain against bytes and cost (mean ± sd over seeds)")
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)


def main(names: list[str]) -> None:
    rows = [json.loads((ROOT / "bench" / "results" / f"{n}.json").read_text()) for n in names]
    lines = [TITLE, "",
             "All numbers are test accuracy in % (mean ± sd over the seeds listed), read from each run's metrics.json. "
             "Disagreement: mean pairwise fraction of test images on which two pool members' int8 predictions differ. "
             "Vote − mean: soft vote of the whole pool minus its members' mean accuracy (points). "
             "Best: the selection strategy with the highest mean soft-vote accuracy (gain over baseline fp32 in points). "
             "Bytes: selected ensemble int8+gzip as % of the baseline's fp32 ONNX. Cost: (pool + quantise + select) "
             "seconds / baseline training seconds (for a shared baseline: the seconds of the run that trained it, "
             "under different contention, so only the epoch ratio compares across rows). Epochs: pool fine-tuning "
             "epochs / baseline epochs.", "",
             "| variant | seeds | baseline fp32 | member int8 (mean) | sparsity % | pool vote | disagreement | vote − mean "
             "| selected ensemble | best strategy (gain) | bytes % | cost | epochs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(r) for r in rows]
    lines.append("")
    for r in rows:
        lines.append(f"- {r['name']}: `{r['command']}`")
    lines += ["", f"![gain against bytes and cost](figures/{FIGURE.name})", ""]
    figure(rows)
    text = "\n".join(lines)
    print(text)
    replace_section(ROOT / "docs" / "RESULTS.md", TITLE, text)


if __name__ == "__main__":
    main(sys.argv[1:])
