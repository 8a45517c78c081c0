"""The bundle: self-describing, verified before use, runnable with numpy and onnxruntime alone."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prune2edge import UserError, store
from prune2edge.bundle import Bundle
from prune2edge.vote import vote

ROOT = Path(__file__).resolve().parents[1]


def test_a_separate_program_reproduces_the_ensemble_accuracy(demo_run):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "rescore.py"), str(demo_run / "bundle"), str(demo_run / "test.npz")],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    metrics = store.read_json(demo_run / "metrics.json")
    assert result["accuracy"] == metrics["ensemble"]["test_acc"] and result["members"] == metrics["ensemble"]["k"]


def test_votes_equal_a_recomputation_from_member_outputs(demo_run):
    b = Bundle.load(demo_run / "bundle")
    x = np.load(demo_run / "test.npz")["x"][:64]
    members = b.member_proba(x)
    assert members.shape == (len(b.sessions), 64, 10)
    assert np.allclose(b.predict_proba(x), members.mean(0))
    assert np.array_equal(b.predict(x), members.mean(0).argmax(1))
    assert np.allclose(vote(members, "hard").sum(1), 1)


def test_manifest_describes_members_and_preprocessing(demo_run):
    m = json.loads((demo_run / "bundle" / "manifest.json").read_text())
    assert m["format"] == "prune2edge-bundle" and m["format_version"] == 1
    assert m["input"]["shape"] == [8, 8, 1] and m["input"]["preprocess"]["scale"] == 1 / 16
    assert len(m["classes"]) == 10 and m["vote"]["rule"] == "soft"
    for e in m["members"]:
        assert {"id", "path", "sha256", "bytes", "gzip_bytes", "sparsity", "val_acc", "cluster"} <= set(e)
        assert e["bytes"] == (demo_run / "bundle" / e["path"]).stat().st_size


@pytest.fixture
def bundle_copy(demo_run, tmp_path):
    shutil.copytree(demo_run / "bundle", tmp_path / "bundle")
    return tmp_path / "bundle"


def test_tampered_member_is_refused(bundle_copy):
    member = sorted((bundle_copy / "members").iterdir())[0]
    data = bytearray(member.read_bytes())
    data[len(data) // 2] ^= 0xFF
    member.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"member '{member.stem}' was altered: sha256"):
        Bundle.load(bundle_copy)


def test_missing_member_is_refused(bundle_copy):
    member = sorted((bundle_copy / "members").iterdir())[-1]
    member.unlink()
    with pytest.raises(UserError, match=f"member '{member.stem}' is missing"):
        Bundle.load(bundle_copy)


def test_images_of_the_wrong_shape_or_dtype(demo_run):
    b = Bundle.load(demo_run / "bundle")
    with pytest.raises(UserError, match=r"images have shape \(2, 9, 9, 1\) but the model takes \(8, 8, 1\)"):
        b.predict(np.zeros((2, 9, 9, 1), np.uint8))
    with pytest.raises(UserError, match="dtype float64; the bundle takes raw uint8"):
        b.predict(np.zeros((2, 8, 8, 1)))
    assert b.predict(np.zeros((8, 8), np.uint8)).shape == (1,)  # one grey image without channel axis


def test_bundle_runtime_needs_no_torch_or_sklearn():
    code = ("import sys, prune2edge.bundle, prune2edge.vote, prune2edge.preprocess; "
            "bad = {'torch', 'sklearn', 'scipy'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
