"""The run directory as an artifact store: atomic writes, hashes, the data splits a run recorded, and its baseline."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import UserError

if TYPE_CHECKING:
    import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


# The run directory's layout, the one place its names are spelled: a run's files, then the files in a model's folder
# (the parent's BASELINE/, each member's POOL/<name>/; :func:`model_dir`).
CONFIG, DATASET, SPLITS, PREPROCESS = "config.yaml", "dataset.json", "splits.npz", "preprocess.json"
TIMINGS, CPU_SECONDS, SELECTION, METRICS = "timings.json", "cpu_seconds.json", "selection.json", "metrics.json"
TEST, TEST_SCORES, REPORT, FIGURES = "test.npz", "test_scores.npz", "report.html", "figures"
BASELINE, POOL, BUNDLE, MANIFEST = "baseline", "pool", "bundle", "manifest.json"  # BUNDLE/MANIFEST: the bundle's
CYCLICAL = "cyclical.pt"  # in POOL/: the checkpoint of a cyclical pool's one run
PARENT_RECORD, MEMBER_RECORD, WEIGHTS, CHECKPOINT = "model.json", "member.json", "model.pt", "checkpoint.pt"
QUANT, VAL_PROBA, FP32, INT8 = "quant.json", "val_proba.npy", "fp32.onnx", "int8.onnx"
SNAPSHOT = "snapshot{}.pt"  # in BASELINE/: the parent's training snapshot i
PARENT = "baseline"  # the parent's name where it stands beside the members (its int8 model is in baseline/)


def model_dir(run_dir: Path, name: str) -> Path:
    """Where a model's int8 files are: ``baseline/`` for the parent, ``pool/<name>/`` for a member."""
    return Path(run_dir) / BASELINE if name == PARENT else Path(run_dir) / POOL / name


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that a crash leaves either the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # the mode open() would give, not mkstemp's owner-only 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=2, default=_jsonable).encode())


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def state_bytes(state: dict) -> bytes:
    """A torch state_dict as the bytes ``torch.save`` writes."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def write_state(path: Path, state: dict) -> None:
    """A torch state_dict, written atomically."""
    write_bytes(path, state_bytes(state))


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes(path, buf.getvalue())


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def grid_bits(weight_bits: float | None, largest_layer_bits: float | None = None) -> tuple[float, float]:
    """The weight grid of a model: its bits and its largest layer's. 0 or None means 8: post-training int8 (no
    quantisation-aware training), or a record from before QAT existed."""
    bits = weight_bits or 8
    return bits, largest_layer_bits or bits


def gzip_size(path: Path) -> int:
    """Bytes of the file after gzip at level 9 (what unstructured sparsity saves on the wire and on flash)."""
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=9, mtime=0))


@functools.lru_cache(maxsize=1)
def dataset(run_dir: str):
    """The dataset a run's recorded config names (loaded once per process)."""
    from . import config, data

    ds = data.load(config.load(Path(run_dir) / CONFIG).data.model_dump())
    splits = Path(run_dir) / SPLITS
    if (
        ds.carved_test is not None
        and splits.exists()
        and not np.array_equal(np.load(splits)["carved_test"], ds.carved_test)
    ):
        raise UserError(
            f"the test split carved from the data now differs from the one '{run_dir}' recorded in "
            "splits.npz (the data or scikit-learn changed); start a new run directory"
        )
    return ds


def split(run_dir: str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw images and labels of a recorded split (``train``, ``val`` or ``test``) of a run."""
    ds = dataset(str(run_dir))
    if name == "test":
        return ds.x_test, ds.y_test
    idx = np.load(Path(run_dir) / SPLITS)[name]
    return ds.x_train[idx], ds.y_train[idx]


def preprocessing(run_dir: str | Path):
    """The run's fitted :class:`Preprocessing` (from the training split)."""
    from .runtime.preprocess import Preprocessing

    return Preprocessing.from_dict(read_json(Path(run_dir) / PREPROCESS))


def tensors(run_dir: str | Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A recorded split of the run, preprocessed, as (NCHW float32, int64) tensors."""
    import torch

    x, y = split(run_dir, name)
    return torch.from_numpy(preprocessing(run_dir).apply(x)), torch.from_numpy(y)


def load_baseline(run_dir: str | Path, source: int = 0) -> torch.nn.Module:
    """The baseline network (``source`` 0 or the last snapshot), or its training snapshot ``source``."""
    import torch

    from . import models

    run_dir = Path(run_dir)
    record = read_json(run_dir / BASELINE / PARENT_RECORD)
    model = models.build(record["arch"], tuple(record["image_shape"]), record["num_classes"], **record["kwargs"])
    snap = run_dir / BASELINE / SNAPSHOT.format(source)
    path = snap if source and snap.exists() else run_dir / BASELINE / WEIGHTS
    if source and not snap.exists() and source != record.get("snapshots", 0):
        raise UserError(
            f"baseline snapshot '{snap}' is missing; delete '{run_dir / 'baseline'}' to retrain the baseline "
            "with pool.snapshots set"
        )
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def load_member(run_dir: str | Path, name: str) -> torch.nn.Module:
    """A trained pool member (its own ``model_kwargs`` when it is a wider or narrower fresh student; its own layer
    widths when channel-pruned)."""
    import torch

    from . import models
    from .records import read_member  # records reads and writes through this module

    run_dir = Path(run_dir)
    base = read_json(run_dir / BASELINE / PARENT_RECORD)
    kwargs = {**base["kwargs"], **read_member(run_dir, name).model_kwargs}
    model = models.build(base["arch"], tuple(base["image_shape"]), base["num_classes"], **kwargs)
    return models.shaped_like(model, torch.load(run_dir / POOL / name / WEIGHTS, map_location="cpu", weights_only=True))
