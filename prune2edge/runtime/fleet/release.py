"""Publishing a version of a fleet over its broker: a signed release (the bundle's manifest, which device runs which
member, each member file's sha256) plus the member files as retained, chunked messages; and the signed operator
commands ``promote`` and ``rollback``."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import secrets
import threading
import time
from pathlib import Path

from ...errors import UserError
from ..bundle import read_manifest, restrict, verify_member
from .mqtt import Broker, Link
from .trust import Ed25519PrivateKey, Ed25519PublicKey, load_private_key, seal, unseal
from .wire import BadMessage, Topics, parse

log = logging.getLogger(__name__)

CHUNK_BYTES = 128 * 1024  # one retained message per chunk: well under any broker's message limit
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # device and member names: one topic level each
RETAINED_WAIT_S = 1.0  # how long a publisher waits for the fleet's retained release and rollout state


def check_name(name: object, what: str) -> str:
    """``name`` if it can be one topic level (letters, digits, '_', '.', '-'), else UserError."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(f"bad {what} name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
    return name


def parse_assign(text: str | None, manifest: dict) -> dict[str, str]:
    """``DEVICE=MEMBER,...`` (or, when None, the devices the bundle was selected for) as {device: member}."""
    if text is None:
        assign = {e["device"]: e["id"] for e in manifest["members"] if e.get("device")}
        if not assign:
            raise UserError(
                "the bundle assigns no member to a device (it was selected without deploy.devices); "
                "give --assign DEVICE=MEMBER,DEVICE=MEMBER,..."
            )
        return assign
    assign = {}
    for item in text.split(","):
        device, sep, member = item.strip().partition("=")
        if not sep:
            raise UserError(f"--assign takes DEVICE=MEMBER,..., got '{item}'")
        assign[check_name(device, "device")] = check_name(member, "member")
    return assign


def open_release(trusted: list[Ed25519PublicKey], payload: bytes, fleet: str) -> dict:
    """The body of a signed release of ``fleet``, or BadMessage saying why it is refused."""
    body = unseal(trusted, payload)
    version = body.get("version")
    if body.get("kind") != "release" or body.get("fleet") != fleet or not isinstance(version, int) or version < 1:
        raise BadMessage(f"release refused: not a release of fleet '{fleet}'")
    return body


def release_body(bundle_dir: Path, fleet: str, version: int, assign: dict[str, str], chunk_bytes: int) -> tuple:
    """The signed part of a release and the member files it names: (body, {member: bytes})."""
    manifest = restrict(read_manifest(bundle_dir), sorted(set(assign.values())))
    blobs = {e["id"]: verify_member(bundle_dir, e) for e in manifest["members"]}
    manifest = manifest | {"members": [e | {"path": f"members/{e['id']}.p2e"} for e in manifest["members"]]}
    artifacts = {
        m: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b), "chunks": max(1, math.ceil(len(b) / chunk_bytes))}
        for m, b in blobs.items()
    }
    body = {
        "kind": "release",
        "fleet": fleet,
        "version": version,
        "assign": assign,
        "artifacts": artifacts,
        "chunk_bytes": chunk_bytes,
        "manifest": manifest,
        "published_at": time.time(),
    }
    return body, blobs


def retained(broker: Broker, topics: list[str], wait_s: float = RETAINED_WAIT_S) -> dict[str, bytes]:
    """The retained messages on ``topics``, as far as they come within ``wait_s``."""
    got: dict[str, bytes] = {}
    done = threading.Event()

    def on_message(topic: str, payload: bytes) -> None:
        got[topic] = payload
        if set(topics) <= set(got):
            done.set()

    link = Link(broker, f"p2e-read-{secrets.token_hex(4)}", topics, on_message).start()
    try:
        done.wait(wait_s)
    finally:
        link.stop()
    return got


def current_version(broker: Broker, topics: Topics, key: Ed25519PrivateKey) -> int:
    """The fleet's newest version: of its retained release, if ``key`` signed it, or the highest its aggregator
    has taken, whichever is newer (0: none)."""
    got = retained(broker, [topics.release, topics.rollout])
    version = 0
    with contextlib.suppress(BadMessage, ValueError, TypeError):
        version = int(parse(got.get(topics.rollout) or b"{}", 1 << 20).get("highest") or 0)
    if topics.release in got:
        try:
            version = max(version, int(unseal(key.public_key(), got[topics.release])["version"]))
        except (BadMessage, KeyError, ValueError, TypeError) as e:
            log.warning("ignoring the fleet's retained release: %s", e)
    return version


def publish(
    bundle_dir: Path | str,
    broker: Broker,
    fleet: str,
    key_path: Path | str,
    version: int | None = None,
    assign: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict:
    """Publish ``bundle_dir`` as the fleet's next version (default: the current one + 1); its signed body."""
    key, topics, bundle_dir = load_private_key(key_path), Topics(fleet), Path(bundle_dir)
    if chunk_bytes < 1024:
        raise UserError(f"--chunk-bytes must be at least 1024, got {chunk_bytes}")
    body, blobs = release_body(bundle_dir, fleet, 0, parse_assign(assign, read_manifest(bundle_dir)), chunk_bytes)
    current = current_version(broker, topics, key)
    version = current + 1 if version is None else version
    if version <= current:
        raise UserError(
            f"version {version} is not newer than fleet '{fleet}''s version {current}: versions only increase "
            "(publish the old bundle as a new version, or `prune2edge rollout rollback`)"
        )
    body["version"] = version
    link = Link(broker, f"p2e-{fleet}-publish-{secrets.token_hex(4)}", [], lambda *_: None).start()
    try:
        sent = [
            link.publish(topics.artifact(version, m, i), blob[i * chunk_bytes : (i + 1) * chunk_bytes], retain=True)
            for m, blob in blobs.items()
            for i in range(body["artifacts"][m]["chunks"])
        ]
        sent.append(link.publish(topics.release, seal(key, body), retain=True))  # last: its artifacts are there
        for info in sent:
            info.wait_for_publish(30)
    finally:
        link.stop()
    return body


def command(broker: Broker, fleet: str, key_path: Path | str, kind: str, version: int) -> dict:
    """Publish a signed ``promote`` (of shadow ``version``) or ``rollback`` (to ``version``); its body."""
    key, topics = load_private_key(key_path), Topics(fleet)
    body = {"kind": kind, "fleet": fleet, "version": version, "at": time.time(), "nonce": secrets.token_hex(8)}
    link = Link(broker, f"p2e-{fleet}-command-{secrets.token_hex(4)}", [], lambda *_: None).start()
    try:
        link.publish(topics.control, seal(key, body), retain=True).wait_for_publish(30)
    finally:
        link.stop()
    return body


def settled(state: dict, since: float) -> bool:
    """Whether a rollout state is newer than ``since`` and not waiting for the nodes (``switching``)."""
    return state.get("at", 0) > since and state.get("state") != "switching"


def rollout_state(broker: Broker, fleet: str, since: float | None = None, wait_s: float = 20.0) -> dict:
    """The fleet's rollout state (the aggregator's retained message); with ``since``, the first settled one newer
    than that time, as far as one comes within ``wait_s`` (else the last one seen)."""
    topics, got, cond = Topics(fleet), [], threading.Condition()

    def on_message(topic: str, payload: bytes) -> None:
        with contextlib.suppress(BadMessage), cond:
            got.append(parse(payload, 1 << 20))
            cond.notify_all()

    link = Link(broker, f"p2e-read-{secrets.token_hex(4)}", [topics.rollout], on_message).start()
    try:
        with cond:
            cond.wait_for(lambda: got and (since is None or settled(got[-1], since)), wait_s)
    finally:
        link.stop()
    if not got:
        raise UserError(f"fleet '{fleet}' has no rollout state at {broker.url}: is a deployed aggregator running?")
    return got[-1]
