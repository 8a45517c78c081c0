"""``prune2edge``: a thin command-line shell over the Python API."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import UserError

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")


class Main(click.Group):
    """Turns a UserError (or a missing file) into a one-line message and exit status 2, without a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.secho("interrupted: finished work is saved; run the same command again to continue", err=True)
            sys.exit(130)


@click.group(cls=Main)
def main() -> None:
    """Turn one trained CNN into a small int8 voting ensemble for edge devices (Prune2Edge)."""


def _run(cfg: dict, out: Path, quiet: bool) -> None:
    from . import evaluate, pipeline

    metrics = pipeline.run(cfg, out, progress=not quiet)
    click.echo(evaluate.table(metrics))
    click.echo(f"\nrun directory: {out}\nbundle: {out / 'bundle'}")


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory (default runs/<config name>).")
@click.option("--workers", type=int, help="Train pool members in N local processes.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Override the config's device.")
@click.option("--data-path", help="Override data.path (a directory, or comma-separated npz files).")
@click.option("--seed", type=int, help="Override the config's seed.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Override one config key, e.g. pool.size=8 (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(config_file: str, out: Path | None, workers: int | None, device: str | None, data_path: str | None,
        seed: int | None, settings: tuple[str, ...], quiet: bool) -> None:
    """Run every phase of CONFIG_FILE (YAML); re-running continues an interrupted run."""
    from . import config

    overrides = config.parse_settings(settings)
    if workers is not None:
        overrides["workers"] = workers
    if device is not None:
        overrides["device"] = device
    if seed is not None:
        overrides["seed"] = seed
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
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--data", "spec", required=True, help="digits | cifar10:DIR | cifar100:DIR | npz:A.npz,B.npz | imagefolder:DIR")
def evaluate(bundle_dir: Path, spec: str) -> None:
    """Score BUNDLE_DIR on a dataset's test split, independently of the run that made it."""
    from . import data
    from .evaluate import evaluate_bundle

    result = evaluate_bundle(bundle_dir, data.parse_spec(spec))
    for name, acc in result["members"].items():
        click.echo(f"member {name}: {acc:.4f}")
    click.echo(f"ensemble test accuracy: {result['test_acc']:.4f} on {result['n_test']} images")


def read_images(paths: list[str]) -> tuple[list[str], "object"]:
    """Image files (png/jpg) or arrays (.npy, or .npz with x / x_test) -> names and one uint8 array."""
    import numpy as np

    names, arrays = [], []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise UserError(f"no such file: '{p}'")
        if path.suffix in (".npy", ".npz"):
            try:
                z = np.load(path, allow_pickle=False)
            except ValueError as e:
                raise UserError(f"cannot read '{p}' ({e})") from None
            if path.suffix == ".npz":
                key = next((k for k in ("x", "x_test", "images") if k in z.files), None)
                if key is None:
                    raise UserError(f"'{p}' has no array named x, x_test or images (has {z.files})")
                z = z[key]
            names += [f"{p}[{i}]" for i in range(len(z))]
            arrays += list(z)
        else:
            from PIL import Image, UnidentifiedImageError

            try:
                arrays.append(np.asarray(Image.open(path)))
            except UnidentifiedImageError:
                raise UserError(f"'{p}' is not an image, .npy or .npz file") from None
            names.append(p)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"the inputs mix image shapes {sorted(shapes)}")
    return names, np.stack(arrays)


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.argument("files", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def predict(bundle_dir: Path, files: tuple[str, ...], as_json: bool) -> None:
    """Classify image FILES (png/jpg, .npy, .npz) with BUNDLE_DIR; needs only onnxruntime and numpy."""
    from .bundle import Bundle

    b = Bundle.load(bundle_dir)
    names, x = read_images(list(files))
    if x.ndim == 4 and b.shape[-1] == 3 and x.shape[-1] == 4:
        x = x[..., :3]  # RGBA images: drop alpha
    scores = b.predict_proba(x)
    for name, s in zip(names, scores):
        k = int(s.argmax())
        row = {"input": name, "class": k, "label": b.classes[k], "confidence": round(float(s[k]), 4)}
        click.echo(json.dumps(row) if as_json else f"{name}\t{b.classes[k]}\t{s[k]:.3f}")


if __name__ == "__main__":
    main()
