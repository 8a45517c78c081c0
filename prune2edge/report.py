"""The run report: ``RUN_DIR/report.html``, one self-contained page, and its figures as ``RUN_DIR/figures/*.png``.

Read top to bottom: what a run directory holds (:func:`load`), one function per figure, then :func:`write`,
which draws every figure it can, renders ``templates/report.html.j2`` and writes the files.

The report reads only what the pipeline wrote. The test split appears only through ``test.npz`` and
``test_scores.npz``, which the evaluation wrote; nothing here loads a dataset. A run that stopped early gets a
report of what exists and a list of what is missing.
"""

from __future__ import annotations

import base64
import functools
import inspect
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, PercentFormatter

from . import selective, store
from .errors import UserError
from .vote import disagreement, margin

TEMPLATE = "report.html.j2"
DPI = 110


# --------------------------------------------------------------------------- formatting (page and figures)


def pct(x: float) -> str:
    """An accuracy as a percentage: ``0.99111`` -> ``99.11%``."""
    return f"{100 * x:.2f}%"


def pts(x: float) -> str:
    """An accuracy difference in percentage points: ``-0.0044`` -> ``-0.44 pts``."""
    return f"{100 * x:+.2f} pts"


def kib(n: float) -> str:
    """A size in KiB: ``96815`` -> ``94.5 KiB``."""
    return f"{n / 1024:,.1f} KiB"


def pvalue(p: float) -> str:
    return f"{p:.3g}"


def times(x: float) -> str:
    """A ratio: ``1.694`` -> ``×1.69``."""
    return f"×{x:.2f}"


def dec(x: float) -> str:
    """A score or error in [0, 1]: ``0.012345`` -> ``0.0123``."""
    return f"{x:.4f}"


def ms(x: float) -> str:
    """Milliseconds: ``0.04712`` -> ``0.047 ms``."""
    return f"{x:.3f} ms"


FORMATS: dict[str, Callable] = {
    "pct": pct,
    "pts": pts,
    "kib": kib,
    "p": pvalue,
    "int": str,
    "times": times,
    "dec": dec,
    "ms": ms,
}


# --------------------------------------------------------------------------- what the run directory holds


def _json(path: Path) -> dict | None:
    return store.read_json(path) if path.exists() else None


def _npz(path: Path) -> dict | None:
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@dataclass
class Run:
    """Everything the pipeline wrote to a run directory; ``None`` for what a phase has not written yet."""

    dir: Path
    dataset: dict  # dataset.json: name, classes, image_shape, n_train/n_val/n_test
    config_text: str  # config.yaml as written, every setting resolved
    config: dict
    baseline: dict | None  # baseline/model.json (architecture, training history)
    baseline_quant: dict | None  # baseline/quant.json (int8 validation accuracy, sizes)
    members: list[dict]  # pool/<name>/member.json, each with "quant": its quant.json or None
    selection: dict | None  # selection.json: clusters, selected members, strategies
    metrics: dict | None  # metrics.json: the test-set evaluation
    test: dict | None  # test.npz: raw test images x (NHWC) and labels y
    scores: dict | None  # test_scores.npz: every member's, the baselines' and the ensemble's test scores
    timings: dict | None  # timings.json: seconds per phase

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.dataset["classes"]]

    @property
    def clusters(self) -> dict[str, int]:
        """Cluster of each member that passed the int8 gate (empty before selection)."""
        if not self.selection:
            return {}
        return dict(zip(self.selection["candidates"], self.selection["clustering"]["labels"]))

    @property
    def selected(self) -> list[str]:
        return list(self.selection["selected"]) if self.selection else []

    @property
    def voters(self) -> list[str]:
        """The models the bundle ships (``metrics.json`` ``shipped``; the selected ensemble in older runs)."""
        m = self.metrics or {}
        return list((m.get("shipped") or m["ensemble"])["members"])

    @property
    def shipped_label(self) -> str:
        """What the bundle ships, in a few words: ``ensemble``, ``member m003`` or ``int8 parent``."""
        s = (self.metrics or {}).get("shipped")
        if not s or s["kind"] == "ensemble":
            return "ensemble"
        return "int8 parent" if s["kind"] == "parent" else f"member {s['members'][0]}"

    @property
    def evaluated(self) -> bool:
        return self.metrics is not None and self.test is not None and self.scores is not None

    @functools.cached_property
    def val_disagreement(self) -> tuple[list[str], np.ndarray] | None:
        """Members that passed the int8 gate, and how often each pair's int8 votes differ on the validation split."""
        names = [
            m["name"]
            for m in self.members
            if m["quant"]
            and m["quant"]["status"] == "ok"
            and (self.dir / "pool" / m["name"] / "val_proba.npy").exists()
        ]
        if len(names) < 2:
            return None
        proba = np.stack([np.load(self.dir / "pool" / n / "val_proba.npy") for n in names])
        return names, disagreement(proba)

    def missing(self) -> list[str]:
        """What a complete run would have and this one lacks, phase by phase, and what the report loses."""
        out = []
        if self.baseline is None:
            out.append("baseline/model.json: the baseline is not trained yet (phase 'baseline').")
        planned = self.config.get("pool", {}).get("size")
        if planned and len(self.members) < planned:
            out.append(f"pool/: {len(self.members)} of {planned} pool members are trained (phase 'pool').")
        unquantised = [m["name"] for m in self.members if m["quant"] is None]
        lacking = (
            [] if not unquantised else ["every pool member"] if len(unquantised) == len(self.members) else unquantised
        ) + ([] if self.baseline_quant else ["the baseline"])
        if lacking:
            out.append(
                "quant.json: int8 quantisation is not done (phase 'quantize'): no int8 accuracy or size for "
                f"{', '.join(lacking)}."
            )
        if self.selection is None:
            out.append("selection.json: members are not clustered or selected yet (phase 'select').")
        if not (self.dir / "bundle" / "manifest.json").exists():
            out.append("bundle/manifest.json: the ensemble bundle is not written yet (phase 'bundle').")
        absent = [
            n
            for n, v in (("metrics.json", self.metrics), ("test.npz", self.test), ("test_scores.npz", self.scores))
            if v is None
        ]
        if absent:
            out.append(
                f"{', '.join(absent)}: the test-set evaluation has not run (phase 'evaluate'): no test "
                "accuracies, selection-strategy curves, confusion matrices or disagreement examples."
            )
        if self.timings is None:
            out.append("timings.json: no phase timings.")
        return out


def load(run_dir: Path | str) -> Run:
    """Read a run directory; a directory that ``prune2edge run`` did not make is a :class:`UserError`."""
    d = Path(run_dir)
    if not d.is_dir():
        raise UserError(
            f"'{d}' is not a directory; pass the run directory of `prune2edge run` or `prune2edge demo` (their --out)"
        )
    lacking = [f for f in ("config.yaml", "dataset.json") if not (d / f).is_file()]
    if lacking:
        raise UserError(
            f"'{d}' is not a prune2edge run directory (no {' or '.join(lacking)}); pass the --out "
            "directory of `prune2edge run` or `prune2edge demo`"
        )
    text = (d / "config.yaml").read_text()
    members = []
    for p in sorted((d / "pool").glob("*/member.json")) if (d / "pool").is_dir() else []:
        members.append({**store.read_json(p), "quant": _json(p.parent / "quant.json")})
    return Run(
        dir=d,
        dataset=store.read_json(d / "dataset.json"),
        config_text=text,
        config=yaml.safe_load(text) or {},
        baseline=_json(d / "baseline" / "model.json"),
        baseline_quant=_json(d / "baseline" / "quant.json"),
        members=members,
        selection=_json(d / "selection.json"),
        metrics=_json(d / "metrics.json"),
        test=_npz(d / "test.npz"),
        scores=_npz(d / "test_scores.npz"),
        timings=_json(d / "timings.json"),
    )


# --------------------------------------------------------------------------- figure helpers


class Missing(str):
    """Returned by a figure function instead of a figure: why it cannot be drawn for this run."""


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


def _colour(cluster: int | None) -> str:
    """One colour per cluster (grey: no cluster)."""
    if cluster is None:
        return "#9e9e9e"
    palette = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#17becf",
        "#bcbd22",
        "#7f7f7f",
        "#393b79",
        "#637939",
        "#8c6d31",
        "#843c39",
        "#7b4173",
        "#3182bd",
        "#e6550d",
        "#31a354",
        "#756bb1",
        "#636363",
    ]
    return palette[cluster % len(palette)]


def _log_axis(axis) -> None:
    """Readable ticks on a log-scaled axis: 1, 2, 3, 5, 7 times powers of ten, plainly written."""
    axis.set_major_locator(LogLocator(base=10, subs=(1, 2, 3, 5, 7)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.4g}"))
    axis.set_minor_formatter(NullFormatter())


def _label_points(ax, xs, ys, names, bold=frozenset(), fontsize: float = 8) -> None:
    """Name each point, choosing for each label the first of a few spots that overlaps no point and no earlier label."""
    fig = ax.figure
    fig.canvas.draw()  # settle the layout, so that display coordinates are final
    pts = ax.transData.transform(np.column_stack([xs, ys]))
    px = fig.dpi / 72  # pixels per point
    h = 1.25 * fontsize * px
    placed, r = [], 6 * px
    obstacles = [(x - r, y - r, x + r, y + r) for x, y in pts]

    def overlap(a, b) -> float:
        return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))

    for (x, y), name, at in zip(pts, names, zip(xs, ys)):
        w = 0.62 * fontsize * px * len(name) * (1.1 if name in bold else 1)
        spots = [
            (6 * px, 2 * px),
            (6 * px, -h - 2 * px),
            (-6 * px - w, 2 * px),
            (-6 * px - w, -h - 2 * px),
            (-w / 2, 7 * px),
            (-w / 2, -h - 7 * px),
        ]
        boxes = [(x + dx, y + dy, x + dx + w, y + dy + h) for dx, dy in spots]
        cost = [sum(overlap(b, o) for o in obstacles + placed) for b in boxes]
        best = int(np.argmin(cost))
        placed.append(boxes[best])
        dx, dy = spots[best]
        ax.annotate(
            name,
            at,
            textcoords="offset points",
            xytext=(dx / px, dy / px),
            ha="left",
            va="bottom",
            fontsize=fontsize,
            fontweight="bold" if name in bold else "normal",
        ).set_in_layout(False)


def _cluster_legend(ax, clusters: list[int], extra: list | None = None, **kw) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], ls="", marker="o", ms=8, color=_colour(c), label=f"cluster {c}") for c in sorted(set(clusters))
    ]
    ax.legend(handles=handles + (extra or []), fontsize=9, **kw)


def _selected_marker():
    from matplotlib.lines import Line2D

    return Line2D([], [], ls="", marker="o", ms=11, mfc="none", mec="black", mew=2, label="selected for the ensemble")


# --------------------------------------------------------------------------- the figures, one function each


def fig_accuracy_vs_size(run: Run) -> Figure | Missing:
    """Every pool member's int8 validation accuracy against its compressed int8 size; the baseline and ensemble too."""
    from matplotlib.lines import Line2D

    ms = [m for m in run.members if m["quant"]]
    if not ms:
        return Missing("needs pool/*/quant.json (phase 'quantize')")
    fig = _figure(9, 5.2)
    ax = fig.add_subplot()
    clusters, selected = run.clusters, set(run.selected)
    extra = []
    for m in ms:
        q, name = m["quant"], m["name"]
        x, y = q["bytes"]["int8_gzip"] / 1024, q["val_acc_int8"]
        if q["status"] != "ok":
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
    if any(m["quant"]["status"] != "ok" for m in ms):
        extra.append(Line2D([], [], ls="", marker="x", ms=8, color="#9e9e9e", label="dropped by the int8 gate"))
    if run.baseline_quant:
        bq = run.baseline_quant
        ax.scatter(bq["bytes"]["int8_gzip"] / 1024, bq["val_acc_int8"], marker="s", s=90, color="black", zorder=4)
        ax.axhline(bq["val_acc_fp32"], color="black", ls="--", lw=1)
        extra += [
            Line2D([], [], ls="", marker="s", ms=9, color="black", label="baseline, int8"),
            Line2D([], [], ls="--", color="black", lw=1, label="baseline fp32 accuracy"),
        ]
    if run.metrics:
        e = run.metrics["ensemble"]
        ax.scatter(
            e["bytes"]["int8_gzip"] / 1024, e["val_acc"], marker="*", s=320, color="gold", edgecolors="black", zorder=5
        )
        extra.append(
            Line2D(
                [],
                [],
                ls="",
                marker="*",
                ms=15,
                color="gold",
                mec="black",
                label=f"selected ensemble (k={e['k']}; total size)",
            )
        )
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
    if len(ms) <= 40:
        _label_points(
            ax,
            [m["quant"]["bytes"]["int8_gzip"] / 1024 for m in ms],
            [m["quant"]["val_acc_int8"] for m in ms],
            [m["name"] for m in ms],
            selected,
        )
    return fig


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
    s = np.array([m["measured_sparsity"]["overall"] for m in run.members])
    fp32 = np.array([m["val_acc_fp32"] for m in run.members])
    ax.scatter(
        s, fp32, s=60, facecolors="none", edgecolors="#1f77b4", linewidths=1.5, label="pool member, fp32", zorder=3
    )
    q = [(si, m["quant"]["val_acc_int8"], a) for si, a, m in zip(s, fp32, run.members) if m["quant"]]
    if q:
        for si, a8, a32 in q:
            ax.plot([si, si], [a32, a8], color="#bbbbbb", lw=1, zorder=1)
        ax.scatter(
            [x[0] for x in q], [x[1] for x in q], s=45, marker="^", color="#d62728", label="pool member, int8", zorder=3
        )
    if run.baseline:
        ax.axhline(run.baseline["val_acc_fp32"], color="black", ls="--", lw=1, label="baseline (0% sparsity), fp32")
    if run.baseline_quant:
        ax.axhline(
            run.baseline_quant["val_acc_int8"], color="black", ls=":", lw=1.5, label="baseline (0% sparsity), int8"
        )
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("measured sparsity (share of prunable weights that are exactly zero)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Accuracy against sparsity, fp32 and int8" + (" (names in bold: selected)" if selected else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, loc="lower left")
    ax.margins(x=0.12, y=0.08)
    if len(run.members) <= 40:
        _label_points(ax, s, fp32, [m["name"] for m in run.members], selected, fontsize=7)
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


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def fig_confusion(run: Run) -> Figure | Missing:
    """Test confusion matrices of the fp32 baseline and of the ensemble."""
    from matplotlib.colors import PowerNorm

    if not run.evaluated:
        return Missing("needs metrics.json, test.npz and test_scores.npz (phase 'evaluate')")
    y, k = run.test["y"], len(run.classes)
    fig = _figure(12, 5.8)
    axes = fig.subplots(1, 2)
    for ax, key, title in ((axes[0], "baseline_fp32", "baseline fp32"), (axes[1], "ensemble", run.shipped_label)):
        c = _confusion(y, run.scores[key].argmax(1), k)
        acc = np.trace(c) / c.sum()
        rows = c / np.maximum(c.sum(1, keepdims=True), 1)
        ax.imshow(rows, cmap="Blues", norm=PowerNorm(0.35, vmin=0, vmax=1))
        if k <= 20:
            for i, j in zip(*np.nonzero(c)):
                ax.text(
                    j,
                    i,
                    str(c[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8 if k <= 12 else 6,
                    color="white" if rows[i, j] > 0.5 else ("#b71c1c" if i != j else "black"),
                )
            names = [n[:10] for n in run.classes]
            ax.set_xticks(range(k), names, rotation=90 if max(map(len, names)) > 2 else 0, fontsize=8)
            ax.set_yticks(range(k), names, fontsize=8)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"{title}: {pct(acc)} correct ({int(c.sum() - np.trace(c))} errors)")
    fig.suptitle("Confusion matrices on the test split (numbers: image counts; errors off the diagonal in red)")
    return fig


def class_deltas(run: Run) -> list[dict]:
    """Per-class test accuracy of the baseline fp32 and the ensemble, largest ensemble gain first."""
    y = run.test["y"]
    base, ens = run.scores["baseline_fp32"].argmax(1), run.scores["ensemble"].argmax(1)
    rows = []
    for c, name in enumerate(run.classes):
        mask = y == c
        if mask.any():
            b, e = float((base[mask] == c).mean()), float((ens[mask] == c).mean())
            rows.append({"class": name, "n": int(mask.sum()), "baseline": b, "ensemble": e, "delta": e - b})
    return sorted(rows, key=lambda r: (-r["delta"], r["class"]))


def fig_class_gains(run: Run) -> Figure | Missing:
    """Per-class test accuracy change, ensemble minus baseline; the largest gains and losses when there are many classes."""
    if not run.evaluated:
        return Missing("needs metrics.json, test.npz and test_scores.npz (phase 'evaluate')")
    rows = class_deltas(run)
    if len(rows) > 30:
        rows = rows[:10] + rows[-10:]
    fig = _figure(max(7, 0.45 * len(rows) + 2), 4.6)
    ax = fig.add_subplot()
    delta = np.array([100 * r["delta"] for r in rows])
    colours = ["#2e7d32" if v > 0 else "#c62828" if v < 0 else "#9e9e9e" for v in delta]
    ax.bar(range(len(rows)), delta, color=colours)
    ax.axhline(0, color="black", lw=1)
    ax.set_xticks(
        range(len(rows)),
        [f"{r['class'][:12]}\nn={r['n']}" for r in rows],
        fontsize=8,
        rotation=90 if len(rows) > 12 or max(len(r["class"]) for r in rows) > 6 else 0,
    )
    for i, v in enumerate(delta):
        if v != 0:
            ax.annotate(
                f"{v:+.1f}",
                (i, v),
                textcoords="offset points",
                xytext=(0, 3 if v > 0 else -10),
                ha="center",
                fontsize=8,
            )
    lim = max(1.0, float(np.abs(delta).max()) * 1.25)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel("class (n = test images of that class)")
    ax.set_ylabel("accuracy change (percentage points)")
    ax.set_title(f"Per-class test accuracy: {run.shipped_label} (shipped) minus fp32 baseline")
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def disputed_images(run: Run, limit: int = 16) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Test images on which the selected members disagree most: indices, members' votes ``[k, N]``, per-image disagreement."""
    names = [str(n) for n in run.scores["names"]]
    chosen = run.voters
    proba = run.scores["members"][[names.index(n) for n in chosen]]
    k = len(chosen)
    # fraction of member pairs whose votes differ, image by image
    per_image = (
        np.array([disagreement(proba[:, i : i + 1]).sum() / (k * (k - 1)) for i in range(proba.shape[1])])
        if k > 1
        else np.zeros(proba.shape[1])
    )
    wrong = run.scores["ensemble"].argmax(1) != run.test["y"]
    order = np.lexsort((np.arange(len(per_image)), ~wrong, -per_image))
    return [int(i) for i in order[:limit] if per_image[i] > 0], proba.argmax(-1), per_image


def _display(img: np.ndarray, vmax: float) -> np.ndarray:
    """An HWC image as floats in [0, 1], upscaled by an integer factor (nearest neighbour) to at least 64 pixels."""
    img = np.asarray(img, np.float64) / vmax
    img = img[..., 0] if img.shape[-1] == 1 else img[..., :3]
    f = max(1, math.ceil(64 / max(img.shape[:2])))
    return np.clip(img.repeat(f, 0).repeat(f, 1), 0, 1)


def fig_disputed_images(run: Run) -> Figure | Missing:
    """The test images with the highest disagreement among the selected members, with every member's vote and the truth."""
    if not run.evaluated:
        return Missing("needs metrics.json, test.npz and test_scores.npz (phase 'evaluate')")
    if len(run.voters) == 1:
        return Missing(f"the bundle ships one model ({run.shipped_label}): there are no votes to disagree")
    idx, votes, per_image = disputed_images(run)
    if not idx:
        return Missing("the selected members agree on every test image")
    chosen, classes = run.voters, run.classes
    x, y, ens = run.test["x"], run.test["y"], run.scores["ensemble"].argmax(1)
    vmax = 1.0 if x.dtype.kind == "f" and x.max() <= 1 else max(1.0, float(x.max()))
    # each tile, in inches: a title (2 lines), the image, then one line per member and one for the disagreement
    cols = min(4, len(idx))
    rows = math.ceil(len(idx) / cols)
    line = 0.16
    tile_w, img, head, foot = 2.7, 1.7, 2.6 * line, (len(chosen) + 1.6) * line
    tile_h = head + img + foot
    top = 0.45
    width, height = cols * tile_w, top + rows * tile_h
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    for t, i in enumerate(idx):
        r, c = divmod(t, cols)
        left = c * tile_w + (tile_w - img) / 2
        bottom = height - top - r * tile_h - head - img
        ax = fig.add_axes((left / width, bottom / height, img / width, img / height))
        ax.imshow(_display(x[i], vmax), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ok = ens[i] == y[i]
        colour = "#1b5e20" if ok else "#b71c1c"
        for sp in ax.spines.values():
            sp.set_color(colour)
            sp.set_linewidth(2.5)
        ax.set_title(
            f"test #{i} · truth: {classes[y[i]][:14]}\nensemble: {classes[ens[i]][:14]} {'✓' if ok else '✗'}",
            fontsize=9,
            color=colour,
        )
        lines = [
            f"{n}: {classes[votes[j, i]][:12]} {'✓' if votes[j, i] == y[i] else '✗'}" for j, n in enumerate(chosen)
        ]
        lines.append(f"pairs disagreeing: {100 * per_image[i]:.0f}%")
        fig.text(
            (c + 0.5) * tile_w / width,
            (bottom - 0.08) / height,
            "\n".join(lines),
            ha="center",
            va="top",
            fontsize=8,
            family="monospace",
            linespacing=1.25,
        )
    fig.suptitle(
        "Test images the selected members disagree on most (✓ right, ✗ wrong)", y=1 - 0.12 / height, fontsize=11
    )
    return fig


def fig_baseline_history(run: Run) -> Figure | Missing:
    """The baseline's training curve: loss, training and validation accuracy per epoch."""
    if not run.baseline:
        return Missing("needs baseline/model.json (phase 'baseline')")
    h = run.baseline.get("history") or []
    if not h:
        return Missing("the baseline was loaded from given weights, so there is no training history")
    ep = [r["epoch"] for r in h]
    fig = _figure(10, 4)
    a, b = fig.subplots(1, 2)
    a.plot(ep, [r["train_loss"] for r in h], color="#1f77b4", marker="o", ms=3)
    a.set_yscale("log")
    a.set_xlabel("epoch")
    a.set_ylabel("training loss (log scale)")
    a.set_title("loss")
    b.plot(ep, [r["train_acc"] for r in h], color="#1f77b4", marker="o", ms=3, label="training (augmented batches)")
    if any("val_acc" in r for r in h):
        b.plot(
            [r["epoch"] for r in h if "val_acc" in r],
            [r["val_acc"] for r in h if "val_acc" in r],
            color="#d62728",
            marker="o",
            ms=3,
            label="validation",
        )
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy")
    b.yaxis.set_major_formatter(PercentFormatter(1.0))
    b.set_title("accuracy")
    b.legend(fontsize=9, loc="lower right")
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Baseline training: {run.baseline['arch']}, {run.baseline['parameters']:,} parameters")
    return fig


def fig_timings(run: Run) -> Figure | Missing:
    """Wall-clock seconds of each phase."""
    if not run.timings:
        return Missing("needs timings.json")
    names, secs = list(run.timings), [float(v) for v in run.timings.values()]
    fig = _figure(8, 0.32 * len(names) + 1.3)
    ax = fig.add_subplot()
    ax.barh(range(len(names)), secs, color="#5c6bc0")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    for i, v in enumerate(secs):
        ax.annotate(f"{v:,.1f} s", (v, i), textcoords="offset points", xytext=(4, 0), va="center", fontsize=9)
    ax.set_xlim(0, max(secs) * 1.18 if max(secs) > 0 else 1)
    ax.set_xlabel("wall-clock seconds")
    ax.set_title(f"Time per phase (total {sum(secs):,.1f} s)")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


DECIDERS = (
    ("ensemble", "ensemble, by its vote's margin", "#d62728"),
    ("baseline_fp32", "baseline fp32, by its top probability", "black"),
)


def _decision_scores(run: Run) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per model of :data:`DECIDERS`: its test score that ranks frames, its top score, and whether it was right."""
    y = run.test["y"]
    ens, base = run.scores["ensemble"], run.scores["baseline_fp32"]
    return {
        "ensemble": (margin(ens), ens.max(1), ens.argmax(1) == y),
        "baseline_fp32": (base.max(1), base.max(1), base.argmax(1) == y),
    }


def fig_risk_coverage(run: Run) -> Figure | Missing:
    """Accuracy of the decided test frames against the share decided, and the reliability of the top scores."""
    if not run.evaluated or "decisions" not in run.metrics:
        return Missing("needs metrics.json with 'decisions', test.npz and test_scores.npz (phase 'evaluate')")
    d = run.metrics["decisions"]
    fig = _figure(11, 5.2)
    rc, rel = fig.subplots(1, 2)
    for name, label, colour in DECIDERS:
        label = label.replace("ensemble", run.shipped_label)
        score, top, right = _decision_scores(run)[name]
        coverage, acc = selective.risk_coverage(score, right)
        rc.plot(coverage, acc, color=colour, lw=1.8, label=f"{label} (AURC {d[name]['aurc']:.4f})")
        if "at_threshold" in d[name] and d[name]["at_threshold"]["accuracy"] is not None:
            op = d[name]["at_threshold"]
            rc.scatter(
                op["coverage"],
                op["accuracy"],
                s=80,
                color=colour,
                edgecolors="white",
                zorder=4,
                label=f"threshold {d[name]['threshold']['abstain_below']:.3f} (chosen on validation): "
                f"{pct(op['coverage'])} decided",
            )
        bins = selective.calibration_bins(top, right)
        rel.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            color=colour,
            marker="o",
            ms=4,
            label=f"{label.split(',')[0]}: ECE {d[name]['ece']:.4f}",
        )
    if d["target_accuracy"] is not None:
        rc.axhline(
            d["target_accuracy"], color="#5c6bc0", ls=":", lw=1.2, label=f"target accuracy {pct(d['target_accuracy'])}"
        )
    rc.set_xlabel("coverage: share of test frames decided (the rest go to review)")
    rc.set_ylabel("accuracy of the decided frames")
    rc.set_title("Risk–coverage (test split)")
    rc.legend(fontsize=8, loc="lower left")
    rel.plot([0, 1], [0, 1], color="#9e9e9e", ls="--", lw=1, label="perfectly calibrated")
    rel.set_xlabel("top score (mean in each bin)")
    rel.set_ylabel("accuracy in the bin")
    rel.set_title(f"Reliability ({selective.ECE_BINS} equal-width bins, test split)")
    rel.legend(fontsize=8, loc="upper left")
    for ax in (rc, rel):
        ax.xaxis.set_major_formatter(PercentFormatter(1.0) if ax is rc else FuncFormatter(lambda v, _: f"{v:.1f}"))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(True, alpha=0.3)
    return fig


def fig_degradation(run: Run) -> Figure | Missing:
    """Test accuracy of the vote with members missing (mean, min and max over which ones), beside single models."""
    if not run.metrics or "degradation" not in run.metrics:
        return Missing("needs metrics.json with 'degradation' (phase 'evaluate')")
    g = run.metrics["degradation"]
    rows = g["rows"]
    j = np.array([r["missing"] for r in rows])
    mean, lo, hi = (np.array([r[key] for r in rows]) for key in ("mean", "min", "max"))
    fig = _figure(8.5, 4.8)
    ax = fig.add_subplot()
    ax.fill_between(j, lo, hi, color="#d62728", alpha=0.15, label="ensemble: min to max over which members are missing")
    ax.plot(j, mean, color="#d62728", marker="o", lw=1.8, label="ensemble: mean over which members are missing")
    ax.axhline(g["baseline_fp32_test_acc"], color="black", ls="--", lw=1, label="baseline fp32")
    ax.axhline(
        g["best_member"]["test_acc_int8"],
        color="#1f77b4",
        ls=":",
        lw=1.5,
        label=f"best single member ({g['best_member']['name']}, by validation)",
    )
    below = [r["missing"] for r in rows if r["below_quorum"]]
    if below:
        ax.axvspan(
            min(below) - 0.5,
            max(below) + 0.5,
            color="#9e9e9e",
            alpha=0.15,
            label=f"fewer than the default quorum ({g['default_quorum']}): a fleet answers 'undecided'",
        )
    ax.set_xlabel(f"members missing (of {g['k']})")
    ax.set_ylabel("test accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title("Accuracy as devices drop out")
    ax.grid(True, alpha=0.3)
    ax.margins(y=0.25)
    ax.legend(fontsize=8, loc="best")
    return fig


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
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
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
    out = run.dir / "figures"
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
    path = run.dir / "report.html"
    store.write_bytes(path, render(run, figures).encode())
    return path
