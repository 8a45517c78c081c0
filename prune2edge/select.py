"""Phase 4: choose which members vote, one per cluster or by a comparison strategy; on a fleet of devices,
each chosen member also gets a device it fits (:func:`assign`). :func:`choose` is the phase: members and their
int8 records in, ``selection.json`` out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import linear_sum_assignment

from . import cluster, config, cost, devices, records, ship, store
from .errors import UserError
from .records import Clustering, CurvePoint, KChoice, ParentGate, Placement, Selection
from .runtime import latency
from .runtime.vote import accuracy, vote
from .store import PARENT, model_dir

if TYPE_CHECKING:
    from .config import Config
    from .records import Member, Quantised

STRATEGIES = ("accuracy-first", "diversity-first", "top-k", "random", "greedy")


def _behind(proba: np.ndarray, y: np.ndarray, max_acc_gap: float, usable: np.ndarray) -> tuple[int, np.ndarray]:
    """The best usable member and, per member, the sign test's p that the best one's lead over it is chance
    (:func:`ship.lead`) where it is more than ``max_acc_gap`` below the best on validation, else 1.0."""
    accs = np.array([accuracy(p, y) for p in proba])
    top = max(np.flatnonzero(usable), key=lambda i: (accs[i], -i))
    far = accs < accs[top] - max_acc_gap - 1e-12  # no rounding error may exclude a member exactly at the gap
    pred = proba.argmax(2)
    return top, np.array([ship.lead(y, pred[top], pred[i]) if far[i] else 1.0 for i in range(len(proba))])


def _eligible(labels: list[int], usable: np.ndarray, p: np.ndarray) -> dict:
    """Per cluster, its usable members not left behind by the best usable member (``p``, from :func:`_behind`: more
    than ``max_acc_gap`` below it on validation *and* behind beyond chance; a few images on a small split decide
    nothing); none: an outlier cluster."""
    ok = usable & (p >= ship.SIGNIFICANCE)
    labels_arr = np.asarray(labels)
    return {c: np.flatnonzero((labels_arr == c) & ok) for c in sorted(set(labels))}


def slots(
    strategy: str,
    proba: np.ndarray,
    y: np.ndarray,
    labels: list[int],
    *,
    method: str = config.default("cluster.method"),
    rule: str = config.default("vote.rule"),
    seed: int = 0,
    max_acc_gap: float = config.default("select.max_acc_gap"),
    fits: np.ndarray | None = None,
) -> list[list[int]]:
    """What ``strategy`` picks, as slots: each slot's candidate members, most preferred first.

    ``accuracy-first``: one slot per cluster, its members by validation accuracy. ``diversity-first``: by
    distance to the cluster's centre (ties to the more accurate). Both pass over members more than
    ``max_acc_gap`` below the best member's validation accuracy that it beats beyond chance, and skip a cluster
    that has no other (see :func:`skipped`). The others fill as many one-member slots as there are clusters: ``top-k`` by
    accuracy, ``random`` (seeded), ``greedy`` forward selection maximising the ensemble's accuracy
    (Caruana et al. 2004, without replacement). With ``fits[member, device]``, only members that fit a
    device are candidates, and the one-member strategies pass over a member that no free device fits.
    """
    usable = np.ones(len(proba), bool) if fits is None else fits.any(1)
    labels_arr = np.asarray(labels)
    accs = np.array([accuracy(p, y) for p in proba])
    if strategy == "accuracy-first":
        return [
            sorted(ok, key=lambda i: (-accs[i], i))
            for ok in _eligible(labels, usable, _behind(proba, y, max_acc_gap, usable)[1]).values()
            if len(ok)
        ]
    if strategy == "diversity-first":
        f = cluster.features(proba, method)
        out = []
        for c, ok in _eligible(labels, usable, _behind(proba, y, max_acc_gap, usable)[1]).items():
            if len(ok):
                dist = np.linalg.norm(f[ok] - f[labels_arr == c].mean(0), axis=1)
                out.append(
                    [
                        ok[j]
                        for j in sorted(range(len(ok)), key=lambda j: (round(float(dist[j]), 9), -accs[ok[j]], ok[j]))
                    ]
                )
        return out
    return _one_member_slots(strategy, proba, y, len(set(labels)), accs, usable, rule, seed, fits)


def _one_member_slots(
    strategy: str,
    proba: np.ndarray,
    y: np.ndarray,
    k: int,
    accs: np.ndarray,
    usable: np.ndarray,
    rule: str,
    seed: int,
    fits: np.ndarray | None,
) -> list[list[int]]:
    """``top-k``, ``random`` and ``greedy`` (:func:`slots`): ``k`` one-member slots, each member placeable beside
    those before it."""
    pool = np.flatnonzero(usable).tolist()

    def placeable(members: list[int]) -> bool:
        return fits is None or len(assign([[m] for m in members], fits)) == len(members)

    rng = np.random.default_rng([seed, 4])
    if strategy == "top-k":
        order = sorted(pool, key=lambda i: (-accs[i], i))
    elif strategy == "random":
        first = rng.choice(pool, min(k, len(pool)), replace=False).tolist()  # then, for the unplaceable, a shuffle
        order = first + [i for i in rng.permutation(pool).tolist() if i not in first]
    elif strategy == "greedy":
        order = None
    else:
        raise ValueError(f"unknown selection strategy '{strategy}': use one of {STRATEGIES}")
    chosen: list[int] = []
    while len(chosen) < k:
        rest = [i for i in (order if order is not None else pool) if i not in chosen and placeable(chosen + [i])]
        if not rest:
            break
        chosen.append(
            rest[0]
            if order is not None
            else max(rest, key=lambda i: (accuracy(vote(proba[chosen + [i]], rule), y), accs[i], -i))
        )
    return [[i] for i in chosen]


def assign(slots: list[list[int]], fits: np.ndarray) -> dict[int, int]:
    """Member -> device, for the members of ``slots`` and the devices of ``fits[member, device]``.

    Each device runs at most one member, and only one that fits it. As many slots as possible get a
    device; among such assignments, the one whose members rank best in their slots (least sum of ranks).
    """
    n_dev = fits.shape[1]
    big = sum(len(s) for s in slots) + 1  # one more slot placed always outweighs any ranks
    cost = np.full((len(slots), n_dev), big)
    member = {}
    for g, candidates in enumerate(slots):
        for d in range(n_dev):
            rank = next((r for r, m in enumerate(candidates) if fits[m, d]), None)
            if rank is not None:
                cost[g, d], member[g, d] = rank, candidates[rank]
    return {int(member[g, d]): int(d) for g, d in zip(*linear_sum_assignment(cost)) if (g, d) in member}


def select(
    strategy: str,
    proba: np.ndarray,
    y: np.ndarray,
    labels: list[int],
    *,
    method: str = config.default("cluster.method"),
    rule: str = config.default("vote.rule"),
    seed: int = 0,
    max_acc_gap: float = config.default("select.max_acc_gap"),
    fits: np.ndarray | None = None,
) -> list[int]:
    """Indices of the chosen members, from validation probabilities ``[M, N, K]`` and cluster labels: each
    slot's first candidate (:func:`slots`), or with ``fits[member, device]`` the members :func:`assign` places."""
    s = slots(strategy, proba, y, labels, method=method, rule=rule, seed=seed, max_acc_gap=max_acc_gap, fits=fits)
    return sorted(int(i) for i in (assign(s, fits) if fits is not None else [c[0] for c in s]))


def skipped(
    proba: np.ndarray,
    y: np.ndarray,
    labels: list[int],
    max_acc_gap: float,
    names: list[str],
    usable: np.ndarray | None = None,
) -> list[dict]:
    """The clusters ``accuracy-first`` and ``diversity-first`` leave out, each with its members and why
    (only ``usable`` members count: those that fit a device)."""
    usable = np.ones(len(proba), bool) if usable is None else np.asarray(usable, bool)
    accs = np.array([accuracy(p, y) for p in proba])
    top, p = _behind(proba, y, max_acc_gap, usable)
    out = []
    for c, ok in _eligible(labels, usable, p).items():
        if not len(ok):
            idx = np.flatnonzero(np.asarray(labels) == c)
            if not usable[idx].any():
                out.append(
                    {
                        "cluster": int(c),
                        "members": [names[i] for i in idx],
                        "reason": "none of its members fits a device's budget (see devices.ruled_out)",
                    }
                )
                continue
            best = max(idx[usable[idx]], key=lambda i: (accs[i], -i))
            out.append(
                {
                    "cluster": int(c),
                    "members": [names[i] for i in idx],
                    "best_member": names[best],
                    "best_val_acc": float(accs[best]),
                    "pool_best": names[top],
                    "pool_best_val_acc": float(accs[top]),
                    "p": float(p[best]),
                    "reason": f"its best member {names[best]} (val {accs[best]:.4f}) is more than select.max_acc_gap = "
                    f"{max_acc_gap:g} below the pool's best, {names[top]} (val {accs[top]:.4f}), which beats it "
                    f"beyond chance (sign test p = {p[best]:.2g} < {ship.SIGNIFICANCE:g})",
                }
            )
    return out


def sweep(
    proba: np.ndarray,
    y: np.ndarray,
    method: str,
    rule: str,
    seed: int,
    k_max: int,
    max_acc_gap: float = config.default("select.max_acc_gap"),
    fits: np.ndarray | None = None,
) -> dict[str, list[list[int]]]:
    """For k = 1..k_max: the members each strategy picks (and places, with ``fits``) when the pool is cut into k clusters."""
    out: dict[str, list[list[int]]] = {s: [] for s in STRATEGIES}
    for k in range(1, min(k_max, len(proba)) + 1):
        labels = cluster.cluster(proba, method, k, seed=seed)["labels"]
        for s in STRATEGIES:
            out[s].append(
                select(s, proba, y, labels, method=method, rule=rule, seed=seed, max_acc_gap=max_acc_gap, fits=fits)
            )
    return out


def curve(
    proba: np.ndarray, y: np.ndarray, picks: list[list[int]], rule: str = "soft", weights: np.ndarray | None = None
) -> list[dict]:
    """Each pick of a :func:`sweep` (``k`` clusters) voting by ``rule`` (and ``weights``) on validation: its accuracy
    and ``p_lead``, how likely chance gives it its lead over the pick with the most votes (:func:`ship.lead`)."""
    preds = [vote(proba[idx], rule, None if weights is None else weights[idx]).argmax(1) for idx in picks]
    most = ship.most_votes([len(idx) for idx in picks])
    return [
        {"k": k, "members": idx, "val_acc": float((p == y).mean()), "p_lead": ship.lead(y, p, preds[most])}
        for k, (idx, p) in enumerate(zip(picks, preds), 1)
    ]


def choose(run_dir: Path, cfg: Config, members: list[Member], quant: dict[str, Quantised]) -> Selection:
    """Cluster the members that passed the int8 gate and the gate against the parent (:func:`ship.parent_gate`),
    select the voters, place them on ``deploy.devices`` and decide what ships (:func:`ship.shipped_model`); writes
    ``selection.json`` (and returns the one already there, made for the same devices).

    With devices, only members that fit a device are selected, each gets a device it fits (:func:`assign`), and k
    is at most the number of devices."""
    fleet = devices.load(cfg.deploy.devices) if cfg.deploy.devices else None
    if (run_dir / store.SELECTION).exists():
        return _saved(run_dir, fleet)
    quant = records.with_parent(run_dir, quant)
    _, y_val = store.split(run_dir, "val")
    passed, every, names, gate = _candidates(run_dir, cfg, members, quant, y_val)
    proba = np.stack([every[n] for n in names])
    c, strategy, gap, rule = cfg.cluster, cfg.select.strategy, cfg.select.max_acc_gap, cfg.vote.rule
    weights = ship.vote_weights(quant, names, cfg.vote.weighted)
    k_max, fits, placed = c.k_max, None, None
    if fleet:
        fits, placed = fit_devices(run_dir, cfg, fleet, names, quant)
        k_max = min(k_max, len(fleet))
        if isinstance(c.k, int) and c.k > len(fleet):
            raise UserError(
                f"config key 'cluster.k' is {c.k}, but the devices file '{cfg.deploy.devices}' lists "
                f"{len(fleet)} devices and each runs one member; lower cluster.k or use cluster.k: auto"
            )
    picks = sweep(proba, y_val, c.method, rule, cfg.seed, k_max, gap, fits)
    points = curve(proba, y_val, picks[strategy], rule, weights)
    k, k_reason = cluster.choose_k(c.k, points, len(names))
    result = cluster.cluster(proba, c.method, k, k_max, cfg.seed)
    kw = {"method": c.method, "rule": rule, "seed": cfg.seed, "max_acc_gap": gap}
    chosen = {s: select(s, proba, y_val, result["labels"], **kw, fits=fits) for s in STRATEGIES}
    selected = [names[i] for i in chosen[strategy]]
    placement = None
    if fleet:
        picked = slots(strategy, proba, y_val, result["labels"], **kw, fits=fits)
        placement = Placement.from_json(placed | place(picked, fits, fleet, names, result["labels"]))
    record = Selection(
        candidates=names,
        dropped=[m.name for m in members if m.name not in passed],
        parent_gate=ParentGate.from_json(gate),
        clustering=Clustering(**result),
        strategy=strategy,
        selected=selected,
        strategies={s: [names[i] for i in idx] for s, idx in chosen.items()},
        k_choice=KChoice(
            by=c.k if isinstance(c.k, str) else "config",
            k=result["k_requested"],
            reason=k_reason,
            curve=[CurvePoint(**{**p, "members": [names[i] for i in p["members"]]}) for p in points],
        ),
        skipped_clusters=skipped(proba, y_val, result["labels"], gap, names, None if fits is None else fits.any(1)),
        sweep={s: [[names[i] for i in idx] for idx in ks] for s, ks in picks.items()},
        devices=placement,
        shipped=ship.shipped_model(cfg, names, selected, strategy, placement, proba, y_val, quant, fits, every[PARENT]),
    )
    records.write_selection(run_dir, record)
    return record


def _candidates(
    run_dir: Path, cfg: Config, members: list[Member], quant: dict[str, Quantised], y_val: np.ndarray
) -> tuple[list[str], dict[str, np.ndarray], list[str], dict]:
    """The members that passed the int8 gate, every model's validation probabilities (the int8 parent's too), the
    members kept against the parent (:func:`ship.parent_gate`: the candidates) and the gate's record."""
    passed = [m.name for m in members if quant[m.name].ok]
    if not passed:
        raise UserError(
            "every pool member failed the int8 gate; see pool/*/quant.json, and raise quantize.max_drop "
            "or lower pool.sparsity"
        )
    every = {n: np.load(model_dir(run_dir, n) / store.VAL_PROBA) for n in [PARENT, *passed]}
    pred = {n: p.argmax(1) for n, p in every.items()}
    names, gate = ship.parent_gate(quant, passed, cfg.select.max_below_parent, pred, y_val)
    return passed, every, names, gate


def _saved(run_dir: Path, fleet: list[devices.Device] | None) -> Selection:
    """The selection already made, if it was made for these devices."""
    sel = records.read_selection(run_dir)
    if (sel.devices.devices if sel.devices else None) != (fleet and devices.record(fleet)):
        raise UserError(
            f"'{run_dir / store.SELECTION}' was selected for other devices than deploy.devices now lists; delete it, "
            "bundle/ and metrics.json to select again (or use another output directory)"
        )
    return sel


def place(
    picked: list[list[int]], fits: np.ndarray, fleet: list[devices.Device], names: list[str], labels: list[int]
) -> dict:
    """Each slot's member (``picked``: :func:`slots`) on a device it fits (:func:`assign`): which device runs which
    member, the idle devices, and the clusters left without one."""
    where = assign(picked, fits)
    on = {d: names[m] for m, d in where.items()}
    return {
        "assignment": {dev.name: on.get(d) for d, dev in enumerate(fleet)},
        "idle": [dev.name for d, dev in enumerate(fleet) if d not in on],
        "unplaced": [
            {
                "cluster": int(labels[s[0]]),
                "members": [names[i] for i in s],
                "reason": "no device left that fits one of them (each device runs one member)",
            }
            for s in picked
            if not set(s) & set(where)
        ],
    }


def fit_devices(
    run_dir: Path, cfg: Config, fleet: list[devices.Device], names: list[str], quant: dict[str, Quantised]
) -> tuple[np.ndarray, dict]:
    """Which of the members ``names`` fit which device (shipped bytes; int8 latency at batch 1 and session memory
    where a device has those budgets), and the record of it for ``selection.json``, with the devices the int8
    parent fits."""
    sizes = {n: quant[n].bytes.shipped for n in [*names, PARENT]}
    ms = mb = None
    runs = cfg.bundle.latency_runs
    if any(dev.latency_ms is not None or dev.max_memory_mb is not None for dev in fleet):
        x_val = store.tensors(run_dir, "val")[0][:runs].numpy()
    if any(dev.latency_ms is not None for dev in fleet):
        ms = latency.measure({n: model_dir(run_dir, n) / store.INT8 for n in sizes}, x_val, runs)
    if any(dev.max_memory_mb is not None for dev in fleet):
        mb = {n: cost.memory(model_dir(run_dir, n) / store.INT8, x_val[0])["session_mb"] for n in sizes}
    fits, ruled_out = devices.fit(fleet, {n: sizes[n] for n in names}, ms, mb)
    parent, parent_out = devices.budgets(fleet, {PARENT: sizes[PARENT]}, ms, mb)

    def measured(n: str) -> dict:
        return {
            "shipped_bytes": sizes[n],
            "latency_ms": None if ms is None else round(ms[n], 4),
            "memory_mb": None if mb is None else mb[n],
        }

    return fits, {
        "devices": devices.record(fleet),
        "latency": None if ms is None else latency.describe(runs) | {"model": store.INT8},
        "memory": None if mb is None else cost.DESCRIBE["memory"],
        "members": {
            n: measured(n) | {"fits": [dev.name for d, dev in enumerate(fleet) if fits[i, d]]}
            for i, n in enumerate(names)
        },
        "ruled_out": ruled_out,
        "unfit": [n for i, n in enumerate(names) if not fits[i].any()],
        "parent": measured(PARENT)
        | {"fits": [dev.name for d, dev in enumerate(fleet) if parent[0, d]], "ruled_out": parent_out},
    }
