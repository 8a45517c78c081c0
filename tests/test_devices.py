"""Fleet-aware selection: the devices file, members sized to each device, the assignment in the bundle and the fleet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import prune2edge_cli

from prune2edge import config, devices, evaluate, pipeline, records, select, store, summary
from prune2edge.cli import DEMO_CONFIG
from prune2edge.errors import UserError
from prune2edge.runtime import fleet, latency
from prune2edge.runtime.bundle import Bundle, read_manifest
from prune2edge.runtime.vote import accuracy

RUN_FILES = ("baseline", "pool", "dataset.json", "preprocess.json", "splits.npz", "timings.json")


def write(tmp_path: Path, text: str, name: str = "devices.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def pool_of(run_dir: Path) -> tuple[list[records.Member], dict[str, records.Quantised]]:
    members = [records.read_member(run_dir, p.parent.name) for p in sorted((run_dir / "pool").glob("*/member.json"))]
    return members, {m.name: records.read_quantised(run_dir / "pool" / m.name) for m in members}


def copy_run(demo_run: Path, out: Path, devices_file: Path | None, **overrides) -> tuple[dict, list[dict], dict]:
    """The demo run up to its int8 pool (no selection, bundle or metrics), configured for ``devices_file``."""
    out.mkdir(parents=True)
    for name in RUN_FILES:
        (shutil.copytree if (demo_run / name).is_dir() else shutil.copy)(demo_run / name, out / name)
    cfg = config.load(
        demo_run / "config.yaml", {**overrides, "deploy": {"devices": devices_file and str(devices_file)}}
    )
    store.write_bytes(out / "config.yaml", config.yaml_text(cfg).encode())
    return (cfg, *pool_of(out))


# --- the devices file --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("devices: []", "must hold 'devices:', a non-empty list of {name, memory_bytes[, latency_ms]}"),
        ("- {name: a, memory_bytes: 10}", "must hold 'devices:'"),
        ("devices:\n  - {memory_bytes: 100}", "device 1 has no name: give each device a 'name'"),
        ("devices:\n  - {name: '  ', memory_bytes: 100}", "device 1 has no name"),
        (
            "devices:\n  - {name: a, memory_bytes: 0}",
            "device 'a': 'memory_bytes' must be a positive integer (bytes a member may take), got 0",
        ),
        ("devices:\n  - {name: a, memory_bytes: -5}", "'memory_bytes' must be a positive integer"),
        ("devices:\n  - {name: a, memory_bytes: 1.5}", "'memory_bytes' must be a positive integer"),
        ("devices:\n  - {name: a, memory_bytes: true}", "'memory_bytes' must be a positive integer"),
        ("devices:\n  - {name: a}", "'memory_bytes' must be a positive integer (bytes a member may take), got None"),
        (
            "devices:\n  - {name: a, memory_bytes: 10, latency_ms: 0}",
            "device 'a': 'latency_ms' must be a positive number",
        ),
        ("devices:\n  - {name: a, memory_bytes: 10, latency_ms: fast}", "'latency_ms' must be a positive number"),
        (
            "devices:\n  - {name: a, memory_bytes: 10}\n  - {name: a, memory_bytes: 20}",
            "lists device 'a' twice; device names must be unique",
        ),
        ("devices:\n  - {name: a, memory_bytes: 10, ram: 3}", "device 1: unknown key(s) ['ram']"),
        ("devices: [{name: a, memory_bytes: 10}]\nfleet: x", "unknown key(s) ['fleet']; it holds only 'devices'"),
        ("devices:\n  - 12", "device 1 must be a mapping"),
        ("devices: [", "is not valid YAML or JSON"),
    ],
)
def test_a_bad_devices_file_says_what_is_wrong(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        devices.load(path)
    assert message in str(e.value) and f"devices file '{path}'" in str(e.value)


def test_devices_file_in_yaml_or_json(tmp_path):
    fleet_ = [{"name": "gateway", "memory_bytes": 262144, "latency_ms": 5}, {"name": "mcu-1", "memory_bytes": 40000}]
    as_json = devices.load(write(tmp_path, json.dumps({"devices": fleet_}), "devices.json"))
    assert as_json == [devices.Device("gateway", 262144, 5), devices.Device("mcu-1", 40000, None)]
    assert (
        devices.load(
            write(
                tmp_path,
                "devices:\n  - {name: gateway, memory_bytes: 262144, latency_ms: 5}\n"
                "  - name: mcu-1\n    memory_bytes: 40000\n",
            )
        )
        == as_json
    )
    with pytest.raises(UserError, match="cannot read devices file 'nope.yaml'"):
        devices.load("nope.yaml")
    with pytest.raises(UserError, match="'deploy.devices' must be the path of a devices file"):
        config.load(None, {"deploy": {"devices": 3}})


def test_cli_rejects_a_bad_devices_file_before_training(tmp_path):
    bad = write(tmp_path, "devices:\n  - {name: mcu, memory_bytes: 0}")
    r = prune2edge_cli("run", str(DEMO_CONFIG), "--out", str(tmp_path / "run"), "--devices", str(bad), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"error: devices file '{bad}', device 'mcu': 'memory_bytes' must be a positive integer" in r.stderr
    assert not (tmp_path / "run" / "baseline").exists()  # nothing trained


def test_fit_records_each_budget_that_rules_a_member_out():
    fleet_ = [devices.Device("big", 100, 2.0), devices.Device("small", 50)]
    sizes = {"a": 40, "b": 60, "c": 100, "d": 120}
    latency = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 0.5}  # c sits exactly on both budgets of "big": it fits
    fits, out = devices.fit(fleet_, sizes, latency)
    assert fits.tolist() == [[False, True], [True, False], [True, False], [False, False]]
    assert [(r["member"], r["device"], r["budget"], r["need"], r["limit"]) for r in out] == [
        ("a", "big", "latency_ms", 3.0, 2.0),
        ("d", "big", "memory_bytes", 120, 100),
        ("b", "small", "memory_bytes", 60, 50),
        ("c", "small", "memory_bytes", 100, 50),
        ("d", "small", "memory_bytes", 120, 50),
    ]
    assert out[0]["reason"] == "a needs 3.0 ms, over the latency_ms budget of 2.0 ms"
    lines = summary._device_lines(
        {
            "devices": devices.record(fleet_),
            "assignment": {"big": "b", "small": None},
            "ruled_out": out,
            "unfit": ["d"],
            "unplaced": [],
        }
    )
    assert lines == [
        "devices: big (100 B, 2 ms) runs b; small (50 B) runs nothing (idle)",
        "big's latency budget rules out a (3 ms)",
        "big's memory budget rules out d (120 B)",
        "small's memory budget rules out b (60 B), c (100 B), d (120 B)",
        "fit no device, so not selectable: d",
    ]


def test_idle_devices_and_clusters_without_a_device_are_warnings():
    d = {
        "devices": devices.record([devices.Device(n, 100) for n in ("a", "b", "c")]),
        "assignment": {"a": "m1", "b": None, "c": None},
        "idle": ["b", "c"],
        "ruled_out": [],
        "unfit": [],
        "unplaced": [{"cluster": 1, "members": ["m4", "m5"], "reason": "no device left that fits one of them"}],
    }
    m = {
        "devices": d,
        "skipped_clusters": [{"cluster": 2}],
        "ensemble": {"k": 1},
        "clustering": {"k": 3},
        "k_choice": {"by": "config"},
    }
    w = evaluate.device_warnings(m)
    assert [x["kind"] for x in w] == ["device_idle", "device_idle", "cluster_unplaced"]
    assert w[0]["message"] == (
        "device 'b' runs no member: the ensemble has 1 members for 3 devices (k = 3, by config; "
        "2 cluster(s) skipped or without a device)"
    )
    assert w[2]["message"] == "cluster c1 (m4, m5) has no member on a device: no device left that fits one of them"
    assert evaluate.device_warnings({"devices": None}) == []


# --- placing members on devices (synthetic pools) ----------------------------------------------------------------


def test_assign_gives_each_slot_a_device_its_member_fits():
    # slot 0 prefers member 0 (fits only the big device), slot 1 has only member 2 (also only the big device):
    # placing slot 0 first on the big device would leave slot 1 out; the assignment takes member 1 for slot 0
    fits = np.array([[True, False], [True, True], [True, False]])
    assert select.assign([[0, 1], [2]], fits) == {1: 1, 2: 0}
    # free to choose: each slot's first member
    assert select.assign([[0, 1], [2]], np.ones((3, 2), bool)) in ({0: 0, 2: 1}, {0: 1, 2: 0})
    # more slots than devices: as many as there are devices, never one member or device twice
    where = select.assign([[0], [1], [2]], np.ones((3, 2), bool))
    assert len(where) == 2 and len(set(where.values())) == 2
    # a slot with no member that fits a free device is left out
    assert select.assign([[0], [2]], np.array([[True], [True], [True]])) in ({0: 0}, {2: 0})


def family_pool():
    """Nine members in three families of three (members of a family make the same mistakes)."""
    rng = np.random.default_rng(0)
    n, k = 300, 4
    y = rng.integers(0, k, n)
    proba = []
    for fam in range(3):
        wrong = rng.random(n) < 0.1 + 0.05 * fam
        for member in range(3):
            labels = np.where(wrong | (rng.random(n) < 0.02 * (member + 1)), (y + 1 + fam) % k, y)
            p = np.full((n, k), 0.1 / (k - 1))
            p[np.arange(n), labels] = 0.9
            proba.append(p)
    return np.stack(proba), y, [0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("strategy", select.STRATEGIES)
def test_every_strategy_places_its_members_on_devices_they_fit(strategy):
    proba, y, labels = family_pool()
    everywhere = np.ones((9, 3), bool)
    assert select.select(strategy, proba, y, labels, fits=everywhere, max_acc_gap=1.0) == select.select(
        strategy, proba, y, labels, max_acc_gap=1.0
    )  # no budget binds: selection as without devices
    fits = np.zeros((9, 3), bool)
    fits[[0, 3, 6], 0] = True  # device 0 takes only each family's first member
    fits[[0, 1, 3, 4, 6, 7], 1] = True  # device 1 its first two
    fits[:, 2] = True  # device 2 any member
    slots = select.slots(strategy, proba, y, labels, fits=fits, max_acc_gap=1.0)
    where = select.assign(slots, fits)
    assert all(fits[m, d] for m, d in where.items()) and len(set(where.values())) == len(where)
    assert sorted(where) == select.select(strategy, proba, y, labels, fits=fits, max_acc_gap=1.0)
    assert len(where) == 3  # every slot found a device
    if strategy in ("accuracy-first", "diversity-first"):
        assert sorted(labels[m] for m in where) == [0, 1, 2]  # still one per cluster


def test_a_member_that_fits_no_device_is_never_selected_and_the_gap_counts_from_the_best_that_fits():
    proba, y, labels = family_pool()
    accs = [accuracy(p, y) for p in proba]
    fits = np.ones((9, 3), bool)
    fits[0:3] = False  # the most accurate family fits no device
    for strategy in select.STRATEGIES:
        assert not set(select.select(strategy, proba, y, labels, fits=fits, max_acc_gap=0.0)) & {0, 1, 2}
    # the gap counts from the best member that fits: family 0 (unfit, the most accurate) pushes no other out; the
    # selection is the one made without it
    best_fit = max(range(3, 9), key=lambda i: (accs[i], -i))
    chosen = select.select("accuracy-first", proba, y, labels, fits=fits, max_acc_gap=0.0)
    alone = select.select("accuracy-first", proba[3:], y, labels[3:], fits=fits[3:], max_acc_gap=0.0)
    assert best_fit in chosen and chosen == [i + 3 for i in alone]
    assert select.select("accuracy-first", proba, y, labels, max_acc_gap=0.0) == [0]  # all fit: 0 beats the rest
    names = [f"m{i:03d}" for i in range(9)]
    reasons = {s["cluster"]: s["reason"] for s in select.skipped(proba, y, labels, 0.0, names, fits.any(1))}
    assert "none of its members fits a device's budget" in reasons[0]


def test_a_session_memory_budget_rules_out_the_members_over_it():
    fleet_ = [devices.Device("board", 100, max_memory_mb=12.0), devices.Device("gateway", 100)]
    sizes, memory = {"a": 40, "b": 60}, {"a": 11.5, "b": 12.5}
    fits, out = devices.fit(fleet_, sizes, memory=memory)
    assert fits.tolist() == [[True, True], [False, True]]
    assert [(r["member"], r["device"], r["budget"], r["need"], r["limit"]) for r in out] == [
        ("b", "board", "max_memory_mb", 12.5, 12.0)
    ]
    with pytest.raises(UserError, match=r"session memory budget 1 MiB\): .* needs 11.5 MiB; raise its max_memory_mb"):
        devices.fit([devices.Device("mcu", 100, max_memory_mb=1)], sizes, memory=memory)
    lines = summary._device_lines(
        {"devices": devices.record(fleet_), "assignment": {"board": "a", "gateway": "b"}, "ruled_out": out, "unfit": []}
    )
    assert lines == [
        "devices: board (100 B, 12 MiB session) runs a; gateway (100 B) runs b",
        "board's session memory budget rules out b (12.5 MiB)",
    ]


# --- the pipeline on the demo run -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet_run(demo_run, tmp_path_factory) -> Path:
    """The demo run selected for three devices: one takes any member (and has a latency budget), one about half
    of them, one only the smallest member (its budget is exactly that member's shipped bytes)."""
    tmp = tmp_path_factory.mktemp("fleet-run")
    _, quant = pool_of(demo_run)
    sizes = sorted(q.bytes.shipped for q in quant.values() if q.ok)
    path = write(
        tmp,
        f"devices:\n  - {{name: gateway, memory_bytes: {sizes[-1]}, latency_ms: 10000}}\n"
        f"  - {{name: board, memory_bytes: {sizes[len(sizes) // 2]}}}\n"
        f"  - {{name: mcu, memory_bytes: {sizes[0]}}}\n",
    )
    run_dir = tmp / "run"
    cfg, members, quant = copy_run(demo_run, run_dir, path, cluster={"k": 3})
    sel = select.choose(run_dir, cfg, members, quant)
    pipeline.make_bundle(run_dir, cfg, sel, members, quant)
    evaluate.evaluate_run(run_dir, cfg, {})
    return run_dir


def test_each_member_fits_the_device_it_is_assigned_to(fleet_run):
    sel = store.read_json(fleet_run / "selection.json")
    d = sel["devices"]
    budget = {dev["name"]: dev["memory_bytes"] for dev in d["devices"]}
    manifest = read_manifest(fleet_run / "bundle")
    on = {e["device"]: e for e in manifest["members"]}
    assert sorted(on) == sorted(budget) and d["idle"] == [] and d["unplaced"] == []
    assert {dev: e["id"] for dev, e in on.items()} == d["assignment"]
    assert sorted(d["assignment"].values()) == sel["selected"]
    for dev, e in on.items():
        assert e["bytes"] <= budget[dev]  # the shipped bytes the bundle records
        assert e["bytes"] == d["members"][e["id"]]["shipped_bytes"]
    smallest = min(d["members"], key=lambda n: (d["members"][n]["shipped_bytes"], n))
    assert on["mcu"]["id"] == smallest and on["mcu"]["bytes"] == budget["mcu"]  # a budget is a bound, not a limit
    assert sorted(sel["clustering"]["labels"][sel["candidates"].index(e["id"])] for e in on.values()) == [0, 1, 2]


def test_selection_records_which_budget_rules_out_which_member(fleet_run):
    d = store.read_json(fleet_run / "selection.json")["devices"]
    expected = sorted(
        (n, dev["name"])
        for n, m in d["members"].items()
        for dev in d["devices"]
        if m["shipped_bytes"] > dev["memory_bytes"]
    )
    assert sorted((r["member"], r["device"]) for r in d["ruled_out"]) == expected and expected
    assert all(r["budget"] == "memory_bytes" and r["need"] > r["limit"] for r in d["ruled_out"])
    assert d["unfit"] == []  # the gateway takes any member
    for n, m in d["members"].items():
        assert m["fits"] == [dev["name"] for dev in d["devices"] if (n, dev["name"]) not in expected]
        assert 0 < m["latency_ms"] < 10000  # measured, because the gateway has a latency budget
    runs = config.load(fleet_run / "config.yaml").bundle.latency_runs
    assert d["latency"] == latency.describe(runs) | {"model": "int8.onnx"}
    m = store.read_json(fleet_run / "metrics.json")
    text = summary.table(m)
    assert (
        f"devices: gateway ({d['devices'][0]['memory_bytes']:,} B, 10000 ms) runs {d['assignment']['gateway']}" in text
    )
    board_out = [f"{r['member']} ({r['need']:,} B)" for r in d["ruled_out"] if r["device"] == "board"]
    assert f"board's memory budget rules out {', '.join(board_out)}" in text
    assert "mcu's memory budget rules out" in text
    assert not [w for w in m["warnings"] if w["kind"] in ("device_idle", "cluster_unplaced")]  # every device runs one
    assert Bundle.load(fleet_run / "bundle").predict(np.zeros((2, 8, 8), np.uint8)).shape == (2,)


def test_a_budget_no_member_fits_is_a_clear_error(demo_run, tmp_path):
    _, quant = pool_of(demo_run)
    smallest = min((q.bytes.shipped, n) for n, q in quant.items() if q.ok)
    tiny = write(
        tmp_path,
        f"devices:\n  - {{name: big, memory_bytes: 10000000}}\n  - {{name: tiny, memory_bytes: {smallest[0] - 1}}}\n",
    )
    copy_run(demo_run, tmp_path / "run", tiny)
    r = prune2edge_cli("run", str(tmp_path / "run" / "config.yaml"), "--out", str(tmp_path / "run"), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (
        f"error: no member fits device 'tiny' (memory budget {smallest[0] - 1:,} bytes): the smallest member, "
        f"{smallest[1]}, ships {smallest[0]:,} bytes"
    ) in r.stderr
    slow = write(tmp_path, "devices:\n  - {name: quick, memory_bytes: 10000000, latency_ms: 0.000001}\n", "slow.yaml")
    cfg, members, quant = copy_run(demo_run, tmp_path / "run2", slow)
    with pytest.raises(
        UserError,
        match=r"no member fits device 'quick' \(memory budget 10,000,000 bytes, latency budget "
        r"1e-06 ms\): the fastest member within its memory budget, m\d+, takes",
    ):
        select.choose(tmp_path / "run2", cfg, members, quant)


def test_more_clusters_than_devices_or_other_devices_are_clear_errors(demo_run, fleet_run, tmp_path):
    two = write(tmp_path, "devices:\n  - {name: a, memory_bytes: 10000000}\n  - {name: b, memory_bytes: 10000000}\n")
    cfg, members, quant = copy_run(demo_run, tmp_path / "run", two, cluster={"k": 3})
    with pytest.raises(
        UserError, match="'cluster.k' is 3, but the devices file .* lists 2 devices and each runs one member"
    ):
        select.choose(tmp_path / "run", cfg, members, quant)
    cfg = config.load(fleet_run / "config.yaml", {"deploy": {"devices": str(two)}})
    with pytest.raises(UserError, match="was selected for other devices than deploy.devices now lists"):
        select.choose(fleet_run, cfg, *pool_of(fleet_run))


# --- the fleet runs each member on its device --------------------------------------------------------------------


def test_node_by_device(fleet_run, demo_run, tmp_path):
    bundle = fleet_run / "bundle"
    on = {e["device"]: e["id"] for e in read_manifest(bundle)["members"]}
    assert all(fleet.member_on(bundle, dev) == m for dev, m in on.items())
    unused = f"mqtt://127.0.0.1:{fleet.free_port()}"
    for args, message in (
        (["--device", "toaster"], f"bundle '{bundle}' assigns no member to device 'toaster'; it assigns "),
        (["--device", "mcu", "--member", on["mcu"]], "give either --member ID or --device NAME"),
        ([], "give either --member ID or --device NAME"),
    ):
        r = prune2edge_cli("node", str(bundle), *args, "--broker", unused, timeout=60)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = prune2edge_cli("node", str(demo_run / "bundle"), "--device", "mcu", "--broker", unused, timeout=60)
    assert r.returncode == 2 and "assigns no member to a device (it was selected without deploy.devices)" in r.stderr


@pytest.mark.broker
def test_fleet_runs_each_member_on_its_device(fleet_run, tmp_path):
    from prune2edge.data import load_digits

    bundle = fleet_run / "bundle"
    on = {e["id"]: e["device"] for e in read_manifest(bundle)["members"]}
    statuses: dict[str, dict] = {}
    with fleet.Mosquitto(tmp_path / "broker") as broker:
        url = fleet.Broker.parse(broker.url)
        with fleet.LocalFleet(bundle, url, "dev", workdir=tmp_path / "fleet") as lf:
            for m, dev in on.items():  # each node is started as its device's
                cmd = lf.command(m)[0]
                assert cmd[cmd.index("node") : cmd.index("node") + 4] == ["node", str(bundle), "--device", dev]
            t = fleet.Topics("dev")
            link = fleet.Link(
                url,
                "test-statuses",
                [t.status()],
                lambda topic, payload: statuses.__setitem__(topic.rsplit("/", 1)[1], json.loads(payload)),
            ).start()
            d = load_digits()
            summary = fleet.classify(url, "dev", d.x_test[:20], labels=d.y_test[:20])
            link.stop()
    assert summary["decided"] == 20 and summary["missing"] == []
    assert {m: s["device"] for m, s in statuses.items()} == on  # each node announces the device it runs on
    assert all(s["state"] == "online" for s in statuses.values())


def test_the_session_memory_each_member_needs_is_measured_and_budgeted(demo_run, tmp_path):
    """A devices file with max_memory_mb: every member's (and the parent's) int8 session memory is measured in a
    fresh process, recorded in selection.json, and a budget under all of them is a one-line error."""
    roomy = write(tmp_path, "devices:\n  - {name: board, memory_bytes: 10000000, max_memory_mb: 4096}\n")
    cfg, members, quant = copy_run(demo_run, tmp_path / "run", roomy, cluster={"k": 1})
    d = select.choose(tmp_path / "run", cfg, members, quant).devices
    assert d.memory and all(0 < m.memory_mb < 4096 for m in [*d.members.values(), d.parent])
    assert all(m.fits == ["board"] for m in d.members.values()) and d.ruled_out == []
    least = min(m.memory_mb for m in d.members.values())
    tight = write(
        tmp_path, f"devices:\n  - {{name: board, memory_bytes: 10000000, max_memory_mb: {least / 2}}}\n", "t.yaml"
    )
    cfg, members, quant = copy_run(demo_run, tmp_path / "run2", tight)
    with pytest.raises(UserError, match="no member fits device 'board'.*raise its max_memory_mb") as e:
        select.choose(tmp_path / "run2", cfg, members, quant)
    assert "\n" not in str(e.value)
