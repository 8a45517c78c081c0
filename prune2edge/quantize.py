"""Phase 2: export to ONNX and full-integer static post-training quantisation with ONNX Runtime.

Weights become per-channel symmetric int8, activations uint8, calibrated on training images with the inference
preprocessing; the model is standard ONNX in QDQ form (:mod:`prune2edge.qdq`), so ONNX Runtime, OpenVINO and the
ONNX reference evaluator all run it. With ``codebook_bits`` a member's
int8 weights then share a few values per layer (weight sharing, Han et al. 2016, "Deep Compression").
Members trained with low-bit QAT keep exactly their trained weights (:mod:`prune2edge.qat`).
Every model is gated on validation data as it will run: int8 accuracy against fp32, and fp32/int8
agreement. A model that fails is retried with other calibration settings, then dropped, and the record
says so. Each model is also written as it is shipped (``int8.p2e``, see :func:`encode`).
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import lzma
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from onnx import version_converter
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from tqdm.auto import tqdm

from . import qat, qdq, store
from .qdq import int8_weights
from .records import Member, Quantised, Sizes, read_quantised, write_quantised
from .runtime.bundle import decode, predict_proba, session
from .runtime.vote import accuracy

# tried in order until one passes the gate
ATTEMPTS = (
    {"calibration": "minmax", "reduce_range": False},
    {"calibration": "percentile", "reduce_range": False},
    {"calibration": "minmax", "reduce_range": True},
)
METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
# symmetric int8 weights (zero point 0: codebooks and QAT grids keep 0 exact), asymmetric uint8 activations
QDQ_OPTIONS = {"WeightSymmetric": True, "ActivationSymmetric": False}
SHIPPED = "int8.p2e"

if TYPE_CHECKING:
    from .config import Config


def export_onnx(model: torch.nn.Module, path: Path, image_shape: tuple[int, int, int]) -> None:
    """fp32 ONNX with input ``input`` [N, C, H, W] and output ``logits``; batch-norm folded into convolutions."""
    h, w, c = image_shape
    model = model.cpu().eval()
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, c, h, w),),
            str(tmp),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    tmp.replace(path)


class _Calibration(CalibrationDataReader):
    def __init__(self, x: np.ndarray, batch: int = 32):
        batch = next(b for b in range(min(batch, len(x)), 0, -1) if len(x) % b == 0)  # equal batches: the percentile
        self.batches = iter([{"input": x[i : i + batch]} for i in range(0, len(x), batch)])  # collector stacks them

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def quantize_onnx(
    fp32: Path, int8: Path, calib: np.ndarray, calibration: str = "minmax", reduce_range: bool = False
) -> None:
    """Static int8 quantisation of an fp32 ONNX model to standard ONNX (QDQ, opset :data:`prune2edge.qdq.OPSET`):
    int8 per-channel weights, uint8 activations."""
    tmp = int8.with_suffix(".tmp.onnx")
    logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs advice on every call
    quantize_static(
        str(fp32),
        str(tmp),
        _Calibration(calib),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=METHODS[calibration],
        extra_options=QDQ_OPTIONS,
    )
    onnx.save(version_converter.convert_version(onnx.load(str(tmp)), qdq.OPSET), str(tmp))
    tmp.replace(int8)


def kmeans_1d(values: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """Exact k-means of sorted distinct ``values`` weighted by ``counts``, no cluster holding both signs:
    each value's cluster centre, rounded to an integer (so never 0). Dynamic programming over contiguous
    segments (1-D clusters are contiguous), O(k n^2): deterministic, no seed."""
    v, w = values.astype(np.float64), counts.astype(np.float64)
    s1, s2, sw = (np.concatenate([[0.0], np.cumsum(a)]) for a in (w * v, w * v * v, w))
    i, j = np.triu_indices(len(v))
    cost = np.full((len(v), len(v)), np.inf)  # cost[i, j]: squared error of one cluster holding values i..j
    cost[i, j] = s2[j + 1] - s2[i] - (s1[j + 1] - s1[i]) ** 2 / (sw[j + 1] - sw[i])
    cost[(v[:, None] < 0) & (v[None, :] > 0)] = np.inf
    best, starts = cost[0], []  # best[j]: least error of values 0..j in the clusters so far
    for _ in range(k - 1):
        total = np.concatenate([[np.inf], best[:-1]])[:, None] + cost  # last cluster starts at i
        starts.append(total.argmin(0))
        best = total.min(0)
    bounds = [len(v)]  # walk back from the last cluster
    for start in reversed(starts):
        bounds.append(int(start[bounds[-1] - 1]))
    bounds = [0, *reversed(bounds)]
    centres = [np.rint((s1[b] - s1[a]) / (sw[b] - sw[a])) for a, b in itertools.pairwise(bounds)]
    return np.repeat(centres, np.diff(bounds)).astype(values.dtype)


def share_weights(q: np.ndarray, bits: int) -> np.ndarray:
    """``q`` with its non-zero values snapped to at most ``2**bits - 1`` shared values (k-means centres, one
    sign each); zeros stay zeros, so the layer holds at most ``2**bits`` distinct values, 0 included."""
    nonzero = q != 0
    values, counts = np.unique(q[nonzero], return_counts=True)
    if len(values) < 2**bits:
        return q
    out = q.copy()
    out[nonzero] = kmeans_1d(values, counts, 2**bits - 1)[np.searchsorted(values, q[nonzero])]
    return out


def apply_codebooks(path: Path, bits: int) -> None:
    """Snap every int8 weight tensor of an int8 ONNX model to its own codebook of ``2**bits`` values, in place."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    if any(onnx.numpy_helper.to_array(inits[layer.weight.input[2]]).any() for layer in qdq.layers(model)):
        raise ValueError(f"'{path}' has int8 weights with a non-zero zero point; codebooks need symmetric weights")
    for t in int8_weights(model):
        t.raw_data = share_weights(np.frombuffer(t.raw_data, np.int8), bits).tobytes()
    onnx.save(model, str(path))


def compact(path: Path) -> None:
    """Give every tensor but the graph's input and output a short name, and drop node names and shape annotations,
    in place: fewer bytes as run and as shipped (QDQ names each activation three times), the same computation."""
    model = onnx.load(str(path))
    graph, names = model.graph, {}
    keep = {v.name for v in (*graph.input, *graph.output)} | {""}

    def rename(name: str) -> str:
        return name if name in keep else names.setdefault(name, f"t{len(names)}")

    for t in graph.initializer:
        t.name = rename(t.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [rename(i) for i in node.input]
        node.output[:] = [rename(o) for o in node.output]
    del graph.value_info[:]
    onnx.save(model, str(path))


def encode(onnx_bytes: bytes) -> bytes:
    """The shipped form of an int8 ONNX model; :func:`prune2edge.runtime.bundle.decode` gives back the same bytes.

    Each int8 weight tensor is cut out of the file and stored as a bitmap of its non-zeros (np.packbits)
    and, per non-zero, its index (uint8) into the tensor's sorted distinct non-zero values; then one xz
    stream (LZMA2, preset 9e, lc=0 pb=0, a dictionary the size of the data) holds a JSON header, the rest
    of the file, every bitmap, every index.

    Measured on small_cnn (width 16, stem pool; 398 KB fp32, 108 KB int8 ONNX) with weights from a CIFAR-10
    training, pruned globally by magnitude to 80 / 85 / 90 % (no fine-tuning), in KB:

                   this layout         xz -9e              bz2 -9              gzip -9 (zlib -9 the same)
    plain int8     29.1 / 23.2 / 17.1  30.6 / 24.7 / 18.4  35.0 / 28.0 / 20.6  35.4 / 28.7 / 21.2
    4-bit codes    20.5 / 16.8 / 12.9  25.1 / 20.6 / 15.6  26.7 / 22.0 / 16.9  27.6 / 23.0 / 17.4

    The layout wins: 5-7 % fewer bytes than xz (18 % with codebooks, whose few values the bitmap and index
    streams expose to the coder), 18-27 % fewer than gzip; lc=0 pb=0 beat xz's defaults by about 1 %, and
    one stream of separate bitmaps and indices beat them interleaved per tensor by 1-3 %. The bitmaps and
    indices compress to within about 3 % of their order-0 entropy; the ONNX rest (names, scales, biases)
    takes about 2.8 KB and the header 0.3-0.5 KB.
    """
    weights = int8_weights(onnx.load_from_string(onnx_bytes))
    rest, bitmaps, indices, header, cut = [], [], [], [], 0
    for t in weights:
        q = np.frombuffer(t.raw_data, np.int8)
        at = onnx_bytes.index(t.raw_data, cut)
        rest.append(onnx_bytes[cut:at])
        cut = at + q.size
        codebook = np.unique(q[q != 0])
        bitmaps.append(np.packbits(q != 0).tobytes())
        indices.append(np.searchsorted(codebook, q[q != 0]).astype(np.uint8).tobytes())
        header.append({"at": at, "size": q.size, "codebook": codebook.tolist()})
    rest.append(onnx_bytes[cut:])
    rest_bytes = b"".join(rest)
    head = json.dumps({"rest": len(rest_bytes), "weights": header}).encode()
    payload = b"".join([len(head).to_bytes(4, "little"), head, rest_bytes, *bitmaps, *indices])
    blob = lzma.compress(
        payload,
        format=lzma.FORMAT_XZ,
        check=lzma.CHECK_NONE,
        filters=[
            {
                "id": lzma.FILTER_LZMA2,
                "preset": 9 | lzma.PRESET_EXTREME,
                "dict_size": max(len(payload), 1 << 12),
                "lc": 0,
                "pb": 0,
            }
        ],
    )
    if decode(blob) != onnx_bytes:
        raise RuntimeError("encoding an int8 ONNX model did not round-trip")
    return blob


def op_counts(path: Path) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node))


def finish(int8: Path, fp32: Path, grids: set[float], codebook_bits: int) -> None:
    """The quantised model made as it ships, in place: the weights of a QAT model on their grids of ``grids`` bits,
    codebooks of ``codebook_bits`` (when not 0), compact names."""
    if grids and min(grids) < 8:
        qat.snap_onnx(int8, fp32, grids)
    if codebook_bits:
        apply_codebooks(int8, codebook_bits)
    compact(int8)


def quantize_model(
    folder: Path,
    model: torch.nn.Module,
    image_shape: tuple[int, int, int],
    calib: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    max_drop: float,
    min_agreement: float,
    codebook_bits: int = 0,
    weight_bits: float = 0,
    largest_layer_bits: float = 0,
) -> Quantised:
    """Export, quantise and gate one model in ``folder``: a model trained with ``weight_bits``-bit QAT (its largest
    layer with ``largest_layer_bits``, when not 0) keeps exactly its trained integers
    (:func:`prune2edge.qat.snap_onnx`), ``codebook_bits`` snaps int8 weights to codebooks.
    Writes fp32.onnx, int8.onnx, int8.p2e (as shipped), val_proba.npy, quant.json."""
    fp32, int8 = folder / store.FP32, folder / store.INT8
    export_onnx(model, fp32, image_shape)
    p32 = predict_proba(session(fp32), x_val)
    acc32 = accuracy(p32, y_val)
    attempts, grids = [], {b for b in (weight_bits, largest_layer_bits) if b}
    for setting in ATTEMPTS:
        quantize_onnx(fp32, int8, calib, **setting)
        finish(int8, fp32, grids, codebook_bits)
        p8 = predict_proba(session(int8), x_val)
        acc8, agree = accuracy(p8, y_val), float((p8.argmax(1) == p32.argmax(1)).mean())
        passed = acc8 >= acc32 - max_drop and agree >= min_agreement
        attempts.append({**setting, "val_acc_int8": acc8, "agreement": agree, "passed": passed})
        if passed:
            break
    store.write_bytes(folder / SHIPPED, encode(int8.read_bytes()))
    int8_model = onnx.load(str(int8))
    n_weights = sum(len(t.raw_data) for t in int8_weights(int8_model))
    record = Quantised(
        status="ok" if attempts[-1]["passed"] else "dropped",
        attempts=attempts,
        val_acc_fp32=acc32,
        val_acc_int8=attempts[-1]["val_acc_int8"],
        agreement=attempts[-1]["agreement"],
        codebook_bits=codebook_bits,
        **dict(zip(("weight_bits", "largest_layer_bits"), store.grid_bits(weight_bits, largest_layer_bits))),
        weights=n_weights,
        bits_per_weight_shipped=8 * (folder / SHIPPED).stat().st_size / n_weights,  # the whole file, per weight
        bytes=Sizes(
            fp32=fp32.stat().st_size,
            int8=int8.stat().st_size,
            fp32_gzip=store.gzip_size(fp32),
            int8_gzip=store.gzip_size(int8),
            shipped=(folder / SHIPPED).stat().st_size,
        ),
        ops=op_counts(int8),
        full_integer=qdq.full_integer(int8_model),
        **qdq.describe(int8_model),
    )
    np.save(folder / store.VAL_PROBA, p8.astype(np.float32))
    write_quantised(folder, record)
    return record


def quantize_all(run_dir: Path, cfg: Config, members: list[Member], progress: bool = True) -> dict[str, Quantised]:
    """Quantise the baseline and every pool member not yet done; returns records by name (``baseline`` first).
    Codebooks (``quantize.codebook_bits``) are for the members: the baseline stays the plain int8 reference. The
    parent as a member that trained no more (``pool.parent_qat: false``) is the baseline's int8 model, copied."""
    q = cfg.quantize
    x_train, _ = store.tensors(run_dir, "train")
    rng = np.random.default_rng([cfg.seed, 2])
    calib = x_train[rng.choice(len(x_train), min(q.calibration_size, len(x_train)), replace=False)].numpy()
    x_val, y_val = store.tensors(run_dir, "val")
    x_val, y_val = x_val.numpy(), y_val.numpy()
    image_shape = tuple(store.read_json(run_dir / store.BASELINE / store.PARENT_RECORD)["image_shape"])
    folders = {"baseline": run_dir / store.BASELINE, **{m.name: run_dir / store.POOL / m.name for m in members}}
    # a member's QAT grid, pool.weight_bits where its record has none (cyclical members, older runs)
    grids = {
        m.name: (cfg.pool.weight_bits if m.weight_bits is None else m.weight_bits, m.largest_layer_bits)
        for m in members
    }
    untouched = {m.name for m in members if m.parent and m.steps == 0 and not any(grids[m.name])}
    records = {}
    for name, folder in tqdm(folders.items(), desc="quantise", disable=not progress, unit="model"):
        if (folder / store.QUANT).exists():
            records[name] = read_quantised(folder)
            continue
        if name in untouched and not q.codebook_bits:  # the parent as it is: the baseline's int8 model, not made again
            for f in (store.FP32, store.INT8, SHIPPED, store.VAL_PROBA, store.QUANT):
                shutil.copyfile(run_dir / store.BASELINE / f, folder / f)
            records[name] = records["baseline"]
            continue
        model = store.load_baseline(run_dir) if name == "baseline" else store.load_member(run_dir, name)
        records[name] = quantize_model(
            folder,
            model,
            image_shape,
            calib,
            x_val,
            y_val,
            q.max_drop,
            q.min_agreement,
            0 if name == "baseline" else q.codebook_bits,
            *grids.get(name, (0, 0)),  # the baseline: the plain int8 reference
        )
    return records
