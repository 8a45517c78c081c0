"""Runtimes: the int8 parent and every member of the digits demo bundle on ONNX Runtime, OpenVINO's CPU plugin and
the ONNX reference evaluator (:mod:`prune2edge.runtimes`): argmax agreement with ONNX Runtime and the largest
difference of a class probability over the whole test split, and the median batch-1 latency with one thread, every
model on every runtime interleaved (:func:`prune2edge.latency.measure_runners`), as a ratio to ONNX Runtime's.

    python bench/runtimes.py                       # runs the demo into runs/bench-runtimes first (about a minute)
    python bench/runtimes.py --run runs/demo       # an existing run of the demo config
    python bench/runtimes.py --runs 500            # more timed runs per model and runtime

Writes bench/results/runtimes-digits.json and the ``## Runtimes`` section of docs/RESULTS.md.
"""

from __future__ import annotations

import datetime
import statistics
from pathlib import Path

import numpy as np
import onnxruntime as ort
from common import RESULTS, argparser, command_line, machine, publish, write_result

from prune2edge import cli, config, latency, pipeline, runtimes, store
from prune2edge.bundle import member_onnx, predict_proba, read_manifest, session
from prune2edge.store import model_dir

TITLE = "## Runtimes"


def models_of(run: Path) -> dict[str, tuple[bytes, Path]]:
    """The int8 parent and every bundle member: the int8 ONNX bytes a device runs, and the fp32 ONNX file."""
    bundle = run / store.BUNDLE
    parent = run / store.BASELINE
    members = {
        e["id"]: (member_onnx(bundle, e), model_dir(run, e["id"]) / store.FP32)
        for e in read_manifest(bundle)["members"]
    }
    return {"parent": ((parent / store.INT8).read_bytes(), parent / store.FP32), **members}


def unfused_session(onnx_bytes: bytes) -> ort.InferenceSession:
    """ONNX Runtime with its graph optimisations off: each DequantizeLinear, then the float operator, as the ONNX
    standard defines the model, instead of its fused int8 kernels."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def measure(models: dict[str, tuple[bytes, Path]], x: np.ndarray, runs: int) -> dict[str, dict[str, dict]]:
    """Per model and runtime: agreement with ONNX Runtime and with the fp32 model over ``x``, and batch-1 latency
    (ms, and its ratio to ONNX Runtime's)."""
    runners = {(m, r): runtimes.load(b, r, threads=1) for m, (b, _) in models.items() for r in runtimes.LOADERS}
    proba = {key: predict_proba(run, x) for key, run in runners.items()}
    fp32 = {m: predict_proba(session(path, threads=1), x).argmax(1) for m, (_, path) in models.items()}
    unfused = {m: predict_proba(unfused_session(b), x).argmax(1) for m, (b, _) in models.items()}
    ms = latency.measure_runners({f"{m}/{r}": run for (m, r), run in runners.items()}, x, runs)
    return {
        m: {
            r: runtimes.compare(proba[m, r], proba[m, "onnxruntime"])
            | {
                "agreement_fp32": float((proba[m, r].argmax(1) == fp32[m]).mean()),
                "latency_ms": ms[f"{m}/{r}"],
                "latency_ratio": ms[f"{m}/{r}"] / ms[f"{m}/onnxruntime"],
            }
            for r in runtimes.LOADERS
        }
        | {
            "onnxruntime_unfused": {
                "agreement_fp32": float((unfused[m] == fp32[m]).mean()),
                "agreement_reference": float((unfused[m] == proba[m, "reference"].argmax(1)).mean()),
            }
        }
        for m in models
    }


def row(runtime: str, version: str, which: str, got: list[dict]) -> str:
    """One table row: the lowest agreements, the largest probability difference, median latency and ratio."""
    return (
        f"| {runtime} {version} | {which} | {100 * min(g['agreement'] for g in got):.2f} % "
        f"| {max(g['max_proba_diff'] for g in got):.4f} | {100 * min(g['agreement_fp32'] for g in got):.2f} % "
        f"| {statistics.median(g['latency_ms'] for g in got):.3f} "
        f"| {statistics.median(g['latency_ratio'] for g in got):.2f} |"
    )


def markdown(result: dict) -> str:
    """The RESULTS.md section: per runtime, a row for the parent and one over the members."""
    members = [per for m, per in result["models"].items() if m != "parent"]
    unfused = {m: per["onnxruntime_unfused"] for m, per in result["models"].items()}
    rows = [
        row(r, result["versions"][r], which, [per[r] for per in got])
        for r in runtimes.LOADERS
        for which, got in (("parent", [result["models"]["parent"]]), (f"{len(members)} members", members))
    ]
    sizes = result["bytes"]
    return "\n".join(
        [
            TITLE,
            "",
            f"The int8 parent and the {len(members)} members of the digits demo bundle (standard ONNX, QDQ, opset "
            f"{result['opset']}), each run on every runtime over the {result['images']} test images. Agreement: the "
            "share of images whose argmax equals ONNX Runtime's (the lowest over the models), or the fp32 model's; "
            "max |Δp|: the largest difference of a class probability from ONNX Runtime's; latency: median ms of one "
            f"batch-1 run with one thread, every model on every runtime interleaved, {result['runs']} timed runs each "
            "(median over the models; ratio: to ONNX Runtime's, per model).",
            "",
            "| runtime | models | argmax = ONNX Runtime's | max abs Δp | argmax = fp32's | batch-1 ms | ms / ONNX Runtime's |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            "ONNX Runtime with its graph optimisations off (each DequantizeLinear, then the float operator, as the "
            "standard defines the model; not its fused int8 kernels): argmax = fp32's on "
            f"{100 * unfused['parent']['agreement_fp32']:.2f} % of the images for the parent "
            f"({100 * min(u['agreement_fp32'] for u in unfused.values()):.2f} % at least over all models), = the "
            f"reference evaluator's on {100 * min(u['agreement_reference'] for u in unfused.values()):.2f} % at "
            "least. Where ONNX Runtime alone departs from the fp32 model, its fused u8s8 int8 kernels are the cause: "
            "on x86 CPUs without VNNI they can saturate 16-bit intermediate sums (ONNX Runtime's quantization "
            f"docs), and a dense model (the parent) sums more non-zero products than a pruned member. CPU: {result['cpu_flags']}.",
            "",
            f"Members as run (int8 ONNX) {sizes['onnx_min']:,}-{sizes['onnx_max']:,} B, as shipped (p2e-sparse-xz) "
            f"{sizes['shipped_min']:,}-{sizes['shipped_max']:,} B.",
            "",
            f"`{result['command']}` on {result['machine']}, {result['date']}.",
        ]
    )


def cpu_flags() -> str:
    """Which of the x86 vector extensions that int8 kernels use this CPU has."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def main() -> None:
    ap = argparser(__doc__)
    ap.add_argument("--run", default="runs/bench-runtimes", help="a run of the demo config (made when missing)")
    ap.add_argument("--runs", type=int, default=200, help="timed runs per model and runtime (default 200)")
    args = ap.parse_args()
    run = Path(args.run)
    if not (run / store.BUNDLE / store.MANIFEST).exists():
        pipeline.run(config.load(cli.DEMO_CONFIG), run, progress=False)
    x = store.tensors(run, "test")[0].numpy()
    entries = read_manifest(run / store.BUNDLE)["members"]
    result = {
        "command": command_line(),
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "images": len(x),
        "runs": args.runs,
        "opset": entries[0]["opset"],
        "cpu_flags": cpu_flags(),
        "versions": {r: runtimes.version(r) for r in runtimes.LOADERS},
        "bytes": {
            f"{k}_{f.__name__}": f(e[key] for e in entries)
            for k, key in (("onnx", "onnx_bytes"), ("shipped", "bytes"))
            for f in (min, max)
        },
        "models": measure(models_of(run), x, args.runs),
    }
    write_result(RESULTS / "runtimes-digits.json", result)
    publish(TITLE, markdown(result), docs=not args.no_docs)


if __name__ == "__main__":
    main()
