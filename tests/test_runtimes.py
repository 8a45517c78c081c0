"""Members are standard ONNX: every node of every member (and the int8 parent) is of the default domain, and ONNX
Runtime, OpenVINO's CPU plugin and the ONNX reference evaluator agree on their votes, for the digits demo and for a
CIFAR-shaped (32x32x3) ResNet-8 bundle; a fleet of nodes on different runtimes decides like the offline ensemble."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_fleet import broker, digits_npz, finish, members, mosquitto_exe, start_stream  # noqa: F401 (fixtures)

from prune2edge import UserError, qdq
from prune2edge.runtime import runtimes
from prune2edge.runtime.bundle import Bundle, member_onnx, read_manifest
from prune2edge.runtime.fleet import Broker, LocalFleet

MIN_AGREEMENT = 0.999  # argmax of each member on each runtime against ONNX Runtime's, over the test split
MAX_PROBA_DIFF = 0.05


def models_of(run: Path) -> dict[str, bytes]:
    """The int8 parent and every bundle member, as the ONNX bytes a device runs."""
    bundle = run / "bundle"
    members = {e["id"]: member_onnx(bundle, e) for e in read_manifest(bundle)["members"]}
    return {"parent": (run / "baseline" / "int8.onnx").read_bytes(), **members}


@pytest.mark.parametrize("run_name", ["demo_run", "cifar_shaped_run"])
def test_every_node_is_of_the_default_onnx_domain(run_name: str, request: pytest.FixtureRequest):
    run = request.getfixturevalue(run_name)
    for name, onnx_bytes in models_of(run).items():
        model = onnx.load_from_string(onnx_bytes)
        foreign = {(n.domain, n.op_type) for n in model.graph.node if n.domain not in qdq.STANDARD_DOMAINS}
        assert not foreign, f"{name} uses operators outside the default ONNX domain: {foreign}"
        assert {o.domain for o in model.opset_import} <= set(qdq.STANDARD_DOMAINS)
        assert qdq.full_integer(model) and qdq.describe(model) == {
            "format": "onnx-qdq",
            "opset": qdq.OPSET,
            "domains": ["ai.onnx"],
        }


@pytest.mark.parametrize(("run_name", "images"), [("demo_run", None), ("cifar_shaped_run", 48)])
@pytest.mark.parametrize("runtime", ["openvino", "reference"])
def test_every_member_votes_alike_on_every_runtime(run_name: str, images: int | None, runtime: str, request):
    """The reference evaluator is slow on 32x32 images: it sees the first ``images`` test images there."""
    run = request.getfixturevalue(run_name)
    x = np.load(run / "test.npz")["x"][:images]
    expected = Bundle.load(run / "bundle").member_proba(x)
    got = Bundle.load(run / "bundle", runtime=runtime).member_proba(x)
    for member, p, q in zip(read_manifest(run / "bundle")["members"], got, expected):
        stats = runtimes.compare(p, q)
        print(f"{run_name} {member['id']} on {runtime}: {stats}")
        assert stats["agreement"] >= MIN_AGREEMENT and stats["max_proba_diff"] < MAX_PROBA_DIFF, (member["id"], stats)


def test_an_unknown_runtime_is_a_clear_error(demo_run):
    with pytest.raises(UserError, match="unknown runtime 'tensorrt': use onnxruntime, openvino, reference"):
        Bundle.load(demo_run / "bundle", runtime="tensorrt")


@pytest.mark.broker
@pytest.mark.slow
def test_a_mixed_fleet_decides_like_the_offline_ensemble(demo_run, broker, digits_npz, tmp_path):  # noqa: F811
    bundle, (npz, x, _) = demo_run / "bundle", digits_npz
    ids = members(bundle)[:3]
    chosen = dict(zip(ids, runtimes.LOADERS))  # one node per runtime
    out, url = tmp_path / "out.jsonl", broker.url
    with LocalFleet(
        bundle, Broker.parse(url), "mixed", ids, workdir=tmp_path / "fleet", abstain_below=0.0, runtimes=chosen
    ):
        got = finish(start_stream(url, "mixed", npz, out, n=len(x)), out, len(x))
        # Mosquitto's own client (mosquitto-clients, installed with the broker) watches the fleet, as docs/fleet.md says
        sub = ["mosquitto_sub", "-p", str(broker.port), "-t", "prune2edge/mixed/#", "-v", "-C", "1", "-W", "10"]
        watched = subprocess.run([*sub, "--retained-only"], capture_output=True, text=True, timeout=30)
        assert watched.returncode == 0 and watched.stdout.startswith("prune2edge/mixed/"), watched
    logs = {m: (tmp_path / "fleet" / f"{m}.log").read_text() for m in ids}
    assert all(f", {chosen[m]}) serving fleet 'mixed'" in logs[m] for m in ids), logs
    assert all(row["status"] == "decided" and row["voted"] == ids for row in got)
    offline = Bundle.load(bundle, members=ids).predict(x)
    decided = np.array([row["class"] for row in sorted(got, key=lambda row: row["index"])])
    assert (decided == offline).mean() >= MIN_AGREEMENT


def test_the_manifest_says_what_a_device_needs_and_where_each_member_was_verified(demo_run):
    for e in read_manifest(demo_run / "bundle")["members"]:
        assert (e["format"], e["opset"], e["domains"]) == ("onnx-qdq", qdq.OPSET, ["ai.onnx"])
        assert list(e["runtimes"]) == list(runtimes.LOADERS)  # every runtime is installed where the tests run
        for runtime, got in e["runtimes"].items():
            assert got["images"] == runtimes.CHECK_IMAGES and got["version"] == runtimes.version(runtime)
            assert got["agreement"] >= 0.99 and got["max_proba_diff"] < MAX_PROBA_DIFF, (e["id"], runtime, got)
