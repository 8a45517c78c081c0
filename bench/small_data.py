"""The defaults on a user's small data: only data, model and training set, everything else as shipped.

    python bench/small_data.py                          # every set, seeds 0 1 2 (resumable: finished runs are read)
    python bench/small_data.py --sets cifar-1k,digits --seeds 0
    python bench/small_data.py --report                 # measure nothing: the RESULTS.md section from the results

Sets: CIFAR-10 training subsets of 1k, 2k and 5k images (stratified, drawn once with seed 0 from the JPEG-decoded
copy), in colour at 32x32 and in grey resized to 64x64 by the bundle's input steps, each scored on the whole CIFAR-10
test split (10,000 images); and scikit-learn's digits (8x8 grey, its carved test split). Every run is ``prune2edge
run`` on a config that sets only data, model and train (:data:`CONFIG`): the pool, its family, every selection
decision and the fallback are the defaults. Rows per set and seed: the fp32 parent, what shipped and why, k, the
gain over the parent on test with McNemar's p, bytes per device as shipped and as run, the pool's training cost in
parent trainings (CPU seconds of the run's process). Writes bench/results/small-data.json and the RESULTS section.
"""

from __future__ import annotations

import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from common import DATA, RESULTS, ROOT, argparser, command_line, machine, publish, rel, write_result

from prune2edge.summary import per_device

TITLE = "## Defaults on small data (issue 32)"
CONFIG = {"model": {"arch": "small_cnn"}, "train": {"epochs": 30, "batch_size": 64}}  # what a user sets
SIZES = {"1k": 1000, "2k": 2000, "5k": 5000}
SETS = [f"cifar-{k}{c}" for k in SIZES for c in ("", "-grey64")] + ["digits"]
POOL = ("pool", "quantize", "select")  # the phases a pool costs
# a parent whose CPU seconds are under this share of its wall seconds resumed after a kill (or was paused): the killed
# attempt's CPU seconds are not recorded, so its cost is not known (a run on its own core: 0.79-0.95; resumed: 0.41-0.45)
WHOLE = 0.6


def subset(folder: Path, n: int, out: Path, screen: bool = False) -> Path:
    """A stratified subset of ``n`` CIFAR-10 training images (seed 0) with the whole test split, as one npz; with
    ``screen``, the test split is 10,000 other training images (1,000 a class, outside every subset)."""
    if out.exists():
        return out
    parts = [np.load(p) for p in sorted(folder.glob("*train*.npz"))]
    x, y = np.concatenate([p["x_train"] for p in parts]), np.concatenate([p["y_train"] for p in parts])
    rng = np.random.default_rng(0)
    order = [rng.permutation(np.flatnonzero(y == c)) for c in range(10)]  # each subset is a prefix of these
    keep = np.sort(np.concatenate([o[: n // 10] for o in order]))
    test = np.load(folder / "cifar10_test.npz")
    x_test, y_test = test["x_test"], test["y_test"]
    if screen:
        first = max(SIZES.values()) // 10
        held = np.sort(np.concatenate([o[first : first + 1000] for o in order]))
        x_test, y_test = x[held], y[held]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x_train=x[keep], y_train=y[keep], x_test=x_test, y_test=y_test, label_names=test["label_names"])
    return out


def data_section(name: str, work: Path, folder: Path, screen: bool) -> dict:
    """The ``data:`` section of a set."""
    if name == "digits":
        return {"name": "digits"}
    size, _, colour = name.removeprefix("cifar-").partition("-")
    path = subset(folder, SIZES[size], work / "data" / f"cifar10-{size}.npz", screen)
    return {"name": "npz", "path": str(path), **({"image_size": 64, "color": "grey"} if colour else {})}


def run(name: str, seed: int, work: Path, folder: Path, pool: dict, screen: bool) -> Path:
    """One run of the defaults, with ``pool`` keys set (resumed where it stopped); its directory."""
    out = work / name / f"seed{seed}"
    if not (out / "metrics.json").exists():
        cfg = work / name / "config.yaml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        data = data_section(name, work, folder, screen)
        cfg.write_text(yaml.safe_dump({"seed": seed, "data": data, **CONFIG, **({"pool": pool} if pool else {})}))
        cmd = [sys.executable, "-m", "prune2edge.cli", "run", str(cfg), "--out", str(out), "--seed", str(seed)]
        subprocess.run([*cmd, "--quiet"], check=True, cwd=ROOT)
    return out


def row(name: str, seed: int, run_dir: Path) -> dict:
    """What a run measured, read from its metrics.json and cpu_seconds.json."""
    m = json.loads((run_dir / "metrics.json").read_text())
    cpu = json.loads((run_dir / "cpu_seconds.json").read_text())
    whole = cpu["baseline"] >= WHOLE * json.loads((run_dir / "timings.json").read_text())["baseline"]
    sh, b, device = m["shipped"], m["baseline"], per_device(m)
    return {
        "set": name,
        "seed": seed,
        "run_dir": rel(run_dir),
        "n_train": m["dataset"]["n_train"],
        "n_val": m["dataset"]["n_val"],
        "n_test": m["dataset"]["n_test"],
        "parent_fp32": b["test_acc_fp32"],
        "parent_int8": b["test_acc_int8"],
        "shipped_kind": sh["kind"],
        "shipped_members": sh["members"],
        "k": m["clustering"]["k"],
        "k_reason": m["k_choice"].get("reason"),
        "reason": sh["reason"],
        "test_acc": sh["test_acc"],
        "gain": sh["gain_vs_baseline_fp32"],
        "mcnemar_p": sh["mcnemar_p_vs_baseline_fp32"],
        "bytes_shipped": device["shipped"],
        "bytes_as_run": device["int8"],
        "pool_vote_test_acc": m["pool_vote"]["test_acc"],
        "member_test_acc": [x["test_acc_int8"] for x in m["members"]],
        "cost": sum(cpu[p] for p in POOL) / cpu["baseline"] if whole else None,
    }


def cost(rows: list[dict]) -> str:
    """The mean pool cost of ``rows``, saying how many are not known."""
    known = [r["cost"] for r in rows if r["cost"] is not None]
    if not known:
        return "n/a"
    return f"{statistics.mean(known):.2f}x" + (f" ({len(rows) - len(known)} n/a)" if len(known) < len(rows) else "")


def others_table(others: list[dict]) -> list[str]:
    """Other recipes, each the defaults but for the pool keys its results file names: a row per set and seed, scored
    on the test split (an earlier default) or, for screens, on held-out training images."""
    lines = [
        "",
        "Other recipes, each the defaults but for the pool keys named (`epochs` in parent epochs of 30; "
        "`parent_qat: true`: the parent fine-tuned to 4 bits as a member, `false`: the parent as it is, int8): "
        "the earlier default on the test split, and screens for the default on one seed, scored on 10,000 CIFAR-10 "
        "training images outside every subset (never on the test split). Members: each one's int8 accuracy on the "
        "same images, m000 (the parent) first.",
        "",
        "| recipe | scored on | set | seed | parent fp32 | shipped | members | gain (p) | pool vote | bytes shipped | "
        "bytes as run | cost |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in others:
        what = ", ".join(f"`{k}: {v}`" for k, v in result["pool"].items())
        on = "held-out training images" if result["scored_on"].startswith("10,000") else "test split"
        for r in result["rows"]:
            accs = ", ".join(f"{100 * a:.1f}" for a in r.get("member_test_acc", []))
            lines.append(
                f"| {what} | {on} | {r['set']} | {r['seed']} | {100 * r['parent_fp32']:.2f} | {r['shipped_kind']} of "
                f"{len(r['shipped_members'])} | {accs} | **{100 * r['gain']:+.2f}** (p = {r['mcnemar_p']:.2g}) | "
                f"{100 * r['pool_vote_test_acc']:.2f} | {r['bytes_shipped'] / 1024:.1f} KiB | "
                f"{r['bytes_as_run'] / 1024:.1f} KiB | {cost([r])} |"
            )
    lines.append("")
    for result in others:
        lines.append(f"- `{result['results_file']}`: {result['date']}; `{result['command']}`; {result['load']}")
        lines += [f"  {note}" for note in result.get("notes", [])]
    return lines


def markdown(result: dict | None, others: list[dict]) -> str:
    lines = [
        TITLE,
        "",
        "A user's few thousand images with only data, model (`small_cnn`) and training (30 epochs, batch 64) set: "
        "every other key is the default (the pool: the int8 parent + 2 independent members trained 0.95 of its "
        "epochs with 4-bit QAT; every choice that ships fewer models needs a lead on validation beyond chance). Gain: "
        "points of accuracy of what shipped over the fp32 parent of the same run; p: exact McNemar, two-sided; bytes "
        "per device: the largest shipped model, as shipped (entropy-coded) and as run (the int8 ONNX file the runtime "
        "loads); cost: the pool's phases over the parent's training, CPU seconds (n/a: the parent's training resumed "
        "after a kill, and the killed attempt's CPU seconds are not recorded).",
        "",
    ]
    if result is None:
        lines.append(
            "- The default's rows on the test split are to come: `for s in 0 1 2; do python bench/small_data.py "
            "--seeds $s; done` (resumable)."
        )
    else:
        rows = result["rows"]
        lines += [
            f"- {result['machine']}; {result['date']}; `{result['command']}`; raw numbers: `{result['results_file']}`",
            f"- {result['load']}",
            *(f"- {note}" for note in result.get("notes", [])),  # what a reading of the runs found, kept in the results
            "",
            "| set | seeds | train / val / test | parent fp32 | shipped | k | test acc | gain (per seed, p) | "
            "bytes shipped | bytes as run | cost |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in dict.fromkeys(r["set"] for r in rows):
            rs = [r for r in rows if r["set"] == name]
            mean = lambda key, rs=rs: statistics.mean(r[key] for r in rs)  # noqa: E731
            kinds = ", ".join(f"{r['shipped_kind']} of {len(r['shipped_members'])}" for r in rs)
            gains = "; ".join(f"{100 * r['gain']:+.2f} (p = {r['mcnemar_p']:.2g})" for r in rs)
            lines.append(
                f"| {name} | {len(rs)} | {rs[0]['n_train']} / {rs[0]['n_val']} / {rs[0]['n_test']} | "
                f"{100 * mean('parent_fp32'):.2f} | {kinds} | {', '.join(str(r['k']) for r in rs)} | "
                f"{100 * mean('test_acc'):.2f} | **{100 * mean('gain'):+.2f}**: {gains} | "
                f"{mean('bytes_shipped') / 1024:.1f} KiB | {mean('bytes_as_run') / 1024:.1f} KiB | "
                f"{cost(rs)} |"
            )
    return "\n".join(lines + (others_table(others) if others else [])) + "\n"


def main() -> None:
    ap = argparser(__doc__)
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated (default: {','.join(SETS)})")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data", default=str(DATA), help="folder of the CIFAR-10 npz parts")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "small-data"), help="runs and data subsets")
    ap.add_argument("--load", default="", help="what else ran on the machine, for the record")
    ap.add_argument("--report", action="store_true", help="measure nothing: the section from the results file")
    ap.add_argument("--pool", default="", help="a candidate: pool keys over the defaults, e.g. 'epochs=28.5'")
    ap.add_argument("--tag", default="", help="names a candidate's runs and results file (with --pool)")
    ap.add_argument("--screen", action="store_true",
                    help="score on 10,000 CIFAR-10 training images outside every subset, not the test split")  # fmt: skip
    args = ap.parse_args()
    pool = {k: yaml.safe_load(v) for k, _, v in (kv.partition("=") for kv in args.pool.split(",") if kv)}
    if bool(pool) != bool(args.tag) or (args.screen and "digits" in args.sets.split(",")):
        ap.error("--pool and --tag go together; --screen needs CIFAR-10 sets (digits has no spare images)")
    label = "-".join(["small-data", *([args.tag] if args.tag else []), *(["screen"] if args.screen else [])])
    path = RESULTS / f"{label}.json"
    if not args.report:
        work, rows = Path(args.out).with_name(label), []
        for name in args.sets.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                rows.append(row(name, seed, run(name, seed, work, Path(args.data), pool, args.screen)))
                old = json.loads(path.read_text()) if path.exists() else {"rows": []}
                keep = [r for r in old["rows"] if (r["set"], r["seed"]) not in {(x["set"], x["seed"]) for x in rows}]
                write_result(path, {
                    "machine": machine(), "date": datetime.date.today().isoformat(), "command": command_line(),
                    "pool": pool, "scored_on": "10,000 held-out training images" if args.screen else "the test split",
                    "load": args.load or "what else ran: not recorded", "results_file": rel(path),
                    "rows": sorted(keep + rows, key=lambda r: (SETS.index(r["set"]), r["seed"])),
                    **({"notes": old["notes"]} if "notes" in old else {}),  # what a reading of the runs found
                })  # fmt: skip
    main_file, others = RESULTS / "small-data.json", sorted(RESULTS.glob("small-data-*.json"))
    default = json.loads(main_file.read_text()) if main_file.exists() else None
    publish(TITLE, markdown(default, [json.loads(p.read_text()) for p in others]), not args.no_docs)


if __name__ == "__main__":
    main()
