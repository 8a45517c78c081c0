"""Loaders read every supported layout and refuse bad data with a message that says what to fix."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from prune2edge import UserError, data


def write_cifar10(root, n_train=20, n_test=10):
    """A tiny copy of the canonical CIFAR-10 "python version" layout (same keys, dtypes and shapes)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return folder


def test_cifar_pickle_layout_is_read_as_nhwc(tmp_path):
    folder = write_cifar10(tmp_path)
    ds = data.load({"name": "cifar10", "path": str(tmp_path)})
    assert ds.x_train.shape == (100, 32, 32, 3) and ds.x_test.shape == (10, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.classes[3] == "c3"
    with open(folder / "data_batch_1", "rb") as f:
        row = pickle.load(f)[b"data"][0]
    # canonical rows are 1024 red, then 1024 green, then 1024 blue values, row-major
    assert np.array_equal(ds.x_train[0, :, :, 1].ravel(), row[1024:2048])


def test_cifar_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(UserError, match=r"cifar-10-batches-py.*cifar-10-python.tar.gz.*download"):
        data.load({"name": "cifar10", "path": str(tmp_path)})


def test_cifar_corrupt_batch(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot read .*data_batch_3.*re-download"):
        data.load({"name": "cifar10", "path": str(folder)})


def test_npz_keys_split_over_files_are_concatenated(tmp_path):
    rng = np.random.default_rng(0)
    a = {"x_train": rng.integers(0, 256, (30, 12, 10), dtype=np.uint8), "y_train": np.arange(30) % 3}
    b = {"x_train": rng.integers(0, 256, (15, 12, 10), dtype=np.uint8), "y_train": np.arange(15) % 3,
         "x_test": rng.integers(0, 256, (9, 12, 10), dtype=np.uint8), "y_test": np.arange(9) % 3,
         "label_names": np.array(["a", "b", "c"])}
    np.savez(tmp_path / "a.npz", **a)
    np.savez(tmp_path / "b.npz", **b)
    ds = data.load(data.parse_spec(f"npz:{tmp_path / 'a.npz'},{tmp_path / 'b.npz'}"))
    assert ds.x_train.shape == (45, 12, 10, 1) and ds.x_test.shape == (9, 12, 10, 1)
    assert np.array_equal(ds.x_train[30:, ..., 0], b["x_train"]) and ds.classes == ["a", "b", "c"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("y_test"), r"lacks \['y_test'\]"),
    (lambda d: d.update(x_train=d["x_train"].astype(np.float32)), "dtype float32; images must be uint8"),
    (lambda d: d.update(y_train=np.full(20, 7)), r"train labels out of range: found 7..7, expected 0..2"),
    (lambda d: d.update(x_test=np.zeros((5, 9, 9), np.uint8)), r"train images are \(8, 8, 1\) but test images are \(9, 9, 1\)"),
    (lambda d: d.update(y_train=np.arange(19) % 3), "20 images but 19 labels"),
])
def test_npz_bad_data_is_named(tmp_path, change, message):
    d = {"x_train": np.zeros((20, 8, 8), np.uint8), "y_train": np.arange(20) % 3, "x_test": np.zeros((5, 8, 8), np.uint8),
         "y_test": np.arange(5) % 3, "label_names": np.array(["a", "b", "c"])}
    change(d)
    np.savez(tmp_path / "d.npz", **d)
    with pytest.raises(UserError, match=message):
        data.load({"name": "npz", "path": str(tmp_path / "d.npz")})


def test_npz_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match="npz file not found"):
        data.load({"name": "npz", "path": [str(tmp_path / "nope.npz")]})
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="cannot read npz file"):
        data.load({"name": "npz", "path": [str(tmp_path / "bad.npz")]})


def test_imagefolder_reads_classes_and_channels(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    ds = data.load(data.parse_spec(f"imagefolder:{tmp_path}"))
    assert ds.classes == ["cat", "dog"] and ds.x_train.shape == (8, 6, 7, 3)
    assert list(ds.y_train) == [0] * 4 + [1] * 4 and len(ds.y_test) == 4
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "train" / "dog" / "odd.png")
    with pytest.raises(UserError, match="mixes image sizes"):
        data.load_imagefolder(tmp_path)


def test_unknown_dataset_and_missing_path():
    with pytest.raises(UserError, match="unknown dataset 'mnist'"):
        data.load({"name": "mnist"})
    with pytest.raises(UserError, match="data.path is required for npz"):
        data.load({"name": "npz"})


def test_split_is_stratified_seeded_and_disjoint():
    y = np.repeat(np.arange(4), 50)
    tr, va = data.split_train_val(y, 0.1, seed=3)
    assert len(va) == 20 and np.bincount(y[va]).tolist() == [5, 5, 5, 5]
    assert not set(tr) & set(va) and len(tr) + len(va) == 200
    tr2, va2 = data.split_train_val(y, 0.1, seed=3)
    assert np.array_equal(va, va2) and not np.array_equal(va, data.split_train_val(y, 0.1, seed=4)[1])


def test_digits_are_raw_pixels_with_their_scale():
    ds = data.load_digits()
    assert ds.x_train.dtype == np.uint8 and ds.x_train.max() == 16 and ds.scale == 1 / 16
    assert ds.image_shape == (8, 8, 1) and len(ds.y_test) == 450 and len(ds.classes) == 10


def test_cifar_download_checks_the_published_md5(tmp_path, monkeypatch):
    import hashlib
    import tarfile

    src = tmp_path / "src"
    write_cifar10(src)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    info = dict(data.CIFAR["cifar10"], url=archive.as_uri())
    monkeypatch.setitem(data.CIFAR, "cifar10", dict(info, md5="0" * 32))
    with pytest.raises(UserError, match="corrupt \\(md5 mismatch\\)"):
        data.load({"name": "cifar10", "path": str(tmp_path / "a"), "download": True})
    monkeypatch.setitem(data.CIFAR, "cifar10", dict(info, md5=hashlib.md5(archive.read_bytes()).hexdigest()))
    ds = data.load({"name": "cifar10", "path": str(tmp_path / "b"), "download": True})
    assert ds.x_train.shape == (100, 32, 32, 3)
    monkeypatch.setitem(data.CIFAR, "cifar10", dict(info, url=(tmp_path / "absent.tar.gz").as_uri()))
    with pytest.raises(UserError, match="could not download .*Offline\\? Download it elsewhere"):
        data.load({"name": "cifar10", "path": str(tmp_path / "c"), "download": True})


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 30), ("test", 10)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": list(rng.integers(0, 100, n)),
                 b"coarse_labels": list(rng.integers(0, 20, n))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}))
    ds = data.load(data.parse_spec(f"cifar100:{tmp_path}"))
    assert len(ds.classes) == 100 and ds.x_train.shape == (30, 32, 32, 3) and ds.y_test.max() < 100
