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

from ...errors import UserError
from ..bundle import Bundle, read_manifest, restrict
from ..vote import decide
from .mqtt import Broker, Link
from .wire import (
    DEFAULT_TIMEOUT_MS,
    BadMessage,
    Topics,
    decode_frame,
    dumps,
    frame_label,
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
class Plan:
    """How one version of the fleet votes: its manifest (a view with no member loaded: the nodes run them), its
    members and their sha256, the quorum, the abstain threshold, and (deployed versions) which device runs which
    member."""

    version: int | None
    view: Bundle
    ids: list[str]
    sha256: dict[str, str]
    quorum: int
    abstain_below: float
    devices: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        manifest: dict,
        path: Path,
        quorum: int | None = None,
        abstain_below: float | None = None,
        version: int | None = None,
        devices: dict[str, str] | None = None,
    ) -> Plan:
        view = Bundle(path, manifest, [])
        ids = [e["id"] for e in manifest["members"]]
        quorum = len(ids) // 2 + 1 if quorum is None else quorum
        if not 1 <= quorum <= len(ids):
            raise UserError(f"--quorum must be between 1 and {len(ids)} (the fleet's members), got {quorum}")
        sha256 = {e["id"]: e["sha256"] for e in manifest["members"]}
        return cls(version, view, ids, sha256, quorum, view.threshold(abstain_below), dict(devices or {}))

    @property
    def rule(self) -> str:
        return self.view.manifest["vote"]["rule"]

    def outcome(self, votes: dict[str, np.ndarray], timeout_s: float) -> dict:
        """The decision on one frame from ``votes`` (member -> probabilities), or ``undecided`` with the reason."""
        voters = [m for m in self.ids if m in votes]  # manifest order: the same arithmetic as Bundle.predict
        weights = self.view.weights
        if weights is not None:
            weights = weights[[self.ids.index(m) for m in voters]]
        if len(voters) < self.quorum:
            reason = (
                f"only {len(voters)} of {len(self.ids)} members voted within {timeout_s * 1000:.0f} ms; "
                f"quorum is {self.quorum}"
            )
            return {"voted": voters, "status": "undecided", "reason": reason}
        if weights is not None and weights.sum() <= 0:
            return {
                "voted": voters,
                "status": "undecided",
                "reason": f"the members that voted ({voters}) all have weight 0",
            }
        d = decide(np.stack([votes[m] for m in voters])[:, None, :], self.rule, weights, self.abstain_below)
        k, review = int(d.classes[0]), bool(d.review[0])
        return {
            "voted": voters,
            "status": "review" if review else "decided",
            "class": None if review else k,
            "label": None if review else self.view.classes[k],
            "confidence": round(float(d.confidence[0]), 6),
            "votes": int(d.votes[0]),
            "margin": round(float(d.margin[0]), 6),
        }


@dataclass
class _Frame:
    first_seen: float  # time.monotonic() when this aggregator first heard of the frame
    deadline: float  # when it is decided with the votes in hand (or undecided)
    plan: Plan  # the version serving when the frame was first heard of: its votes decide it
    payload: bytes | None = None  # the frame itself, when seen (not after an aggregator restart mid-frame)
    votes: dict = field(default_factory=dict)  # member -> probabilities
    infer_ms: dict = field(default_factory=dict)
    shadow: dict = field(default_factory=dict)  # member -> probabilities of the version in shadow, if any
    label: int | None = None  # the true class, when the client sent it
    # a version that began serving after the frame was first heard of, and its votes: nodes that switched to it vote
    # with it on the frame re-sent; they decide the frame if the votes of ``plan`` cannot (``Aggregator.ballot``)
    later: tuple[Plan, dict] | None = None

    def ballots(self) -> list[tuple[Plan, dict]]:
        """The votes that may decide the frame, the first version's first."""
        return [(self.plan, self.votes)] + ([self.later] if self.later else [])


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
        manifest = restrict(read_manifest(bundle_dir), members or None)
        self._setup(broker, fleet, timeout_ms, [Topics(fleet).votes])
        self.plan = Plan.of(manifest, Path(bundle_dir), quorum, abstain_below)
        self.plans[None] = self.plan

    def _setup(self, broker: Broker, fleet: str, timeout_ms: int, subscriptions: list[str]) -> None:
        """The state and the MQTT link; the plan comes after (a deployed fleet's with its first release)."""
        if timeout_ms <= 0:
            raise UserError(f"--timeout-ms must be positive, got {timeout_ms}")
        self.topics = Topics(fleet)
        self.timeout_s = timeout_ms / 1000
        self.instance = secrets.token_hex(4)
        self.pending: OrderedDict[str, _Frame] = OrderedDict()
        self.done: OrderedDict[str, bytes] = OrderedDict()  # frame id -> its published result
        self.live: dict[str, str] = {}  # member -> instance of its online node
        self.stats = {"decided": 0, "review": 0, "undecided": 0, "ignored_votes": 0, "resent": 0}
        self.next_deadline = math.inf  # the earliest deadline in `pending` (or later: deadlines only move later)
        self.settle_until = math.inf  # until then, early decisions need every member's vote (see SETTLE_S)
        self.lock = threading.Lock()
        self.plan: Plan | None = None  # the version serving: its votes decide frames
        self.plans: dict[int | None, Plan] = {}  # by version: those whose votes are accepted
        self.shadow: Plan | None = None  # a version voting in shadow: its decisions are recorded, not published
        # a persistent session (fixed client id, clean_session=False): while this aggregator restarts, the broker
        # queues the frames and votes it misses and delivers them when it is back
        self.link = Link(
            broker,
            f"p2e-{fleet}-aggregator",
            [self.topics.frames, self.topics.status(), *subscriptions],
            self._on_message,
            clean_session=False,
            on_connect=self._on_connect,
            birth=lambda: (self.topics.aggregator, self.status("online")),
        )

    def info(self) -> dict:
        """What the birth and death messages say: clients resize and convert frames with it."""
        p = self.plan
        return {"role": "aggregator", "instance": self.instance, "timeout_ms": round(self.timeout_s * 1000)} | (
            {}
            if p is None
            else {
                "members": p.ids,
                "quorum": p.quorum,
                "rule": p.rule,
                "abstain_below": p.abstain_below,
                "shape": list(p.view.shape),
                "classes": p.view.classes,
                "max_frame_bytes": frame_limit(p.view.shape),
                "input_steps": p.view.manifest["input"].get("steps"),
            }
        )

    def status(self, state: str) -> bytes:
        return status_payload(state if state == "offline" or self.plan else "waiting", **self.info())

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
            self._dispatch(topic, payload)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.frames:
            self._on_frame(payload)
        elif topic.startswith(self.topics.votes):
            self._on_vote(topic, payload)
        elif topic.startswith(self.topics.status("")):
            self._on_status(topic.rsplit("/", 1)[1], payload)

    def _on_frame(self, payload: bytes) -> None:
        if self.plan is None:  # nothing deployed yet: clients wait for the `online` birth before they send
            return
        try:
            fid, _ = decode_frame(payload, self.plan.view.shape, frame_limit(self.plan.view.shape))
        except BadMessage as e:  # the nodes report it on `errors`; the client still gets an outcome for its id
            if e.frame is not None and e.frame not in self.done and e.frame not in self.pending:
                self._publish(
                    e.frame,
                    {"status": "undecided", "reason": f"malformed frame: {e}", "voted": [], "by": "malformed frame"},
                    None,
                    self.plan,
                )
            return
        if fid in self.done:  # a re-sent frame: the client missed our answer
            self.stats["resent"] += 1
            self.link.publish(self.topics.results, self.done[fid])
        else:
            frame = self.pending.setdefault(fid, self._new_frame(self.plan))
            frame.deadline = max(frame.deadline, time.monotonic() + self.timeout_s)  # re-sent: the nodes vote again
            frame.payload, frame.label = payload, frame_label(payload)

    def _on_vote(self, topic: str, payload: bytes) -> None:
        try:
            msg = parse(payload, 64 * 1024)
            fid = read_frame_id(msg, "frame")
            plan = self.plans.get(msg.get("version"))
            if plan is None:  # a version no longer (or not yet) served nor in shadow: a late vote
                self.stats["ignored_votes"] += 1
                return
            member, proba = self._check_vote(plan, topic, msg, fid)
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
            if fid in self.done and not self.late_vote(fid, plan, member, proba):  # late, or a duplicate
                self.stats["ignored_votes"] += 1
                return
            if fid in self.done:
                return
            # a vote for a frame we never saw (we restarted, or reconnected after the nodes): wait long enough for
            # the client to re-send the frame, which then reaches every node
            frame = self.pending[fid] = self._new_frame(self.plan, extra_s=resend_after(self.timeout_s))
        votes = self.ballot(frame, plan)
        if votes is None or member in votes:
            self.stats["ignored_votes"] += 1
            return
        votes[member] = proba
        if votes is not frame.shadow:
            frame.infer_ms[member] = msg.get("infer_ms")
            self._decide_if_ready(fid, frame)

    def ballot(self, frame: _Frame, plan: Plan) -> dict | None:
        """Where a vote of ``plan`` on ``frame`` counts: the frame's own version, the version in shadow, or the
        version serving now when the frame was first heard of under an older one (re-sent after a switch, its
        nodes vote with the new version only); None: nowhere."""
        if plan is frame.plan:
            return frame.votes
        if plan is self.shadow:
            return frame.shadow
        if plan is self.plan:
            if frame.later is None or frame.later[0] is not plan:
                frame.later = (plan, {})
            return frame.later[1]
        return None

    def _check_vote(self, plan: Plan, topic: str, msg: dict, fid: str) -> tuple[str, np.ndarray]:
        """The vote's member and probabilities, or BadMessage: a member of ``plan`` running its model."""
        member = msg.get("member")
        if member not in plan.sha256:
            raise BadMessage(f"vote from {member!r}, which is not a member of this fleet ({plan.ids})", fid)
        if msg.get("sha256") != plan.sha256[member]:
            raise BadMessage(
                f"vote from a node running a different '{member}' (sha256 {str(msg.get('sha256'))[:12]}"
                f"... is not the bundle's {plan.sha256[member][:12]}...); give it this bundle",
                fid,
            )
        proba = np.asarray(msg.get("proba"), np.float64)
        if proba.shape != (len(plan.view.classes),) or not np.isfinite(proba).all() or (proba < 0).any():
            raise BadMessage(f"vote from '{member}' does not hold {len(plan.view.classes)} probabilities", fid)
        return member, proba

    def _on_status(self, member: str, payload: bytes) -> None:
        try:
            msg = parse(payload, 64 * 1024) if payload else {"state": "offline"}
        except BadMessage:
            return
        if member not in self.plan.sha256:
            return
        if msg.get("state") == "online":
            if msg.get("sha256") != self.plan.sha256[member]:
                log.warning(
                    "node for %s runs a different model (sha256 %s...); its votes are refused",
                    member,
                    str(msg.get("sha256"))[:12],
                )
                return
            self._online(member, msg.get("instance"))
        elif member in self.live and msg.get("instance") in (None, self.live[member]):  # not an older node's will
            self._offline(member)

    def _online(self, member: str, instance: str) -> None:
        """A node of ``member`` is live: send it the frames it owes a vote (it may have missed them: broker restart,
        network cut), with a fresh timeout for its answer."""
        self.live[member] = instance
        log.info("member %s online (%d of %d live)", member, len(self.live), len(self.plan.ids))
        now = time.monotonic()
        for frame in self.pending.values():
            if frame.payload and member not in frame.votes:
                self.link.publish(self.topics.frames, frame.payload)
                frame.deadline = max(frame.deadline, now + self.timeout_s)

    def _offline(self, member: str) -> None:
        del self.live[member]
        log.info("member %s offline (%d of %d live)", member, len(self.live), len(self.plan.ids))
        for fid, frame in list(self.pending.items()):  # frames that waited only for it can be decided now
            self._decide_if_ready(fid, frame)

    # -- decisions

    def _new_frame(self, plan: Plan, extra_s: float = 0.0) -> _Frame:
        now = time.monotonic()
        frame = _Frame(now, now + self.timeout_s + extra_s, plan)
        self.next_deadline = min(self.next_deadline, frame.deadline)
        return frame

    def _decide_if_ready(self, fid: str, frame: _Frame) -> None:
        settling = time.monotonic() < self.settle_until
        for plan, votes in frame.ballots():
            expected = set(plan.ids) if settling else set(self.live)
            if len(votes) >= plan.quorum and expected <= set(votes):
                self._decide(fid, frame, "all live members voted")
                return

    def _decide(self, fid: str, frame: _Frame, why: str) -> None:
        """Publish the frame's outcome: by the first of its ballots that reaches its quorum, else undecided."""
        del self.pending[fid]
        ballots = frame.ballots()
        plan, votes = next(((p, v) for p, v in ballots if len(v) >= p.quorum), ballots[0])
        result = plan.outcome(votes, self.timeout_s)
        if len(result["voted"]) < plan.quorum and not frame.payload:
            result["reason"] += " (this aggregator never saw the frame itself: restarted mid-frame?)"
        result |= {"by": why, "infer_ms": {m: frame.infer_ms[m] for m in result["voted"]}}
        self._publish(fid, result, frame, plan)

    def _publish(self, fid: str, result: dict, frame: _Frame | None, plan: Plan) -> None:
        result = (
            {"frame": fid, "class": None, "label": None, "confidence": None, "votes": None, "margin": None}
            | result
            | {
                "missing": [m for m in plan.ids if m not in result["voted"]],
                "quorum": plan.quorum,
                "rule": plan.rule,
                "abstain_below": plan.abstain_below,
                "latency_ms": None if frame is None else round((time.monotonic() - frame.first_seen) * 1000, 3),
                "aggregator": self.instance,
            }
            | ({} if plan.version is None else {"version": plan.version})
        )
        payload = dumps(result)
        self.stats[result["status"]] += 1
        self.done[fid] = payload
        while len(self.done) > DONE_MEMORY:
            self.done.popitem(last=False)
        self.link.publish(self.topics.results, payload)
        if frame is not None:
            self.decided(frame, result)

    def decided(self, frame: _Frame, result: dict) -> None:
        """Called with each decision (a deployed fleet compares it with the version in shadow)."""

    def late_vote(self, fid: str, plan: Plan, member: str, proba: np.ndarray) -> bool:
        """A vote for a frame already decided: whether it is still wanted (a deployed fleet's shadow votes are)."""
        return False

    def tick(self, now: float) -> None:
        """Called about every 10 ms from the serving loop, holding the lock."""

    def describe(self) -> str:
        p = self.plan
        if p is None:
            return "no version deployed yet"
        return (
            f"members {p.ids}, quorum {p.quorum}, timeout {self.timeout_s * 1000:.0f} ms, rule {p.rule}, "
            f"abstain below {p.abstain_below:g}" + ("" if p.version is None else f", version {p.version}")
        )

    def serve(self, stop: threading.Event) -> None:
        """Decide frames until ``stop`` is set; a frame still waiting at its timeout is decided or undecided then."""
        self.link.will(self.topics.aggregator, self.status("offline"))
        self.link.start()
        log.info("aggregator for fleet '%s' on %s: %s", self.topics.fleet, self.link.broker.url, self.describe())
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
                    self.tick(now)
        finally:
            self.link.stop((self.topics.aggregator, self.status("offline")))
            log.info("aggregator stopped: %s", self.stats)
