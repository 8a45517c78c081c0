"""Run configuration: defaults, YAML loading, and validation that names the offending key."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from .data import TEST_FRACTION
from .errors import UserError
from .preprocess import COLORS

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "workers": 1,
    "executor": "local",  # local: in this process, or `workers` local processes; ray: Ray tasks
    "ray": {
        "address": None,  # null: RAY_ADDRESS, or the cluster `ray start` began here, or a new local
        # instance; auto: the cluster this machine joined (ray start);
        # ray://HOST:PORT (Ray Client); HOST:PORT (the head)
        "num_cpus": 1,  # reserved per member (and its torch threads)
        "num_gpus": 0,  # reserved per member; > 0 with device: cuda (a fraction shares a GPU)
        "max_retries": 3,
    },  # a member whose worker dies (killed, node lost) runs again this many times
    "data": {
        "name": "digits",
        "path": None,
        "download": False,
        "val_fraction": 0.1,
        "max_train": None,
        "test_fraction": TEST_FRACTION,  # carved (stratified, seed 0) from a source without a test split
        "image_size": None,  # int or [h, w]: every image resized to it (area filter); None: as stored
        "color": None,
    },  # grey or rgb: every image converted to it; None: as stored
    "model": {"arch": "small_cnn", "kwargs": {}, "weights": None},
    "train": {
        "epochs": 10.0,
        "batch_size": 128,
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "onecycle",
        "augment": "auto",
        "label_smoothing": 0.0,
        "cycles": 1,  # restarts schedule: cosine cycles (SGDR / snapshot ensembles)
        "compile": "none",
    },  # torch: torch.compile the network; cuda-graph: whole step as a CUDA graph
    "pool": {
        "size": 8,  # members; with pool.min_steps, 8 x 100 steps is a few times the parent's training on a
        # small dataset (see the summary's pool-time line)
        "sparsity": [0.5, 0.9],  # final sparsity, spread evenly over the range across members
        "schedule": "polynomial",  # polynomial (cubic, Zhu & Gupta 2017) or constant
        "scope": "layer",  # layer: every layer to the target; global: one threshold over all layers
        "prune_end": 0.7,  # fraction of fine-tuning after which the final sparsity holds
        "epochs": [1.0, 2.0],  # fine-tuning epochs, uniform in the range
        "min_steps": 100,  # each member trains at least this many optimiser steps, whatever the epochs give
        # (on a small dataset an epoch is a few steps: too few to recover from pruning); 0: no floor
        "lr": [0.01, 0.05],  # peak fine-tuning learning rate, log-uniform in the range
        "batch_size": [64, 128],  # choices
        "lr_schedule": "cosine",  # onecycle (warm-up to a high peak), cosine or constant
        "optimizer": "sgd",
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "augment": "auto",
        "label_smoothing": 0.0,
        "bootstrap": False,  # each member fine-tunes on a bootstrap sample of the training split
        "snapshots": 0,  # >= 2: the baseline's training saves this many evenly spaced checkpoints
        # (the last is the baseline itself) and members are cloned from them in
        # turn; pair with train.schedule: restarts and train.cycles equal to it
        "mask_noise": 0.0,  # pruning ranks |w| * exp(mask_noise * N(0,1)), noise fixed per member:
        # each member keeps a different set of weights (0 = pure magnitude)
        "distill": 0.0,  # weight of distillation from the final fp32 baseline in the fine-tuning loss
        "distill_temperature": 4.0,  # (0 = plain cross-entropy; costs one teacher forward pass per step)
        "family": "clones",  # clones: members start from the baseline; independent: each from its own new
        # initialisation, trained for pool.epochs (optionally distilled from the baseline)
        "include_parent": False,  # independent: member m000 is the baseline itself (with weight_bits, fine-tuned
        # with QAT for the last 1 - qat_start of pool.epochs at a tenth of pool.lr, cosine)
        "member_kwargs": {},  # independent: model kwargs overriding the baseline's (e.g. width: 12)
        "weight_bits": 0,  # 2..8: quantisation-aware training, weights on a per-channel grid of this many bits,
        # shipped exactly (0 = off: int8 post-training quantisation alone)
        "qat_start": 0.5,  # fraction of a member's steps after which its weights train fake-quantised
        "mask": "magnitude",  # magnitude, or antirandom / antirandom-weighted: fixed masks that overlap as
        # little as possible across members (random, or sampled in proportion to |w|)
        "shrink": 1.0,  # start from shrink * w + perturb * w_fresh (shrink and perturb)
        "perturb": 0.0,
        "reinit_last": 0,  # re-initialise the last N prunable layers before training
        "regrow": 0.0,  # prune-and-regrow (RigL): fraction of active weights moved every regrow_every steps
        "regrow_every": 100,
        "cyclical": False,  # one cyclical run from the baseline; a member at each cycle's low point (FGE)
        "compile": "none",  # as train.compile, for the members' fine-tuning
    },
    "quantize": {
        "calibration_size": 256,
        "max_drop": 0.03,
        "min_agreement": 0.9,
        "codebook_bits": 0,
    },  # 2..8: each member layer's int8 weights share 2^bits values (0 = off)
    # k: auto, the k in 1..k_max whose selected ensemble is the most accurate on validation; an integer: that k
    "cluster": {"method": "kmeans-onehot", "k": "auto", "k_max": 10, "preset": None},
    "select": {
        "strategy": "accuracy-first",
        "max_acc_gap": 0.02,  # accuracy-first / diversity-first take only members at most this far below
        # the best member on validation; a cluster with none is skipped
        "max_below_parent": 0.03,  # a member whose int8 validation accuracy is more than this below the parent's
        # (fp32) is reported and left out of clustering
        "fallback": True,  # ship the int8 parent or one member instead where it beats the selected ensemble on
        # validation (and fits a device of deploy.devices); false: always ship the ensemble
    },
    "vote": {
        "rule": "soft",
        "weighted": False,
        "target_accuracy": 0.95,
    },  # the bundle's default abstain threshold: the lowest vote margin at which the
    # decided validation frames are this accurate (null: no default threshold)
    "bundle": {"latency_runs": 100},  # each member's int8 latency at batch 1: median of this many timed runs
    "deploy": {"devices": None},  # a devices file (YAML/JSON): each device's memory (and latency) budget
}

CHOICES = {
    "device": ("cpu", "cuda"),
    "executor": ("local", "ray"),
    "data.name": ("digits", "cifar10", "cifar100", "npz", "imagefolder"),
    "data.color": (None, *COLORS),
    "train.optimizer": ("sgd", "adam"),
    "train.schedule": ("onecycle", "cosine", "constant", "restarts"),
    "train.augment": ("auto", "none", "crop", "crop_flip"),
    "train.compile": ("none", "torch", "cuda-graph"),
    "pool.schedule": ("polynomial", "constant"),
    "pool.scope": ("layer", "global"),
    "pool.lr_schedule": ("onecycle", "cosine", "constant"),
    "pool.optimizer": ("sgd", "adam"),
    "pool.augment": ("auto", "none", "crop", "crop_flip"),
    "pool.family": ("clones", "independent"),
    "pool.include_parent": (False, True),
    "pool.mask": ("magnitude", "antirandom", "antirandom-weighted"),
    "pool.cyclical": (False, True),
    "pool.compile": ("none", "torch", "cuda-graph"),
    "cluster.method": ("kmeans-onehot", "kmeans-proba", "kmeans-labels", "agglomerative"),
    "cluster.preset": (None, "paper"),
    "select.strategy": ("accuracy-first", "diversity-first", "top-k", "random", "greedy"),
    "vote.rule": ("soft", "hard"),
}
# the authors' literal clustering: k-means with k=20 on the members' predicted-label vectors
PRESETS = {"paper": {"method": "kmeans-labels", "k": 20}}


def load(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Defaults, updated by a YAML file and then by ``overrides``; validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise UserError(f"cannot read config '{path}': {e.strerror}") from None
        try:
            user = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config '{path}' is not valid YAML: {e}") from None
        if not isinstance(user, dict):
            raise UserError(f"config '{path}' must be a mapping of sections (data:, model:, pool:, ...)")
        _merge(cfg, user, "")
    _merge(cfg, overrides or {}, "")
    return validate(cfg)


# keys renamed since, read from the configs of older run directories: old key -> (new key, old value -> new value)
RENAMED = {"pool.init": ("family", {"baseline": "clones", "fresh": "independent"})}


def _merge(base: dict, new: dict, prefix: str) -> None:
    for key, value in new.items():
        name = f"{prefix}{key}"
        if name in RENAMED:
            key, values = RENAMED[name]
            name, value = f"{prefix}{key}", values.get(value, value)
        if key not in base:
            raise UserError(
                f"unknown config key '{name}'; known keys{' in ' + prefix[:-1] if prefix else ''}: {', '.join(base)}"
            )
        if isinstance(base[key], dict) and key not in ("kwargs", "member_kwargs"):
            if not isinstance(value, dict):
                raise UserError(f"config key '{name}' must be a mapping, got {value!r}")
            _merge(base[key], value, name + ".")
        else:
            base[key] = value


def _get(cfg: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _need(ok: bool, key: str, msg: str, value: Any) -> None:
    if not ok:
        raise UserError(f"config key '{key}' {msg}, got {value!r}")


def _range(cfg: dict, key: str, lo: float, hi: float, closed_hi: bool = True) -> tuple[float, float]:
    v = _get(cfg, key)
    vals = v if isinstance(v, list) else [v, v]
    _need(
        len(vals) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals),
        key,
        "must be a number or a [low, high] pair",
        v,
    )
    a, b = vals
    inside = lo <= a <= b and (b <= hi if closed_hi else b < hi)
    _need(inside, key, f"must lie in [{lo}, {hi}{']' if closed_hi else ')'} with low <= high", v)
    return float(a), float(b)


def validate(cfg: dict) -> dict:
    """Check types and ranges; apply the clustering preset. Returns the same dict."""
    for key, options in CHOICES.items():
        _need(_get(cfg, key) in options, key, f"must be one of {[o for o in options if o is not None]}", _get(cfg, key))
    for key in (
        "seed",
        "workers",
        "pool.size",
        "train.batch_size",
        "train.cycles",
        "quantize.calibration_size",
        "cluster.k_max",
        "bundle.latency_runs",
    ):
        v = _get(cfg, key)
        _need(
            isinstance(v, int) and not isinstance(v, bool) and v >= (0 if key == "seed" else 1),
            key,
            "must be a positive integer",
            v,
        )
    for key in (
        "train.epochs",
        "train.lr",
        "train.momentum",
        "train.weight_decay",
        "train.label_smoothing",
        "pool.momentum",
        "pool.weight_decay",
        "pool.label_smoothing",
    ):
        v = _get(cfg, key)
        _need(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, key, "must be a number >= 0", v)
    for key in ("train.compile", "pool.compile"):
        _need(
            _get(cfg, key) != "cuda-graph" or cfg["device"] == "cuda",
            key,
            "'cuda-graph' needs device: cuda",
            _get(cfg, key),
        )
    _need(
        cfg["train"]["epochs"] > 0 or cfg["model"]["weights"],
        "train.epochs",
        "must be > 0 unless model.weights is given",
        cfg["train"]["epochs"],
    )
    _range(cfg, "data.val_fraction", 0.01, 0.9)
    _range(cfg, "data.test_fraction", 0.01, 0.9)
    size = cfg["data"]["image_size"]
    _need(
        size is None
        or all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1
            for v in (size if isinstance(size, list) and len(size) == 2 else [size])
        ),
        "data.image_size",
        "must be null (as stored), a positive integer or a [height, width] pair of them",
        size,
    )
    _range(cfg, "pool.sparsity", 0.0, 1.0, closed_hi=False)
    _range(cfg, "pool.prune_end", 0.0, 1.0)
    _range(cfg, "pool.mask_noise", 0.0, 10.0)
    _range(cfg, "pool.distill", 0.0, 1.0)
    _range(cfg, "pool.shrink", 0.0, 1.0)
    _range(cfg, "pool.perturb", 0.0, 10.0)
    _range(cfg, "pool.regrow", 0.0, 1.0, closed_hi=False)
    for key in ("pool.reinit_last", "pool.regrow_every"):
        v = _get(cfg, key)
        _need(
            isinstance(v, int) and not isinstance(v, bool) and v >= (0 if key == "pool.reinit_last" else 1),
            key,
            "must be an integer >= 0" if key == "pool.reinit_last" else "must be a positive integer",
            v,
        )
    p = cfg["pool"]
    _need(isinstance(p["member_kwargs"], dict), "pool.member_kwargs", "must be a mapping", p["member_kwargs"])
    _need(
        not p["member_kwargs"] or p["family"] == "independent",
        "pool.member_kwargs",
        "changes the network, so needs pool.family: independent (a clone keeps the baseline's shape)",
        p["member_kwargs"],
    )
    _need(
        p["family"] == "clones"
        or not (p["snapshots"] or p["cyclical"] or p["reinit_last"] or p["shrink"] != 1 or p["perturb"]),
        "pool.family",
        "independent members start from a new initialisation, so cannot be combined with snapshots, cyclical, "
        "shrink, perturb or reinit_last",
        p["family"],
    )
    _need(
        not p["include_parent"] or p["family"] == "independent",
        "pool.include_parent",
        "makes the baseline one member of an independent pool, so needs pool.family: independent",
        p["include_parent"],
    )
    bits = p["weight_bits"]
    _need(
        isinstance(bits, int) and not isinstance(bits, bool) and (bits == 0 or 2 <= bits <= 8),
        "pool.weight_bits",
        "must be 0 (off: int8 post-training quantisation) or an integer from 2 to 8",
        bits,
    )
    _range(cfg, "pool.qat_start", 0.0, 1.0, closed_hi=False)
    _need(
        not p["cyclical"] or (p["mask"] == "magnitude" and not p["snapshots"] and not p["bootstrap"]),
        "pool.cyclical",
        "makes every member from one run, so cannot be combined with pool.mask antirandom, snapshots or bootstrap",
        p["cyclical"],
    )
    t = cfg["pool"]["distill_temperature"]
    _need(
        isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0,
        "pool.distill_temperature",
        "must be a number > 0",
        t,
    )
    snaps = cfg["pool"]["snapshots"]
    _need(
        isinstance(snaps, int) and not isinstance(snaps, bool) and (snaps == 0 or snaps >= 2),
        "pool.snapshots",
        "must be 0 (clone the final baseline) or an integer >= 2",
        snaps,
    )
    _need(
        not (snaps and cfg["model"]["weights"]),
        "pool.snapshots",
        "needs the baseline to be trained here (model.weights is set), so must be 0",
        snaps,
    )
    _range(cfg, "quantize.max_drop", 0.0, 1.0)
    _range(cfg, "quantize.min_agreement", 0.0, 1.0)
    bits = cfg["quantize"]["codebook_bits"]
    _need(
        isinstance(bits, int) and not isinstance(bits, bool) and (bits == 0 or 2 <= bits <= 8),
        "quantize.codebook_bits",
        "must be 0 (off) or an integer from 2 to 8",
        bits,
    )
    lo, _ = _range(cfg, "pool.epochs", 0.0, 1e6)
    _need(lo > 0, "pool.epochs", "must be > 0", cfg["pool"]["epochs"])
    lo, _ = _range(cfg, "pool.lr", 0.0, 10.0)
    _need(lo > 0, "pool.lr", "must be > 0", cfg["pool"]["lr"])
    bs = cfg["pool"]["batch_size"]
    bs = bs if isinstance(bs, list) else [bs]
    _need(
        bool(bs) and all(isinstance(b, int) and b > 0 for b in bs),
        "pool.batch_size",
        "must be a positive integer or a list of them",
        bs,
    )
    if cfg["cluster"]["preset"]:
        cfg["cluster"].update(PRESETS[cfg["cluster"]["preset"]])
    k = cfg["cluster"]["k"]
    _need(
        k in ("auto", "silhouette") or (isinstance(k, int) and not isinstance(k, bool) and k >= 1),
        "cluster.k",
        "must be a positive integer, 'auto' or 'silhouette'",
        k,
    )
    if isinstance(k, int) and k > cfg["pool"]["size"]:
        raise UserError(
            f"config key 'cluster.k' is {k}, larger than the pool (pool.size = {cfg['pool']['size']}); "
            "lower cluster.k or raise pool.size"
        )
    for key in ("select.max_acc_gap", "select.max_below_parent"):
        gap = _get(cfg, key)
        _need(
            isinstance(gap, (int, float)) and not isinstance(gap, bool) and 0 <= gap <= 1,
            key,
            "must be a number in [0, 1] (a fraction of validation accuracy)",
            gap,
        )
    _need(
        isinstance(cfg["select"]["fallback"], bool),
        "select.fallback",
        "must be true (ship a single model that beats the ensemble on validation) or false (always the ensemble)",
        cfg["select"]["fallback"],
    )
    ms = cfg["pool"]["min_steps"]
    _need(
        isinstance(ms, int) and not isinstance(ms, bool) and ms >= 0,
        "pool.min_steps",
        "must be an integer >= 0 (a member's least optimiser steps; 0: no floor)",
        ms,
    )
    ta = cfg["vote"]["target_accuracy"]
    _need(
        ta is None or (isinstance(ta, (int, float)) and not isinstance(ta, bool) and 0 < ta <= 1),
        "vote.target_accuracy",
        "must be null (no default abstain threshold) or an accuracy in (0, 1]",
        ta,
    )
    _need(isinstance(cfg["model"]["kwargs"], dict), "model.kwargs", "must be a mapping", cfg["model"]["kwargs"])
    _validate_ray(cfg)
    dev = cfg["deploy"]["devices"]
    _need(
        dev is None or (isinstance(dev, str) and bool(dev)),
        "deploy.devices",
        "must be the path of a devices file (YAML or JSON), or null",
        dev,
    )
    mt = cfg["data"]["max_train"]
    _need(mt is None or (isinstance(mt, int) and mt > 1), "data.max_train", "must be null or an integer > 1", mt)
    return cfg


def _validate_ray(cfg: dict) -> None:
    r = cfg["ray"]
    address = r["address"]
    _need(
        address is None or (isinstance(address, str) and re.fullmatch(r"auto|(ray://)?[\w.-]+:\d+", address)),
        "ray.address",
        "must be null (a Ray instance on this machine), 'auto', 'ray://HOST:PORT' or 'HOST:PORT'",
        address,
    )
    cpus, gpus, retries = r["num_cpus"], r["num_gpus"], r["max_retries"]
    _need(
        isinstance(cpus, (int, float)) and not isinstance(cpus, bool) and cpus > 0,
        "ray.num_cpus",
        "must be a number > 0",
        cpus,
    )
    _need(
        isinstance(gpus, (int, float)) and not isinstance(gpus, bool) and gpus >= 0,
        "ray.num_gpus",
        "must be a number >= 0",
        gpus,
    )
    _need(
        isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0,
        "ray.max_retries",
        "must be an integer >= 0",
        retries,
    )
    if cfg["executor"] != "ray":
        return
    _need(
        cfg["workers"] == 1,
        "workers",
        "runs members in local processes; with executor: ray, Ray schedules them "
        "by ray.num_cpus / ray.num_gpus per member, so leave workers at 1",
        cfg["workers"],
    )
    _need(
        not cfg["pool"]["cyclical"],
        "pool.cyclical",
        "makes every member in one run, which cannot be spread; use executor: local",
        cfg["pool"]["cyclical"],
    )
    _need(
        cfg["device"] != "cuda" or r["num_gpus"] > 0,
        "ray.num_gpus",
        "must be > 0 with device: cuda (e.g. 1, or 0.5 for two members per GPU), so that Ray gives each member a GPU",
        r["num_gpus"],
    )
    _need(
        cfg["device"] == "cuda" or r["num_gpus"] == 0,
        "ray.num_gpus",
        "reserves GPUs that device: cpu leaves idle; set it to 0 or use device: cuda",
        r["num_gpus"],
    )


def parse_settings(settings: list[str] | tuple[str, ...]) -> dict:
    """``["pool.size=8", "train.lr=0.1"]`` -> nested overrides; values are read as YAML scalars or lists."""
    out: dict = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set takes KEY=VALUE (e.g. pool.size=8), got '{item}'")
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"--set {key}: cannot read value '{value}' ({e})") from None
    return out


def yaml_text(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


WHERE = ("workers", "executor", "ray")  # keys that change where and how fast a run goes, not its results


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Where two configs would give different results, as ``key: A -> B`` per dotted key (``workers``, ``executor``
    and ``ray`` only change where and how fast members train, so they are left out); empty for the same run."""
    out = []
    for key in sorted(set(a) | set(b), key=list({**a, **b}).index):
        name, va, vb = f"{prefix}{key}", a.get(key), b.get(key)
        if name in WHERE or va == vb:
            continue
        if isinstance(va, dict) and isinstance(vb, dict) and key not in ("kwargs", "member_kwargs"):
            out += differences(va, vb, name + ".")
        else:
            out.append(f"{name}: {va!r} -> {vb!r}")
    return out
