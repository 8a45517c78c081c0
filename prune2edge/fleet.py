"""Run a bundle on a fleet of edge devices over MQTT: one node per member, an aggregator, clients.

Needs only numpy, onnxruntime and paho-mqtt (no torch, no scikit-learn), so a node can run on a
small device. The broker is a real MQTT broker (Eclipse Mosquitto); nothing here is a broker.

Topics, all under ``prune2edge/<fleet>/`` (README.md, "Fleet over MQTT", documents the payloads):

    frames              client -> nodes + aggregator   one image: JSON header + base64 raw uint8 pixels
    votes               node -> aggregator             one member's class probabilities for one frame
    results             aggregator -> clients          the decision (or ``undecided`` with the reason)
    status/<member>     node birth/death (retained; the death is the node's MQTT Last Will)
    aggregator          aggregator birth/death (retained; Last Will), with the fleet's members and input shape
    errors              anything a component rejected (malformed frame, bad vote), with the reason

Every payload is a JSON object with ``"v": 1``. Delivery is QoS 1 (at least once) everywhere, so
every receiver is idempotent: the aggregator keys votes by (frame, member) and remembers decided
frames, re-publishing the stored decision when a frame comes again; the client keeps the first
outcome per frame id and re-sends frames that got none (this is how frames in flight survive an
aggregator or broker restart).
"""
from __future__ import annotations

import base64
import json
import logging
import math
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .bundle import Bundle, check_images, read_manifest, verify_member
from .errors import UserError
from .vote import vote

log = logging.getLogger("prune2edge.fleet")

WIRE_VERSION = 1
QOS = 1
SETTLE_S = 1.0            # after (re)connecting, the aggregator waits this long for retained statuses before it
                          # decides a frame on fewer than all members' votes
KEEPALIVE_S = 10           # the broker declares a silent node dead (and publishes its Last Will) after 1.5x this
DEFAULT_TIMEOUT_MS = 2000  # how long the aggregator waits for the votes of a frame
DONE_MEMORY = 100_000      # decided frame ids the aggregator remembers (for duplicates and re-sends)
INSTALL_HINT = ("install it with `sudo apt-get install mosquitto` (Debian/Ubuntu; `brew install mosquitto` on macOS), "
                "or pass --broker mqtt://HOST:PORT of a broker you run")


# ---------------------------------------------------------------------------------------------------------------
# Wire format


@dataclass(frozen=True)
class Topics:
    """The topic names of one fleet."""

    fleet: str

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.fleet or ""):
            raise UserError(f"bad fleet name {self.fleet!r}: use 1-64 letters, digits, '_', '.' or '-'")

    @property
    def root(self) -> str:
        return f"prune2edge/{self.fleet}"

    @property
    def frames(self) -> str:
        return f"{self.root}/frames"

    @property
    def votes(self) -> str:
        return f"{self.root}/votes"

    @property
    def results(self) -> str:
        return f"{self.root}/results"

    @property
    def errors(self) -> str:
        return f"{self.root}/errors"

    @property
    def aggregator(self) -> str:
        return f"{self.root}/aggregator"

    def status(self, member: str = "+") -> str:
        return f"{self.root}/status/{member}"


class BadMessage(ValueError):
    """A payload that breaks the wire format; ``frame`` is its frame id when that much could be read."""

    def __init__(self, reason: str, frame: str | None = None):
        super().__init__(reason)
        self.frame = frame


def dumps(obj: dict) -> bytes:
    return json.dumps({"v": WIRE_VERSION} | obj, separators=(",", ":"), allow_nan=False).encode()


def resend_after(timeout_s: float) -> float:
    """How long a client waits for a frame's outcome before sending it again (aggregator timeout: ``timeout_s``)."""
    return max(2 * timeout_s, 3.0)


def frame_limit(shape: tuple[int, ...]) -> int:
    """The largest frame payload accepted for images of ``shape``: base64 of the pixels plus 1 KiB of header."""
    return 4 * math.ceil(math.prod(shape) / 3) + 1024


def encode_frame(frame_id: str, image: np.ndarray) -> bytes:
    """One raw uint8 HWC image as a frame payload."""
    img = np.ascontiguousarray(image)
    return dumps({"id": frame_id, "shape": list(img.shape), "dtype": str(img.dtype),
                  "data": base64.b64encode(img.tobytes()).decode("ascii"), "sent_at": time.time()})


def parse(payload: bytes, max_bytes: int) -> dict:
    """A payload as a JSON object of this wire version, or BadMessage."""
    if len(payload) > max_bytes:
        raise BadMessage(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        msg = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadMessage(f"not valid JSON ({e})") from None
    if not isinstance(msg, dict):
        raise BadMessage("not a JSON object")
    if msg.get("v") != WIRE_VERSION:
        raise BadMessage(f"wire version {msg.get('v')!r} is not supported (this is version {WIRE_VERSION})")
    return msg


def _frame_id(msg: dict, key: str = "id") -> str:
    fid = msg.get(key)
    if not isinstance(fid, str) or not 0 < len(fid) <= 200:
        raise BadMessage(f"'{key}' must be a string of 1-200 characters, got {fid!r}")
    return fid


def decode_frame(payload: bytes, shape: tuple[int, ...], max_bytes: int | None = None) -> tuple[str, np.ndarray]:
    """A frame payload -> (frame id, uint8 HWC image of ``shape``), or BadMessage saying what is wrong."""
    msg = parse(payload, frame_limit(shape) if max_bytes is None else max_bytes)
    fid = _frame_id(msg)
    if msg.get("dtype") != "uint8":
        raise BadMessage(f"dtype {msg.get('dtype')!r}: frames carry raw uint8 pixels", fid)
    if msg.get("shape") != list(shape):
        raise BadMessage(f"shape {msg.get('shape')!r}, but this fleet takes {list(shape)} (HWC)", fid)
    try:
        raw = base64.b64decode(msg.get("data"), validate=True)
    except (TypeError, ValueError) as e:
        raise BadMessage(f"'data' is not base64 ({e})", fid) from None
    if len(raw) != math.prod(shape):
        raise BadMessage(f"'data' holds {len(raw)} bytes, shape {list(shape)} needs {math.prod(shape)}", fid)
    return fid, np.frombuffer(raw, np.uint8).reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# Broker connection


@dataclass(frozen=True)
class Broker:
    """Where the broker is and how to log in (``mqtt://`` plain, ``mqtts://`` TLS)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @classmethod
    def parse(cls, url: str, username: str | None = None, password: str | None = None,
              tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None) -> "Broker":
        hint = "use mqtt://HOST:PORT (or mqtts://HOST:PORT for TLS)"
        try:
            u = urlsplit(url)
            port = u.port
        except ValueError as e:
            raise UserError(f"bad broker URL {url!r} ({e}): {hint}") from None
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname or u.path not in ("", "/") or u.query:
            raise UserError(f"bad broker URL {url!r}: {hint}")
        for name, path in (("--tls-ca", tls_ca), ("--tls-cert", tls_cert), ("--tls-key", tls_key)):
            if path and not Path(path).is_file():
                raise UserError(f"{name}: no such file '{path}'")
        if tls_key and not tls_cert:
            raise UserError("--tls-key needs --tls-cert (the client certificate it belongs to)")
        tls = u.scheme == "mqtts" or bool(tls_ca or tls_cert)
        return cls(u.hostname, port or (8883 if tls else 1883), tls,
                   username if username is not None else (unquote(u.username) if u.username else None),
                   password if password is not None else (unquote(u.password) if u.password else None),
                   tls_ca, tls_cert, tls_key)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    def cli_args(self) -> tuple[list[str], dict[str, str]]:
        """Command-line options and environment (the password stays out of argv) that reach this broker."""
        args, env = ["--broker", self.url], {}
        if self.username is not None:
            args += ["--username", self.username]
        if self.password is not None:
            env["PRUNE2EDGE_MQTT_PASSWORD"] = self.password
        for opt, value in (("--tls-ca", self.ca), ("--tls-cert", self.cert), ("--tls-key", self.key)):
            if value:
                args += [opt, value]
        return args, env


class Link:
    """One MQTT connection: connects or says clearly why not, then re-subscribes and re-announces itself
    (``birth``) after every reconnect; ``will`` is published by the broker if the process dies."""

    def __init__(self, broker: Broker, client_id: str, subscriptions: list[str], on_message,
                 will: tuple[str, bytes] | None = None, birth=None, clean_session: bool = True, on_connect=None):
        self.broker, self.subscriptions, self.birth, self.on_message = broker, subscriptions, birth, on_message
        self.on_connect = on_connect  # called with reconnected=True/False after each successful connect
        self.client = c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                                      protocol=mqtt.MQTTv311)
        c.max_queued_messages_set(0)
        c.max_inflight_messages_set(100)
        if broker.username is not None:
            c.username_pw_set(broker.username, broker.password)
        if broker.tls:
            try:
                c.tls_set(ca_certs=broker.ca, certfile=broker.cert, keyfile=broker.key)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot set up TLS for {broker.url} ({e}); check --tls-ca/--tls-cert/--tls-key") from None
        if will:
            c.will_set(will[0], will[1], qos=QOS, retain=True)
        c.reconnect_delay_set(min_delay=0.1, max_delay=1)
        c.on_connect, c.on_disconnect, c.on_message = self._on_connect, self._on_disconnect, self._dispatch
        self.connected = threading.Event()
        self.ever_connected = False
        self._refused: str | None = None
        self._closed: str | None = None  # the broker hung up before accepting us

    def start(self, timeout_s: float = 10.0) -> "Link":
        url = self.broker.url
        try:
            self.client.connect(self.broker.host, self.broker.port, keepalive=KEEPALIVE_S)
        except ssl.SSLError as e:
            raise UserError(f"TLS with the MQTT broker at {url} failed ({e.reason or e}); --tls-ca must be the CA that "
                            "signed the broker's certificate, which must name the host in the URL") from None
        except OSError as e:
            raise UserError(f"cannot reach the MQTT broker at {url} ({e.strerror or e}); is it running? "
                            "(`prune2edge fleet` starts a private one)") from None
        self.client.loop_start()
        deadline = time.monotonic() + timeout_s
        while not self.connected.wait(0.05):
            if self._refused or self._closed or time.monotonic() > deadline:
                self.client.loop_stop()
                self.client.disconnect()
                if self._refused:
                    hint = ("; check --username/--password" if "authori" in self._refused.lower()
                            or "password" in self._refused.lower() else "")
                    raise UserError(f"the MQTT broker at {url} refused the connection: {self._refused}{hint}")
                if self._closed:
                    hint = ("does it want a client certificate (--tls-cert/--tls-key), or is the port not TLS?"
                            if self.broker.tls else "is it a TLS port? then use mqtts://HOST:PORT and --tls-ca")
                    raise UserError(f"the MQTT broker at {url} closed the connection before accepting it; {hint}")
                raise UserError(f"no answer from an MQTT broker at {url} within {timeout_s:.0f} s "
                                "(wrong port, or TLS on one side only?)")
        return self

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=QOS, retain=retain)

    def stop(self, last_words: tuple[str, bytes] | None = None) -> None:
        """Say goodbye (retained, e.g. an ``offline`` status) if connected, then disconnect."""
        if last_words and self.connected.is_set():
            info = self.publish(*last_words, retain=True)
            try:
                info.wait_for_publish(2)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            if self.ever_connected:  # at start, start() says it
                log.warning("broker %s refused the connection: %s", self.broker.url, reason_code)
            return
        if self.ever_connected:
            log.info("reconnected to %s", self.broker.url)
        sock = client.socket()
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # small messages must not wait for Nagle's algorithm (+ delayed ACKs: ~40 ms per hop)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for topic in self.subscriptions:
            client.subscribe(topic, qos=QOS)
        if self.birth:
            client.publish(*self.birth(), qos=QOS, retain=True)
        reconnected, self.ever_connected = self.ever_connected, True
        self.connected.set()
        if self.on_connect:
            self.on_connect(reconnected)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self.ever_connected and not self._refused:
            self._closed = str(reason_code)
        if self.connected.is_set() and reason_code != 0:
            log.warning("lost the broker %s (%s); reconnecting", self.broker.url, reason_code)
        self.connected.clear()

    def _dispatch(self, client, userdata, msg) -> None:
        try:
            self.on_message(msg.topic, msg.payload)
        except Exception:  # a bug in one handler must not kill the network thread
            log.exception("error handling a message on %s", msg.topic)


def stop_on_signals() -> threading.Event:
    """An event set by Ctrl-C or SIGTERM, so ``serve`` loops can shut down cleanly."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _status(state: str, **info) -> bytes:
    return dumps({"state": state, "at": time.time(), "host": socket.gethostname(), "pid": os.getpid()} | info)


# ---------------------------------------------------------------------------------------------------------------
# Node: one bundle member


class Node:
    """Runs one verified member: frames in, votes out; a malformed frame is reported on ``errors`` and skipped."""

    def __init__(self, bundle_dir: Path | str, member: str, broker: Broker, fleet: str, max_batch: int = 32,
                 threads: int = 1):
        self.topics = Topics(fleet)
        self.bundle = Bundle.load(bundle_dir, members=[member], threads=threads)  # checks the sha256 first
        self.member, self.sha256 = member, self.bundle.manifest["members"][0]["sha256"]
        self.instance = secrets.token_hex(4)
        self.max_batch = max_batch
        self.max_bytes = frame_limit(self.bundle.shape)
        self.frames: queue.Queue = queue.Queue()
        self.served = 0
        info = {"role": "node", "member": member, "instance": self.instance, "sha256": self.sha256}
        self.offline = (self.topics.status(member), _status("offline", **info))
        self.link = Link(broker, f"p2e-{fleet}-{member}-{self.instance}", [self.topics.frames], self._on_message,
                         will=self.offline, birth=lambda: (self.topics.status(member), _status("online", **info)))

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            self.frames.put(decode_frame(payload, self.bundle.shape, self.max_bytes))
        except BadMessage as e:
            self.report(str(e), e.frame)

    def report(self, error: str, frame: str | None = None) -> None:
        log.warning("rejected frame %s: %s", frame, error)
        self.link.publish(self.topics.errors, dumps({"source": f"node/{self.member}", "instance": self.instance,
                                                     "frame": frame, "error": error, "at": time.time()}))

    def serve(self, stop: threading.Event) -> None:
        """Vote on frames until ``stop`` is set; frames waiting in the queue are run as one batch."""
        self.link.start()
        log.info("node %s (sha256 %s...) serving fleet '%s' on %s", self.member, self.sha256[:12],
                 self.topics.fleet, self.link.broker.url)
        try:
            while not stop.is_set():
                try:
                    batch = [self.frames.get(timeout=0.1)]
                except queue.Empty:
                    continue
                while len(batch) < self.max_batch:
                    try:
                        batch.append(self.frames.get_nowait())
                    except queue.Empty:
                        break
                self._vote(batch)
        finally:
            self.link.stop(self.offline)
            log.info("node %s stopped after %d frames", self.member, self.served)

    def _vote(self, batch: list[tuple[str, np.ndarray]]) -> None:
        t0 = time.perf_counter()
        try:
            proba = self.bundle.member_proba(np.stack([img for _, img in batch]))[0]
        except Exception as e:  # keep serving; say why
            for fid, _ in batch:
                self.report(f"inference failed: {e}", fid)
            return
        ms = (time.perf_counter() - t0) * 1000
        for (fid, _), p in zip(batch, proba):
            self.link.publish(self.topics.votes, dumps({
                "frame": fid, "member": self.member, "instance": self.instance, "sha256": self.sha256,
                "proba": [float(v) for v in p],  # float32 -> JSON -> float64 is exact
                "infer_ms": round(ms, 3), "batch": len(batch)}))
        self.served += len(batch)


# ---------------------------------------------------------------------------------------------------------------
# Aggregator: votes in, decisions out


@dataclass
class _Frame:
    first_seen: float                  # time.monotonic() when this aggregator first heard of the frame
    deadline: float                    # when it is decided with the votes in hand (or undecided)
    payload: bytes | None = None       # the frame itself, when seen (not after an aggregator restart mid-frame)
    votes: dict = field(default_factory=dict)    # member -> probabilities
    infer_ms: dict = field(default_factory=dict)


class Aggregator:
    """Decides each frame with the bundle's voting rule: as soon as every live member has voted (and at least
    ``quorum`` have), else at ``timeout_ms`` with >= quorum votes, else publishes it as ``undecided``."""

    def __init__(self, bundle_dir: Path | str, broker: Broker, fleet: str, quorum: int | None = None,
                 timeout_ms: int = DEFAULT_TIMEOUT_MS, members: list[str] | None = None):
        self.topics = Topics(fleet)
        manifest = read_manifest(bundle_dir)
        ids = [e["id"] for e in manifest["members"]]
        if members:
            unknown = sorted(set(members) - set(ids))
            if unknown:
                raise UserError(f"bundle has no member {unknown}; it has {ids}")
            manifest = manifest | {"members": [e for e in manifest["members"] if e["id"] in members]}
        # a manifest-only view: the rule, weights, classes and shape, with no member loaded (nodes run them)
        self.view = Bundle(Path(bundle_dir), manifest, [])
        self.ids = [e["id"] for e in manifest["members"]]
        self.sha256 = {e["id"]: e["sha256"] for e in manifest["members"]}
        self.rule = manifest["vote"]["rule"]
        self.quorum = len(self.ids) // 2 + 1 if quorum is None else quorum
        if not 1 <= self.quorum <= len(self.ids):
            raise UserError(f"--quorum must be between 1 and {len(self.ids)} (the fleet's members), got {self.quorum}")
        if timeout_ms <= 0:
            raise UserError(f"--timeout-ms must be positive, got {timeout_ms}")
        self.timeout_s = timeout_ms / 1000
        self.max_bytes = frame_limit(self.view.shape)
        self.instance = secrets.token_hex(4)
        self.pending: OrderedDict[str, _Frame] = OrderedDict()
        self.done: OrderedDict[str, bytes] = OrderedDict()   # frame id -> its published result
        self.live: dict[str, str] = {}                       # member -> instance of its online node
        self.stats = {"decided": 0, "undecided": 0, "ignored_votes": 0, "resent": 0}
        self.next_deadline = math.inf  # the earliest deadline in `pending` (or later: deadlines only move later)
        self.settle_until = math.inf  # until then, early decisions need every member's vote (see SETTLE_S)
        self.lock = threading.Lock()
        info = {"role": "aggregator", "instance": self.instance, "members": self.ids, "quorum": self.quorum,
                "timeout_ms": timeout_ms, "rule": self.rule, "shape": list(self.view.shape),
                "classes": self.view.classes, "max_frame_bytes": self.max_bytes}
        self.offline = (self.topics.aggregator, _status("offline", **info))
        # a persistent session (fixed client id, clean_session=False): while this aggregator restarts, the broker
        # queues the frames and votes it misses and delivers them when it is back
        self.link = Link(broker, f"p2e-{fleet}-aggregator", [self.topics.frames, self.topics.votes, self.topics.status()],
                         self._on_message, will=self.offline, clean_session=False, on_connect=self._on_connect,
                         birth=lambda: (self.topics.aggregator, _status("online", **info)))

    # -- messages (paho's network thread)

    def _on_connect(self, reconnected: bool) -> None:
        with self.lock:
            # Votes queued for our persistent session arrive before the retained node statuses: until those have
            # had time to come, "every live member has voted" would be judged on an empty live set.
            self.settle_until = time.monotonic() + SETTLE_S
            if reconnected:  # the outage may have eaten votes: give the frames in hand a fresh timeout
                now = time.monotonic()
                for frame in self.pending.values():
                    frame.deadline = max(frame.deadline, now + self.timeout_s)

    def _on_message(self, topic: str, payload: bytes) -> None:
        with self.lock:
            if topic == self.topics.frames:
                self._on_frame(payload)
            elif topic == self.topics.votes:
                self._on_vote(payload)
            elif topic.startswith(self.topics.status("")):
                self._on_status(topic.rsplit("/", 1)[1], payload)

    def _on_frame(self, payload: bytes) -> None:
        try:
            fid, _ = decode_frame(payload, self.view.shape, self.max_bytes)
        except BadMessage as e:  # the nodes report it on `errors`; the client still gets an outcome for its id
            if e.frame is not None and e.frame not in self.done and e.frame not in self.pending:
                self._publish(e.frame, {"status": "undecided", "reason": f"malformed frame: {e}", "voted": [],
                                        "by": "malformed frame"}, None)
            return
        if fid in self.done:  # a re-sent frame: the client missed our answer
            self.stats["resent"] += 1
            self.link.publish(self.topics.results, self.done[fid])
        else:
            self.pending.setdefault(fid, self._new_frame()).payload = payload

    def _on_vote(self, payload: bytes) -> None:
        try:
            msg = parse(payload, 64 * 1024)
            fid, member = _frame_id(msg, "frame"), msg.get("member")
            if member not in self.sha256:
                raise BadMessage(f"vote from {member!r}, which is not a member of this fleet ({self.ids})", fid)
            if msg.get("sha256") != self.sha256[member]:
                raise BadMessage(f"vote from a node running a different '{member}' (sha256 {str(msg.get('sha256'))[:12]}"
                                 f"... is not the bundle's {self.sha256[member][:12]}...); give it this bundle", fid)
            proba = np.asarray(msg.get("proba"), np.float64)
            if proba.shape != (len(self.view.classes),) or not np.isfinite(proba).all() or (proba < 0).any():
                raise BadMessage(f"vote from '{member}' does not hold {len(self.view.classes)} probabilities", fid)
        except (BadMessage, TypeError, ValueError) as e:
            self.link.publish(self.topics.errors, dumps({"source": "aggregator", "frame": getattr(e, "frame", None),
                                                         "error": f"bad vote: {e}", "at": time.time()}))
            return
        frame = self.pending.get(fid)
        if frame is None:
            if fid in self.done:  # late, or a duplicate of a vote already counted
                self.stats["ignored_votes"] += 1
                return
            # a vote for a frame we never saw (we restarted, or reconnected after the nodes): wait long enough for
            # the client to re-send the frame, which then reaches every node
            frame = self.pending[fid] = self._new_frame(extra_s=resend_after(self.timeout_s))
        if member in frame.votes:
            self.stats["ignored_votes"] += 1
            return
        frame.votes[member], frame.infer_ms[member] = proba, msg.get("infer_ms")
        self._decide_if_ready(fid, frame)

    def _on_status(self, member: str, payload: bytes) -> None:
        try:
            msg = parse(payload, 64 * 1024) if payload else {"state": "offline"}
        except BadMessage:
            return
        if member not in self.sha256:
            return
        if msg.get("state") == "online":
            if msg.get("sha256") != self.sha256[member]:
                log.warning("node for %s runs a different model (sha256 %s...); its votes are refused", member,
                            str(msg.get("sha256"))[:12])
                return
            self.live[member] = msg.get("instance")
            log.info("member %s online (%d of %d live)", member, len(self.live), len(self.ids))
            # a node (re)connecting may have missed frames (broker restart, network cut): send those it owes
            # again, and give them a fresh timeout for its answer
            now = time.monotonic()
            for frame in self.pending.values():
                if frame.payload and member not in frame.votes:
                    self.link.publish(self.topics.frames, frame.payload)
                    frame.deadline = max(frame.deadline, now + self.timeout_s)
        elif member in self.live and msg.get("instance") in (None, self.live[member]):  # not an older node's will
            del self.live[member]
            log.info("member %s offline (%d of %d live)", member, len(self.live), len(self.ids))
            for fid, frame in list(self.pending.items()):  # frames that waited only for it can be decided now
                self._decide_if_ready(fid, frame)

    # -- decisions

    def _new_frame(self, extra_s: float = 0.0) -> _Frame:
        now = time.monotonic()
        frame = _Frame(now, now + self.timeout_s + extra_s)
        self.next_deadline = min(self.next_deadline, frame.deadline)
        return frame

    def _decide_if_ready(self, fid: str, frame: _Frame) -> None:
        expected = set(self.ids) if time.monotonic() < self.settle_until else set(self.live)
        if len(frame.votes) >= self.quorum and expected <= set(frame.votes):
            self._decide(fid, frame, "all live members voted")

    def _decide(self, fid: str, frame: _Frame, why: str) -> None:
        del self.pending[fid]
        voters = [m for m in self.ids if m in frame.votes]  # manifest order: the same arithmetic as Bundle.predict
        result: dict = {"voted": voters, "by": why, "infer_ms": {m: frame.infer_ms[m] for m in voters}}
        weights = self.view.weights
        if weights is not None:
            weights = weights[[self.ids.index(m) for m in voters]]
        if len(voters) < self.quorum:
            seen = "" if frame.payload else " (this aggregator never saw the frame itself: restarted mid-frame?)"
            result |= {"status": "undecided", "reason": f"only {len(voters)} of {len(self.ids)} members voted within "
                       f"{self.timeout_s * 1000:.0f} ms; quorum is {self.quorum}{seen}"}
        elif weights is not None and weights.sum() <= 0:
            result |= {"status": "undecided", "reason": f"the members that voted ({voters}) all have weight 0"}
        else:
            scores = vote(np.stack([frame.votes[m] for m in voters])[:, None, :], self.rule, weights)[0]
            k = int(scores.argmax())
            result |= {"status": "decided", "class": k, "label": self.view.classes[k],
                       "confidence": round(float(scores[k]), 6)}
        self._publish(fid, result, frame)

    def _publish(self, fid: str, result: dict, frame: _Frame | None) -> None:
        result = {"frame": fid, "class": None, "label": None, "confidence": None} | result | {
            "missing": [m for m in self.ids if m not in result["voted"]], "quorum": self.quorum, "rule": self.rule,
            "latency_ms": None if frame is None else round((time.monotonic() - frame.first_seen) * 1000, 3),
            "aggregator": self.instance}
        payload = dumps(result)
        self.stats[result["status"]] += 1
        self.done[fid] = payload
        while len(self.done) > DONE_MEMORY:
            self.done.popitem(last=False)
        self.link.publish(self.topics.results, payload)

    def serve(self, stop: threading.Event) -> None:
        """Decide frames until ``stop`` is set; a frame still waiting at its timeout is decided or undecided then."""
        self.link.start()
        log.info("aggregator for fleet '%s' on %s: members %s, quorum %d, timeout %.0f ms, rule %s",
                 self.topics.fleet, self.link.broker.url, self.ids, self.quorum, self.timeout_s * 1000, self.rule)
        settled = False
        try:
            while not stop.wait(0.01):
                now = time.monotonic()
                with self.lock:
                    if settled != (now >= self.settle_until):  # statuses are in: frames may be ready now
                        settled = not settled
                        for fid, frame in list(self.pending.items()):
                            self._decide_if_ready(fid, frame)
                    if now >= self.next_deadline:
                        for fid, frame in list(self.pending.items()):
                            if now >= frame.deadline:
                                self._decide(fid, frame, "timeout")
                        self.next_deadline = min((f.deadline for f in self.pending.values()), default=math.inf)
        finally:
            self.link.stop(self.offline)
            log.info("aggregator stopped: %s", self.stats)


# ---------------------------------------------------------------------------------------------------------------
# Client: frames out, decisions in


def classify(broker: Broker, fleet: str, images: np.ndarray, names: list[str] | None = None,
             labels: np.ndarray | None = None, on_result=None, rate: float | None = None, max_in_flight: int = 64,
             timeout_s: float = 30.0, retry_s: float | None = None, ready_timeout_s: float = 30.0) -> dict:
    """Publish each image as a frame and collect one outcome per frame; returns a summary.

    ``on_result(row)`` gets each outcome as it arrives: the aggregator's result plus ``index``, ``input``,
    ``rtt_ms`` (client send to client receive) and ``truth`` when ``labels`` are given. At most
    ``max_in_flight`` frames wait for an outcome at a time; ``rate`` caps frames per second. A frame with no
    outcome after ``retry_s`` is re-sent (backing off), and every frame in flight is re-sent when the connection
    comes back; the client gives up when for ``timeout_s`` no frame was sent and no outcome came, and reports
    the frames still missing.
    """
    topics = Topics(fleet)
    run = secrets.token_hex(4)
    cond = threading.Condition()
    state: dict = {"aggregator": None, "live": {}}
    ids = [f"{run}-{i}" for i in range(len(images))]
    index = {fid: i for i, fid in enumerate(ids)}
    first_sent: dict[int, float] = {}
    last_sent: dict[int, tuple[float, int]] = {}  # index -> (monotonic time, sends)
    outcomes: dict[int, dict] = {}
    progress = [time.monotonic()]

    def on_message(topic: str, payload: bytes) -> None:
        try:
            msg = parse(payload, 1 << 20)
        except BadMessage:
            return
        with cond:
            if topic == topics.results:
                i = index.get(msg.get("frame"))
                if i is None or i in outcomes or i not in first_sent:
                    return
                row = {"index": i, "input": names[i] if names else str(i)} | {k: v for k, v in msg.items() if k != "v"}
                row["rtt_ms"] = round((time.monotonic() - first_sent[i]) * 1000, 3)
                if labels is not None:
                    row["truth"] = int(labels[i])
                outcomes[i] = row
                progress[0] = time.monotonic()
                if on_result:
                    on_result(row)
            elif topic == topics.aggregator:
                state["aggregator"] = msg
            else:
                state["live"][topic.rsplit("/", 1)[1]] = msg.get("state") == "online"
            cond.notify_all()

    def on_connect(reconnected: bool) -> None:
        if reconnected:  # frames in flight may have died with the broker: send them again now
            with cond:
                resend_overdue(time.monotonic(), everything=True)

    def resend_overdue(now: float, everything: bool = False) -> None:
        for i, (t, n) in list(last_sent.items()):
            if i not in outcomes and (everything or now - t > min(retry_s * 2 ** (n - 1), 30)):
                link.publish(topics.frames, payloads[i])
                last_sent[i] = (now, n + 1)

    link = Link(broker, f"p2e-{fleet}-client-{run}", [topics.results, topics.aggregator, topics.status()],
                on_message, on_connect=on_connect).start()
    try:
        with cond:  # the aggregator's (retained) birth tells us the fleet's input shape and members
            cond.wait_for(lambda: (state["aggregator"] or {}).get("state") == "online", ready_timeout_s)
            agg = state["aggregator"]
            if not agg or agg.get("state") != "online":
                raise UserError(f"no aggregator is online for fleet '{fleet}' at {broker.url} (waited "
                                f"{ready_timeout_s:.0f} s); start one: prune2edge aggregator BUNDLE --broker "
                                f"{broker.url} --fleet {fleet}")
            members = agg["members"]
            if not cond.wait_for(lambda: all(state["live"].get(m) for m in members), min(ready_timeout_s, 5.0)):
                log.warning("only %d of the fleet's %d members are online; classifying anyway",
                            sum(bool(state["live"].get(m)) for m in members), len(members))
        try:
            images = np.asarray(images)
            if agg["shape"][-1] == 3 and images.ndim == 4 and images.shape[-1] == 4:
                images = images[..., :3]  # RGBA images: drop alpha
            images = check_images(images, tuple(agg["shape"]))
        except UserError as e:
            raise UserError(f"fleet '{fleet}': {e}") from None
        retry_s = retry_s or resend_after(agg.get("timeout_ms", DEFAULT_TIMEOUT_MS) / 1000)
        payloads = [encode_frame(fid, img) for fid, img in zip(ids, images)]
        t_start = time.monotonic()

        def stalled() -> bool:
            return time.monotonic() - progress[0] > timeout_s

        for i in range(len(ids)):
            if rate:
                time.sleep(max(0.0, t_start + i / rate - time.monotonic()))
            with cond:
                while len(first_sent) - len(outcomes) >= max_in_flight and not stalled():
                    cond.wait(0.05)
                    resend_overdue(time.monotonic())
                if stalled():
                    break
                now = time.monotonic()
                first_sent[i], last_sent[i] = now, (now, 1)
                progress[0] = now  # "stalled" = no outcome for timeout_s since the last frame sent or answered
            link.publish(topics.frames, payloads[i])
        with cond:
            while len(outcomes) < len(first_sent) and not stalled():
                cond.wait(0.05)
                resend_overdue(time.monotonic())
            elapsed = time.monotonic() - t_start
            got = dict(outcomes)
    finally:
        link.stop()
    rows = list(got.values())
    decided = [r for r in rows if r["status"] == "decided"]
    rtt = np.array([r["rtt_ms"] for r in rows]) if rows else np.zeros(1)
    summary = {"frames": len(ids), "decided": len(decided), "undecided": len(rows) - len(decided),
               "missing": [ids[i] for i in range(len(ids)) if i not in got], "elapsed_s": round(elapsed, 3),
               "frames_per_s": round(len(rows) / elapsed, 2) if elapsed > 0 else None,
               "rtt_ms_p50": round(float(np.percentile(rtt, 50)), 3), "rtt_ms_p99": round(float(np.percentile(rtt, 99)), 3),
               "resent": sum(n - 1 for _, n in last_sent.values())}
    if labels is not None:
        summary["accuracy"] = sum(r["class"] == r["truth"] for r in decided) / len(ids)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Local fleet: a private broker, one process per member, an aggregator


def find_mosquitto() -> str:
    """The mosquitto executable, or a UserError saying how to install it."""
    exe = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto",
                                                          "/opt/homebrew/sbin/mosquitto") if os.access(p, os.X_OK)), None)
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

    def start(self, timeout_s: float = 10.0) -> "Mosquitto":
        with open(self.log_file, "ab") as logf:
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf_file)], stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"mosquitto exited at start (status {self.proc.returncode}): "
                                f"{self.log_file.read_text().strip().splitlines()[-1:]}; config {self.conf_file}")
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

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalFleet:
    """Every member as its own ``prune2edge node`` process plus a ``prune2edge aggregator`` process on this
    machine; with no ``broker``, a private Mosquitto on a free loopback port."""

    def __init__(self, bundle_dir: Path | str, broker: Broker | None = None, fleet: str = "default",
                 members: list[str] | None = None, quorum: int | None = None, timeout_ms: int = DEFAULT_TIMEOUT_MS,
                 workdir: Path | str | None = None):
        self.bundle_dir = Path(bundle_dir)
        ids = [e["id"] for e in read_manifest(self.bundle_dir)["members"]]
        unknown = sorted(set(members or []) - set(ids))
        if unknown:
            raise UserError(f"bundle has no member {unknown}; it has {ids}")
        self.members = [m for m in ids if m in members] if members else ids
        for entry in read_manifest(self.bundle_dir)["members"]:  # an altered member: say so before starting anything
            if entry["id"] in self.members:
                verify_member(self.bundle_dir, entry)
        self.topics = Topics(fleet)
        self.quorum, self.timeout_ms = quorum, timeout_ms
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
            cmd += ["aggregator", str(self.bundle_dir), "--members", ",".join(self.members),
                    "--timeout-ms", str(self.timeout_ms)] + (["--quorum", str(self.quorum)] if self.quorum else [])
        else:
            cmd += ["node", str(self.bundle_dir), "--member", role]
        return cmd + args + ["--fleet", self.topics.fleet], env

    def spawn(self, role: str) -> subprocess.Popen:
        """Start (or restart) one process; its output goes to ``workdir/<role>.log``."""
        cmd, env = self.command(role)
        with open(self.workdir / f"{role}.log", "ab") as logf:
            self.procs[role] = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env=os.environ | env | {"PYTHONUNBUFFERED": "1"})
        return self.procs[role]

    def log_tail(self, role: str, lines: int = 1) -> str:
        path = self.workdir / f"{role}.log"
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) if path.exists() else ""

    def start(self, ready_timeout_s: float = 60.0) -> "LocalFleet":
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

        link = Link(self.broker, f"p2e-{self.topics.fleet}-watch-{secrets.token_hex(4)}",
                    [self.topics.aggregator, self.topics.status()], on_message).start()
        try:
            deadline = time.monotonic() + timeout_s
            while not set(roles) <= online:
                for role in roles:
                    if self.procs[role].poll() is not None:
                        raise UserError(f"fleet {role} exited (status {self.procs[role].returncode}): "
                                        f"{self.log_tail(role)}")
                if time.monotonic() > deadline:
                    late = sorted(set(roles) - online)
                    raise UserError(f"fleet processes {late} did not come online within {timeout_s:.0f} s; "
                                    f"logs in {self.workdir}")
                time.sleep(0.05)
        finally:
            link.stop()

    def dead(self) -> list[str]:
        return [role for role, p in self.procs.items() if p.poll() is not None]

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

    def __enter__(self) -> "LocalFleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
