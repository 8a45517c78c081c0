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
    b = {
        "x_train": rng.integers(0, 256, (15, 12, 10), dtype=np.uint8),
        "y_train": np.arange(15) % 3,
        "x_test": rng.integers(0, 256, (9, 12, 10), dtype=np.uint8),
        "y_test": np.arange(9) % 3,
        "label_names": np.array(["a", "b", "c"]),
    }
    np.savez(tmp_path / "a.npz", **a)
    np.savez(tmp_path / "b.npz", **b)
    ds = data.load(data.parse_spec(f"npz:{tmp_path / 'a.npz'},{tmp_path / 'b.npz'}"))
    assert ds.x_train.shape == (45, 12, 10, 1) and ds.x_test.shape == (9, 12, 10, 1)
    assert np.array_equal(ds.x_train[30:, ..., 0], b["x_train"]) and ds.classes == ["a", "b", "c"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("y_test"), r"lacks \['y_test'\]"),
        (lambda d: d.update(x_train=d["x_train"].astype(np.float32)), "dtype float32; images must be uint8"),
        (lambda d: d.update(y_train=np.full(20, 7)), r"train labels out of range: found 7..7, expected 0..2"),
        (
            lambda d: d.update(x_test=np.zeros((5, 9, 9), np.uint8)),
            r"train images are \(8, 8, 1\) but test images are \(9, 9, 1\)",
        ),
        (lambda d: d.update(y_train=np.arange(19) % 3), "20 images but 19 labels"),
    ],
)
def test_npz_bad_data_is_named(tmp_path, change, message):
    d = {
        "x_train": np.zeros((20, 8, 8), np.uint8),
        "y_train": np.arange(20) % 3,
        "x_test": np.zeros((5, 8, 8), np.uint8),
        "y_test": np.arange(5) % 3,
        "label_names": np.array(["a", "b", "c"]),
    }
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
    _tr2, va2 = data.split_train_val(y, 0.1, seed=3)
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
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": list(rng.integers(0, 100, n)),
            b"coarse_labels": list(rng.integers(0, 20, n)),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}))
    ds = data.load(data.parse_spec(f"cifar100:{tmp_path}"))
    assert len(ds.classes) == 100 and ds.x_train.shape == (30, 32, 32, 3) and ds.y_test.max() < 100


def xy(n_per_class=10, classes=3, size=(6, 5), seed=0):
    """Distinct random images, labels in class blocks."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n_per_class * classes, *size), dtype=np.uint8), np.repeat(
        np.arange(classes), n_per_class
    )


def test_an_npz_of_x_and_y_alone_gets_a_stratified_seeded_test_split(tmp_path):
    x, y = xy()
    np.savez(tmp_path / "one.npz", x=x, y=y, class_names=np.array(["a", "b", "c"]))
    ds = data.load({"name": "npz", "path": str(tmp_path / "one.npz"), "test_fraction": 0.3})
    assert ds.classes == ["a", "b", "c"] and ds.named  # class_names read like label_names
    assert len(ds.y_test) == 9 and np.bincount(ds.y_test).tolist() == [3, 3, 3] and len(ds.y_train) == 21
    assert np.array_equal(ds.x_test, x[ds.carved_test, ..., None]) and np.array_equal(ds.y_test, y[ds.carved_test])
    rest = np.setdiff1d(np.arange(30), ds.carved_test)
    assert np.array_equal(ds.x_train[..., 0], x[rest])  # the training split is the rest, in file order
    again = data.load(data.parse_spec(f"npz:{tmp_path / 'one.npz'}"))  # default fraction 0.2, same seed
    assert len(again.y_test) == 6 and again.named
    assert np.array_equal(
        data.load({"name": "npz", "path": str(tmp_path / "one.npz"), "test_fraction": 0.3}).carved_test, ds.carved_test
    )
    np.savez(tmp_path / "unnamed.npz", x=x, y=y)
    assert not data.load_npz(str(tmp_path / "unnamed.npz")).named
    np.savez(tmp_path / "few.npz", x=x[:4], y=np.array([0, 0, 0, 1]))
    with pytest.raises(UserError, match="cannot carve a stratified test split of 0.2 .*every class needs at least 2"):
        data.load_npz(str(tmp_path / "few.npz"))


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"images": 0, "labels": 0}, r"npz data lacks \['x_train', 'y_train'\]: found keys \['images', 'labels'\]"),
        ({"x": 0}, r"lacks \['y'\]: found keys \['x'\]"),
        (
            {"x_train": 0, "y_train": 0, "x_test": 0},
            r"lacks \['y_test'\]: found keys \['x_test', 'x_train', 'y_train'\]",
        ),
    ],
)
def test_missing_npz_keys_list_the_keys_found(tmp_path, keys, message):
    x, y = xy()
    np.savez(tmp_path / "d.npz", **{k: x if k.startswith(("x", "images")) else y for k in keys})
    with pytest.raises(UserError, match=message):
        data.load({"name": "npz", "path": str(tmp_path / "d.npz")})


def test_npz_labels_out_of_range_are_named(tmp_path):
    x, y = xy()
    np.savez(tmp_path / "d.npz", x=x, y=y + 1, label_names=np.array(["a", "b", "c"]))
    with pytest.raises(UserError, match=r"labels out of range: found 1..3, expected 0..2 \(3 classes\)"):
        data.load({"name": "npz", "path": str(tmp_path / "d.npz")})
    np.savez(tmp_path / "d.npz", x=x, y=y - 1)
    with pytest.raises(UserError, match=r"labels out of range: found -1..1"):
        data.load({"name": "npz", "path": str(tmp_path / "d.npz")})


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b"x_train,y_train\n1,2\n",
            r"cannot read npz file '.*bad.npz': it is not a numpy .npz or .npy file but a text file",
        ),
        (b"", "it is not a numpy .npz or .npy file but empty"),
        (b"\x00\x01\x02\x03garbage", r"not a numpy .npz or .npy file but a file that starts with b'\\x00\\x01"),
        (b"PK\x03\x04 truncated", r"cannot read npz file .*: it is truncated or damaged; write or copy it again"),
    ],
)
def test_a_file_that_is_no_npz_says_what_it_is(tmp_path, content, message):
    (tmp_path / "bad.npz").write_bytes(content)
    with pytest.raises(UserError, match=message):
        data.load({"name": "npz", "path": str(tmp_path / "bad.npz")})


def test_truncated_and_pickled_npz(tmp_path):
    x, y = xy(n_per_class=200, size=(16, 16))
    np.savez_compressed(tmp_path / "full.npz", x=x, y=y)
    blob = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="cannot read npz file .*cut.npz.*truncated or damaged"):
        data.read_arrays(tmp_path / "cut.npz")
    np.savez(tmp_path / "objects.npz", x=x, y=y, label_names=np.array(["a", 1, None], dtype=object))
    with pytest.raises(UserError, match="holds pickled Python objects, which prune2edge does not load"):
        data.read_arrays(tmp_path / "objects.npz")
    np.save(tmp_path / "x.npy", x)
    assert np.array_equal(data.read_arrays(tmp_path / "x.npy")["x"], x)


def test_a_bare_path_gets_the_prefix_it_needs(tmp_path):
    x, y = xy()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(UserError, match=f"unknown dataset '{tmp_path / 'd.npz'}'.*write 'npz:{tmp_path / 'd.npz'}'"):
        data.load(data.parse_spec(str(tmp_path / "d.npz")))
    with pytest.raises(UserError, match=f"for a folder of images write 'imagefolder:{tmp_path}'"):
        data.load(data.parse_spec(str(tmp_path)))
    with pytest.raises(
        UserError, match="needs its kind in front: 'npz:/no/such.file' .* or 'imagefolder:/no/such.file'"
    ):
        data.load(data.parse_spec("/no/such.file"))


def test_image_size_and_color_apply_as_images_are_loaded(tmp_path):
    rng = np.random.default_rng(0)
    for i, c in enumerate(("cat", "dog") * 6):  # no test/: one carved; sizes and colours mixed
        (tmp_path / "train" / c).mkdir(parents=True, exist_ok=True)
        shape = (40, 30, 3) if i % 3 else (20, 15)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / "train" / c / f"{i}.png")
    with pytest.raises(UserError, match=r"mixes image sizes .*set data.image_size \(e.g. 64, or \[height, width\]\)"):
        data.load({"name": "imagefolder", "path": str(tmp_path)})
    ds = data.load({"name": "imagefolder", "path": str(tmp_path), "image_size": [8, 6], "test_fraction": 0.25})
    assert ds.x_train.shape[1:] == (8, 6, 3) and len(ds.y_test) == 3 and ds.carved_test is not None
    grey = data.load({"name": "imagefolder", "path": str(tmp_path), "image_size": 8, "color": "grey"})
    assert grey.image_shape == (8, 8, 1)
    x, y = xy(size=(12, 12, 3))
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:3], y_test=y[:3])
    ds = data.load({"name": "npz", "path": str(tmp_path / "d.npz"), "image_size": 6, "color": "grey"})
    assert ds.x_train.shape == (30, 6, 6, 1) and ds.x_test.shape == (3, 6, 6, 1) and ds.carved_test is None
    digits = data.load({"name": "digits", "image_size": 16, "color": "rgb"})  # any source, not only files
    assert digits.image_shape == (16, 16, 3)


def test_imagefolder_layouts(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "flat" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((4, 4), 40 * i + (c == "b"), np.uint8)).save(tmp_path / "flat" / c / f"{i}.png")
    ds = data.load_imagefolder(tmp_path / "flat")  # DIR/<class>/ alone
    assert ds.classes == ["a", "b"] and len(ds.y_test) == 2 and len(ds.y_train) == 8
    (tmp_path / "flat" / "test" / "c").mkdir(parents=True)
    with pytest.raises(
        UserError, match=r"imagefolder '.*flat/test' has classes \['c'\] that .* lacks; its classes are \['a', 'b'\]"
    ):
        data.load_imagefolder(tmp_path / "flat")
    with pytest.raises(UserError, match="is not a directory"):
        data.load_imagefolder(tmp_path / "nope")
    (tmp_path / "broken" / "train" / "a").mkdir(parents=True)
    (tmp_path / "broken" / "train" / "a" / "0.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(UserError, match="cannot read image '.*0.jpg'"):
        data.load_imagefolder(tmp_path / "broken")


def test_copies_across_splits_are_counted():
    x, _ = xy(size=(4, 4))
    counts = data.duplicates(
        {"train": x[:20], "val": np.concatenate([x[20:25], x[:2]]), "test": np.concatenate([x[25:], x[3:4], x[21:22]])}
    )
    assert counts == {"train/val": 2, "train/test": 1, "val/test": 1}
    w = data.duplicate_warning(counts, {"train": 20, "val": 7, "test": 7})
    assert (
        "2 of the 7 validation images also in the training split; 1 of the 7 test images also in the training split"
        in w["message"]
    )
    assert data.duplicate_warning({"train/val": 0}, {}) is None


def test_classes_are_checked_against_a_model():
    data.check_classes(["a", "b"], ["a", "b"], np.array([0, 1]))
    data.check_classes(["a", "b"], None, np.array([0, 1]))
    with pytest.raises(UserError, match="the model's classes in another order .*data: b, a; model: a, b"):
        data.check_classes(["a", "b"], ["b", "a"])
    with pytest.raises(
        UserError, match="the data's 3 classes are not the model's 2: .*not in the model: c; not in the data: none"
    ):
        data.check_classes(["a", "b"], ["a", "b", "c"])
    with pytest.raises(UserError, match=r"labels run 0..4, but the model has 2 classes \(labels 0..1: a, b\)"):
        data.check_classes(["a", "b"], None, np.array([0, 4]))
