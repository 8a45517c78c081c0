"""Method table and frontier figure from bench/results/cifar10-*.json (bench/cifar10.py), with the reference rows
of ``<name>-reference.json`` (bench/reference.py) where one exists; replaces the ``## CIFAR-10: ablations`` section
of docs/RESULTS.md and writes docs/figures/cifar10-frontier.png.

    python bench/ablations.py cifar10-cpu cifar10-cpu-clones cifar10-cpu-mask-noise ...
    python bench/ablations.py cifar10-cpu --no-docs        # print the table, leave docs/RESULTS.md as it is
"""

from __future__ import annotations

import json
from pathlib import Path

from cifar10 import best_strategy
from common import RESULTS, ROOT, aggregate, argparser, publish, shipped_bytes
from matplotlib.figure import Figure

TITLE = "## CIFAR-10: ablations"
FIGURE = ROOT / "docs" / "figures" / "cifar10-frontier.png"
MEMBER_LIMIT, COST_LIMIT = 5, 1  # % of the baseline's fp32 ONNX per member; pool cost in baseline trainings
HEADER = [
    "| method | seeds | baseline fp32 | members int8 (mean) | sparsity % | pool vote | disagreement | vote − mean "
    "| shipped ensemble | gain | best strategy (gain) | bytes per member % | bytes % | cost | epochs |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def method_aggregate(r: dict) -> dict:
    """The variant's aggregate (mean, sd over seeds) plus its shipped ensemble's bytes: the largest member
    (``member_bytes``) and all of them (``ensemble_bytes``), as shipped, over the baseline's fp32 ONNX."""
    runs = {}
    for seed, run in r["runs"].items():
        sizes = [shipped_bytes(b) / run["baseline_bytes"]["fp32"] for b in run["selected"]["bytes"]]
        runs[seed] = {**run, "member_bytes": max(sizes), "ensemble_bytes": sum(sizes)}
    return aggregate(runs)


def cell(a: dict, key: str, scale: float = 100, digits: int = 2) -> str:
    """mean ± sd of an aggregated number (the mean alone where sd is 0, as for one seed); ``n/a`` where it is missing."""
    if key not in a:
        return "n/a"
    v = a[key]
    return f"{scale * v['mean']:.{digits}f}" + (f" ± {scale * v['sd']:.{digits}f}" if v["sd"] else "")


def method_row(r: dict) -> str:
    a = method_aggregate(r)
    best = best_strategy(a)
    gain = 100 * (a[f"ensemble_test_acc.{best}.soft"]["mean"] - a["baseline_fp32_test_acc"]["mean"])
    shared = " (baseline shared)" if any("baseline_from" in x for x in r["runs"].values()) else ""
    return (
        f"| {r['name']}{shared} | {', '.join(map(str, r['seeds']))} | {cell(a, 'baseline_fp32_test_acc')} | "
        f"{cell(a, 'member_test_acc_int8_mean')} | {cell(a, 'member_sparsity_mean', 100, 1)} | {cell(a, 'pool_vote_test_acc')} | "
        f"{cell(a, 'pool_mean_disagreement', 1, 3)} | {cell(a, 'pool_vote_minus_mean_member')} | "
        f"{cell(a, 'selected.test_acc')} (k={cell(a, 'k', 1, 0)}) | {cell(a, 'selected.gain_vs_baseline_fp32')} | "
        f"{best}: {cell(a, f'ensemble_test_acc.{best}.soft')} ({gain:+.2f}) | {cell(a, 'member_bytes', 100, 1)} | "
        f"{cell(a, 'ensemble_bytes', 100, 1)} | {cell(a, 'pool_cost_vs_baseline', 1, 2)} | {epoch_cost(r):.2f} |"
    )


def reference_rows(ref: dict) -> list[str]:
    """Deep ensemble, compute-matched baseline and one member of a variant's runs (bench/reference.py)."""
    a, de, seeds = ref["aggregate"], ref["deep_ensemble"], ", ".join(map(str, ref["seeds"]))
    base = cell(a, "baseline_fp32_test_acc")
    epochs = a["compute_matched.epochs"]["mean"] / a["compute_matched.baseline_epochs"]["mean"]
    rows = []
    if de:
        gain = f"{100 * de['gain_vs_mean_baseline_fp32']:+.2f}"
        rows.append(
            f"| **deep ensemble**: {de['k']} fp32 baselines of {ref['name']}, one per seed | {seeds} | {base} | – | – | – | "
            f"{de['mean_disagreement']:.3f} | {gain} | {100 * de['test_acc']:.2f} (k={de['k']}) | {gain} | – | 100 | "
            f"{100 * de['bytes_vs_baseline_fp32']:.0f} | {de['cost_vs_baseline']} | {de['cost_vs_baseline']:.2f} |"
        )
    one = next(iter(ref["runs"].values()))["one_member"]
    rows += [
        f"| **compute-matched baseline** of {ref['name']}: trained on for "
        f"{a['compute_matched.epochs']['mean']:g} more epochs | {seeds} | {base} "
        f"| – | – | – | – | – | {cell(a, 'compute_matched.test_acc')} | {cell(a, 'compute_matched.gain_vs_baseline_fp32')} "
        f"| – | 100 | 100 | {cell(a, 'compute_matched.cost_vs_baseline', 1)} | {epochs:.2f} |",
        f"| **one member** of {ref['name']} ({one['strategy']}, k = 1) | {seeds} | {base} | – | – | – | – | – | "
        f"{cell(a, 'one_member.test_acc')} | {cell(a, 'one_member.gain_vs_baseline_fp32')} | – | "
        f"{cell(a, 'one_member.bytes_vs_baseline_fp32', 100, 1)} | {cell(a, 'one_member.bytes_vs_baseline_fp32', 100, 1)} | "
        f"{cell(a, 'one_member.cost_vs_baseline', 1)} | – |",
    ]
    return rows


def epoch_cost(r: dict) -> float:
    """Fine-tuning epochs of the whole pool over the baseline's training epochs (the planned compute ratio)."""
    c = r["config_resolved"]
    e = c["pool"]["epochs"] if isinstance(c["pool"]["epochs"], list) else [c["pool"]["epochs"]] * 2
    return c["pool"]["size"] * (e[0] + e[1]) / 2 / c["train"]["epochs"]


def table(rows: list[dict], refs: list[dict]) -> str:
    """The section's markdown: reference rows first, then one row per method, then the commands."""
    lines = [
        TITLE,
        "",
        "All numbers are test accuracy in % (mean ± sd over the seeds listed), read from each run's metrics.json. "
        "Disagreement: mean pairwise fraction of test images on which two pool members' int8 predictions differ "
        "(the deep ensemble: its fp32 baselines). Vote − mean: soft vote of the whole pool minus its members' mean "
        "accuracy (points). Shipped ensemble: the configured selection strategy, chosen on validation; gain: its test "
        "accuracy minus the baseline fp32's (points). Best strategy: the one with the highest mean soft-vote test "
        "accuracy (chosen on test: for comparison only). Bytes per member: the shipped ensemble's largest member, "
        "bytes: all its members, as shipped (int8+gzip where no shipped size is recorded), in % of the baseline's "
        "fp32 ONNX. Cost: compute beyond the trained baseline, in baseline trainings: (pool + quantise + select) "
        "seconds / baseline training seconds (for a shared baseline: the seconds of the run that trained it, under "
        "different contention, so only the epoch ratio compares across rows); the deep ensemble's k − 1 further "
        "baselines; the compute-matched baseline's extra epochs. Epochs: the pool's fine-tuning epochs (reference "
        "rows: the extra training epochs) / the baseline's epochs. "
        "Reference rows (bench/reference.py): the **deep ensemble** is the ceiling, the **compute-matched baseline** "
        "is what the pool's compute buys in one model, **one member** is the same bytes on one device.",
        "",
        *HEADER,
    ]
    for ref in refs:
        lines += reference_rows(ref)
    lines += [method_row(r) for r in rows]
    lines.append("")
    lines += [f"- {r['name']} (reference rows): `{r['command']}`" for r in refs]
    lines += [f"- {r['name']}: `{r['command']}`" for r in rows]
    lines += ["", f"![gain against bytes per member and cost](figures/{FIGURE.name})", ""]
    return "\n".join(lines)


def point(r: dict) -> dict:
    """A method on the frontier: its shipped ensemble's gain (points), largest member (% of the baseline's fp32
    ONNX) and pool cost, mean and sd over seeds."""
    a = method_aggregate(r)
    out = {"name": r["name"].removeprefix("cifar10-cpu-") if r["name"] != "cifar10-cpu" else "cifar10-cpu (default)"}
    for k, key, scale in (
        ("gain", "selected.gain_vs_baseline_fp32", 100),
        ("bytes", "member_bytes", 100),
        ("cost", "pool_cost_vs_baseline", 1),
    ):
        out[k], out[f"{k}_sd"] = scale * a[key]["mean"], scale * a[key]["sd"]
    return out


def figure(rows: list[dict], refs: list[dict], path: Path) -> None:
    """Gain of each method against bytes per member and against cost, with the reference gains and the limits."""
    points = [point(r) for r in rows]
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    for ax, key, label, limit in zip(
        fig.subplots(1, 2),
        ("bytes", "cost"),
        (
            "largest member as shipped, % of the baseline's fp32 ONNX",
            "pool + quantise + select wall time / baseline training time",
        ),
        (f"limit: {MEMBER_LIMIT} % per member", f"limit: {COST_LIMIT} x"),
    ):
        for p in points:
            ax.errorbar(p[key], p["gain"], xerr=p[f"{key}_sd"], yerr=p["gain_sd"], fmt="o", capsize=3)
            ax.annotate(p["name"], (p[key], p["gain"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
        for ref in refs:
            if ref["deep_ensemble"]:
                de = ref["deep_ensemble"]
                ax.axhline(
                    100 * de["gain_vs_mean_baseline_fp32"],
                    color="green",
                    ls="--",
                    lw=1,
                    label=f"deep ensemble of {de['k']} baselines ({ref['name']})",
                )
            cm = ref["aggregate"]["compute_matched.gain_vs_baseline_fp32"]
            ax.axhline(
                100 * cm["mean"], color="orange", ls="-.", lw=1, label=f"compute-matched baseline ({ref['name']})"
            )
            ax.axhspan(100 * (cm["mean"] - cm["sd"]), 100 * (cm["mean"] + cm["sd"]), color="orange", alpha=0.15, lw=0)
        ax.axhline(0, color="grey", lw=1, label="baseline fp32")
        ax.axvline(MEMBER_LIMIT if key == "bytes" else COST_LIMIT, color="red", ls=":", lw=1, label=limit)
        ax.set_xlabel(label)
        ax.set_ylabel("shipped ensemble's gain over baseline fp32 (points)")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle("CIFAR-10: accuracy gain against bytes per member and cost (mean ± sd over seeds)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparser(__doc__)
    ap.add_argument("names", nargs="+", help="results of bench/cifar10.py: bench/results/NAME.json")
    args = ap.parse_args()
    rows = [json.loads((RESULTS / f"{n}.json").read_text()) for n in args.names]
    refs = [
        json.loads((RESULTS / f"{n}-reference.json").read_text())
        for n in args.names
        if (RESULTS / f"{n}-reference.json").exists()
    ]
    figure(rows, refs, FIGURE)
    publish(TITLE, table(rows, refs), not args.no_docs)


if __name__ == "__main__":
    main()
