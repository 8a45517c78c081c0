"""Signed messages: ed25519 keys in PEM (as ``openssl genpkey -algorithm ed25519`` and ``openssl pkey -pubout``
write them), a signed envelope around a JSON body, and its check against the trusted public keys."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ...errors import UserError
from .wire import BadMessage, dumps, parse

KEY_HINT = (
    "make one with `openssl genpkey -algorithm ed25519 -out release.pem` and give the nodes "
    "`openssl pkey -in release.pem -pubout -out release.pub.pem`"
)


def _read(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read the {what} '{path}' ({e.strerror or e}); {KEY_HINT}") from None


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """The ed25519 signing key in the PEM file ``path`` (unencrypted PKCS#8)."""
    try:
        key = serialization.load_pem_private_key(_read(path, "signing key"), password=None)
    except (ValueError, TypeError) as e:
        raise UserError(f"'{path}' is not an unencrypted PEM private key ({e}); {KEY_HINT}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"'{path}' is a {type(key).__name__}, not an ed25519 key; {KEY_HINT}")
    return key


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """The trusted ed25519 public key in the PEM file ``path``."""
    try:
        key = serialization.load_pem_public_key(_read(path, "trusted public key"))
    except (ValueError, TypeError) as e:
        raise UserError(f"'{path}' is not a PEM public key ({e}); {KEY_HINT}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UserError(f"'{path}' is a {type(key).__name__}, not an ed25519 public key; {KEY_HINT}")
    return key


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """A short name for a key: the first 16 hex digits of the sha256 of its raw public bytes."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def seal(key: Ed25519PrivateKey, body: dict) -> bytes:
    """``body`` as a signed envelope: ``{"v": 1, "key": KEY_ID, "body": JSON TEXT, "sig": BASE64}``."""
    text = json.dumps(body, separators=(",", ":"), sort_keys=True, allow_nan=False)
    sig = base64.b64encode(key.sign(text.encode())).decode("ascii")
    return dumps({"key": key_id(key), "body": text, "sig": sig})


def load_trusted(paths: Sequence[Path | str]) -> list[Ed25519PublicKey]:
    """The trusted public keys: one, or two while the signing key is rotated (docs/fleet.md, Trust)."""
    if not paths:
        raise UserError(f"give --trust PUB.pem, the public key releases are signed with; {KEY_HINT}")
    return [load_public_key(p) for p in paths]


def unseal(trusted: Ed25519PublicKey | Sequence[Ed25519PublicKey], payload: bytes, max_bytes: int = 16 << 20) -> dict:
    """The body of a signed envelope, or BadMessage when it is malformed or not signed by a ``trusted`` key."""
    keys = [trusted] if isinstance(trusted, Ed25519PublicKey) else list(trusted)
    msg = parse(payload, max_bytes)
    text, sig = msg.get("body"), msg.get("sig")
    if not isinstance(text, str) or not isinstance(sig, str):
        raise BadMessage("not a signed message: it needs a 'body' text and a 'sig'")
    key = next((k for k in keys if key_id(k) == msg.get("key")), None)
    try:
        if key is None:
            raise InvalidSignature
        key.verify(base64.b64decode(sig, validate=True), text.encode())
    except (InvalidSignature, ValueError):
        raise BadMessage(
            f"bad signature: signed by key {str(msg.get('key'))[:16]}, not by a trusted key "
            f"({', '.join(key_id(k) for k in keys)}; see docs/fleet.md, Trust)"
        ) from None
    body = json.loads(text)
    if not isinstance(body, dict):
        raise BadMessage("the signed body is not a JSON object")
    return body
