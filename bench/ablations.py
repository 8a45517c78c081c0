"""Ablation table from bench/results/cifar10-*.json (written by bench/cifar10.py); replaces the
``## CIFAR-10: ablations`` section of docs/RESULTS.md.

    python bench/ablations.py cifar10-cpu cifar10-cpu-clones cifar10-cpu-mask-noise ...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10 import ROOT, STRATEGIES, replace_section  # noqa: E402

TITLE = "## CIFAR-10: ablations"


def row(r: dict) -> str:
    a = r["aggregate"]
    f = lambda k, s=100, d=2: (f"{s * a[k]['mean']:.{d}f}" + (f" ± {s * a[k]['sd']:.{d}f}" if len(r["seeds"]) > 1 else "")  # noqa: E731
                               if k in a else "n/a")
    best = max(STRATEGIES, key=lambda s: a[f"ensemble_test_acc.{s}.soft"]["mean"])
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
    lines.append("")
    text = "\n".join(lines)
    print(text)
    replace_section(ROOT / "docs" / "RESULTS.md", TITLE, text)


if __name__ == "__main__":
    main(sys.argv[1:])
