"""Where member jobs run (:func:`make_executor`): in this process, in local processes, or as Ray tasks
(``executor: ray``) spread over a cluster with no shared filesystem.

Ray is optional (``pip install 'prune2edge[ray]'``) and imported only when its executor is made.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any

from . import cores
from .errors import UserError

if TYPE_CHECKING:
    from .config import Ray


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(
            "executor: ray needs Ray, which is not installed here; install it with "
            "pip install 'prune2edge[ray]' (on this machine and on every Ray worker), "
            "or use executor: local"
        ) from None
    return ray


def _first_line(e: BaseException) -> str:
    return next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _call(fn: Callable, threads: int, *args: Any) -> Any:
    """A job inside a Ray worker, with torch limited to the task's CPUs."""
    import torch

    torch.set_num_threads(threads)
    return fn(*args)


class RayExecutor(Executor):
    """Runs each job as a Ray task, with ``num_cpus`` and ``num_gpus`` reserved for it, on the Ray cluster at
    ``address`` (``None``: ``RAY_ADDRESS``, else the cluster ``ray start`` began on this machine, else a Ray instance
    started here and stopped on shutdown).

    Arguments and results travel through Ray's object store (:meth:`put` shares a large argument once), so
    nothing needs a shared filesystem. A job whose worker dies (killed, out of memory, its node lost) runs again,
    up to ``max_retries`` times; an exception the job raises itself fails it at once, as that exception.
    """

    def __init__(self, address: str | None = None, num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 3):
        self.address, self.num_cpus, self.num_gpus, self.max_retries = address, num_cpus, num_gpus, max_retries
        self._ray = _import_ray()
        self._started = False
        self._task = None

    def _connect(self):
        ray = self._ray
        if not ray.is_initialized():
            try:
                ray.init(address=self.address)
            except ConnectionError as e:
                raise UserError(
                    f"cannot reach the Ray cluster at ray.address = {self.address!r} ({e}); start it "
                    "(ray start --head) or fix ray.address"
                ) from None
            self._started = True
        if self._task is None:
            self._task = ray.remote(_call)
        return ray

    def put(self, obj: Any):
        """Put ``obj`` into the object store once; pass the returned reference to :meth:`submit` as an argument."""
        return self._connect().put(obj)

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:  # type: ignore[override]
        if kwargs:
            raise TypeError("RayExecutor.submit takes positional arguments only")
        self._connect()
        ref = self._task.options(
            name=fn.__name__,
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            max_retries=self.max_retries,
            retry_exceptions=False,
        ).remote(fn, max(1, int(self.num_cpus)), *args)
        out: Future = Future()

        def relay(f: Future) -> None:
            e = f.exception()
            if e is None:
                out.set_result(f.result())
            else:
                out.set_exception(self._plain(e))

        ref.future().add_done_callback(relay)
        return out

    def _plain(self, e: BaseException) -> BaseException:
        """The job's own exception for one it raised; a clear error for a job a worker could not run (it lacks
        prune2edge, say) or that Ray lost (after its retries)."""
        errors = self._ray.exceptions
        if isinstance(e, errors.RayTaskError):
            if not isinstance(e.cause, errors.RayError):
                return e.cause
            return UserError(
                f"a Ray worker could not run a pool job ({_first_line(e.cause)}); every worker needs "
                "prune2edge and the same torch as this machine: pip install 'prune2edge[ray]'"
            )
        if isinstance(e, errors.RayError):
            return UserError(
                f"a pool job was lost on the Ray cluster after ray.max_retries = {self.max_retries} "
                f"retries ({type(e).__name__}: {_first_line(e)}); the members finished so far are saved: "
                "run the same command again to continue"
            )
        return e

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Disconnect from Ray if this executor connected (stopping the instance it started, if it started one); a
        connection it found open is left as it is."""
        if self._started:
            self._ray.shutdown()
            self._started = False
            self._task = None


class InProcessExecutor(Executor):
    """Runs each job at submit time in this process: the default, and the simplest to debug."""

    def submit(self, fn, /, *args, **kwargs) -> Future:  # type: ignore[override]
        f: Future = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except Exception as e:
            f.set_exception(e)
        return f


def _limit_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def make_executor(workers: int, ray: Ray | None = None) -> Executor:
    """The seam where member jobs run: in-process for 1 worker, a local process pool for more, or, given the
    config's ``ray:`` settings, Ray tasks (:class:`RayExecutor`)."""
    if ray is not None:
        return RayExecutor(**ray.model_dump())
    if workers <= 1:
        return InProcessExecutor()
    threads = max(1, cores.free() // workers)
    return ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=_limit_threads, initargs=(threads,)
    )
