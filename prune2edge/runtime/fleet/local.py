"""A fleet on this machine: a private Mosquitto, one ``prune2edge node`` process per member, an aggregator."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ...errors import UserError
from ..bundle import read_manifest, restrict, verify_member
from .mqtt import Broker, Link
from .wire import DEFAULT_TIMEOUT_MS, BadMessage, Topics, parse

INSTALL_HINT = (
    "install it with `sudo apt-get install mosquitto` (Debian/Ubuntu; `brew install mosquitto` on macOS), "
    "or pass --broker mqtt://HOST:PORT of a broker you run"
)


def find_mosquitto() -> str:
    """The mosquitto executable, or a UserError saying how to install it."""
    exe = shutil.which("mosquitto") or next(
        (
            p
            for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")
            if os.access(p, os.X_OK)
        ),
        None,
    )
    if exe is None:
        raise UserError(f"Mosquitto (the MQTT broker) is not installed: {INSTALL_HINT}")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """A private Mosquitto on a loopback port, configured by an explicit file in ``workdir``.

    ``conf`` adds config lines (e.g. ``allow_anonymous false`` and ``password_file PATH``); without them
    anyone on this machine may connect.
    """

    def __init__(self, workdir: Path | str, port: int | None = None, conf: list[str] | None = None):
        self.exe = find_mosquitto()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf_file = self.workdir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", "log_dest stderr", "set_tcp_nodelay true"]
        if os.geteuid() == 0:
            lines.insert(0, "user root")  # else it switches to user `mosquitto`, who cannot read files in workdir
        extra = list(conf or [])
        if not any(line.startswith("allow_anonymous") for line in extra):
            extra.append("allow_anonymous true")
        self.conf_file.write_text("\n".join(lines + extra) + "\n")
        self.log_file = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        with open(self.log_file, "ab") as logf:
            self.proc = subprocess.Popen(
                [self.exe, "-c", str(self.conf_file)], stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(
                    f"mosquitto exited at start (status {self.proc.returncode}): "
                    f"{self.log_file.read_text().strip().splitlines()[-1:]}; config {self.conf_file}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise UserError(f"mosquitto did not open port {self.port} within {timeout_s:.0f} s; see {self.log_file}")

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalFleet:
    """Every member as its own ``prune2edge node`` process plus a ``prune2edge aggregator`` process on this
    machine; with no ``broker``, a private Mosquitto on a free loopback port. ``runtimes``: the runtime a member's
    node runs it on (``prune2edge node --runtime``), by member id; ONNX Runtime for the others."""

    def __init__(
        self,
        bundle_dir: Path | str,
        broker: Broker | None = None,
        fleet: str = "default",
        members: list[str] | None = None,
        quorum: int | None = None,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        workdir: Path | str | None = None,
        abstain_below: float | None = None,
        runtimes: dict[str, str] | None = None,
    ):
        self.bundle_dir = Path(bundle_dir)
        self.runtimes = runtimes or {}  # member -> the runtime its node runs it on (default: onnxruntime)
        entries = restrict(read_manifest(self.bundle_dir), members or None)["members"]
        self.members = [e["id"] for e in entries]
        self.devices = {e["id"]: e.get("device") for e in entries}  # a bundle selected for devices: member -> device
        for entry in entries:  # an altered member: say so before starting anything
            verify_member(self.bundle_dir, entry)
        self.topics = Topics(fleet)
        self.quorum, self.timeout_ms, self.abstain_below = quorum, timeout_ms, abstain_below
        self.own_workdir = workdir is None  # a temporary one is removed again after a clean shutdown
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="prune2edge-fleet-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mosquitto = None if broker else Mosquitto(self.workdir / "broker")
        self.broker = broker
        self.procs: dict[str, subprocess.Popen] = {}

    def command(self, role: str) -> tuple[list[str], dict[str, str]]:
        """The command line and extra environment of one process: a member id, or ``aggregator``."""
        args, env = self.broker.cli_args()
        cmd = [sys.executable, "-m", "prune2edge.cli"]
        if role == "aggregator":
            cmd += (
                [
                    "aggregator",
                    str(self.bundle_dir),
                    "--members",
                    ",".join(self.members),
                    "--timeout-ms",
                    str(self.timeout_ms),
                ]
                + (["--quorum", str(self.quorum)] if self.quorum else [])
                + ([] if self.abstain_below is None else ["--abstain-below", repr(self.abstain_below)])
            )
        else:  # a member the bundle assigns to a device is started as that device's node
            cmd += (
                ["node", str(self.bundle_dir)]
                + (["--device", self.devices[role]] if self.devices[role] else ["--member", role])
                + (["--runtime", self.runtimes[role]] if role in self.runtimes else [])
            )
        return cmd + args + ["--fleet", self.topics.fleet], env

    def spawn(self, role: str) -> subprocess.Popen:
        """Start (or restart) one process; its output goes to ``workdir/<role>.log``."""
        cmd, env = self.command(role)
        with open(self.workdir / f"{role}.log", "ab") as logf:
            self.procs[role] = subprocess.Popen(
                cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=os.environ | env | {"PYTHONUNBUFFERED": "1"},
            )
        return self.procs[role]

    def log_tail(self, role: str, lines: int = 1) -> str:
        path = self.workdir / f"{role}.log"
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) if path.exists() else ""

    def start(self, ready_timeout_s: float = 60.0) -> LocalFleet:
        if self.mosquitto:
            self.mosquitto.start()
            self.broker = Broker.parse(self.mosquitto.url)
        try:
            for role in self.members + ["aggregator"]:
                self.spawn(role)
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float = 60.0, roles: list[str] | None = None) -> None:
        """Wait until each process (all, or ``roles``) has announced itself online; a process that exits fails."""
        roles = roles or self.members + ["aggregator"]
        online: set[str] = set()
        pids = {role: self.procs[role].pid for role in roles}

        def on_message(topic: str, payload: bytes) -> None:
            try:
                msg = parse(payload, 1 << 20)
            except BadMessage:
                return
            role = "aggregator" if topic == self.topics.aggregator else topic.rsplit("/", 1)[1]
            if msg.get("state") == "online" and msg.get("pid") == pids.get(role):
                online.add(role)

        link = Link(
            self.broker,
            f"p2e-{self.topics.fleet}-watch-{secrets.token_hex(4)}",
            [self.topics.aggregator, self.topics.status()],
            on_message,
        ).start()
        try:
            deadline = time.monotonic() + timeout_s
            while not set(roles) <= online:
                for role in roles:
                    if self.procs[role].poll() is not None:
                        raise UserError(
                            f"fleet {role} exited (status {self.procs[role].returncode}): {self.log_tail(role)}"
                        )
                if time.monotonic() > deadline:
                    late = sorted(set(roles) - online)
                    raise UserError(
                        f"fleet processes {late} did not come online within {timeout_s:.0f} s; logs in {self.workdir}"
                    )
                time.sleep(0.05)
        finally:
            link.stop()

    def dead(self) -> list[str]:
        return [role for role, p in self.procs.items() if p.poll() is not None]

    def watch(self, warn) -> None:
        """Until interrupted: call ``warn(role, last log line)`` once for each process that exits."""
        reported: set[str] = set()
        while True:
            time.sleep(0.5)
            for role in set(self.dead()) - reported:
                warn(role, self.log_tail(role))
                reported.add(role)

    def stop(self) -> None:
        """SIGTERM every process (nodes say `offline`), SIGKILL what is left after 5 s, then the private broker."""
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 5
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.mosquitto:
            self.mosquitto.stop()
        if self.own_workdir and all(p.returncode in (0, -signal.SIGTERM) for p in self.procs.values()):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalFleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
