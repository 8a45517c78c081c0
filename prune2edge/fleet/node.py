"""A fleet node: runs one bundle member; frames in, votes out. Needs only numpy, onnxruntime and paho-mqtt (or
another runtime of :mod:`prune2edge.runtimes` in place of onnxruntime)."""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from pathlib import Path

import numpy as np

from ..bundle import Bundle, read_manifest
from ..errors import UserError
from .mqtt import Broker, Link
from .wire import BadMessage, Topics, decode_frame, dumps, frame_limit, status_payload

log = logging.getLogger(__name__)


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


class Node:
    """Runs one verified member: frames in, votes out; a malformed frame is reported on ``errors`` and skipped."""

    def __init__(
        self,
        bundle_dir: Path | str,
        member: str,
        broker: Broker,
        fleet: str,
        max_batch: int = 32,
        threads: int = 1,
        runtime: str = "onnxruntime",
    ):
        self.topics = Topics(fleet)
        # checks the sha256 first
        self.bundle = Bundle.load(bundle_dir, members=[member], threads=threads, runtime=runtime)
        self.member, self.sha256 = member, self.bundle.manifest["members"][0]["sha256"]
        self.instance = secrets.token_hex(4)
        self.max_batch = max_batch
        self.max_bytes = frame_limit(self.bundle.shape)
        self.frames: queue.Queue = queue.Queue()
        self.served = 0
        info = {
            "role": "node",
            "member": member,
            "instance": self.instance,
            "sha256": self.sha256,
            "runtime": runtime,
            "device": self.bundle.manifest["members"][0].get("device"),
        }  # the device the bundle assigns it to
        self.offline = (self.topics.status(member), status_payload("offline", **info))
        self.link = Link(
            broker,
            f"p2e-{fleet}-{member}-{self.instance}",
            [self.topics.frames],
            self._on_message,
            will=self.offline,
            birth=lambda: (self.topics.status(member), status_payload("online", **info)),
        )

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            self.frames.put(decode_frame(payload, self.bundle.shape, self.max_bytes))
        except BadMessage as e:
            self.report(str(e), e.frame)

    def report(self, error: str, frame: str | None = None) -> None:
        log.warning("rejected frame %s: %s", frame, error)
        self.link.publish(
            self.topics.errors,
            dumps(
                {
                    "source": f"node/{self.member}",
                    "instance": self.instance,
                    "frame": frame,
                    "error": error,
                    "at": time.time(),
                }
            ),
        )

    def serve(self, stop: threading.Event) -> None:
        """Vote on frames until ``stop`` is set; frames waiting in the queue are run as one batch."""
        self.link.start()
        log.info(
            "node %s (sha256 %s..., %s) serving fleet '%s' on %s",
            self.member,
            self.sha256[:12],
            self.bundle.runtime,
            self.topics.fleet,
            self.link.broker.url,
        )
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
            self.link.publish(
                self.topics.votes,
                dumps(
                    {
                        "frame": fid,
                        "member": self.member,
                        "instance": self.instance,
                        "sha256": self.sha256,
                        "proba": [float(v) for v in p],  # float32 -> JSON -> float64 is exact
                        "infer_ms": round(ms, 3),
                        "batch": len(batch),
                    }
                ),
            )
        self.served += len(batch)
