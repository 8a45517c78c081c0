"""The fleet's aggregator: the nodes' votes in, one decision (or ``undecided``, with the reason) per frame out."""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle import Bundle, read_manifest, restrict
from ..errors import UserError
from ..vote import decide
from .mqtt import Broker, Link
from .wire import (
    DEFAULT_TIMEOUT_MS,
    BadMessage,
    Topics,
    decode_frame,
    dumps,
    frame_limit,
    parse,
    read_frame_id,
    resend_after,
    status_payload,
)

log = logging.getLogger(__name__)

SETTLE_S = 1.0  # after (re)connecting, the aggregator waits this long for retained statuses before it
# decides a frame on fewer than all members' votes
DONE_MEMORY = 100_000  # decided frame ids the aggregator remembers (for duplicates and re-sends)


@dataclass
class _Frame:
    first_seen: float  # time.monotonic() when this aggregator first heard of the frame
    deadline: float  # when it is decided with the votes in hand (or undecided)
    payload: bytes | None = None  # the frame itself, when seen (not after an aggregator restart mid-frame)
    votes: dict = field(default_factory=dict)  # member -> probabilities
    infer_ms: dict = field(default_factory=dict)


class Aggregator:
    """Decides each frame with the bundle's voting rule: as soon as every live member has voted (and at least
    ``quorum`` have), else at ``timeout_ms`` with >= quorum votes, else publishes it as ``undecided``. A decision
    whose vote margin is below ``abstain_below`` (default: the bundle's threshold) is published as ``review``."""

    def __init__(
        self,
        bundle_dir: Path | str,
        broker: Broker,
        fleet: str,
        quorum: int | None = None,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        members: list[str] | None = None,
        abstain_below: float | None = None,
    ):
        self.topics = Topics(fleet)
        manifest = restrict(read_manifest(bundle_dir), members or None)
        # a manifest-only view: the rule, weights, classes and shape, with no member loaded (nodes run them)
        self.view = Bundle(Path(bundle_dir), manifest, [])
        self.ids = [e["id"] for e in manifest["members"]]
        self.sha256 = {e["id"]: e["sha256"] for e in manifest["members"]}
        self.rule = manifest["vote"]["rule"]
        self.abstain_below = self.view.threshold(abstain_below)
        self.quorum = len(self.ids) // 2 + 1 if quorum is None else quorum
        if not 1 <= self.quorum <= len(self.ids):
            raise UserError(f"--quorum must be between 1 and {len(self.ids)} (the fleet's members), got {self.quorum}")
        if timeout_ms <= 0:
            raise UserError(f"--timeout-ms must be positive, got {timeout_ms}")
        self.timeout_s = timeout_ms / 1000
        self.max_bytes = frame_limit(self.view.shape)
        self.instance = secrets.token_hex(4)
        self.pending: OrderedDict[str, _Frame] = OrderedDict()
        self.done: OrderedDict[str, bytes] = OrderedDict()  # frame id -> its published result
        self.live: dict[str, str] = {}  # member -> instance of its online node
        self.stats = {"decided": 0, "review": 0, "undecided": 0, "ignored_votes": 0, "resent": 0}
        self.next_deadline = math.inf  # the earliest deadline in `pending` (or later: deadlines only move later)
        self.settle_until = math.inf  # until then, early decisions need every member's vote (see SETTLE_S)
        self.lock = threading.Lock()
        info = {
            "role": "aggregator",
            "instance": self.instance,
            "members": self.ids,
            "quorum": self.quorum,
            "timeout_ms": timeout_ms,
            "rule": self.rule,
            "abstain_below": self.abstain_below,
            "shape": list(self.view.shape),
            "classes": self.view.classes,
            "max_frame_bytes": self.max_bytes,
            "input_steps": manifest["input"].get("steps"),
        }  # clients resize and convert frames with them
        self.offline = (self.topics.aggregator, status_payload("offline", **info))
        # a persistent session (fixed client id, clean_session=False): while this aggregator restarts, the broker
        # queues the frames and votes it misses and delivers them when it is back
        self.link = Link(
            broker,
            f"p2e-{fleet}-aggregator",
            [self.topics.frames, self.topics.votes, self.topics.status()],
            self._on_message,
            will=self.offline,
            clean_session=False,
            on_connect=self._on_connect,
            birth=lambda: (self.topics.aggregator, status_payload("online", **info)),
        )

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
                self._publish(
                    e.frame,
                    {"status": "undecided", "reason": f"malformed frame: {e}", "voted": [], "by": "malformed frame"},
                    None,
                )
            return
        if fid in self.done:  # a re-sent frame: the client missed our answer
            self.stats["resent"] += 1
            self.link.publish(self.topics.results, self.done[fid])
        else:
            self.pending.setdefault(fid, self._new_frame()).payload = payload

    def _on_vote(self, payload: bytes) -> None:
        try:
            msg = parse(payload, 64 * 1024)
            fid, member = read_frame_id(msg, "frame"), msg.get("member")
            if member not in self.sha256:
                raise BadMessage(f"vote from {member!r}, which is not a member of this fleet ({self.ids})", fid)
            if msg.get("sha256") != self.sha256[member]:
                raise BadMessage(
                    f"vote from a node running a different '{member}' (sha256 {str(msg.get('sha256'))[:12]}"
                    f"... is not the bundle's {self.sha256[member][:12]}...); give it this bundle",
                    fid,
                )
            proba = np.asarray(msg.get("proba"), np.float64)
            if proba.shape != (len(self.view.classes),) or not np.isfinite(proba).all() or (proba < 0).any():
                raise BadMessage(f"vote from '{member}' does not hold {len(self.view.classes)} probabilities", fid)
        except (BadMessage, TypeError, ValueError) as e:
            self.link.publish(
                self.topics.errors,
                dumps(
                    {
                        "source": "aggregator",
                        "frame": getattr(e, "frame", None),
                        "error": f"bad vote: {e}",
                        "at": time.time(),
                    }
                ),
            )
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
                log.warning(
                    "node for %s runs a different model (sha256 %s...); its votes are refused",
                    member,
                    str(msg.get("sha256"))[:12],
                )
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
            result |= {
                "status": "undecided",
                "reason": f"only {len(voters)} of {len(self.ids)} members voted within "
                f"{self.timeout_s * 1000:.0f} ms; quorum is {self.quorum}{seen}",
            }
        elif weights is not None and weights.sum() <= 0:
            result |= {"status": "undecided", "reason": f"the members that voted ({voters}) all have weight 0"}
        else:
            d = decide(np.stack([frame.votes[m] for m in voters])[:, None, :], self.rule, weights, self.abstain_below)
            k, review = int(d.classes[0]), bool(d.review[0])
            result |= {
                "status": "review" if review else "decided",
                "class": None if review else k,
                "label": None if review else self.view.classes[k],
                "confidence": round(float(d.confidence[0]), 6),
                "votes": int(d.votes[0]),
                "margin": round(float(d.margin[0]), 6),
            }
        self._publish(fid, result, frame)

    def _publish(self, fid: str, result: dict, frame: _Frame | None) -> None:
        result = (
            {"frame": fid, "class": None, "label": None, "confidence": None, "votes": None, "margin": None}
            | result
            | {
                "missing": [m for m in self.ids if m not in result["voted"]],
                "quorum": self.quorum,
                "rule": self.rule,
                "abstain_below": self.abstain_below,
                "latency_ms": None if frame is None else round((time.monotonic() - frame.first_seen) * 1000, 3),
                "aggregator": self.instance,
            }
        )
        payload = dumps(result)
        self.stats[result["status"]] += 1
        self.done[fid] = payload
        while len(self.done) > DONE_MEMORY:
            self.done.popitem(last=False)
        self.link.publish(self.topics.results, payload)

    def serve(self, stop: threading.Event) -> None:
        """Decide frames until ``stop`` is set; a frame still waiting at its timeout is decided or undecided then."""
        self.link.start()
        log.info(
            "aggregator for fleet '%s' on %s: members %s, quorum %d, timeout %.0f ms, rule %s, abstain below %g",
            self.topics.fleet,
            self.link.broker.url,
            self.ids,
            self.quorum,
            self.timeout_s * 1000,
            self.rule,
            self.abstain_below,
        )
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
