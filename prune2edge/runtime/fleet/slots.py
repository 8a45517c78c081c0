"""A deployed node's (or aggregator's) own directory: at most two versions side by side, each a small bundle
directory ``v<N>/`` (``manifest.json``, ``members/<id>.p2e`` on a node, and ``release.json``, the signed release
as received), and ``state.json``: the birth/death sequence number, the highest version run, the signed rollbacks.

Every file is written to a temporary file, fsynced and renamed; ``release.json`` last, so a version directory
without it is an interrupted download and is ignored (and removed) at the next start."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ...errors import UserError
from ...store import write_bytes, write_json
from ..bundle import restrict
from .trust import Ed25519PublicKey, unseal
from .wire import BadMessage

log = logging.getLogger(__name__)

SLOTS = 2  # the version running and the one beside it (the next one in shadow, or the previous one)


class Slots:
    """The versions a node keeps in ``root``, checked against the ``trusted`` keys each time they are read."""

    def __init__(self, root: Path | str, trusted: list[Ed25519PublicKey]):
        self.root, self.trusted = Path(root), trusted
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot use --store '{root}' ({e.strerror or e}); give a writable directory") from None
        path = self.root / "state.json"
        try:
            self.state = json.loads(path.read_text()) if path.exists() else {}
        except ValueError as e:
            raise UserError(f"'{path}' is not valid JSON ({e}); remove it (the node then starts over)") from None
        self.state = {"bdseq": 0, "highest": 0, "rollbacks": [], "running": []} | self.state

    def save(self) -> None:
        write_json(self.root / "state.json", self.state)

    def next_bdseq(self) -> int:
        """This run's birth/death sequence number: one more than the last run's."""
        self.state["bdseq"] += 1
        self.save()
        return self.state["bdseq"]

    def allows(self, version: int) -> bool:
        """Whether ``version`` may be (down)loaded or run: not older than every version run, or named by a signed
        rollback."""
        return version >= self.state["highest"] or version in self.state["rollbacks"]

    def ran(self, version: int) -> None:
        self.state["highest"] = max(self.state["highest"], version)
        self.save()

    def allow_rollback(self, version: int) -> None:
        if version not in self.state["rollbacks"]:
            self.state["rollbacks"].append(version)
            self.save()

    def write(self, body: dict, envelope: bytes, member: str | None = None, blob: bytes | None = None) -> Path:
        """Keep a verified release (and, on a node, its member's file) as ``v<N>/``; the directory."""
        slot = self.root / f"v{body['version']}"
        manifest = body["manifest"]
        if member is not None:
            write_bytes(slot / "members" / f"{member}.p2e", blob)
            manifest = restrict(manifest, [member])
        write_json(slot / "manifest.json", manifest)
        write_bytes(slot / "release.json", envelope)  # last: the version is complete
        return slot

    def read(self) -> dict[int, tuple[dict, Path]]:
        """The complete versions kept, whose release a trusted key signed: version -> (release body, directory)."""
        kept = {}
        for slot in sorted(self.root.glob("v*")):
            try:
                body = unseal(self.trusted, (slot / "release.json").read_bytes())
                kept[int(body["version"])] = body, slot
            except (OSError, BadMessage, KeyError, ValueError) as e:
                log.warning("removing %s: not a complete version signed by a trusted key (%s)", slot, e)
                shutil.rmtree(slot, ignore_errors=True)
        return kept

    def remove(self, version: int) -> None:
        shutil.rmtree(self.root / f"v{version}", ignore_errors=True)
