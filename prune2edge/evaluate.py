"""The report: the test split, read once, scores the baseline, every member and every ensemble."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import binomtest

from . import data, selective, store
from .errors import UserError
from .records import Placement, Quantised, Selection, Shipped, read_member, read_quantised, read_selection
from .runtime.bundle import Bundle, predict_proba, session
from .runtime.vote import AGREEMENT, accuracy, disagreement, margin, vote
from .ship import mcnemar, vote_weights
from .store import PARENT
from .summary import kib

MAX_SUBSETS = 1000  # degradation: at most this many subsets of members per number missing (drawn when there are more)

if TYPE_CHECKING:
    from .config import Config


@dataclass(frozen=True)
class Scores:
    """Every model's int8 probabilities on validation and test (the pool members that were quantised, by name, and
    the int8 parent as ``baseline``: the bundle may ship it), their int8 records, and how the vote combines them."""

    val: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    quant: dict[str, Quantised]
    y_val: np.ndarray
    y_test: np.ndarray
    rule: str
    weighted: bool

    def vote(self, members: list[str], split: str, rule: str | None = None) -> np.ndarray:
        """The vote of ``members`` on ``split`` (``val`` or ``test``)."""
        proba = self.val if split == "val" else self.test
        weights = vote_weights(self.quant, members, self.weighted)
        return vote(np.stack([proba[n] for n in members]), rule or self.rule, weights)

    def acc(self, members: list[str], split: str, rule: str | None = None) -> float:
        return accuracy(self.vote(members, split, rule), self.y_val if split == "val" else self.y_test)

    def sizes(self, members: list[str]) -> dict:
        """The members' bytes summed, each way."""
        kinds = ("fp32", "int8", "fp32_gzip", "int8_gzip", "shipped")
        return {k: sum(getattr(self.quant[n].bytes, k) for n in members) for k in kinds}


def evaluate_run(run_dir: Path, cfg: Config, timings: dict) -> dict:
    """Score everything on the test split; writes ``metrics.json``, ``test.npz`` and ``test_scores.npz``."""
    x_test, y_test = store.split(run_dir, "test")
    x_val, y_val = store.split(run_dir, "val")
    prep = store.preprocessing(run_dir)
    sel = read_selection(run_dir)
    base_q = read_quantised(run_dir / store.BASELINE)
    base32 = predict_proba(session(run_dir / store.BASELINE / store.FP32), prep.apply(x_test))
    base32_val = predict_proba(session(run_dir / store.BASELINE / store.FP32), prep.apply(x_val))
    names = sorted(p.name for p in (run_dir / store.POOL).iterdir() if (p / store.QUANT).exists())
    s = _scores(run_dir, cfg, names, prep.apply(x_test), y_val, y_test)
    bundle = Bundle.load(run_dir / store.BUNDLE)
    shipped = sel.shipped
    ship_test = bundle.predict_proba(x_test)
    if not np.allclose(ship_test, s.vote(shipped.members, "test"), atol=1e-5):
        raise UserError(
            f"the bundle in {run_dir / 'bundle'} does not predict what the pool's int8 models vote: it was written by "
            "another run or changed since; delete bundle/ and metrics.json and run again to rebuild it"
        )
    members = _member_records(run_dir, sel, s, names)
    votes = _vote_records(s, sel, shipped, ship_test, base32)
    strategies, curves = votes.pop("strategies"), votes.pop("curves")
    metrics: dict = {
        "dataset": store.read_json(run_dir / store.DATASET),
        "baseline": _baseline_record(s, base32),
        "members": members,
        **votes,
        "pool": pool_summary(
            members,
            base_q,
            timings if not cfg.model.weights else {**timings, "baseline": None},  # a given parent: no training
            cfg.select.max_below_parent,
        ),
        "parent_gate": None if sel.parent_gate is None else asdict(sel.parent_gate),
        "strategies": strategies,
        "curves": curves,
        **_selection_records(sel),
        "timings": dict(timings),
    }
    metrics["warnings"] = pool_warnings(metrics, cfg) + selection_warnings(metrics) + device_warnings(metrics)
    metrics |= _bundle_records(cfg, s, shipped.members, ship_test, base32_val, base32, metrics, bundle.manifest)
    store.write_npz(run_dir / store.TEST, x=x_test, y=y_test)
    store.write_npz(
        run_dir / store.TEST_SCORES,
        names=np.array(names),
        members=np.stack([s.test[n] for n in names]),
        baseline_fp32=base32,
        baseline_int8=s.test[PARENT],
        ensemble=ship_test,
        selected=s.vote(sel.selected, "test"),
    )
    store.write_json(run_dir / store.METRICS, metrics)
    return metrics


def _baseline_record(s: Scores, base32: np.ndarray) -> dict:
    """The parent: its validation accuracies (fp32, int8), its test accuracies (the fp32 scores ``base32``), bytes."""
    q = s.quant[PARENT]
    return {
        "val_acc_fp32": q.val_acc_fp32,
        "val_acc_int8": q.val_acc_int8,
        "test_acc_fp32": accuracy(base32, s.y_test),
        "test_acc_int8": accuracy(s.test[PARENT], s.y_test),
        "bytes": asdict(q.bytes),
        "int8_status": q.status,
        "full_integer": q.full_integer,
    }


def _bundle_records(
    cfg: Config,
    s: Scores,
    ship: list[str],
    ship_test: np.ndarray,
    base32_val: np.ndarray,
    base32: np.ndarray,
    metrics: dict,
    manifest: dict,
) -> dict:
    """What the bundle decides and how it degrades: the shipped models ``ship`` ("ensemble" in these records and in
    test_scores.npz is the bundle's vote, whichever models it holds); its latency and cost where it measured them."""
    out = {
        "decisions": decision_metrics(
            s.vote(ship, "val"), ship_test, base32_val, base32, s.y_val, s.y_test, cfg.vote.target_accuracy
        ),
        "degradation": {
            **degradation(
                np.stack([s.test[n] for n in ship]), s.y_test, s.rule, vote_weights(s.quant, ship, s.weighted), cfg.seed
            ),
            "baseline_fp32_test_acc": metrics["baseline"]["test_acc_fp32"],
            "baseline_int8_test_acc": metrics["baseline"]["test_acc_int8"],
            "best_member": {k: best_member(metrics["members"])[k] for k in ("name", "val_acc_int8", "test_acc_int8")},
        },
    }
    if "latency" in manifest:
        out["latency"] = manifest["latency"] | {"members": {e["id"]: e["latency_ms"] for e in manifest["members"]}}
        out["cost"] = member_costs(manifest)
    return out


def _scores(
    run_dir: Path, cfg: Config, names: list[str], x_test: np.ndarray, y_val: np.ndarray, y_test: np.ndarray
) -> Scores:
    """The int8 models' probabilities (test: run here on the preprocessed ``x_test``; validation: as the quantise
    phase saved them) and records, the int8 parent's among them."""
    dirs = {n: run_dir / store.POOL / n for n in names} | {PARENT: run_dir / store.BASELINE}
    return Scores(
        val={n: np.load(d / store.VAL_PROBA) for n, d in dirs.items()},
        test={n: predict_proba(session(d / store.INT8), x_test) for n, d in dirs.items()},
        quant={n: read_quantised(d) for n, d in dirs.items()},
        y_val=y_val,
        y_test=y_test,
        rule=cfg.vote.rule,
        weighted=cfg.vote.weighted,
    )


def _member_records(run_dir: Path, sel: Selection, s: Scores, names: list[str]) -> list[dict]:
    """One record per quantised pool member: how it was made, its int8 accuracy and bytes, its cluster."""
    labels = dict(zip(sel.candidates, sel.clustering.labels))
    below = {b.name for b in sel.parent_gate.below} if sel.parent_gate else set()
    members = []
    for n in names:
        rec, q = read_member(run_dir, n), s.quant[n]
        members.append(
            {
                "name": n,
                "status": q.status,
                "below_parent": n in below,  # left out of clustering by select.max_below_parent
                "cluster": labels.get(n),
                "selected": n in sel.selected,
                "sparsity_target": rec.sparsity,
                "sparsity_measured": rec.measured_sparsity["overall"],
                "macs_vs_parent": rec.macs_vs_parent,  # channel-pruned members (pool.structure: channels)
                "val_acc_fp32": q.val_acc_fp32,
                "val_acc_int8": q.val_acc_int8,
                "test_acc_int8": accuracy(s.test[n], s.y_test),
                "bytes": asdict(q.bytes),
                "weight_bits": q.weight_bits,
                "largest_layer_bits": q.largest_layer_bits,
                "bits_per_weight_shipped": q.bits_per_weight_shipped,
                "full_integer": q.full_integer,
                "quant_attempts": q.attempts,
                "plan": {
                    k: getattr(rec, k) for k in ("seed", "epochs", "lr", "batch_size", "bootstrap", "source", "parent")
                },
                "steps": rec.steps,  # as trained (pool.min_steps); none in a run from before the floor
                "fine_tune_seconds": rec.seconds,
                "val_vs_parent_fp32": q.val_acc_int8 - s.quant[PARENT].val_acc_fp32,
            }
        )
    return members


def _vote_records(s: Scores, sel: Selection, shipped: Shipped, ship_test: np.ndarray, base32: np.ndarray) -> dict:
    """How the votes score: the whole pool's vote, the selected ensemble, what the bundle ships (its test scores:
    ``ship_test``; whether select.fallback weighed the single models, which beat the selection beyond chance), every
    strategy's pick and its k sweep, each against the fp32 parent's test scores ``base32``."""
    ok, chosen, y_test, base_pred = sel.candidates, sel.selected, s.y_test, base32.argmax(1)

    def against_parent(pred: np.ndarray) -> dict:
        return {
            "gain_vs_baseline_fp32": accuracy(pred, y_test) - accuracy(base32, y_test),
            "mcnemar_p_vs_baseline_fp32": mcnemar(y_test, base_pred, pred.argmax(1)),
        }

    ens_test = s.vote(chosen, "test")
    return {
        "pool_vote": {
            "members": len(ok),
            "val_acc": s.acc(ok, "val"),
            "test_acc": s.acc(ok, "test"),
            **_diversity(ok, s.test, y_test),
        },
        "ensemble": {  # the selected ensemble (one member, where the selection kept one); "shipped": the bundle
            "strategy": sel.strategy,
            "rule": s.rule,
            "weighted": s.weighted,
            "members": chosen,
            "k": len(chosen),
            "val_acc": s.acc(chosen, "val"),
            "test_acc": accuracy(ens_test, y_test),
            **against_parent(ens_test),
            "disagreement": disagreement(np.stack([s.test[n] for n in chosen])).tolist(),
            **_diversity(chosen, s.test, y_test),
            "bytes": s.sizes(chosen),
        },
        "shipped": {
            "kind": shipped.kind,
            "members": shipped.members,
            "val_acc": s.acc(shipped.members, "val"),
            "test_acc": accuracy(ship_test, y_test),
            **{key: getattr(shipped, key) for key in ("reason", "fallback", "beaten_by")},
            "bytes": s.sizes(shipped.members),
            **against_parent(ship_test),
        },
        "strategies": {
            name: {
                "members": ms,
                **{f"{split}_acc": {r: s.acc(ms, split, r) for r in ("soft", "hard")} for split in ("val", "test")},
                **_diversity(ms, s.test, y_test),
                "bytes": s.sizes(ms),
                "mcnemar_p_vs_baseline_fp32": mcnemar(y_test, base_pred, s.vote(ms, "test").argmax(1)),
            }
            for name, ms in sel.strategies.items()
        },
        "curves": {
            name: [
                {"k": len(ms), "clusters": i, "members": ms, "val_acc": s.acc(ms, "val"), "test_acc": s.acc(ms, "test")}
                for i, ms in enumerate(picks, 1)
            ]
            for name, picks in sel.sweep.items()
        },
    }


def _selection_records(sel: Selection) -> dict:
    """What the selection decided, as metrics.json carries it (a selection.json written before k_choice has only
    its ``by``)."""
    c = sel.k_choice
    return {
        "clustering": {k: v for k, v in asdict(sel.clustering).items() if k != "labels"},
        "k_choice": {"by": c.by}
        if c.curve is None
        else {"by": c.by, "k": c.k, "reason": c.reason, "best_val_acc": max(p.val_acc for p in c.curve)},
        "skipped_clusters": sel.skipped_clusters,
        "dropped": sel.dropped,
        # with deploy.devices: budgets, what they rule out, model -> device (as shipped)
        "devices": shipped_devices(sel.devices, sel.shipped),
    }


def decision_metrics(
    ensemble_val: np.ndarray,
    ensemble_test: np.ndarray,
    baseline_val: np.ndarray,
    baseline_test: np.ndarray,
    y_val: np.ndarray,
    y_test: np.ndarray,
    target_accuracy: float | None,
) -> dict:
    """How far the ensemble's vote margin and the baseline's own top probability can be trusted, on the test split:
    risk–coverage (``curve``, ``aurc``), expected calibration error of the top score (``ece``), and each model's
    abstain threshold for ``target_accuracy``, chosen on validation only, with its test ``coverage`` and accuracy of
    the decided frames. Arguments: the ensemble's vote scores and the baseline's probabilities, ``[N, K]``."""
    models = {
        "ensemble": ("vote margin", margin(ensemble_val), ensemble_val, margin(ensemble_test), ensemble_test),
        "baseline_fp32": ("top probability", baseline_val.max(1), baseline_val, baseline_test.max(1), baseline_test),
    }
    out: dict = {"target_accuracy": target_accuracy, "agreement": AGREEMENT, "ece_binning": selective.ECE_BINNING}
    for name, (score, s_val, p_val, s_test, p_test) in models.items():
        right = p_test.argmax(1) == y_test
        rec = {
            "score": score,
            "test_acc": float(right.mean()),
            "ece": selective.calibration_error(p_test.max(1), right),
            "aurc": selective.aurc(s_test, right),
            "curve": selective.curve_points(s_test, right),
        }
        if target_accuracy is not None:
            rec["threshold"] = selective.choose_threshold(s_val, p_val.argmax(1) == y_val, target_accuracy)
            rec["at_threshold"] = selective.operating_point(s_test, right, rec["threshold"]["abstain_below"])
        out[name] = rec
    return out


def degradation(
    members_test: np.ndarray, y_test: np.ndarray, rule: str, weights: list[float] | None, seed: int = 0
) -> dict:
    """Test accuracy of the vote with every subset of j of its k members missing, j = 0..k-1: mean, min and max over
    the subsets (:data:`MAX_SUBSETS` drawn at random, seeded, where there are more); ``below_quorum`` where fewer
    than the fleet's default quorum (a majority) would vote, so a fleet would answer ``undecided``."""
    k, quorum = len(members_test), len(members_test) // 2 + 1
    rng = np.random.default_rng([seed, 12])
    w = None if weights is None else np.asarray(weights, np.float64)
    rows = []
    for j in range(k):
        every = math.comb(k, j) <= MAX_SUBSETS
        left = (
            list(itertools.combinations(range(k), k - j))
            if every
            else [np.sort(rng.choice(k, k - j, replace=False)) for _ in range(MAX_SUBSETS)]
        )
        accs = [accuracy(vote(members_test[list(s)], rule, None if w is None else w[list(s)]), y_test) for s in left]
        rows.append(
            {
                "missing": j,
                "voting": k - j,
                "subsets": len(left),
                "every_subset": every,
                "mean": float(np.mean(accs)),
                "min": float(np.min(accs)),
                "max": float(np.max(accs)),
                "below_quorum": k - j < quorum,
            }
        )
    return {"k": k, "default_quorum": quorum, "rows": rows}


def member_costs(manifest: dict) -> dict | None:
    """Each shipped model's cost on a device (int8 latency, multiply-adds, session memory) and its ratio to the
    int8 parent's, from the manifest; None for a bundle made before multiply-adds were counted."""
    t = manifest["latency"]
    if "baseline_int8_macs" not in t:
        return None
    parent = {
        "latency_ms": t["baseline_int8_ms"],
        "macs": t["baseline_int8_macs"],
        "memory_mb": t["baseline_int8_memory_mb"],
    }
    return {
        "parent_int8": parent,
        "members": {
            e["id"]: {k: e[k] for k in parent} | {"vs_parent_int8": {k: e[k] / parent[k] for k in parent if parent[k]}}
            for e in manifest["members"]
        },
    }


def best_member(members: list[dict]) -> dict:
    """The pool member that passed the int8 gate with the best validation accuracy (the smallest of the best)."""
    ok = [x for x in members if x["status"] == "ok"]
    return min(ok, key=lambda x: (-x["val_acc_int8"], x["bytes"]["int8_gzip"], x["name"]))


def pool_summary(members: list[dict], base_q: Quantised, timings: dict, margin: float) -> dict:
    """How long the members trained and how far they recovered: steps and epochs (ranges), fine-tuning seconds
    (median), int8 validation accuracy against the parent's fp32 one (median, worst), how many are more than
    ``margin`` below it, and the pool's time against the parent's training (phase seconds of ``timings``; none
    where the parent was given, ``model.weights``)."""
    gaps = {m["name"]: m["val_vs_parent_fp32"] for m in members}
    steps = [m["steps"] for m in members if m.get("steps")]
    epochs = [m["plan"]["epochs"] for m in members]
    worst = min(gaps, key=lambda n: (gaps[n], n))
    pool_s, base_s = timings.get("pool"), timings.get("baseline")
    return {
        "members": len(members),
        "steps": [min(steps), max(steps)] if steps else None,
        "epochs": [min(epochs), max(epochs)],
        "median_seconds": float(np.median([m["fine_tune_seconds"] for m in members])),
        "parent_val_acc_fp32": base_q.val_acc_fp32,
        "median_vs_parent": float(np.median(list(gaps.values()))),
        "worst": {"name": worst, "vs_parent": gaps[worst]},
        "margin": margin,
        "below_margin": sorted(n for n, g in gaps.items() if g < -margin - 1e-12),
        "seconds": pool_s,
        "parent_seconds": base_s,
        "vs_parent_time": pool_s / base_s if pool_s and base_s else None,
    }


def pool_warnings(m: dict, cfg: Config) -> list[dict]:
    """A warning where most of the pool did not recover: more than half its members more than
    ``select.max_below_parent`` below the parent on validation; it names how many and how far below."""
    p = m["pool"]
    failed = [x for x in m["members"] if x["name"] in p["below_margin"]]
    if 2 * len(failed) <= p["members"]:
        return []
    gaps = sorted(-100 * x["val_vs_parent_fp32"] for x in failed)
    pc = cfg.pool
    return [
        {
            "kind": "pool_not_recovered",
            "members": [x["name"] for x in failed],
            "message": f"{len(failed)} of {p['members']} pool members are more than select.max_below_parent = "
            f"{100 * p['margin']:g} points below the parent on validation (int8 against the parent's "
            f"{100 * p['parent_val_acc_fp32']:.2f}% fp32: {gaps[0]:.1f} to {gaps[-1]:.1f} points below, median "
            f"{float(np.median(gaps)):.1f}): they did not recover from pruning. Give them more optimiser steps "
            f"(pool.min_steps, now {pc.min_steps}; pool.epochs) or a higher learning rate (pool.lr, now "
            f"{list(pc.lr)}), or prune less (pool.sparsity, now {list(pc.sparsity)})",
        }
    ]


def _selection_name(e: dict) -> str:
    """The selected ensemble in words; one member is a single model, not an ensemble of one."""
    if e["k"] == 1:
        return f"the selected member {e['members'][0]} ({kib(e['bytes']['shipped'])} shipped)"
    return f"the selected ensemble ({e['strategy']}, k={e['k']}, {kib(e['bytes']['shipped'])} shipped)"


def selection_warnings(m: dict) -> list[dict]:
    """Where one model alone beats what the bundle ships on validation beyond chance, and ships anyway because
    ``select.fallback`` is off: the models :func:`ship.shipped_model` found ahead (``shipped.beaten_by``; none is
    recorded by runs from before it). The test accuracies are shown beside, for reference. The advice is what would
    ship a model at least as accurate: the fallback, and ``cluster.k: auto`` only where the best k of the validation
    sweep scores at least as well as the rival."""
    shipped, e, n_val = m["shipped"], m["ensemble"], m["dataset"]["n_val"]
    if shipped.get("fallback"):  # the fallback weighed them already
        return []
    records = {PARENT: m["baseline"], **{x["name"]: x for x in m["members"]}}
    out = []
    for rival in shipped.get("beaten_by", []):
        name, r = rival["name"], records[rival["name"]]
        who = "the int8 baseline" if name == PARENT else f"member {name}"
        auto = m["k_choice"].get("best_val_acc")
        hint = (
            f", or set cluster.k: auto (its best k scores {100 * auto:.2f}% on validation)"
            if m["k_choice"]["by"] != "auto" and auto is not None and auto >= r["val_acc_int8"]
            else ""
        )
        out.append(
            {
                "kind": "baseline_int8" if name == PARENT else "member",
                "better": "baseline int8" if name == PARENT else name,
                "better_val_acc": r["val_acc_int8"],
                "ensemble_val_acc": shipped["val_acc"],
                "better_test_acc": r["test_acc_int8"],
                "ensemble_test_acc": shipped["test_acc"],
                "p": rival["p"],
                "message": f"{who} alone ({kib(r['bytes']['shipped'])} shipped) beats {_selection_name(e)} on "
                f"validation beyond chance: {100 * r['val_acc_int8']:.2f}% vs {100 * shipped['val_acc']:.2f}%, "
                f"{round(r['val_acc_int8'] * n_val) - round(shipped['val_acc'] * n_val)} more of the {n_val} "
                f"images right (sign test p = {rival['p']:.2g}; test, for reference: {100 * r['test_acc_int8']:.2f}% "
                f"vs {100 * shipped['test_acc']:.2f}%); set select.fallback: true to ship it{hint}",
            }
        )
    return out


def shipped_devices(placed: Placement | None, shipped: Shipped) -> dict | None:
    """The selection's devices record, with its assignment as shipped: where one model ships, it runs on one device
    and the others are idle."""
    if placed is None:
        return None
    d = placed.to_json()
    if shipped.assignment is None:
        return d
    on = shipped.assignment
    return {**d, "assignment": on, "idle": [dev for dev, m in on.items() if m is None], "unplaced": []}


def device_warnings(m: dict) -> list[dict]:
    """With ``deploy.devices``: each device the selection left without a member, each cluster it could not place."""
    d = m.get("devices")
    if not d:
        return []
    shipped = m.get("shipped") or {"kind": "ensemble"}  # (a metrics.json from before the fallback)
    if shipped["kind"] != "ensemble":
        return [
            {
                "kind": "device_idle",
                "device": name,
                "message": f"device '{name}' runs no model: the bundle ships one model, {shipped['members'][0]}, "
                f"on device '{next(dev for dev, x in d['assignment'].items() if x)}' ({shipped['reason']})",
            }
            for name in d["idle"]
        ]
    lost = len(m["skipped_clusters"]) + len(d["unplaced"])
    out = [
        {
            "kind": "device_idle",
            "device": name,
            "message": f"device '{name}' runs no member: the ensemble has {m['ensemble']['k']} members for "
            f"{len(d['devices'])} devices (k = {m['clustering']['k']}, by {m['k_choice']['by']}; "
            f"{lost} cluster(s) skipped or without a device)",
        }
        for name in d["idle"]
    ]
    return out + [
        {
            "kind": "cluster_unplaced",
            "cluster": u["cluster"],
            "message": f"cluster c{u['cluster']} ({', '.join(u['members'])}) has no member on a device: {u['reason']}",
        }
        for u in d["unplaced"]
    ]


def _diversity(members: list[str], proba: dict, y: np.ndarray) -> dict:
    """Mean pairwise disagreement of the members, their mean accuracy, and the soft vote's gain over that mean."""
    accs = [accuracy(proba[n], y) for n in members]
    gain = accuracy(vote(np.stack([proba[n] for n in members]), "soft"), y) - float(np.mean(accs))
    return {
        "mean_disagreement": _mean_offdiag(disagreement(np.stack([proba[n] for n in members]))),
        "mean_member_test_acc": float(np.mean(accs)),
        "vote_minus_mean_member": gain,
    }


def _mean_offdiag(d: np.ndarray) -> float:
    m = len(d)
    return float(d.sum() / (m * (m - 1))) if m > 1 else 0.0


def evaluate_bundle(path: Path | str, spec: dict, same_classes: bool = False, whole: bool = False) -> dict:
    """Score a bundle on a dataset's test split, independently of the run that made it; ``scored`` says which
    images. A source without a test split is carved as a run carves it (the run's own test images, when it is the
    run's source), or scored whole with ``whole``. The data is read through the bundle's input steps and must have
    the bundle's classes: data without class names whose labels cannot be them (fewer classes, or a score no better
    than chance) is an error unless ``same_classes`` says they are; named data scored at chance gets a warning."""
    b = Bundle.load(path)
    ds = data.load({**spec, **b.steps.to_config()} if b.steps.size or b.steps.color else spec)
    x, y = ds.x_test, ds.y_test
    if ds.carved_test is None:
        scored = f"the data's test split, {len(y)} images"
    elif whole:
        x, y = np.concatenate([ds.x_train, x]), np.concatenate([ds.y_train, y])
        scored = f"all {len(y)} images of the data (it has no test split)"
    else:
        scored = (
            f"{len(y)} of the data's {len(y) + len(ds.y_train)} images: it has no test split, so the one a run "
            f"carves from it ({data.TEST_FRACTION:g}, stratified, seed 0); --all scores every image"
        )
    data.check_classes(b.classes, ds.classes if ds.named else None, y)
    proba = b.member_proba(x)
    acc = accuracy(vote(proba, b.manifest["vote"]["rule"], b.weights), y)
    warnings = chance_warnings(acc, y, b.classes, ds.classes if ds.named else None)
    if not ds.named and not same_classes:
        check_numbered_classes(y, b.classes, warnings)
    return {
        "test_acc": acc,
        "n_test": len(y),
        "scored": scored,
        "warnings": warnings,
        "members": {e["id"]: accuracy(p, y) for e, p in zip(b.manifest["members"], proba)},
    }


def check_numbered_classes(y: np.ndarray, classes: list[str], warnings: list[str]) -> None:
    """An error when labels without names cannot be the bundle's ``classes``: fewer of them, or a score at chance
    (``warnings`` from :func:`chance_warnings`)."""
    fix = "if its labels are the bundle's classes all the same, pass --same-classes"
    present = len(np.unique(y))
    if present < len(classes):
        raise UserError(
            f"the data names no classes and its labels hold {present} of the bundle's {len(classes)} "
            f"({data.short_list(classes)}): it looks like other data; score data with the bundle's classes, or {fix}"
        )
    if warnings:
        raise UserError(f"the data names no classes and {warnings[0]}; {fix}")


def chance_warnings(acc: float, y: np.ndarray, classes: list[str], data_names: list[str] | None = None) -> list[str]:
    """A warning naming the likely causes when ``acc`` is not clearly above chance: the accuracy of always
    answering the most frequent class (one-sided binomial test, p >= 0.01). That class is named as the data names
    it (``data_names``), or by its label number where the data has no names: the bundle's name for the same
    index may be another class, the very mistake the warning is about."""
    counts = np.bincount(y, minlength=len(classes))
    chance, n, top = counts.max() / len(y), len(y), int(counts.argmax())
    p = binomtest(round(acc * n), n, chance, alternative="greater").pvalue
    if p < 0.01:
        return []
    label = f"'{data_names[top]}'" if data_names else f"label {top}"
    return [
        f"test accuracy {acc:.4f} is no better than chance ({chance:.4f}, always answering the data's {label}; "
        f"p = {p:.2g} on {n} images). Likely causes: the data orders its classes differently from the bundle "
        f"({data.short_list(classes)}); its images differ from the training images (size, colour, value range, "
        "preprocessing done by hand); or it is another dataset"
    ]
