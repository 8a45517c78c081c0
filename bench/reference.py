"""Reference rows for one benchmark variant, measured on its own runs: these frame every gain.

    python bench/reference.py runs/bench/cifar10-cpu-clones                  # seeds 0, 1, 2
    python bench/reference.py runs/bench/cifar10-cpu-clones --seeds 0 --epochs 9

- **deep ensemble**: the soft vote of the seeds' fp32 baselines, k networks trained independently (k x the bytes,
  k x the training): the ceiling. Needs >= 2 seeds.
- **compute-matched baseline**: each seed's baseline trained on from its own weights, with the run's ``train:``
  settings, for as many epochs as its pool spent fine-tuning (the sum of the members' epochs, or ``--epochs``):
  what the pool's compute buys when it goes into one model. Weights and result are cached in
  ``<run>/reference/compute-matched-<E>ep/`` (a killed training resumes from its last finished epoch), so
  re-running never retrains.
- **one member**: the shipped strategy's pick for k = 1 (chosen on validation) alone: the same bytes on one device.

Cost is compute beyond one trained baseline, in units of its training time (as the pool's cost is). Writes
``bench/results/<variant>-reference.json`` and the ``## CIFAR-10: reference rows`` section of docs/RESULTS.md.
The test split only scores; nothing here is chosen on it.
"""

from __future__ import annotations

import datetime
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
from cifar10 import POOL_PHASES
from common import (
    RESULTS,
    add_seeds,
    aggregate,
    argparser,
    command_line,
    machine,
    pm,
    publish,
    rel,
    shipped_bytes,
    write_result,
)

from prune2edge import config, store, train
from prune2edge.records import read_member
from prune2edge.runtime.vote import accuracy, disagreement, vote

TITLE = "## CIFAR-10: reference rows"


def baseline_seconds(run_dir: Path) -> float | None:
    """Training seconds of the run's baseline, from its own record (also for a baseline shared from another run);
    None for given weights."""
    history = store.read_json(run_dir / "baseline" / "model.json")["history"]
    return history[-1]["seconds"] if history else None


def deep_ensemble(run_dirs: list[Path]) -> dict:
    """Soft vote on the test split of the runs' fp32 baselines, each trained from its own seed."""
    y = np.load(run_dirs[0] / "test.npz")["y"]
    for d in run_dirs[1:]:
        if not np.array_equal(np.load(d / "test.npz")["y"], y):
            sys.exit(
                f"'{d}' scored other test labels than '{run_dirs[0]}': a deep ensemble needs runs on the same test split"
            )
    proba = np.stack([np.load(d / "test_scores.npz")["baseline_fp32"] for d in run_dirs])
    k = len(run_dirs)
    single = [accuracy(p, y) for p in proba]
    acc = accuracy(vote(proba, "soft"), y)
    seconds = [baseline_seconds(d) for d in run_dirs]
    return {
        "k": k,
        "test_acc": acc,
        "baseline_test_acc": single,
        "gain_vs_mean_baseline_fp32": acc - statistics.mean(single),
        "mean_disagreement": float(disagreement(proba)[~np.eye(k, dtype=bool)].mean()),
        "bytes": sum(store.read_json(d / "metrics.json")["baseline"]["bytes"]["fp32"] for d in run_dirs),
        "bytes_vs_baseline_fp32": float(k),
        "seconds": sum(seconds) if None not in seconds else None,
        "cost_vs_baseline": k - 1,
    }


def pool_epochs(run_dir: Path) -> float:
    """Fine-tuning epochs the run's pool spent: the sum over its members."""
    records = sorted((run_dir / "pool").glob("*/member.json"))
    if not records:
        sys.exit(f"'{run_dir}' has no pool/*/member.json; pass --epochs")
    return round(sum(read_member(run_dir, f.parent.name).epochs for f in records), 6)


def cache(run_dir: Path, epochs: float) -> Path:
    """Where a run's compute-matched baseline of ``epochs`` extra epochs keeps its weights and result."""
    return run_dir / "reference" / f"compute-matched-{epochs:g}ep"


def compute_matched(run_dir: Path, epochs: float | None = None) -> dict:
    """The run's baseline trained on for ``epochs`` more (default: its pool's epochs) with the run's ``train:``
    settings on its training split, and scored; cached in ``run_dir/reference/``, so it trains once."""
    epochs = pool_epochs(run_dir) if epochs is None else epochs
    out = cache(run_dir, epochs)
    if (out / "result.json").exists():
        return store.read_json(out / "result.json")
    cfg = config.load(run_dir / "config.yaml")
    settings = train.TrainSettings.of(cfg.train, epochs=epochs)
    shape = tuple(store.read_json(run_dir / "dataset.json")["image_shape"])
    model = store.load_baseline(run_dir)
    x, y = store.tensors(run_dir, "train")
    x_val, y_val = store.tensors(run_dir, "val")
    history = train.fit(
        model,
        x,
        y,
        settings,
        seed=cfg.seed,
        augment=train.augment_kind(cfg.train.augment, shape),
        device=cfg.device,
        x_val=x_val,
        y_val=y_val,
        checkpoint=out / "checkpoint.pt",
        desc=f"compute-matched {rel(run_dir)}",
    )
    model.cpu()
    store.write_state(out / "model.pt", model.state_dict())
    x_test, y_test = store.tensors(run_dir, "test")
    result = {
        "epochs": epochs,
        "baseline_epochs": cfg.train.epochs,
        "settings": asdict(settings),
        "val_acc": history[-1]["val_acc"],
        "test_acc": accuracy(train.predict_proba(model, x_test), y_test.numpy()),
        "seconds": history[-1]["seconds"],
        "history": history,
    }
    store.write_json(out / "result.json", result)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    return result


def pool_cost(run_dir: Path) -> float | None:
    """Pool + quantise + select seconds over the baseline's training seconds."""
    t, base = store.read_json(run_dir / "timings.json"), baseline_seconds(run_dir)
    return sum(t[p] for p in POOL_PHASES) / base if base else None


def one_member(run_dir: Path) -> dict:
    """The shipped selection strategy's pick for k = 1 (chosen on validation), scored alone."""
    m = store.read_json(run_dir / "metrics.json")
    strategy = m["ensemble"]["strategy"]
    pick = next(c for c in m["curves"][strategy] if c["k"] == 1)
    member = next(x for x in m["members"] if x["name"] == pick["members"][0])
    nbytes = shipped_bytes(member["bytes"])
    return {
        "strategy": strategy,
        "member": member["name"],
        "test_acc": pick["test_acc"],
        "val_acc": pick["val_acc"],
        "gain_vs_baseline_fp32": pick["test_acc"] - m["baseline"]["test_acc_fp32"],
        "bytes": nbytes,
        "bytes_vs_baseline_fp32": nbytes / m["baseline"]["bytes"]["fp32"],
        "cost_vs_baseline": pool_cost(run_dir),
    }


def seed_rows(run_dir: Path, epochs: float | None = None) -> dict:
    """The per-seed reference rows of one run: its compute-matched baseline and its one member."""
    base_acc = store.read_json(run_dir / "metrics.json")["baseline"]["test_acc_fp32"]
    base_s = baseline_seconds(run_dir)
    cm = compute_matched(run_dir, epochs)
    return {
        "run_dir": rel(run_dir),
        "baseline_fp32_test_acc": base_acc,
        "baseline_seconds": base_s,
        "compute_matched": {
            **{k: cm[k] for k in ("epochs", "baseline_epochs", "val_acc", "test_acc", "seconds")},
            "gain_vs_baseline_fp32": cm["test_acc"] - base_acc,
            "cost_vs_baseline": cm["seconds"] / base_s if base_s else None,
            "weights": rel(cache(run_dir, cm["epochs"]) / "model.pt"),
        },
        "one_member": one_member(run_dir),
    }


def reference(variant_dir: Path, seeds: list[int], epochs: float | None = None) -> dict:
    """Every reference row of a variant's runs ``variant_dir/seed<S>``; the deep ensemble needs >= 2 seeds."""
    run_dirs = [variant_dir / f"seed{s}" for s in seeds]
    for d in run_dirs:
        if not (d / "metrics.json").exists():
            sys.exit(f"'{d}' has no metrics.json: finish the run first (bench/cifar10.py)")
    runs = {str(s): seed_rows(d, epochs) for s, d in zip(seeds, run_dirs)}
    return {
        "name": variant_dir.name,
        "variant_dir": rel(variant_dir),
        "seeds": seeds,
        "runs": runs,
        "aggregate": aggregate(runs),
        "deep_ensemble": deep_ensemble(run_dirs) if len(run_dirs) > 1 else None,
    }


def markdown(result: dict) -> str:
    a, de = result["aggregate"], result["deep_ensemble"]
    runs = list(result["runs"].values())
    cm_epochs = ", ".join(f"{r['compute_matched']['epochs']:g}" for r in runs)
    member = runs[0]["one_member"]
    lines = [
        TITLE,
        "",
        f"Reference rows for `{result['variant_dir']}`, measured on its own runs (seeds "
        f"{', '.join(map(str, result['seeds']))}); mean ± sd over the seeds. Gain: test accuracy minus the "
        "baseline fp32's (points). Bytes: % of the baseline's fp32 ONNX, on one device and in all. Cost: "
        "compute beyond one trained baseline, in units of its training time (what the pool's cost measures).",
        "",
        f"- machine: {result['machine']}; date: {result['date']}",
        f"- command: `{result['command']}`",
        "",
        "| reference | test accuracy % | gain | bytes on one device % | bytes in all % | cost |",
        "|---|---|---|---|---|---|",
        f"| baseline fp32 (one network) | {pm(a, 'baseline_fp32_test_acc')} | 0 | 100 | 100 | 0 |",
    ]
    if de:
        lines.append(
            f"| deep ensemble: soft vote of {de['k']} baselines trained from different seeds | {100 * de['test_acc']:.2f} | "
            f"{100 * de['gain_vs_mean_baseline_fp32']:+.2f} | 100 | {100 * de['bytes_vs_baseline_fp32']:.0f} | "
            f"{de['cost_vs_baseline']} ({de['k']} x in all) |"
        )
    else:
        lines.append("| deep ensemble | needs >= 2 seeds | | | | |")
    lines += [
        f"| compute-matched baseline: trained on for {cm_epochs} more epochs | {pm(a, 'compute_matched.test_acc')} | "
        f"{pm(a, 'compute_matched.gain_vs_baseline_fp32')} | 100 | 100 | {pm(a, 'compute_matched.cost_vs_baseline', 1)} |",
        f"| one member alone (k = 1, {member['strategy']} on validation) | {pm(a, 'one_member.test_acc')} | "
        f"{pm(a, 'one_member.gain_vs_baseline_fp32')} | {pm(a, 'one_member.bytes_vs_baseline_fp32')} | "
        f"{pm(a, 'one_member.bytes_vs_baseline_fp32')} | {pm(a, 'one_member.cost_vs_baseline', 1)} "
        "(the pool it was chosen from) |",
        "",
    ]
    if de:
        lines.append(
            f"- deep ensemble: single baselines {', '.join(f'{100 * v:.2f}' for v in de['baseline_test_acc'])} %; "
            f"mean pairwise disagreement {de['mean_disagreement']:.3f}"
        )
    lines += [
        f"- compute-matched: as many extra epochs as the pool's members spent fine-tuning (unless `--epochs` "
        "says otherwise), with the run's `train:` settings (optimiser, schedule over the extra epochs), from the "
        f"converged baseline's weights, on the run's training split, after a baseline of "
        f"{runs[0]['compute_matched']['baseline_epochs']:g} epochs; validation {pm(a, 'compute_matched.val_acc')} %; "
        "weights in `<run>/reference/`",
        f"- raw numbers: `{result['results_file']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparser(__doc__)
    ap.add_argument("variant", help="a variant's run folder, holding seed<S>/ (e.g. runs/bench/cifar10-cpu-clones)")
    add_seeds(ap)
    ap.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="extra epochs of the compute-matched baseline (default: each seed's pool epochs)",
    )
    args = ap.parse_args()

    variant = Path(args.variant)
    seeds = args.seeds
    if args.epochs is not None and args.epochs <= 0:
        sys.exit(f"--epochs must be > 0, got {args.epochs:g}")
    results_file = RESULTS / f"{variant.name}-reference.json"
    result = {
        **reference(variant, seeds, args.epochs),
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "command": command_line(),
        "results_file": rel(results_file),
    }
    write_result(results_file, result)
    publish(TITLE, markdown(result), not args.no_docs)


if __name__ == "__main__":
    main()
