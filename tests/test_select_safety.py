"""Safe selection: outlier clusters are skipped, k is chosen on validation, a worse ensemble is reported."""

from __future__ import annotations

import copy
import html

import numpy as np
import pytest

from prune2edge import cluster, config, evaluate, pipeline, select, ship, store, summary
from prune2edge.errors import UserError
from prune2edge.records import Member, Quantised, Sizes
from prune2edge.runtime.vote import accuracy, vote


def member(y: np.ndarray, wrong: np.ndarray, conf: float = 0.9, k: int = 10) -> np.ndarray:
    """Validation probabilities of a member that answers ``(y + 1) % k`` on the images ``wrong``, ``y`` elsewhere."""
    pred = y.copy()
    pred[wrong] = (y[wrong] + 1) % k
    p = np.full((len(y), k), (1 - conf) / (k - 1))
    p[np.arange(len(y)), pred] = conf
    return p


def families_and_outlier(y: np.ndarray) -> np.ndarray:
    """Three families of two good members (disjoint mistakes, ~7 % each), then one member wrong on ~37 % of images."""
    n = len(y)
    blocks = np.array_split(np.arange(n), 14)  # disjoint blocks of images
    proba = []
    for f in range(3):
        proba.append(member(y, blocks[f]))
        proba.append(member(y, np.r_[blocks[f], blocks[3 + f][:1]]))  # one extra mistake: close to its twin
    proba.append(member(y, np.concatenate(blocks[6:11])))
    return np.stack(proba)


@pytest.fixture
def pool():
    y = np.random.default_rng(0).integers(0, 10, 140)
    proba = families_and_outlier(y)
    labels = cluster.cluster(proba, "kmeans-onehot", k=4)["labels"]
    assert labels.count(labels[6]) == 1, "the weak member must sit alone in its cluster"
    return proba, y, labels


@pytest.mark.parametrize("strategy", ["accuracy-first", "diversity-first"])
def test_outlier_cluster_is_skipped_not_forced_in(pool, strategy):
    proba, y, labels = pool
    accs = [accuracy(p, y) for p in proba]
    assert max(accs) - accs[6] > 0.2
    chosen = select.select(strategy, proba, y, labels, max_acc_gap=0.02)
    assert 6 not in chosen and len(chosen) == 3 and len({labels[i] for i in chosen}) == 3  # one per good cluster
    assert 6 in select.select(strategy, proba, y, labels, max_acc_gap=1.0)  # the rule, not the clustering, keeps it out
    # the boundary: a member exactly max_acc_gap below the best is taken, one a little further is not
    gap = max(accs) - accs[6]
    assert 6 in select.select(strategy, proba, y, labels, max_acc_gap=gap)
    assert 6 not in select.select(strategy, proba, y, labels, max_acc_gap=gap - 1e-3)


def test_a_member_a_few_images_below_the_gap_is_not_passed_over_on_noise():
    """On 100 validation images a member 3 points (3 images net) below the best, over max_acc_gap = 0.02, is behind by
    chance as far as a sign test can tell (8 images against 5): it keeps its cluster's slot."""
    y = np.random.default_rng(1).integers(0, 10, 100)
    proba = np.stack([member(y, np.arange(0, 5)), member(y, np.arange(5, 13))])
    for strategy in ("accuracy-first", "diversity-first"):
        assert select.select(strategy, proba, y, [0, 1], max_acc_gap=0.02) == [0, 1]
    assert select.skipped(proba, y, [0, 1], 0.02, ["a", "b"]) == []
    assert ship.lead(y, proba[0].argmax(1), proba[1].argmax(1)) > ship.SIGNIFICANCE


def test_skipped_clusters_say_why(pool):
    proba, y, labels = pool
    names = [f"m{i:03d}" for i in range(len(proba))]
    (rec,) = select.skipped(proba, y, labels, 0.02, names)
    assert rec["cluster"] == labels[6] and rec["members"] == ["m006"] and rec["best_member"] == "m006"
    assert rec["best_val_acc"] == accuracy(proba[6], y)
    assert rec["pool_best_val_acc"] == max(accuracy(p, y) for p in proba)
    assert (
        "m006" in rec["reason"] and "select.max_acc_gap = 0.02" in rec["reason"] and rec["pool_best"] in rec["reason"]
    )
    assert rec["p"] < ship.SIGNIFICANCE and "sign test p = " in rec["reason"]
    assert select.skipped(proba, y, labels, 1.0, names) == []


def quantised(val_acc: float, shipped: int) -> Quantised:
    """The record of a model quantised and gated ok at int8 validation accuracy ``val_acc`` (fp32 too), ``shipped``
    bytes as shipped; the rest what select and ship do not read."""
    return Quantised("ok", [], val_acc, val_acc, 1.0, 0, 8, 8, shipped, 8.0, Sizes(*[shipped] * 5), {}, True)


def member_record(index: int, val_acc: float) -> Member:
    """The record of pool member ``index`` at fp32 validation accuracy ``val_acc``; the rest what select does not read."""
    return Member(index, index, 0.5, 1.0, 0.01, 32, False, f"m{index:03d}", 1.0, {"overall": 0.5}, val_acc)


def fake_run(tmp_path, proba_for, parent: float = 0.0, **overrides):
    """A run directory up to the int8 pool: the real split of digits, members with the given validation probabilities
    (1 KB each), and an int8 parent of 4 KB at validation accuracy ``parent`` (fp32 and int8)."""
    cfg = config.load(None, overrides)
    pipeline.prepare(tmp_path, cfg)
    _, y_val = store.split(tmp_path, "val")
    proba = proba_for(y_val)
    members = [member_record(i, accuracy(p, y_val)) for i, p in enumerate(proba)]
    quant = {"baseline": quantised(parent, 4000)}
    wrong = np.arange(len(y_val))[round(parent * len(y_val)) :]  # the parent's mistakes: the last images
    (tmp_path / "baseline").mkdir(parents=True, exist_ok=True)
    np.save(tmp_path / "baseline" / "val_proba.npy", member(y_val, wrong).astype(np.float32))
    for m, p in zip(members, proba):
        (tmp_path / "pool" / m.name).mkdir(parents=True)
        np.save(tmp_path / "pool" / m.name / "val_proba.npy", p.astype(np.float32))
        quant[m.name] = quantised(accuracy(p, y_val), 1000)
    return cfg, members, quant, y_val, proba


def test_choose_records_the_skipped_outlier(tmp_path):
    cfg, members, quant, _, _ = fake_run(tmp_path, families_and_outlier, cluster={"k": 4}, pool={"size": 7})
    sel = select.choose(tmp_path, cfg, members, quant)
    assert sel.clustering.labels.count(sel.clustering.labels[6]) == 1
    assert "m006" not in sel.selected and len(sel.selected) == 3
    assert "m006" not in sel.strategies["diversity-first"]
    assert [c["members"] for c in sel.skipped_clusters] == [["m006"]]
    assert store.read_json(tmp_path / "selection.json") == sel.to_json()


def one_strong_member(y: np.ndarray) -> np.ndarray:
    """A cautious member right on 95 % of images, and four confident ones that share their mistakes: every
    ensemble follows the confident ones, so no ensemble beats the cautious member alone."""
    n = len(y)
    idx = np.arange(n)
    shared, own = idx[7:15], idx[15:19]
    return np.stack([member(y, idx[:7], conf=0.6)] + [member(y, np.r_[shared, own[i]]) for i in range(4)])


def one_clear_member(y: np.ndarray) -> np.ndarray:
    """A cautious member wrong on 2 images, four confident ones that share 25 mistakes: the cautious member alone is
    clearly better than any ensemble with a confident one (a lead no chance explains)."""
    idx = np.arange(len(y))
    shared, own = idx[2:27], idx[27:31]
    return np.stack([member(y, idx[:2], conf=0.6)] + [member(y, np.r_[shared, own[i]]) for i in range(4)])


def three_families(y: np.ndarray) -> np.ndarray:
    """Three families of two members with disjoint mistakes: one member per family votes every mistake away."""
    blocks = np.array_split(np.arange(len(y)), 9)
    return np.stack([member(y, np.r_[blocks[f], blocks[3 + f][:twin]]) for f in range(3) for twin in (0, 1)])


@pytest.mark.parametrize("make, k", [(one_strong_member, 5), (one_clear_member, 1), (three_families, 5)])
def test_k_auto_takes_the_most_votes_unless_fewer_win_beyond_chance(tmp_path, make, k):
    cfg, members, quant, y_val, proba = fake_run(
        tmp_path,
        make,
        cluster={"k": "auto", "k_max": 5},
        select={"max_acc_gap": 0.3},  # every member selectable
    )
    sel = select.choose(tmp_path, cfg, members, quant)
    choice = sel.k_choice
    assert choice.by == "auto" and choice.k == k == sel.clustering.k
    names = sel.candidates
    most = max(choice.curve, key=lambda p: (len(p.members), -p.k))
    for p in choice.curve:  # the curve is the configured strategy's ensembles, scored on validation
        assert p.members == sel.sweep["accuracy-first"][p.k - 1]
        ens = vote(proba[[names.index(n) for n in p.members]])
        assert p.val_acc == accuracy(ens, y_val)
        assert p.p_lead == ship.mcnemar(
            y_val, ens.argmax(1), vote(proba[[names.index(n) for n in most.members]]).argmax(1), "greater"
        )
    assert sel.selected == choice.curve[k - 1].members
    best = max(choice.curve, key=lambda p: (p.val_acc, -p.k))
    if make is one_strong_member:  # the lone cautious member leads by a few images: chance, so the most votes ship
        assert best.k == 1 and best.val_acc > most.val_acc and best.p_lead >= ship.SIGNIFICANCE
        assert choice.k == most.k and "a lead chance gives often enough" in choice.reason
    elif make is one_clear_member:  # it leads by about 20 images: no chance explains that, and it is chosen
        assert best.k == 1 and best.p_lead < ship.SIGNIFICANCE and "beyond chance" in choice.reason
    else:  # k = 3 already votes every mistake away: no lead, and the most votes ship
        assert best.k == 3 and best.val_acc == most.val_acc == 1.0 and choice.k == most.k


def test_a_one_image_lead_or_a_tie_decides_nothing(tmp_path):
    """Members of equal accuracy with disjoint mistakes, one of them right on one image more, and a parent one
    image ahead of the ensemble: the ensemble of every member ships, each choice saying it was chance."""

    def near_ties(y: np.ndarray) -> np.ndarray:
        shared, own = np.arange(5), np.array_split(np.arange(5, 50), 3)  # every member wrong on 5, each on 14-15
        return np.stack([member(y, np.r_[shared, own[i][: 14 if i == 0 else 15]]) for i in range(3)])

    cfg, members, quant, y_val, proba = fake_run(
        tmp_path, near_ties, cluster={"k": "auto", "k_max": 3}, select={"max_below_parent": 0.2}
    )
    ens_acc = accuracy(vote(proba), y_val)
    quant["baseline"] = quantised(ens_acc + 1 / len(y_val), 4000)
    wrong = np.flatnonzero(vote(proba).argmax(1) != y_val)[1:]  # the parent: the ensemble's mistakes but one
    np.save(tmp_path / "baseline" / "val_proba.npy", member(y_val, wrong).astype(np.float32))
    sel = select.choose(tmp_path, cfg, members, quant)
    assert sel.k_choice.k == 3 and len(sel.selected) == 3
    s = sel.shipped
    assert s.kind == "ensemble" and "the int8 parent alone scores" in s.reason and "more validation images" in s.reason


def test_k_choice_keys_validate():
    assert config.load(None, {"cluster": {"k": "silhouette"}}).cluster.k == "silhouette"
    with pytest.raises(UserError, match="'cluster.k' must be a positive integer, 'auto' or 'silhouette'"):
        config.load(None, {"cluster": {"k": "best"}})
    with pytest.raises(UserError, match=r"'select.max_acc_gap' must be a number in \[0, 1\]"):
        config.load(None, {"select": {"max_acc_gap": 2}})


def test_warnings_say_which_models_ship_found_ahead_of_the_selection(demo_run):
    m = store.read_json(demo_run / "metrics.json")
    v = m["shipped"]["val_acc"]
    top = next(x for x in m["members"] if x["status"] == "ok")

    def scenario(*ahead: str) -> dict:
        """The demo's metrics as if select.fallback were off and ship.shipped_model had found ``ahead`` ahead of
        the selection beyond chance (its decision is tested on predictions below)."""
        s = copy.deepcopy(m)
        s["shipped"]["fallback"] = False
        s["shipped"]["beaten_by"] = [{"name": n, "val_acc": v + 0.02, "p": 0.01} for n in ahead]
        s["baseline"]["val_acc_int8"] = next(x for x in s["members"] if x["name"] == top["name"])["val_acc_int8"] = (
            v + 0.02
        )
        s["warnings"] = evaluate.selection_warnings(s)
        return s

    assert scenario()["warnings"] == [] and "WARNING" not in summary.table(scenario())
    for ahead, kinds in (
        (["baseline"], ["baseline_int8"]),
        ([top["name"]], ["member"]),
        (["baseline", top["name"]], ["baseline_int8", "member"]),
    ):
        s = scenario(*ahead)
        assert [w["kind"] for w in s["warnings"]] == kinds
        text = summary.table(s)
        for w in s["warnings"]:
            assert f"WARNING: {w['message']}" in text and f"{100 * v:.2f}%" in w["message"]
            assert "beyond chance" in w["message"] and "sign test p = 0.01" in w["message"]
            n = m["dataset"]["n_val"]
            assert f"{round(w['better_val_acc'] * n) - round(v * n)} more of the {n} images right" in w["message"]
        if "member" in kinds:
            assert s["warnings"][-1]["better"] == top["name"] and f"member {top['name']} alone" in text
    # the real run, with the fallback on, which weighed the single models and said why in its reason: no warning
    assert m["shipped"]["fallback"] and m["warnings"] == [] and m["shipped"]["reason"] in summary.table(m)
    page = (demo_run / "report.html").read_text()
    assert 'id="warnings"' not in page and html.escape(m["shipped"]["reason"]) in page
    assert {"k_choice", "skipped_clusters"} <= set(m) and "beaten_by" in m["shipped"]


@pytest.mark.parametrize("fallback", [True, False])
def test_the_fallback_ships_the_parent_where_it_beats_the_selection(tmp_path, fallback):
    cfg, members, quant, y_val, proba = fake_run(
        tmp_path,
        one_strong_member,
        parent=0.99,
        cluster={"k": 2},
        select={"fallback": fallback, "max_below_parent": 0.1},
    )
    sel = select.choose(tmp_path, cfg, members, quant)
    ens = accuracy(vote(proba[[sel.candidates.index(n) for n in sel.selected]]), y_val)
    s = sel.shipped
    assert ens < 0.99 and len(sel.selected) == 2
    assert s.beaten_by[0]["name"] == "baseline" and s.beaten_by[0]["p"] < ship.SIGNIFICANCE  # either way
    if fallback:
        assert (s.kind, s.members, s.val_acc) == ("parent", ["baseline"], 0.99)
        assert s.reason.startswith("the int8 parent alone beats the selected ensemble (accuracy-first, 2 members)")
    else:
        assert (s.kind, s.members, s.val_acc) == ("ensemble", sel.selected, ens)
        assert s.reason.startswith("select.fallback is false, so the selected ensemble")


def test_an_ensemble_at_least_as_accurate_as_every_single_model_ships(tmp_path):
    cfg, members, quant, _, _ = fake_run(
        tmp_path, three_families, parent=0.9, cluster={"k": 3}, select={"max_below_parent": 0.2}
    )
    sel = select.choose(tmp_path, cfg, members, quant)
    s = sel.shipped
    assert sel.parent_gate.below == [] and len(sel.selected) == 3
    assert (s.kind, s.members, s.val_acc) == ("ensemble", sel.selected, 1.0)  # votes every mistake away
    assert "is at least as accurate on validation (100.00%) as any single model (the int8 parent: 90.00%" in s.reason


def test_fallback_with_a_weak_selection_ships_the_parent_or_the_best_member(tmp_path):
    """One cautious member right on 95 % of images, four confident ones sharing their mistakes: the selection (k = 2)
    is worse than the cautious member alone; a parent at 99 % beats both, unless it fits no device."""
    cfg, members, quant, y_val, proba = fake_run(
        tmp_path / "a", one_strong_member, parent=0.99, cluster={"k": 2}, select={"max_below_parent": 0.05}
    )
    sel = select.choose(tmp_path / "a", cfg, members, quant)
    assert sel.shipped.kind == "parent" and sel.shipped.val_acc == 0.99
    # a member more than select.max_below_parent under the parent, and beaten by it beyond chance, is not clustered
    below = {b.name for b in sel.parent_gate.below}
    parent = np.load(tmp_path / "a" / "baseline" / "val_proba.npy").argmax(1)
    assert (
        below
        == {
            m.name
            for i, m in enumerate(members)
            if quant[m.name].val_acc_int8 < 0.99 - 0.05 - 1e-12
            and ship.lead(y_val, parent, proba[i].argmax(1)) < ship.SIGNIFICANCE
        }
        == {"m001", "m002", "m003", "m004"}
    )
    assert set(sel.candidates) == {m.name for m in members} - below
    # the parent fits no device: a member ahead of the selection within chance (the best of five on a small split)
    # does not replace it; one clearly ahead ships alone, on its device
    fleet = tmp_path / "devices.yaml"
    fleet.write_text("devices:\n  - {name: a, memory_bytes: 2000}\n  - {name: b, memory_bytes: 2000}\n")
    for make, name in ((one_strong_member, "b"), (one_clear_member, "c")):
        cfg, members, quant, y_val, proba = fake_run(
            tmp_path / name,
            make,
            parent=0.99,
            cluster={"k": 2},
            select={"max_below_parent": 0.3, "max_acc_gap": 0.3},  # every member clustered and selectable
            deploy={"devices": str(fleet)},
        )
        sel = select.choose(tmp_path / name, cfg, members, quant)
        assert sel.devices.parent.fits == [] and sel.devices.parent.shipped_bytes == 4000
        s = sel.shipped
        ens = accuracy(vote(proba[[int(n[1:]) for n in sel.selected]]), y_val)
        assert len(sel.selected) == 2 and quant["m000"].val_acc_int8 > ens
        right = [(proba[i].argmax(1) == y_val) for i in (0, 1)]
        if make is one_strong_member:  # about as many images won as lost against the selection: chance
            assert s.kind == "ensemble" and "a lead chance gives often enough among 5 single models" in s.reason
            assert s.beaten_by == []  # nothing for the report to warn of either
            continue
        lead = ship.mcnemar(y_val, proba[0].argmax(1), vote(proba[[0, 1]]).argmax(1), "greater")
        assert lead < ship.SIGNIFICANCE
        assert (right[0] & ~right[1]).sum() >= 20
        assert (s.kind, s.members) == ("member", ["m000"]) and "(the int8 parent fits none)" in s.reason
        assert s.beaten_by[0] == {"name": "m000", "val_acc": quant["m000"].val_acc_int8, "p": lead}
        assert "sign test p = " in s.reason
        assert sorted(s.assignment.values(), key=str) == [None, "m000"]  # one device runs it, the other idles


def test_warnings_advise_only_what_would_change_the_outcome(demo_run):
    m = store.read_json(demo_run / "metrics.json")
    v = m["shipped"]["val_acc"]
    s = copy.deepcopy(m)
    s["shipped"]["kind"], s["baseline"]["val_acc_int8"] = "ensemble", v + 0.01  # as with select.fallback: false
    s["shipped"]["fallback"] = False
    s["shipped"]["beaten_by"] = [{"name": "baseline", "val_acc": v + 0.01, "p": 0.03}]
    s["k_choice"] = {"by": "config", "best_val_acc": v}  # auto's best k would not reach the parent
    [w] = [w for w in evaluate.selection_warnings(s) if w["kind"] == "baseline_int8"]
    assert "set select.fallback: true to ship it" in w["message"] and "cluster.k: auto" not in w["message"]
    s["k_choice"]["best_val_acc"] = v + 0.02  # it would: so it is offered too
    [w] = [w for w in evaluate.selection_warnings(s) if w["kind"] == "baseline_int8"]
    assert "or set cluster.k: auto (its best k scores" in w["message"]
    s["shipped"]["fallback"] = True  # the fallback weighed it: nothing to advise
    assert evaluate.selection_warnings(s) == []


@pytest.mark.parametrize("parent, ships", [(0.95, "parent"), (0.8, "member")])
def test_one_selected_member_replaces_the_parent_only_beyond_chance(tmp_path, parent, ships):
    """The selection keeps one member (k = 1): one model ships either way, and the int8 parent is the robust one
    unless the member beats it beyond chance (about even on validation: the parent; 20 images ahead: the member)."""
    cfg, members, quant, y_val, proba = fake_run(
        tmp_path, one_strong_member, parent=parent, cluster={"k": 1}, select={"max_below_parent": 0.3}
    )
    sel = select.choose(tmp_path, cfg, members, quant)
    s, one = sel.shipped, sel.selected
    parent_pred = np.load(tmp_path / "baseline" / "val_proba.npy").argmax(1)
    p = ship.lead(y_val, proba[sel.candidates.index(one[0])].argmax(1), parent_pred)
    assert len(one) == 1 and s.kind == ships and (p < ship.SIGNIFICANCE) == (ships == "member")
    if ships == "parent":
        assert s.members == ["baseline"] and f"sign test p = {p:.2g}, needs < 0.05" in s.reason
        assert s.reason.startswith(f"the selection kept one model, member {one[0]}")
    else:
        assert s.members == one
