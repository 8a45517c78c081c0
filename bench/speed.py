"""Training speed: the current ``train.fit`` (and ``train.fit_group`` for a pool) against the training loop as it
was before the speed work, side by side in one process, on synthetic CIFAR-shaped data (no dataset needed).

    python bench/speed.py                          # CPU with 1 and 2 threads, and CUDA where a GPU is
    python bench/speed.py --devices cuda           # only the GPU
    python bench/speed.py --steps 8 --repeats 5    # longer, steadier
    python bench/speed.py --report                 # only the RESULTS.md section, from the results files
    python bench/speed.py --config configs/cifar10-resnet8.yaml --archs resnet8 --pool-archs '' \
        --threads free,1,2 --other-cores idle,busy # ResNet-8 alone, then with every other core kept busy
    python bench/speed.py --devices cuda --archs small_cnn,resnet20 --pool-archs small_cnn,resnet20 \
        --batch-sizes 128,512                      # both networks and their pools at two batch sizes

Networks: the baseline of configs/cifar10-cpu.yaml and resnet20 (``--archs``; the config's own architecture keeps
its ``model.kwargs``), each trained with that config's ``train:`` settings; and a pool of 8 members of the first
(``--pool-archs``), pruned and fine-tuned with its ``pool:`` settings (one after the other with each loop, and all
at once with ``fit_group``). On CUDA the single networks also run with ``torch.compile`` and as a CUDA graph.
``--batch-sizes`` replaces the config's batch sizes (networks and pool members alike) with each one in turn, and
``--pool-steps`` gives each member fewer steps than a network (a pool takes members times longer). A loop that fails is written as a row with its error, and the others go on. Every loop gets the same data, settings
and seeds, and the loops take turns within each repeat, so load from other jobs slows them alike: on a shared
machine the speed-up ``new / old`` (images per second over the reference's) is the number that counts, not the
absolute rates.
``--other-cores busy`` keeps every allowed core but the first busy with a spinning process while it measures, as on a
shared gateway; ``--threads free`` takes the thread count from the cores that are free then
(:func:`prune2edge.cores.free`). A single network's row also gives the share of the core's fp32 peak it reaches: a
training image costs 3 x 2 x its multiply-adds in FLOPs, the peak is a 1024 x 1024 fp32 matrix product on the same
threads (:func:`peak_gflops`).
Writes bench/results/speed-<device>.json (``--results``: another folder) and the ``## Training speed`` section of
docs/RESULTS.md (from speed-cpu.json and speed-cuda.json, where present).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from common import RESULTS, add_config, argparser, command_line, machine, publish, rel, write_result
from torch import nn

from prune2edge import config, cores, models, pool, prune, train

TITLE = "## Training speed"
EPOCH_IMAGES = 45_000  # CIFAR-10's training split less the 10 % validation


# ---------------------------------------------------------------------------------------------------------------
# THE REFERENCE: train.augment_batch and train.fit as they were before the speed work (prune2edge/train.py at
# commit 3ef4ff6~1), copied verbatim but for the checkpoint, validation and progress bar, which this bench does not
# use. Every speed-up is measured against it; leave it as it is.
# ---------------------------------------------------------------------------------------------------------------
def reference_augment_batch(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "none":
        return x
    n, _, h, w = x.shape
    p = max(1, h // 8)
    padded = nn.functional.pad(x, (p, p, p, p), mode="reflect")
    dy, dx = torch.randint(0, 2 * p + 1, (2, n), generator=gen).tolist()
    x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if kind == "crop_flip":
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def reference_fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    s: train.TrainSettings,
    *,
    seed: int,
    augment: str = "none",
    device: str = "cpu",
    after_step: Callable[[int, int], None] | None = None,
) -> list[dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(device)
    steps_per_epoch = max(1, math.ceil(len(x) / s.batch_size))
    total = max(1, round(s.epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    else:
        opt = torch.optim.SGD(
            params, lr=s.lr, momentum=s.momentum, nesterov=s.momentum > 0, weight_decay=s.weight_decay
        )
    sched = train.make_schedule(opt, s.schedule, total, s.cycles)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=s.label_smoothing)
    history, step, t0 = [], 0, time.perf_counter()
    while step < total:
        model.train()
        order = torch.randperm(len(x), generator=gen)
        seen, loss_sum, correct = 0, 0.0, 0
        for i in range(0, len(x), s.batch_size):
            if step >= total:
                break
            idx = order[i : i + s.batch_size]
            xb = reference_augment_batch(x[idx], augment, gen).to(device, non_blocking=True)
            yb = y[idx].to(device, non_blocking=True)
            out = model(xb)
            loss = loss_fn(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if after_step is not None:
                after_step(step, total)
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
        history.append(
            {
                "epoch": len(history) + 1,
                "steps": step,
                "train_loss": loss_sum / seen,
                "train_acc": correct / seen,
                "seconds": time.perf_counter() - t0,
            }
        )
    return history


# ---------------------------------------------------------------------------------------------------------------


Job = Callable[[], Callable[[], object]]  # builds fresh networks (not timed) and returns the training call (timed)


def network(cfg: config.Config) -> nn.Module:
    torch.manual_seed(0)
    return models.build(cfg.model.arch, (32, 32, 3), 10, **cfg.model.kwargs)


def fit(*args, **kwargs) -> list[dict]:
    return train.fit(*args, progress=False, **kwargs)


def single(
    cfg: config.Config, x: torch.Tensor, y: torch.Tensor, device: str, loop: Callable, compile_: str = "none"
) -> Job:
    """One network trained for one epoch of ``x`` with the config's ``train:`` settings."""
    s = train.TrainSettings.of(cfg.train, epochs=1, compile=compile_)

    def prepare() -> Callable[[], object]:
        model = network(cfg)
        return lambda: loop(model, x, y, s, seed=0, augment="crop_flip", device=device)

    return prepare


def members(cfg: config.Config, x: torch.Tensor, y: torch.Tensor, device: str) -> list[train.Member]:
    """The pool's members as ``pool.plan`` samples them (seeds, sparsities, rates), each with its pruning hook, for
    one epoch of ``x``; the network is the baseline architecture (its weights do not matter for speed)."""
    p = cfg.pool
    out = []
    for m in pool.plan(cfg):
        model = network(cfg).to(device)
        s = train.TrainSettings.of(
            epochs=1,
            batch_size=m.batch_size,
            optimizer=p.optimizer,
            lr=m.lr,
            momentum=p.momentum,
            weight_decay=p.weight_decay,
            schedule=p.lr_schedule,
            label_smoothing=p.label_smoothing,
        )
        pruner = prune.MagnitudePruner(
            models.prunable(model),
            m.sparsity,
            p.schedule,
            p.scope,
            round(p.prune_end * math.ceil(len(x) / m.batch_size)),
            noise=p.mask_noise,
            seed=m.seed,
        )
        pruner.update(pruner.target(0))
        out.append(train.Member(model, x, y, s, m.seed, pruner))
    return out


def one_by_one(cfg: config.Config, x: torch.Tensor, y: torch.Tensor, device: str, loop: Callable) -> Job:
    def prepare() -> Callable[[], object]:
        ms = members(cfg, x, y, device)
        return lambda: [
            loop(
                m.model, m.x, m.y, m.settings, seed=m.seed, augment="crop_flip", device=device, after_step=m.after_step
            )
            for m in ms
        ]

    return prepare


def lockstep(cfg: config.Config, x: torch.Tensor, y: torch.Tensor, device: str) -> Job:
    def prepare() -> Callable[[], object]:
        ms = members(cfg, x, y, device)
        return lambda: train.fit_group(ms, augment="crop_flip", device=device, progress=False)

    return prepare


def singles(cfg: config.Config, x: torch.Tensor, y: torch.Tensor, device: str) -> dict[str, Job]:
    jobs = {"reference": single(cfg, x, y, device, reference_fit), "fit": single(cfg, x, y, device, fit)}
    if device == "cuda":
        jobs["fit, compile"] = single(cfg, x, y, device, fit, "torch")
        jobs["fit, cuda-graph"] = single(cfg, x, y, device, fit, "cuda-graph")
    return jobs


def pools(cfg: config.Config, x: torch.Tensor, y: torch.Tensor, device: str) -> dict[str, Job]:
    return {
        "reference": one_by_one(cfg, x, y, device, reference_fit),
        "fit": one_by_one(cfg, x, y, device, fit),
        "fit_group (lockstep)": lockstep(cfg, x, y, device),
    }


def timings(jobs: dict[str, Job], repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds of each job in each round; the jobs take turns, each round starting with the next one."""
    seconds: dict[str, list[float]] = {name: [] for name in jobs}
    names = list(jobs)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            run = jobs[name]()
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def rows(
    case: str,
    make: Callable[[torch.Tensor, torch.Tensor], dict[str, Job]],
    data: tuple[torch.Tensor, torch.Tensor],
    warm: tuple[torch.Tensor, torch.Tensor],
    images: int,
    steps: int,
    per_epoch: int,
    repeats: int,
    device: str,
    threads: int | None,
    batch: int | None,
) -> list[dict]:
    """One row per loop: rates from the median round, and the speed-up as the median over rounds of old / new seconds.
    Every loop first trains on ``warm`` (one batch) untimed: kernel selection, caches, CUDA set-up. A loop other
    than the reference that fails there gets a row with its error instead, and is not timed."""
    head = {"case": case, "device": device, "threads": threads, "batch_size": batch}
    failed: dict[str, str] = {}
    for name, job in make(*warm).items():
        try:
            job()()
        except Exception as e:  # the error is the row: one broken loop must not lose the others
            if name == "reference":
                raise
            failed[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            print(f"{case:48s} {device} {threads or '-'}t {name:22s} FAILED {failed[name]}", flush=True)
    jobs = {name: job for name, job in make(*data).items() if name not in failed}
    seconds = timings(jobs, repeats, device)
    ref = seconds["reference"]
    out = [{**head, "loop": name, "error": error} for name, error in failed.items()]
    for name, t in seconds.items():
        mid = statistics.median(t)
        out.append(
            {
                **head,
                "loop": name,
                "images": images,
                "steps": steps,
                "seconds": [round(v, 4) for v in t],
                "images_per_s": images / mid,
                "steps_per_s": steps / mid,
                "seconds_per_epoch": per_epoch * mid / images,
                "speedup_vs_reference": statistics.median(a / b for a, b in zip(ref, t)),
            }
        )
        print(
            f"{case:48s} {device} {threads or '-'}t {name:22s} {images / mid:8.0f} img/s {steps / mid:7.2f} steps/s "
            f"{out[-1]['seconds_per_epoch']:8.1f} s/epoch  x{out[-1]['speedup_vs_reference']:.2f}",
            flush=True,
        )
    return out


def peak_gflops(repeats: int = 20) -> float:
    """fp32 GFLOP/s of a 1024 x 1024 matrix product on torch's current threads: the best of ``repeats``."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best / 1e9


def spin_other_cores() -> list[subprocess.Popen]:
    """A process spinning on each allowed core but the first, as other jobs on a shared machine would."""
    others = sorted(cores.allowed())[1:]
    code = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(c)]) for c in others]
    time.sleep(1.0)  # let them start before the free cores are counted
    return procs


@dataclass(frozen=True)
class Grid:
    """What one run measures: networks, pools, batch sizes (None: the config's) and each pool member's steps (None:
    as many as a network's)."""

    archs: list[str]
    pool_archs: list[str]
    batches: list[int | None]
    pool_steps: int | None = None


def bench_device(
    cfg: config.Config, device: str, steps: int, repeats: int, threads: int | None, grid: Grid
) -> list[dict]:
    """Rows of every network and pool of ``grid``, at each of its batch sizes."""
    out = []
    for b in grid.batches:
        c = (
            cfg
            if b is None
            else config.load(None, config.merged(cfg, {"train": {"batch_size": b}, "pool": {"batch_size": [b]}}))
        )
        out += bench_batch(c, device, steps, repeats, threads, grid, b)
    return out


def bench_batch(
    cfg: config.Config, device: str, steps: int, repeats: int, threads: int | None, grid: Grid, forced: int | None
) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    batch = cfg.train.batch_size
    x, y = torch.randn(steps * batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (steps * batch,), generator=gen)
    warm = x[:batch], y[:batch]
    suffix = "" if forced is None else f", batch {forced}"
    out = []
    for arch in grid.archs:
        c = with_model(cfg, arch)
        gflop = 6 * prune.macs_of(network(c), x[:1]) / 1e9  # forward 2 x MACs, backward twice that
        out += [
            r | {"gflop_per_image": gflop}
            for r in rows(
                describe(c.model) + suffix,
                lambda x, y, c=c: singles(c, x, y, device),
                (x, y),
                warm,
                len(x),
                math.ceil(len(x) / batch),
                EPOCH_IMAGES,
                repeats,
                device,
                threads,
                batch,
            )
        ]
    n = cfg.pool.size
    px, py = (x, y) if grid.pool_steps is None else (x[: grid.pool_steps * batch], y[: grid.pool_steps * batch])
    for arch in grid.pool_archs:
        c = with_model(cfg, arch)
        pool_steps = sum(math.ceil(len(px) / m.batch_size) for m in pool.plan(c))
        out += rows(
            f"pool of {n} x {describe(c.model)}{suffix}",
            lambda x, y, c=c: pools(c, x, y, device),
            (px, py),
            warm,
            n * len(px),
            pool_steps,
            n * EPOCH_IMAGES,
            repeats,
            device,
            threads,
            forced,
        )
    return out


def with_model(cfg: config.Config, arch: str) -> config.Config:
    """The config for its own architecture, else with ``arch`` and its default kwargs."""
    return (
        cfg
        if arch == cfg.model.arch
        else config.load(None, config.merged(cfg, {"model": {"arch": arch, "kwargs": {}}}))
    )


def describe(model: config.Model) -> str:
    return " ".join([model.arch, *(f"{k}={v}" for k, v in model.kwargs.items())])


def markdown(results: list[dict], folder: Path) -> str:
    lines = [
        TITLE,
        "",
        "Training throughput of `train.fit` (and `train.fit_group` for a pool) against the loop before the speed work "
        "(kept in `bench/speed.py` as the reference), measured side by side in one process on synthetic 32x32x3 data "
        "with crop + flip augmentation. s/epoch: one epoch of 45,000 images (a pool: every member's epoch). "
        "new / old: the median over rounds of the reference's seconds over the loop's; on a shared machine this "
        "ratio is the number to read, the absolute rates move with the load. Other cores busy: a process spins on "
        "every allowed core but the first; threads 'free': as many as the cores free then. Of fp32 peak: images/s "
        "x 6 x multiply-adds per image, over a 1024 x 1024 fp32 matrix product's GFLOP/s on the same threads.",
        "",
    ]
    for r in results:
        lines += [
            f"- {r['device']}: {r['machine']}; torch {r['torch']}; {r['date']}; load average {r['load_average'][0]:.1f} "
            f"before, {r['load_average'][1]:.1f} after; {r['repeats']} rounds; `{r['command']}`; raw numbers: `{r['results_file']}`"
        ]
    if not any(r["device"] == "cuda" for r in results):
        lines.append(
            "- cuda: not measured yet (no GPU where this ran); `python bench/speed.py` on a machine with one adds it, "
            "with the `cuda-graph` step"
        )
    lines += [
        "",
        "| network | device | other cores | threads | loop | images/s | steps/s | s/epoch | new / old | of fp32 peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for x in r["rows"]:
            threads = f"{x['threads']} ({x['threads_asked']})" if x.get("threads_asked") == "free" else x["threads"]
            head = f"| {x['case']} | {x['device']} | {x.get('other_cores', 'idle')} | {threads or '-'} | {x['loop']} |"
            if "error" in x:
                lines.append(f"{head} failed: {x['error']} | | | | |")
                continue
            peak = x["images_per_s"] * x["gflop_per_image"] / x["peak_gflops"] if "gflop_per_image" in x else None
            lines.append(
                f"{head} {x['images_per_s']:.0f} | {x['steps_per_s']:.2f} | {x['seconds_per_epoch']:.0f} | "
                f"{x['speedup_vs_reference']:.2f} | {'–' if peak is None else f'{100 * peak:.0f} %'} |"
            )
    for r in results:
        lines += history(r, folder)
    return "\n".join(lines) + "\n"


def history(latest: dict, results: Path) -> list[str]:
    """Every run of this bench on the device, earliest first (``speed-<device>-earlier/``, then the latest): the
    speed-up of ``fit`` per network and thread count, to show how much it moves from run to run."""
    folder = results / f"speed-{latest['device']}-earlier"
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("run*.json"), key=lambda p: int(p.stem[3:]))]
    if not runs:
        return []
    runs.append(latest)

    def key(x: dict) -> tuple:
        return x["case"], x["threads"], x.get("other_cores", "idle")

    cols = sorted(
        {key(x) for r in runs for x in r["rows"] if x["loop"] == "fit" and "error" not in x},
        key=lambda c: (c[2], c[1] or 0, c[0]),
    )
    lines = [
        "",
        f"Every {latest['device']} run of this bench (the table above is the last): new / old of `fit`, "
        f"per network and threads; raw numbers of the earlier runs in `{rel(folder)}/`.",
        "",
        "| run | date | command | load before, after | "
        + " | ".join(f"{c} ({t}t{', busy' if o == 'busy' else ''})" for c, t, o in cols)
        + " |",
        "|---|---|---|---|" + "---|" * len(cols),
    ]
    for i, r in enumerate(runs, 1):
        ratio = {key(x): x["speedup_vs_reference"] for x in r["rows"] if x["loop"] == "fit" and "error" not in x}
        cells = [f"{ratio[c]:.2f}" if c in ratio else "–" for c in cols]
        lines.append(
            f"| {i} | {r['date']} | `{r['command']}` | {r['load_average'][0]:.1f}, {r['load_average'][1]:.1f} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def main() -> None:
    ap = argparser(__doc__)
    add_config(ap)
    ap.add_argument(
        "--steps", type=int, default=2, help="training steps per network (pool: per member) on the CPU (default 2)"
    )
    ap.add_argument("--cuda-steps", type=int, default=100, help="the same on CUDA (default 100)")
    ap.add_argument("--pool-steps", type=int, help="training steps per pool member (default: as a network's)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    ap.add_argument("--pool-size", type=int, default=8)
    ap.add_argument("--threads", default="1,2", help="CPU thread counts, or free (the free cores; default 1,2)")
    ap.add_argument(
        "--other-cores", default="idle", help="idle, busy or idle,busy: busy spins every allowed core but the first"
    )
    ap.add_argument("--devices", default="cpu,cuda", help="cpu, cuda or both (default; cuda only where a GPU is)")
    ap.add_argument("--archs", help="networks, comma-separated (default: the config's and resnet20)")
    ap.add_argument("--pool-archs", help="networks whose pools are measured, comma-separated (default: the config's)")
    ap.add_argument("--batch-sizes", help="batch sizes, comma-separated (default: the config's)")
    ap.add_argument("--results", default=str(RESULTS), help="folder of the results files")
    ap.add_argument("--report", action="store_true", help="measure nothing: write the section from the results files")
    args = ap.parse_args()
    cfg = config.load(
        args.config, {"pool": {"size": args.pool_size}, "cluster": {"k": 1}}
    )  # clustering plays no part here
    own = cfg.model.arch
    archs = args.archs.split(",") if args.archs else [own, "resnet20"]
    pool_archs = [a for a in args.pool_archs.split(",") if a] if args.pool_archs is not None else [own]
    batches = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [None]
    if not set(args.other_cores.split(",")) <= {"idle", "busy"}:
        ap.error(f"--other-cores takes idle, busy or idle,busy, not '{args.other_cores}'")
    grid = Grid(archs, pool_archs, batches, args.pool_steps)
    results_dir = Path(args.results)
    command = command_line()
    measured = [] if args.report else args.devices.split(",")
    for device in [d for d in measured if d == "cpu" or torch.cuda.is_available()]:
        load = os.getloadavg()[0]
        if device == "cpu":
            out = []
            for other in args.other_cores.split(","):
                spinners = spin_other_cores() if other == "busy" else []
                try:
                    for v in args.threads.split(","):
                        t = cores.free() if v == "free" else int(v)
                        torch.set_num_threads(t)
                        peak = peak_gflops()
                        out += [
                            r | {"other_cores": other, "threads_asked": v, "peak_gflops": peak}
                            for r in bench_device(cfg, device, args.steps, args.repeats, t, grid)
                        ]
                finally:
                    for p in spinners:
                        p.kill()
            name = machine()
        else:
            out = bench_device(cfg, device, args.cuda_steps, args.repeats, None, grid)
            name = f"{torch.cuda.get_device_name()}; {machine()}"
        path = results_dir / f"speed-{device}.json"
        if path.exists():  # the earlier run is kept: the speed-up moves from run to run on a shared machine
            earlier = path.with_name(f"speed-{device}-earlier")
            earlier.mkdir(exist_ok=True)
            path.rename(earlier / f"run{len(list(earlier.glob('run*.json'))) + 1}.json")
        result = {
            "device": device,
            "machine": name,
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "command": command,
            "config": rel(args.config),
            "repeats": args.repeats,
            "load_average": [load, os.getloadavg()[0]],
            "results_file": rel(path),
            "rows": out,
        }
        write_result(path, result)
    files = [results_dir / f"speed-{device}.json" for device in ("cpu", "cuda")]
    results = [json.loads(p.read_text()) for p in files if p.exists()]
    publish(TITLE, markdown(results, results_dir), not args.no_docs)


if __name__ == "__main__":
    main()
