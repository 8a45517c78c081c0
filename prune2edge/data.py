"""Datasets: load raw uint8 NHWC images from digits, CIFAR, npz files or an image folder; carve splits.

Every loader returns a :class:`Dataset` of raw pixels. Nothing here knows about models; the
split indices are the only thing the pipeline needs to reproduce which images were used where.
"""
from __future__ import annotations

import glob
import hashlib
import os
import pickle
import tarfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

CIFAR = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", b"label_names"),
        "labels": b"labels",
    },
    "cifar100": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", b"fine_label_names"),
        "labels": b"fine_labels",
    },
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass
class Dataset:
    """Raw images (uint8, NHWC) with integer labels; ``scale`` maps raw values to [0, 1]."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    scale: float = 1 / 255

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def parse_spec(text: str) -> dict:
    """``digits``, ``cifar10:DIR``, ``cifar100:DIR``, ``npz:A.npz,B.npz`` or ``imagefolder:DIR`` -> spec dict."""
    name, _, rest = text.partition(":")
    if name == "npz":
        return {"name": "npz", "path": [p for p in rest.split(",") if p]}
    return {"name": name, "path": rest or None}


def load(spec: dict) -> Dataset:
    """Load the dataset a spec names (keys: ``name``, ``path``, ``download``)."""
    name, path = spec.get("name"), spec.get("path")
    if name == "digits":
        return load_digits()
    if name in CIFAR:
        if not path:
            raise UserError(f"data.path is required for {name}: the directory holding '{CIFAR[name]['folder']}/'")
        return load_cifar(name, path, download=bool(spec.get("download", False)))
    if name == "npz":
        if not path:
            raise UserError("data.path is required for npz: one .npz file, a glob, or a list of files")
        return load_npz(path)
    if name == "imagefolder":
        if not path:
            raise UserError("data.path is required for imagefolder: a directory with train/<class>/*.png")
        return load_imagefolder(path)
    raise UserError(f"unknown dataset '{name}': use digits, cifar10, cifar100, npz or imagefolder")


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (values 0..16); a fixed stratified 25% test split (seed 0)."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = d.images.astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=0)
    return _checked(Dataset("digits", x[tr], y[tr], x[te], y[te], [str(c) for c in d.target_names], 1 / 16))


def load_cifar(name: str, root: str | os.PathLike, download: bool = False) -> Dataset:
    """The canonical CIFAR "python version" pickles, from ``root`` or ``root/<folder>``."""
    info = CIFAR[name]
    root = Path(root)
    folder = root if (root / info["train"][0]).exists() else root / info["folder"]
    if not (folder / info["train"][0]).exists():
        if not download:
            raise UserError(
                f"{name} not found: expected '{folder}/{info['train'][0]}'. Download {info['url']} "
                f"and extract it into '{root}', or set data.download: true (needs internet)"
            )
        _download(info, root)

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for f in files:
            try:
                with open(folder / f, "rb") as fh:
                    d = pickle.load(fh, encoding="bytes")
                xs.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                ys.append(np.asarray(d[info["labels"]], np.int64))
            except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
                raise UserError(f"{name}: cannot read '{folder / f}' ({e}); re-download or re-extract it") from None
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = read(info["train"])
    x_test, y_test = read(info["test"])
    meta_file, key = info["meta"]
    try:
        with open(folder / meta_file, "rb") as fh:
            classes = [c.decode() for c in pickle.load(fh, encoding="bytes")[key]]
    except (OSError, pickle.UnpicklingError, KeyError) as e:
        raise UserError(f"{name}: cannot read '{folder / meta_file}' ({e}); re-download or re-extract it") from None
    return _checked(Dataset(name, x_train, y_train, x_test, y_test, classes))


def _download(info: dict, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    archive = root / Path(info["url"]).name
    try:
        urllib.request.urlretrieve(info["url"], archive)
    except OSError as e:
        raise UserError(
            f"could not download {info['url']} ({e}). Offline? Download it elsewhere and extract it into '{root}'"
        ) from None
    if hashlib.md5(archive.read_bytes()).hexdigest() != info["md5"]:
        archive.unlink()
        raise UserError(f"download of {info['url']} is corrupt (md5 mismatch); try again")
    with tarfile.open(archive) as t:
        t.extractall(root, filter="data")


def load_npz(paths: str | list[str]) -> Dataset:
    """One or more .npz files with x_train, y_train, x_test, y_test (optionally label_names); concatenated per key."""
    if isinstance(paths, str):
        paths = sorted(glob.glob(paths)) or [paths]
    parts: dict[str, list[np.ndarray]] = {}
    for p in paths:
        try:
            with np.load(p, allow_pickle=False) as z:
                for k in z.files:
                    parts.setdefault(k, []).append(z[k])
        except FileNotFoundError:
            raise UserError(f"npz file not found: '{p}'") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise UserError(f"cannot read npz file '{p}' ({e}); is it a complete numpy .npz?") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in parts]
    if missing:
        raise UserError(f"npz data lacks {missing} (files: {list(paths)}); each key must be in one of the files")
    d = {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in parts.items()}
    x_train, x_test = (_as_nhwc(d[k], k) for k in ("x_train", "x_test"))
    classes = [str(c) for c in d["label_names"]] if "label_names" in d else None
    n = max(int(d["y_train"].max()), int(d["y_test"].max())) + 1 if classes is None else len(classes)
    return _checked(Dataset("npz", x_train, _labels(d["y_train"]), x_test, _labels(d["y_test"]), classes or [str(i) for i in range(n)]))


def load_imagefolder(root: str | os.PathLike) -> Dataset:
    """``root/train/<class>/*.png|jpg`` and ``root/test/<class>/...``; class order is sorted train folder names."""
    from PIL import Image

    root = Path(root)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise UserError(f"imagefolder '{root}' needs 'train/<class>/' and 'test/<class>/' subdirectories")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"imagefolder '{root}/train' has no class subdirectories")
    files = {s: [(f, i) for i, c in enumerate(classes) for f in sorted((root / s / c).glob("*"))
                 if f.suffix.lower() in IMAGE_SUFFIXES] for s in ("train", "test")}
    modes = {Image.open(f).mode for s in files for f, _ in files[s]}
    mode = "L" if modes <= {"L", "1"} else "RGB"

    def read(split: str) -> tuple[np.ndarray, np.ndarray]:
        if not files[split]:
            raise UserError(f"imagefolder '{root}/{split}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
        imgs = [np.asarray(Image.open(f).convert(mode)) for f, _ in files[split]]
        shapes = {a.shape for a in imgs}
        if len(shapes) > 1:
            raise UserError(f"imagefolder '{root}/{split}' mixes image sizes {sorted(shapes)}; resize them to one size")
        return _as_nhwc(np.stack(imgs), split), np.array([i for _, i in files[split]], np.int64)

    (x_train, y_train), (x_test, y_test) = read("train"), read("test")
    return _checked(Dataset("imagefolder", x_train, y_train, x_test, y_test, classes))


def _as_nhwc(x: np.ndarray, key: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise UserError(f"'{key}' has dtype {x.dtype}; images must be uint8 (0..255)")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise UserError(f"'{key}' has shape {x.shape}; images must be NHWC or NHW")
    return x


def _labels(y: np.ndarray) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"labels have dtype {y.dtype}; they must be integers 0..num_classes-1")
    return y.astype(np.int64).reshape(-1)


def _checked(d: Dataset) -> Dataset:
    k = len(d.classes)
    for split, x, y in (("train", d.x_train, d.y_train), ("test", d.x_test, d.y_test)):
        if len(x) != len(y):
            raise UserError(f"{split} split has {len(x)} images but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= k):
            raise UserError(f"{split} labels out of range: found {y.min()}..{y.max()}, expected 0..{k - 1} ({k} classes)")
    if d.x_train.shape[1:] != d.x_test.shape[1:]:
        raise UserError(f"train images are {d.x_train.shape[1:]} but test images are {d.x_test.shape[1:]}")
    if k < 2:
        raise UserError(f"{d.name}: need at least 2 classes, found {k}")
    return d


def split_train_val(y: np.ndarray, val_fraction: float, seed: int, max_train: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train/validation indices into the training split (optionally subsampled first)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    try:
        if max_train and max_train < len(y):
            idx, _ = train_test_split(idx, train_size=max_train, stratify=y, random_state=seed)
        tr, va = train_test_split(idx, test_size=val_fraction, stratify=y[idx], random_state=seed)
    except ValueError as e:
        raise UserError(f"cannot carve a stratified validation split ({e}); add images or change data.val_fraction") from None
    return np.sort(tr), np.sort(va)
