"""A fleet client: frames out, decisions in."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable

import numpy as np

from ...data import check_classes
from ...errors import UserError
from ..preprocess import InputSteps, check_images
from .mqtt import Broker, Link
from .wire import DEFAULT_TIMEOUT_MS, BadMessage, Topics, encode_frame, parse, resend_after

log = logging.getLogger(__name__)

MAX_IN_FLIGHT, TIMEOUT_S = 64, 30.0  # frames sent and not yet decided; seconds to wait for the fleet


def classify(
    broker: Broker,
    fleet: str,
    images: np.ndarray,
    names: list[str] | None = None,
    labels: np.ndarray | None = None,
    on_result: Callable[[dict], None] | None = None,
    rate: float | None = None,
    max_in_flight: int = MAX_IN_FLIGHT,
    timeout_s: float = TIMEOUT_S,
    retry_s: float | None = None,
    ready_timeout_s: float = TIMEOUT_S,
    classes: list[str] | None = None,
) -> dict:
    """Publish each image as a frame and collect one outcome per frame; returns a summary.

    ``on_result(row)`` gets each outcome (``decided``, ``review`` or ``undecided``) as it arrives: the aggregator's
    result plus ``index``, ``input``, ``rtt_ms`` (client send to client receive) and ``truth`` when ``labels`` are
    given. At most ``max_in_flight`` frames wait for an outcome at a time; ``rate`` caps frames per second. A frame
    with no outcome after ``retry_s`` is re-sent (backing off), all along the stream; every frame in flight is
    re-sent when the connection comes back, and its back-off starts over; the client gives up when for ``timeout_s``
    no frame was sent and no outcome came, and reports the frames still missing. Images of any size go through the
    fleet's input steps (from the aggregator) before they are sent; ``classes`` (the data's class names) and
    ``labels`` must fit the fleet's classes.
    """
    client = Client(broker, fleet, len(images), names, labels, on_result, retry_s)
    return client.run(images, rate, max_in_flight, timeout_s, ready_timeout_s, classes)


class Client:
    """One stream of ``n`` frames to a fleet and its outcomes: what is in flight, what came back, when it last
    moved. :meth:`run` sends from the caller's thread; the MQTT thread calls :meth:`on_message` and
    :meth:`on_connect`; both sides hold ``cond`` while they touch the state."""

    def __init__(
        self,
        broker: Broker,
        fleet: str,
        n: int,
        names: list[str] | None = None,
        labels: np.ndarray | None = None,
        on_result: Callable[[dict], None] | None = None,
        retry_s: float | None = None,
    ) -> None:
        self.broker = broker
        self.fleet = fleet
        self.names = names
        self.labels = labels
        self.on_result = on_result
        self.retry_s = retry_s  # None: from the aggregator's timeout, once it is known
        self.topics = Topics(fleet)
        self.run_id = secrets.token_hex(4)
        self.ids = [f"{self.run_id}-{i}" for i in range(n)]
        self.index = {fid: i for i, fid in enumerate(self.ids)}
        self.cond = threading.Condition()
        self.aggregator: dict | None = None  # its last (retained) status message
        self.live: dict[str, bool] = {}  # member -> online
        self.payloads: list[bytes] = []
        self.first_sent: dict[int, float] = {}  # index -> first sent, monotonic
        self.waiting: dict[int, tuple[float, int]] = {}  # frames in flight: index -> (last sent, monotonic; back-off)
        self.outcomes: dict[int, dict] = {}
        self.resent = 0
        self.progress = time.monotonic()  # the last frame sent or answered
        self.link: Link | None = None

    def run(
        self,
        images: np.ndarray,
        rate: float | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
        timeout_s: float = TIMEOUT_S,
        ready_timeout_s: float = TIMEOUT_S,
        classes: list[str] | None = None,
    ) -> dict:
        """Connect, check the images against the fleet, send every frame and collect the outcomes; the summary."""
        t = self.topics
        self.link = Link(
            self.broker,
            f"p2e-{self.fleet}-client-{self.run_id}",
            [t.results, t.aggregator, t.status()],
            self.on_message,
            on_connect=self.on_connect,
        ).start()
        try:
            agg = self._wait_for_fleet(ready_timeout_s)
            try:
                check_classes(agg["classes"], classes, self.labels)
                images = check_images(images, tuple(agg["shape"]), InputSteps.from_dict(agg.get("input_steps")))
            except UserError as e:
                raise UserError(f"fleet '{self.fleet}': {e}") from None
            self.retry_s = self.retry_s or resend_after(agg.get("timeout_ms", DEFAULT_TIMEOUT_MS) / 1000)
            labels = [None] * len(self.ids) if self.labels is None else self.labels
            self.payloads = [encode_frame(fid, img, y) for fid, img, y in zip(self.ids, images, labels)]
            elapsed, got = self._stream(rate, max_in_flight, timeout_s)
        finally:
            self.link.stop()
        return self._summary(elapsed, got)

    def _wait_for_fleet(self, ready_timeout_s: float) -> dict:
        """The aggregator's (retained) birth: the fleet's input shape, classes and members; warns if members are
        missing."""
        with self.cond:
            self.cond.wait_for(lambda: (self.aggregator or {}).get("state") == "online", ready_timeout_s)
            agg = self.aggregator
            if not agg or agg.get("state") != "online":
                raise UserError(
                    f"no aggregator is online for fleet '{self.fleet}' at {self.broker.url} (waited "
                    f"{ready_timeout_s:.0f} s); start one: prune2edge aggregator BUNDLE --broker "
                    f"{self.broker.url} --fleet {self.fleet}"
                )
            members = agg.get("devices") or agg["members"]  # a deployed fleet's nodes report by device
            if not self.cond.wait_for(lambda: all(self.live.get(m) for m in members), min(ready_timeout_s, 5.0)):
                log.warning(
                    "only %d of the fleet's %d members are online; classifying anyway",
                    sum(bool(self.live.get(m)) for m in members),
                    len(members),
                )
        return agg

    def _stream(self, rate: float | None, max_in_flight: int, timeout_s: float) -> tuple[float, dict[int, dict]]:
        """Send each frame when it is due (``rate``) and the window has room, re-sending what is overdue, then wait
        for the last outcomes; the seconds it took and the outcomes by then."""
        t_start = time.monotonic()
        for i in range(len(self.ids)):
            with self.cond:
                while True:
                    now = time.monotonic()
                    self.resend_overdue(now)
                    due = t_start + i / rate if rate else now
                    full = len(self.waiting) >= max_in_flight
                    if (not full and now >= due) or (full and self._stalled(timeout_s)):
                        break
                    self.cond.wait(min(0.05, due - now) if now < due else 0.05)
                if full:  # stalled
                    break
                self.first_sent[i], self.waiting[i] = now, (now, 1)
                self.progress = now
            self.link.publish(self.topics.frames, self.payloads[i])
        with self.cond:
            while self.waiting and not self._stalled(timeout_s):
                self.cond.wait(0.05)
                self.resend_overdue(time.monotonic())
            return time.monotonic() - t_start, dict(self.outcomes)

    def _stalled(self, timeout_s: float) -> bool:
        """No frame sent and no outcome for ``timeout_s``."""
        return time.monotonic() - self.progress > timeout_s

    def _summary(self, elapsed: float, got: dict[int, dict]) -> dict:
        """Counts, missing frame ids, throughput, round trips, re-sends and (with labels) accuracy."""
        rows = list(got.values())
        decided = [r for r in rows if r["status"] == "decided"]
        review = sum(r["status"] == "review" for r in rows)
        rtt = np.array([r["rtt_ms"] for r in rows]) if rows else np.zeros(1)
        summary = {
            "frames": len(self.ids),
            "decided": len(decided),
            "review": review,
            "undecided": len(rows) - len(decided) - review,
            "missing": [self.ids[i] for i in range(len(self.ids)) if i not in got],
            "elapsed_s": round(elapsed, 3),
            "frames_per_s": round(len(rows) / elapsed, 2) if elapsed > 0 else None,
            "rtt_ms_p50": round(float(np.percentile(rtt, 50)), 3),
            "rtt_ms_p99": round(float(np.percentile(rtt, 99)), 3),
            "resent": self.resent,
        }
        if self.labels is not None:
            right = sum(r["class"] == r["truth"] for r in decided)
            summary["accuracy"] = right / len(self.ids)  # frames to review or undecided count as not right
            summary["decided_accuracy"] = right / len(decided) if decided else None
        return summary

    def on_message(self, topic: str, payload: bytes) -> None:
        """An outcome, the aggregator's status or a member's status (MQTT thread)."""
        try:
            msg = parse(payload, 1 << 20)
        except BadMessage:
            return
        with self.cond:
            if topic == self.topics.results:
                if not self._record(msg):
                    return
            elif topic == self.topics.aggregator:
                self.aggregator = msg
            else:
                self.live[topic.rsplit("/", 1)[1]] = msg.get("state") == "online"
            self.cond.notify_all()

    def _record(self, msg: dict) -> bool:
        """Keep the first outcome of a frame this stream sent and pass it to ``on_result``; whether it was one."""
        i = self.index.get(msg.get("frame"))
        if i is None or i in self.outcomes or i not in self.first_sent:
            return False
        row = {"index": i, "input": self.names[i] if self.names else str(i)} | {
            k: v for k, v in msg.items() if k != "v"
        }
        row["rtt_ms"] = round((time.monotonic() - self.first_sent[i]) * 1000, 3)
        if self.labels is not None:
            row["truth"] = int(self.labels[i])
        self.outcomes[i] = row
        self.waiting.pop(i, None)
        self.progress = time.monotonic()
        if self.on_result:
            self.on_result(row)
        return True

    def on_connect(self, reconnected: bool) -> None:
        """After a reconnect, frames in flight may have died with the broker: send them again now (MQTT thread)."""
        if reconnected:
            with self.cond:
                self.resend_overdue(time.monotonic(), everything=True)

    def resend_overdue(self, now: float, everything: bool = False) -> None:
        """Send again the frames whose outcome is overdue (after retry_s, 2 retry_s, ... 30 s), or ``everything``
        in flight after a reconnect: what was sent before may have died with the broker, so the back-off starts
        over, and the next re-send comes within the aggregator's wait for a frame it knows only by votes."""
        for i, (t, n) in list(self.waiting.items()):
            if everything or now - t > min(self.retry_s * 2 ** (n - 1), 30):
                self.link.publish(self.topics.frames, self.payloads[i])
                self.waiting[i] = (now, 1 if everything else n + 1)
                self.resent += 1
