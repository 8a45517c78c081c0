"""The page: every figure in order (:data:`FIGURES`), the headline, and :func:`write`, which draws what the run
allows and renders ``templates/report.html.j2``."""

from __future__ import annotations

import base64
from pathlib import Path

from .. import store
from .decisions import (
    class_deltas,
    fig_baseline_history,
    fig_class_gains,
    fig_confusion,
    fig_degradation,
    fig_disputed_images,
    fig_risk_coverage,
    fig_timings,
)
from .load import FORMATS, Run, load
from .members import (
    fig_accuracy_vs_size,
    fig_accuracy_vs_sparsity,
    fig_cluster_map,
    fig_disagreement_heatmap,
    fig_frontier,
    fig_strategy_curves,
)
from .plot import Missing, _colour, _png

TEMPLATE = "report.html.j2"


# (id, section, title, one-line explanation, function), in page order
FIGURES = [
    (
        "frontier",
        "pool",
        "Bytes per device against accuracy",
        "Where this run stands: every member and the selected ensemble by the bytes one device holds (as shipped; "
        "an ensemble places one member per device, so its largest member counts) and by test accuracy, against the "
        "parent in fp32 and int8. The same axes as the frontier of methods in docs/RESULTS.md.",
        fig_frontier,
    ),
    (
        "accuracy-vs-size",
        "pool",
        "Accuracy against size",
        "Each dot is one pruned, int8-quantised pool member: further left is smaller on the wire, higher is more accurate "
        "on validation. Colour = cluster, black ring = selected, black square = the unpruned baseline in int8, "
        "star = the selected ensemble (all its members' sizes added up).",
        fig_accuracy_vs_size,
    ),
    (
        "accuracy-vs-sparsity",
        "pool",
        "Accuracy against sparsity",
        "What pruning costs: each member's validation accuracy at its measured sparsity, before (fp32, circle) and after "
        "(int8, triangle) quantisation; a grey line joins the two. The black lines are the unpruned baseline's accuracy.",
        fig_accuracy_vs_sparsity,
    ),
    (
        "cluster-map",
        "clusters",
        "Cluster map",
        "Members placed in 2-D (multidimensional scaling) so that the distance between two dots approximates how often "
        "their int8 votes differ on validation images; the ensemble wants members from different clusters.",
        fig_cluster_map,
    ),
    (
        "disagreement-heatmap",
        "clusters",
        "Disagreement matrix",
        "The same numbers as the map, exactly: the percentage of validation images on which two members vote differently, "
        "rows and columns grouped by cluster (white lines separate clusters).",
        fig_disagreement_heatmap,
    ),
    (
        "strategy-curves",
        "strategies",
        "Accuracy against number of members",
        "Accuracy of the voting ensemble as members are added, for each way of choosing them. Left: validation, which the "
        "choices were made on. Right: test, shown for reference only. (Lines are nudged sideways so that equal ones stay "
        "visible.)",
        fig_strategy_curves,
    ),
    (
        "confusion",
        "errors",
        "Confusion matrices",
        "Rows: true class; columns: predicted class; the diagonal holds the correct answers, every other cell is a mistake.",
        fig_confusion,
    ),
    (
        "class-gains",
        "errors",
        "Per-class change",
        "Test accuracy of the ensemble minus that of the fp32 baseline, class by class: which classes the ensemble fixes "
        "and which it breaks.",
        fig_class_gains,
    ),
    (
        "risk-coverage",
        "decisions",
        "Deciding or sending to review",
        "Left: if only the frames a model is surest of are decided and the rest go to a person, how accurate are the "
        "decided ones? Frames are ranked by the vote's margin for the ensemble and by the top probability for the "
        "baseline; dots: the thresholds chosen on validation. Right: whether a top score of 0.9 is right 90% of the time.",
        fig_risk_coverage,
    ),
    (
        "degradation",
        "devices",
        "Accuracy as devices drop out",
        "The ensemble's test accuracy with j of its members missing, over every choice of which ones (or a random "
        "sample of them when there are many), beside the fp32 baseline and the best single member.",
        fig_degradation,
    ),
    (
        "disputed-images",
        "disagreement",
        "The most disputed test images",
        "The test images on which the selected members' votes are most split: each member's vote, the ensemble's answer "
        "and the truth; 'pairs disagreeing' is the share of member pairs that vote differently (images enlarged with "
        "nearest-neighbour pixels).",
        fig_disputed_images,
    ),
    (
        "baseline-history",
        "training",
        "Baseline training",
        "How the baseline learned, epoch by epoch: training loss, and accuracy on training and validation data.",
        fig_baseline_history,
    ),
    (
        "timings",
        "training",
        "Phase timings",
        "Where the run's time went. (Written before this report, so the 'report' phase itself is not included the first "
        "time.)",
        fig_timings,
    ),
]


# --------------------------------------------------------------------------- the page


def headline(run: Run) -> dict | None:
    """Headline numbers for the template, each with the metrics.json path it comes from (the page marks them)."""
    if not run.metrics:
        return None
    m = run.metrics
    b, e = m["baseline"], m["ensemble"]
    members = {mm["name"]: mm for mm in m["members"]}
    return {
        "baseline": b,
        "ensemble": e,
        "shipped": m.get("shipped"),  # none in a metrics.json from before the fallback
        "k_reason": m.get("k_choice", {}).get("reason") if m.get("k_choice", {}).get("by") == "auto" else None,
        "shipped_label": run.shipped_label,
        "pool": m.get("pool"),
        "pool_vote": m["pool_vote"],
        "pool_size": len(m["members"]),
        "warnings": m.get("warnings", []),  # none in a metrics.json from before the check
        "data_warnings": m["dataset"].get("warnings", []),  # images copied across the splits
        "selected": [members[n] for n in e["members"]],
        "significant": e["mcnemar_p_vs_baseline_fp32"] < 0.05,
        "ratio": {k: e["bytes"][k] / b["bytes"][k] for k in ("fp32", "int8", "int8_gzip", "shipped")},
        "ratio_vs_fp32": e["bytes"]["shipped"] / b["bytes"]["fp32"],
        "n_test": len(run.test["y"]) if run.test else None,
    }


def config_blocks(text: str) -> list[str]:
    """config.yaml split into its top-level sections (leading plain settings together), to lay out side by side."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if not blocks or (not line.startswith((" ", "-")) and line.rstrip().endswith(":")):
            blocks.append([])
        blocks[-1].append(line)
    return ["\n".join(b) for b in blocks]


def render(run: Run, figures: list[dict]) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent.parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(FORMATS)
    env.globals.update(fmt=lambda kind, value: FORMATS[kind](value), colour=_colour)
    return env.get_template(TEMPLATE).render(
        run=run,
        figures=figures,
        head=headline(run),
        missing=run.missing(),
        config=config_blocks(run.config_text),
        deltas=class_deltas(run) if run.evaluated else None,
        strategies=(run.metrics or {}).get("strategies"),
        members={m["name"]: m for m in (run.metrics or {}).get("members", [])},
    )


def write(run_dir: Path | str) -> Path:
    """Draw every figure this run allows, write ``figures/<id>.png`` and ``report.html``; returns the page's path."""
    run = load(run_dir)
    out = run.dir / store.FIGURES
    out.mkdir(exist_ok=True)
    figures = []
    for fid, section, title, caption, draw in FIGURES:
        (out / f"{fid}.png").unlink(missing_ok=True)  # no stale figure from an earlier report
        result = draw(run)
        entry = {"id": fid, "section": section, "title": title, "caption": caption, "missing": None, "data": None}
        if isinstance(result, Missing):
            entry["missing"] = str(result)
        else:
            png = _png(result)
            store.write_bytes(out / f"{fid}.png", png)
            entry["data"] = "data:image/png;base64," + base64.b64encode(png).decode()
        figures.append(entry)
    path = run.dir / store.REPORT
    store.write_bytes(path, render(run, figures).encode())
    return path
