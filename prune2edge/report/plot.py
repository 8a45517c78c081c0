"""What every figure shares: the canvas, PNG output, colours by cluster, labels and legends."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

DPI = 110


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
