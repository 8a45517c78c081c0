"""A fleet client: frames out, decisions in."""

from __future__ import annotations

import logging
import secrets
import threading
import time

import numpy as np

from ..data import check_classes
from ..errors import UserError
from ..preprocess import InputSteps, check_images
from .mqtt import Broker, Link
from .wire import DEFAULT_TIMEOUT_MS, BadMessage, Topics, encode_frame, parse, resend_after

log = logging.getLogger(__name__)


def classify(
    broker: Broker,
    fleet: str,
    images: np.ndarray,
    names: list[str] | None = None,
    labels: np.ndarray | None = None,
    on_result=None,
    rate: float | None = None,
    max_in_flight: int = 64,
    timeout_s: float = 30.0,
    retry_s: float | None = None,
    ready_timeout_s: float = 30.0,
    classes: list[str] | None = None,
) -> dict:
    """Publish each image as a frame and collect one outcome per frame; returns a summary.

    ``on_result(row)`` gets each outcome (``decided``, ``review`` or ``undecided``) as it arrives: the aggregator's
    result plus ``index``, ``input``, ``rtt_ms`` (client send to client receive) and ``truth`` when ``labels`` are
    given. At most ``max_in_flight`` frames wait for an outcome at a time; ``rate`` caps frames per second. A frame
    with no outcome after ``retry_s`` is re-sent (backing off), all along the stream; every frame in flight is re-sent
    when the connection comes back, and its back-off starts over; the client gives up when for ``timeout_s`` no frame was sent and no outcome came, and reports
    the frames still missing. Images of any size go through the fleet's input steps (from the aggregator) before
    they are sent; ``classes`` (the data's class names) and ``labels`` must fit the fleet's classes.
    """
    topics = Topics(fleet)
    run = secrets.token_hex(4)
    cond = threading.Condition()
    state: dict = {"aggregator": None, "live": {}}
    ids = [f"{run}-{i}" for i in range(len(images))]
    index = {fid: i for i, fid in enumerate(ids)}
    first_sent: dict[int, float] = {}
    waiting: dict[int, tuple[float, int]] = {}  # frames in flight: index -> (last sent, monotonic; back-off step)
    resent = [0]
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
                waiting.pop(i, None)
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
        """Send again the frames whose outcome is overdue (after retry_s, 2 retry_s, ... 30 s), or ``everything``
        in flight after a reconnect: what was sent before may have died with the broker, so the back-off starts
        over, and the next re-send comes within the aggregator's wait for a frame it knows only by votes."""
        for i, (t, n) in list(waiting.items()):
            if everything or now - t > min(retry_s * 2 ** (n - 1), 30):
                link.publish(topics.frames, payloads[i])
                waiting[i] = (now, 1 if everything else n + 1)
                resent[0] += 1

    link = Link(
        broker,
        f"p2e-{fleet}-client-{run}",
        [topics.results, topics.aggregator, topics.status()],
        on_message,
        on_connect=on_connect,
    ).start()
    try:
        with cond:  # the aggregator's (retained) birth tells us the fleet's input shape and members
            cond.wait_for(lambda: (state["aggregator"] or {}).get("state") == "online", ready_timeout_s)
            agg = state["aggregator"]
            if not agg or agg.get("state") != "online":
                raise UserError(
                    f"no aggregator is online for fleet '{fleet}' at {broker.url} (waited "
                    f"{ready_timeout_s:.0f} s); start one: prune2edge aggregator BUNDLE --broker "
                    f"{broker.url} --fleet {fleet}"
                )
            members = agg["members"]
            if not cond.wait_for(lambda: all(state["live"].get(m) for m in members), min(ready_timeout_s, 5.0)):
                log.warning(
                    "only %d of the fleet's %d members are online; classifying anyway",
                    sum(bool(state["live"].get(m)) for m in members),
                    len(members),
                )
        try:
            check_classes(agg["classes"], classes, labels)
            images = check_images(images, tuple(agg["shape"]), InputSteps.from_dict(agg.get("input_steps")))
        except UserError as e:
            raise UserError(f"fleet '{fleet}': {e}") from None
        retry_s = retry_s or resend_after(agg.get("timeout_ms", DEFAULT_TIMEOUT_MS) / 1000)
        payloads = [encode_frame(fid, img) for fid, img in zip(ids, images)]
        t_start = time.monotonic()

        def stalled() -> bool:
            return time.monotonic() - progress[0] > timeout_s

        for i in range(len(ids)):
            with cond:
                while True:  # until frame i is due (rate) and the window has room; meanwhile, re-send what is overdue
                    now = time.monotonic()
                    resend_overdue(now)
                    due = t_start + i / rate if rate else now
                    full = len(waiting) >= max_in_flight
                    if (not full and now >= due) or (full and stalled()):
                        break
                    cond.wait(min(0.05, due - now) if now < due else 0.05)
                if full:  # stalled
                    break
                first_sent[i], waiting[i] = now, (now, 1)
                progress[0] = now  # "stalled" = no outcome for timeout_s since the last frame sent or answered
            link.publish(topics.frames, payloads[i])
        with cond:
            while waiting and not stalled():
                cond.wait(0.05)
                resend_overdue(time.monotonic())
            elapsed = time.monotonic() - t_start
            got = dict(outcomes)
    finally:
        link.stop()
    rows = list(got.values())
    decided = [r for r in rows if r["status"] == "decided"]
    review = sum(r["status"] == "review" for r in rows)
    rtt = np.array([r["rtt_ms"] for r in rows]) if rows else np.zeros(1)
    summary = {
        "frames": len(ids),
        "decided": len(decided),
        "review": review,
        "undecided": len(rows) - len(decided) - review,
        "missing": [ids[i] for i in range(len(ids)) if i not in got],
        "elapsed_s": round(elapsed, 3),
        "frames_per_s": round(len(rows) / elapsed, 2) if elapsed > 0 else None,
        "rtt_ms_p50": round(float(np.percentile(rtt, 50)), 3),
        "rtt_ms_p99": round(float(np.percentile(rtt, 99)), 3),
        "resent": resent[0],
    }
    if labels is not None:
        right = sum(r["class"] == r["truth"] for r in decided)
        summary["accuracy"] = right / len(ids)  # frames to review or undecided count as not right
        summary["decided_accuracy"] = right / len(decided) if decided else None
    return summary
