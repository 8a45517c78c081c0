"""Defaults that work on data nobody tuned them for: members recover on small generated image sets, a member far
below the parent is left out, and a run from defaults never ships less than the int8 parent on validation."""

from __future__ import annotations

import html
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from prune2edge import config, evaluate, pipeline, pool, report, store, summary
from prune2edge.errors import UserError
from prune2edge.runtime.bundle import Bundle, predict_proba, session

TINY = {"model": {"kwargs": {"width": 8, "depth": 2}}}  # a small network: the defaults decide everything else
# the pool settings before issue 23 (clones), for the comparison
OLD_POOL = {**config.clone_family({}), "size": 20, "epochs": [1.0, 2.0], "lr": [0.001, 0.01], "min_steps": 0}


def shape_image(rng: np.random.Generator, cls: int, h: int, w: int, rgb: bool) -> np.ndarray:
    """A lit part on a noisy belt, class by shape: disc, ring, square, plus, cross, triangle (outlines)."""
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(30, 70, 3)))
    d = ImageDraw.Draw(img)
    cx, cy, r = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65), min(h, w) * rng.uniform(0.22, 0.32)
    fg, t = tuple(int(v) for v in rng.integers(150, 230, 3)), max(1, round(min(h, w) / 10))
    box = [cx - r, cy - r, cx + r, cy + r]
    if cls == 0:
        d.ellipse(box, fill=fg)
    elif cls == 1:
        d.ellipse(box, outline=fg, width=t)
    elif cls == 2:
        d.rectangle(box, outline=fg, width=t)
    elif cls in (3, 4):
        arms = (
            [(cx - r, cy, cx + r, cy), (cx, cy - r, cx, cy + r)]
            if cls == 3
            else [box, (cx - r, cy + r, cx + r, cy - r)]
        )
        for a in arms:
            d.line(a, fill=fg, width=t)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], outline=fg, width=t)
    x = np.clip(np.asarray(img).astype(np.int16) + rng.integers(-25, 26, (h, w, 3)), 0, 255).astype(np.uint8)
    return x if rgb else np.asarray(Image.fromarray(x).convert("L"))


def shapes_npz(path: Path, n: int, classes: int, h: int, w: int, rgb: bool, seed: int) -> Path:
    """``n`` generated images of ``classes`` balanced classes, ``h`` x ``w``, grey or colour, as x, y (no test split:
    one is carved) with class names."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % classes)
    x = np.stack([shape_image(rng, int(c), h, w, rgb) for c in y])
    names = np.array(["disc", "ring", "square", "plus", "cross", "triangle"][:classes])
    np.savez(path, x=x, y=y, label_names=names)
    return path


DATASETS = {  # name: (images, classes, height, width, colour)
    "six-grey": (1200, 6, 16, 24, False),
    "two-colour": (600, 2, 24, 16, True),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A complete run from defaults (only the network made small) on each generated dataset; one writes a report."""
    out = {}
    for i, (name, (n, k, h, w, rgb)) in enumerate(DATASETS.items()):
        d = tmp_path_factory.mktemp(name)
        cfg = config.load(
            None, {**TINY, "data": {"name": "npz", "path": str(shapes_npz(d / "data.npz", n, k, h, w, rgb, i))}}
        )
        with pytest.MonkeyPatch.context() as mp:
            if i:
                mp.setattr(report, "write", lambda run_dir: None)  # one report is enough; each takes seconds
            pipeline.run(cfg, d / "run", progress=False)
        out[name] = d / "run"
    return out


def old_pool_members(run: Path, count: int) -> list[dict]:
    """The first ``count`` members the pool defaults before issue 23 make from this run's parent (not written)."""
    cfg = config.load(run / "config.yaml", {"pool": OLD_POOL})
    src = pool.RunInputs.load(run)
    src.cfg = cfg
    return [pool.fit_member(src, plan)[1] for plan in pool.plan(cfg)[:count]]


@pytest.mark.parametrize("name", DATASETS)
def test_new_defaults_keep_the_median_member_near_the_parent(runs, name):
    run = runs[name]
    parent = store.read_json(run / "baseline" / "model.json")["val_acc_fp32"]
    members = [store.read_json(p) for p in sorted((run / "pool").glob("*/member.json"))]
    assert len(members) == config.Pool().size
    assert statistics.median(m["val_acc_fp32"] for m in members) >= parent - 0.02
    info = store.read_json(run / "dataset.json")
    n_train = info["n_train"]
    for m in members:  # the floor: every new member trained at least pool.min_steps steps; the parent ships as it is
        if m["parent"]:
            assert (m["steps"], m["history"], m["weight_bits"]) == (0, [], 0)
            continue
        assert m["steps"] == max(config.Pool().min_steps, round(m["planned_epochs"] * -(-n_train // m["batch_size"])))
        assert m["history"][-1]["steps"] == m["steps"] and m["measured_sparsity"]["overall"] >= m["sparsity"] - 0.01
    # the same parent with the pool defaults before issue 23: most members far below it
    old = old_pool_members(run, 5)
    assert sum(m["val_acc_fp32"] < parent - 0.1 for m in old) >= 3, [m["val_acc_fp32"] for m in old]
    assert all(m["steps"] < 30 for m in old)
    # the summary says how long each member trained and how far it recovered, and the pool's time
    text = summary.table(store.read_json(run / "metrics.json"))
    assert f"pool: {len(members)} members, " in text and "each (steps, points vs parent): m000 " in text
    assert "x the parent's training" in text


@pytest.mark.parametrize("name", DATASETS)
def test_a_run_from_defaults_ships_at_least_the_int8_parent_on_validation(runs, name):
    m = store.read_json(runs[name] / "metrics.json")
    assert m["shipped"]["val_acc"] >= m["baseline"]["val_acc_int8"]
    assert m["ensemble"]["members"] and m["shipped"]["reason"]
    assert config.load(runs[name] / "config.yaml").cluster.k == "auto" and m["k_choice"]["by"] == "auto"


@pytest.fixture(scope="module")
def failed_pool(runs, tmp_path_factory) -> Path:
    """The six-class run's parent with 4 members of the pool defaults before issue 23: a pool that did not recover."""
    src, run = runs["six-grey"], tmp_path_factory.mktemp("failed") / "run"
    run.mkdir()
    for f in ("splits.npz", "preprocess.json", "dataset.json"):
        shutil.copy(src / f, run / f)
    shutil.copytree(src / "baseline", run / "baseline")
    timings = store.read_json(src / "timings.json")
    store.write_json(run / "timings.json", {k: timings[k] for k in ("prepare", "baseline")})
    cfg = config.load(src / "config.yaml", {"pool": {**OLD_POOL, "size": 4}})
    (run / "config.yaml").write_text(config.yaml_text(cfg))
    pipeline.run(cfg, run, progress=False)
    return run


def test_a_pool_that_did_not_recover_ships_the_int8_parent_and_says_why(failed_pool):
    run = failed_pool
    m, sel = store.read_json(run / "metrics.json"), store.read_json(run / "selection.json")
    b, s = m["baseline"], m["shipped"]
    # the gate against the parent: the members far below it are reported and not clustered
    below, anyway = [x["name"] for x in sel["parent_gate"]["below"]], sel["parent_gate"]["kept_anyway"]
    assert len(below) >= 3 and all(x["below_by"] > 0.03 for x in sel["parent_gate"]["below"])
    passed = [x["name"] for x in m["members"] if x["status"] == "ok"]
    assert sel["candidates"] == ([n for n in passed if n not in below] or [anyway])
    assert [x["name"] for x in m["members"] if x["below_parent"]] == below
    # the fallback: the int8 parent, alone in the bundle, with its reason in metrics, summary and report
    assert s["kind"] == "parent" and s["members"] == ["baseline"] and s["val_acc"] == b["val_acc_int8"]
    assert s["val_acc"] > m["ensemble"]["val_acc"] and s["test_acc"] == b["test_acc_int8"]
    assert "the int8 parent alone beats the selected" in s["reason"] and "select.fallback: true" in s["reason"]
    text = summary.table(m)
    assert f"shipped: the int8 parent, baseline (validation {100 * s['val_acc']:.2f}%" in text and s["reason"] in text
    page = (run / "report.html").read_text()
    assert 'data-shipped="parent"' in page and html.escape(s["reason"]) in page
    # the pool's own warning: how many and how far below; no advice to ship what already ships
    [w] = [w for w in m["warnings"] if w["kind"] == "pool_not_recovered"]
    assert f"{len(m['pool']['below_margin'])} of 4 pool members are more than" in w["message"]
    assert "pool.min_steps, now 0" in w["message"] and f"WARNING: {w['message']}" in text
    assert not [w for w in m["warnings"] if w["kind"] in ("baseline_int8", "member")]
    # the bundle is the parent's int8 model, loadable as any bundle (and by a fleet node: one member by id)
    bundle = Bundle.load(run / "bundle")
    assert [e["id"] for e in bundle.manifest["members"]] == ["baseline"]
    x_test, _ = store.split(run, "test")
    parent = predict_proba(session(run / "baseline" / "int8.onnx"), store.preprocessing(run).apply(x_test))
    assert np.allclose(bundle.predict_proba(x_test), parent, atol=1e-6)
    assert (Bundle.load(run / "bundle", members=["baseline"]).predict(x_test) == parent.argmax(1)).all()
    assert bundle.manifest["vote"]["abstain"] == m["decisions"]["ensemble"]["threshold"]


def test_a_selected_member_is_reported_as_one_model(runs):
    m = store.read_json(runs["six-grey"] / "metrics.json")
    one = dict(m, ensemble={**m["ensemble"], "k": 1, "members": m["ensemble"]["members"][:1]})
    one["shipped"] = {**m["shipped"], "kind": "member", "members": one["ensemble"]["members"]}
    text = summary.table(one)
    assert f"selected: one member, {one['ensemble']['members'][0]}" in text and "k=1" not in text
    assert "disagreement" not in text.split("shipped:")[1].split("\n")[0]


def test_chance_warning_names_the_data_label_not_the_bundle_class():
    y = np.array([1] * 60 + [0] * 40)
    [named] = evaluate.chance_warnings(0.6, y, ["ok", "scratch"], ["good", "bad"])
    assert "always answering the data's 'bad'" in named and "'scratch'" not in named
    [numbered] = evaluate.chance_warnings(0.6, y, ["ok", "scratch"])
    assert "always answering the data's label 1" in numbered


def test_member_steps_have_a_floor():
    assert pool.member_steps(1.5, 1000, 100, 100) == 100  # 15 steps of epochs, lifted to the floor
    assert pool.member_steps(1.5, 100_000, 100, 100) == 1500  # a large dataset: the epochs already give more
    assert pool.member_steps(0.5, 1000, 100, 0) == 5  # no floor


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"select": {"fallback": "yes"}}, "config key 'select.fallback' must be true"),
        ({"select": {"max_below_parent": 1.5}}, r"config key 'select.max_below_parent' must be a number in \[0, 1\]"),
        ({"pool": {"min_steps": -1}}, "config key 'pool.min_steps' must be an integer >= 0"),
        ({"pool": {"min_steps": 10.5}}, "config key 'pool.min_steps' must be an integer >= 0"),
    ],
)
def test_new_keys_validate(overrides, message):
    with pytest.raises(UserError, match=message):
        config.load(None, overrides)


def test_new_defaults():
    d = config.Config()
    assert d.cluster.k == "auto" and d.select.fallback is True
    p = config.load(None, {"train": {"epochs": 20, "lr": 0.1, "batch_size": 32, "schedule": "cosine"}}).pool
    assert (p.family, p.size, p.include_parent, p.parent_qat, p.sparsity) == ("independent", 3, True, False, (0, 0))
    assert (p.weight_bits, p.epochs, p.lr, p.batch_size, p.lr_schedule) == (4, (19, 19), (0.1, 0.1), [32], "cosine")
    assert p.min_steps == 100 and pool.plan(config.load(None, {}))[0].epochs == 0  # the parent: no more training
    c = config.load(None, {"pool": {"family": "clones", "size": 4}}).pool  # the family fills what is left out
    assert (c.size, c.sparsity, c.epochs, c.weight_bits, c.include_parent) == (4, (0.5, 0.9), (1, 2), 0, False)
    assert config.load(None, {"cluster": {"k": 2}}).cluster.k == 2  # fixed k: one setting away
