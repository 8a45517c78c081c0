"""Ray's overhead on one machine: the same pool of 8 members trained through ``executor: ray`` and through the local
process pool, side by side in one run, on scikit-learn's digits (no download).

    OMP_NUM_THREADS=1 python bench/ray_pool.py                # the demo config's pool, 8 members, 3 rounds
    python bench/ray_pool.py --size 16 --repeats 3

One run of the demo config is prepared and its baseline trained once; every pool starts from a copy of it, with as
many workers as the machine has cores, each member training with one thread. The setups take turns within each
round, so load from other jobs slows them alike:

- ``local``: ``executors.make_executor(workers)``, a spawned process pool (its start and shutdown timed);
- ``ray, new instance``: ``executor: ray`` with no ``ray.address``: a Ray instance started for the pool and stopped
  after, both timed (what a run on one machine costs);
- ``ray, running cluster``: a Ray instance already running on this machine (started once, before the rounds), each
  pool a new driver that connects to it (a new Ray job, whose workers start within the timing): the cluster case.

Overhead: a setup's seconds over ``local``'s, the median over rounds. Every setup must write the same member files
(checked: bit-identical ``model.pt``). Writes bench/results/ray-pool.json and the ``## Pool on Ray`` section of
docs/RESULTS.md.
"""

from __future__ import annotations

import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, argparser, command_line, machine, publish, rel, write_result

from prune2edge import cli, config, executors, pool
from prune2edge.executors import RayExecutor

TITLE = "## Pool on Ray"
# a Ray instance that outlives the pools: started in its own process, stopped when its stdin closes
CLUSTER = (
    "import ray, sys; ray.init(num_cpus=int(sys.argv[1]), include_dashboard=False); "
    "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read(); ray.shutdown()"
)


def timed_pool(prepared: Path, run_dir: Path, cfg: config.Config, executor) -> tuple[float, float]:
    """Seconds to build the whole pool from a copy of ``prepared`` (the executor's start and shutdown included),
    and the members' own training seconds, summed."""
    shutil.copytree(prepared, run_dir)
    t0 = time.perf_counter()
    with executor() as ex:
        members = pool.build(run_dir, cfg, ex, progress=False)
    return time.perf_counter() - t0, sum(m.seconds for m in members)


def markdown(r: dict) -> str:
    about = (
        f"A pool of {r['size']} members (`prune2edge/demo.yaml`: digits, small_cnn width 16 depth 3, {r['epochs']} epochs "
        f"each) trained three ways on one machine with {r['workers']} workers, one thread per member, the setups taking "
        "turns within each round: the local process pool (`workers`), `executor: ray` starting its own Ray instance "
        "(start and stop timed), and `executor: ray` connecting to a Ray instance already running (a new Ray job per "
        "pool, its workers started within the timing). Overhead: seconds over the local pool's, the median over rounds; "
        "on a shared machine this ratio is the number to read. Member seconds: each member's training as timed inside "
        "its worker, summed."
    )
    where = (
        f"- {r['machine']}; torch {r['torch']}, ray {r['ray']}; {r['date']}; load average {r['load_average'][0]:.1f} "
        f"before, {r['load_average'][1]:.1f} after; {r['repeats']} rounds; `{r['command']}`; raw numbers: `{r['results_file']}`"
    )
    lines = [
        TITLE,
        "",
        about,
        "",
        where,
        f"- every setup wrote bit-identical member weights: {'yes' if r['identical_members'] else 'NO'}",
        "",
        "| setup | seconds (median) | seconds per round | member seconds (sum, median) | overhead vs local |",
        "|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['setup']} | {row['seconds']:.1f} | {', '.join(f'{s:.1f}' for s in row['rounds'])} | "
            f"{row['member_seconds']:.1f} | {row['overhead']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparser(__doc__)
    ap.add_argument("--size", type=int, default=8, help="members in the pool (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    args = ap.parse_args()
    import ray  # here, not at the top: the local pool's spawned workers import this module, as they would the CLI

    from prune2edge import pipeline

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.pop("RAY_ADDRESS", None)  # "new instance" must start its own
    workers = os.cpu_count() or 1
    cfg = config.load(
        cli.DEMO_CONFIG, {"pool": {"size": args.size}, "cluster": {"k": 1}}
    )  # clustering plays no part here
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ray-pool-") as tmp:
        prepared = Path(tmp) / "prepared"
        pipeline.prepare(prepared, cfg)
        pipeline.baseline(prepared, cfg, progress=False)
        cluster = subprocess.Popen(
            [sys.executable, "-c", CLUSTER, str(workers)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            address = cluster.stdout.readline().strip()
            setups = {
                "local (process pool)": lambda: executors.make_executor(workers),
                "ray, new instance": lambda: RayExecutor(),
                "ray, running cluster": lambda: RayExecutor(address=address),
            }
            times: dict[str, list[tuple[float, float]]] = {s: [] for s in setups}
            identical = True
            for i in range(args.repeats):
                for j, (name, make) in enumerate(setups.items()):
                    times[name].append(timed_pool(prepared, Path(tmp) / f"r{i}s{j}", cfg, make))
                    print(f"round {i + 1}: {name}: {times[name][-1][0]:.1f} s", flush=True)
                    identical &= all(
                        (Path(tmp) / f"r{i}s{j}" / "pool" / m.name / "model.pt").read_bytes()
                        == (Path(tmp) / "r0s0" / "pool" / m.name / "model.pt").read_bytes()
                        for m in pool.plan(cfg)
                    )
        finally:
            cluster.stdin.close()
            cluster.wait(60)
    local = statistics.median(t for t, _ in times["local (process pool)"])
    rows = [
        {
            "setup": name,
            "rounds": [t for t, _ in ts],
            "seconds": statistics.median(t for t, _ in ts),
            "member_seconds": statistics.median(m for _, m in ts),
            "overhead": statistics.median(t for t, _ in ts) / local,
        }
        for name, ts in times.items()
    ]
    path = RESULTS / "ray-pool.json"
    result = {
        "machine": machine(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "date": datetime.date.today().isoformat(),
        "command": command_line(),
        "size": args.size,
        "workers": workers,
        "epochs": list(cfg.pool.epochs),
        "repeats": args.repeats,
        "load_average": [load, os.getloadavg()[0]],
        "identical_members": identical,
        "results_file": rel(path),
        "rows": rows,
    }
    write_result(path, result)
    publish(TITLE, markdown(result), not args.no_docs)


if __name__ == "__main__":
    main()
