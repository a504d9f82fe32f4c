r"""The runner: grid → jobs → executor → one JSON per finished run → resume → checks + figure.

An experiment module describes its runs as :class:`Job` objects; the runner

1. keys each job by :func:`job_key`, a hash of everything that decides its numbers (the job's
   function and settings, the data's identity — a hash of its arrays, not its path —, the
   device type, the torch version and a fingerprint of the code a run executes);
2. loads the stored result ``<out>/runs/<key>.json`` of every job that already finished (unless
   ``force``), and hands the others to a ``concurrent.futures.Executor``: a local process pool
   (:func:`make_executor`; spawned workers, one torch thread each, one per GPU on CUDA; with
   one worker the jobs run in this process), or a Dask cluster through
   ``dask.distributed.Client(address).get_executor()`` — no scheduler of our own;
3. writes each result atomically as its future completes (a killed sweep loses only the runs in
   flight; rerunning the same command resumes), with a progress bar over the runs and the time
   left;
4. returns the results in the jobs' order, whatever the order they finished in.

Workers load the data themselves (:func:`load_data_cached`, once per process) from a
:class:`DataSpec` and check its identity against the one the jobs were keyed with, so a Dask
worker that reads different data fails loudly instead of mixing data sets. On a cluster the
repository must be importable on the workers (``pip install -e .``) and a ``.npz`` or CIFAR-10
path readable there.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from validate._io import jsonable, settings_hash, write_json

__all__ = [
    "DataSpec",
    "Job",
    "JobError",
    "code_fingerprint",
    "default_workers",
    "execute",
    "job_key",
    "load_data_cached",
    "make_executor",
    "prime_data",
    "run_jobs",
]


@dataclass(frozen=True)
class DataSpec:
    """How a worker loads the data: ``kind`` is ``digits``, ``synthetic``, ``cifar10`` or an
    ``.npz`` path; ``synthetic`` = (train images, test images, size in pixels, seed)."""

    kind: str
    data_dir: str | None = None
    md5: str | None = None
    synthetic: tuple = (2048, 512, 16, 0)

    def load(self, *, download: bool = False):
        from validate import data

        n_train, n_test, size, seed = self.synthetic
        return data.load_data(self.kind, data_dir=self.data_dir, md5=self.md5,
                              download=download, seed=seed, n_synthetic=(n_train, n_test),
                              synthetic_size=size)


@dataclass(frozen=True)
class Job:
    """One run: ``fn`` (``"module:function"``, called as ``fn(settings, data, device)`` in a
    worker, returning a JSON-able dict) with its ``settings`` (JSON-able, the whole of what it
    depends on besides the data), and a short human ``label``."""

    fn: str
    settings: dict = field(hash=False)
    label: str = ""


class JobError(RuntimeError):
    """A job raised (a bug or bad settings, not a training failure, which is a result)."""


# ---------------------------------------------------------------------------- keys
#: Files whose code decides a run's numbers (relative to the repository root); the module of
#: each job's function is added per job. (Plumbing that only moves numbers — validate/_io.py —
#: is left out, so that fixing it does not invalidate stored runs.)
CODE_FILES = (
    "validate/train.py", "validate/data.py", "validate/models.py", "validate/measure.py",
    "validate/_hvp.py", "validate/_noise.py", "validate/_common.py",
    "validate/experiments/runner.py", "sgdtheory/krylov.py", "sgdtheory/estimators.py",
    "sgdtheory/backend.py", "sgdtheory/_checks.py",
)
_ROOT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=64)
def code_fingerprint(module: str = "") -> str:
    """SHA-256 (16 hex digits) of :data:`CODE_FILES` that exist, plus ``module``'s source."""
    h = hashlib.sha256()
    files = [_ROOT / f for f in CODE_FILES]
    if module:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            files.append(Path(spec.origin))
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def job_key(job: Job, identity: dict, device_type: str) -> str:
    """The hash a job's result is stored under (see the module docstring)."""
    import torch

    return settings_hash({
        "fn": job.fn, "settings": job.settings,
        "data": {k: identity[k] for k in ("sha256", "train_examples", "test_examples")},
        "device": device_type, "torch": torch.__version__,
        "code": code_fingerprint(job.fn.split(":")[0]),
    })


# ---------------------------------------------------------------------------- workers
_WORKER = {"device": None}


_DATA: dict = {}


def prime_data(spec: DataSpec, sha256: str, data) -> None:
    """Give this process's cache the data already loaded (the main process, one worker)."""
    _DATA.clear()
    _DATA[(spec, sha256)] = data


def load_data_cached(spec: DataSpec, sha256: str):
    """The data of ``spec`` (loaded once per process; one data set kept), checked to have
    identity ``sha256``."""
    from validate.data import data_identity

    if (spec, sha256) not in _DATA:
        data = spec.load()
        got = data_identity(data)["sha256"]
        if got != sha256:
            raise JobError(f"the data {spec.kind!r} read by worker {platform.node()} has "
                           f"identity {got}, not {sha256} as in the main process (a different "
                           "file?)")
        prime_data(spec, sha256, data)
    return _DATA[(spec, sha256)]


def _init_worker(threads: int, devices, counter) -> None:
    """Process-pool initializer: the threads of torch and BLAS (:mod:`sgdtheory._threads`: no
    nested parallelism, passive OpenMP waits), and one GPU per worker on CUDA."""
    from sgdtheory import _threads

    _threads.limit_threads(threads)
    if devices:
        with counter.get_lock():
            i = counter.value
            counter.value += 1
        _WORKER["device"] = devices[i % len(devices)]


def execute(fn: str, settings: dict, spec: DataSpec, sha256: str, device: str,
            threads: int = 1) -> dict:
    """Run one job in this process: ``{'result': …, 'timing': …}`` (strict-JSON values).

    Sets torch's intra-op threads to ``threads`` for the job (no nested parallelism under a
    pool; also what makes CPU results identical across executors) and restores them after.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = load_data_cached(spec, sha256)
        module, name = fn.split(":")
        func = getattr(importlib.import_module(module), name)
        dev = _WORKER["device"] or device
        t0 = time.perf_counter()
        result = dict(func(settings, data, dev))
        timing = dict(result.pop("timing", {}))
        timing.update(wall_s=time.perf_counter() - t0, host=platform.node(), pid=os.getpid(),
                      device=str(dev))
    finally:
        torch.set_num_threads(before)
    return {"result": jsonable(result), "timing": jsonable(timing)}


class _InProcess(cf.Executor):
    """Runs each submitted call at once in this process (one worker: no pool to start)."""

    def submit(self, fn, /, *args, **kwargs):
        future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            if isinstance(e, KeyboardInterrupt):
                raise
            future.set_exception(e)
        return future


def default_workers(device_type: str) -> int:
    """What the device allows: one per GPU on CUDA, one per CPU core this process may use
    otherwise (affinity and cgroup quota, :func:`sgdtheory._threads.available_cores`)."""
    if device_type == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    from sgdtheory import _threads

    return _threads.available_cores()


@contextlib.contextmanager
def make_executor(spec: str = "local", workers: int = 1, device_type: str = "cpu",
                  threads: int = 1):
    """A ``concurrent.futures.Executor`` for ``spec``: ``local`` (a spawned process pool of
    ``workers``, or this process when ``workers == 1``) or ``dask://HOST:PORT`` (a Dask
    cluster's executor; needs the ``[dask]`` extra). Yields ``(executor, description)``."""
    if spec.startswith("dask://"):
        try:
            from dask.distributed import Client
        except ImportError as e:
            raise ValueError("--executor dask://… needs dask.distributed: pip install "
                             "'sgdtheory[dask]'") from e
        address = "tcp://" + spec[len("dask://"):]
        try:
            client = Client(address, timeout="10s")
        except OSError as e:
            raise ValueError(f"cannot reach the Dask scheduler at {address} ({e})") from None
        try:
            n = len(client.scheduler_info().get("workers", {}))
            yield client.get_executor(pure=False), f"dask {address} ({n} workers)"
        finally:
            client.close()
        return
    if spec != "local":
        raise ValueError(f"executor must be 'local' or dask://HOST:PORT, got {spec!r}")
    if workers == 1:
        yield _InProcess(), "this process"
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    devices = []
    if device_type == "cuda":
        import torch

        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                  initargs=(threads, devices, ctx.Value("i", 0)))
    try:
        yield pool, f"local pool of {workers} processes"
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------- the loop
def _stored(path: Path, key: str):
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("key") == key and "result" in rec else None


def run_jobs(jobs: list[Job], *, spec: DataSpec, identity: dict, device_type: str, out,
             executor=None, force: bool = False, progress: bool = True, desc: str = "runs",
             threads: int = 1) -> list[dict]:
    """Run ``jobs`` (those without a stored result) on ``executor`` and return one record per
    job, in order: ``{'key', 'fn', 'label', 'settings', 'result', 'timing', 'cached'}``.

    Each finished run is written to ``<out>/runs/<key>.json`` at once. A job that raises stops
    the sweep (pending jobs are cancelled; finished ones stay saved) with :class:`JobError`.
    """
    from tqdm.auto import tqdm

    runs = Path(out) / "runs"
    records: list[dict | None] = [None] * len(jobs)
    keys = [job_key(j, identity, device_type) for j in jobs]
    todo = []
    for i, key in enumerate(keys):
        rec = None if force else _stored(runs / f"{key}.json", key)
        if rec is not None:
            records[i] = {**rec, "cached": True}
        else:
            todo.append(i)
    if todo:
        if executor is None:
            executor = _InProcess()
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="run",
                   disable=not progress, dynamic_ncols=True)
        futures: dict = {}
        collected: set = set()

        def collect(fut, i: int) -> None:
            job = jobs[i]
            try:
                done = fut.result()
            except Exception as e:  # noqa: BLE001 - reported with the job's label
                raise JobError(f"run {job.label or keys[i]} failed: {type(e).__name__}: "
                               f"{' '.join(str(e).split())}") from e
            rec = {"key": keys[i], "fn": job.fn, "label": job.label,
                   "settings": jsonable(job.settings), "data": identity,
                   "result": done["result"], "timing": done["timing"],
                   "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            write_json(runs / f"{keys[i]}.json", rec)
            records[i] = {**rec, "cached": False}
            collected.add(fut)
            bar.update(1)

        in_process = isinstance(executor, _InProcess)
        try:
            for i in todo:
                job = jobs[i]
                fut = executor.submit(execute, job.fn, job.settings, spec,
                                      identity["sha256"], device_type, threads)
                futures[fut] = i
                if in_process:  # finished already: save it before the next run starts
                    collect(fut, i)
            for fut in cf.as_completed([f for f in futures if f not in collected]):
                collect(fut, futures[fut])
        finally:
            for f in futures:
                f.cancel()
            bar.close()
    return records
