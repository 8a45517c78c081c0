"""The deployable bundle: ``manifest.json`` plus int8 ONNX members. Needs only numpy and onnxruntime.

``Bundle.load(path)`` verifies every member's sha256 before anything runs; ``predict`` takes raw
images exactly as the dataset stores them (uint8, NHWC or NHW) and applies the manifest's
preprocessing and voting rule.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import UserError
from .preprocess import Preprocessing
from .store import sha256, write_json
from .vote import softmax, vote

FORMAT = "prune2edge-bundle"
FORMAT_VERSION = 1


def session(path: Path | str, threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime CPU session (``threads`` = 0 lets ORT choose)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def predict_proba(sess: ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (softmax of the model's logits) for preprocessed NCHW float32 input."""
    name = sess.get_inputs()[0].name
    return np.concatenate([softmax(sess.run(None, {name: x[i:i + batch_size]})[0]) for i in range(0, len(x), batch_size)])


def write(out: Path, members: list[dict], preprocessing: Preprocessing, image_shape: tuple[int, int, int],
          classes: list[str], rule: str, weighted: bool = False) -> dict:
    """Copy each member's int8 ONNX (``member["onnx"]``) into ``out/members/`` and write the manifest last.

    Each member dict also carries its ``id``, its voting ``weight`` (used when ``weighted``) and any
    metadata to record (sparsity, accuracy, cluster...).
    """
    (out / "members").mkdir(parents=True, exist_ok=True)
    entries = []
    for m in members:
        rel = f"members/{m['id']}.onnx"
        shutil.copyfile(m["onnx"], out / rel)
        entries.append({k: v for k, v in m.items() if k != "onnx"} | {"path": rel, "sha256": sha256(out / rel),
                                                                    "bytes": (out / rel).stat().st_size})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "input": {"shape": list(image_shape), "layout": "HWC", "dtype": "uint8", "onnx_input": "input",
                  "onnx_layout": "NCHW", "onnx_dtype": "float32", "preprocess": preprocessing.to_dict()},
        "output": {"onnx_output": "logits", "postprocess": "softmax over the last axis"},
        "classes": list(classes),
        "vote": {"rule": rule, "weighted": weighted, "tie_break": "lowest class index",
                 "combine": "soft: weighted mean of member probabilities; hard: weighted count of member argmax votes"},
        "members": entries,
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def read_manifest(path: Path | str) -> dict:
    """The manifest of a bundle directory, checked for format and version."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise UserError(f"'{path}' is not a bundle: no manifest.json in it") from None
    except json.JSONDecodeError as e:
        raise UserError(f"'{path / 'manifest.json'}' is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"'{path}' is not a {FORMAT} v{FORMAT_VERSION} bundle "
                        f"(format={manifest.get('format')!r}, version={manifest.get('format_version')!r})")
    return manifest


def verify_member(bundle_dir: Path, entry: dict) -> Path:
    """The member's file path, after checking that it exists and its sha256 matches the manifest."""
    path = bundle_dir / entry["path"]
    if not path.is_file():
        raise UserError(f"bundle member '{entry['id']}' is missing: '{path}' does not exist; re-copy the bundle")
    if sha256(path) != entry["sha256"]:
        raise UserError(f"bundle member '{entry['id']}' was altered: sha256 of '{path}' does not match the manifest; "
                        "re-copy the bundle from its source")
    return path


def check_images(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Raw images as uint8 NHWC of the bundle's shape (also takes NHW for one channel, or one image), or a clear error."""
    x = np.asarray(x)
    if shape[-1] == 1 and x.shape[-2:] == tuple(shape[:2]):
        x = x[..., None]
    if x.shape == tuple(shape):
        x = x[None]
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
        raise UserError(f"images have shape {tuple(x.shape)} but the model takes {tuple(shape)} (HWC) per image")
    if x.dtype != np.uint8:
        raise UserError(f"images have dtype {x.dtype}; the bundle takes raw uint8 pixels")
    return x


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

    def __init__(self, path: Path, manifest: dict, sessions: list[ort.InferenceSession]):
        self.path, self.manifest, self.sessions = path, manifest, sessions
        self.preprocessing = Preprocessing.from_dict(manifest["input"]["preprocess"])
        self.shape = tuple(manifest["input"]["shape"])
        self.classes = manifest["classes"]

    @classmethod
    def load(cls, path: Path | str, members: list[str] | None = None, threads: int = 1) -> "Bundle":
        """Read and verify a bundle; ``members`` restricts it to those ids."""
        path = Path(path)
        manifest = restrict(read_manifest(path), members)
        return cls(path, manifest, [session(verify_member(path, e), threads) for e in manifest["members"]])

    @property
    def weights(self) -> np.ndarray | None:
        """Per-member voting weights, or None for an unweighted vote."""
        return np.array([e["weight"] for e in self.manifest["members"]]) if self.manifest["vote"]["weighted"] else None

    def member_proba(self, x: np.ndarray) -> np.ndarray:
        """Each member's class probabilities for raw images: ``[M, N, K]``."""
        inp = self.preprocessing.apply(check_images(x, self.shape))
        return np.stack([predict_proba(s, inp) for s in self.sessions])

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Ensemble scores ``[N, K]`` under the bundle's voting rule."""
        return vote(self.member_proba(x), self.manifest["vote"]["rule"], self.weights)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Ensemble class indices for raw images."""
        return self.predict_proba(x).argmax(1)
