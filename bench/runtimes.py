"""Runtimes: the int8 parent and every member of a bundle on ONNX Runtime (as prune2edge runs it, and with its
default int8 kernels), OpenVINO's CPU plugin, the ONNX reference evaluator (:mod:`prune2edge.runtime.runtimes`) and LiteRT
(each model exported to a full-integer .tflite, :func:`prune2edge.export.to_tflite`): argmax agreement with ONNX
Runtime and with the fp32 model, the largest difference of a class probability, and the median batch-1 latency with
one thread, every model on every runtime interleaved (:func:`prune2edge.runtime.latency.measure_runners`), as a ratio to
ONNX Runtime's; the .tflite sizes beside MLPerf Tiny's reference.

    python bench/runtimes.py                       # runs the demo into runs/bench-runtimes first (about a minute)
    python bench/runtimes.py --run runs/demo       # an existing run (any dataset), named after its dataset
    python bench/runtimes.py --run R --name cifar10-resnet8 --reference-images 500

Writes bench/results/runtimes-<name>.json and the ``## Runtimes: <name>`` section of docs/RESULTS.md.
"""

from __future__ import annotations

import datetime
import statistics
import tempfile
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import onnxruntime as ort
from common import RESULTS, argparser, command_line, machine, publish, write_result

from prune2edge import cli, config, export, pipeline, store
from prune2edge.runtime import latency, runtimes
from prune2edge.runtime.bundle import member_onnx, predict_proba, read_manifest, session
from prune2edge.store import model_dir

TITLE = "## Runtimes"
DEFAULT_KERNELS = "onnxruntime (default int8 kernels)"  # ONNX Runtime without session.x64quantprecision
LITERT = "litert (.tflite)"


def models_of(run: Path) -> dict[str, tuple[bytes, Path]]:
    """The int8 parent and every bundle member: the int8 ONNX bytes a device runs, and the fp32 ONNX file."""
    bundle = run / store.BUNDLE
    parent = run / store.BASELINE
    members = {
        e["id"]: (member_onnx(bundle, e), model_dir(run, e["id"]) / store.FP32)
        for e in read_manifest(bundle)["members"]
    }
    return {"parent": ((parent / store.INT8).read_bytes(), parent / store.FP32), **members}


def default_kernels(onnx_bytes: bytes) -> runtimes.Runner:
    """ONNX Runtime as it comes, one thread: its fused int8 kernels at their default precision."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return runtimes.of_session(ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"]))


def runners_of(onnx_bytes: bytes, tflite_bytes: bytes) -> dict[str, runtimes.Runner]:
    """One model on every runtime, one thread each."""
    return {
        **{r: runtimes.load(onnx_bytes, r, threads=1) for r in runtimes.LOADERS},
        DEFAULT_KERNELS: default_kernels(onnx_bytes),
        LITERT: runtimes.load_tflite(tflite_bytes, threads=1),
    }


def measure(
    models: dict[str, tuple[bytes, Path]], tflite: dict[str, bytes], x: np.ndarray, runs: int, reference_images: int
) -> dict[str, dict[str, dict]]:
    """Per model and runtime: agreement with ONNX Runtime and with the fp32 model (the reference evaluator on the
    first ``reference_images`` of ``x`` only), and batch-1 latency (ms, and its ratio to ONNX Runtime's)."""
    runners = {(m, r): run for m, (b, _) in models.items() for r, run in runners_of(b, tflite[m]).items()}
    proba = {
        (m, r): predict_proba(run, x[:reference_images] if r == "reference" else x) for (m, r), run in runners.items()
    }
    fp32 = {m: predict_proba(session(path, threads=1), x).argmax(1) for m, (_, path) in models.items()}
    ms = latency.measure_runners({f"{m}/{r}": run for (m, r), run in runners.items()}, x, runs)
    out: dict[str, dict[str, dict]] = {m: {} for m in models}
    for (m, r), p in proba.items():
        out[m][r] = runtimes.compare(p, proba[m, "onnxruntime"][: len(p)]) | {
            "images": len(p),
            "agreement_fp32": float((p.argmax(1) == fp32[m][: len(p)]).mean()),
            "latency_ms": ms[f"{m}/{r}"],
            "latency_ratio": ms[f"{m}/{r}"] / ms[f"{m}/onnxruntime"],
        }
    return out


def row(runtime: str, which: str, got: list[dict]) -> str:
    """One table row: the lowest agreements, the largest probability difference, median latency and ratio."""
    return (
        f"| {runtime} | {which} | {got[0]['images']:,} | {100 * min(g['agreement'] for g in got):.2f} % "
        f"| {max(g['max_proba_diff'] for g in got):.4f} | {100 * min(g['agreement_fp32'] for g in got):.2f} % "
        f"| {statistics.median(g['latency_ms'] for g in got):.3f} "
        f"| {statistics.median(g['latency_ratio'] for g in got):.2f} |"
    )


def markdown(result: dict) -> str:
    """The RESULTS.md section: per runtime, a row for the parent and one over the members."""
    members = [per for m, per in result["models"].items() if m != "parent"]
    rows = [
        row(f"{r} {result['versions'][r]}", which, [per[r] for per in got])
        for r in result["models"]["parent"]
        for which, got in (("parent", [result["models"]["parent"]]), (f"{len(members)} members", members))
    ]
    sizes, tflite = result["bytes"], result["tflite_bytes"]
    return "\n".join(
        [
            f"{TITLE}: {result['name']}",
            "",
            f"The int8 parent and the {len(members)} members of the {result['name']} bundle (standard ONNX, QDQ, "
            f"opset {result['opset']}), each run on every runtime over the run's {result['images']:,} test images "
            "(the reference evaluator: the first ones only). Agreement: the share of images whose argmax equals "
            "ONNX Runtime's (the lowest over the models), or the fp32 model's; max |Δp|: the largest difference of a "
            "class probability from ONNX Runtime's; latency: median ms of one batch-1 run with one thread, every "
            f"model on every runtime interleaved, {result['runs']} timed runs each (median over the models; ratio: "
            f"to ONNX Runtime's, per model). LiteRT runs each model exported to a full-integer .tflite "
            f"(`prune2edge export --format tflite`, {export.CALIBRATION_IMAGES} training images calibrate it).",
            "",
            "| runtime | models | images | argmax = ONNX Runtime's | max abs Δp | argmax = fp32's | batch-1 ms | ms / ONNX Runtime's |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"ONNX Runtime runs its int8 kernels in high precision in prune2edge (`session.x64quantprecision`); "
            f"'{DEFAULT_KERNELS}' is the same model without that option: on x86 CPUs without VNNI its u8 x s8 kernels "
            f"add pairs of products in 16 bits, which saturate for 8-bit weights. CPU: {result['cpu_flags']}. With "
            "every model on every runtime taking turns, each run finds colder caches than on a device that runs one "
            "model: compare the ratios, not the milliseconds, with a device's.",
            "",
            f"Sizes: the members as run (int8 ONNX) {sizes['onnx_min']:,}-{sizes['onnx_max']:,} B, as shipped "
            f"(p2e-sparse-xz) {sizes['shipped_min']:,}-{sizes['shipped_max']:,} B; as .tflite {min(tflite.values()):,}-"
            f"{max(tflite.values()):,} B (parent {tflite['parent']:,} B), beside MLPerf Tiny's int8 ResNet-8, "
            f"{export.MLPERF_TINY_BYTES:,} B.",
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


def to_tflite(models: dict[str, tuple[bytes, Path]], run: Path) -> dict[str, bytes]:
    """Each model as a full-integer .tflite, calibrated on the run's training images as the export command does."""
    calibration = export.calibration_images(store.tensors(run, "train")[0].numpy())
    with tempfile.TemporaryDirectory() as tmp:
        return {
            m: export.to_tflite(b, calibration, Path(tmp) / f"{m}.tflite").read_bytes() for m, (b, _) in models.items()
        }


def main() -> None:
    ap = argparser(__doc__)
    ap.add_argument("--run", default="runs/bench-runtimes", help="a finished run (the demo is run there when missing)")
    ap.add_argument("--name", help="what the section and result file are called (default: the run's dataset)")
    ap.add_argument("--runs", type=int, default=200, help="timed runs per model and runtime (default 200)")
    ap.add_argument("--reference-images", type=int, help="test images the slow reference evaluator sees (default all)")
    args = ap.parse_args()
    run = Path(args.run)
    if not (run / store.BUNDLE / store.MANIFEST).exists():
        pipeline.run(config.load(cli.DEMO_CONFIG), run, progress=False)
    name = args.name or store.read_json(run / "dataset.json")["name"]
    x = store.tensors(run, "test")[0].numpy()
    entries = read_manifest(run / store.BUNDLE)["members"]
    models = models_of(run)
    tflite = to_tflite(models, run)
    result = {
        "name": name,
        "command": command_line(),
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "images": len(x),
        "runs": args.runs,
        "opset": entries[0]["opset"],
        "cpu_flags": cpu_flags(),
        "versions": {r: runtimes.version(r) for r in runtimes.LOADERS}
        | {DEFAULT_KERNELS: runtimes.version("onnxruntime"), LITERT: package_version("ai-edge-litert")},
        "bytes": {
            f"{k}_{f.__name__}": f(e[key] for e in entries)
            for k, key in (("onnx", "onnx_bytes"), ("shipped", "bytes"))
            for f in (min, max)
        },
        "tflite_bytes": {m: len(b) for m, b in tflite.items()},
        "models": measure(models, tflite, x, args.runs, args.reference_images or len(x)),
    }
    write_result(RESULTS / f"runtimes-{name}.json", result)
    publish(f"{TITLE}: {name}", markdown(result), docs=not args.no_docs)


if __name__ == "__main__":
    main()
