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
