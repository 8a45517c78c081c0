"""A node that receives its member over the broker: it starts empty (or from the versions in its store), takes
each signed release that assigns a member to its device, fetches only that member's chunks, checks the signature
and the sha256, keeps the file beside the version it runs, and votes with the versions the aggregator's rollout
state names (docs/fleet.md, Deploy)."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import UserError
from ..bundle import Bundle
from .mqtt import Broker, Link
from .node import MAX_BATCH, Server, vote_payload
from .release import check_name, open_release
from .slots import SLOTS, Slots
from .trust import load_trusted, unseal
from .wire import BadMessage, decode_frame, frame_limit, parse, status_payload

log = logging.getLogger(__name__)


@dataclass
class _Fetch:
    """A member file being received: its release and the chunks so far."""

    body: dict
    envelope: bytes
    member: str
    chunks: dict[int, bytes] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.body["version"]

    @property
    def artifact(self) -> dict:
        return self.body["artifacts"][self.member]


class DeployedNode(Server):
    """Votes with the member its device is assigned in each signed version it holds (at most two: the one serving
    and the one in shadow, or the previous one); swaps versions between frames."""

    def __init__(
        self,
        broker: Broker,
        fleet: str,
        trust: list[Path | str],
        store: Path | str,
        device: str,
        max_batch: int = MAX_BATCH,
        threads: int = 1,
        runtime: str = "onnxruntime",
    ):
        super().__init__(fleet, max_batch)
        self.device, self.threads, self.runtime = check_name(device, "device"), threads, runtime
        self.source = f"node/{device}"
        self.trusted = load_trusted(trust)
        self.store = Slots(store, self.trusted)
        self.bdseq, self.seq = self.store.next_bdseq(), 0
        self.slots: dict[int, Bundle] = {v: self._load(slot, body) for v, (body, slot) in self.store.read().items()}
        running = [v for v in self.store.state.get("running", []) if v in self.slots]
        self.run: list[int] = running or sorted(self.slots)[-1:]  # the versions it votes with; the serving one last
        self.wanted: dict | None = None  # the aggregator's rollout state
        self.fetch: _Fetch | None = None
        t = self.topics
        self.link = Link(
            broker,
            f"p2e-{fleet}-node-{device}-{self.instance}",
            [t.frames, t.release, t.control, t.rollout],
            self._on_message,
            will=self.offline(),
            birth=lambda: (t.status(device), self._status("online")),
        )

    def _load(self, slot: Path, body: dict) -> Bundle:
        member = body["assign"].get(self.device)
        return Bundle.load(slot, members=[member], threads=self.threads, runtime=self.runtime)  # checks the sha256

    def _status(self, state: str) -> bytes:
        """Birth (``online``, and again whenever the versions run change) or death; the death (Last Will) carries
        the birth's ``bdseq`` (and the versions run when it was set: the last connect), ``seq`` counts this run's
        status messages."""
        self.seq += 1
        models = {
            v: {"member": b.manifest["members"][0]["id"], "sha256": b.manifest["members"][0]["sha256"]}
            for v, b in dict(self.slots).items()
        }
        return status_payload(
            state,
            role="node",
            device=self.device,
            instance=self.instance,
            bdseq=self.bdseq,
            seq=self.seq,
            running=self.run,
            version=self.run[-1] if self.run else None,
            models={str(v): m for v, m in models.items() if v in self.run},
        )

    def offline(self) -> tuple[str, bytes]:
        return self.topics.status(self.device), self._status("offline")

    def describe(self) -> str:
        return f"node on device {self.device} (versions held: {sorted(self.slots) or 'none yet'})"

    # -- messages (MQTT thread); what changes the models runs on the serving thread, between frames

    def _on_message(self, topic: str, payload: bytes) -> None:
        t = self.topics
        try:
            if topic == t.frames:
                self.frames.put(payload)
            elif topic == t.release:
                self._on_release(payload)
            elif topic == t.control:
                self._on_control(payload)
            elif topic == t.rollout:
                self._on_rollout(payload)
            elif self.fetch and topic.startswith(t.artifact(self.fetch.version, self.fetch.member, "")):
                self._on_chunk(topic, payload)
        except BadMessage as e:
            self.report(str(e))

    def _on_release(self, payload: bytes) -> None:
        body = open_release(self.trusted, payload, self.topics.fleet)
        version = body["version"]
        if version in self.slots or (self.fetch and self.fetch.version == version):
            return
        self._stop_fetch()
        if not self.store.allows(version):
            raise BadMessage(
                f"release {version} refused: a downgrade (this node has run version {self.store.state['highest']}); "
                "only a signed rollback naming it brings an older version back"
            )
        member = body.get("assign", {}).get(self.device)
        if member not in body.get("artifacts", {}):
            raise BadMessage(f"release {version} refused: it assigns no member (with a file) to device '{self.device}'")
        self.fetch = _Fetch(body, payload, member)
        topic = self.topics.artifact(version, member)
        self.link.subscriptions.append(topic)
        self.link.client.subscribe(topic, qos=1)
        log.info("release %s: fetching member %s (%d bytes)", version, member, self.fetch.artifact["bytes"])

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        fetch = self.fetch
        try:
            fetch.chunks[int(topic.rsplit("/", 1)[1])] = payload
        except ValueError:
            return
        n = fetch.artifact["chunks"]
        if not set(range(n)) <= set(fetch.chunks):
            return
        self._stop_fetch()
        blob = b"".join(fetch.chunks[i] for i in range(n))
        if len(blob) != fetch.artifact["bytes"] or hashlib.sha256(blob).hexdigest() != fetch.artifact["sha256"]:
            raise BadMessage(
                f"release {fetch.version} refused: member {fetch.member}'s file ({len(blob)} bytes) does not match "
                f"its signed sha256 ({fetch.artifact['bytes']} bytes): tampered or truncated; still serving "
                f"{self.run or 'nothing'}"
            )
        try:
            bundle = self._load(self.store.write(fetch.body, fetch.envelope, fetch.member, blob), fetch.body)
        except UserError as e:
            self.store.remove(fetch.version)
            raise BadMessage(f"release {fetch.version} refused: {e}") from None
        self.frames.put(lambda: self._install(fetch.version, bundle))

    def _stop_fetch(self) -> None:
        if self.fetch:
            topic = self.topics.artifact(self.fetch.version, self.fetch.member)
            self.link.subscriptions.remove(topic)
            self.link.client.unsubscribe(topic)
            self.fetch = None

    def _on_control(self, payload: bytes) -> None:
        body = unseal(self.trusted, payload)
        if body.get("fleet") != self.topics.fleet:
            raise BadMessage(f"command refused: not for fleet '{self.topics.fleet}'")
        if body.get("kind") == "rollback" and isinstance(body.get("version"), int):
            self.store.allow_rollback(body["version"])
            self.frames.put(self._apply)

    def _on_rollout(self, payload: bytes) -> None:
        state = parse(payload, 1 << 20) if payload else None
        self.frames.put(lambda: self._follow(state))

    # -- the serving thread

    def _install(self, version: int, bundle: Bundle) -> None:
        self.slots[version] = bundle
        self.store.ran(version)
        log.info("version %s ready (member %s)", version, bundle.manifest["members"][0]["id"])
        self._apply()

    def _follow(self, state: dict | None) -> None:
        self.wanted = state
        self._apply()

    def _apply(self) -> None:
        """Vote with the versions the rollout state names that this node holds and may run (the serving one last);
        with no rollout state, the newest held. Then keep at most two versions."""
        wanted = self.wanted.get("run", []) if self.wanted else sorted(self.slots)[-1:]
        serving = self.wanted.get("serving") if self.wanted else None
        run = [v for v in wanted if v in self.slots and (v in self.run or self.store.allows(v))]
        run.sort(key=lambda v: (v == serving, v))
        if run and run != self.run:
            log.info("running versions %s (was %s)", run, self.run)
            self.run = self.store.state["running"] = run
            self.store.save()
            self.link.publish(self.topics.status(self.device), self._status("online"), retain=True)
            self.link.will(*self.offline())  # for the next connection: a will is fixed while connected
        keep = self.run + sorted(set(self.slots) - set(self.run), reverse=True)
        for v in keep[max(SLOTS, len(self.run)) :]:
            del self.slots[v]
            self.store.remove(v)

    def _vote(self, batch: list[bytes]) -> None:
        """Vote on each frame with every version run, the serving one last (so its vote arrives after the shadow's)."""
        for version in self.run:
            bundle = self.slots[version]
            frames = []
            for payload in batch:
                try:
                    frames.append(decode_frame(payload, bundle.shape, frame_limit(bundle.shape)))
                except BadMessage as e:
                    if version == self.run[-1]:
                        self.report(str(e), e.frame)
            if frames:
                self._vote_with(version, bundle, frames)
        self.served += len(batch) if self.run else 0

    def _vote_with(self, version: int, bundle: Bundle, frames: list[tuple[str, np.ndarray]]) -> None:
        t0 = time.perf_counter()
        try:
            proba = bundle.member_proba(np.stack([img for _, img in frames]))[0]
        except Exception as e:  # keep serving; say why
            for fid, _ in frames:
                self.report(f"inference failed (version {version}): {e}", fid)
            return
        ms = (time.perf_counter() - t0) * 1000
        entry = bundle.manifest["members"][0]
        ids = {"member": entry["id"], "device": self.device, "version": version, "sha256": entry["sha256"]}
        for (fid, _), p in zip(frames, proba):
            self.link.publish(self.topics.device_votes(self.device), vote_payload(fid, p, ms, len(frames), **ids))
