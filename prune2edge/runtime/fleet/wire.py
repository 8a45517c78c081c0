"""The fleet's wire format: topic names, payloads, and what a receiver accepts.

Topics, all under ``prune2edge/<fleet>/`` (docs/fleet.md documents the payloads):

    frames              client -> nodes + aggregator   one image: JSON header + base64 raw uint8 pixels
    votes               node -> aggregator             one member's class probabilities for one frame
    results             aggregator -> clients          the decision (or ``undecided`` with the reason)
    status/<member>     node birth/death (retained; the death is the node's MQTT Last Will)
    aggregator          aggregator birth/death (retained; Last Will), with the fleet's members and input shape
    errors              anything a component rejected (malformed frame, bad vote), with the reason

Deployed over the broker (``prune2edge publish``; docs/fleet.md, Deploy):

    release                         publisher -> nodes + aggregator   the newest signed release (retained)
    artifacts/<version>/<member>/<i>  publisher -> nodes              chunk i of a member's file (retained, raw bytes)
    control                         operator -> nodes + aggregator    a signed promote or rollback (retained)
    rollout                         aggregator -> nodes + operators   the rollout state: versions run, serving, shadow
    votes/<device>                  node -> aggregator                a deployed node's votes (ACL: its own topic only)

Every payload is a JSON object with ``"v": 1``. Delivery is QoS 1 (at least once) everywhere, so
every receiver is idempotent: the aggregator keys votes by (frame, member) and remembers decided
frames, re-publishing the stored decision when a frame comes again; the client keeps the first
outcome per frame id and re-sends frames that got none (this is how frames in flight survive an
aggregator or broker restart).
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import socket
import time
from dataclasses import dataclass

import numpy as np

from ...errors import UserError

WIRE_VERSION = 1
DEFAULT_TIMEOUT_MS = 2000  # how long the aggregator waits for the votes of a frame


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

    @property
    def release(self) -> str:
        return f"{self.root}/release"

    @property
    def control(self) -> str:
        return f"{self.root}/control"

    @property
    def rollout(self) -> str:
        return f"{self.root}/rollout"

    def artifact(self, version: int | str, member: str, chunk: int | str = "+") -> str:
        return f"{self.root}/artifacts/{version}/{member}/{chunk}"

    def device_votes(self, device: str = "+") -> str:
        return f"{self.root}/votes/{device}"


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


def encode_frame(frame_id: str, image: np.ndarray, label: int | None = None) -> bytes:
    """One raw uint8 HWC image as a frame payload; ``label``, its true class when known (for a rollout's shadow
    comparison), is not shown to the vote."""
    img = np.ascontiguousarray(image)
    return dumps(
        {
            "id": frame_id,
            "shape": list(img.shape),
            "dtype": str(img.dtype),
            "data": base64.b64encode(img.tobytes()).decode("ascii"),
            "sent_at": time.time(),
        }
        | ({} if label is None else {"label": int(label)})
    )


def frame_label(payload: bytes) -> int | None:
    """The true class a (well-formed) frame carries, or None."""
    label = json.loads(payload).get("label")
    return label if isinstance(label, int) and not isinstance(label, bool) else None


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


def read_frame_id(msg: dict, key: str = "id") -> str:
    fid = msg.get(key)
    if not isinstance(fid, str) or not 0 < len(fid) <= 200:
        raise BadMessage(f"'{key}' must be a string of 1-200 characters, got {fid!r}")
    return fid


def decode_frame(payload: bytes, shape: tuple[int, ...], max_bytes: int | None = None) -> tuple[str, np.ndarray]:
    """A frame payload -> (frame id, uint8 HWC image of ``shape``), or BadMessage saying what is wrong."""
    msg = parse(payload, frame_limit(shape) if max_bytes is None else max_bytes)
    fid = read_frame_id(msg)
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


def status_payload(state: str, **info) -> bytes:
    """A birth or death message (node status, aggregator): ``state`` is ``online`` (or ``waiting``) or ``offline``.
    A birth carries ``at``, when it was sent. A death is made before the connection it ends (the Last Will the broker
    sends when that connection is lost), so it cannot know when that happens: it carries ``connected_at``, when the
    process made it (as it connected, or as it started), and the broker's delivery time is the time of death."""
    when = "connected_at" if state == "offline" else "at"
    return dumps({"state": state, when: time.time(), "host": socket.gethostname(), "pid": os.getpid()} | info)
