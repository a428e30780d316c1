"""The Ray runtime: embedded or cluster start-up, thread limits, progress, error unwrapping."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Iterator

import psutil

from vecgraph.jobs.config import RayConfig
from vecgraph.sharding.errors import InputError

log = logging.getLogger("vecgraph")

# Each task limits BLAS/OpenMP to its own CPUs; these reach workers started by the runtime.
THREAD_ENV = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


class StageFailed(RuntimeError):
    """A stage ran but its result must not be committed (e.g. recall under knn.min_recall)."""


def init(cfg: RayConfig) -> Any:
    """Connect to Ray: cfg.address or RAY_ADDRESS (set by `ray job submit`) for a cluster,
    otherwise an embedded runtime started with address="local", never a stray `ray start` head."""
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        # Loopback only: an embedded runtime has no business on other interfaces.
        ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=False,
                 _node_ip_address="127.0.0.1",
                 object_store_memory=cfg.object_store_mb * 2**20 if cfg.object_store_mb else None,
                 runtime_env={"env_vars": THREAD_ENV}, logging_level=logging.WARNING)
    return ray


def limit_threads(n: int = 1) -> None:
    """Cap BLAS/OpenMP threads of this worker to the CPUs its task declared."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(n)
    try:
        import faiss
        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


def get(refs: list, desc: str, show: bool = True) -> list:
    """ray.get with a progress bar; a task's InputError is re-raised as itself (exit code 2)."""
    import ray
    from tqdm import tqdm

    pending = list(refs)
    done: dict[Any, Any] = {}
    bar = tqdm(total=len(refs), desc=desc, unit="part", disable=None if show and len(refs) > 1 else True,
               leave=False)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for r in ready:
                done[r] = unwrap(ray.get, r)
                bar.update(1)
                _maybe_crash(desc, len(done))
    finally:
        bar.close()
    return [done[r] for r in refs]


def progress(it: Any, desc: str, **kwargs: Any) -> Any:
    """A tqdm progress bar over an iterable of steps (iterations of a stage); `it` may be None
    with total=… for a bar updated by hand."""
    from tqdm import tqdm
    return tqdm(it, desc=desc, leave=False, disable=None, **kwargs)  # None: only on a terminal


def _maybe_crash(desc: str, n_done: int) -> None:
    """Fault injection for the resume tests (as faiss's crash_at): VECGRAPH_CRASH_AT=shard:2
    SIGKILLs this driver once 2 results of the "shard" wait have arrived."""
    spec = os.environ.get("VECGRAPH_CRASH_AT", "")
    if spec and spec == f"{desc}:{n_done}":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def unwrap(fn: Any, *args: Any) -> Any:
    """fn(*args); a Ray task error caused by an InputError or StageFailed becomes that error."""
    import ray

    try:
        return fn(*args)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, (InputError, StageFailed)):
            raise cause from None
        raise


@contextlib.contextmanager
def timed(what: str, stats: dict | None = None) -> Iterator[None]:
    """Log the wall time of a phase (and store it in stats[what] when given)."""
    t0 = time.perf_counter()
    yield
    dt = time.perf_counter() - t0
    log.info("%s: %.2f s", what, dt)
    if stats is not None:
        stats[what] = round(dt, 3)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # pragma: no cover - non-Unix
        return psutil.Process().memory_info().rss / 2**20
