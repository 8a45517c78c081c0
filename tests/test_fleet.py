"""The fleet over MQTT against a real Mosquitto on 127.0.0.1, with real node/aggregator/client processes.

Faults: a node killed (-9) mid-stream and restarted, the aggregator killed and restarted, the broker
restarted, an altered member, malformed frames, wrong credentials. These tests fail (not skip) when
Mosquitto is not installed: the fleet needs it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from prune2edge.errors import UserError
from prune2edge.runtime import fleet
from prune2edge.runtime.bundle import Bundle, read_manifest
from prune2edge.runtime.fleet import Broker, LocalFleet, Mosquitto, Topics, local

RATE = 75  # frames per second for the fault streams: long enough to hit a fault mid-stream


def cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prune2edge.cli", *args], capture_output=True, text=True, timeout=timeout, **kw
    )


@pytest.fixture(scope="session")
def mosquitto_exe() -> str:
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.fail("Mosquitto is not installed, and the fleet needs it: sudo apt-get install mosquitto")
    return fleet.find_mosquitto()


@pytest.fixture(scope="session")
def bundle(demo_run: Path) -> Path:
    return demo_run / "bundle"


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory, demo_run) -> tuple[Path, np.ndarray, np.ndarray]:
    """The digits test split as an npz (x, y), so client processes need not import scikit-learn."""
    from prune2edge.data import load_digits

    d = load_digits()
    path = tmp_path_factory.mktemp("digits") / "digits_test.npz"
    np.savez(path, x=d.x_test, y=d.y_test)
    return path, d.x_test, d.y_test


@pytest.fixture
def broker(mosquitto_exe, tmp_path):
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


def members(bundle: Path) -> list[str]:
    return [e["id"] for e in read_manifest(bundle)["members"]]


class Listener:
    """A test-side MQTT client that records (topic, decoded JSON) for some topics."""

    def __init__(self, broker: Broker, topics: list[str]):
        self.messages: list[tuple[str, dict]] = []
        self.link = fleet.Link(broker, f"test-{time.monotonic_ns()}", topics, self._on).start()
        time.sleep(0.2)  # let the subscriptions settle

    def _on(self, topic: str, payload: bytes) -> None:
        self.messages.append((topic, json.loads(payload)))

    def on(self, topic: str) -> list[dict]:
        return [m for t, m in list(self.messages) if t == topic]

    def wait(self, predicate, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out; got {self.messages}"
            time.sleep(0.05)


def start_stream(url: str, name: str, npz: Path, out: Path, n: int = 450, rate: float = RATE) -> subprocess.Popen:
    """`prune2edge classify` as its own process, paced, writing decisions to ``out``."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prune2edge.cli",
            "classify",
            str(npz),
            "--broker",
            url,
            "--fleet",
            name,
            "--rate",
            str(rate),
            "--limit",
            str(n),
            "--out",
            str(out),
            "--timeout",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def rows(path: Path) -> list[dict]:
    """The complete JSON lines of ``path``: while the client appends, the text after the last newline may be
    a line it is still writing (a read can land between the pages of one write), so it is left for later."""
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in lines]


def wait_rows(path: Path, n: int, proc: subprocess.Popen, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(r := rows(path)) < n:
        assert proc.poll() is None, f"client exited early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"only {len(r)} decisions after {timeout} s"
        time.sleep(0.05)
    return r


def finish(proc: subprocess.Popen, out: Path, n: int) -> list[dict]:
    """Wait for the client; every frame it sent must have exactly one outcome."""
    _stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stderr
    got = rows(out)
    assert sorted(r["index"] for r in got) == list(range(n)), stderr
    return got


# --- import path, CLI errors ----------------------------------------------------------------------------------


def test_node_imports_no_training_package(bundle):
    code = (
        "import sys\n"
        "from prune2edge import cli\nfrom prune2edge.runtime import fleet\n"
        f"node = fleet.Node({str(bundle)!r}, {members(bundle)[0]!r}, fleet.Broker.parse('mqtt://127.0.0.1:1'), 't')\n"
        "node.bundle.member_proba(__import__('numpy').zeros((1, 8, 8, 1), 'uint8'))\n"
        "heavy = sorted(set(cli.TRAINING_MODULES) & set(sys.modules))  # torch, sklearn, scipy, matplotlib, onnx...\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.broker
def test_clear_errors(bundle, tmp_path, mosquitto_exe):
    altered = tmp_path / "bundle"
    shutil.copytree(bundle, altered)
    entry = read_manifest(bundle)["members"][1]
    m, shipped = entry["id"], altered / entry["path"]
    blob = bytearray(shipped.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shipped.write_bytes(bytes(blob))
    unused = f"mqtt://127.0.0.1:{fleet.free_port()}"
    cases = [
        (["node", str(altered), "--member", m, "--broker", unused], f"bundle member '{m}' was altered"),
        (["node", str(bundle), "--member", "nope", "--broker", unused], "bundle has no member ['nope']"),
        (["node", str(bundle), "--member", m, "--broker", "http://x:1"], "bad broker URL 'http://x:1'"),
        (["node", str(bundle), "--member", m, "--broker", "mqtt://h:port"], "bad broker URL"),
        (["node", str(bundle), "--member", m, "--broker", unused], "cannot reach the MQTT broker at"),
        (
            ["aggregator", str(bundle), "--broker", unused, "--quorum", "9"],
            f"--quorum must be between 1 and {len(members(bundle))}",
        ),
        (["node", str(bundle), "--member", m, "--broker", unused, "--fleet", "a/b"], "bad fleet name"),
        (["fleet", str(altered), "--members", m], f"bundle member '{m}' was altered"),
    ]
    for args, message in cases:
        r = cli(*args, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert r.stderr.strip().count("\n") == 0 or args[0] == "fleet", r.stderr  # one line


def test_missing_mosquitto_says_how_to_install(monkeypatch):
    monkeypatch.setattr(local.shutil, "which", lambda name: None)
    monkeypatch.setattr(local.os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match=r"not installed: install it with `sudo apt-get install mosquitto`"):
        fleet.find_mosquitto()


@pytest.mark.broker
@pytest.mark.slow
def test_client_resends_overdue_frames_while_it_streams(broker):
    """A frame with no outcome is sent again after retry_s even while the stream goes on (it used to wait for a
    full window or the end of the stream, past the aggregator's wait for a frame it knows only by votes)."""
    t, url = Topics("resend"), Broker.parse(broker.url)
    listener = Listener(url, [t.frames])
    listener.link.publish(
        t.aggregator,
        fleet.dumps({"state": "online", "members": [], "shape": [8, 8, 1], "classes": ["a", "b"], "timeout_ms": 500}),
        retain=True,
    )  # an aggregator that never answers
    summary = fleet.classify(url, "resend", np.zeros((12, 8, 8, 1), np.uint8), rate=2, retry_s=1.5, timeout_s=1.0)
    listener.wait(lambda: len(listener.messages) == 12 + summary["resent"])
    listener.link.stop()
    sends = [m["id"] for _, m in listener.messages]
    first = sends.index(sends[0], 1)  # frame 0 sent again ...
    assert first < sends.index(summary["missing"][-1]), sends  # ... before the last frame was first sent
    assert len(summary["missing"]) == 12


@pytest.mark.broker
@pytest.mark.slow
def test_client_exits_nonzero_when_decisions_never_come(bundle, broker, digits_npz, tmp_path):
    lf = LocalFleet(bundle, Broker.parse(broker.url), "mute", workdir=tmp_path / "fleet")
    agg = lf.spawn("aggregator")
    try:
        lf.wait_ready(roles=["aggregator"])
        agg.send_signal(signal.SIGSTOP)  # alive to the broker for a while, but it answers nothing
        r = cli(
            "classify", str(digits_npz[0]), "--limit", "5", "--broker", broker.url, "--fleet", "mute", "--timeout", "2"
        )
        assert r.returncode == 2, r.stderr
        assert "error: 5 of 5 frames got no decision" in r.stderr, r.stderr
    finally:
        agg.send_signal(signal.SIGCONT)
        lf.stop()


@pytest.mark.broker
def test_fleet_runs_until_ctrl_c(bundle, mosquitto_exe):
    proc = subprocess.Popen(
        [sys.executable, "-m", "prune2edge.cli", "fleet", str(bundle), "--members", members(bundle)[0]],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a failure below kills its nodes and broker too
    )
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        assert "and an aggregator on mqtt://127.0.0.1:" in "".join(lines), lines
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
        assert proc.returncode == 0, rest
        assert "fleet stopped" in rest
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


# --- the whole fleet equals the offline ensemble ---------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.slow
def test_fleet_classifies_like_the_offline_ensemble(bundle, digits_npz, tmp_path, mosquitto_exe):
    from prune2edge.data import load_digits

    d = load_digits()
    out = tmp_path / "decisions.jsonl"
    r = cli("fleet", str(bundle), "--classify", "digits", "--out", str(out), timeout=180)
    assert r.returncode == 0, r.stderr
    got = sorted(rows(out), key=lambda row: row["index"])
    assert [row["index"] for row in got] == list(range(len(d.y_test)))
    assert all(row["status"] == "decided" and row["voted"] == members(bundle) for row in got)
    offline = Bundle.load(bundle).predict(d.x_test)
    assert [row["class"] for row in got] == offline.tolist()  # the same decision for every image
    assert f"accuracy {(offline == d.y_test).mean():.4f}" in r.stderr


# --- faults ------------------------------------------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.slow
def test_node_killed_mid_stream_then_restarted(bundle, broker, digits_npz, tmp_path):
    ids = members(bundle)[:3]
    victim = ids[1]
    with LocalFleet(bundle, Broker.parse(broker.url), "kill", members=ids, workdir=tmp_path / "fleet") as lf:
        out = tmp_path / "out.jsonl"
        proc = start_stream(broker.url, "kill", digits_npz[0], out)
        wait_rows(out, 60, proc)
        lf.procs[victim].kill()  # SIGKILL: no goodbye, the broker publishes its Last Will
        n_killed = len(wait_rows(out, len(rows(out)) + 40, proc))
        # The stream waits for the new node: starting a process that imports numpy and onnxruntime can take
        # longer than the rest of the stream on a busy machine, and then the restarted node had nothing to vote on.
        proc.send_signal(signal.SIGSTOP)
        try:
            lf.spawn(victim)
            lf.wait_ready(roles=[victim])
        finally:
            proc.send_signal(signal.SIGCONT)
        got = finish(proc, out, 450)
    assert all(r["status"] == "decided" for r in got)
    without = [r for r in got if r["voted"] == [m for m in ids if m != victim]]
    assert len(without) >= 30, "decisions went on from the remaining members"
    assert all(r["missing"] == [victim] for r in without)
    later = [r for r in got[n_killed:] if victim in r["voted"]]
    assert len(later) >= 30, "the restarted node votes again"
    assert got[-1]["voted"] == ids


@pytest.mark.broker
@pytest.mark.slow
def test_aggregator_restart_loses_no_frame(bundle, broker, digits_npz, tmp_path):
    ids = members(bundle)[:3]
    with LocalFleet(bundle, Broker.parse(broker.url), "agg", members=ids, workdir=tmp_path / "fleet") as lf:
        out = tmp_path / "out.jsonl"
        proc = start_stream(broker.url, "agg", digits_npz[0], out)
        wait_rows(out, 60, proc)
        lf.procs["aggregator"].kill()
        time.sleep(0.5)
        lf.spawn("aggregator")
        lf.wait_ready(roles=["aggregator"])
        got = finish(proc, out, 450)  # every frame sent has an outcome: decided, or undecided with the reason
    assert len({r["aggregator"] for r in got}) == 2
    assert all(r["reason"] for r in got if r["status"] == "undecided")
    assert sum(r["status"] == "decided" for r in got) >= 400


@pytest.mark.broker
@pytest.mark.slow
def test_broker_restart_stream_resumes(bundle, broker, digits_npz, tmp_path):
    ids = members(bundle)[:3]
    with LocalFleet(bundle, Broker.parse(broker.url), "brk", members=ids, workdir=tmp_path / "fleet"):
        out = tmp_path / "out.jsonl"
        proc = start_stream(broker.url, "brk", digits_npz[0], out)
        wait_rows(out, 60, proc)
        broker.stop(kill=True)
        n_down = len(rows(out))
        time.sleep(1.0)
        broker.start()  # same port, empty: no sessions, no retained messages
        got = finish(proc, out, 450)
    assert len(got) - n_down >= 200, "the stream resumed after the broker came back"
    assert sum(r["status"] == "decided" for r in got) >= 400
    assert all(r["status"] == "decided" for r in got[-50:])


# --- wire format: malformed frames, zero votes, duplicate and late votes ----------------------------------------


@pytest.mark.broker
def test_malformed_frames_are_reported_and_the_node_keeps_serving(bundle, broker, tmp_path):
    m = members(bundle)[0]
    t = Topics("bad")
    url = Broker.parse(broker.url)
    with LocalFleet(bundle, url, "bad", members=[m], workdir=tmp_path / "fleet") as lf:
        listener = Listener(url, [t.errors, t.results])
        good = np.zeros((8, 8, 1), np.uint8)
        nan = np.full((8, 8, 1), np.nan, np.float32)
        bad = {
            "json": b"{not json",
            "shape": fleet.encode_frame("f-shape", np.zeros((8, 8), np.uint8)),
            "dtype": json.dumps(
                {
                    "v": 1,
                    "id": "f-nan",
                    "shape": [8, 8, 1],
                    "dtype": "float32",
                    "data": base64.b64encode(nan.tobytes()).decode(),
                }
            ).encode(),
            "size": b"{" + b" " * fleet.frame_limit((8, 8, 1)) + b"}",
            "version": json.dumps({"v": 99, "id": "f-v99"}).encode(),
            "bytes": json.dumps(
                {
                    "v": 1,
                    "id": "f-short",
                    "shape": [8, 8, 1],
                    "dtype": "uint8",
                    "data": base64.b64encode(b"abc").decode(),
                }
            ).encode(),
        }
        for payload in bad.values():
            listener.link.publish(t.frames, payload)
        listener.link.publish(t.frames, fleet.encode_frame("f-good", good))
        listener.wait(lambda: any(r["frame"] == "f-good" for r in listener.on(t.results)))
        listener.wait(lambda: len(listener.on(t.errors)) >= len(bad))
        errors = {e["error"].split(" ")[0] + " " + str(e["frame"]) for e in listener.on(t.errors)}
        assert all(e["source"] == f"node/{m}" for e in listener.on(t.errors))
        text = " | ".join(e["error"] for e in listener.on(t.errors))
        for needle in (
            "not valid JSON",
            "shape [8, 8]",
            "dtype 'float32'",
            "exceeds the limit",
            "wire version 99",
            "holds 3 bytes",
        ):
            assert needle in text, (needle, errors)
        results = {r["frame"]: r for r in listener.on(t.results)}
        assert results["f-good"]["status"] == "decided" and results["f-good"]["voted"] == [m]
        for fid in ("f-shape", "f-nan", "f-short"):  # malformed, but with an id: the client still gets an outcome
            listener.wait(lambda fid=fid: fid in {r["frame"] for r in listener.on(t.results)})
            r = {r["frame"]: r for r in listener.on(t.results)}[fid]
            assert r["status"] == "undecided" and r["reason"].startswith("malformed frame")
        assert lf.dead() == []
        listener.link.stop()


@pytest.mark.broker
def test_aggregator_decides_undecided_duplicates_and_late_votes(bundle, broker, tmp_path):
    ids = members(bundle)[:3]
    sha = {e["id"]: e["sha256"] for e in read_manifest(bundle)["members"]}
    t = Topics("agg1")
    url = Broker.parse(broker.url)
    lf = LocalFleet(bundle, url, "agg1", members=ids, timeout_ms=400, workdir=tmp_path / "fleet")
    lf.spawn("aggregator")  # no nodes: the test plays them
    try:
        lf.wait_ready(roles=["aggregator"])
        listener = Listener(url, [t.results, t.errors])

        def vote(frame: str, member: str, k: int, digest: str | None = None) -> None:
            p = np.full(10, 0.02)
            p[k] = 0.82
            listener.link.publish(
                t.votes,
                fleet.dumps(
                    {
                        "frame": frame,
                        "member": member,
                        "proba": p.tolist(),
                        "sha256": digest or sha[member],
                        "infer_ms": 1.0,
                    }
                ),
            )

        listener.link.publish(t.frames, fleet.encode_frame("f-silent", np.zeros((8, 8, 1), np.uint8)))
        vote("f-two", ids[0], 3)
        vote("f-two", ids[0], 7)  # a duplicate (a second vote from the same member) is ignored
        vote("f-two", ids[1], 3)
        vote("f-wrong", ids[2], 1, digest="0" * 64)
        listener.wait(lambda: {"f-silent", "f-two"} <= {r["frame"] for r in listener.on(t.results)})
        vote("f-two", ids[2], 5)  # late: already decided
        time.sleep(0.8)
        res = listener.on(t.results)
        assert [r["frame"] for r in res].count("f-two") == 1
        two = next(r for r in res if r["frame"] == "f-two")
        assert two["status"] == "decided" and two["class"] == 3 and two["voted"] == ids[:2]
        silent = next(r for r in res if r["frame"] == "f-silent")
        assert silent["status"] == "undecided" and "only 0 of 3 members voted" in silent["reason"]
        assert any("different 'm" in e["error"] for e in listener.on(t.errors))
        # a frame sent again after its decision gets the same decision again (how clients recover lost answers)
        listener.link.publish(t.frames, fleet.encode_frame("f-silent", np.zeros((8, 8, 1), np.uint8)))
        listener.wait(lambda: [r["frame"] for r in listener.on(t.results)].count("f-silent") == 2)
        listener.link.stop()
    finally:
        lf.stop()


# --- security: username/password, TLS ---------------------------------------------------------------------------


@pytest.mark.broker
def test_password_protected_broker(bundle, mosquitto_exe, digits_npz, tmp_path):
    pwfile = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "alice", "s3cret"], check=True)
    with Mosquitto(tmp_path / "broker", conf=["allow_anonymous false", f"password_file {pwfile}"]) as b:
        m = members(bundle)[0]
        r = cli(
            "node",
            str(bundle),
            "--member",
            m,
            "--broker",
            b.url,
            "--username",
            "alice",
            "--password",
            "nope",
            timeout=60,
        )
        assert r.returncode == 2 and "refused the connection" in r.stderr and "--username/--password" in r.stderr, (
            r.stderr
        )
        r = cli("node", str(bundle), "--member", m, "--broker", b.url, timeout=60)
        assert r.returncode == 2 and "refused the connection" in r.stderr, r.stderr
        auth = Broker.parse(b.url, "alice", "s3cret")
        with LocalFleet(bundle, auth, "auth", members=[m], workdir=tmp_path / "fleet"):
            out = tmp_path / "out.jsonl"
            r = cli(
                "classify",
                str(digits_npz[0]),
                "--limit",
                "20",
                "--broker",
                b.url,
                "--fleet",
                "auth",
                "--username",
                "alice",
                "--out",
                str(out),
                env={**__import__("os").environ, "PRUNE2EDGE_MQTT_PASSWORD": "s3cret"},
            )
            assert r.returncode == 0, r.stderr
            assert len(rows(out)) == 20 and all(row["status"] == "decided" for row in rows(out))


@pytest.mark.broker
@pytest.mark.slow
def test_tls_broker_with_client_certificates(bundle, mosquitto_exe, digits_npz, tmp_path):
    if not shutil.which("openssl"):
        pytest.fail("openssl is needed to make the test certificates")
    ca_key, ca = tmp_path / "ca.key", tmp_path / "ca.pem"
    ext = tmp_path / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def openssl(cmd: str) -> None:
        subprocess.run(["openssl", *cmd.split()], check=True, capture_output=True)

    openssl(f"req -x509 -newkey rsa:2048 -nodes -keyout {ca_key} -out {ca} -days 1 -subj /CN=test-ca")
    for name in ("server", "client"):
        key, csr, cert = (tmp_path / f"{name}.{s}" for s in ("key", "csr", "pem"))
        openssl(f"req -newkey rsa:2048 -nodes -keyout {key} -out {csr} -subj /CN={name}")
        openssl(f"x509 -req -in {csr} -CA {ca} -CAkey {ca_key} -CAcreateserial -out {cert} -days 1 -extfile {ext}")
    conf = [
        f"cafile {ca}",
        f"certfile {tmp_path / 'server.pem'}",
        f"keyfile {tmp_path / 'server.key'}",
        "require_certificate true",
    ]
    with Mosquitto(tmp_path / "broker", conf=conf) as b:
        url = f"mqtts://127.0.0.1:{b.port}"
        m = members(bundle)[0]
        for args in (
            ["--broker", f"mqtt://127.0.0.1:{b.port}"],  # plain MQTT to a TLS port
            ["--broker", url, "--tls-ca", str(ca)],
        ):  # no client certificate
            r = cli("node", str(bundle), "--member", m, *args, timeout=60)
            assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr  # a clear error, not a hang
        tls = [
            "--tls-ca",
            str(ca),
            "--tls-cert",
            str(tmp_path / "client.pem"),
            "--tls-key",
            str(tmp_path / "client.key"),
        ]
        with LocalFleet(
            bundle,
            Broker.parse(url, tls_ca=tls[1], tls_cert=tls[3], tls_key=tls[5]),
            "tls",
            members=[m],
            workdir=tmp_path / "fleet",
        ):
            out = tmp_path / "out.jsonl"
            r = cli(
                "classify",
                str(digits_npz[0]),
                "--limit",
                "10",
                "--broker",
                url,
                *tls,
                "--fleet",
                "tls",
                "--out",
                str(out),
            )
            assert r.returncode == 0, r.stderr
            assert len(rows(out)) == 10
