"""Re-score a prune2edge bundle from outside: only its manifest, its member files, numpy and onnxruntime.

    python examples/rescore.py RUN_DIR/bundle RUN_DIR/test.npz

Reads raw images ``x`` and labels ``y`` from the npz, decodes each member to its int8 ONNX model,
reproduces the manifest's preprocessing and voting rule from their written description, and prints
the ensemble's accuracy. From prune2edge it takes only the input steps (resize and colour, numpy alone:
``prune2edge.runtime.preprocess``), so that they have one implementation, and it thereby takes images of any size
when the bundle resizes; everything else it rebuilds from the manifest, which checks that the manifest is
enough to run the ensemble.
"""

import hashlib
import json
import lzma
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from prune2edge.runtime.preprocess import InputSteps, check_images


def decode(blob: bytes) -> bytes:
    """A ``p2e-sparse-xz`` member to its ONNX bytes, following the layout in the manifest's ``encodings``."""
    data = lzma.decompress(blob)
    n = int.from_bytes(data[:4], "little")
    head = json.loads(data[4 : 4 + n])
    rest, pos = data[4 + n : 4 + n + head["rest"]], 4 + n + head["rest"]
    bitmaps = []
    for w in head["weights"]:
        bitmaps.append(
            np.unpackbits(np.frombuffer(data, np.uint8, (w["size"] + 7) // 8, pos), count=w["size"]).astype(bool)
        )
        pos += (w["size"] + 7) // 8
    onnx_bytes, taken = b"", 0
    for w, nonzero in zip(head["weights"], bitmaps):
        q = np.zeros(w["size"], np.int8)
        q[nonzero] = np.array(w["codebook"], np.int8)[np.frombuffer(data, np.uint8, int(nonzero.sum()), pos)]
        pos += int(nonzero.sum())
        before = w["at"] - len(onnx_bytes)
        onnx_bytes += rest[taken : taken + before] + q.tobytes()
        taken += before
    return onnx_bytes + rest[taken:]


def main(bundle_dir: str, npz: str) -> None:
    bundle = Path(bundle_dir)
    manifest = json.loads((bundle / "manifest.json").read_text())
    data = np.load(npz)
    x = check_images(data["x"], tuple(manifest["input"]["shape"]), InputSteps.from_dict(manifest["input"].get("steps")))
    y = data["y"]
    pre = manifest["input"]["preprocess"]
    inp = (x.astype(np.float32) * np.float32(pre["scale"]) - np.float32(pre["mean"])) / np.float32(pre["std"])
    inp = np.ascontiguousarray(inp.transpose(0, 3, 1, 2))
    probas, weights = [], []
    for member in manifest["members"]:
        path = bundle / member["path"]
        blob = path.read_bytes()
        assert hashlib.sha256(blob).hexdigest() == member["sha256"], f"{path} altered"
        if member.get("encoding", "onnx") != "onnx":  # version-1 bundles: plain ONNX files, no "encoding"
            assert member["encoding"] == "p2e-sparse-xz", f"{path}: unknown encoding {member['encoding']}"
            blob = decode(blob)
            assert hashlib.sha256(blob).hexdigest() == member["onnx_sha256"], f"{path} decodes to another model"
        sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        logits = sess.run(None, {manifest["input"]["onnx_input"]: inp})[0]
        e = np.exp(logits - logits.max(1, keepdims=True))
        probas.append(e / e.sum(1, keepdims=True))
        weights.append(member["weight"] if manifest["vote"]["weighted"] else 1.0)
    w = np.array(weights) / sum(weights)
    if manifest["vote"]["rule"] == "soft":
        scores = sum(wi * p for wi, p in zip(w, probas))
    else:
        k = probas[0].shape[1]
        scores = sum(wi * np.eye(k)[p.argmax(1)] for wi, p in zip(w, probas))
    pred = scores.argmax(1)  # ties: argmax takes the lowest class index, as the manifest says
    print(json.dumps({"members": len(probas), "n": len(y), "accuracy": float((pred == y).mean())}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
