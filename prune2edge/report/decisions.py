"""The figures of what the ensemble decides: confusion, per-class gains, disputed images, training history, timings,
risk-coverage and degradation."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

from .. import selective, store
from ..runtime.vote import disagreement, margin
from .load import Run, pct
from .plot import DPI, Missing, _figure


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
        return Missing(f"needs {store.TIMINGS}")
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
