"""All phases in order, each skipped when its artifacts are already in the run directory (resumable)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import torch

from . import (
    config,
    cores,
    cost,
    data,
    devices,
    evaluate,
    executors,
    models,
    pool,
    qdq,
    quantize,
    records,
    report,
    select,
    selective,
    ship,
    store,
    train,
)
from .config import Config
from .errors import UserError
from .records import Member, Quantised, Selection, read_member
from .runtime import bundle, latency, runtimes
from .runtime.preprocess import InputSteps, Preprocessing
from .runtime.vote import accuracy, decide
from .store import PARENT, model_dir


def prepare(run_dir: Path, cfg: Config) -> None:
    """Record the config, the split indices, the input steps and the preprocessing fitted on the training split;
    warn in ``dataset.json`` about images copied across the splits."""
    saved = run_dir / store.CONFIG
    if saved.exists():
        changed = config.differences(config.load(saved), cfg)
        if changed:
            raise UserError(
                f"'{run_dir}' holds a run with a different config ({'; '.join(changed)}, from that run's "
                "to this one); use another output directory (or delete it to start over)"
            )
        if (run_dir / store.PREPROCESS).exists():
            return
    ds = data.load(cfg.data.model_dump())
    run_dir.mkdir(parents=True, exist_ok=True)
    tr, va = data.split_train_val(ds.y_train, cfg.data.val_fraction, cfg.seed, cfg.data.max_train)
    carved = {} if ds.carved_test is None else {"carved_test": ds.carved_test}
    store.write_npz(run_dir / store.SPLITS, train=tr, val=va, test=np.arange(len(ds.y_test)), **carved)
    split = {"train": ds.x_train[tr], "val": ds.x_train[va], "test": ds.x_test}
    copies = data.duplicates(split)
    warning = data.duplicate_warning(copies, {k: len(v) for k, v in split.items()})
    store.write_json(
        run_dir / store.DATASET,
        {
            "name": ds.name,
            "classes": ds.classes,
            "image_shape": ds.image_shape,
            "n_train": len(tr),
            "n_val": len(va),
            "n_test": len(ds.y_test),
            "input_steps": InputSteps.from_config(cfg.data.model_dump()).to_dict(),
            "test_split": "given"
            if ds.carved_test is None
            else f"carved: {cfg.data.test_fraction:g} of the source, stratified, seed {data.TEST_SEED}",
            "duplicates": copies,
            "warnings": [warning] if warning else [],
        },
    )
    store.write_bytes(saved, config.yaml_text(cfg).encode())
    store.write_json(run_dir / store.PREPROCESS, Preprocessing.fit(ds.x_train[tr], ds.scale).to_dict())


def baseline(run_dir: Path, cfg: Config, progress: bool = True) -> dict:
    """Train the baseline (or load the given weights); writes ``baseline/model.pt`` and ``model.json`` last.
    A killed training resumes from ``baseline/checkpoint.pt`` (its last finished epoch)."""
    out = run_dir / store.BASELINE
    if (out / store.PARENT_RECORD).exists():
        return store.read_json(out / store.PARENT_RECORD)
    info = store.read_json(run_dir / store.DATASET)
    shape, k = tuple(info["image_shape"]), len(info["classes"])
    m = cfg.model
    torch.manual_seed(cfg.seed)
    model = models.build(m.arch, shape, k, **m.kwargs)
    x, y = store.tensors(run_dir, "train")
    x_val, y_val = store.tensors(run_dir, "val")
    history: list[dict] = []
    if m.weights:
        models.load_weights(model, m.weights)
    else:
        history = train.fit(
            model,
            x,
            y,
            train.TrainSettings.of(cfg.train),
            seed=cfg.seed,
            device=cfg.device,
            augment=train.augment_kind(cfg.train.augment, shape),
            x_val=x_val,
            y_val=y_val,
            after_step=pool.SnapshotSaver(model, out, cfg.pool.snapshots),
            checkpoint=out / store.CHECKPOINT,
            desc="baseline",
            progress=progress,
        )
    model.cpu()
    out.mkdir(parents=True, exist_ok=True)
    store.write_state(out / store.WEIGHTS, model.state_dict())
    record = {
        "arch": m.arch,
        "kwargs": m.kwargs,
        "image_shape": shape,
        "num_classes": k,
        "val_acc_fp32": accuracy(train.predict_proba(model, x_val), y_val.numpy()),
        "history": history,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrained": bool(m.weights),
        "snapshots": cfg.pool.snapshots,
    }
    store.write_json(out / store.PARENT_RECORD, record)
    (out / store.CHECKPOINT).unlink(missing_ok=True)
    return record


def abstain_threshold(run_dir: Path, cfg: Config, chosen: list[str], quant: dict[str, Quantised]) -> dict | None:
    """The ensemble's default abstain threshold for ``vote.target_accuracy``, chosen on validation only (the chosen
    members' int8 validation probabilities and labels); None when the config sets no target."""
    target = cfg.vote.target_accuracy
    if target is None:
        return None
    _, y_val = store.split(run_dir, "val")
    proba = np.stack([np.load(model_dir(run_dir, n) / store.VAL_PROBA) for n in chosen])
    weights = ship.vote_weights(quant, chosen, cfg.vote.weighted)
    d = decide(proba, cfg.vote.rule, weights)
    return selective.choose_threshold(d.margin, d.classes == y_val, target)


def device_needs(int8: Path, x: np.ndarray) -> dict:
    """What a device needs to run an int8 model (its format, opset and operator domains) and how each runtime
    installed here runs it on the preprocessed images ``x``, against ONNX Runtime (:func:`runtimes.verify`)."""
    return qdq.describe(onnx.load(str(int8))) | {"runtimes": runtimes.verify(int8.read_bytes(), x)}


def make_bundle(
    run_dir: Path, cfg: Config, selection: Selection, members: list[Member], quant: dict[str, Quantised]
) -> dict:
    """Write ``bundle/`` with the shipped int8 models (the selected members, or the one model the fallback chose:
    the parent ships as the bundle's one member, ``baseline``), the default abstain threshold and latencies."""
    if (run_dir / store.BUNDLE / store.MANIFEST).exists():
        return bundle.read_manifest(run_dir / store.BUNDLE)
    info, quant = store.read_json(run_dir / store.DATASET), records.with_parent(run_dir, quant)
    shipped = selection.shipped
    sparsity = {m.name: (m.sparsity, m.measured_sparsity["overall"]) for m in members}
    if PARENT in shipped.members:
        sparsity[PARENT] = (0.0, models.sparsity(store.load_baseline(run_dir))["overall"])
    labels = dict(zip(selection.candidates, selection.clustering.labels))
    assignment = shipped.assignment or (selection.devices.assignment if selection.devices else {})
    device = {m: d for d, m in assignment.items() if m}
    runs = cfg.bundle.latency_runs
    x_val = store.tensors(run_dir, "val")[0][:runs].numpy()
    baseline = {
        f"baseline_{kind}_ms": run_dir / store.BASELINE / onnx
        for kind, onnx in (("fp32", store.FP32), ("int8", store.INT8))
    }
    ms = latency.measure({n: model_dir(run_dir, n) / store.INT8 for n in shipped.members} | baseline, x_val, runs)
    x_check = store.tensors(run_dir, "val")[0][: runtimes.CHECK_IMAGES].numpy()
    weights = ship.vote_weights(quant, shipped.members, cfg.vote.weighted)
    entries = [
        {
            "id": n,
            "shipped": model_dir(run_dir, n) / quantize.SHIPPED,
            "weight": 1.0 if weights is None else float(weights[i]),  # what the vote counts it as
            "gzip_bytes": quant[n].bytes.int8_gzip,
            "sparsity_target": sparsity[n][0],
            "sparsity": sparsity[n][1],
            "val_acc": quant[n].val_acc_int8,
            "cluster": labels.get(n),
            "latency_ms": ms[n],
        }
        | cost.of(model_dir(run_dir, n), x_val[0])
        | device_needs(model_dir(run_dir, n) / store.INT8, x_check)
        | ({"device": device[n]} if n in device else {})
        for i, n in enumerate(shipped.members)
    ]
    parent = cost.of(run_dir / store.BASELINE, x_val[0])
    timing = (
        latency.describe(runs)
        | {k: ms[k] for k in baseline}
        | {"cost": cost.DESCRIBE, "baseline_int8_macs": parent["macs"], "baseline_int8_memory_mb": parent["memory_mb"]}
    )
    return bundle.write(
        run_dir / store.BUNDLE,
        entries,
        store.preprocessing(run_dir),
        tuple(info["image_shape"]),
        info["classes"],
        cfg.vote.rule,
        cfg.vote.weighted,
        InputSteps.from_dict(info.get("input_steps")),
        abstain_threshold(run_dir, cfg, shipped.members, quant),
        timing,
    )


def done_before(run_dir: Path, name: str) -> tuple[float, float]:
    """Seconds, wall and CPU, an interrupted earlier attempt already spent on a phase that now resumes (baseline
    epochs, pool members), so that ``timings.json`` and ``cpu_seconds.json`` hold the whole phase, not only its
    resumed part (CPU 0 where an older version did not record it)."""
    if name == "baseline":
        return pool.checkpoint_clock(run_dir / store.BASELINE / store.CHECKPOINT)
    if name == "pool":  # finished members, and the saved epochs of a member that was killed while it trained
        done = [read_member(run_dir, f.parent.name) for f in (run_dir / store.POOL).glob(f"*/{store.MEMBER_RECORD}")]
        saved = [pool.checkpoint_clock(f) for f in (run_dir / store.POOL).glob(f"*/{store.CHECKPOINT}")]
        clocks = [(m.seconds, m.cpu_seconds or 0.0) for m in done] + saved
        return sum(w for w, _ in clocks), sum(c for _, c in clocks)
    return 0.0, 0.0


def run(cfg: Config, run_dir: Path | str, progress: bool = True) -> dict:
    """Run (or resume) every phase on the free cores (:func:`cores.free`); returns the metrics also written to
    ``metrics.json``."""
    run_dir = Path(run_dir)
    torch.set_num_threads(cores.free())
    timings = store.read_json(run_dir / store.TIMINGS) if (run_dir / store.TIMINGS).exists() else {}
    # CPU seconds of this process per phase: the cost of a phase free of what else the machine runs (with one
    # worker; a phase resumed after a kill counts the killed attempt's saved epochs and members too)
    cpu = store.read_json(run_dir / store.CPU_SECONDS) if (run_dir / store.CPU_SECONDS).exists() else {}

    def phase(name: str, fn, *args):
        wall, spent = (0.0, 0.0) if name in timings else done_before(run_dir, name)
        t0, c0 = time.perf_counter() - wall, time.process_time() - spent
        out = fn(*args)
        if name not in timings:
            timings[name] = time.perf_counter() - t0
            cpu[name] = time.process_time() - c0
            store.write_json(run_dir / store.CPU_SECONDS, cpu)
            store.write_json(run_dir / store.TIMINGS, timings)
        return out

    # made before any phase: executor: ray where Ray is not installed fails now, not after the baseline
    executor = executors.make_executor(cfg.workers, cfg.ray if cfg.executor == "ray" else None)
    if cfg.deploy.devices:
        devices.load(cfg.deploy.devices)  # a bad devices file fails now, not after training
    phase("prepare", prepare, run_dir, cfg)
    phase("baseline", baseline, run_dir, cfg, progress)
    with executor as ex:
        members = phase("pool", pool.build, run_dir, cfg, ex, progress)
    quant = phase("quantize", quantize.quantize_all, run_dir, cfg, members, progress)
    selection = phase("select", select.choose, run_dir, cfg, members, quant)
    phase("bundle", make_bundle, run_dir, cfg, selection, members, quant)
    metrics = phase("evaluate", evaluate.evaluate_run, run_dir, cfg, timings)
    phase("report", report.write, run_dir)
    return metrics
