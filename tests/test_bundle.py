"""The bundle: self-describing, verified before use, runnable with numpy and onnxruntime alone; members shipped
encoded, and version-1 bundles of plain ONNX members still load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prune2edge import UserError, store
from prune2edge.runtime.bundle import Bundle, decode, predict_proba, session
from prune2edge.runtime.vote import vote

ROOT = Path(__file__).resolve().parents[1]


def test_a_separate_program_reproduces_the_ensemble_accuracy(demo_run):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "rescore.py"), str(demo_run / "bundle"), str(demo_run / "test.npz")],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout)
    metrics = store.read_json(demo_run / "metrics.json")
    assert result["accuracy"] == metrics["shipped"]["test_acc"] and result["members"] == len(
        metrics["shipped"]["members"]
    )


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
    assert m["format"] == "prune2edge-bundle" and m["format_version"] == 2
    assert m["input"]["shape"] == [8, 8, 1] and m["input"]["preprocess"]["scale"] == 1 / 16
    assert len(m["classes"]) == 10 and m["vote"]["rule"] == "soft"
    assert set(m["encodings"]) == {"p2e-sparse-xz"}
    for e in m["members"]:
        assert {"id", "path", "sha256", "bytes", "gzip_bytes", "sparsity", "val_acc", "cluster"} <= set(e)
        assert e["encoding"] == "p2e-sparse-xz" and e["path"] == f"members/{e['id']}.p2e"
        shipped = (demo_run / "bundle" / e["path"]).read_bytes()
        assert (
            e["bytes"]
            == len(shipped)
            == store.read_json(demo_run / "pool" / e["id"] / "quant.json")["bytes"]["shipped"]
        )
        assert e["onnx_bytes"] == len(decode(shipped)) > e["bytes"]


def test_encoded_members_predict_exactly_what_their_decoded_onnx_predicts(demo_run, tmp_path):
    b = Bundle.load(demo_run / "bundle")
    x = np.load(demo_run / "test.npz")["x"][:200]
    members = b.member_proba(x)
    for e, proba in zip(b.manifest["members"], members):
        onnx_file = tmp_path / f"{e['id']}.onnx"
        onnx_file.write_bytes(decode((demo_run / "bundle" / e["path"]).read_bytes()))
        assert onnx_file.read_bytes() == (demo_run / "pool" / e["id"] / "int8.onnx").read_bytes()
        assert np.array_equal(proba, predict_proba(session(onnx_file), b.preprocessing.apply(x)))


@pytest.fixture
def bundle_copy(demo_run, tmp_path):
    shutil.copytree(demo_run / "bundle", tmp_path / "bundle")
    return tmp_path / "bundle"


def test_tampered_member_is_refused(bundle_copy):
    first, second = sorted((bundle_copy / "members").iterdir())[:2]
    assert first.suffix == ".p2e"
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"member '{first.stem}' was altered: sha256"):
        Bundle.load(bundle_copy)
    # another member's file with a manifest edited to match its hash: it decodes to the wrong model
    first.write_bytes(second.read_bytes())
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    next(e for e in manifest["members"] if e["id"] == first.stem)["sha256"] = store.sha256(first)
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=f"member '{first.stem}' does not decode to the ONNX model its manifest names"):
        Bundle.load(bundle_copy)


def version_1(bundle: Path) -> None:
    """Rewrite a bundle as version 1 wrote it: plain ONNX member files, no encoding."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    for e in manifest["members"]:
        shipped = bundle / e.pop("path")
        onnx_bytes = decode(shipped.read_bytes())
        shipped.unlink()
        (bundle / "members" / f"{e['id']}.onnx").write_bytes(onnx_bytes)
        for key in ("encoding", "onnx_bytes", "onnx_sha256"):
            del e[key]
        e.update(
            path=f"members/{e['id']}.onnx",
            sha256=store.sha256(bundle / "members" / f"{e['id']}.onnx"),
            bytes=len(onnx_bytes),
        )
    del manifest["encodings"]
    (bundle / "manifest.json").write_text(json.dumps(manifest | {"format_version": 1}))


def test_a_version_1_bundle_still_loads(demo_run, bundle_copy):
    version_1(bundle_copy)
    x = np.load(demo_run / "test.npz")["x"]
    assert np.array_equal(Bundle.load(bundle_copy).member_proba(x), Bundle.load(demo_run / "bundle").member_proba(x))
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "rescore.py"), str(bundle_copy), str(demo_run / "test.npz")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["accuracy"] == store.read_json(demo_run / "metrics.json")["shipped"]["test_acc"]
    member = sorted((bundle_copy / "members").iterdir())[0]
    member.write_bytes(member.read_bytes()[:-1])
    with pytest.raises(UserError, match=f"member '{member.stem}' was altered: sha256"):
        Bundle.load(bundle_copy)


def test_a_newer_bundle_says_to_update(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest | {"format_version": 3}))
    with pytest.raises(UserError, match="version 1 or 2 .*version=3.*needs a newer prune2edge"):
        Bundle.load(bundle_copy)
    manifest["members"][0]["encoding"] = "zstd"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="has encoding 'zstd'; this prune2edge reads onnx, p2e-sparse-xz"):
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


def test_bundle_runtime_and_predict_import_no_training_package(demo_run):
    """`prune2edge predict` and the bundle API import none of the training extra's modules (torch, scikit-learn,
    scipy, matplotlib, onnx, ...), even where they are installed; tests/test_core_install.py runs without them."""
    code = (
        "import sys, prune2edge.runtime.bundle, prune2edge.runtime.vote, prune2edge.runtime.preprocess\n"
        "from prune2edge import cli\n"
        f"cli.main(['predict', {str(demo_run / 'bundle')!r}, {str(demo_run / 'test.npz')!r}], standalone_mode=False)\n"
        "bad = sorted(set(cli.TRAINING_MODULES) & set(sys.modules)); assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == len(np.load(demo_run / "test.npz")["x"])
