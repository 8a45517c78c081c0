"""All phases in order, each skipped when its artifacts are already in the run directory (resumable)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from . import (
    bundle,
    cluster,
    config,
    data,
    devices,
    evaluate,
    latency,
    models,
    pool,
    quantize,
    report,
    select,
    selective,
    store,
    train,
)
from .errors import UserError
from .preprocess import InputSteps, Preprocessing
from .store import PARENT, model_dir
from .vote import accuracy, decide, vote


def prepare(run_dir: Path, cfg: dict) -> None:
    """Record the config, the split indices, the input steps and the preprocessing fitted on the training split;
    warn in ``dataset.json`` about images copied across the splits."""
    saved = run_dir / "config.yaml"
    if saved.exists():
        changed = config.differences(config.load(saved), cfg)
        if changed:
            raise UserError(
                f"'{run_dir}' holds a run with a different config ({'; '.join(changed)}, from that run's "
                "to this one); use another output directory (or delete it to start over)"
            )
        if (run_dir / "preprocess.json").exists():
            return
    ds = data.load(cfg["data"])
    run_dir.mkdir(parents=True, exist_ok=True)
    tr, va = data.split_train_val(ds.y_train, cfg["data"]["val_fraction"], cfg["seed"], cfg["data"]["max_train"])
    carved = {} if ds.carved_test is None else {"carved_test": ds.carved_test}
    store.write_npz(run_dir / "splits.npz", train=tr, val=va, test=np.arange(len(ds.y_test)), **carved)
    split = {"train": ds.x_train[tr], "val": ds.x_train[va], "test": ds.x_test}
    copies = data.duplicates(split)
    warning = data.duplicate_warning(copies, {k: len(v) for k, v in split.items()})
    store.write_json(
        run_dir / "dataset.json",
        {
            "name": ds.name,
            "classes": ds.classes,
            "image_shape": ds.image_shape,
            "n_train": len(tr),
            "n_val": len(va),
            "n_test": len(ds.y_test),
            "input_steps": InputSteps.from_config(cfg["data"]).to_dict(),
            "test_split": "given"
            if ds.carved_test is None
            else f"carved: {cfg['data']['test_fraction']:g} of the source, stratified, seed {data.TEST_SEED}",
            "duplicates": copies,
            "warnings": [warning] if warning else [],
        },
    )
    store.write_bytes(saved, config.yaml_text(cfg).encode())
    store.write_json(run_dir / "preprocess.json", Preprocessing.fit(ds.x_train[tr], ds.scale).to_dict())


def baseline(run_dir: Path, cfg: dict, progress: bool = True) -> dict:
    """Train the baseline (or load the given weights); writes ``baseline/model.pt`` and ``model.json`` last.
    A killed training resumes from ``baseline/checkpoint.pt`` (its last finished epoch)."""
    out = run_dir / "baseline"
    if (out / "model.json").exists():
        return store.read_json(out / "model.json")
    info = store.read_json(run_dir / "dataset.json")
    shape, k = tuple(info["image_shape"]), len(info["classes"])
    m = cfg["model"]
    torch.manual_seed(cfg["seed"])
    model = models.build(m["arch"], shape, k, **m["kwargs"])
    x, y = store.tensors(run_dir, "train")
    x_val, y_val = store.tensors(run_dir, "val")
    history: list[dict] = []
    if m["weights"]:
        models.load_weights(model, m["weights"])
    else:
        history = train.fit(
            model,
            x,
            y,
            train.TrainSettings(**cfg["train"]),
            seed=cfg["seed"],
            device=cfg["device"],
            augment=train.augment_kind(cfg["train"]["augment"], shape),
            x_val=x_val,
            y_val=y_val,
            after_step=pool.SnapshotSaver(model, out, cfg["pool"]["snapshots"]),
            checkpoint=out / "checkpoint.pt",
            desc="baseline",
            progress=progress,
        )
    model.cpu()
    out.mkdir(parents=True, exist_ok=True)
    store.write_state(out / "model.pt", model.state_dict())
    record = {
        "arch": m["arch"],
        "kwargs": m["kwargs"],
        "image_shape": shape,
        "num_classes": k,
        "val_acc_fp32": accuracy(train.predict_proba(model, x_val), y_val.numpy()),
        "history": history,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrained": bool(m["weights"]),
        "snapshots": cfg["pool"]["snapshots"],
    }
    store.write_json(out / "model.json", record)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    return record


def choose(run_dir: Path, cfg: dict, members: list[dict], quant: dict[str, dict]) -> dict:
    """Cluster the members that passed the int8 gate and the gate against the parent (:func:`parent_gate`), select
    the voters, and decide what ships (:func:`shipped_model`); writes ``selection.json``. The parent's record,
    ``baseline``, is read from the run where ``quant`` lacks it.

    ``cluster.k: auto`` takes the k in 1..k_max whose selected ensemble (the configured strategy and vote)
    is the most accurate on validation, ties to the smaller k; ``silhouette`` the best-separated clustering.
    With ``deploy.devices``, only members that fit a device are selected, each gets a device it fits
    (:func:`select.assign`), and k is at most the number of devices.
    """
    path = run_dir / "selection.json"
    fleet = devices.load(cfg["deploy"]["devices"]) if cfg["deploy"]["devices"] else None
    if path.exists():
        sel = store.read_json(path)
        if (sel.get("devices") or {}).get("devices") != (fleet and devices.record(fleet)):
            raise UserError(
                f"'{path}' was selected for other devices than deploy.devices now lists; delete it, "
                "bundle/ and metrics.json to select again (or use another output directory)"
            )
        return sel
    quant = with_parent(run_dir, quant)
    passed = [m["name"] for m in members if quant[m["name"]]["status"] == "ok"]
    if not passed:
        raise UserError(
            "every pool member failed the int8 gate; see pool/*/quant.json, and raise quantize.max_drop "
            "or lower pool.sparsity"
        )
    names, gate = parent_gate(quant, passed, cfg["select"]["max_below_parent"])
    proba = np.stack([np.load(run_dir / "pool" / n / "val_proba.npy") for n in names])
    _, y_val = store.split(run_dir, "val")
    c, strategy, gap, rule = (
        cfg["cluster"],
        cfg["select"]["strategy"],
        cfg["select"]["max_acc_gap"],
        cfg["vote"]["rule"],
    )
    weights = np.array([quant[n]["val_acc_int8"] for n in names]) if cfg["vote"]["weighted"] else None
    k_max, fits, placed = c["k_max"], None, None
    if fleet:
        fits, placed = fit_devices(run_dir, cfg, fleet, names, quant)
        k_max = min(k_max, len(fleet))
        if isinstance(c["k"], int) and c["k"] > len(fleet):
            raise UserError(
                f"config key 'cluster.k' is {c['k']}, but the devices file '{cfg['deploy']['devices']}' lists "
                f"{len(fleet)} devices and each runs one member; lower cluster.k or use cluster.k: auto"
            )
    picks = select.sweep(proba, y_val, c["method"], rule, cfg["seed"], k_max, gap, fits)
    curve = select.curve(proba, y_val, picks[strategy], rule, weights)
    k = select.best_k(curve) if c["k"] == "auto" else c["k"] if c["k"] == "silhouette" else min(c["k"], len(names))
    result = cluster.cluster(proba, c["method"], k, k_max, cfg["seed"])
    kw = {"method": c["method"], "rule": rule, "seed": cfg["seed"], "max_acc_gap": gap}
    chosen = {s: select.select(s, proba, y_val, result["labels"], **kw, fits=fits) for s in select.STRATEGIES}
    record = {
        "candidates": names,
        "dropped": [m["name"] for m in members if m["name"] not in passed],
        "parent_gate": gate,
        "clustering": result,
        "strategy": strategy,
        "selected": [names[i] for i in chosen[strategy]],
        "strategies": {s: [names[i] for i in idx] for s, idx in chosen.items()},
        "k_choice": {
            "by": c["k"] if isinstance(c["k"], str) else "config",
            "k": result["k_requested"],
            "curve": [{**p, "members": [names[i] for i in p["members"]]} for p in curve],
        },
        "skipped_clusters": select.skipped(
            proba, y_val, result["labels"], gap, names, None if fits is None else fits.any(1)
        ),
        "sweep": {s: [[names[i] for i in idx] for idx in ks] for s, ks in picks.items()},
    }
    if fleet:
        slots = select.slots(strategy, proba, y_val, result["labels"], **kw, fits=fits)
        where = select.assign(slots, fits)
        on = {d: names[m] for m, d in where.items()}
        placed |= {
            "assignment": {dev.name: on.get(d) for d, dev in enumerate(fleet)},
            "idle": [dev.name for d, dev in enumerate(fleet) if d not in on],
            "unplaced": [
                {
                    "cluster": int(result["labels"][s[0]]),
                    "members": [names[i] for i in s],
                    "reason": "no device left that fits one of them (each device runs one member)",
                }
                for s in slots
                if not set(s) & set(where)
            ],
        }
        record["devices"] = placed
    record["shipped"] = shipped_model(cfg, record, proba, y_val, quant, fits)
    store.write_json(path, record)
    return record


def with_parent(run_dir: Path, quant: dict[str, dict]) -> dict[str, dict]:
    """The quantisation records with the parent's (``baseline``), read from the run where ``quant`` lacks it."""
    return quant if PARENT in quant else {**quant, PARENT: store.read_json(run_dir / "baseline" / "quant.json")}


def parent_gate(quant: dict[str, dict], names: list[str], margin: float) -> tuple[list[str], dict]:
    """The members of ``names`` whose int8 validation accuracy is at most ``margin`` (``select.max_below_parent``)
    below the parent's fp32 one, and the gate's record: the parent's accuracy and each member left out, with how
    far below it is. Where every member is further below, the best one is kept anyway (``kept_anyway``), so that
    there is an ensemble to weigh against the parent (which the fallback will then ship, when it is on)."""
    ref = quant[PARENT]["val_acc_fp32"]
    below = [
        {"name": n, "val_acc_int8": quant[n]["val_acc_int8"], "below_by": ref - quant[n]["val_acc_int8"]}
        for n in names
        if quant[n]["val_acc_int8"] < ref - margin - 1e-12  # no rounding error may drop a member at the margin
    ]
    out = {b["name"] for b in below}
    kept = [n for n in names if n not in out]
    anyway = None if kept else max(names, key=lambda n: (quant[n]["val_acc_int8"], -names.index(n)))
    return kept or [anyway], {"parent_val_acc_fp32": ref, "margin": margin, "below": below, "kept_anyway": anyway}


FALLBACK_P = 0.05  # a member replaces the ensemble only where it is better on validation at this significance


def shipped_model(
    cfg: dict, sel: dict, proba: np.ndarray, y_val: np.ndarray, quant: dict[str, dict], fits: np.ndarray | None
) -> dict:
    """What the bundle ships, decided on validation: the selected ensemble, or, with ``select.fallback``, one model
    that is more accurate than it and fits a device of ``deploy.devices``: the int8 parent wherever it is, a member
    only where its lead over the ensemble is significant (one-sided sign test on the validation images the two
    disagree on, ``evaluate.mcnemar``, p < ``FALLBACK_P``): the best of many members beats the ensemble on a small validation split by
    chance alone. Between single models: the more accurate, then the fewer shipped bytes. Returns ``kind``
    (``ensemble``; ``member``: one member; ``parent``), ``members``, ``val_acc``, ``fallback``, ``reason`` and, with
    devices and one model shipped, its ``assignment``."""
    names, chosen = sel["candidates"], [sel["candidates"].index(n) for n in sel["selected"]]
    weights = np.array([quant[n]["val_acc_int8"] for n in names]) if cfg["vote"]["weighted"] else None
    ens = vote(proba[chosen], cfg["vote"]["rule"], None if weights is None else weights[chosen])
    ens_acc = accuracy(ens, y_val)
    placed = sel.get("devices")
    usable = [n for i, n in enumerate(names) if fits is None or fits[i].any()]
    usable += [PARENT] if placed is None or placed["parent"]["fits"] else []
    lead = {  # one-sided: that the member alone is right more often than the ensemble
        n: evaluate.mcnemar(y_val, proba[names.index(n)].argmax(1), ens.argmax(1), "greater")
        for n in usable
        if n != PARENT
    }
    beats = [n for n in usable if quant[n]["val_acc_int8"] > ens_acc and (n == PARENT or lead[n] < FALLBACK_P)]
    best = max(usable, key=lambda n: single_rank(quant, n))
    fallback = cfg["select"]["fallback"]
    out = {"kind": "ensemble" if len(chosen) > 1 else "member", "members": sel["selected"], "val_acc": ens_acc}
    if beats and fallback:
        best = max(beats, key=lambda n: single_rank(quant, n))
        out = {
            "kind": "parent" if best == PARENT else "member",
            "members": [best],
            "val_acc": quant[best]["val_acc_int8"],
        }
    out["fallback"] = fallback
    out["reason"] = _ship_reason(sel, quant, usable, best, ens_acc, lead, bool(beats), fallback)
    if placed and out["kind"] != "ensemble":
        out["assignment"] = single_assignment(placed, out["members"][0])
    return out


def single_rank(quant: dict[str, dict], name: str) -> tuple:
    """How single models rank against each other: the more accurate on validation, then the fewer shipped bytes,
    then the parent."""
    return quant[name]["val_acc_int8"], -quant[name]["bytes"]["shipped"], name == PARENT


def _ship_reason(
    sel: dict,
    quant: dict[str, dict],
    usable: list[str],
    best: str,
    ens_acc: float,
    lead: dict[str, float],
    beaten: bool,
    fallback: bool,
) -> str:
    """Why :func:`shipped_model` ships what it ships, with the validation accuracies that decided it."""
    k = len(sel["selected"])
    what = (
        f"the selected ensemble ({sel['strategy']}, {k} members)"
        if k > 1
        else f"the selected member {sel['selected'][0]} (the selection kept one)"
    )
    fit = " that fits a device" if sel.get("devices") else ""
    if sel.get("devices") and PARENT not in usable:
        fit += " (the int8 parent fits none)"
    pct = {n: f"{100 * quant[n]['val_acc_int8']:.2f}%" for n in usable}

    def who(n: str) -> str:
        return "the int8 parent" if n == PARENT else f"member {n}"

    versus = f"{pct[best]} vs {100 * ens_acc:.2f}% on validation"
    if beaten and fallback:
        return (
            f"{who(best)} alone beats {what}: {versus}"
            + ("" if best == PARENT else f" (sign test p = {lead[best]:.2g})")
            + f"; it is the most accurate single model{fit} (select.fallback: true; false ships the selection)"
        )
    if beaten:
        return f"select.fallback is false, so {what} ships although {who(best)} alone beats it: {versus}"
    if quant[best]["val_acc_int8"] > ens_acc:  # a member ahead by chance: the best of many on a small split
        return (
            f"{what} ships: {who(best)} alone scores {versus}, a lead within chance for the best of "
            f"{len(lead)} members (sign test p = {lead[best]:.2g}, needs < {FALLBACK_P:g})"
        )
    others = [n for n in usable if n not in sel["selected"] and n != PARENT]
    rivals = ([PARENT] if PARENT in usable else []) + (
        [max(others, key=lambda n: single_rank(quant, n))] if others else []
    )
    text = "; ".join(f"{who(n) if n == PARENT else 'the best other member, ' + n}: {pct[n]}" for n in rivals)
    return f"{what} is at least as accurate on validation ({100 * ens_acc:.2f}%) as any single model{fit}" + (
        f" ({text})" if text else ""
    )


def single_assignment(placed: dict, name: str) -> dict[str, str | None]:
    """Device -> model when one model ships: the device the selection gave it, else the first it fits."""
    at = next((d for d, m in placed["assignment"].items() if m == name), None)
    fit = placed["parent"]["fits"] if name == PARENT else placed["members"][name]["fits"]
    at = at or fit[0]
    return {d: (name if d == at else None) for d in placed["assignment"]}


def abstain_threshold(run_dir: Path, cfg: dict, chosen: list[str], quant: dict[str, dict]) -> dict | None:
    """The ensemble's default abstain threshold for ``vote.target_accuracy``, chosen on validation only (the chosen
    members' int8 validation probabilities and labels); None when the config sets no target."""
    target = cfg["vote"]["target_accuracy"]
    if target is None:
        return None
    _, y_val = store.split(run_dir, "val")
    proba = np.stack([np.load(model_dir(run_dir, n) / "val_proba.npy") for n in chosen])
    weights = np.array([quant[n]["val_acc_int8"] for n in chosen]) if cfg["vote"]["weighted"] else None
    d = decide(proba, cfg["vote"]["rule"], weights)
    return selective.choose_threshold(d.margin, d.classes == y_val, target)


def fit_devices(
    run_dir: Path, cfg: dict, fleet: list[devices.Device], names: list[str], quant: dict[str, dict]
) -> tuple[np.ndarray, dict]:
    """Which of the members ``names`` fit which device (shipped bytes; int8 latency at batch 1 where a device has a
    latency budget), and the record of it for ``selection.json``, with which devices the int8 parent fits."""
    sizes = {n: quant[n]["bytes"]["shipped"] for n in [*names, PARENT]}
    ms, runs = None, cfg["bundle"]["latency_runs"]
    if any(dev.latency_ms is not None for dev in fleet):
        x_val = store.tensors(run_dir, "val")[0][:runs].numpy()
        ms = {n: latency.measure(model_dir(run_dir, n) / "int8.onnx", x_val, runs) for n in sizes}
    fits, ruled_out = devices.fit(fleet, {n: sizes[n] for n in names}, ms)
    parent, parent_out = devices.budgets(fleet, {PARENT: sizes[PARENT]}, ms)
    return fits, {
        "devices": devices.record(fleet),
        "latency": None if ms is None else latency.describe(runs) | {"model": "int8.onnx"},
        "members": {
            n: {
                "shipped_bytes": sizes[n],
                "latency_ms": None if ms is None else round(ms[n], 4),
                "fits": [dev.name for d, dev in enumerate(fleet) if fits[i, d]],
            }
            for i, n in enumerate(names)
        },
        "ruled_out": ruled_out,
        "unfit": [n for i, n in enumerate(names) if not fits[i].any()],
        "parent": {
            "shipped_bytes": sizes[PARENT],
            "latency_ms": None if ms is None else round(ms[PARENT], 4),
            "fits": [dev.name for d, dev in enumerate(fleet) if parent[0, d]],
            "ruled_out": parent_out,
        },
    }


def make_bundle(run_dir: Path, cfg: dict, selection: dict, members: list[dict], quant: dict[str, dict]) -> dict:
    """Write ``bundle/`` with the shipped int8 models (the selected members, or the one model the fallback chose:
    the parent ships as the bundle's one member, ``baseline``), the default abstain threshold and latencies."""
    if (run_dir / "bundle" / "manifest.json").exists():
        return bundle.read_manifest(run_dir / "bundle")
    info, quant = store.read_json(run_dir / "dataset.json"), with_parent(run_dir, quant)
    shipped = selection.get("shipped") or {"members": selection["selected"]}  # (selection.json before the fallback)
    sparsity = {m["name"]: (m["sparsity"], m["measured_sparsity"]["overall"]) for m in members}
    if PARENT in shipped["members"]:
        sparsity[PARENT] = (0.0, models.sparsity(store.load_baseline(run_dir))["overall"])
    labels = dict(zip(selection["candidates"], selection["clustering"]["labels"]))
    assignment = shipped.get("assignment") or (selection.get("devices") or {}).get("assignment", {})
    device = {m: d for d, m in assignment.items() if m}
    runs = cfg["bundle"]["latency_runs"]
    x_val = store.tensors(run_dir, "val")[0][:runs].numpy()
    entries = [
        {
            "id": n,
            "shipped": model_dir(run_dir, n) / quantize.SHIPPED,
            "weight": quant[n]["val_acc_int8"],
            "gzip_bytes": quant[n]["bytes"]["int8_gzip"],
            "sparsity_target": sparsity[n][0],
            "sparsity": sparsity[n][1],
            "val_acc": quant[n]["val_acc_int8"],
            "cluster": labels.get(n),
            "latency_ms": latency.measure(model_dir(run_dir, n) / "int8.onnx", x_val, runs),
        }
        | ({"device": device[n]} if n in device else {})
        for n in shipped["members"]
    ]
    timing = latency.describe(runs) | {
        f"baseline_{kind}_ms": latency.measure(run_dir / "baseline" / f"{kind}.onnx", x_val, runs)
        for kind in ("fp32", "int8")
    }
    return bundle.write(
        run_dir / "bundle",
        entries,
        store.preprocessing(run_dir),
        tuple(info["image_shape"]),
        info["classes"],
        cfg["vote"]["rule"],
        cfg["vote"]["weighted"],
        InputSteps.from_dict(info.get("input_steps")),
        abstain_threshold(run_dir, cfg, shipped["members"], quant),
        timing,
    )


def done_before(run_dir: Path, name: str) -> float:
    """Seconds an interrupted earlier attempt already spent on a phase that now resumes (baseline epochs, pool
    members), so that ``timings.json`` holds the whole phase, not only its resumed part."""
    if name == "baseline" and (run_dir / "baseline" / "checkpoint.pt").exists():
        history = torch.load(run_dir / "baseline" / "checkpoint.pt", map_location="cpu", weights_only=False)["history"]
        return history[-1]["seconds"] if history else 0.0
    if name == "pool":  # finished members, and the saved epochs of a member that was killed while it trained
        return sum(store.read_json(f)["seconds"] for f in (run_dir / "pool").glob("*/member.json")) + sum(
            pool.checkpoint_seconds(f) for f in (run_dir / "pool").glob("*/checkpoint.pt")
        )
    return 0.0


def run(cfg: dict, run_dir: Path | str, progress: bool = True) -> dict:
    """Run (or resume) every phase; returns the metrics also written to ``metrics.json``."""
    run_dir = Path(run_dir)
    timings = store.read_json(run_dir / "timings.json") if (run_dir / "timings.json").exists() else {}
    # CPU seconds of this process per phase: the cost of a phase free of what else the machine runs (with one
    # worker; a phase resumed after a kill counts only its resumed part)
    cpu = store.read_json(run_dir / "cpu_seconds.json") if (run_dir / "cpu_seconds.json").exists() else {}

    def phase(name: str, fn, *args):
        t0 = time.perf_counter() - (0.0 if name in timings else done_before(run_dir, name))
        c0 = time.process_time()
        out = fn(*args)
        if name not in timings:
            timings[name] = time.perf_counter() - t0
            cpu[name] = time.process_time() - c0
            store.write_json(run_dir / "cpu_seconds.json", cpu)
            store.write_json(run_dir / "timings.json", timings)
        return out

    # made before any phase: executor: ray where Ray is not installed fails now, not after the baseline
    executor = pool.make_executor(cfg["workers"], cfg["ray"] if cfg["executor"] == "ray" else None)
    if cfg["deploy"]["devices"]:
        devices.load(cfg["deploy"]["devices"])  # a bad devices file fails now, not after training
    phase("prepare", prepare, run_dir, cfg)
    phase("baseline", baseline, run_dir, cfg, progress)
    with executor as ex:
        members = phase("pool", pool.build, run_dir, cfg, ex, progress)
    quant = phase("quantize", quantize.quantize_all, run_dir, cfg, members, progress)
    selection = phase("select", choose, run_dir, cfg, members, quant)
    phase("bundle", make_bundle, run_dir, cfg, selection, members, quant)
    metrics = phase("evaluate", evaluate.evaluate_run, run_dir, cfg, timings)
    phase("report", report.write, run_dir)
    return metrics
