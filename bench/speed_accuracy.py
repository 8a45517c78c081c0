"""Does the faster training loop train as well? The baseline of configs/cifar10-cpu.yaml trained to the end with
``train.fit`` and with the loop before the speed work (``bench/speed.py``'s reference), seed for seed, on CIFAR-10.

    OMP_NUM_THREADS=1 python bench/speed_accuracy.py --loop reference     # one loop per core, side by side
    OMP_NUM_THREADS=1 python bench/speed_accuracy.py --loop fit
    python bench/speed_accuracy.py --report                               # the RESULTS.md section from both files

Each (loop, seed) trains the config's baseline on the run's training split (the pipeline's own split and
preprocessing, prepared in ``runs/bench/speed-accuracy/seed<S>``) and scores it on the validation and test splits.
Finished seeds are kept in ``bench/results/speed-accuracy-<loop>.json``; a re-run trains only the missing ones.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from pathlib import Path

import torch
from common import (
    RESULTS,
    ROOT,
    add_config,
    add_data,
    add_seeds,
    argparser,
    command_line,
    data_paths,
    machine,
    publish,
    rel,
    write_result,
)
from speed import reference_fit

from prune2edge import config, models, pipeline, store, train
from prune2edge.runtime.vote import accuracy

TITLE = "## Training speed: accuracy of the faster loop"
LOOPS = ("reference", "fit")


def results_path(loop: str) -> Path:
    return RESULTS / f"speed-accuracy-{loop}.json"


def train_one(cfg: config.Config, run_dir: Path, loop: str) -> dict:
    """Train the baseline with one loop; its accuracy on validation and test, and its seconds."""
    pipeline.prepare(run_dir, cfg)
    info = store.read_json(run_dir / "dataset.json")
    shape = tuple(info["image_shape"])
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model.arch, shape, len(info["classes"]), **cfg.model.kwargs)
    x, y = store.tensors(run_dir, "train")
    s = train.TrainSettings.of(cfg.train)
    augment = train.augment_kind(cfg.train.augment, shape)
    t0 = time.perf_counter()
    if loop == "fit":
        train.fit(model, x, y, s, seed=cfg.seed, augment=augment, desc=f"fit seed {cfg.seed}")
    else:
        reference_fit(model, x, y, s, seed=cfg.seed, augment=augment)
    seconds = time.perf_counter() - t0
    scores = {}
    for split in ("val", "test"):
        xs, ys = store.tensors(run_dir, split)
        scores[split] = accuracy(train.predict_proba(model, xs), ys.numpy())
    return {"val_acc": scores["val"], "test_acc": scores["test"], "seconds": seconds}


def markdown(results: dict[str, dict]) -> str:
    lines = [
        TITLE,
        "",
        "The baseline of `configs/cifar10-cpu.yaml` (small_cnn w16 + stem pool, 30 one-cycle epochs) trained to the "
        "end with `train.fit` and with the loop before the speed work (`bench/speed.py`'s reference), on the same "
        "split, preprocessing and seeds. Validation: 5,000 images of the training split; test: the 10,000 test "
        "images, read once per model for this table. Seconds are wall-clock on a shared machine (the two loops ran "
        "at the same time, one per core, with a varying number of other jobs), so they do not compare; "
        "`## Training speed` has the side-by-side ratio. The command shown is the last one that added a seed.",
        "",
    ]
    for loop in LOOPS:
        if loop in results:
            r = results[loop]
            lines.append(
                f"- {loop}: {r['machine']}; torch {r['torch']}; {r['date']}; `{r['command']}`; raw numbers: "
                f"`{r['results_file']}`"
            )
    lines += [
        "",
        "| loop | seeds | val accuracy (%) | test accuracy (%) | test, per seed (minutes of training) |",
        "|---|---|---|---|---|",
    ]
    for loop in LOOPS:
        runs = results.get(loop, {}).get("seeds", {})
        if not runs:
            continue
        val = [100 * r["val_acc"] for r in runs.values()]
        test = [100 * r["test_acc"] for r in runs.values()]

        def mean_sd(v: list[float]) -> str:
            return f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else " (one seed)")

        per_seed = ", ".join(
            f"{s}: {100 * r['test_acc']:.2f} ({r['seconds'] / 60:.0f})" for s, r in sorted(runs.items())
        )
        lines.append(f"| {loop} | {len(runs)} | {mean_sd(val)} | {mean_sd(test)} | {per_seed} |")
    if all(results.get(loop, {}).get("seeds") for loop in LOOPS):
        common = sorted(set(results["fit"]["seeds"]) & set(results["reference"]["seeds"]))
        for split in ("val", "test") if common else ():
            diffs = [
                100 * (results["fit"]["seeds"][s][f"{split}_acc"] - results["reference"]["seeds"][s][f"{split}_acc"])
                for s in common
            ]
            mean, spread, verdict = statistics.mean(diffs), "", "."
            if len(diffs) > 1:
                sd = statistics.stdev(diffs)
                spread = f" ± {sd:.2f}"
                verdict = (
                    "; within two standard errors of zero: no difference beyond seed noise."
                    if abs(mean) <= 2 * sd / len(diffs) ** 0.5
                    else "; more than two standard errors from zero."
                )
            lines += [
                "",
                f"fit − reference, {split} accuracy, seed for seed ({len(diffs)} seeds): {mean:+.2f}{spread} points "
                f"(per seed: {', '.join(f'{d:+.2f}' for d in diffs)}){verdict}",
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparser(__doc__)
    ap.add_argument("--loop", choices=LOOPS, help="the loop to train with")
    add_seeds(ap)
    add_config(ap)
    add_data(ap)
    ap.add_argument("--report", action="store_true", help="only write the RESULTS.md section from the results files")
    args = ap.parse_args()
    if args.loop:
        path = results_path(args.loop)
        result = json.loads(path.read_text()) if path.exists() else {"seeds": {}}
        for seed in args.seeds:
            if str(seed) in result["seeds"]:
                continue
            cfg = config.load(args.config, {"seed": seed, "data": {"path": data_paths(args.data)}})
            scores = train_one(cfg, ROOT / "runs" / "bench" / "speed-accuracy" / f"seed{seed}", args.loop)
            if path.exists():  # another process may have finished other seeds of this loop meanwhile
                result = json.loads(path.read_text())
            result["seeds"][str(seed)] = scores
            result.update(
                {
                    "loop": args.loop,
                    "config": rel(args.config),
                    "machine": machine(),
                    "torch": torch.__version__,
                    "date": datetime.date.today().isoformat(),
                    "command": command_line(),
                    "results_file": rel(path),
                }
            )
            write_result(path, result)
            print(f"[speed-accuracy] {args.loop} seed {seed}: {result['seeds'][str(seed)]}", flush=True)
    results = {loop: json.loads(results_path(loop).read_text()) for loop in LOOPS if results_path(loop).exists()}
    publish(TITLE, markdown(results), not args.no_docs and (args.report or not args.loop))


if __name__ == "__main__":
    main()
