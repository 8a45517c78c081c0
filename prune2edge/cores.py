"""How many threads to run: the cores this process may use that other work leaves free, not the cores that exist.

On a gateway or CI box that runs other jobs, torch's default (a thread per physical core) makes every thread wait
for the busiest core: measured here, a training with 2 threads and the other core busy took 19x as long as with 1.
Standard library only: the edge runtime calls it too.
"""

from __future__ import annotations

import os
import time

BUSY = 0.5  # a core busier than this over the sample is taken
FRESH_S = 10.0  # a count younger than this is reused: sessions and phases ask often
_last: tuple[float, int] | None = None


def allowed() -> list[int]:
    """The cores this process may run on (its affinity), or ``range(os.cpu_count())`` where affinity is unknown."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def busy_share(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict[int, float]:
    """Each core's busy share between two readings of ``{core: (busy ticks, total ticks)}`` (:func:`ticks`)."""
    out = {}
    for c in before.keys() & after.keys():
        total = after[c][1] - before[c][1]
        out[c] = (after[c][0] - before[c][0]) / total if total > 0 else 0.0
    return out


def ticks() -> dict[int, tuple[int, int]]:
    """``{core: (busy ticks, total ticks)}`` since boot, from /proc/stat (idle and iowait count as free); ``{}``
    where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(v) for v in fields]
            out[int(name[3:])] = (sum(values) - values[3] - values[4], sum(values))
    return out


def free(sample_s: float = 0.25) -> int:
    """Threads to use: ``OMP_NUM_THREADS`` when set (the user's choice), else the allowed cores that were at most
    :data:`BUSY` busy over ``sample_s`` seconds (a count of the last :data:`FRESH_S` seconds is reused); at least 1."""
    global _last
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if _last is not None and time.monotonic() - _last[0] < FRESH_S:
        return _last[1]
    cores = allowed()
    before = ticks()
    if not before:
        return len(cores)
    time.sleep(sample_s)
    share = busy_share(before, ticks())
    _last = time.monotonic(), max(1, sum(share.get(c, 0.0) <= BUSY for c in cores))
    return _last[1]
