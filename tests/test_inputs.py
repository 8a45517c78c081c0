"""Raw inspection images in: size and colour as part of the model's input contract, applied by every consumer of
a bundle, and the image-folder example of docs/usage.md built and run as it says."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import prune2edge_cli
from PIL import Image, ImageDraw

from prune2edge import UserError, data, store, summary
from prune2edge.runtime import fleet
from prune2edge.runtime.bundle import Bundle, predict_proba, session
from prune2edge.runtime.preprocess import InputSteps, area_weights, check_images

ROOT = Path(__file__).resolve().parents[1]


def part(rng: np.random.Generator, size: int, scratch: bool, rgb: bool) -> Image.Image:
    """A synthetic inspection photo: a lit round part on a darker belt, noisy; a scratch is a dark stroke across it."""
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(30, 60, 3)))
    draw = ImageDraw.Draw(img)
    cx, cy, r = size * rng.uniform(0.4, 0.6), size * rng.uniform(0.4, 0.6), size * rng.uniform(0.28, 0.36)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(170, 230, 3)))
    if scratch:
        a = rng.uniform(0, np.pi)
        dx, dy = np.cos(a) * r * 0.9, np.sin(a) * r * 0.9
        draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=(20, 20, 20), width=max(3, size // 12))
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (size, size, 3))
    img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return img if rgb else img.convert("L")


def readme_config() -> str:
    """The ``inspect.yaml`` shown in the README, Bring your own images."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return next(b for b in blocks if b.startswith("# inspect.yaml"))


@pytest.fixture(scope="module")
def inspection(tmp_path_factory) -> Path:
    """The README's example: 40 photos per class, 200 or 300 px, grey or RGB, no test split; run as it says."""
    d = tmp_path_factory.mktemp("inspect")
    rng = np.random.default_rng(0)
    for c in ("ok", "scratch"):
        (d / "parts" / c).mkdir(parents=True)
        for i in range(40):
            part(rng, int(rng.choice([200, 300])), c == "scratch", bool(rng.integers(2))).save(
                d / "parts" / c / f"{i:03d}.jpg"
            )
    part(rng, 300, True, True).save(d / "frame.jpg")
    part(rng, 200, False, False).save(d / "frame_ok.jpg")
    (d / "inspect.yaml").write_text(readme_config())
    out = prune2edge_cli("run", "inspect.yaml", "--out", "runs/inspect", "--quiet", cwd=d)
    assert out.returncode == 0, out.stderr
    return d


@pytest.mark.slow
def test_the_readme_image_folder_example_runs_end_to_end(inspection):
    run = inspection / "runs" / "inspect"
    info = store.read_json(run / "dataset.json")
    assert info["image_shape"] == [32, 32, 1] and info["classes"] == ["ok", "scratch"]
    assert info["input_steps"]["size"] == [32, 32] and info["input_steps"]["color"] == "grey"
    assert info["test_split"].startswith("carved: 0.2") and info["n_test"] == 16 and info["warnings"] == []
    carved = np.load(run / "splits.npz")[
        "carved_test"
    ]  # positions in the folder's sorted files: 40 ok, then 40 scratch
    assert len(carved) == 16 and (carved < 40).sum() == 8, "the carved test split is stratified"
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["input"]["steps"]["size"] == [32, 32] and manifest["input"]["steps"]["color"] == "grey"
    assert "area" in manifest["input"]["steps"]["resize"]
    metrics = store.read_json(run / "metrics.json")
    acc = metrics["shipped"]["test_acc"]  # what the bundle scores
    assert metrics["ensemble"]["test_acc"] >= 0.9 and acc >= 0.9
    # the default pool, and on 8 validation images no lead justifies fewer votes: all 3 ship, and the summary says why
    assert metrics["shipped"]["kind"] == "ensemble" and metrics["shipped"]["members"] == ["m000", "m001", "m002"]
    assert "k chosen on validation (cluster.k: auto): k = 3: the most votes (3)" in summary.table(metrics)
    assert (
        f'<span id="k-reason">{html.escape(metrics["k_choice"]["reason"])}</span>' in (run / "report.html").read_text()
    )
    # camera frames as saved (300 px RGB, 200 px grey) in one call
    out = prune2edge_cli("predict", "runs/inspect/bundle", "frame.jpg", "frame_ok.jpg", "--json", cwd=inspection)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["label"] for line in out.stdout.splitlines()] == ["scratch", "ok"]
    # the same carved test split, read through the bundle's steps
    out = prune2edge_cli("evaluate", "runs/inspect/bundle", "--data", "imagefolder:parts", cwd=inspection)
    assert out.returncode == 0, out.stderr
    assert f"ensemble test accuracy: {acc:.4f} on 16 images" in out.stdout and "warning" not in out.stderr


@pytest.mark.slow
def test_a_32px_bundle_predicts_the_same_on_images_stored_at_32px_and_on_their_4x_enlargements(inspection):
    b = Bundle.load(inspection / "runs" / "inspect" / "bundle")
    ds = data.load({"name": "imagefolder", "path": str(inspection / "parts"), "image_size": 32, "color": "grey"})
    x32 = np.concatenate([ds.x_train, ds.x_test])  # every photo, stored at 32 px
    p32 = b.predict_proba(x32)
    # enlarged by repeating pixels (Pillow's nearest): area averaging gives the stored pixels back exactly
    nearest = np.stack([np.asarray(Image.fromarray(a[..., 0]).resize((128, 128), Image.NEAREST)) for a in x32])
    assert np.array_equal(b.predict_proba(nearest), p32)
    assert np.array_equal(b.predict_proba(np.repeat(nearest[..., None], 3, axis=-1)), p32)  # as RGB: grey again
    # enlarged smoothly (Pillow's bilinear): the enlargement blurs, so the pixels come back within a few levels, and
    # how many predictions stay is the models' robustness: the ensemble of the defaults, trained on 64 photos, keeps
    # about as many as its int8 parent alone (measured: 71 % and 68 %)
    smooth = np.stack([np.asarray(Image.fromarray(a[..., 0]).resize((128, 128), Image.BILINEAR)) for a in x32])
    assert np.abs(b.steps.apply(smooth[..., None]).astype(int) - x32).mean() < 4
    run, parent = inspection / "runs" / "inspect", session(inspection / "runs" / "inspect" / "baseline" / "int8.onnx")
    alone = lambda x: predict_proba(parent, store.preprocessing(run).apply(b.steps.apply(x))).argmax(1)  # noqa: E731
    kept_by_parent = (alone(smooth[..., None]) == alone(x32)).mean()
    assert (b.predict(smooth) == p32.argmax(1)).mean() >= kept_by_parent - 0.05


@pytest.mark.slow
def test_rescore_applies_the_input_steps_to_raw_frames(inspection, tmp_path):
    rng = np.random.default_rng(7)
    frames = np.stack([np.asarray(part(rng, 240, i % 2 == 1, True)) for i in range(20)])  # 240 px RGB, as a camera
    y = np.arange(20) % 2
    np.savez(tmp_path / "frames.npz", x=frames, y=y)
    bundle = inspection / "runs" / "inspect" / "bundle"
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "rescore.py"), str(bundle), str(tmp_path / "frames.npz")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["accuracy"] == (Bundle.load(bundle).predict(frames) == y).mean()


@pytest.mark.broker
@pytest.mark.slow
def test_a_fleet_classifies_camera_frames_like_the_bundle(inspection, tmp_path):
    rng = np.random.default_rng(3)
    frames = [np.asarray(part(rng, size, i % 2 == 1, size == 300)) for i, size in enumerate([200, 300] * 4)]
    y = np.arange(8) % 2
    bundle = inspection / "runs" / "inspect" / "bundle"
    with fleet.LocalFleet(bundle, workdir=tmp_path / "fleet") as lf:
        rows: list[dict] = []
        s = fleet.classify(lf.broker, "default", frames, labels=y, on_result=rows.append, classes=["ok", "scratch"])
        assert s["decided"] == 8
        assert [r["class"] for r in sorted(rows, key=lambda r: r["index"])] == Bundle.load(bundle).predict(
            frames
        ).tolist()
        # the documented folder (200 and 300 px, grey and RGB) from the command line: its carved test split, as stored
        out = prune2edge_cli(
            "classify", "imagefolder:parts", "--broker", lf.broker.url, "--out", str(tmp_path / "d.jsonl"),
            cwd=inspection,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        acc = store.read_json(inspection / "runs" / "inspect" / "metrics.json")["shipped"]["test_acc"]
        assert "16 frames: 16 decided" in out.stderr and f"accuracy {acc:.4f}" in out.stderr
        files = [json.loads(line)["input"] for line in (tmp_path / "d.jsonl").read_text().splitlines()]
        assert len(files) == 16 and all(Path(inspection, f).is_file() for f in files)
        with pytest.raises(UserError, match="the data's 2 classes are not the model's 2: the data has ok, dent"):
            fleet.classify(lf.broker, "default", frames, labels=y, classes=["ok", "dent"])
        with pytest.raises(UserError, match="the model's classes in another order"):
            fleet.classify(lf.broker, "default", frames, labels=y, classes=["scratch", "ok"])
        with pytest.raises(UserError, match=r"labels run 0..2, but the model has 2 classes"):
            fleet.classify(lf.broker, "default", frames, labels=y * 2)


def test_area_resize_and_grey_match_pillow():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 128, 96, 3), dtype=np.uint8)
    small = InputSteps((32, 24)).apply(x)
    reduced = np.stack([np.asarray(Image.fromarray(a).reduce(4)) for a in x])  # Pillow's block average
    assert small.shape == (3, 32, 24, 3) and np.abs(small.astype(int) - reduced).max() <= 1
    grey = InputSteps(color="grey").apply(x)
    assert grey.shape == (3, 128, 96, 1)
    assert (
        np.abs(grey[..., 0].astype(int) - np.stack([np.asarray(Image.fromarray(a).convert("L")) for a in x])).max() <= 1
    )
    assert np.allclose(area_weights(7, 3).sum(1), 1) and np.allclose(area_weights(3, 7).sum(1), 1)
    assert np.allclose(area_weights(3, 2), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])
    same = InputSteps((128, 96), "rgb")
    assert same.apply(x) is x  # nothing to do: unchanged
    assert np.array_equal(InputSteps(color="rgb").apply(grey), np.repeat(grey, 3, axis=-1))
    rgba = np.concatenate([x, np.zeros_like(x[..., :1])], axis=-1)
    assert np.array_equal(InputSteps(color="grey").apply(rgba), grey)  # alpha dropped
    assert InputSteps.from_dict(same.to_dict()) == same and InputSteps.from_dict(None) == InputSteps()
    assert InputSteps.from_config({"image_size": 40, "color": None}) == InputSteps((40, 40))


def test_check_images_takes_any_size_only_when_the_model_resizes():
    steps = InputSteps((8, 8), "grey")
    batch = check_images(
        [np.zeros((20, 30), np.uint8), np.full((16, 16, 3), 255, np.uint8), np.zeros((9, 9, 4), np.uint8)],
        (8, 8, 1),
        steps,
    )
    assert batch.shape == (3, 8, 8, 1) and batch[1].min() == 255
    assert check_images(np.zeros((5, 40, 40), np.uint8), (8, 8, 1), steps).shape == (5, 8, 8, 1)  # NHW batch
    assert check_images(np.zeros((40, 40, 3), np.uint8), (8, 8, 1), steps).shape == (1, 8, 8, 1)  # one image
    with pytest.raises(
        UserError,
        match=r"images have shape \(1, 40, 40, 1\) but the model takes \(8, 8, 1\) .*"
        "a model made with data.image_size resizes",
    ):
        check_images(np.zeros((1, 40, 40, 1), np.uint8), (8, 8, 1))
    with pytest.raises(UserError, match=r"shape \(1, 8, 8, 3\) .* a model made with data.color converts"):
        check_images(np.zeros((1, 8, 8, 3), np.uint8), (8, 8, 1))
    with pytest.raises(UserError, match=r"the images mix shapes \[\(8, 8\), \(9, 9\)\]"):
        check_images([np.zeros((8, 8), np.uint8), np.zeros((9, 9), np.uint8)], (8, 8, 1))
    with pytest.raises(UserError, match="images have 2 channels; color: grey converts images of 1"):
        check_images(np.zeros((1, 8, 8, 2), np.uint8), (8, 8, 1), steps)


@pytest.mark.slow
def test_a_bundle_without_input_steps_behaves_as_before(inspection, tmp_path):
    import shutil

    bundle = inspection / "runs" / "inspect" / "bundle"
    shutil.copytree(bundle, tmp_path / "bundle")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    del manifest["input"]["steps"]  # as bundles made before them
    (tmp_path / "bundle" / "manifest.json").write_text(json.dumps(manifest))
    old, new = Bundle.load(tmp_path / "bundle"), Bundle.load(bundle)
    x = np.load(inspection / "runs" / "inspect" / "test.npz")["x"]
    assert old.steps == InputSteps() and np.array_equal(old.predict_proba(x), new.predict_proba(x))
    with pytest.raises(UserError, match=r"images have shape \(2, 64, 64, 1\) but the model takes \(32, 32, 1\)"):
        old.predict(np.zeros((2, 64, 64, 1), np.uint8))
    assert new.predict(np.zeros((2, 64, 64, 1), np.uint8)).shape == (2,)
