"""The figures of the pool: accuracy against size and sparsity, the frontier, the cluster map, disagreement and the
selection strategies."""

from __future__ import annotations

import inspect

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from .load import Run
from .plot import Missing, _cluster_legend, _colour, _figure, _label_points, _log_axis, _selected_marker

# --------------------------------------------------------------------------- the figures, one function each


def fig_accuracy_vs_size(run: Run) -> Figure | Missing:
    """Every pool member's int8 validation accuracy against its compressed int8 size; the baseline and ensemble too."""
    from matplotlib.lines import Line2D

    if not run.quant:
        return Missing("needs pool/*/quant.json (phase 'quantize')")
    fig = _figure(9, 5.2)
    ax = fig.add_subplot()
    clusters, selected = run.clusters, set(run.selected)
    extra = []
    for name, q in run.quant.items():
        x, y = q.bytes.int8_gzip / 1024, q.val_acc_int8
        if not q.ok:
            ax.scatter(x, y, marker="x", s=60, color="#9e9e9e", zorder=3)
        else:
            ax.scatter(
                x,
                y,
                s=60,
                color=_colour(clusters.get(name)),
                zorder=3,
                edgecolors="black" if name in selected else "none",
                linewidths=2,
            )
    if any(not q.ok for q in run.quant.values()):
        extra.append(Line2D([], [], ls="", marker="x", ms=8, color="#9e9e9e", label="dropped by the int8 gate"))
    extra += _reference_points(ax, run)
    if selected:
        extra.insert(0, _selected_marker())
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("model size: int8 ONNX file, gzip-compressed (KiB, log scale)")
    ax.set_ylabel("validation accuracy (int8)")
    ax.set_title("Pool members: accuracy against size")
    ax.grid(True, which="both", alpha=0.3)
    if clusters:
        _cluster_legend(ax, list(clusters.values()), extra, loc="lower right", ncols=2)
    elif extra:
        ax.legend(handles=extra, fontsize=9, loc="lower right")
    if len(run.quant) <= 40:
        _label_points(
            ax,
            [q.bytes.int8_gzip / 1024 for q in run.quant.values()],
            [q.val_acc_int8 for q in run.quant.values()],
            list(run.quant),
            selected,
        )
    return fig


def _reference_points(ax, run: Run) -> list:
    """The int8 baseline (a square, with its fp32 accuracy as a dashed line) and the selected ensemble (a star, at
    its total size) on the accuracy-against-size axes; their legend handles."""
    from matplotlib.lines import Line2D

    handles = []
    if run.baseline_quant:
        bq = run.baseline_quant
        ax.scatter(bq.bytes.int8_gzip / 1024, bq.val_acc_int8, marker="s", s=90, color="black", zorder=4)
        ax.axhline(bq.val_acc_fp32, color="black", ls="--", lw=1)
        handles += [
            Line2D([], [], ls="", marker="s", ms=9, color="black", label="baseline, int8"),
            Line2D([], [], ls="--", color="black", lw=1, label="baseline fp32 accuracy"),
        ]
    if run.metrics:
        e = run.metrics["ensemble"]
        ax.scatter(
            e["bytes"]["int8_gzip"] / 1024, e["val_acc"], marker="*", s=320, color="gold", edgecolors="black", zorder=5
        )
        label = f"selected ensemble (k={e['k']}; total size)"
        handles.append(Line2D([], [], ls="", marker="*", ms=15, color="gold", mec="black", label=label))
    return handles


def frontier_axes(points: list[tuple[str, float, float, float, str]], parent: float, title: str) -> Figure:
    """Accuracy against bytes per device: ``points`` are (label, bytes as a fraction of the parent's fp32 ONNX,
    accuracy in %, its sd, group); one marker per group, the parent's fp32 accuracy as a dashed line."""
    markers = "o^sDvP*X"
    fig = _figure(9, 5.2)
    ax = fig.add_subplot()
    groups = list(dict.fromkeys(g for *_, g in points))
    for i, group in enumerate(groups):
        pts_ = [p for p in points if p[4] == group]
        ax.errorbar(
            [100 * p[1] for p in pts_],
            [p[2] for p in pts_],
            yerr=[p[3] for p in pts_],
            ls="",
            marker=markers[i % len(markers)],
            ms=8,
            capsize=3,
            color=_colour(i),
            label=group,
        )
        for label, x, y, *_ in pts_:
            ax.annotate(label, (100 * x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(parent, color="black", ls="--", lw=1, label="parent, fp32")
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    ax.set_xlabel("bytes per device as shipped (% of the parent's fp32 ONNX, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9, loc="lower right")
    return fig


def fig_frontier(run: Run) -> Figure | Missing:
    """This run on the frontier: each member, the selected ensemble (its largest member's bytes: one device holds
    one member) and the parent, test accuracy against bytes per device as shipped."""
    if not run.metrics:
        return Missing("needs metrics.json (phase 'evaluate')")
    m = run.metrics
    b, e = m["baseline"], m["ensemble"]
    fp32 = b["bytes"]["fp32"]
    by_name = {x["name"]: x for x in m["members"]}
    pool = [
        (x["name"], x["bytes"]["shipped"] / fp32, 100 * x["test_acc_int8"], 0.0, "member, int8")
        for x in by_name.values()
    ]
    largest = max(by_name[n]["bytes"]["shipped"] for n in e["members"]) / fp32
    points = [
        *pool,
        (f"ensemble k={e['k']}", largest, 100 * e["test_acc"], 0.0, "selected ensemble"),
        ("parent int8", b["bytes"]["shipped"] / fp32, 100 * b["test_acc_int8"], 0.0, "parent"),
        ("parent fp32", 1.0, 100 * b["test_acc_fp32"], 0.0, "parent"),
    ]
    return frontier_axes(points, 100 * b["test_acc_fp32"], "This run: test accuracy against bytes per device")


def _mds(d: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D metric MDS of a precomputed dissimilarity matrix (scikit-learn's ``MDS``, old or new keyword names)."""
    from sklearn.manifold import MDS

    if not d.any():
        return np.zeros((len(d), 2))
    if "metric_mds" in inspect.signature(MDS).parameters:  # scikit-learn >= 1.8 renamed dissimilarity= to metric=
        mds = MDS(n_components=2, metric="precomputed", init="classical_mds", random_state=seed)
    else:
        mds = MDS(n_components=2, dissimilarity="precomputed", n_init=4, random_state=seed, normalized_stress="auto")
    return mds.fit_transform(d)


def fig_cluster_map(run: Run) -> Figure | Missing:
    """The members laid out in 2-D so that distance approximates how often two members disagree (validation)."""
    if run.val_disagreement is None:
        return Missing(
            "needs at least two members that passed the int8 gate, with pool/*/val_proba.npy (phase 'quantize')"
        )
    names, d = run.val_disagreement
    xy = _mds(100 * d)
    clusters, selected = run.clusters, set(run.selected)
    fig = _figure(7.5, 6)
    ax = fig.add_subplot()
    for (x, y), n in zip(xy, names):
        ax.scatter(
            x,
            y,
            s=90,
            color=_colour(clusters.get(n)),
            edgecolors="black" if n in selected else "none",
            linewidths=2,
            zorder=3,
        )
    ax.set_aspect("equal", adjustable="datalim")
    ax.margins(0.15)
    ax.set_xlabel("MDS axis 1 (distance in % of images voted differently)")
    ax.set_ylabel("MDS axis 2")
    ax.set_title("Cluster map: members close together vote alike (validation)")
    ax.grid(True, alpha=0.3)
    if clusters:
        _cluster_legend(ax, list(clusters.values()), [_selected_marker()] if selected else [], loc="best")
    if len(names) <= 40:
        _label_points(ax, xy[:, 0], xy[:, 1], names, selected)
    return fig


def fig_disagreement_heatmap(run: Run) -> Figure | Missing:
    """Pairwise validation disagreement of the members, ordered by cluster."""
    if run.val_disagreement is None:
        return Missing(
            "needs at least two members that passed the int8 gate, with pool/*/val_proba.npy (phase 'quantize')"
        )
    names, d = run.val_disagreement
    clusters, selected = run.clusters, set(run.selected)
    order = sorted(range(len(names)), key=lambda i: (clusters.get(names[i], -1), names[i]))
    d = d[np.ix_(order, order)]
    labels = [
        names[i]
        + (f" · c{clusters[names[i]]}" if names[i] in clusters else "")
        + (" ★" if names[i] in selected else "")
        for i in order
    ]
    n = len(names)
    side = min(9, 2.5 + 0.4 * n)
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(100 * d, cmap="viridis")
    fig.colorbar(im, ax=ax, shrink=0.8, label="% of validation images on which the two members' votes differ")
    if n <= 60:  # beyond that the names would overlap (the member table lists every member)
        ax.set_xticks(range(n), labels, rotation=90, fontsize=8 if n <= 30 else 5)
        ax.set_yticks(range(n), labels, fontsize=8 if n <= 30 else 5)
    else:
        ax.set_xlabel("members, grouped by cluster")
    if n <= 16:
        for i in range(n):
            for j in range(n):
                if i != j:
                    ax.text(
                        j,
                        i,
                        f"{100 * d[i, j]:.1f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if d[i, j] < 0.6 * d.max() else "black",
                    )
    # lines between clusters
    cl = [clusters.get(names[i], -1) for i in order]
    for b in [i for i in range(1, n) if cl[i] != cl[i - 1]]:
        ax.axhline(b - 0.5, color="white", lw=2)
        ax.axvline(b - 0.5, color="white", lw=2)
    ax.set_title("Disagreement between members, grouped by cluster (★ = selected)")
    return fig


def fig_accuracy_vs_sparsity(run: Run) -> Figure | Missing:
    """Validation accuracy against measured sparsity, before (fp32) and after (int8) quantisation."""
    if not run.members:
        return Missing("needs pool/*/member.json (phase 'pool')")
    selected = set(run.selected)
    fig = _figure(9, 5)
    ax = fig.add_subplot()
    s = np.array([m.measured_sparsity["overall"] for m in run.members])
    fp32 = np.array([m.val_acc_fp32 for m in run.members])
    ax.scatter(
        s, fp32, s=60, facecolors="none", edgecolors="#1f77b4", linewidths=1.5, label="pool member, fp32", zorder=3
    )
    q = [(si, run.quant[m.name].val_acc_int8, a) for si, a, m in zip(s, fp32, run.members) if m.name in run.quant]
    if q:
        for si, a8, a32 in q:
            ax.plot([si, si], [a32, a8], color="#bbbbbb", lw=1, zorder=1)
        ax.scatter(
            [x[0] for x in q], [x[1] for x in q], s=45, marker="^", color="#d62728", label="pool member, int8", zorder=3
        )
    if run.baseline:
        ax.axhline(run.baseline["val_acc_fp32"], color="black", ls="--", lw=1, label="baseline (0% sparsity), fp32")
    if run.baseline_quant:
        ax.axhline(run.baseline_quant.val_acc_int8, color="black", ls=":", lw=1.5, label="baseline (0% sparsity), int8")
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("measured sparsity (share of prunable weights that are exactly zero)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Accuracy against sparsity, fp32 and int8" + (" (names in bold: selected)" if selected else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, loc="lower left")
    ax.margins(x=0.12, y=0.08)
    if len(run.members) <= 40:
        _label_points(ax, s, fp32, [m.name for m in run.members], selected, fontsize=7)
    return fig


STRATEGY_STYLE = {
    "accuracy-first": ("#1f77b4", "o"),
    "diversity-first": ("#ff7f0e", "s"),
    "top-k": ("#2ca02c", "^"),
    "random": ("#7f7f7f", "v"),
    "greedy": ("#9467bd", "D"),
}


def fig_strategy_curves(run: Run) -> Figure | Missing:
    """Ensemble accuracy against the number of members, for every selection strategy; validation and test."""
    if not run.metrics or not run.metrics.get("curves"):
        return Missing("needs metrics.json (phase 'evaluate')")
    m = run.metrics
    fig = _figure(11, 5.4)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, split, title in (
        (axes[0], "val", "validation: what the selection sees"),
        (axes[1], "test", "test: reported only, never used to choose"),
    ):
        n = len(m["curves"])
        for i, (name, curve) in enumerate(m["curves"].items()):
            colour, marker = STRATEGY_STYLE.get(name, ("black", "o"))
            shift = 0.07 * (i - (n - 1) / 2)  # side by side, so that strategies with equal accuracy stay visible
            ax.plot(
                [p["k"] + shift for p in curve],
                [p[f"{split}_acc"] for p in curve],
                marker=marker,
                color=colour,
                label=name,
                lw=1.5,
                ms=5,
            )
        e = m["ensemble"]
        ax.scatter(
            e["k"],
            e[f"{split}_acc"],
            marker="*",
            s=300,
            color="gold",
            edgecolors="black",
            zorder=5,
            label=f"chosen: {e['strategy']}, k={e['k']}",
        )
        base = m["baseline"][f"{split}_acc_fp32"]
        ax.axhline(base, color="black", ls="--", lw=1, label="baseline fp32")
        ax.set_title(title)
        ax.set_xlabel("number of members voting (k)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"ensemble accuracy ({m['ensemble']['rule']} vote)")
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside lower center", ncols=4, fontsize=9)
    fig.suptitle("Selection strategies compared")
    return fig
