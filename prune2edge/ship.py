"""What ships, decided on validation: the members kept against the parent (:func:`parent_gate`), and the selected
ensemble or, where it is more accurate, one model instead (:func:`shipped_model`, ``select.fallback``).

No choice on noise: every decision that ships fewer models than it could (a member left out against the parent, a
smaller k, one model instead of the ensemble) needs a lead on validation that chance alone would rarely give
(:func:`lead` < :data:`SIGNIFICANCE`); without it the more robust option ships: more votes, and among single models
the parent."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import binomtest

from .records import Shipped
from .runtime.vote import accuracy, vote
from .store import PARENT

if TYPE_CHECKING:
    from .config import Config
    from .records import Placement, Quantised


def most_votes(sizes: list[int]) -> int:
    """Which of the ensembles of ``sizes`` members (for k = 1, 2, ... in order) has the most votes: the robust
    choice without evidence; the smaller k of equals."""
    return max(range(len(sizes)), key=lambda i: (sizes[i], -i))


def parent_gate(
    quant: dict[str, Quantised], names: list[str], margin: float, pred: dict[str, np.ndarray], y: np.ndarray
) -> tuple[list[str], dict]:
    """The members of ``names`` kept against the parent: all but those whose int8 validation accuracy is more than
    ``margin`` (``select.max_below_parent``) below the parent's fp32 one *and* whose int8 predictions (``pred``, by
    name, the parent's too) the int8 parent's beat beyond chance (:func:`lead`). Returns them and the gate's record:
    the parent's accuracy and each member left out, with how far below it is and the test's p. Where every member
    is left out, the best one is kept anyway (``kept_anyway``), so that there is an ensemble to weigh against the
    parent (which the fallback will then ship, when it is on)."""
    ref = quant[PARENT].val_acc_fp32
    below = []
    for n in names:
        if quant[n].val_acc_int8 < ref - margin - 1e-12:  # no rounding error may drop a member at the margin
            p = lead(y, pred[PARENT], pred[n])
            if p < SIGNIFICANCE:
                below.append(
                    {
                        "name": n,
                        "val_acc_int8": quant[n].val_acc_int8,
                        "below_by": ref - quant[n].val_acc_int8,
                        "p": p,
                    }
                )
    out = {b["name"] for b in below}
    kept = [n for n in names if n not in out]
    anyway = None if kept else max(names, key=lambda n: (quant[n].val_acc_int8, -names.index(n)))
    return kept or [anyway], {"parent_val_acc_fp32": ref, "margin": margin, "below": below, "kept_anyway": anyway}


SIGNIFICANCE = 0.05  # the p a lead on validation needs before fewer models ship


def mcnemar(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, alternative: str = "two-sided") -> float:
    """Exact McNemar p-value for two classifiers' correctness on the same inputs (the sign test on the inputs
    where exactly one is right); ``alternative="greater"``: one-sided, that ``pred_a`` is right more often."""
    a, b = pred_a == y, pred_b == y
    n01, n10 = int((a & ~b).sum()), int((~a & b).sum())
    k = min(n01, n10) if alternative == "two-sided" else n01
    return 1.0 if n01 + n10 == 0 else float(binomtest(k, n01 + n10, 0.5, alternative=alternative).pvalue)


def vote_weights(quant: dict[str, Quantised], names: list[str], weighted: bool) -> np.ndarray | None:
    """What the vote counts each model of ``names`` as: with ``vote.weighted``, its int8 validation accuracy;
    None: one vote each."""
    return np.array([quant[n].val_acc_int8 for n in names]) if weighted else None


def lead(y: np.ndarray, ahead: np.ndarray, behind: np.ndarray) -> float:
    """How likely chance alone gives predictions ``ahead`` their lead over ``behind`` on the same images: the
    one-sided exact McNemar (sign) test on the images exactly one of them gets right (1.0 where ``ahead`` is not
    ahead)."""
    return mcnemar(y, ahead, behind, "greater")


def shipped_model(
    cfg: Config,
    names: list[str],
    selected: list[str],
    strategy: str,
    placed: Placement | None,
    proba: np.ndarray,
    y_val: np.ndarray,
    quant: dict[str, Quantised],
    fits: np.ndarray | None,
    parent_proba: np.ndarray,
) -> Shipped:
    """What the bundle ships, decided on validation: the selected ensemble, or, with ``select.fallback``, one model
    that fits a device of ``deploy.devices`` and beats it beyond chance (:func:`lead` < :data:`SIGNIFICANCE`: the
    best of several models beats an ensemble on a small validation split by chance alone). Among the models that
    do, the int8 parent (``parent_proba``, its validation probabilities), unless a member also beats it beyond
    chance; else the best member (:func:`single_rank`). ``beaten_by``: the models ahead of the selection beyond
    chance, best first (what the fallback ships, or the report warns of without it). The selection: ``selected``
    of the candidates ``names`` by ``strategy``, ``placed`` on the devices."""
    chosen = [names.index(n) for n in selected]
    weights = vote_weights(quant, names, cfg.vote.weighted)
    ens = vote(proba[chosen], cfg.vote.rule, None if weights is None else weights[chosen])
    ens_acc = accuracy(ens, y_val)
    usable = [n for i, n in enumerate(names) if fits is None or fits[i].any()]
    usable += [PARENT] if placed is None or placed.parent.fits else []
    pred = {n: (parent_proba if n == PARENT else proba[names.index(n)]).argmax(1) for n in usable}
    ahead = {n: lead(y_val, pred[n], ens.argmax(1)) for n in usable}  # that the model alone is right more often
    beats = [n for n in usable if quant[n].val_acc_int8 > ens_acc and ahead[n] < SIGNIFICANCE]
    best = max(usable, key=lambda n: single_rank(quant, n))
    fallback = cfg.select.fallback
    if fallback and len(chosen) == 1 and PARENT in usable and not beats:
        parent = parent_over_one(selected[0], pred, y_val, quant, placed)
        if parent:
            return parent
    kind, members, val_acc = "ensemble" if len(chosen) > 1 else "member", selected, ens_acc
    if beats and fallback:
        better = [n for n in beats if PARENT not in beats or lead(y_val, pred[n], pred[PARENT]) < SIGNIFICANCE]
        best = max(better, key=lambda n: single_rank(quant, n)) if better else PARENT
        kind, members, val_acc = "parent" if best == PARENT else "member", [best], quant[best].val_acc_int8
    elif beats:
        best = max(beats, key=lambda n: single_rank(quant, n))
    ranked = sorted(beats, key=lambda n: single_rank(quant, n), reverse=True)
    return Shipped(
        kind,
        members,
        val_acc,
        fallback,
        _ship_reason(selected, strategy, placed, quant, usable, best, ens_acc, ahead, bool(beats), fallback),
        [{"name": n, "val_acc": quant[n].val_acc_int8, "p": ahead[n]} for n in ranked],
        single_assignment(placed, members[0]) if placed and kind != "ensemble" else None,
    )


def parent_over_one(
    one: str, pred: dict[str, np.ndarray], y: np.ndarray, quant: dict[str, Quantised], placed: Placement | None
) -> Shipped | None:
    """Where the selection kept one member: the int8 parent instead, unless the member beats it beyond chance (one
    model ships either way, and among single models the parent is the robust choice); None where it does."""
    p = lead(y, pred[one], pred[PARENT])
    if p < SIGNIFICANCE:
        return None
    pct = {n: f"{100 * quant[n].val_acc_int8:.2f}%" for n in (one, PARENT)}
    return Shipped(
        "parent",
        [PARENT],
        quant[PARENT].val_acc_int8,
        True,
        f"the selection kept one model, member {one} ({pct[one]} on validation), and among single models the int8 "
        f"parent ({pct[PARENT]}) ships unless a member beats it beyond chance (sign test p = {p:.2g}, needs < "
        f"{SIGNIFICANCE:g}; select.fallback: false ships the member)",
        assignment=single_assignment(placed, PARENT) if placed else None,
    )


def single_rank(quant: dict[str, Quantised], name: str) -> tuple:
    """How single models rank against each other: the more accurate on validation, then the fewer shipped bytes,
    then the parent."""
    return quant[name].val_acc_int8, -quant[name].bytes.shipped, name == PARENT


def _ship_reason(
    selected: list[str],
    strategy: str,
    placed: Placement | None,
    quant: dict[str, Quantised],
    usable: list[str],
    best: str,
    ens_acc: float,
    lead: dict[str, float],
    beaten: bool,
    fallback: bool,
) -> str:
    """Why :func:`shipped_model` ships what it ships, with the validation accuracies that decided it."""
    k = len(selected)
    what = (
        f"the selected ensemble ({strategy}, {k} members)"
        if k > 1
        else f"the selected member {selected[0]} (the selection kept one)"
    )
    fit = " that fits a device" if placed else ""
    if placed and PARENT not in usable:
        fit += " (the int8 parent fits none)"
    pct = {n: f"{100 * quant[n].val_acc_int8:.2f}%" for n in usable}

    def who(n: str) -> str:
        return "the int8 parent" if n == PARENT else f"member {n}"

    versus = f"{pct[best]} vs {100 * ens_acc:.2f}% on validation"
    if beaten and fallback:
        return (
            f"{who(best)} alone beats {what}: {versus} (sign test p = {lead[best]:.2g}, a lead chance rarely gives)"
            f"; it is the most accurate single model{fit} (select.fallback: true; false ships the selection)"
        )
    if beaten:
        return f"select.fallback is false, so {what} ships although {who(best)} alone beats it: {versus}"
    if quant[best].val_acc_int8 > ens_acc:  # a model ahead by chance: the best of several on a small split
        return (
            f"{what} ships: {who(best)} alone scores {versus}, a lead chance gives often enough among "
            f"{len(lead)} single models (sign test p = {lead[best]:.2g}, needs < {SIGNIFICANCE:g}), so the more "
            "votes ship; more validation images (data.val_fraction) would settle it"
        )
    others = [n for n in usable if n not in selected and n != PARENT]
    rivals = ([PARENT] if PARENT in usable else []) + (
        [max(others, key=lambda n: single_rank(quant, n))] if others else []
    )
    text = "; ".join(f"{who(n) if n == PARENT else 'the best other member, ' + n}: {pct[n]}" for n in rivals)
    return f"{what} is at least as accurate on validation ({100 * ens_acc:.2f}%) as any single model{fit}" + (
        f" ({text})" if text else ""
    )


def single_assignment(placed: Placement, name: str) -> dict[str, str | None]:
    """Device -> model when one model ships: the device the selection gave it, else the first it fits."""
    at = next((d for d, m in placed.assignment.items() if m == name), None)
    fit = placed.parent.fits if name == PARENT else placed.members[name].fits
    at = at or fit[0]
    return {d: (name if d == at else None) for d in placed.assignment}
