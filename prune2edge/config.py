"""Run configuration: one typed model per section (defaults, bounds and cross-field rules in one place), YAML
loading, and errors that name the offending key and the fix.

``load()`` returns a frozen :class:`Config`; phases read its sections as attributes (``cfg.pool.sparsity``) and
trust them: a range given as one number is already the pair ``(x, x)``, a clustering preset already applied.
What each key means is in docs/usage.md (Configuration); ``python -m prune2edge.config`` prints the JSON schema
(docs/config.schema.json)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from .data import TEST_FRACTION
from .errors import UserError


def _plain(check, schema: dict, out: Any = Any) -> Any:
    """A key checked by ``check`` (which raises ValueError with the fix, or returns the value to keep)."""
    as_list = PlainSerializer(lambda v: list(v) if isinstance(v, tuple) else v)
    return Annotated[out, PlainValidator(check), as_list, WithJsonSchema(schema)]


def span(lo: float, hi: float, *, open_hi: bool = False, positive: bool = False) -> Any:
    """A number or a ``[low, high]`` pair in [lo, hi] (or [lo, hi)), stored as the pair."""

    def pair(v: Any) -> tuple[float, float]:
        vals = list(v) if isinstance(v, (list, tuple)) else [v, v]
        if len(vals) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            raise ValueError("must be a number or a [low, high] pair")
        a, b = float(vals[0]), float(vals[1])
        if not (lo <= a <= b and (b < hi if open_hi else b <= hi)):
            raise ValueError(f"must lie in [{float(lo)}, {float(hi)}{')' if open_hi else ']'} with low <= high")
        if positive and a <= 0:
            raise ValueError("must be > 0")
        return a, b

    number = {"type": "number", "minimum": lo, ("exclusiveMaximum" if open_hi else "maximum"): hi}
    return _plain(pair, {"anyOf": [number, {"type": "array", "items": number, "minItems": 2, "maxItems": 2}]})


def _image_size(v: Any) -> int | tuple[int, int] | None:
    sizes = v if isinstance(v, (list, tuple)) and len(v) == 2 else [v]
    if v is not None and not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
        raise ValueError("must be null (as stored), a positive integer or a [height, width] pair of them")
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _k(v: Any) -> str | int:
    if v in ("auto", "silhouette") or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ValueError("must be a positive integer, 'auto' or 'silhouette'")


def must(text: str) -> Any:
    """The wording of a key's error, where the one derived from its type and bounds would say less."""
    return Field(json_schema_extra={"must": text})


PosInt = Annotated[int, at.Ge(1)]
Count = Annotated[int, at.Ge(0)]
NonNeg = Annotated[float, at.Ge(0)]
Unit = Annotated[float, at.Ge(0), at.Le(1)]
UnitOpen = Annotated[float, at.Ge(0), at.Lt(1)]
Bits = Annotated[int, at.Ge(0), at.Le(8)]
GridBits = Annotated[float, at.Ge(0), at.Le(8), at.MultipleOf(0.5)]  # QAT grids: 3.5 bits = 11 values
ImageSize = _plain(_image_size, {"anyOf": [{"type": "null"}, {"type": "integer"}, {"type": "array"}]})
K = _plain(_k, {"anyOf": [{"enum": ["auto", "silhouette"]}, {"type": "integer", "minimum": 1}]})
Optimizer = Literal["sgd", "adam"]
Augment = Literal["auto", "none", "crop", "crop_flip"]  # auto: crop + flip for colour images of 16 px or more
Compile = Literal["none", "torch", "cuda-graph"]  # torch: torch.compile; cuda-graph: whole step as a CUDA graph
GRID_BITS = (
    "must be 0 (off: int8 post-training quantisation) or a number of bits from 2 to 8 in steps of 0.5 (a grid of "
    "about 2^bits values: 4 bits = 15, 3.5 bits = 11)"
)
CODEBOOK = "must be 0 (off) or an integer from 2 to 8"
SNAPSHOTS = "must be 0 (clone the final baseline) or an integer >= 2"
RAY = "must be null (a Ray instance on this machine), 'auto', 'ray://HOST:PORT' or 'HOST:PORT'"
GAP = "must be a number in [0, 1] (a fraction of validation accuracy)"


class Section(BaseModel):
    """Unknown keys are errors; values are not coerced (``true`` is not a batch size); read-only once loaded."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Ray(Section):
    address: Annotated[Annotated[str, Field(pattern=r"^(auto|(ray://)?[\w.-]+:\d+)$")] | None, must(RAY)] = None
    num_cpus: Annotated[float, at.Gt(0)] = 1
    num_gpus: NonNeg = 0
    max_retries: Count = 3


class Data(Section):
    name: Literal["digits", "cifar10", "cifar100", "npz", "imagefolder"] = "digits"
    path: Annotated[str | list[str] | None, must("must be null, a path or a list of paths")] = None
    download: bool = False
    val_fraction: Annotated[float, at.Ge(0.01), at.Le(0.9)] = 0.1
    max_train: Annotated[int | None, at.Gt(1)] = None
    test_fraction: Annotated[float, at.Ge(0.01), at.Le(0.9)] = TEST_FRACTION
    image_size: ImageSize = None
    color: Literal["grey", "rgb"] | None = None


class Model(Section):
    arch: str = "small_cnn"
    kwargs: dict[str, Any] = {}
    weights: str | None = None


class Train(Section):
    epochs: NonNeg = 10.0
    batch_size: PosInt = 128
    optimizer: Optimizer = "sgd"
    lr: NonNeg = 0.05
    momentum: NonNeg = 0.9
    weight_decay: NonNeg = 5e-4
    schedule: Literal["onecycle", "cosine", "constant", "restarts"] = "onecycle"
    augment: Augment = "auto"
    label_smoothing: NonNeg = 0.0
    cycles: PosInt = 1
    compile: Compile = "none"


RENAMED = {"init": ("family", {"baseline": "clones", "fresh": "independent"})}  # pool keys renamed since
FAMILIES_OLD = RENAMED["init"][1]


class Pool(Section):
    """The pool; its family's defaults (:data:`FAMILIES`) fill the keys a config leaves out (the field defaults
    here are the ``independent`` family's for the default parent)."""

    size: PosInt = 3
    sparsity: span(0, 1, open_hi=True) = (0.0, 0.0)
    structure: Literal["weights", "channels"] = "weights"
    criterion: Literal["l1", "l2", "taylor"] = "l1"
    reduce: Literal["macs", "weights"] = "macs"
    channel_multiple: PosInt = 8
    schedule: Literal["polynomial", "constant"] = "polynomial"
    scope: Literal["layer", "global"] = "layer"
    prune_end: Unit = 0.7
    epochs: span(0, 1e6, positive=True) = (9.5, 9.5)
    min_steps: Annotated[Count, must("must be an integer >= 0 (a member's least optimiser steps; 0: no floor)")] = 100
    lr: span(0, 10, positive=True) = (0.05, 0.05)
    batch_size: Annotated[list[PosInt], must("must be a positive integer or a list of them"), at.MinLen(1)] = [128]
    lr_schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    optimizer: Optimizer = "sgd"
    momentum: NonNeg = 0.9
    weight_decay: NonNeg = 5e-4
    augment: Augment = "auto"
    label_smoothing: NonNeg = 0.0
    bootstrap: bool = False
    snapshots: Annotated[Count, must(SNAPSHOTS)] = 0
    mask_noise: Annotated[float, at.Ge(0), at.Le(10)] = 0.0
    distill: Unit = 0.0
    distill_temperature: Annotated[float, at.Gt(0)] = 4.0
    family: Literal["clones", "independent"] = "independent"
    include_parent: bool = True
    parent_qat: bool = False
    member_kwargs: dict[str, Any] = {}
    weight_bits: Annotated[GridBits, must(GRID_BITS)] = 4
    largest_layer_bits: Annotated[GridBits, must(GRID_BITS)] = 0
    qat_start: UnitOpen = 0.6
    qat_scale: Literal["max", "mse"] = "max"
    mask: Literal["magnitude", "antirandom", "antirandom-weighted"] = "magnitude"
    shrink: Unit = 1.0
    perturb: Annotated[float, at.Ge(0), at.Le(10)] = 0.0
    reinit_last: Count = 0
    regrow: UnitOpen = 0.0
    regrow_every: PosInt = 100
    cyclical: bool = False
    compile: Compile = "none"

    @model_validator(mode="before")
    @classmethod
    def _renamed_and_scalars(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for old, (new, values) in RENAMED.items():
            if old in data:
                data = {**{k: v for k, v in data.items() if k != old}, new: values.get(data[old], data[old])}
        bs = data.get("batch_size")
        return {**data, "batch_size": [bs]} if isinstance(bs, int) and not isinstance(bs, bool) else data


MEMBER_EPOCHS = 0.95  # of the parent's, for the 2 independent members: the pool costs ~1.9 parent trainings


def independent_family(train: dict) -> dict:
    """The measured winner on a user's data at <= 2x the parent's training (docs/RESULTS.md, defaults on small
    data): the parent itself as one member, quantised to int8 after training (it trains no more), and 2 members
    trained from their own initialisations, dense, on the parent's schedule for :data:`MEMBER_EPOCHS` of its epochs,
    the last 40 % with 4-bit QAT. (The frontier's CIFAR-10 recipe, ``configs/cifar10-cpu.yaml``, fine-tunes the
    parent to 4 bits too, for its byte budget per device, and trains its members for less.)"""
    t = {**Train().model_dump(), **train}
    schedule = t["schedule"] if t["schedule"] in ("onecycle", "cosine", "constant") else "onecycle"
    epochs = MEMBER_EPOCHS * t["epochs"] if isinstance(t["epochs"], (int, float)) else t["epochs"]
    return {"family": "independent", "size": 3, "include_parent": True, "parent_qat": False, "sparsity": 0,
            "weight_bits": 4, "qat_start": 0.6, "epochs": epochs, "lr": t["lr"], "batch_size": t["batch_size"],
            "lr_schedule": schedule}  # fmt: skip


def clone_family(train: dict) -> dict:
    """The paper's family: 8 clones of the parent pruned to 50-90 % and fine-tuned briefly (1-2 epochs)."""
    return {"family": "clones", "size": 8, "include_parent": False, "sparsity": [0.5, 0.9], "weight_bits": 0,
            "qat_start": 0.5, "epochs": [1.0, 2.0], "lr": [0.01, 0.05], "batch_size": [64, 128],
            "lr_schedule": "cosine"}  # fmt: skip


FAMILIES = {"independent": independent_family, "clones": clone_family}  # pool.family -> its defaults from train:


def with_family_defaults(raw: dict) -> dict:
    """``raw`` (a config as given) with the pool keys it leaves out filled by its family's defaults (:data:`FAMILIES`;
    renamed keys read as their new names)."""
    pool, train = raw.get("pool", {}), raw.get("train", {})
    if not isinstance(pool, dict) or not isinstance(train, dict):
        return raw  # the section's own error follows
    family = pool.get("family", FAMILIES_OLD.get(pool.get("init"), "independent"))
    if family not in FAMILIES:
        return raw
    given = set(pool) | ({RENAMED["init"][0]} if "init" in pool else set())
    return {**raw, "pool": {**{k: v for k, v in FAMILIES[family](train).items() if k not in given}, **pool}}


class Quantize(Section):
    calibration_size: PosInt = 256
    max_drop: Unit = 0.03
    min_agreement: Unit = 0.9
    codebook_bits: Annotated[Bits, must(CODEBOOK)] = 0


PRESETS = {"paper": {"method": "kmeans-labels", "k": 20}}  # the authors' k-means, k=20 on predicted labels


class Cluster(Section):
    method: Literal["kmeans-onehot", "kmeans-proba", "kmeans-labels", "agglomerative"] = "kmeans-onehot"
    k: K = "auto"
    k_max: PosInt = 10
    preset: Literal["paper"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        return {**data, **PRESETS[data["preset"]]} if isinstance(data, dict) and data.get("preset") in PRESETS else data


class Select(Section):
    strategy: Literal["accuracy-first", "diversity-first", "top-k", "random", "greedy"] = "accuracy-first"
    max_acc_gap: Annotated[Unit, must(GAP)] = 0.02
    max_below_parent: Annotated[Unit, must(GAP)] = 0.03
    fallback: Annotated[bool, must("must be true (ship a single model that beats the ensemble) or false")] = True


class Vote(Section):
    rule: Literal["soft", "hard"] = "soft"
    weighted: bool = False
    target_accuracy: Annotated[
        float | None, at.Gt(0), at.Le(1), must("must be null (no default abstain threshold) or an accuracy in (0, 1]")
    ] = 0.95


class Bundle(Section):
    latency_runs: PosInt = 100


class Deploy(Section):
    devices: Annotated[str | None, at.MinLen(1), must("must be the path of a devices file (YAML or JSON), or null")] = (
        None
    )


class Config(Section):
    """A whole run: the top-level keys and one section per phase."""

    seed: Count = 0
    device: Literal["cpu", "cuda"] = "cpu"
    workers: PosInt = 1
    executor: Literal["local", "ray"] = "local"
    ray: Ray = Ray()
    data: Data = Data()
    model: Model = Model()
    train: Train = Train()
    pool: Pool = Pool()
    quantize: Quantize = Quantize()
    cluster: Cluster = Cluster()
    select: Select = Select()
    vote: Vote = Vote()
    bundle: Bundle = Bundle()
    deploy: Deploy = Deploy()

    @model_validator(mode="after")
    def _rules(self) -> Config:
        for name, wrong, ok in RULES:
            if not ok(self):
                value = self
                for part in name.split("."):
                    value = getattr(value, part)
                raise UserError(f"config key '{name}' {wrong}, got {value!r}")
        if isinstance(self.cluster.k, int) and self.cluster.k > self.pool.size:
            raise UserError(
                f"config key 'cluster.k' is {self.cluster.k}, larger than the pool (pool.size = {self.pool.size}); "
                "lower cluster.k or raise pool.size"
            )
        return self


def default(key: str) -> Any:
    """The config's default for ``key`` (``section.name``): what a function that takes the setting defaults to."""
    section, name = key.split(".")
    return Config.model_fields[section].annotation.model_fields[name].default


# the rules between keys: (key, what is wrong with it when the check fails, the check on the whole config)
# fmt: off
RULES: list[tuple[str, str, Callable[[Config], bool]]] = [
    ("pool.weight_bits", GRID_BITS, lambda c: not 0 < c.pool.weight_bits < 2),
    ("pool.largest_layer_bits", GRID_BITS, lambda c: not 0 < c.pool.largest_layer_bits < 2),
    ("pool.largest_layer_bits", "needs quantisation-aware training, so pool.weight_bits from 2 to 8",
     lambda c: not c.pool.largest_layer_bits or c.pool.weight_bits),
    ("pool.snapshots", SNAPSHOTS, lambda c: c.pool.snapshots != 1),
    ("quantize.codebook_bits", CODEBOOK, lambda c: c.quantize.codebook_bits != 1),
    ("train.compile", "'cuda-graph' needs device: cuda",
     lambda c: c.train.compile != "cuda-graph" or c.device == "cuda"),
    ("pool.compile", "'cuda-graph' needs device: cuda", lambda c: c.pool.compile != "cuda-graph" or c.device == "cuda"),
    ("train.epochs", "must be > 0 unless model.weights is given",
     lambda c: c.train.epochs > 0 or bool(c.model.weights)),
    ("pool.snapshots", "needs the baseline trained here (model.weights is set), so must be 0",
     lambda c: not (c.pool.snapshots and c.model.weights)),
    ("pool.member_kwargs", "changes the network, so needs pool.family: independent (a clone keeps the baseline's shape)",
     lambda c: not c.pool.member_kwargs or c.pool.family == "independent"),
    ("pool.family", "independent members start from a new initialisation, so cannot be combined with snapshots, "
     "cyclical, shrink, perturb or reinit_last", lambda c: c.pool.family == "clones" or not _leaves_basin(c.pool)),
    ("pool.structure", "channels cuts filters by importance on a schedule, so needs pool.mask: magnitude, "
     "pool.regrow: 0 and pool.cyclical: false",
     lambda c: c.pool.structure == "weights" or (c.pool.mask == "magnitude" and not c.pool.regrow and not c.pool.cyclical)),
    ("pool.include_parent", "makes the baseline one member of an independent pool, so needs pool.family: independent",
     lambda c: not c.pool.include_parent or c.pool.family == "independent"),
    ("pool.cyclical", "makes every member from one run, so cannot be combined with pool.mask antirandom, snapshots or "
     "bootstrap",
     lambda c: not c.pool.cyclical or (c.pool.mask == "magnitude" and not c.pool.snapshots and not c.pool.bootstrap)),
    ("workers", "runs members in local processes; with executor: ray, Ray schedules them by ray.num_cpus / "
     "ray.num_gpus per member, so leave workers at 1", lambda c: c.executor != "ray" or c.workers == 1),
    ("pool.cyclical", "trains its members without quantisation-aware training, so needs pool.weight_bits: 0",
     lambda c: not c.pool.cyclical or not c.pool.weight_bits),
    ("pool.cyclical", "makes every member in one run, which cannot be spread; use executor: local",
     lambda c: c.executor != "ray" or not c.pool.cyclical),
    ("ray.num_gpus", "must be > 0 with device: cuda (e.g. 1, or 0.5 for two members per GPU), so that Ray gives each "
     "member a GPU", lambda c: c.executor != "ray" or c.device != "cuda" or c.ray.num_gpus > 0),
    ("ray.num_gpus", "reserves GPUs that device: cpu leaves idle; set it to 0 or use device: cuda",
     lambda c: c.executor != "ray" or c.device == "cuda" or c.ray.num_gpus == 0),
]
# fmt: on


def _leaves_basin(p: Pool) -> bool:
    return bool(p.snapshots or p.cyclical or p.reinit_last or p.shrink != 1 or p.perturb)


def _derived_must(field: Any) -> str:
    """What a valid value of a key is, from its type and bounds (or the wording :func:`must` gave it)."""
    if field.json_schema_extra:
        return field.json_schema_extra["must"]
    ann, meta = field.annotation, {type(m): m for m in field.metadata}
    literals = [ann] if get_origin(ann) is Literal else [a for a in get_args(ann) if get_origin(a) is Literal]
    if literals:
        return f"must be one of {[v for a in literals for v in get_args(a) if v is not None]}"
    if ann is bool:
        return "must be true or false"
    if at.Ge in meta and (at.Le in meta or at.Lt in meta):
        lo, hi = meta[at.Ge].ge, meta[at.Le].le if at.Le in meta else meta[at.Lt].lt
        return f"must lie in [{float(lo)}, {float(hi)}{']' if at.Le in meta else ')'}"
    kind = "an integer" if int in (ann, *get_args(ann)) else "a number"
    if at.Ge in meta:
        return (
            "must be a positive integer"
            if kind == "an integer" and meta[at.Ge].ge == 1
            else f"must be {kind} >= {meta[at.Ge].ge:g}"
        )
    if at.Gt in meta:
        return f"must be {kind} > {meta[at.Gt].gt:g}"
    return "must be a mapping" if get_origin(ann) is dict else f"must be {kind if ann in (int, float) else 'a string'}"


def _first_error(e: ValidationError, raw: dict) -> UserError:
    """The first of pydantic's errors in validating ``raw``, as one line that names the key and a valid value."""
    err = e.errors(include_url=False)[0]
    model: type[BaseModel] = Config
    names, field = [], None
    for part in err["loc"]:  # down the sections to the key (the rest of loc: list items, union members)
        names.append(str(part))
        field = model.model_fields.get(str(part))
        sub = field.annotation if field is not None else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            break
        model, field = sub, None
    name = ".".join(names)
    if err["type"] == "extra_forbidden":
        where = " in " + ".".join(names[:-1]) if len(names) > 1 else ""
        return UserError(f"unknown config key '{name}'; known keys{where}: {', '.join(model.model_fields)}")
    value = raw
    for part in names:  # the key's whole value (an error may be about one item of it)
        value = value[part] if isinstance(value, dict) and part in value else err["input"]
    if field is None:  # a section that is not a mapping
        return UserError(f"config key '{name}' must be a mapping, got {value!r}")
    text = str(err["ctx"]["error"]) if err["type"] == "value_error" else _derived_must(field)
    return UserError(f"config key '{name}' {text}, got {value!r}")


def _merge(base: dict, new: dict) -> dict:
    """``base`` updated by ``new``, mapping into mapping (``model.kwargs`` and ``pool.member_kwargs`` replaced)."""
    out = dict(base)
    for k, v in new.items():
        nested = isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("kwargs", "member_kwargs")
        out[k] = _merge(out[k], v) if nested else v
    return out


class _Loader(yaml.SafeLoader):
    """YAML as PyYAML reads it, but for numbers like ``1e-4``, which YAML 1.1 reads as text and YAML 1.2 (and every
    user) as a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(text: str) -> Any:
    """A config's YAML (a file's text, or one ``--set`` value): :class:`_Loader`'s reading."""
    return yaml.load(text, Loader=_Loader)


def load(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """The defaults, updated by a YAML file and then by ``overrides``; validated."""
    user: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise UserError(f"cannot read config '{path}': {e.strerror}") from None
        try:
            user = read_yaml(text) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config '{path}' is not valid YAML: {e}") from None
        if not isinstance(user, dict):
            raise UserError(f"config '{path}' must be a mapping of sections (data:, model:, pool:, ...)")
    raw = with_family_defaults(_merge(user, overrides or {}))
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise _first_error(e, raw) from None


def as_dict(cfg: Config) -> dict:
    """The config as plain YAML/JSON values (pairs as lists)."""
    return cfg.model_dump(mode="json")


def merged(cfg: Config, overrides: dict) -> dict:
    """A config's values updated by ``overrides`` (as :func:`load` takes them), to load or write again."""
    return _merge(as_dict(cfg), overrides)


def yaml_text(cfg: Config | dict) -> str:
    return yaml.safe_dump(as_dict(cfg) if isinstance(cfg, Config) else cfg, sort_keys=False)


WHERE = ("workers", "executor", "ray")  # keys that change where and how fast a run goes, not its results


def differences(a: Config, b: Config) -> list[str]:
    """Where two configs would give different results, as ``key: A -> B`` per dotted key (``workers``, ``executor``
    and ``ray`` only change where and how fast members train, so they are left out); empty for the same run."""

    def walk(x: dict, y: dict, prefix: str) -> list[str]:
        out = []
        for k in x:
            name, vx, vy = f"{prefix}{k}", x[k], y[k]
            if name in WHERE or vx == vy:
                continue
            nested = isinstance(vx, dict) and isinstance(vy, dict) and k not in ("kwargs", "member_kwargs")
            out += walk(vx, vy, name + ".") if nested else [f"{name}: {vx!r} -> {vy!r}"]
        return out

    return walk(as_dict(a), as_dict(b), "")


if __name__ == "__main__":
    json.dump(Config.model_json_schema(), sys.stdout, indent=1)
    sys.stdout.write("\n")
