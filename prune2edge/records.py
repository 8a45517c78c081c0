"""The typed records stages hand each other, each read and written here only, with the defaults for runs written by
older versions: a pool member as trained (:class:`Member`, ``member.json``), a model quantised and gated
(:class:`Quantised`, ``quant.json``), what ships (:class:`Shipped`, ``selection.json``'s ``shipped``)."""

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
