"""Thread counts come from the cores that other work leaves free."""

import subprocess
import sys
import time

from prune2edge import cores

SPIN = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); [None for _ in iter(int, 1)]"


def test_busy_share_reads_each_cores_ticks():
    before = {0: (100, 1000), 1: (500, 1000)}
    after = {0: (190, 1100), 1: (510, 1100), 2: (5, 10)}  # core 2 appeared: no reading before, left out
    assert cores.busy_share(before, after) == {0: 0.9, 1: 0.1}


def test_a_core_that_other_work_keeps_busy_is_not_counted(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cores, "_last", None)
    core = cores.allowed()[0]
    spinner = subprocess.Popen([sys.executable, "-c", SPIN, str(core)])
    try:
        time.sleep(0.3)
        before = cores.ticks()
        time.sleep(0.5)
        assert cores.busy_share(before, cores.ticks())[core] > cores.BUSY
        assert 1 <= cores.free() <= max(1, len(cores.allowed()) - 1)
    finally:
        spinner.kill()
        spinner.wait()


def test_the_users_thread_count_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cores.free() == 3
