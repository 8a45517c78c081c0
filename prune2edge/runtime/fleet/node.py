"""A fleet node: runs one bundle member; frames in, votes out. Needs only numpy, onnxruntime and paho-mqtt (or
another runtime of :mod:`prune2edge.runtime.runtimes` in place of onnxruntime)."""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ...errors import UserError
from ..bundle import Bundle, read_manifest
from .mqtt import Broker, Link
from .wire import BadMessage, Topics, decode_frame, dumps, frame_limit, status_payload

log = logging.getLogger(__name__)

MAX_BATCH = 32  # the most queued frames a node runs in one call


def member_on(bundle_dir: Path | str, device: str) -> str:
    """The member the bundle assigns to ``device`` (a bundle selected for a devices file, ``deploy.devices``)."""
    assigned = {e["device"]: e["id"] for e in read_manifest(bundle_dir)["members"] if e.get("device")}
    if not assigned:
        raise UserError(
            f"bundle '{bundle_dir}' assigns no member to a device (it was selected without "
            "deploy.devices); start the node with --member ID"
        )
    if device not in assigned:
        raise UserError(
            f"bundle '{bundle_dir}' assigns no member to device '{device}'; it assigns "
            f"{', '.join(f'{m} to {d}' for d, m in assigned.items())}"
        )
    return assigned[device]


class Server:
    """What every node does: messages in on the MQTT thread, one queue, batches of frames run on the serving thread;
    a callable in the queue runs there between two batches (a model swap happens between frames)."""

    link: Link
    source: str  # who reports errors, e.g. node/m001

    def __init__(self, fleet: str, max_batch: int):
        self.topics = Topics(fleet)
        self.instance = secrets.token_hex(4)
        self.max_batch = max_batch
        self.frames: queue.Queue = queue.Queue()
        self.served = 0

    def report(self, error: str, frame: str | None = None) -> None:
        log.warning("rejected %s: %s", f"frame {frame}" if frame else "a message", error)
        self.link.publish(
            self.topics.errors,
            dumps(
                {"source": self.source, "instance": self.instance, "frame": frame, "error": error, "at": time.time()}
            ),
        )

    def _next_batch(self) -> tuple[list, Callable[[], None] | None]:
        """Frames waiting in the queue (up to max_batch) and the callable that ended the batch, if one did."""
        try:
            item = self.frames.get(timeout=0.1)
        except queue.Empty:
            return [], None
        batch: list = []
        while not callable(item):
            batch.append(item)
            if len(batch) >= self.max_batch:
                return batch, None
            try:
                item = self.frames.get_nowait()
            except queue.Empty:
                return batch, None
        return batch, item

    def serve(self, stop: threading.Event) -> None:
        """Vote on frames until ``stop`` is set; frames waiting in the queue are run as one batch."""
        self.link.start()
        log.info("%s serving fleet '%s' on %s", self.describe(), self.topics.fleet, self.link.broker.url)
        try:
            while not stop.is_set():
                batch, then = self._next_batch()
                if batch:
                    self._vote(batch)
                if then:
                    then()
        finally:
            self.link.stop(self.offline())
            log.info("%s stopped after %d frames", self.source, self.served)

    def describe(self) -> str:
        raise NotImplementedError

    def offline(self) -> tuple[str, bytes]:
        raise NotImplementedError

    def _vote(self, batch: list) -> None:
        raise NotImplementedError


def vote_payload(fid: str, proba: np.ndarray, ms: float, batch: int, **ids) -> bytes:
    """One member's vote on one frame; ``ids`` name the member, node and model."""
    return dumps(
        {"frame": fid}
        | ids
        | {
            "proba": [float(v) for v in proba],  # float32 -> JSON -> float64 is exact
            "infer_ms": round(ms, 3),
            "batch": batch,
        }
    )


class Node(Server):
    """Runs one verified member: frames in, votes out; a malformed frame is reported on ``errors`` and skipped."""

    def __init__(
        self,
        bundle_dir: Path | str,
        member: str,
        broker: Broker,
        fleet: str,
        max_batch: int = MAX_BATCH,
        threads: int = 1,
        runtime: str = "onnxruntime",
    ):
        super().__init__(fleet, max_batch)
        # checks the sha256 first
        self.bundle = Bundle.load(bundle_dir, members=[member], threads=threads, runtime=runtime)
        self.member, self.sha256 = member, self.bundle.manifest["members"][0]["sha256"]
        self.source = f"node/{member}"
        self.max_bytes = frame_limit(self.bundle.shape)
        info = {
            "role": "node",
            "member": member,
            "instance": self.instance,
            "sha256": self.sha256,
            "runtime": runtime,
            "device": self.bundle.manifest["members"][0].get("device"),
        }  # the device the bundle assigns it to
        self._offline = (self.topics.status(member), status_payload("offline", **info))
        self.link = Link(
            broker,
            f"p2e-{fleet}-{member}-{self.instance}",
            [self.topics.frames],
            self._on_message,
            will=self._offline,
            birth=lambda: (self.topics.status(member), status_payload("online", **info)),
        )

    def describe(self) -> str:
        return f"node {self.member} (sha256 {self.sha256[:12]}..., {self.bundle.runtime})"

    def offline(self) -> tuple[str, bytes]:
        return self._offline

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            self.frames.put(decode_frame(payload, self.bundle.shape, self.max_bytes))
        except BadMessage as e:
            self.report(str(e), e.frame)

    def _vote(self, batch: list[tuple[str, np.ndarray]]) -> None:
        t0 = time.perf_counter()
        try:
            proba = self.bundle.member_proba(np.stack([img for _, img in batch]))[0]
        except Exception as e:  # keep serving; say why
            for fid, _ in batch:
                self.report(f"inference failed: {e}", fid)
            return
        ms = (time.perf_counter() - t0) * 1000
        ids = {"member": self.member, "instance": self.instance, "sha256": self.sha256}
        for (fid, _), p in zip(batch, proba):
            self.link.publish(self.topics.votes, vote_payload(fid, p, ms, len(batch), **ids))
        self.served += len(batch)
