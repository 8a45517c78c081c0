"""The typed records stages hand each other: those written by older versions still load, with their defaults."""

from __future__ import annotations

import json

import pytest

from prune2edge import records, store
from prune2edge.records import Member

# member.json as the first version wrote it: the plan (no source or parent yet), its sparsity, accuracy and training
OLD_MEMBER = {
    "index": 2,
    "seed": 7,
    "sparsity": 0.8,
    "epochs": 3.5,
    "lr": 0.02,
    "batch_size": 64,
    "bootstrap": False,
    "name": "m002",
    "measured_sparsity": {"overall": 0.8, "layers": {"head.2": 0.8}},
    "history": [{"epoch": 1, "steps": 20}],
    "seconds": 4.2,
    "val_acc_fp32": 0.93,
}


def test_a_member_from_before_the_newer_fields_loads_with_their_defaults(tmp_path):
    store.write_json(tmp_path / "pool" / "m002" / "member.json", OLD_MEMBER)
    m = records.read_member(tmp_path, "m002")
    assert (m.name, m.epochs, m.seconds, m.measured_sparsity["overall"]) == ("m002", 3.5, 4.2, 0.8)
    assert (m.source, m.parent, m.model_kwargs, m.cyclical) == (0, False, {}, False)
    # no grid recorded: quantize_all takes pool.weight_bits; no step count (from before pool.min_steps)
    assert (m.weight_bits, m.largest_layer_bits, m.planned_epochs, m.steps) == (None, 0, None, None)
    assert (m.structure, m.macs_vs_parent) == ("weights", None)


def test_a_member_is_written_as_given_and_returned_typed(tmp_path):
    cyclical = {**OLD_MEMBER, "source": 0, "parent": False, "planned_epochs": 3.0, "steps": 80, "cyclical": True}
    del cyclical["history"]  # a cyclical pool's members record no history, in their own key order
    m = records.write_member(tmp_path, cyclical)
    assert (tmp_path / "pool" / "m002" / "member.json").read_bytes() == json.dumps(cyclical, indent=2).encode()
    assert m == records.read_member(tmp_path, "m002") and m.cyclical and m.history == [] and m.steps == 80


def test_a_member_with_an_unknown_field_is_an_error():
    with pytest.raises(TypeError):
        Member.from_json({**OLD_MEMBER, "colour": "red"})


# selection.json as written before the gate against the parent, k_choice, skipped_clusters and shipped existed
OLD_SELECTION = {
    "candidates": ["m000", "m001", "m002"],
    "dropped": ["m003"],
    "clustering": {"method": "kmeans-onehot", "k": 2, "k_requested": 2, "labels": [0, 1, 0], "silhouette": {}},
    "strategy": "accuracy-first",
    "selected": ["m000", "m001"],
    "strategies": {"accuracy-first": ["m000", "m001"], "top-k": ["m002", "m000"]},
    "sweep": {"accuracy-first": [["m000"], ["m000", "m001"]], "top-k": [["m002"], ["m002", "m000"]]},
}
FIT = {"shipped_bytes": 8108, "latency_ms": None, "memory_mb": None, "fits": ["gateway"]}
# as a run with deploy.devices writes it now: every key, in the order select.choose writes them
NEW_SELECTION = {
    "candidates": OLD_SELECTION["candidates"],
    "dropped": OLD_SELECTION["dropped"],
    "parent_gate": {
        "parent_val_acc_fp32": 0.97,
        "margin": 0.03,
        "below": [{"name": "m003", "val_acc_int8": 0.8, "below_by": 0.17, "p": 2.8e-06}],
        "kept_anyway": None,
    },
    **{k: OLD_SELECTION[k] for k in ("clustering", "strategy", "selected", "strategies")},
    "k_choice": {
        "by": "auto",
        "k": 2,
        "reason": "k = 2: the most votes (2), as no smaller ensemble beats it",
        "curve": [
            {"k": 1, "members": ["m000"], "val_acc": 0.95, "p_lead": 0.75},
            {"k": 2, "members": ["m000", "m001"], "val_acc": 0.96, "p_lead": 1.0},
        ],
    },
    "skipped_clusters": [],
    "sweep": OLD_SELECTION["sweep"],
    "devices": {
        "devices": [{"name": "gateway", "memory_bytes": 262144, "latency_ms": None, "max_memory_mb": None}],
        "latency": None,
        "memory": None,
        "members": {"m000": FIT, "m001": {**FIT, "shipped_bytes": 3512}},
        "ruled_out": [],
        "unfit": [],
        "parent": {**FIT, "ruled_out": []},
        "assignment": {"gateway": "m000"},
        "idle": [],
        "unplaced": [],
    },
    "shipped": {
        "kind": "parent",
        "members": ["baseline"],
        "val_acc": 0.97,
        "fallback": True,
        "reason": "the selection kept one model",
        "beaten_by": [],
        "assignment": {"gateway": "baseline"},
    },
}


def test_a_selection_from_before_the_newer_keys_loads_with_their_defaults(tmp_path):
    store.write_json(tmp_path / "selection.json", OLD_SELECTION)
    sel = records.read_selection(tmp_path)
    assert (sel.selected, sel.clustering.labels, sel.strategies["top-k"]) == (
        ["m000", "m001"],
        [0, 1, 0],
        ["m002", "m000"],
    )
    assert (sel.parent_gate, sel.k_choice, sel.skipped_clusters, sel.devices) == (
        None,
        records.KChoice("config"),
        [],
        None,
    )
    assert sel.shipped == records.Shipped("ensemble", ["m000", "m001"], None, False, "")  # the selection shipped


def test_a_selection_is_written_as_read(tmp_path):
    store.write_json(tmp_path / "old" / "selection.json", NEW_SELECTION)
    sel = records.read_selection(tmp_path / "old")
    assert sel.parent_gate.below[0].name == "m003" and sel.k_choice.curve[1].members == ["m000", "m001"]
    assert sel.devices.members["m001"].shipped_bytes == 3512 and sel.devices.parent.fits == ["gateway"]
    records.write_selection(tmp_path / "new", sel)
    assert (tmp_path / "new" / "selection.json").read_bytes() == (tmp_path / "old" / "selection.json").read_bytes()
    # a devices record from before session memory was measured: no budget took it
    old = {**NEW_SELECTION["devices"], "members": {"m000": {k: v for k, v in FIT.items() if k != "memory_mb"}}}
    del old["memory"]
    assert records.Placement.from_json(old).members["m000"].memory_mb is None
