r"""Thread counts for CPU work on shared machines, decided in one place.

Two things make a CPU run slow on a busy machine (measured: a training loop of the CIFAR
ResNet took 10-20× its quiet time beside other CPU-bound processes, and the same with the
fixes below about 1.2×):

* **spinning**: OpenMP (torch's intra-op pool, MKL) and OpenBLAS threads busy-wait between
  parallel regions by default. When another process holds a core, the thread that waits
  spins on the core its partner needs. :func:`limit_threads` sets ``OMP_WAIT_POLICY=PASSIVE``
  (sleep instead of spin) for OpenMP runtimes that load after it, i.e. before ``import torch``,
  when other processes run on the cores it needs at start; on a quiet machine a short spin
  (``GOMP_SPINCOUNT``), since sleeping between parallel regions costs ~35% there.
* **oversubscription**: more threads than cores this process may use (``os.sched_getaffinity``
  and the cgroup CPU quota, not ``os.cpu_count()``), or nested pools (BLAS threads inside
  torch threads inside worker processes). One count per process: cores / local workers, given
  to torch, to the BLAS libraries already loaded (threadpoolctl) and, through the environment,
  to those loaded later and to child processes.

Nothing here imports torch: :func:`limit_threads` configures torch only when it is already
imported (and sets the environment it reads at import otherwise).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

__all__ = ["add_threads_argument", "available_cores", "choose_threads", "limit_threads",
           "wait_vars"]

# thread-count variables read by OpenMP, MKL, OpenBLAS, BLIS, Accelerate and numexpr at load
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
# idle OpenMP threads sleep instead of spinning (GNU and LLVM/Intel OpenMP; Intel's blocktime)
WAIT_VARS = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
# on a machine with a free core per thread: spin briefly (~µs), then sleep. Measured on 2 cores
# (validate.cifar noise, quick preset): quiet 11.6 s with this, 16.5 s passive, 12.3 s always
# spinning; beside two busy loops 29 s with this, 22-24 s passive, 41-45 s always spinning
SHORT_SPIN_VARS = {"GOMP_SPINCOUNT": "2000", "KMP_BLOCKTIME": "1"}
_USER_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def _others_running(samples: int = 5) -> int:
    """Runnable tasks of other processes now: the median over a few readings of the
    "running" count of ``/proc/loadavg`` (which counts this thread too), 0 where it does not
    exist (macOS, Windows)."""
    import time

    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as fh:
                counts.append(int(fh.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return 0
        time.sleep(0.001)
    return max(0, sorted(counts)[len(counts) // 2])


def wait_vars(n: int) -> dict[str, str]:
    """The OpenMP wait policy for n threads: :data:`SHORT_SPIN_VARS` when the cores this
    process may use have a free one per thread beyond what other processes run now
    (:func:`_others_running`, read once at start), else the passive :data:`WAIT_VARS`
    (one thread: passive, it never waits on a team)."""
    if n > 1 and _others_running() <= available_cores() - n:
        return dict(SHORT_SPIN_VARS)
    return dict(WAIT_VARS)


def _cgroup_cores(root: str = "/sys/fs/cgroup") -> float:
    """CPU quota of this process's cgroup in cores (``inf`` when there is none).

    cgroup v2 ``cpu.max`` holds "QUOTA PERIOD" or "max PERIOD"; v1 has cfs_quota_us/period_us.
    """
    try:
        with open(os.path.join(root, "cpu.max")) as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return math.inf
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as fh:
            quota = int(fh.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as fh:
            period = int(fh.read())
        return quota / period if quota > 0 and period > 0 else math.inf
    except (OSError, ValueError):
        return math.inf


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity (``os.sched_getaffinity``), capped by
    the cgroup CPU quota (containers), at least 1. ``os.cpu_count()`` where affinity is not
    available (macOS, Windows)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_cores()
    if math.isfinite(quota):
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _local_workers() -> int:
    """Processes sharing this machine's cores in one job: ``LOCAL_WORLD_SIZE`` (torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def choose_threads(threads: int | None = None, *, workers: int | None = None) -> int:
    """Threads per process: ``threads`` when given; else ``$OMP_NUM_THREADS`` when set (a
    positive integer); else :func:`available_cores` divided among ``workers`` processes
    (default: ``$LOCAL_WORLD_SIZE`` under torchrun, else 1), at least 1.

    >>> choose_threads(3)
    3
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    if workers is None:
        workers = _local_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    return max(1, available_cores() // workers)


def limit_threads(threads: int | None = None, *, workers: int | None = None) -> int:
    """Use ``n = choose_threads(threads, workers=workers)`` threads everywhere; returns n.

    Sets the thread variables (:data:`THREAD_VARS`) to n and, unless the user set one of its
    variables, the wait policy :func:`wait_vars` (passive on a busy machine, a short spin on a
    quiet one), for libraries loaded later and child processes; limits
    the BLAS/OpenMP pools already loaded with threadpoolctl (when installed); and, when torch
    is already imported, ``torch.set_num_threads(n)``. Call it first thing in a program (before
    torch is imported, for the wait policy to apply to torch's OpenMP pool).
    """
    n = choose_threads(threads, workers=workers)
    for var in THREAD_VARS:
        os.environ[var] = str(n)
    if not any(var in os.environ for var in _USER_WAIT_VARS):  # the user's policy wins
        os.environ.update(wait_vars(n))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        pass
    else:
        threadpool_limits(limits=n)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(n)
    return n


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--threads N`` (default: None, i.e. :func:`choose_threads`'s choice)."""
    parser.add_argument(
        "--threads", type=_positive_int, default=None, metavar="N",
        help="CPU threads of this process (torch and BLAS), an integer >= 1; default: "
             "$OMP_NUM_THREADS if set, else the cores this process may use (CPU affinity "
             "and cgroup quota) divided among torchrun's local ranks")
