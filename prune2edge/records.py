"""The typed records stages hand each other, each read and written here only, with the defaults for runs written by
older versions: a pool member as trained (:class:`Member`, ``member.json``), a model quantised and gated
(:class:`Quantised`, ``quant.json``), the selection (:class:`Selection`, ``selection.json``) and what ships
(:class:`Shipped`, its ``shipped``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import store


@dataclass(frozen=True)
class Member:
    """A pool member as trained: its plan (:class:`prune2edge.pool.MemberPlan`), how the pool shaped it and what it
    measured (``member.json``)."""

    index: int
    seed: int
    sparsity: float  # the target (a cyclical pool's: its highest sampled)
    epochs: float  # as trained (pool.min_steps may lift the planned ones; 0: the parent as a member trained none)
    lr: float
    batch_size: int
    bootstrap: bool
    name: str
    seconds: float  # training time (a cyclical pool's: per cycle)
    measured_sparsity: dict[str, Any]  # the fraction of zero weights: "overall", and per layer ("layers")
    val_acc_fp32: float
    source: int = 0  # the baseline checkpoint it started from (pool.snapshots; 0: the final baseline)
    parent: bool = False  # the baseline itself as a member (pool.include_parent)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # over the baseline's (a fresh student's widths)
    weight_bits: float | None = None  # its QAT grid (0: none); None: not recorded (cyclical, older runs)
    largest_layer_bits: float = 0
    planned_epochs: float | None = None  # as sampled (None: a run from before pool.min_steps)
    steps: int | None = None  # optimiser steps as trained (None: a run from before pool.min_steps)
    structure: str = "weights"  # pool.structure: "weights", or "channels" (cut out: a smaller dense network)
    macs_vs_parent: float | None = None  # of a channel-pruned member
    cyclical: bool = False  # one of a cyclical pool's low points
    history: list[dict] = field(default_factory=list)  # per epoch (none for a cyclical pool's members)
    cpu_seconds: float | None = None  # this process's CPU in training, like seconds (None: a run from before it)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Member:
        return cls(**d)


def write_member(run_dir: Path, record: dict[str, Any]) -> Member:
    """Write ``pool/<name>/member.json`` with ``record``'s keys in the order the pool made them (each way of making
    members has its own), and return it typed."""
    member = Member.from_json(record)
    store.write_json(run_dir / store.POOL / member.name / store.MEMBER_RECORD, record)
    return member


def read_member(run_dir: Path, name: str) -> Member:
    return Member.from_json(store.read_json(run_dir / store.POOL / name / store.MEMBER_RECORD))


@dataclass(frozen=True)
class Sizes:
    """A model's bytes: its ONNX files, as is and gzipped, and as shipped (entropy-coded int8)."""

    fp32: int
    int8: int
    fp32_gzip: int
    int8_gzip: int
    shipped: int


@dataclass(frozen=True)
class Quantised:
    """A model exported, quantised to int8 and gated against its fp32 self on validation (``quant.json``)."""

    status: str  # "ok", or "dropped": no quantisation setting kept it within the gate
    attempts: list[dict]  # each setting tried, with its validation accuracy and agreement
    val_acc_fp32: float
    val_acc_int8: float
    agreement: float  # of the int8 model's validation predictions with the fp32 one's
    codebook_bits: int
    weight_bits: float  # its weight grid (8: post-training int8) and its largest layer's
    largest_layer_bits: float
    weights: int  # bytes of int8 weights
    bits_per_weight_shipped: float | None  # the whole shipped file over its weights (None: a run from before it)
    bytes: Sizes
    ops: dict[str, int]
    full_integer: bool
    format: str | None = None  # what a device needs to run it (None: a run from before it was recorded)
    opset: int | None = None
    domains: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Quantised:
        bits, largest = store.grid_bits(d.get("weight_bits"), d.get("largest_layer_bits"))
        return cls(
            **{
                **d,
                "codebook_bits": d.get("codebook_bits", 0),
                "weight_bits": bits,
                "largest_layer_bits": largest,
                "bits_per_weight_shipped": d.get("bits_per_weight_shipped"),
                "bytes": Sizes(**d["bytes"]),
            }
        )


def write_quantised(folder: Path, record: Quantised) -> None:
    store.write_json(folder / store.QUANT, record.to_json())


def read_quantised(folder: Path) -> Quantised:
    return Quantised.from_json(store.read_json(folder / store.QUANT))


def with_parent(run_dir: Path, quant: dict[str, Quantised]) -> dict[str, Quantised]:
    """The quantisation records with the parent's (``baseline``), read from the run where ``quant`` lacks it."""
    return quant if store.PARENT in quant else {**quant, store.PARENT: read_quantised(run_dir / store.BASELINE)}


@dataclass(frozen=True)
class Shipped:
    """What the bundle ships, decided on validation by :func:`prune2edge.ship.shipped_model`."""

    kind: str  # "ensemble"; "member": one member; "parent": the int8 parent alone
    members: list[str]
    val_acc: float | None  # of what ships, on validation (None: a run from before it was recorded)
    fallback: bool  # select.fallback weighed the single models against the selection
    reason: str
    beaten_by: list[dict] = field(default_factory=list)  # models ahead of the selection beyond chance: name, val_acc, p
    assignment: dict[str, str | None] | None = None  # device -> model, with devices and one model shipped

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "assignment" or v is not None}

    @classmethod
    def of(cls, selection: dict[str, Any]) -> Shipped:
        """From ``selection.json``: one written before the fallback existed shipped the selection."""
        d = selection.get("shipped") or {"kind": "ensemble", "members": selection["selected"], "reason": ""}
        return cls(**{"val_acc": None, "fallback": False, **d})


@dataclass(frozen=True)
class Below:
    """A member the gate against the parent left out of clustering."""

    name: str
    val_acc_int8: float
    below_by: float  # under the parent's fp32 validation accuracy
    p: float  # the sign test's, that the int8 parent's lead over it is chance


@dataclass(frozen=True)
class ParentGate:
    """The gate against the parent (:func:`prune2edge.ship.parent_gate`, ``select.max_below_parent``)."""

    parent_val_acc_fp32: float
    margin: float
    below: list[Below]
    kept_anyway: str | None  # the best member, kept where the gate left out every one

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ParentGate:
        return cls(**{**d, "below": [Below(**b) for b in d["below"]]})


@dataclass(frozen=True)
class Clustering:
    """How the candidates were clustered (:func:`prune2edge.cluster.cluster`)."""

    method: str
    k: int  # clusters found
    k_requested: int
    labels: list[int]  # each candidate's cluster, in the order of the candidates
    silhouette: dict  # k -> silhouette score, for each k tried (cluster.k: silhouette)


@dataclass(frozen=True)
class CurvePoint:
    """The configured strategy's ensemble for k clusters, on validation (:func:`prune2edge.select.curve`)."""

    k: int
    members: list[str]
    val_acc: float
    p_lead: float  # the sign test's, that its lead over the ensemble of the most votes is chance


@dataclass(frozen=True)
class KChoice:
    """How k was chosen (``cluster.k``, :func:`prune2edge.cluster.choose_k`)."""

    by: str  # "config", "auto" or "silhouette"
    k: int | None = None  # None (and no reason or curve): a run from before k was chosen on validation
    reason: str | None = None
    curve: list[CurvePoint] | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KChoice:
        return cls(**{**d, "curve": [CurvePoint(**p) for p in d["curve"]]})


@dataclass(frozen=True)
class Fit:
    """A model against the devices' budgets: what it needs and the devices it fits."""

    shipped_bytes: int
    latency_ms: float | None  # int8, batch 1 (None: no device has a latency budget)
    memory_mb: float | None  # its session's (None: no device has a memory budget, or a run from before it)
    fits: list[str]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Fit:
        return cls(**{"memory_mb": None, **d})


@dataclass(frozen=True)
class ParentFit(Fit):
    """The int8 parent against the devices' budgets, with each budget that rules it out."""

    ruled_out: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Placement:
    """The selection on ``deploy.devices``: what fits where (:func:`prune2edge.select.fit_devices`) and which device
    runs which selected member (:func:`prune2edge.select.place`)."""

    devices: list[dict]  # as :func:`prune2edge.devices.record` writes them
    latency: dict | None  # how latencies were measured (None: no latency budget)
    memory: dict | None  # how session memory was measured (None: no memory budget, or a run from before it)
    members: dict[str, Fit]
    ruled_out: list[dict]  # each member and budget that rules it out of a device
    unfit: list[str]  # the members that fit no device
    parent: ParentFit | None  # None: a run from before it was recorded
    assignment: dict[str, str | None]  # device -> member (None: idle)
    idle: list[str]
    unplaced: list[dict]  # each cluster left without a device, with its members and why

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "parent" or v is not None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Placement:
        return cls(
            **{
                "memory": None,
                **d,
                "members": {n: Fit.from_json(m) for n, m in d["members"].items()},
                "parent": ParentFit.from_json(d["parent"]) if "parent" in d else None,
            }
        )


@dataclass(frozen=True)
class Selection:
    """Which members vote, how they were chosen and what ships (``selection.json``, :func:`prune2edge.select.choose`)."""

    candidates: list[str]  # the members clustered: passed the int8 gate and the gate against the parent
    dropped: list[str]  # failed the int8 gate
    parent_gate: ParentGate | None  # None: a run from before the gate
    clustering: Clustering
    strategy: str
    selected: list[str]
    strategies: dict[str, list[str]]  # each strategy's pick at the chosen k
    k_choice: KChoice
    skipped_clusters: list[dict]  # the clusters left out, each with its members and why
    sweep: dict[str, list[list[str]]]  # each strategy's pick for k = 1..k_max
    devices: Placement | None  # with deploy.devices
    shipped: Shipped

    def to_json(self) -> dict[str, Any]:
        d = asdict(self) | {"devices": self.devices and self.devices.to_json(), "shipped": self.shipped.to_json()}
        return {k: v for k, v in d.items() if k != "devices" or v is not None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Selection:
        """Older runs lack the gate against the parent, k_choice, skipped_clusters, shipped (see :meth:`Shipped.of`)."""
        return cls(
            **{
                "skipped_clusters": [],
                **d,
                "parent_gate": ParentGate.from_json(d["parent_gate"]) if "parent_gate" in d else None,
                "clustering": Clustering(**d["clustering"]),
                "k_choice": KChoice.from_json(d["k_choice"]) if "k_choice" in d else KChoice("config"),
                "devices": Placement.from_json(d["devices"]) if d.get("devices") else None,
                "shipped": Shipped.of(d),
            }
        )


def write_selection(run_dir: Path, record: Selection) -> None:
    store.write_json(run_dir / store.SELECTION, record.to_json())


def read_selection(run_dir: Path) -> Selection:
    return Selection.from_json(store.read_json(run_dir / store.SELECTION))
