"""The report: the test split, read once, scores the baseline, every member and every ensemble."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from . import data, selective, store
from .bundle import Bundle, predict_proba, session
from .vote import AGREEMENT, accuracy, disagreement, margin, vote

MAX_SUBSETS = 1000  # degradation: at most this many subsets of members per number missing (drawn when there are more)


def mcnemar(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value for two classifiers' correctness on the same inputs."""
    a, b = pred_a == y, pred_b == y
    n01, n10 = int((a & ~b).sum()), int((~a & b).sum())
    return 1.0 if n01 + n10 == 0 else float(binomtest(min(n01, n10), n01 + n10, 0.5).pvalue)


def evaluate_run(run_dir: Path, cfg: dict, timings: dict) -> dict:
    """Score everything on the test split; writes ``metrics.json``, ``test.npz`` and ``test_scores.npz``."""
    x_test, y_test = store.split(run_dir, "test")
    x_val, y_val = store.split(run_dir, "val")
    inp = store.preprocessing(run_dir).apply(x_test)
    info = store.read_json(run_dir / "dataset.json")
    sel = store.read_json(run_dir / "selection.json")
    rule, weighted = cfg["vote"]["rule"], cfg["vote"]["weighted"]
    base_q = store.read_json(run_dir / "baseline" / "quant.json")
    base32 = predict_proba(session(run_dir / "baseline" / "fp32.onnx"), inp)
    base32_val = predict_proba(session(run_dir / "baseline" / "fp32.onnx"), store.preprocessing(run_dir).apply(x_val))
    base8 = predict_proba(session(run_dir / "baseline" / "int8.onnx"), inp)
    names = sorted(p.name for p in (run_dir / "pool").iterdir() if (p / "quant.json").exists())
    test = {n: predict_proba(session(run_dir / "pool" / n / "int8.onnx"), inp) for n in names}
    val = {n: np.load(run_dir / "pool" / n / "val_proba.npy") for n in names}
    quant = {n: store.read_json(run_dir / "pool" / n / "quant.json") for n in names}
    weight = {n: quant[n]["val_acc_int8"] for n in names}

    def ens(members: list[str], split: dict, r: str = rule) -> np.ndarray:
        return vote(np.stack([split[n] for n in members]), r, [weight[n] for n in members] if weighted else None)

    bundle = Bundle.load(run_dir / "bundle")
    ens_test = bundle.predict_proba(x_test)
    chosen = sel["selected"]
    assert np.allclose(ens_test, ens(chosen, test), atol=1e-5), "bundle and pool disagree"

    def sizes(ms):
        return {k: sum(quant[n]["bytes"][k] for n in ms) for k in ("fp32", "int8", "fp32_gzip", "int8_gzip", "shipped")}

    labels = dict(zip(sel["candidates"], sel["clustering"]["labels"]))
    members = []
    for n in names:
        rec = store.read_json(run_dir / "pool" / n / "member.json")
        members.append(
            {
                "name": n,
                "status": quant[n]["status"],
                "cluster": labels.get(n),
                "selected": n in chosen,
                "sparsity_target": rec["sparsity"],
                "sparsity_measured": rec["measured_sparsity"]["overall"],
                "val_acc_fp32": quant[n]["val_acc_fp32"],
                "val_acc_int8": quant[n]["val_acc_int8"],
                "test_acc_int8": accuracy(test[n], y_test),
                "bytes": quant[n]["bytes"],
                "weight_bits": quant[n].get("weight_bits", 8),  # 8 in runs from before QAT
                "bits_per_weight_shipped": quant[n].get("bits_per_weight_shipped"),
                "full_integer": quant[n]["full_integer"],
                "quant_attempts": quant[n]["attempts"],
                "plan": {
                    k: rec.get(k, 0) for k in ("seed", "epochs", "lr", "batch_size", "bootstrap", "source", "parent")
                },
                "fine_tune_seconds": rec["seconds"],
            }
        )
    ok = sel["candidates"]
    base_pred = base32.argmax(1)
    strategies = {
        s: {
            "members": ms,
            **{
                f"{split}_acc": {r: accuracy(ens(ms, d, r), yy) for r in ("soft", "hard")}
                for split, d, yy in (("val", val, y_val), ("test", test, y_test))
            },
            **_diversity(ms, test, y_test),
            "bytes": sizes(ms),
            "mcnemar_p_vs_baseline_fp32": mcnemar(y_test, base_pred, ens(ms, test).argmax(1)),
        }
        for s, ms in sel["strategies"].items()
    }
    curves = {
        s: [
            {
                "k": len(ms),
                "clusters": i,
                "members": ms,
                "val_acc": accuracy(ens(ms, val), y_val),
                "test_acc": accuracy(ens(ms, test), y_test),
            }
            for i, ms in enumerate(picks, 1)
        ]
        for s, picks in sel["sweep"].items()
    }
    metrics: dict = {
        "dataset": info,
        "baseline": {
            "val_acc_fp32": base_q["val_acc_fp32"],
            "val_acc_int8": base_q["val_acc_int8"],
            "test_acc_fp32": accuracy(base32, y_test),
            "test_acc_int8": accuracy(base8, y_test),
            "bytes": base_q["bytes"],
            "int8_status": base_q["status"],
            "full_integer": base_q["full_integer"],
        },
        "members": members,
        "pool_vote": {
            "members": len(ok),
            "val_acc": accuracy(ens(ok, val), y_val),
            "test_acc": accuracy(ens(ok, test), y_test),
            **_diversity(ok, test, y_test),
        },
        "ensemble": {
            "strategy": sel["strategy"],
            "rule": rule,
            "weighted": weighted,
            "members": chosen,
            "k": len(chosen),
            "val_acc": accuracy(ens(chosen, val), y_val),
            "test_acc": accuracy(ens_test, y_test),
            "gain_vs_baseline_fp32": accuracy(ens_test, y_test) - accuracy(base32, y_test),
            "mcnemar_p_vs_baseline_fp32": mcnemar(y_test, base_pred, ens_test.argmax(1)),
            "disagreement": disagreement(np.stack([test[n] for n in chosen])).tolist(),
            **_diversity(chosen, test, y_test),
            "bytes": sizes(chosen),
        },
        "strategies": strategies,
        "curves": curves,
        "clustering": {k: v for k, v in sel["clustering"].items() if k != "labels"},
        # (a selection.json written before k_choice and skipped_clusters existed has neither)
        "k_choice": {k: v for k, v in sel.get("k_choice", {"by": "config"}).items() if k != "curve"},
        "skipped_clusters": sel.get("skipped_clusters", []),
        "dropped": sel["dropped"],
        "devices": sel.get("devices"),  # with deploy.devices: budgets, what they rule out, member -> device
        "timings": dict(timings),
    }
    metrics["warnings"] = selection_warnings(metrics) + device_warnings(metrics)
    metrics["decisions"] = decision_metrics(
        ens(chosen, val), ens_test, base32_val, base32, y_val, y_test, cfg["vote"]["target_accuracy"]
    )
    metrics["degradation"] = {
        **degradation(
            np.stack([test[n] for n in chosen]),
            y_test,
            rule,
            [weight[n] for n in chosen] if weighted else None,
            cfg["seed"],
        ),
        "baseline_fp32_test_acc": metrics["baseline"]["test_acc_fp32"],
        "baseline_int8_test_acc": metrics["baseline"]["test_acc_int8"],
        "best_member": {k: best_member(metrics["members"])[k] for k in ("name", "val_acc_int8", "test_acc_int8")},
    }
    if "latency" in bundle.manifest:
        metrics["latency"] = bundle.manifest["latency"] | {
            "members": {e["id"]: e["latency_ms"] for e in bundle.manifest["members"]}
        }
    store.write_npz(run_dir / "test.npz", x=x_test, y=y_test)
    store.write_npz(
        run_dir / "test_scores.npz",
        names=np.array(names),
        members=np.stack([test[n] for n in names]),
        baseline_fp32=base32,
        baseline_int8=base8,
        ensemble=ens_test,
    )
    store.write_json(run_dir / "metrics.json", metrics)
    return metrics


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


def best_member(members: list[dict]) -> dict:
    """The pool member that passed the int8 gate with the best validation accuracy (the smallest of the best)."""
    ok = [x for x in members if x["status"] == "ok"]
    return min(ok, key=lambda x: (-x["val_acc_int8"], x["bytes"]["int8_gzip"], x["name"]))


def selection_warnings(m: dict) -> list[dict]:
    """Where one model alone beats the selected ensemble on validation: the int8 baseline, or the best int8 member.

    Decided on validation accuracy only; the test accuracies are shown beside it, for reference.
    """
    b, e = m["baseline"], m["ensemble"]
    best = best_member(m["members"])
    rivals = [
        ("baseline_int8", "baseline int8", "the int8 baseline", b),
        ("member", best["name"], f"member {best['name']}", best),
    ]
    hint = "" if m["k_choice"]["by"] == "auto" else ", or set cluster.k: auto"
    n_val = m["dataset"]["n_val"]
    return [
        {
            "kind": kind,
            "better": name,
            "better_val_acc": r["val_acc_int8"],
            "ensemble_val_acc": e["val_acc"],
            "better_test_acc": r["test_acc_int8"],
            "ensemble_test_acc": e["test_acc"],
            "message": f"{who} alone ({_kib(r['bytes']['shipped'])} shipped) beats the selected ensemble ({e['strategy']}, "
            f"k={e['k']}, {_kib(e['bytes']['shipped'])} shipped) on validation: {100 * r['val_acc_int8']:.2f}% vs "
            f"{100 * e['val_acc']:.2f}%, {round((r['val_acc_int8'] - e['val_acc']) * n_val)} more of the {n_val} "
            f"images right (test, for reference: {100 * r['test_acc_int8']:.2f}% vs {100 * e['test_acc']:.2f}%); "
            f"consider shipping it instead{hint}",
        }
        for kind, name, who, r in rivals
        if r["val_acc_int8"] > e["val_acc"]
    ]


def _reliability_lines(m: dict) -> list[str]:
    """The summary's lines on decisions (abstain threshold, coverage, calibration), degradation and latency."""
    d, g = m["decisions"], m["degradation"]
    target = d["target_accuracy"]
    lines = [
        "decisions"
        + ("" if target is None else f" (abstain thresholds chosen on validation for {target:g} accuracy)")
        + ":"
    ]
    for name, who in (("ensemble", "ensemble (vote margin)"), ("baseline_fp32", "baseline fp32 (top probability)")):
        r = d[name]
        line = f"{who}: ECE {r['ece']:.4f}, AURC {r['aurc']:.4f}"
        if "threshold" in r:
            t, op = r["threshold"], r["at_threshold"]
            acc = "n/a" if op["accuracy"] is None else f"{op['accuracy']:.4f}"
            line += (
                f"; abstain below {t['abstain_below']:.4f} (validation: {100 * t['val_coverage']:.1f}% decided at "
                f"{t['val_accuracy']:.4f}{'' if t['target_met'] else ', target NOT met'}): test {100 * op['coverage']:.1f}% "
                f"decided at {acc}"
            )
        lines.append("  " + line)
    best = g["best_member"]
    lines.append(
        "members missing -> test acc mean (min-max): "
        + "; ".join(
            f"{r['missing']}: {r['mean']:.4f} ({r['min']:.4f}-{r['max']:.4f}){' <quorum' if r['below_quorum'] else ''}"
            for r in g["rows"]
        )
        + f"; best single member {best['name']} {best['test_acc_int8']:.4f}"
    )
    if "latency" in m:
        t = m["latency"]
        lines.append(
            f"latency, batch 1, 1 thread (median of {t['runs']}, ms): "
            + ", ".join(f"{n} {v:.3f}" for n, v in t["members"].items())
            + f"; baseline fp32 {t['baseline_fp32_ms']:.3f}, "
            f"int8 {t['baseline_int8_ms']:.3f}"
        )
    return lines


def device_warnings(m: dict) -> list[dict]:
    """With ``deploy.devices``: each device the selection left without a member, each cluster it could not place."""
    d = m.get("devices")
    if not d:
        return []
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


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


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


def evaluate_bundle(path: Path | str, spec: dict) -> dict:
    """Score a bundle on a dataset's test split, independently of the run that made it. The data is read through
    the bundle's input steps, must have the bundle's classes, and a score no better than chance adds a warning."""
    b = Bundle.load(path)
    ds = data.load({**spec, **b.steps.to_config()} if b.steps.size or b.steps.color else spec)
    data.check_classes(b.classes, ds.classes if ds.named else None, ds.y_test)
    proba = b.member_proba(ds.x_test)
    ensemble = vote(proba, b.manifest["vote"]["rule"], b.weights)
    acc = accuracy(ensemble, ds.y_test)
    return {
        "test_acc": acc,
        "n_test": len(ds.y_test),
        "warnings": chance_warnings(acc, ds.y_test, b.classes),
        "members": {e["id"]: accuracy(p, ds.y_test) for e, p in zip(b.manifest["members"], proba)},
    }


def chance_warnings(acc: float, y: np.ndarray, classes: list[str]) -> list[str]:
    """A warning naming the likely causes when ``acc`` is not clearly above chance: the accuracy of always
    answering the most frequent class (one-sided binomial test, p >= 0.01)."""
    counts = np.bincount(y, minlength=len(classes))
    chance, n = counts.max() / len(y), len(y)
    p = binomtest(round(acc * n), n, chance, alternative="greater").pvalue
    if p < 0.01:
        return []
    return [
        f"test accuracy {acc:.4f} is no better than chance ({chance:.4f}, always answering '{classes[counts.argmax()]}'; "
        f"p = {p:.2g} on {n} images). Likely causes: the data orders its classes differently from the bundle "
        f"({data.short_list(classes)}); its images differ from the training images (size, colour, value range, "
        "preprocessing done by hand); or it is another dataset"
    ]


def table(m: dict) -> str:
    """A readable summary of ``metrics.json``."""
    b, e = m["baseline"], m["ensemble"]
    rows = [
        ("model", "test acc", "fp32", "int8", "int8 gzip", "shipped"),
        ("baseline fp32", f"{b['test_acc_fp32']:.4f}", _kib(b["bytes"]["fp32"]), "", "", ""),
        (
            "baseline int8",
            f"{b['test_acc_int8']:.4f}",
            "",
            _kib(b["bytes"]["int8"]),
            _kib(b["bytes"]["int8_gzip"]),
            _kib(b["bytes"]["shipped"]),
        ),
    ]
    for mem in m["members"]:
        if mem["selected"]:
            rows.append(
                (
                    f"  {mem['name']} (s={mem['sparsity_measured']:.2f}, {_bits(mem)}c{mem['cluster']})",
                    f"{mem['test_acc_int8']:.4f}",
                    "",
                    _kib(mem["bytes"]["int8"]),
                    _kib(mem["bytes"]["int8_gzip"]),
                    _kib(mem["bytes"]["shipped"]),
                )
            )
    rows.append(
        (f"pool vote ({m['pool_vote']['members']} members)", f"{m['pool_vote']['test_acc']:.4f}", "", "", "", "")
    )
    rows.append(
        (
            f"ensemble: {e['strategy']}, {e['rule']} vote, k={e['k']}",
            f"{e['test_acc']:.4f}",
            "",
            _kib(e["bytes"]["int8"]),
            _kib(e["bytes"]["int8_gzip"]),
            _kib(e["bytes"]["shipped"]),
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    gain = 100 * e["gain_vs_baseline_fp32"]
    lines.append(
        f"\nensemble vs baseline fp32: {gain:+.2f} points (McNemar p = {e['mcnemar_p_vs_baseline_fp32']:.3g}); "
        f"mean pairwise disagreement {e['mean_disagreement']:.3f}"
    )
    lines.append(
        "other strategies (test acc, soft/hard): "
        + "; ".join(f"{s} {v['test_acc']['soft']:.4f}/{v['test_acc']['hard']:.4f}" for s, v in m["strategies"].items())
    )
    lines.extend(_reliability_lines(m))
    if m["dropped"]:
        lines.append(f"dropped by the int8 gate: {', '.join(m['dropped'])}")
    for s in m["skipped_clusters"]:
        lines.append(f"cluster c{s['cluster']} ({', '.join(s['members'])}) skipped: {s['reason']}")
    lines.extend(_device_lines(m["devices"]) if m.get("devices") else [])
    lines.extend(
        f"WARNING: {w['message']}" for w in m["dataset"].get("warnings", []) + m["warnings"]
    )  # data, selection
    return "\n".join(lines)


def _bits(member: dict) -> str:
    """``3-bit (2.9 b/w), `` for a member trained with QAT: its grid, and bits per weight as shipped."""
    if member.get("weight_bits", 8) == 8:
        return ""
    return f"{member['weight_bits']}-bit ({member['bits_per_weight_shipped']:.1f} b/w), "


def _device_lines(d: dict) -> list[str]:
    """The summary table's lines on the fleet: which device runs which member, and which budget rules out whom."""

    def budget(dev: dict) -> str:
        return f"{dev['memory_bytes']:,} B" + ("" if dev["latency_ms"] is None else f", {dev['latency_ms']:g} ms")

    lines = [
        "devices: "
        + "; ".join(
            f"{dev['name']} ({budget(dev)}) runs {d['assignment'][dev['name']] or 'nothing (idle)'}"
            for dev in d["devices"]
        )
    ]
    out: dict[tuple[str, str], list[str]] = {}
    for r in d["ruled_out"]:
        need = f"{r['need']:,} B" if r["budget"] == "memory_bytes" else f"{r['need']:g} ms"
        out.setdefault((r["device"], r["budget"].split("_")[0]), []).append(f"{r['member']} ({need})")
    lines += [f"{dev}'s {kind} budget rules out {', '.join(ms)}" for (dev, kind), ms in out.items()]
    if d["unfit"]:
        lines.append(f"fit no device, so not selectable: {', '.join(d['unfit'])}")
    return lines  # idle devices and clusters without a device: device_warnings
