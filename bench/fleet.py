"""Fleet over MQTT on loopback vs the same members run sequentially in one process vs the fp32 PyTorch baseline.

    python bench/fleet.py [--run runs/demo] [--repeat 3] [--no-docs]

For k = 3 and 5 members of the demo bundle (k = 3: its first three), on one private Mosquitto:

* fleet, saturated: every digits test image (times --repeat) through `prune2edge.runtime.fleet.classify` as fast as
  the fleet answers (at most 64 frames in flight): frames/s, and the client's round trip p50/p99 under load;
* fleet, paced: --rate frames/s, well under saturation: the decision latency p50/p99 (client send -> client
  receives the decision), and the aggregator's share (first vote or frame seen -> decision);
* sequential: the same k int8 members in this process, one frame at a time (ORT, 1 thread each), voting
  with `Bundle.predict`: frames/s and per-frame latency; also the whole split in one batch;
* pytorch-fp32: the baseline CNN (run_dir/baseline/model.pt), one frame at a time (1 thread), and batched.

All numbers come from one run of this script, side by side. Writes bench/results/fleet.json and the
"## Fleet (MQTT)" section of docs/RESULTS.md (replacing only that section; ``--no-docs``: not).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, argparser, command_line, cpu_model, publish, write_result

from prune2edge.data import load_digits
from prune2edge.runtime import fleet
from prune2edge.runtime.bundle import Bundle, read_manifest

TITLE = "## Fleet (MQTT)"


def pct(values, q: float) -> float:
    return round(float(np.percentile(np.asarray(values, float), q)), 3)


def environment() -> dict:
    """The machine and the software versions the numbers depend on, and the load at the start."""
    mosq = subprocess.run([fleet.find_mosquitto(), "-h"], capture_output=True, text=True).stdout.split("\n")[0]
    import onnxruntime
    import paho.mqtt
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "paho_mqtt": paho.mqtt.__version__,
        "broker": mosq.strip(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def bench_fleet(
    bundle: Path,
    broker: fleet.Broker,
    ids: list[str],
    x: np.ndarray,
    y: np.ndarray,
    offline: np.ndarray,
    rate: float,
    paced_frames: int,
) -> dict:
    with fleet.LocalFleet(bundle, broker, f"bench{len(ids)}", members=ids):
        fleet.classify(broker, f"bench{len(ids)}", x[:50])  # warm up every process
        rows: list[dict] = []
        s = fleet.classify(broker, f"bench{len(ids)}", x, labels=y, on_result=rows.append, max_in_flight=64)
        rows.sort(key=lambda r: r["index"])
        same = [r["class"] for r in rows] == offline.tolist()
        paced: list[dict] = []
        p = fleet.classify(broker, f"bench{len(ids)}", x[:paced_frames], on_result=paced.append, rate=rate)
    return {
        "mode": "fleet-mqtt",
        "k": len(ids),
        "members": ids,
        "frames": s["frames"],
        "frames_per_s": s["frames_per_s"],
        "rtt_ms_p50_saturated": s["rtt_ms_p50"],
        "rtt_ms_p99_saturated": s["rtt_ms_p99"],
        "decided": s["decided"],
        "undecided": s["undecided"],
        "missing": len(s["missing"]),
        "accuracy": s["accuracy"],
        "same_decisions_as_offline": same,
        "paced": {
            "rate": rate,
            "frames": p["frames"],
            "decided": p["decided"],
            "latency_ms_p50": pct([r["rtt_ms"] for r in paced], 50),
            "latency_ms_p99": pct([r["rtt_ms"] for r in paced], 99),
            "aggregator_ms_p50": pct([r["latency_ms"] for r in paced], 50),
            "aggregator_ms_p99": pct([r["latency_ms"] for r in paced], 99),
            "node_infer_ms_p50": pct([v for r in paced for v in r["infer_ms"].values()], 50),
        },
    }


def bench_sequential(bundle: Path, ids: list[str], x: np.ndarray, y: np.ndarray) -> dict:
    b = Bundle.load(bundle, members=ids, threads=1)
    b.predict(x[:20])
    lat, pred = [], []
    t0 = time.perf_counter()
    for i in range(len(x)):
        t = time.perf_counter()
        pred.append(int(b.predict(x[i : i + 1])[0]))
        lat.append((time.perf_counter() - t) * 1000)
    total = time.perf_counter() - t0
    t = time.perf_counter()
    b.predict(x)
    batched = time.perf_counter() - t
    return {
        "mode": "sequential-onnx-int8",
        "k": len(ids),
        "members": ids,
        "frames": len(x),
        "frames_per_s": round(len(x) / total, 2),
        "latency_ms_p50": pct(lat, 50),
        "latency_ms_p99": pct(lat, 99),
        "accuracy": float((np.array(pred) == y).mean()),
        "batched_frames_per_s": round(len(x) / batched, 2),
    }


def bench_torch(run_dir: Path, bundle: Path, x: np.ndarray, y: np.ndarray) -> dict:
    import torch

    from prune2edge.runtime.preprocess import Preprocessing
    from prune2edge.store import load_baseline

    torch.set_num_threads(1)
    model = load_baseline(run_dir).eval()
    prep = Preprocessing.from_dict(read_manifest(bundle)["input"]["preprocess"])
    lat, pred = [], []
    with torch.inference_mode():
        model(torch.from_numpy(prep.apply(x[:20])))
        t0 = time.perf_counter()
        for i in range(len(x)):
            t = time.perf_counter()
            pred.append(int(model(torch.from_numpy(prep.apply(x[i : i + 1]))).argmax(1)[0]))
            lat.append((time.perf_counter() - t) * 1000)
        total = time.perf_counter() - t0
        t = time.perf_counter()
        model(torch.from_numpy(prep.apply(x)))
        batched = time.perf_counter() - t
    return {
        "mode": "pytorch-fp32-baseline",
        "k": 1,
        "frames": len(x),
        "threads": 1,
        "frames_per_s": round(len(x) / total, 2),
        "latency_ms_p50": pct(lat, 50),
        "latency_ms_p99": pct(lat, 99),
        "accuracy": float((np.array(pred) == y).mean()),
        "batched_frames_per_s": round(len(x) / batched, 2),
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        TITLE,
        "",
        f"Measured {result['date']} on {m['cpu']}, {m['cores']} cores ({m['os']}); {m['broker']}, paho-mqtt "
        f"{m['paho_mqtt']}, onnxruntime {m['onnxruntime']}, torch {m['torch']}. Load average (1, 5, 15 min) at the "
        f"start {m['load_average_at_start']}, at the end {m['load_average_at_end']}: with a load above the core count, "
        "other work shared the machine, so treat the numbers as indicative.",
        "",
        f"Command: `{result['command']}`. Data: the digits test split x{result['repeat']} "
        f"({result['frames']} frames of 8x8x1 uint8); everything on one machine, broker on loopback.",
        "",
        "| setup | k | frames/s | latency p50 (ms) | latency p99 (ms) | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        if r["mode"] == "fleet-mqtt":
            p = r["paced"]
            lines.append(
                f"| fleet over MQTT, saturated (64 in flight) | {r['k']} | {r['frames_per_s']:.0f} | "
                f"{r['rtt_ms_p50_saturated']:.1f} | {r['rtt_ms_p99_saturated']:.1f} | {r['accuracy']:.4f} |"
            )
            lines.append(
                f"| fleet over MQTT, paced at {p['rate']:g}/s | {r['k']} | - | {p['latency_ms_p50']:.1f} | "
                f"{p['latency_ms_p99']:.1f} | - |"
            )
        elif r["mode"] == "sequential-onnx-int8":
            lines.append(
                f"| same members in one process, one frame at a time | {r['k']} | {r['frames_per_s']:.0f} | "
                f"{r['latency_ms_p50']:.2f} | {r['latency_ms_p99']:.2f} | {r['accuracy']:.4f} |"
            )
        else:
            lines.append(
                f"| fp32 PyTorch baseline, one frame at a time | 1 | {r['frames_per_s']:.0f} | "
                f"{r['latency_ms_p50']:.2f} | {r['latency_ms_p99']:.2f} | {r['accuracy']:.4f} |"
            )
    lines += [
        "",
        "Batched, for reference (the whole split in one call): "
        + ", ".join(
            f"{'int8 k=' + str(r['k']) if r['k'] > 1 else 'fp32 PyTorch'} {r['batched_frames_per_s']:.0f} frames/s"
            for r in result["results"]
            if "batched_frames_per_s" in r
        )
        + ".",
    ]
    fleets = [r for r in result["results"] if r["mode"] == "fleet-mqtt"]
    lines += [
        "",
        "Fleet latency is client send -> decision received (client clock); in the paced runs the aggregator's "
        "own share (first message of a frame -> decision published) had p50 "
        + ", ".join(f"{r['paced']['aggregator_ms_p50']:.1f} ms (k={r['k']})" for r in fleets)
        + ", and each node's inference p50 "
        + ", ".join(f"{r['paced']['node_infer_ms_p50']:.2f} ms (k={r['k']})" for r in fleets)
        + ". Fleet decisions equal the offline ensemble's (`Bundle.predict`) for every frame: "
        + ", ".join(f"k={r['k']}: {'yes' if r['same_decisions_as_offline'] else 'NO'}" for r in fleets)
        + ".",
        "",
        "On one machine the fleet is slower than running the members in one process: every frame crosses "
        "the broker twice (frame out, k votes in, one decision out) as JSON, and the k node processes share "
        "the same cores. The fleet buys fault tolerance and spreading members over devices, not speed on "
        "one box.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparser(__doc__)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo", help="demo run dir (made if missing)")
    ap.add_argument("--repeat", type=int, default=3, help="send the digits test split this many times")
    ap.add_argument("--rate", type=float, default=50.0, help="frames/s of the paced (latency) runs")
    ap.add_argument("--paced-frames", type=int, default=300)
    a = ap.parse_args()
    if not (a.run / "bundle" / "manifest.json").exists():
        from prune2edge import cli, config, pipeline

        print(f"no bundle in {a.run}: running the demo there first", flush=True)
        pipeline.run(config.load(cli.DEMO_CONFIG), a.run, progress=False)
    bundle = a.run / "bundle"
    ids = [e["id"] for e in read_manifest(bundle)["members"]]
    d = load_digits()
    x, y = np.concatenate([d.x_test] * a.repeat), np.concatenate([d.y_test] * a.repeat)
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": environment(),
        "command": command_line(),
        "repeat": a.repeat,
        "frames": len(x),
        "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp, fleet.Mosquitto(tmp) as broker:
        url = fleet.Broker.parse(broker.url)
        for k in (3, 5):
            members = ids[:k]
            offline = Bundle.load(bundle, members=members).predict(x)
            print(f"k={k}: fleet ...", flush=True)
            result["results"].append(bench_fleet(bundle, url, members, x, y, offline, a.rate, a.paced_frames))
            print(f"k={k}: sequential ...", flush=True)
            result["results"].append(bench_sequential(bundle, members, x, y))
    print("pytorch fp32 ...", flush=True)
    result["results"].append(bench_torch(a.run, bundle, x, y))
    result["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    write_result(RESULTS / "fleet.json", result)
    publish(TITLE, markdown(result), not a.no_docs)


if __name__ == "__main__":
    main()
