"""Datasets: load raw uint8 NHWC images from digits, CIFAR, npz files or an image folder; carve splits.

Every loader returns a :class:`Dataset` of raw pixels, brought to one size and colour by the spec's
:class:`~prune2edge.runtime.preprocess.InputSteps` as they are loaded. A source without a test split gets one carved
(stratified, seed 0). Nothing here knows about models; the split indices are the only thing the pipeline
needs to reproduce which images were used where.
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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import UserError
from .runtime.preprocess import InputSteps

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
GREY_MODES = ("1", "L", "LA")  # Pillow modes decoded as grey; every other mode is decoded as RGB
TEST_FRACTION = 0.2  # of a source without a test split, carved as its test split
TEST_SEED = 0  # fixed, so that every run (and `evaluate`) on the source scores the same test images
SPLITS = {"train": "training", "val": "validation", "test": "test"}


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
    named: bool = True  # False: the classes are the label numbers (no names in the source)
    carved_test: np.ndarray | None = None  # where the source has no test split: its test images' positions in it

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
    """Load the dataset a spec names (keys: ``name``, ``path``, ``download``, ``image_size``, ``color``,
    ``test_fraction``; as the ``data`` section of the config)."""
    name, path = spec.get("name"), spec.get("path")
    steps, fraction = InputSteps.from_config(spec), spec.get("test_fraction") or TEST_FRACTION
    if name == "npz":
        if not path:
            raise UserError("data.path is required for npz: one .npz file, a glob, or a list of files")
        return load_npz(path, steps, fraction)
    if name == "imagefolder":
        if not path:
            raise UserError("data.path is required for imagefolder: a directory with train/<class>/*.png")
        return load_imagefolder(path, steps, fraction)
    if name == "digits":
        ds = load_digits()
    elif name in CIFAR:
        if not path:
            raise UserError(f"data.path is required for {name}: the directory holding '{CIFAR[name]['folder']}/'")
        ds = load_cifar(name, path, download=bool(spec.get("download", False)))
    else:
        raise UserError(
            f"unknown dataset '{name}': use digits, cifar10, cifar100, npz or imagefolder{_path_hint(str(name))}"
        )
    return replace(ds, x_train=steps.apply(ds.x_train), x_test=steps.apply(ds.x_test))


def _path_hint(name: str) -> str:
    """For a dataset named by a bare path: which prefix it needs."""
    if name.endswith((".npz", ".npy")) or Path(name).is_file():
        return f"; for a file write 'npz:{name}'"
    if Path(name).is_dir():
        return f"; for a folder of images write 'imagefolder:{name}'"
    if "/" in name or os.sep in name or "." in name:
        return f"; a path needs its kind in front: 'npz:{name}' (numpy files) or 'imagefolder:{name}' (image folders)"
    return ""


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


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of a numpy ``.npz`` file by name (of a ``.npy`` file: ``{"x": array}``), read in full; a clear
    error for a missing, truncated, damaged or foreign file, or one that holds pickled Python objects."""
    path, kind = Path(path), Path(path).suffix.lstrip(".") or "npz"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise UserError(f"{kind} file not found: '{path}'") from None
    except OSError as e:
        raise UserError(f"cannot read {kind} file '{path}' ({e.strerror})") from None
    if not head.startswith((b"PK", b"\x93NUMPY")):
        what = (
            "empty"
            if not head
            else "a text file"
            if all(32 <= c < 127 or c in b"\t\r\n" for c in head)
            else f"a file that starts with {head!r}"
        )
        raise UserError(
            f"cannot read {kind} file '{path}': it is not a numpy .npz or .npy file but {what}; "
            "write it with numpy.savez (e.g. numpy.savez(path, x=images, y=labels))"
        )
    try:
        if head.startswith(b"\x93NUMPY"):
            return {"x": np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UserError(
                f"cannot read {kind} file '{path}': it holds pickled Python objects, which prune2edge does "
                "not load; save plain arrays (images uint8, labels integers, names as numpy.array(names))"
            ) from None
        raise UserError(
            f"cannot read {kind} file '{path}' ({e}); is it a complete numpy .{kind}? Write or copy it again"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(
            f"cannot read {kind} file '{path}' ({e}): it is truncated or damaged; write or copy it again"
        ) from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file decoded to uint8 pixels: HW for grey images, HWC (RGB, alpha dropped) for the rest."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L" if im.mode in GREY_MODES else "RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"cannot read image '{path}' ({e}); is it a complete png/jpg/bmp file?") from None


def load_npz(paths: str | list[str], steps: InputSteps | None = None, test_fraction: float = TEST_FRACTION) -> Dataset:
    """One or more .npz files with x_train, y_train and x_test, y_test, or with x, y only (a test split is carved),
    optionally label_names (or class_names); keys found in several files are concatenated in the order given."""
    steps = steps or InputSteps()
    if isinstance(paths, str):
        paths = sorted(glob.glob(paths)) or [paths]
    parts: dict[str, list[np.ndarray]] = {}
    for p in paths:
        for k, v in read_arrays(p).items():
            parts.setdefault(k, []).append(v)
    d = {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in parts.items()}
    if {"x_train", "y_train", "x_test", "y_test"} & set(d) or not {"x", "y"} & set(d):
        need = ["x_train", "y_train"] + (["x_test", "y_test"] if {"x_test", "y_test"} & set(d) else [])
    else:
        need = ["x", "y"]
    missing = [k for k in need if k not in d]
    if missing:
        raise UserError(
            f"npz data lacks {missing}: found keys {sorted(d)} in {list(paths)}. It takes x_train, y_train "
            "and x_test, y_test, or x, y alone (then a test split is carved); optionally label_names or "
            "class_names; each key may be in any one of the files"
        )
    names = next((d[k] for k in ("label_names", "class_names") if k in d), None)
    x, y = steps.apply(_as_nhwc(d[need[0]], need[0])), _labels(d[need[1]])
    x_test, y_test = (
        (steps.apply(_as_nhwc(d["x_test"], "x_test")), _labels(d["y_test"])) if len(need) == 4 else (x[:0], y[:0])
    )
    k = len(names) if names is not None else int(max(y.max(initial=0), y_test.max(initial=0))) + 1
    classes = [str(c) for c in names] if names is not None else [str(i) for i in range(k)]
    ds = _checked(Dataset("npz", x, y, x_test, y_test, classes, named=names is not None))
    return ds if len(need) == 4 else carve_test(ds, test_fraction)


def imagefolder_files(root: str | os.PathLike) -> tuple[dict[str, list[tuple[Path, int]]], list[str]]:
    """The image files of an image folder with their labels, by split (``train``, and ``test`` where the folder
    has one), and its classes: the sorted folder names."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"imagefolder '{root}' is not a directory")
    folders = {"train": root / "train" if (root / "train").is_dir() else root}
    if (root / "test").is_dir():
        folders["test"] = root / "test"
    classes = sorted(p.name for p in folders["train"].iterdir() if p.is_dir() and p.name != "test")
    if not classes:
        raise UserError(
            f"imagefolder '{root}' has no class folders: expected '{root}/train/<class>/*.png' (and "
            f"'{root}/test/<class>/'), or '{root}/<class>/*.png' (a test split is then carved)"
        )
    if "test" in folders:
        other = sorted(p.name for p in folders["test"].iterdir() if p.is_dir() and p.name not in classes)
        if other:
            raise UserError(
                f"imagefolder '{root}/test' has classes {other} that '{folders['train']}' lacks; "
                f"its classes are {classes}"
            )
    files = {
        s: [
            (f, i)
            for i, c in enumerate(classes)
            for f in sorted((folder / c).glob("*"))
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
        for s, folder in folders.items()
    }
    for split, fs in files.items():
        if not fs:
            raise UserError(f"imagefolder '{folders[split]}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files, classes


def imagefolder_test_files(
    root: str | os.PathLike, test_fraction: float = TEST_FRACTION
) -> tuple[list[tuple[Path, int]], list[str]]:
    """The files of an image folder's test split (``test/``, or the split :func:`load_imagefolder` carves) with
    their labels, and the classes; for sending the images as they are stored."""
    files, classes = imagefolder_files(root)
    if "test" in files:
        return files["test"], classes
    _, test = carve_indices(np.array([i for _, i in files["train"]]), test_fraction, f"imagefolder '{root}'")
    return [files["train"][i] for i in test], classes


def load_imagefolder(
    root: str | os.PathLike, steps: InputSteps | None = None, test_fraction: float = TEST_FRACTION
) -> Dataset:
    """``root/train/<class>/*.png|jpg`` and ``root/test/<class>/...``; without ``test/``, ``root/train/<class>/``
    or ``root/<class>/`` alone, and a test split is carved. Classes: the sorted folder names. Each image goes
    through ``steps`` as it is read; unless ``steps`` set a colour, the images are grey if all are, else RGB."""
    steps = steps or InputSteps()
    files, classes = imagefolder_files(root)
    imgs = {s: [steps.apply(_as_nhwc(read_image(f)[None], str(f))) for f, _ in fs] for s, fs in files.items()}
    if any(a.shape[-1] == 3 for v in imgs.values() for a in v):  # colour as stored: RGB unless every image is grey
        imgs = {s: [InputSteps(color="rgb").apply(a) for a in v] for s, v in imgs.items()}
    shapes = {a.shape[1:] for v in imgs.values() for a in v}
    if len(shapes) > 1:
        raise UserError(
            f"imagefolder '{root}' mixes image sizes {sorted(shapes)}; set data.image_size (e.g. 64, or "
            "[height, width]) to resize them as they are read"
        )
    x, y = (np.concatenate(imgs["train"]), np.array([i for _, i in files["train"]], np.int64))
    if "test" not in files:
        return carve_test(_checked(Dataset("imagefolder", x, y, x[:0], y[:0], classes)), test_fraction)
    return _checked(
        Dataset(
            "imagefolder",
            x,
            y,
            np.concatenate(imgs["test"]),
            np.array([i for _, i in files["test"]], np.int64),
            classes,
        )
    )


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
            raise UserError(
                f"{split} labels out of range: found {y.min()}..{y.max()}, expected 0..{k - 1} ({k} classes)"
            )
    if d.x_train.shape[1:] != d.x_test.shape[1:]:
        raise UserError(f"train images are {d.x_train.shape[1:]} but test images are {d.x_test.shape[1:]}")
    if k < 2:
        raise UserError(f"{d.name}: need at least 2 classes, found {k}")
    return d


def carve_indices(y: np.ndarray, fraction: float, name: str, seed: int = TEST_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Sorted positions of the images kept for training and of a stratified, seeded test split carved from them."""
    from sklearn.model_selection import train_test_split

    try:
        rest, test = train_test_split(np.arange(len(y)), test_size=fraction, stratify=y, random_state=seed)
    except ValueError as e:
        raise UserError(
            f"{name}: cannot carve a stratified test split of {fraction:g} ({e}); add images (every class "
            "needs at least 2) or change data.test_fraction"
        ) from None
    return np.sort(rest), np.sort(test)


def carve_test(ds: Dataset, fraction: float, seed: int = TEST_SEED) -> Dataset:
    """``ds`` (with no test images yet) with a stratified, seeded test split carved from its training images."""
    rest, test = carve_indices(ds.y_train, fraction, ds.name, seed)
    return replace(
        ds,
        x_train=ds.x_train[rest],
        y_train=ds.y_train[rest],
        x_test=ds.x_train[test],
        y_test=ds.y_train[test],
        carved_test=test,
    )


def split_train_val(
    y: np.ndarray, val_fraction: float, seed: int, max_train: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train/validation indices into the training split (optionally subsampled first)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    try:
        if max_train and max_train < len(y):
            idx, _ = train_test_split(idx, train_size=max_train, stratify=y, random_state=seed)
        tr, va = train_test_split(idx, test_size=val_fraction, stratify=y[idx], random_state=seed)
    except ValueError as e:
        raise UserError(
            f"cannot carve a stratified validation split ({e}); add images or change data.val_fraction"
        ) from None
    return np.sort(tr), np.sort(va)


def duplicates(splits: dict[str, np.ndarray]) -> dict[str, int]:
    """For each pair of splits (``{"train": x, "val": x, "test": x}``, in that order): how many images of the
    second are exact copies (the same bytes) of an image in the first."""
    digests = {s: [hashlib.blake2b(img.tobytes(), digest_size=16).digest() for img in x] for s, x in splits.items()}
    seen = {s: set(d) for s, d in digests.items()}
    names = list(splits)
    return {f"{a}/{b}": sum(h in seen[a] for h in digests[b]) for i, a in enumerate(names) for b in names[i + 1 :]}


def duplicate_warning(counts: dict[str, int], sizes: dict[str, int]) -> dict | None:
    """A warning (``kind``, ``duplicates``, ``message``) when :func:`duplicates` found any, else None."""
    found = [(pair.split("/"), n) for pair, n in counts.items() if n]
    if not found:
        return None
    parts = [f"{n} of the {sizes[b]} {SPLITS[b]} images also in the {SPLITS[a]} split" for (a, b), n in found]
    return {
        "kind": "duplicates",
        "duplicates": counts,
        "message": f"exact copies across the splits (the same pixels after resizing): {'; '.join(parts)}. A model "
        "is scored on images it learned from, so those accuracies are optimistic (a known trap with "
        "inspection images); remove the copies, or keep each item's images in one split",
    }


def check_classes(model_classes: list[str], names: list[str] | None, labels: np.ndarray | None = None) -> None:
    """A clear error when data's classes (its ``names``; None for data that numbers them only) or its ``labels``
    do not fit a model's classes."""
    k, model_classes = len(model_classes), list(model_classes)
    if names is not None and list(names) != model_classes:
        if sorted(names) == sorted(model_classes):
            raise UserError(
                f"the data has the model's classes in another order (data: {short_list(names)}; model: "
                f"{short_list(model_classes)}); relabel the data in the model's order"
            )
        raise UserError(
            f"the data's {len(names)} classes are not the model's {k}: the data has {short_list(names)}, the model "
            f"{short_list(model_classes)} (not in the model: {short_list([c for c in names if c not in model_classes])}; "
            f"not in the data: {short_list([c for c in model_classes if c not in names])}); use data with the "
            "model's classes"
        )
    if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise UserError(
            f"the data's labels run {labels.min()}..{labels.max()}, but the model has {k} classes "
            f"(labels 0..{k - 1}: {short_list(model_classes)})"
        )


def short_list(items: list[str], n: int = 12) -> str:
    """Up to ``n`` items, comma-separated, and how many there are in all when there are more."""
    return (
        ", ".join(map(str, items[:n])) + (f", ... ({len(items)} in all)" if len(items) > n else "") if items else "none"
    )
