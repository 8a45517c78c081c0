"""The readable summary of a run's metrics, printed at the end of a run: the sizes and accuracies table, what
shipped and why, the pool, decisions, degradation, latency and devices."""

from __future__ import annotations

from .store import grid_bits


def kib(n: float) -> str:
    """A size in KiB: ``96815`` -> ``94.5 KiB``."""
    return f"{n / 1024:,.1f} KiB"


def table(m: dict) -> str:
    """A readable summary of ``metrics.json``: first what shipped and why, in one line."""
    lines = [shipped_line(m), ""] + _size_table(m) + [""]
    lines.extend(_pool_lines(m))
    lines.append(
        "other strategies (test acc, soft/hard): "
        + "; ".join(f"{s} {v['test_acc']['soft']:.4f}/{v['test_acc']['hard']:.4f}" for s, v in m["strategies"].items())
    )
    lines.extend(_reliability_lines(m))
    if m.get("k_choice", {}).get("reason") and m["k_choice"]["by"] == "auto":
        lines.append(f"k chosen on validation (cluster.k: auto): {m['k_choice']['reason']}")
    if m["dropped"]:
        lines.append(f"dropped by the int8 gate: {', '.join(m['dropped'])}")
    for s in m["skipped_clusters"]:
        lines.append(f"cluster c{s['cluster']} ({', '.join(s['members'])}) skipped: {s['reason']}")
    lines.extend(_device_lines(m["devices"]) if m.get("devices") else [])
    lines.extend(
        f"WARNING: {w['message']}" for w in m["dataset"].get("warnings", []) + m["warnings"]
    )  # data, selection
    return "\n".join(lines)


def _size_table(m: dict) -> list[str]:
    """The table's lines: test accuracy and bytes (fp32, int8, int8 gzip, shipped) of the parent, each selected
    member, the pool's vote, the selected ensemble and, where the fallback ships the parent, what ships."""
    b, e, sh = m["baseline"], m["ensemble"], m["shipped"]

    def sizes(label: str, acc: float, r: dict) -> tuple:
        return (
            label,
            f"{acc:.4f}",
            "",
            kib(r["bytes"]["int8"]),
            kib(r["bytes"]["int8_gzip"]),
            kib(r["bytes"]["shipped"]),
        )

    rows = [
        ("model", "test acc", "fp32", "int8", "int8 gzip", "shipped"),
        ("baseline fp32", f"{b['test_acc_fp32']:.4f}", kib(b["bytes"]["fp32"]), "", "", ""),
        sizes("baseline int8", b["test_acc_int8"], b),
    ]
    rows += [
        sizes(f"  {x['name']} ({_shape(x)}, {_bits(x)}c{x['cluster']})", x["test_acc_int8"], x)
        for x in m["members"]
        if x["selected"]
    ]
    rows.append(
        (f"pool vote ({m['pool_vote']['members']} members)", f"{m['pool_vote']['test_acc']:.4f}", "", "", "", "")
    )
    picked = (
        f"ensemble: {e['strategy']}, {e['rule']} vote, k={e['k']}"
        if e["k"] > 1
        else f"selected: one member, {e['members'][0]} ({e['strategy']})"
    )
    rows.append(sizes(picked, e["test_acc"], e))
    if sh["kind"] == "parent":
        rows.append(sizes(f"shipped: {SHIPPED[sh['kind']]} {', '.join(sh['members'])}", sh["test_acc"], sh))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def _shape(member: dict) -> str:
    """How a member was made smaller: its weight sparsity, or the multiply-adds a channel-pruned one keeps."""
    macs = member.get("macs_vs_parent")
    return f"s={member['sparsity_measured']:.2f}" if macs is None else f"{macs:.2f}x MACs"


def _bits(member: dict) -> str:
    """``3-bit (2.9 b/w), `` for a member trained with QAT: its grid (``4/3.5-bit``: its largest layer at 3.5), and bits
    per weight as shipped."""
    bits, largest = grid_bits(member.get("weight_bits"), member.get("largest_layer_bits"))
    if bits == largest == 8:
        return ""
    grid = f"{bits:g}" if largest == bits else f"{bits:g}/{largest:g}"
    return f"{grid}-bit ({member['bits_per_weight_shipped']:.1f} b/w), "


SHIPPED = {"ensemble": "the ensemble of", "member": "one member,", "parent": "the int8 parent,"}


def per_device(m: dict) -> dict[str, int]:
    """The bytes one device holds of what ships (``metrics.json``): its largest model's, each way (``shipped``,
    ``int8`` as run, ...); one device runs one model."""
    sh, b = m["shipped"], m["baseline"]
    sizes = [b["bytes"]] if sh["kind"] == "parent" else [x["bytes"] for x in m["members"] if x["name"] in sh["members"]]
    return {k: max(s[k] for s in sizes) for k in sizes[0]}


def shipped_line(m: dict) -> str:
    """What shipped, its accuracy against the fp32 parent, the bytes each device holds (as shipped, as run, and the
    parent's fp32 file), and why."""
    e, sh, b, most = m["ensemble"], m["shipped"], m["baseline"], per_device(m)
    return (
        f"shipped: {SHIPPED[sh['kind']]} {', '.join(sh['members'])} (validation {100 * sh['val_acc']:.2f}%, test "
        f"{100 * sh['test_acc']:.2f}%, {100 * sh['gain_vs_baseline_fp32']:+.2f} points vs baseline fp32, McNemar p = "
        f"{sh['mcnemar_p_vs_baseline_fp32']:.3g}"
        + (f"; mean pairwise disagreement {e['mean_disagreement']:.3f}" if sh["kind"] == "ensemble" else "")
        + f"; per device {kib(most['shipped'])} shipped, {kib(most['int8'])} as run, the fp32 parent "
        f"{kib(b['bytes']['fp32'])}): {sh['reason']}"
    )


def _pool_lines(m: dict) -> list[str]:
    """The summary's lines on the pool: how long each member trained, how far it recovered, and the pool's time."""
    p = m["pool"]
    steps = "" if not p["steps"] else f"{p['steps'][0]}-{p['steps'][1]} steps, "
    lines = [
        f"pool: {p['members']} members, {steps}{p['epochs'][0]:.2g}-{p['epochs'][1]:.2g} epochs each, "
        f"{p['median_seconds']:.1f} s median; int8 validation vs the parent's fp32 "
        f"{100 * p['parent_val_acc_fp32']:.2f}%: median {100 * p['median_vs_parent']:+.2f} points, worst "
        f"{100 * p['worst']['vs_parent']:+.2f} ({p['worst']['name']})",
        "  each (steps, points vs parent): "
        + "; ".join(
            f"{x['name']} {'?' if x.get('steps') is None else x['steps']} {100 * x['val_vs_parent_fp32']:+.1f}"
            for x in m["members"]
        ),
    ]
    below = [x["name"] for x in m["members"] if x.get("below_parent")]
    if below:
        lines.append(
            f"left out of clustering, more than select.max_below_parent = {100 * p['margin']:g} points below the "
            f"parent and beaten by it beyond chance: {', '.join(below)}"
            + (
                f" (every member was: {m['parent_gate']['kept_anyway']} kept)"
                if m["parent_gate"]["kept_anyway"]
                else ""
            )
        )
    if p["vs_parent_time"] is not None:
        lines.append(
            f"pool time: {p['seconds']:.1f} s, {p['vs_parent_time']:.2f}x the parent's training "
            f"({p['parent_seconds']:.1f} s)"
        )
    return lines


def _device_lines(d: dict) -> list[str]:
    """The summary table's lines on the fleet: which device runs which member, and which budget rules out whom."""

    def budget(dev: dict) -> str:
        latency, ram = dev["latency_ms"], dev.get("max_memory_mb")
        return (
            f"{dev['memory_bytes']:,} B"
            + ("" if latency is None else f", {latency:g} ms")
            + ("" if ram is None else f", {ram:g} MiB session")
        )

    lines = [
        "devices: "
        + "; ".join(
            f"{dev['name']} ({budget(dev)}) runs {d['assignment'][dev['name']] or 'nothing (idle)'}"
            for dev in d["devices"]
        )
    ]
    out: dict[tuple[str, str], list[str]] = {}
    for r in d["ruled_out"]:
        unit = {"memory_bytes": "B", "latency_ms": "ms", "max_memory_mb": "MiB"}[r["budget"]]
        need = f"{r['need']:,} B" if unit == "B" else f"{r['need']:g} {unit}"
        kind = {"memory_bytes": "memory", "latency_ms": "latency", "max_memory_mb": "session memory"}[r["budget"]]
        out.setdefault((r["device"], kind), []).append(f"{r['member']} ({need})")
    lines += [f"{dev}'s {kind} budget rules out {', '.join(ms)}" for (dev, kind), ms in out.items()]
    if d["unfit"]:
        lines.append(f"fit no device, so not selectable: {', '.join(d['unfit'])}")
    return lines  # idle devices and clusters without a device: device_warnings


def _reliability_lines(m: dict) -> list[str]:
    """The summary's lines on decisions (abstain threshold, coverage, calibration), degradation and latency."""
    d, g = m["decisions"], m["degradation"]
    target = d["target_accuracy"]
    lines = [
        "decisions"
        + ("" if target is None else f" (abstain thresholds chosen on validation for {target:g} accuracy)")
        + ":"
    ]
    for name, who in (("ensemble", "ensemble (vote margin)"), ("baseline_fp32", "baseline fp32 (top probability)")):
        r = d[name]
        line = f"{who}: ECE {r['ece']:.4f}, AURC {r['aurc']:.4f}"
        if "threshold" in r:
            t, op = r["threshold"], r["at_threshold"]
            acc = "n/a" if op["accuracy"] is None else f"{op['accuracy']:.4f}"
            line += (
                f"; abstain below {t['abstain_below']:.4f} (validation: {100 * t['val_coverage']:.1f}% decided at "
                f"{t['val_accuracy']:.4f}{'' if t['target_met'] else ', target NOT met'}): test {100 * op['coverage']:.1f}% "
                f"decided at {acc}"
            )
        lines.append("  " + line)
    best = g["best_member"]
    lines.append(
        "members missing -> test acc mean (min-max): "
        + "; ".join(
            f"{r['missing']}: {r['mean']:.4f} ({r['min']:.4f}-{r['max']:.4f}){' <quorum' if r['below_quorum'] else ''}"
            for r in g["rows"]
        )
        + f"; best single member {best['name']} {best['test_acc_int8']:.4f}"
    )
    if "latency" in m:
        t = m["latency"]
        lines.append(
            f"latency, batch 1, 1 thread (median of {t['runs']}, ms): "
            + ", ".join(f"{n} {v:.3f}" for n, v in t["members"].items())
            + f"; baseline fp32 {t['baseline_fp32_ms']:.3f}, "
            f"int8 {t['baseline_int8_ms']:.3f}"
        )
    if m.get("cost"):
        c, p = m["cost"], m["cost"]["parent_int8"]
        lines.append(
            f"cost per image vs the int8 parent ({p['macs'] / 1e6:.2f} M multiply-adds, {p['memory_mb']:.1f} MiB "
            "session memory): "
            + ", ".join(
                f"{n} {r['vs_parent_int8'].get('latency_ms', 0):.2f}x latency, {r['vs_parent_int8'].get('macs', 0):.2f}x "
                f"multiply-adds, {r['vs_parent_int8'].get('memory_mb', 0):.2f}x memory"
                for n, r in c["members"].items()
            )
        )
    return lines
