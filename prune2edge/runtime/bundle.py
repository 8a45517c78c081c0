"""The deployable bundle: ``manifest.json`` plus int8 ONNX members. Needs only numpy and onnxruntime.

Members are shipped encoded (:data:`ENCODING`, written by :func:`prune2edge.quantize.encode`).
``Bundle.load(path)`` verifies every shipped file's sha256, decodes it in memory to the exact int8
ONNX bytes (checked against their sha256 too) and only then runs it; version-1 bundles of plain
``.onnx`` members load as before. ``predict`` takes raw uint8 images (NHWC or NHW) and applies the manifest's
input steps (resize and colour, when the run set them: then images of any size), preprocessing and voting rule;
``decide`` also says how sure the vote is and sends frames it is unsure of to review.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import UserError
from ..store import write_bytes, write_json
from . import runtimes
from .preprocess import InputSteps, Preprocessing, check_images
from .runtimes import Runner
from .runtimes import session as session  # where callers have always found it
from .vote import AGREEMENT, Decisions, decide, softmax, vote

FORMAT = "prune2edge-bundle"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: members are plain int8 ONNX files, with no "encoding"
ENCODING = "p2e-sparse-xz"
ENCODINGS = {
    "onnx": "the file is the int8 ONNX model",
    ENCODING: "one xz stream of: a 4-byte little-endian length L; L bytes of JSON {rest, weights: [{at, size, codebook}]}; "
    "'rest' bytes: the ONNX file with its int8 weight tensors cut out; for each weight tensor a bitmap of its "
    "non-zeros (numpy packbits, ceil(size / 8) bytes); for each weight tensor one uint8 per non-zero, its index "
    "into codebook. Each tensor, rebuilt as int8 (codebook values at the non-zeros, else 0), goes back in at "
    "byte offset 'at' of the ONNX file",
}


def decode(blob: bytes) -> bytes:
    """The int8 ONNX bytes of a member shipped as :data:`ENCODING` (layout: :data:`ENCODINGS`)."""
    data = lzma.decompress(blob, format=lzma.FORMAT_XZ)
    n = int.from_bytes(data[:4], "little")
    head = json.loads(data[4 : 4 + n])
    rest = data[4 + n : 4 + n + head["rest"]]
    streams = np.frombuffer(data, np.uint8, offset=4 + n + head["rest"])
    *bitmaps, indices = np.split(streams, np.cumsum([-(-w["size"] // 8) for w in head["weights"]], dtype=int))
    out, r = bytearray(), 0
    for w, bitmap in zip(head["weights"], bitmaps):
        nonzero = np.unpackbits(bitmap, count=w["size"]).astype(bool)
        q = np.zeros(w["size"], np.int8)
        q[nonzero] = np.array(w["codebook"], np.int8)[indices[: nonzero.sum()]]
        indices = indices[nonzero.sum() :]
        gap = w["at"] - len(out)  # file bytes before this tensor
        out += rest[r : r + gap] + q.tobytes()
        r += gap
    return bytes(out + rest[r:])


def predict_proba(model: ort.InferenceSession | Runner, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (softmax of the model's logits) for preprocessed NCHW float32 input; ``model`` is an
    ONNX Runtime session or a :data:`prune2edge.runtime.runtimes.Runner`."""
    if isinstance(model, ort.InferenceSession):
        model = runtimes.of_session(model)
    return np.concatenate([softmax(model(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])


def write(
    out: Path,
    members: list[dict],
    preprocessing: Preprocessing,
    image_shape: tuple[int, int, int],
    classes: list[str],
    rule: str,
    weighted: bool = False,
    steps: InputSteps | None = None,
    abstain: dict | None = None,
    latency: dict | None = None,
) -> dict:
    """Copy each member's shipped file (``member["shipped"]``, an :data:`ENCODING` int8 ONNX model) into
    ``out/members/`` and write the manifest last.

    Each member dict also carries its ``id``, its voting ``weight`` (1.0 unless ``weighted``) and any
    metadata to record (sparsity, accuracy, cluster, latency...). ``abstain``: the default abstain threshold
    and how it was chosen (:func:`prune2edge.selective.choose_threshold`); ``latency``: how latencies were measured.
    """
    entries = [_copy_member(out, m) for m in members]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "input": {
            "shape": list(image_shape),
            "layout": "HWC",
            "dtype": "uint8",
            "onnx_input": "input",
            "onnx_layout": "NCHW",
            "onnx_dtype": "float32",
            "steps": (steps or InputSteps()).to_dict(),
            "preprocess": preprocessing.to_dict(),
        },
        "output": {"onnx_output": "logits", "postprocess": "softmax over the last axis"},
        "classes": list(classes),
        "vote": {
            "rule": rule,
            "weighted": weighted,
            "tie_break": "lowest class index",
            "combine": (
                "soft: mean of member probabilities, hard: count of member argmax votes, each member's counted "
                + ("by its weight" if weighted else "once (every weight 1.0)")
            ),
            **(
                {"agreement": AGREEMENT, "abstain_below": abstain["abstain_below"], "abstain": abstain}
                if abstain
                else {}
            ),
        },
        "encodings": {ENCODING: ENCODINGS[ENCODING]},
        **({"latency": latency} if latency else {}),
        "members": entries,
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def _copy_member(out: Path, m: dict) -> dict:
    """Copy one member's shipped file into ``out/members/``; its manifest entry (``m`` without ``shipped``, plus
    where the file is and the sha256 and size of it and of the ONNX model it decodes to)."""
    rel, blob = f"members/{m['id']}.p2e", Path(m["shipped"]).read_bytes()
    onnx_bytes = decode(blob)
    write_bytes(out / rel, blob)
    return {k: v for k, v in m.items() if k != "shipped"} | {
        "encoding": ENCODING,
        "path": rel,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "bytes": len(blob),
        "onnx_bytes": len(onnx_bytes),
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
    }


def read_manifest(path: Path | str) -> dict:
    """The manifest of a bundle directory, checked for format and version."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise UserError(f"'{path}' is not a bundle: no manifest.json in it") from None
    except json.JSONDecodeError as e:
        raise UserError(f"'{path / 'manifest.json'}' is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in READABLE_VERSIONS:
        raise UserError(
            f"'{path}' is not a {FORMAT} bundle of version {' or '.join(map(str, READABLE_VERSIONS))} "
            f"(format={manifest.get('format')!r}, version={manifest.get('format_version')!r}); "
            "a newer bundle needs a newer prune2edge"
        )
    return manifest


def verify_member(bundle_dir: Path, entry: dict) -> bytes:
    """The member's shipped file, after checking that it exists and its sha256 matches the manifest."""
    path = bundle_dir / entry["path"]
    if not path.is_file():
        raise UserError(f"bundle member '{entry['id']}' is missing: '{path}' does not exist; re-copy the bundle")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise UserError(
            f"bundle member '{entry['id']}' was altered: sha256 of '{path}' does not match the manifest; "
            "re-copy the bundle from its source"
        )
    return blob


def member_onnx(bundle_dir: Path, entry: dict) -> bytes:
    """The member's int8 ONNX bytes: its shipped file verified, then decoded and checked against the manifest."""
    blob, encoding = verify_member(bundle_dir, entry), entry.get("encoding", "onnx")
    if encoding == "onnx":
        return blob
    if encoding != ENCODING:
        raise UserError(
            f"bundle member '{entry['id']}' has encoding {encoding!r}; this prune2edge reads "
            f"{', '.join(ENCODINGS)}: update prune2edge"
        )
    onnx_bytes = decode(blob)
    if hashlib.sha256(onnx_bytes).hexdigest() != entry["onnx_sha256"]:
        raise UserError(
            f"bundle member '{entry['id']}' does not decode to the ONNX model its manifest names; "
            "re-copy the bundle from its source"
        )
    return onnx_bytes


def restrict(manifest: dict, members: list[str] | None) -> dict:
    """The manifest with only the ``members`` ids (all when None); unknown ids are a clear error."""
    if members is None:
        return manifest
    ids = [e["id"] for e in manifest["members"]]
    unknown = sorted(set(members) - set(ids))
    if unknown:
        raise UserError(f"bundle has no member {unknown}; it has {ids}")
    return manifest | {"members": [e for e in manifest["members"] if e["id"] in members]}


class Bundle:
    """A verified ensemble ready to run. Build one with :meth:`load`."""

    def __init__(self, path: Path, manifest: dict, sessions: list[Runner], runtime: str = "onnxruntime"):
        self.path, self.manifest, self.sessions, self.runtime = path, manifest, sessions, runtime
        self.preprocessing = Preprocessing.from_dict(manifest["input"]["preprocess"])
        self.shape = tuple(manifest["input"]["shape"])
        self.steps = InputSteps.from_dict(manifest["input"].get("steps"))  # none in bundles made before them
        self.classes = manifest["classes"]

    @classmethod
    def load(
        cls, path: Path | str, members: list[str] | None = None, threads: int = 1, runtime: str = "onnxruntime"
    ) -> Bundle:
        """Read, verify and decode a bundle; ``members`` restricts it to those ids; they run on ``runtime``
        (:mod:`prune2edge.runtime.runtimes`)."""
        path = Path(path)
        manifest = restrict(read_manifest(path), members)
        runners = [runtimes.load(member_onnx(path, e), runtime, threads) for e in manifest["members"]]
        return cls(path, manifest, runners, runtime)

    @property
    def weights(self) -> np.ndarray | None:
        """Per-member voting weights, or None for an unweighted vote."""
        return np.array([e["weight"] for e in self.manifest["members"]]) if self.manifest["vote"]["weighted"] else None

    def preprocess(self, x: np.ndarray) -> np.ndarray:
        """Raw images as the members take them: the input steps, then the preprocessing (NCHW float32)."""
        return self.preprocessing.apply(check_images(x, self.shape, self.steps))

    def member_proba(self, x: np.ndarray) -> np.ndarray:
        """Each member's class probabilities for raw images: ``[M, N, K]``."""
        inp = self.preprocess(x)
        return np.stack([predict_proba(s, inp) for s in self.sessions])

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Ensemble scores ``[N, K]`` under the bundle's voting rule."""
        return vote(self.member_proba(x), self.manifest["vote"]["rule"], self.weights)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Ensemble class indices for raw images."""
        return self.predict_proba(x).argmax(1)

    def threshold(self, abstain_below: float | None = None) -> float:
        """``abstain_below`` checked, or else the manifest's default abstain threshold (0, none, in older bundles)."""
        if abstain_below is None:
            return float(self.manifest["vote"].get("abstain_below", 0.0))
        if not 0 <= abstain_below <= 1:
            raise UserError(
                f"the abstain threshold (--abstain-below) is a margin of the vote, from 0 (decide every "
                f"frame) to 1; got {abstain_below}"
            )
        return float(abstain_below)

    def decide(self, x: np.ndarray, abstain_below: float | None = None) -> Decisions:
        """Per raw image: class, confidence, votes for the winner, the vote's margin, and ``review`` where the margin
        is below ``abstain_below`` (default: the manifest's threshold)."""
        return decide(self.member_proba(x), self.manifest["vote"]["rule"], self.weights, self.threshold(abstain_below))
