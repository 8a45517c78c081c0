"""Rolling a version out to N deployed nodes over a private Mosquitto on loopback, while frames are served.

    python bench/rollout.py [--run runs/demo] [--nodes 5,10,20] [--rate 20] [--shadow-frames 100] [--no-docs]

For each N: a deployed aggregator and N `prune2edge node --trust --store` processes, each with its own empty
store (devices assigned the bundle's members round robin: several nodes per member), then, timed on one clock:

* first deployment: `prune2edge.runtime.fleet.release.publish` of version 1 -> every node runs it and the aggregator
  serves it;
* while a paced, labelled client stream runs (--rate frames/s): publish version 2 (the same members, each device
  another one: so the shadow tally agrees and the promotion is certain)
  -> every node votes with it in shadow (the roll-out), -> the aggregator promotes it after --shadow-frames
  frames, then a signed rollback to version 1 -> every node serves version 1 again;
* frames lost: frames of the stream without a decision (undecided, or no outcome at all); the target is 0.

Writes bench/results/rollout.json and the "## Fleet: rolling out a version (issue 34)" section of
docs/RESULTS.md (``--no-docs``: not).
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, argparser, command_line, machine, publish, write_result

from prune2edge.data import load_digits
from prune2edge.runtime import fleet
from prune2edge.runtime.bundle import read_manifest
from prune2edge.runtime.fleet import release
from prune2edge.runtime.fleet.wire import parse

TITLE = "## Fleet: rolling out a version (issue 34)"


class Watch:
    """Every node's status and the rollout state, as they come."""

    def __init__(self, broker: fleet.Broker, topics: fleet.Topics):
        self.topics, self.status, self.rollout = topics, {}, {}
        self.link = fleet.Link(broker, "bench-watch", [topics.status(), topics.rollout], self._on).start()

    def _on(self, topic: str, payload: bytes) -> None:
        msg = parse(payload, 1 << 20) if payload else {}
        if topic == self.topics.rollout:
            self.rollout = msg
        else:
            self.status[topic.rsplit("/", 1)[1]] = msg

    def until(self, predicate, timeout: float = 300) -> float:
        """Wait for ``predicate``; the monotonic time it became true (polled every 5 ms)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                running = {d: s.get("running") for d, s in sorted(self.status.items())}
                sys.exit(f"timed out; rollout {self.rollout}; nodes running {running}")
            time.sleep(0.005)
        return time.monotonic()

    def all_run(self, devices: list[str], versions: list[int]) -> bool:
        return all(sorted(self.status.get(d, {}).get("running", [])) == versions for d in devices)


def spawn(tmp: Path, name: str, args: list[str], url: str) -> subprocess.Popen:
    home = tmp / name
    home.mkdir()
    with open(home / "log", "wb") as log:
        cmd = [sys.executable, "-m", "prune2edge.cli", *args, "--store", "store", "--broker", url, "--fleet", "bench"]
        return subprocess.Popen(cmd, cwd=home, stdout=log, stderr=subprocess.STDOUT)


def keys(tmp: Path) -> tuple[Path, Path]:
    key, pub = tmp / "release.pem", tmp / "release.pub.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", key], check=True)
    subprocess.run(["openssl", "pkey", "-in", key, "-pubout", "-out", pub], check=True)
    return key, pub


def one_fleet(bundle: Path, n: int, rate: float, shadow_frames: int, x: np.ndarray, y: np.ndarray) -> dict:
    """Deploy, roll out, promote and roll back on ``n`` nodes; the timings and the frames lost."""
    ids = [e["id"] for e in read_manifest(bundle)["members"]]
    devices = [f"n{i:02d}" for i in range(n)]
    v1 = {d: ids[i % 3] for i, d in enumerate(devices)}
    v2 = {d: ids[(i + 1) % 3] for i, d in enumerate(devices)}  # every node another member, the same ensemble
    with tempfile.TemporaryDirectory() as td, fleet.Mosquitto(Path(td) / "broker") as mosq:
        tmp, broker = Path(td), fleet.Broker.parse(mosq.url)
        key, pub = keys(tmp)
        trust = ["--trust", str(pub)]
        procs = [spawn(tmp, "aggregator", ["aggregator", *trust, "--shadow-frames", str(shadow_frames)], mosq.url)]
        procs += [spawn(tmp, d, ["node", *trust, "--device", d], mosq.url) for d in devices]
        watch = Watch(broker, fleet.Topics("bench"))
        try:
            watch.until(lambda: len(watch.status) == n)  # every node is up, empty
            return {"nodes": n} | timed(bundle, broker, key, watch, devices, [v1, v2], (x, y, rate))
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
            watch.link.stop()


def timed(
    bundle: Path, broker: fleet.Broker, key: Path, watch: Watch, devices: list[str], versions: list, data: tuple
) -> dict:
    """Version 1 deployed; then, while a stream runs, version 2 rolled out, judged and (if promoted) rolled back."""
    text = lambda a: ",".join(f"{d}={m}" for d, m in a.items())  # noqa: E731
    t0 = time.monotonic()
    release.publish(bundle, broker, "bench", key, assign=text(versions[0]))
    published = time.monotonic()
    t1 = watch.until(lambda: watch.all_run(devices, [1]) and watch.rollout.get("serving") == 1)
    client, got, undecided = stream(broker, *data)
    time.sleep(2)
    t2 = time.monotonic()
    release.publish(bundle, broker, "bench", key, assign=text(versions[1]))
    t3 = watch.until(lambda: watch.all_run(devices, [1, 2]))
    t4 = watch.until(lambda: watch.rollout.get("state") == "rolled back" or watch.all_run(devices, [2]))
    verdict = f"{watch.rollout['state']}: {watch.rollout['reason']}"
    t5 = t6 = time.monotonic()
    if watch.rollout["state"] == "promoted":
        release.command(broker, "bench", key, "rollback", 1)
        t6 = watch.until(lambda: watch.rollout.get("state") == "rolled back" and watch.all_run(devices, [1]))
    covered = client.is_alive()  # the stream was still running when the rollback was done
    client.join()
    return {
        "publish_s": round(published - t0, 3),
        "first_deploy_s": round(t1 - t0, 3),
        "rollout_to_all_in_shadow_s": round(t3 - t2, 3),
        "verdict": verdict,
        "verdict_after_s": round(t4 - t2, 3),
        "rollback_s": round(t6 - t5, 3) if t6 > t5 else None,
        "frames": got["frames"],
        "decided": got["decided"],
        "review": got["review"],
        "lost": got["undecided"] + len(got["missing"]),
        "resent": got["resent"],
        "accuracy": round(got["accuracy"], 4),
        "stream_outlasted_the_rollback": covered,
        "undecided_reasons": dict(Counter(re.sub(r"only \d+ of", "only N of", r) for r in undecided)),
    }


def stream(broker: fleet.Broker, x: np.ndarray, y: np.ndarray, rate: float) -> tuple:
    """A labelled client stream in a thread: (the thread, its summary when done, the reasons of undecided frames)."""
    got: dict = {}
    undecided: list[str] = []

    def on_result(row: dict) -> None:
        if row["status"] == "undecided":
            undecided.append(f"{row['reason']} (version {row.get('version')})")

    client = threading.Thread(
        target=lambda: got.update(fleet.classify(broker, "bench", x, labels=y, rate=rate, on_result=on_result))
    )
    client.start()
    return client, got, undecided


def markdown(result: dict) -> str:
    lines = [
        TITLE,
        "",
        f"Measured {result['date']} on {result['machine']}; load average at the start {result['load_at_start']}, "
        f"at the end {result['load_at_end']}. Command: `{result['command']}`. Everything on this machine: a private "
        "Mosquitto on loopback, one process per node and the aggregator, each node with its own empty store; the "
        f"client streams the digits test split at {result['rate']:g} frames/s while the versions change; "
        f"version 2 votes in shadow for {result['shadow_frames']} frames before it is promoted.",
        "",
        "| nodes | publish (s) | first deploy (s) | roll-out to all, in shadow (s) | verdict after (s) | rollback (s) | "
        "frames | decided | lost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['nodes']} | {r['publish_s']:.2f} | {r['first_deploy_s']:.2f} | {r['rollout_to_all_in_shadow_s']:.2f} | "
            f"{r['verdict_after_s']:.2f} ({r['verdict'].split(':')[0]}) | "
            f"{'-' if r['rollback_s'] is None else format(r['rollback_s'], '.2f')} | {r['frames']} | "
            f"{r['decided'] + r['review']} | "
            f"{r['lost']}{'' if r['stream_outlasted_the_rollback'] else ' (stream ended before the rollback)'} |"
        )
    lost = [
        f"{r['nodes']} nodes: " + "; ".join(f"{n} x {why}" for why, n in r["undecided_reasons"].items())
        for r in result["results"]
        if r["undecided_reasons"]
    ]
    lines += ["", "Verdicts: " + " | ".join(f"{r['nodes']} nodes: {r['verdict']}" for r in result["results"])]
    lines += ["", "Frames without a decision, and why: " + (" | ".join(lost) if lost else "none.")]
    lines += [
        "",
        "Publish: the `publish` call (it first waits up to 1 s for the fleet's retained release and rollout state, "
        "to number the version). First deploy: publish -> every node runs version 1 (fetched, checked, written, loaded) and the aggregator "
        "serves it. Roll-out: publish of version 2 -> every node votes with it in shadow. Verdict after: from "
        "the same publish to the aggregator's promotion (or rollback, with its reason: below), including the shadow "
        "frames at the stream's rate. Rollback: the signed command -> "
        "every node serves version 1 again. Lost: frames of the stream that got no decision.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparser(__doc__)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo", help="demo run dir (made if missing)")
    ap.add_argument("--nodes", default="5,10,20", help="comma-separated fleet sizes")
    ap.add_argument("--rate", type=float, default=20.0, help="frames/s of the client stream")
    ap.add_argument("--shadow-frames", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=4, help="stream the digits test split this many times")
    a = ap.parse_args()
    if not (a.run / "bundle" / "manifest.json").exists():
        from prune2edge import cli, config, pipeline

        print(f"no bundle in {a.run}: running the demo there first", flush=True)
        pipeline.run(config.load(cli.DEMO_CONFIG), a.run, progress=False)
    d = load_digits()
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "command": command_line(),
        "load_at_start": [round(v, 2) for v in os.getloadavg()],
        "rate": a.rate,
        "shadow_frames": a.shadow_frames,
        "results": [],
    }
    for n in (int(s) for s in a.nodes.split(",")):
        print(f"{n} nodes ...", flush=True)
        x, y = np.concatenate([d.x_test] * a.repeat), np.concatenate([d.y_test] * a.repeat)
        result["results"].append(one_fleet(a.run / "bundle", n, a.rate, a.shadow_frames, x, y))
        print(result["results"][-1], flush=True)
    result["load_at_end"] = [round(v, 2) for v in os.getloadavg()]
    write_result(RESULTS / "rollout.json", result)
    publish(TITLE, markdown(result), not a.no_docs)


if __name__ == "__main__":
    main()
