"""``prune2edge``: a thin command-line shell over the Python API."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .errors import UserError

if TYPE_CHECKING:
    from .config import Config

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")
ABSTAIN_HELP = (
    "Send a frame to review (no class) when the vote's margin, the winner's score minus the runner-up's, is "
    "below T (0 decides every frame). Default: the bundle's threshold, chosen on validation."
)
# What the training extra adds (module -> its pip name): without them, commands that train, report or evaluate stop
# with one line that names the extra. predict, node, aggregator, classify and fleet need none of them.
TRAINING_MODULES = {
    "torch": "torch",
    "onnx": "onnx",
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "yaml": "pyyaml",
    "pydantic": "pydantic",
    "annotated_types": "pydantic",
    "torch_pruning": "torch-pruning",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "jinja2": "jinja2",
}
NEEDS_TRAIN = "this command needs the training extra: pip install 'prune2edge[train]'"


def missing_training_module(e: ModuleNotFoundError) -> str | None:
    """The pip name of the training package whose absence raised ``e``, or None when ``e`` is about another
    module (or about a part of an installed package, which is a broken install, not a missing extra)."""
    top = (e.name or "").partition(".")[0]
    if top in TRAINING_MODULES and importlib.util.find_spec(top) is None:
        return TRAINING_MODULES[top]
    return None


def parse_settings(settings: list[str] | tuple[str, ...]) -> dict:
    """``["pool.size=8", "train.lr=0.1"]`` -> nested overrides; values are read as YAML scalars or lists."""
    import yaml

    from .config import read_yaml

    out: dict = {}
    for item in settings:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UserError(f"--set takes KEY=VALUE (e.g. pool.size=8), got '{item}'")
        *parents, leaf = name.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        try:
            node[leaf] = read_yaml(value)
        except yaml.YAMLError as e:
            raise UserError(f"--set {name}: cannot read value '{value}' ({e})") from None
    return out


class Main(click.Group):
    """Turns a UserError (or a missing file, or a missing training extra) into a one-line message and exit status 2,
    without a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)
        except ModuleNotFoundError as e:
            package = missing_training_module(e)
            if package is None:
                raise
            click.secho(f"error: {NEEDS_TRAIN} ({package} is not installed)", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.secho("interrupted: finished work is saved; run the same command again to continue", err=True)
            sys.exit(130)


@click.group(cls=Main)
def main() -> None:
    """Turn one trained CNN into a small int8 voting ensemble for edge devices (Prune2Edge).

    predict, node, aggregator, classify and fleet run on the core install (numpy, onnxruntime, paho-mqtt, cryptography);
    run, demo, evaluate and report need the training extra: pip install 'prune2edge[train]'.
    """


def _run(cfg: Config, out: Path, quiet: bool) -> None:
    from . import pipeline, store, summary

    metrics = pipeline.run(cfg, out, progress=not quiet)
    click.echo(summary.table(metrics))
    click.echo(f"\nrun directory: {out}\nbundle: {out / store.BUNDLE}\nreport: {out / store.REPORT}")


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory (default runs/<config name>)."
)
@click.option("--workers", type=int, help="Train pool members in N local processes.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Override the config's device.")
@click.option("--data-path", help="Override data.path (a directory, or comma-separated npz files).")
@click.option("--seed", type=int, help="Override the config's seed.")
@click.option(
    "--devices",
    "devices_file",
    help="A devices file (YAML/JSON): select members that fit each device (deploy.devices).",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one config key, e.g. pool.size=8 (repeatable).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(
    config_file: str,
    out: Path | None,
    workers: int | None,
    device: str | None,
    data_path: str | None,
    seed: int | None,
    devices_file: str | None,
    settings: tuple[str, ...],
    quiet: bool,
) -> None:
    """Run every phase of CONFIG_FILE (YAML); re-running continues an interrupted run."""
    from . import config

    overrides = parse_settings(settings)
    if workers is not None:
        overrides["workers"] = workers
    if device is not None:
        overrides["device"] = device
    if seed is not None:
        overrides["seed"] = seed
    if devices_file is not None:
        overrides.setdefault("deploy", {})["devices"] = devices_file
    if data_path is not None:
        overrides.setdefault("data", {})["path"] = data_path.split(",") if "," in data_path else data_path
    cfg = config.load(config_file, overrides)
    _run(cfg, out or Path("runs") / Path(config_file).stem, quiet)


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out: Path, quiet: bool) -> None:
    """The whole pipeline on scikit-learn's digits, in about a minute on 2 CPU cores."""
    from . import config

    _run(config.load(DEMO_CONFIG), out, quiet)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def report(run_dir: Path) -> None:
    """Write RUN_DIR/report.html (self-contained, with plots) and RUN_DIR/figures/*.png, from what the run wrote."""
    from . import report as report_

    click.echo(report_.write(run_dir))


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option(
    "--data", "spec", required=True, help="digits | cifar10:DIR | cifar100:DIR | npz:A.npz,B.npz | imagefolder:DIR"
)
@click.option(
    "--same-classes", is_flag=True, help="The data's labels are the bundle's classes (for data that names none)."
)
@click.option("--all", "whole", is_flag=True, help="Score every image of data that has no test split.")
def evaluate(bundle_dir: Path, spec: str, same_classes: bool, whole: bool) -> None:
    """Score BUNDLE_DIR on a dataset's test split (data without one: the split a run carves, or --all), independently
    of the run that made it."""
    from . import data
    from .evaluate import evaluate_bundle

    result = evaluate_bundle(bundle_dir, data.parse_spec(spec), same_classes, whole)
    click.echo(f"scored: {result['scored']}")
    for name, acc in result["members"].items():
        click.echo(f"member {name}: {acc:.4f}")
    click.echo(f"ensemble test accuracy: {result['test_acc']:.4f} on {result['n_test']} images")
    for w in result["warnings"]:
        click.secho(f"warning: {w}", fg="yellow", err=True)


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["tflite"]), required=True, help="tflite: LiteRT / TFLite Micro.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for the files.")
@click.option(
    "--data", "spec", required=True, help="Its training images calibrate int8 activations: digits | npz:... | ..."
)
def export(bundle_dir: Path, fmt: str, out: Path, spec: str) -> None:
    """Write every member of BUNDLE_DIR as a full-integer int8 file for another runtime (needs the [litert] extra)."""
    from . import data
    from .export import export_bundle

    record = export_bundle(bundle_dir, fmt, out, data.parse_spec(spec))
    for m in record["members"].values():
        click.echo(
            f"{out / m['path']}: {m['bytes']:,} B ({m['bytes'] / record['mlperf_tiny_reference_bytes']:.2f}x "
            "MLPerf Tiny's int8 ResNet-8)"
        )


def read_images(paths: list[str]) -> tuple[list[str], object]:
    """Image files (png/jpg) or arrays (.npy, or .npz with x / x_test) -> names and the uint8 images: one array,
    or a list of arrays when their shapes differ."""
    import numpy as np

    from .data import read_arrays, read_image

    names, arrays = [], []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise UserError(f"no such file: '{p}'")
        if path.suffix in (".npy", ".npz"):
            z = read_arrays(path)
            key = next((k for k in ("x", "x_test", "images") if k in z), None)
            if key is None:
                raise UserError(f"'{p}' has no array named x, x_test or images (has {sorted(z)})")
            names += [f"{p}[{i}]" for i in range(len(z[key]))]
            arrays += list(z[key])
        else:
            arrays.append(read_image(path))
            names.append(p)
    return names, np.stack(arrays) if len({a.shape for a in arrays}) == 1 else arrays


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.argument("files", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--abstain-below", type=float, metavar="T", help=ABSTAIN_HELP)
def predict(bundle_dir: Path, files: tuple[str, ...], as_json: bool, abstain_below: float | None) -> None:
    """Classify image FILES (png/jpg of any size when the bundle resizes, .npy, .npz) with BUNDLE_DIR; needs only
    onnxruntime and numpy (and Pillow for image files)."""
    from .runtime.bundle import Bundle

    b = Bundle.load(bundle_dir)
    names, x = read_images(list(files))
    d = b.decide(x, abstain_below)
    for i, name in enumerate(names):
        k, review = int(d.classes[i]), bool(d.review[i])
        row = {
            "input": name,
            "status": "review" if review else "decided",
            "class": None if review else k,
            "label": None if review else b.classes[k],
            "confidence": round(float(d.confidence[i]), 4),
            "votes": int(d.votes[i]),
            "members": d.members,
            "margin": round(float(d.margin[i]), 4),
            "abstain_below": d.abstain_below,
        }
        click.echo(
            json.dumps(row)
            if as_json
            else f"{name}\t{'review' if review else b.classes[k]}\t{d.confidence[i]:.3f}"
            f"\t{d.votes[i]}/{d.members} votes\tmargin {d.margin[i]:.3f}"
        )


# --- Fleet over MQTT: thin shells over prune2edge.runtime.fleet (which needs only numpy, onnxruntime, paho-mqtt, cryptography) ---

DATASET_SPECS = ("digits", "cifar10", "cifar100", "npz", "imagefolder")


def _mqtt_options(broker_required: bool = True):
    """--broker, --username/--password (or env vars), --tls-ca/--tls-cert/--tls-key and --fleet."""
    opts = [
        click.option(
            "--broker",
            required=broker_required,
            help="mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS"
            + ("" if broker_required else " (default: start a private Mosquitto on a free loopback port)"),
        ),
        click.option(
            "--fleet",
            "fleet_name",
            default="default",
            show_default=True,
            help="Fleet name: topics live under prune2edge/<fleet>/.",
        ),
        click.option(
            "--username", envvar="PRUNE2EDGE_MQTT_USERNAME", help="MQTT username [env PRUNE2EDGE_MQTT_USERNAME]."
        ),
        click.option(
            "--password", envvar="PRUNE2EDGE_MQTT_PASSWORD", help="MQTT password [env PRUNE2EDGE_MQTT_PASSWORD]."
        ),
        click.option("--tls-ca", help="CA certificate (PEM) that signed the broker's certificate."),
        click.option("--tls-cert", help="Client certificate (PEM), for brokers that require one."),
        click.option("--tls-key", help="Private key (PEM) of --tls-cert."),
    ]

    def decorate(f):
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


def _broker(opts: dict):
    from .runtime.fleet import Broker

    if not opts.get("broker"):
        return None
    return Broker.parse(
        opts["broker"], opts["username"], opts["password"], opts["tls_ca"], opts["tls_cert"], opts["tls_key"]
    )


def _log_to_stderr(level: str = "INFO") -> None:
    import logging

    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")


def _inputs(items: list[str]) -> tuple[list[str], object, object, list[str] | None]:
    """A dataset spec (its test split, with labels) or image/array files -> names, uint8 images, labels or None,
    class names or None."""
    import numpy as np

    from . import data

    if len(items) == 1 and items[0].partition(":")[0] in DATASET_SPECS and not Path(items[0]).exists():
        spec = data.parse_spec(items[0])
        if spec["name"] == "imagefolder" and spec["path"]:  # the files as stored: their sizes may differ
            files, classes = data.imagefolder_test_files(spec["path"])
            names, x = read_images([str(f) for f, _ in files])
            return names, x, np.array([label for _, label in files], np.int64), classes
        d = data.load(spec)
        return [f"{d.name}:test[{i}]" for i in range(len(d.x_test))], d.x_test, d.y_test, d.classes if d.named else None
    names, x = read_images(items)
    labels = None
    if len(items) == 1 and items[0].endswith(".npz"):  # labels next to the images: (x, y) or (x_test, y_test)
        z = data.read_arrays(items[0])
        key = next((k for k in ("x", "x_test", "images") if k in z), None)
        ykey = {"x": "y", "x_test": "y_test", "images": "labels"}.get(key)
        if ykey in z and len(z[ykey]) == len(x):
            labels = z[ykey].astype(np.int64)
    return names, x, labels, None


def _classify(
    broker,
    fleet_name: str,
    items: list[str],
    out: Path | None,
    rate: float | None,
    max_in_flight: int,
    timeout: float,
    limit: int | None,
) -> dict:
    from .runtime import fleet

    names, x, y, classes = _inputs(items)
    if limit is not None:
        names, x, y = names[:limit], x[:limit], None if y is None else y[:limit]
    sink = open(out, "w") if out else sys.stdout  # noqa: SIM115 (closed below unless it is stdout)
    try:

        def write(row: dict) -> None:
            sink.write(json.dumps(row) + "\n")
            sink.flush()

        s = fleet.classify(
            broker,
            fleet_name,
            x,
            names,
            y,
            on_result=write,
            rate=rate,
            max_in_flight=max_in_flight,
            timeout_s=timeout,
            classes=classes,
        )
    finally:
        if out:
            sink.close()
    acc = f"; accuracy {s['accuracy']:.4f}" if "accuracy" in s else ""
    if s["review"] and s.get("decided_accuracy") is not None:
        acc += f" ({s['decided_accuracy']:.4f} of the decided frames)"
    click.echo(
        f"{s['frames']} frames: {s['decided']} decided, {s['review']} to review, {s['undecided']} undecided, "
        f"{len(s['missing'])} without an answer, in {s['elapsed_s']:.1f} s ({s['frames_per_s']} frames/s); round trip p50 "
        f"{s['rtt_ms_p50']:.1f} ms, p99 {s['rtt_ms_p99']:.1f} ms{acc}",
        err=True,
    )
    if s["missing"]:
        raise UserError(
            f"{len(s['missing'])} of {s['frames']} frames got no decision (none came for {timeout:g} s), "
            f"e.g. {s['missing'][:3]}; are the aggregator and nodes running?"
        )
    return s


_classify_options = [
    click.option(
        "--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the decisions here (JSON lines)."
    ),
    click.option("--rate", type=float, help="Frames per second (default: as fast as the fleet answers)."),
    click.option(
        "--max-in-flight", type=int, default=64, show_default=True, help="Frames awaiting a decision at once."
    ),
    click.option(
        "--timeout",
        type=float,
        default=30.0,
        show_default=True,
        help="Give up when no decision has come for this many seconds.",
    ),
    click.option("--limit", type=int, help="Only the first N images."),
]


def _with(options):
    def decorate(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return decorate


_deployed_options = [
    click.option(
        "--trust",
        type=click.Path(path_type=Path),
        multiple=True,
        help="Deployed: the PEM public key releases are signed with (twice while the key is rotated).",
    ),
    click.option(
        "--store", type=click.Path(path_type=Path), help="Deployed: this process's own directory for versions."
    ),
]


def _deployed(bundle_dir: Path | None, trust: tuple[Path, ...], store: Path | None) -> bool:
    """Whether the command runs deployed (its versions come signed over the broker) rather than from BUNDLE."""
    if bundle_dir is not None and not trust and store is None:
        return False
    if bundle_dir is not None or not trust or store is None:
        raise UserError(
            "give either BUNDLE (a bundle directory on this device) or --trust PUB.pem --store DIR (versions "
            "published with `prune2edge publish`)"
        )
    return True


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path), required=False)
@click.option("--member", help="The member id this node runs (see the bundle's manifest.json).")
@click.option("--device", help="This device's name: the member the bundle (or each release) assigns to it runs.")
@_with(_deployed_options)
@_mqtt_options()
@click.option("--max-batch", type=int, default=32, show_default=True, help="Frames run in one batch when queued.")
@click.option(
    "--runtime",
    default="onnxruntime",
    show_default=True,
    help="What runs the member: onnxruntime, openvino (extra [openvino]) or reference (ONNX's, slow; extra [reference]).",
)
def node(
    bundle_dir: Path | None,
    member: str | None,
    device: str | None,
    trust: tuple[Path, ...],
    store: Path | None,
    fleet_name: str,
    max_batch: int,
    runtime: str,
    **mqtt,
) -> None:
    """Serve one bundle member: verify it, then vote on the fleet's frames (needs no torch or scikit-learn).

    Deployed (--trust, --store): start empty and serve the member each signed release assigns to --device."""
    from .runtime import fleet

    if _deployed(bundle_dir, trust, store):
        if member or not device:
            raise UserError("a deployed node takes --device NAME (releases assign members to devices), not --member")
        _log_to_stderr()
        fleet.DeployedNode(_broker(mqtt), fleet_name, list(trust), store, device, max_batch, runtime=runtime).serve(
            fleet.stop_on_signals()
        )
        return
    if (member is None) == (device is None):
        raise UserError("give either --member ID or --device NAME (the member the bundle assigns to that device)")
    member = member or fleet.member_on(bundle_dir, device)
    _log_to_stderr()
    fleet.Node(bundle_dir, member, _broker(mqtt), fleet_name, max_batch=max_batch, runtime=runtime).serve(
        fleet.stop_on_signals()
    )


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path), required=False)
@_with(_deployed_options)
@_mqtt_options()
@click.option("--members", help="Comma-separated member ids in this fleet (default: all of the bundle's).")
@click.option("--quorum", type=int, help="Votes needed for a decision (default: a majority of the members).")
@click.option("--timeout-ms", type=int, default=2000, show_default=True, help="How long to wait for a frame's votes.")
@click.option("--abstain-below", type=float, metavar="T", help=ABSTAIN_HELP)
@click.option(
    "--shadow-frames",
    type=int,
    default=200,
    show_default=True,
    help="Deployed: frames a new version votes in shadow before it is judged.",
)
@click.option(
    "--min-agreement",
    type=float,
    default=0.9,
    show_default=True,
    help="Deployed: share of those frames it must decide as the serving version does.",
)
def aggregator(
    bundle_dir: Path | None,
    trust: tuple[Path, ...],
    store: Path | None,
    fleet_name: str,
    members: str | None,
    quorum: int | None,
    timeout_ms: int,
    abstain_below: float | None,
    shadow_frames: int,
    min_agreement: float,
    **mqtt,
) -> None:
    """Collect the nodes' votes and publish one decision (`decided`, `review`, or `undecided` with the reason) per frame.

    Deployed (--trust, --store): take versions from signed releases; vote each new one in shadow, then promote it or
    roll it back."""
    from .runtime import fleet

    _log_to_stderr()
    if _deployed(bundle_dir, trust, store):
        if members:
            raise UserError("--members is for BUNDLE; a deployed fleet's members are those its releases assign")
        agg = fleet.DeployedAggregator(
            _broker(mqtt),
            fleet_name,
            list(trust),
            store,
            quorum,
            timeout_ms,
            abstain_below,
            shadow_frames,
            min_agreement,
        )
    else:
        agg = fleet.Aggregator(
            bundle_dir,
            _broker(mqtt),
            fleet_name,
            quorum,
            timeout_ms,
            members.split(",") if members else None,
            abstain_below,
        )
    agg.serve(fleet.stop_on_signals())


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@_mqtt_options()
@click.option("--key", type=click.Path(path_type=Path), required=True, help="The PEM ed25519 signing key.")
@click.option("--version", "version", type=int, help="The new version (default: the fleet's current one + 1).")
@click.option("--assign", help="DEVICE=MEMBER,... (default: the devices the bundle was selected for).")
@click.option("--chunk-bytes", type=int, default=128 * 1024, show_default=True, help="Bytes per artifact message.")
def publish(
    bundle_dir: Path, fleet_name: str, key: Path, version: int | None, assign: str | None, chunk_bytes: int, **mqtt
) -> None:
    """Publish BUNDLE as the fleet's next version: a signed release and its members, retained on the broker."""
    from .runtime.fleet import release

    body = release.publish(bundle_dir, _broker(mqtt), fleet_name, key, version, assign, chunk_bytes)
    click.echo(
        f"fleet '{fleet_name}': version {body['version']} published ({len(body['artifacts'])} members, "
        f"{sum(a['bytes'] for a in body['artifacts'].values())} bytes); assigned "
        + ", ".join(f"{d}={m}" for d, m in body["assign"].items()),
        err=True,
    )


@main.command()
@click.argument("action", type=click.Choice(["status", "promote", "rollback"]))
@click.argument("version", type=int, required=False)
@_mqtt_options()
@click.option("--key", type=click.Path(path_type=Path), help="The PEM ed25519 signing key (promote, rollback).")
def rollout(action: str, version: int | None, fleet_name: str, key: Path | None, **mqtt) -> None:
    """The fleet's rollout state (JSON), or a signed `promote VERSION` (in shadow) or `rollback VERSION`."""
    from .runtime.fleet import release

    broker, sent = _broker(mqtt), {}
    if action != "status":
        if key is None or version is None:
            raise UserError(f"rollout {action} takes VERSION and --key KEY.pem (the release signing key)")
        sent = release.command(broker, fleet_name, key, action, version)
    click.echo(json.dumps(release.rollout_state(broker, fleet_name, sent.get("at")), indent=2))


@main.command()
@click.argument("data", nargs=-1, required=True)
@_mqtt_options()
@_with(_classify_options)
def classify(
    data: tuple[str, ...],
    fleet_name: str,
    out: Path | None,
    rate: float | None,
    max_in_flight: int,
    timeout: float,
    limit: int | None,
    **mqtt,
) -> None:
    """Send DATA (a dataset spec such as `digits`, .npz/.npy or image files) to a fleet; one JSON line per decision."""
    _log_to_stderr("WARNING")
    _classify(_broker(mqtt), fleet_name, list(data), out, rate, max_in_flight, timeout, limit)


@main.command("fleet")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@_mqtt_options(broker_required=False)
@click.option("--members", help="Comma-separated member ids to run (default: all of the bundle's).")
@click.option("--quorum", type=int, help="Votes needed for a decision (default: a majority of the members).")
@click.option("--timeout-ms", type=int, default=2000, show_default=True, help="How long to wait for a frame's votes.")
@click.option("--abstain-below", type=float, metavar="T", help=ABSTAIN_HELP)
@click.option("--classify", "data", help="Classify this (dataset spec or file), print the accuracy, shut down.")
@_with(_classify_options)
def fleet_command(
    bundle_dir: Path,
    fleet_name: str,
    members: str | None,
    quorum: int | None,
    timeout_ms: int,
    abstain_below: float | None,
    data: str | None,
    out: Path | None,
    rate: float | None,
    max_in_flight: int,
    timeout: float,
    limit: int | None,
    **mqtt,
) -> None:
    """Run every member as a node process plus an aggregator on this machine (until Ctrl-C, or --classify DATA)."""
    import signal

    from .runtime import fleet

    _log_to_stderr("WARNING")
    lf = fleet.LocalFleet(
        bundle_dir,
        _broker(mqtt),
        fleet_name,
        members.split(",") if members else None,
        quorum,
        timeout_ms,
        abstain_below=abstain_below,
    )

    def interrupt(*_):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # stop the processes this command started, also when started with
        signal.signal(sig, interrupt)  # SIGINT ignored (a background job of a non-interactive shell)
    interrupted = False
    try:
        lf.start()
        click.echo(
            f"fleet '{fleet_name}': {len(lf.members)} nodes ({', '.join(lf.members)}) and an aggregator on "
            f"{lf.broker.url}; logs in {lf.workdir}" + (" (removed after a clean shutdown)" if lf.own_workdir else ""),
            err=True,
        )
        if data:
            _classify(lf.broker, fleet_name, [data], out, rate, max_in_flight, timeout, limit)
        else:
            click.echo("running; Ctrl-C stops it", err=True)
            lf.watch(lambda role, last: click.secho(f"warning: fleet {role} exited: {last}", fg="yellow", err=True))
    except KeyboardInterrupt:
        interrupted = bool(data)  # without --classify, Ctrl-C is the normal way to stop
    finally:
        lf.stop()
        click.echo("fleet stopped", err=True)
    if interrupted:
        click.echo("interrupted before every frame was classified", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
