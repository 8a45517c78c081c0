"""executor: ray, against a real Ray instance with 2 CPUs that these tests start once: members as Ray tasks match the
in-process members bit for bit (1 thread), a killed worker's member is retried, a killed driver resumes with the same
command, a member's own error fails once with its message, and without Ray the error says what to install."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from click.testing import CliRunner
from conftest import prune2edge_cli

from prune2edge import cli, config, executors, pipeline, pool, store
from prune2edge.errors import UserError
from prune2edge.executors import RayExecutor

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


@pytest.fixture(scope="module")
def ray_cluster() -> str:
    """A local Ray head with 2 CPUs, started once for all these tests (and stopped after them, so that the rest of
    the suite does not share the cores with it); its address, for drivers in other processes."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A prepared run with its baseline (300 digits, no pool yet), and the same run's pool trained in this process
    with 1 thread: the undisturbed reference."""
    cfg = config.load(
        None,
        {
            "data": {"name": "digits", "max_train": 300},
            "model": {"kwargs": {"width": 8, "depth": 2}},
            "train": {"epochs": 4, "batch_size": 64},
            "pool": {
                **config.clone_family({}),  # pruned clones: the family these tests were written for
                **{"size": 3, "sparsity": 0.7, "epochs": 10.0, "lr": 0.02, "batch_size": 32, "min_steps": 0},
            },
            "cluster": {"k": 2, "k_max": 3},
        },
    )
    run = tmp_path_factory.mktemp("ray") / "prepared"
    pipeline.prepare(run, cfg)
    pipeline.baseline(run, cfg, progress=False)
    reference = run.with_name("reference")
    shutil.copytree(run, reference)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pool.build(reference, cfg, executors.InProcessExecutor(), progress=False)
    finally:
        torch.set_num_threads(threads)
    return run, reference


def copy_of(run: Path, dest: Path) -> tuple[Path, config.Config]:
    shutil.copytree(run, dest)
    return dest, config.load(dest / "config.yaml")


def assert_same_members(run: Path, reference: Path) -> None:
    """Bit-identical weights files and the same records, timings aside."""
    names = sorted(p.name for p in (reference / "pool").iterdir())
    assert sorted(p.name for p in (run / "pool").iterdir()) == names
    for name in names:
        assert (run / "pool" / name / "model.pt").read_bytes() == (
            reference / "pool" / name / "model.pt"
        ).read_bytes(), name
        a, b = (store.read_json(d / "pool" / name / "member.json") for d in (run, reference))
        for rec in (a, b):
            rec.pop("seconds"), rec.pop("cpu_seconds")
            for row in rec["history"]:
                row.pop("seconds"), row.pop("cpu_seconds")
        assert a == b, name


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def our_workers(task: str) -> list[int]:
    """Pids of this session's Ray workers running ``task``: titled ray::<task>, children of the raylet that
    ray.init started as a child of this process."""
    out = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            if (
                Path(f"/proc/{pid}/cmdline").read_bytes().startswith(f"ray::{task}".encode())
                and parent(parent(pid)) == os.getpid()
            ):
                out.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_worker_killed_mid_member_is_retried_to_the_same_members(ray_cluster, tiny, tmp_path):
    run, cfg = copy_of(tiny[0], tmp_path / "run")
    (run / "pool" / "m001").mkdir(parents=True)  # resume: a member on disk is kept, not trained again
    for f in ("model.pt", "member.json"):
        shutil.copy(tiny[1] / "pool" / "m001" / f, run / "pool" / "m001" / f)
    before = (run / "pool" / "m001" / "member.json").stat().st_mtime_ns
    result: dict = {}
    executor = executors.make_executor(1, cfg.ray.model_copy(update={"max_retries": 2}))
    assert isinstance(executor, RayExecutor)
    builder = threading.Thread(target=lambda: result.update(members=pool.build(run, cfg, executor, progress=False)))
    builder.start()
    deadline, killed = time.monotonic() + 120, None
    while killed is None and builder.is_alive() and time.monotonic() < deadline:
        busy = our_workers("fit_member")
        if busy:
            time.sleep(0.3)  # well into the member (about 1 s of training)
            if busy[0] in our_workers("fit_member"):
                os.kill(busy[0], signal.SIGKILL)
                killed = busy[0]
        time.sleep(0.02)
    builder.join(180)
    assert killed is not None, "no worker was seen running a member"
    assert [m.name for m in result["members"]] == ["m000", "m001", "m002"]
    assert (run / "pool" / "m001" / "member.json").stat().st_mtime_ns == before
    assert_same_members(run, tiny[1])


@pytest.mark.ray
@pytest.mark.slow
def test_driver_killed_mid_pool_resumes_with_the_same_command(ray_cluster, tiny, tmp_path):
    run, cfg = copy_of(tiny[0], tmp_path / "run")
    cfg_file = tmp_path / "ray.yaml"
    cfg_file.write_text(config.yaml_text(config.merged(cfg, {"executor": "ray", "ray": {"address": ray_cluster}})))
    command = [sys.executable, "-m", "prune2edge.cli", "run", str(cfg_file), "--out", str(run), "--quiet"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300  # Ray's workers start slowly on busy cores (120 s was too short under load)
    while driver.poll() is None and time.monotonic() < deadline and not list(run.glob("pool/*/member.json")):
        time.sleep(0.05)
    driver.kill()
    driver.wait()
    first = {p.parent.name: p.stat().st_mtime_ns for p in run.glob("pool/*/member.json")}
    assert 1 <= len(first) < 3, f"the driver was to be killed mid-pool, but it had written {sorted(first)}"
    again = prune2edge_cli("run", str(cfg_file), "--out", str(run), "--quiet")
    assert again.returncode == 0, again.stderr
    assert {n: (run / "pool" / n / "member.json").stat().st_mtime_ns for n in first} == first  # kept, not retrained
    assert_same_members(run, tiny[1])
    assert (run / "metrics.json").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_a_jobs_own_error_fails_once_and_a_lost_worker_is_a_clear_error(ray_cluster, tmp_path):
    def failing_job(log: str) -> None:  # defined here, so Ray ships it by value
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        raise UserError("config key 'pool.lr' must be > 0, got -1")

    def dying_job(log: str) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)

    with (
        RayExecutor(max_retries=3) as ex,
        pytest.raises(UserError, match=r"^config key 'pool\.lr' must be > 0, got -1$"),
    ):
        ex.submit(failing_job, str(tmp_path / "failing")).result(180)  # a worker starts slowly on busy cores
    assert len((tmp_path / "failing").read_text().split()) == 1  # not retried
    lost = r"lost on the Ray cluster after ray\.max_retries = 0 retries.*run the same command again"
    with RayExecutor(max_retries=0) as ex, pytest.raises(UserError, match=lost):
        ex.submit(dying_job, str(tmp_path / "dying")).result(120)
    assert len((tmp_path / "dying").read_text().split()) == 1


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_without_the_jobs_code_is_a_clear_error(ray_cluster, tmp_path, monkeypatch):
    """A module only this process can import stands for prune2edge missing on a worker."""
    (tmp_path / "only_here.py").write_text("def job():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_here

    with pytest.raises(
        UserError, match=r"could not run a pool job \(.*No module named 'only_here'.*pip install 'prune2edge\[ray\]'"
    ):
        RayExecutor().submit(only_here.job).result(60)


@pytest.mark.ray
@pytest.mark.slow
def test_a_members_user_error_reaches_the_driver_as_itself(ray_cluster, tiny, tmp_path):
    run, cfg = copy_of(tiny[0], tmp_path / "run")
    cfg = config.load(None, config.merged(cfg, {"pool": {"regrow": 0.3, "regrow_every": 1000}}))
    (run / "config.yaml").write_text(config.yaml_text(cfg))
    with pytest.raises(UserError, match=r"^pool\.regrow is 0\.3 but no step would regrow.*lower pool\.regrow_every"):
        pool.build(run, cfg, RayExecutor(), progress=False)
    assert not list(run.glob("pool/*/member.json"))


def test_without_ray_installed_executor_ray_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as where it is not installed
    with pytest.raises(UserError, match=r"executor: ray needs Ray.*pip install 'prune2edge\[ray\]'"):
        executors.make_executor(1, config.load(None, {"executor": "ray"}).ray)
    (tmp_path / "ray.yaml").write_text("executor: ray\n")
    out = CliRunner().invoke(cli.main, ["run", str(tmp_path / "ray.yaml"), "--out", str(tmp_path / "run")])
    assert out.exit_code == 2
    assert "error: executor: ray needs Ray" in out.stderr and "pip install 'prune2edge[ray]'" in out.stderr
    assert "Traceback" not in out.output and not (tmp_path / "run").exists()  # it failed before any work


@pytest.mark.parametrize(
    "opts,key",
    [
        ({"executor": "spark"}, "executor"),
        ({"ray": {"address": "http://head:8265"}}, "ray.address"),
        ({"ray": {"num_cpus": 0}}, "ray.num_cpus"),
        ({"ray": {"num_gpus": -1}}, "ray.num_gpus"),
        ({"ray": {"max_retries": -1}}, "ray.max_retries"),
        ({"executor": "ray", "device": "cuda"}, "ray.num_gpus"),
        ({"executor": "ray", "ray": {"num_gpus": 1}}, "ray.num_gpus"),
        ({"executor": "ray", "workers": 2}, "workers"),
        ({"executor": "ray", "pool": {"cyclical": True, "family": "clones"}}, "pool.cyclical"),
        ({"ray": {"colour": 1}}, "ray.colour"),
    ],
)
def test_config_rejects_bad_ray_settings(opts, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        config.load(None, opts)


@pytest.mark.parametrize("address", [None, "auto", "ray://head.lan:10001", "10.0.0.5:6379"])
def test_config_takes_ray_addresses_and_a_changed_executor_is_the_same_run(address):
    local = config.load(None, {})
    remote = config.load(None, {"executor": "ray", "ray": {"address": address, "num_cpus": 2}})
    assert not config.differences(local, remote)
