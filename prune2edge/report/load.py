"""What a run directory holds (:func:`load`, :class:`Run`) and how its numbers are written on the page."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .. import store
from ..errors import UserError
from ..records import Member, Quantised, Selection, read_member, read_quantised, read_selection
from ..runtime.vote import disagreement
from ..summary import kib

# --------------------------------------------------------------------------- formatting (page and figures)


def pct(x: float) -> str:
    """An accuracy as a percentage: ``0.99111`` -> ``99.11%``."""
    return f"{100 * x:.2f}%"


def pts(x: float) -> str:
    """An accuracy difference in percentage points: ``-0.0044`` -> ``-0.44 pts``."""
    return f"{100 * x:+.2f} pts"


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


def macs(x: float) -> str:
    """Multiply-adds per image, in millions: ``3982336`` -> ``3.98 M``."""
    return f"{x / 1e6:.2f} M"


def mib(x: float) -> str:
    """Memory in MiB: ``10.812`` -> ``10.8 MiB``."""
    return f"{x:.1f} MiB"


FORMATS: dict[str, Callable] = {
    "pct": pct,
    "pts": pts,
    "kib": kib,
    "p": pvalue,
    "int": str,
    "times": times,
    "dec": dec,
    "ms": ms,
    "macs": macs,
    "mib": mib,
}


# --------------------------------------------------------------------------- what the run directory holds


def _json(path: Path) -> dict | None:
    return store.read_json(path) if path.exists() else None


def _quantised(folder: Path) -> Quantised | None:
    return read_quantised(folder) if (folder / store.QUANT).exists() else None


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
    baseline_quant: Quantised | None  # baseline/quant.json (int8 validation accuracy, sizes)
    members: list[Member]  # pool/<name>/member.json
    quant: dict[str, Quantised]  # pool/<name>/quant.json, of each member quantised
    selection: Selection | None  # selection.json: clusters, selected members, strategies
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
        return dict(zip(self.selection.candidates, self.selection.clustering.labels))

    @property
    def selected(self) -> list[str]:
        return list(self.selection.selected) if self.selection else []

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
        names = [n for n, q in self.quant.items() if q.ok and (self.dir / store.POOL / n / store.VAL_PROBA).exists()]
        if len(names) < 2:
            return None
        proba = np.stack([np.load(self.dir / store.POOL / n / store.VAL_PROBA) for n in names])
        return names, disagreement(proba)

    def missing(self) -> list[str]:
        """What a complete run would have and this one lacks, phase by phase, and what the report loses."""
        out = []
        if self.baseline is None:
            out.append("baseline/model.json: the baseline is not trained yet (phase 'baseline').")
        planned = self.config.get("pool", {}).get("size")
        if planned and len(self.members) < planned:
            out.append(f"pool/: {len(self.members)} of {planned} pool members are trained (phase 'pool').")
        unquantised = [m.name for m in self.members if m.name not in self.quant]
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
        if not (self.dir / store.BUNDLE / store.MANIFEST).exists():
            out.append("bundle/manifest.json: the ensemble bundle is not written yet (phase 'bundle').")
        absent = [
            n
            for n, v in ((store.METRICS, self.metrics), (store.TEST, self.test), (store.TEST_SCORES, self.scores))
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
    lacking = [f for f in (store.CONFIG, store.DATASET) if not (d / f).is_file()]
    if lacking:
        raise UserError(
            f"'{d}' is not a prune2edge run directory (no {' or '.join(lacking)}); pass the --out "
            "directory of `prune2edge run` or `prune2edge demo`"
        )
    text = (d / store.CONFIG).read_text()
    pool = d / store.POOL
    names = [p.parent.name for p in sorted(pool.glob(f"*/{store.MEMBER_RECORD}"))] if pool.is_dir() else []
    quant = {n: q for n in names if (q := _quantised(pool / n))}
    return Run(
        dir=d,
        dataset=store.read_json(d / store.DATASET),
        config_text=text,
        config=yaml.safe_load(text) or {},
        baseline=_json(d / store.BASELINE / store.PARENT_RECORD),
        baseline_quant=_quantised(d / store.BASELINE),
        members=[read_member(d, n) for n in names],
        quant=quant,
        selection=read_selection(d) if (d / store.SELECTION).exists() else None,
        metrics=_json(d / store.METRICS),
        test=_npz(d / store.TEST),
        scores=_npz(d / store.TEST_SCORES),
        timings=_json(d / store.TIMINGS),
    )
