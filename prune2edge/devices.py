"""Fleet-aware deployment: the devices file, and which member fits which device.

A devices file (YAML, or JSON, which is YAML too) lists the fleet; each device runs one member::

    devices:
      - {name: gateway, memory_bytes: 262144, latency_ms: 5, max_memory_mb: 16}   # the last two are optional
      - {name: mcu-1, memory_bytes: 40000}

A member fits a device when its shipped bytes are at most ``memory_bytes`` and, where the device has these
budgets, its int8 latency at batch 1 (:func:`prune2edge.runtime.latency.measure`) is at most ``latency_ms`` and the peak
memory its ONNX Runtime session adds (:func:`prune2edge.cost.memory`) is at most ``max_memory_mb``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from .errors import UserError

KEYS = ("name", "memory_bytes", "latency_ms", "max_memory_mb")


@dataclass(frozen=True)
class Device:
    """One device of the fleet and its budgets."""

    name: str
    memory_bytes: int
    latency_ms: float | None = None
    max_memory_mb: float | None = None

    def describe(self) -> str:
        latency = "" if self.latency_ms is None else f", latency budget {self.latency_ms:g} ms"
        ram = "" if self.max_memory_mb is None else f", session memory budget {self.max_memory_mb:g} MiB"
        return f"device '{self.name}' (memory budget {self.memory_bytes:,} bytes{latency}{ram})"


def _positive(value, integer: bool) -> bool:
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and value > 0


def load(path: Path | str) -> list[Device]:
    """The devices of a devices file, validated: a clear UserError names the file, the entry and what is wrong."""
    hint = "see docs/usage.md, 'Devices'"
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UserError(f"cannot read devices file '{path}': {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"devices file '{path}' is not valid YAML or JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("devices"), list) or not doc["devices"]:
        raise UserError(
            f"devices file '{path}' must hold 'devices:', a non-empty list of "
            f"{{name, memory_bytes[, latency_ms]}}; {hint}"
        )
    if set(doc) != {"devices"}:
        raise UserError(
            f"devices file '{path}': unknown key(s) {sorted(set(doc) - {'devices'})}; it holds only 'devices'"
        )
    devices: list[Device] = []
    for i, entry in enumerate(doc["devices"], 1):
        where = f"devices file '{path}', device {i}"
        if not isinstance(entry, dict):
            raise UserError(f"{where} must be a mapping {{name, memory_bytes[, latency_ms]}}, got {entry!r}")
        if set(entry) - set(KEYS):
            raise UserError(f"{where}: unknown key(s) {sorted(set(entry) - set(KEYS))}; a device has {', '.join(KEYS)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{where} has no name: give each device a 'name' (a non-empty string)")
        where = f"devices file '{path}', device '{name}'"
        if not _positive(entry.get("memory_bytes"), integer=True):
            raise UserError(
                f"{where}: 'memory_bytes' must be a positive integer (bytes a member may take), "
                f"got {entry.get('memory_bytes')!r}"
            )
        for key, unit in (("latency_ms", "milliseconds"), ("max_memory_mb", "MiB")):
            if entry.get(key) is not None and not _positive(entry[key], integer=False):
                raise UserError(
                    f"{where}: '{key}' must be a positive number of {unit} (or left out), got {entry[key]!r}"
                )
        if any(d.name == name for d in devices):
            raise UserError(f"devices file '{path}' lists device '{name}' twice; device names must be unique")
        devices.append(Device(name, entry["memory_bytes"], entry.get("latency_ms"), entry.get("max_memory_mb")))
    return devices


def fit(
    devices: list[Device],
    sizes: dict[str, int],
    latency: dict[str, float] | None = None,
    memory: dict[str, float] | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Which member fits which device: ``fits[member, device]`` (members in the order of ``sizes``: shipped bytes),
    and one record per (member, device, budget) that rules the member out of the device.

    A device that no member fits is a UserError naming the device, its budget and the smallest (fastest) member.
    """
    names = list(sizes)
    fits, ruled_out = budgets(devices, sizes, latency, memory)
    for d, dev in enumerate(devices):
        if not fits[:, d].any():
            smallest = min(names, key=lambda n: (sizes[n], n))
            if sizes[smallest] > dev.memory_bytes:
                raise UserError(
                    f"no member fits {dev.describe()}: the smallest member, {smallest}, ships "
                    f"{sizes[smallest]:,} bytes; raise its memory_bytes or make smaller members "
                    "(higher pool.sparsity, quantize.codebook_bits)"
                )
            small = [n for n in names if sizes[n] <= dev.memory_bytes]
            if dev.latency_ms is None:  # memory ruled them out
                least = min(small, key=lambda n: (memory[n], n))
                raise UserError(
                    f"no member fits {dev.describe()}: the member within its bytes budget whose session needs the "
                    f"least memory, {least}, needs {memory[least]:.1f} MiB; raise its max_memory_mb or make "
                    "smaller members"
                )
            fastest = min(small, key=lambda n: (latency[n], n))
            raise UserError(
                f"no member fits {dev.describe()}: the fastest member within its memory budget, {fastest}, "
                f"takes {latency[fastest]:.3f} ms at batch 1 ({sizes[fastest]:,} bytes); raise its "
                "latency_ms or make faster members"
            )
    return fits, ruled_out


def budgets(
    devices: list[Device],
    sizes: dict[str, int],
    latency: dict[str, float] | None = None,
    memory: dict[str, float] | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """:func:`fit` without its check that every device gets a model: ``fits[model, device]`` and what rules
    each model out of each device (also for a model that fits none, such as the parent)."""
    names = list(sizes)
    fits = np.ones((len(names), len(devices)), bool)
    ruled_out = []
    for d, dev in enumerate(devices):
        for m, name in enumerate(names):
            over = [("memory_bytes", sizes[name], dev.memory_bytes, "bytes")]
            if dev.latency_ms is not None:
                over.append(("latency_ms", latency[name], dev.latency_ms, "ms"))
            if dev.max_memory_mb is not None:
                over.append(("max_memory_mb", memory[name], dev.max_memory_mb, "MiB"))
            for budget, need, limit, unit in over:
                if need > limit:
                    fits[m, d] = False
                    need = need if budget == "memory_bytes" else round(need, 4)
                    ruled_out.append(
                        {
                            "member": name,
                            "device": dev.name,
                            "budget": budget,
                            "need": need,
                            "limit": limit,
                            "reason": f"{name} needs {need:,} {unit}, over the {budget} budget of {limit:,} {unit}",
                        }
                    )
    return fits, ruled_out


def record(devices: list[Device]) -> list[dict]:
    """The devices as JSON-ready dicts (as selection.json records them)."""
    return [asdict(d) for d in devices]
