r"""Monte Carlo SGD: many replicas × a grid of configurations in one vectorised computation.

Units (docs/design.md §2): ``lr`` (η) multiplies the **mean** minibatch gradient
G_B = (1/B) Σ_{i∈batch} ∇ℓ_i (the base rate is η/B). Heavy-ball momentum is the
``torch.optim.SGD`` form (dampening 0, v₀ = 0)::

    v ← μ v + G_B,   θ ← θ − η_t v            (Nesterov: θ ← θ − η_t (G_B + μ v))

with η_t = η · schedule(t/T). The EMA of the iterates is θ̄_{t+1} = β θ̄_t + (1−β) θ_{t+1},
θ̄_0 = θ_0 (as :func:`sgdtheory.nqm.expected_loss` with ``ema_decay``).

API::

    run(problem, *, lr, batch=1, steps=None, epochs=None, momentum=0.0, nesterov=False,
        schedule=None, batch_schedule=None, ema=None, replicas=1, seed=0,
        record_every=None, record_steps=None, record_epochs=None, record_stats=False,
        init=None, replace=False, dtype="float64", backend=None, device=None,
        chunk_size=None, divergence_factor=1e6, check_every=16, progress=None) -> Result

    Result: train_loss, test_loss, ema_train_loss, ema_test_loss   (*S, replicas, n_records)
            steps, examples (n_records,) or (*S, n_records); epochs (finite data) or None
            diverged (*S, replicas) bool; diverged_at (*S, replicas) int (-1: never)
            grad_sq, g_h_g, tr_sigma, tr_h_sigma, b_noise, b_simple, eps_max (record_stats)
            lr, batch, momentum: the configuration grid (NumPy arrays of shape S)
            .to_numpy() -> Result;  .mean(name="train_loss"), .stderr(name) over replicas

    Schedules (pure functions of the step fraction f = t/T ∈ [0, 1) → multiplier):
    constant(); warmup(fraction); linear_decay(final=0.0, warmup=0.0);
    piecewise_linear(points, values); step_decay(boundaries, factor=0.1);
    batch_increase(schedule, max_factor=None)  # batch multiplier 1/schedule(f), for
                                               # ``batch_schedule`` (decay → batch increase)

S is the broadcast shape of ``lr``, ``batch`` and ``momentum``. Configurations with the same
batch size are simulated together and share their random draws (per replica): a learning-rate
grid sees common random numbers, which makes differences between configurations much less noisy
than their absolute values. Replicas are independent. Same arguments, same backend → the same
numbers.

A replica diverges when its training loss is non-finite or exceeds ``divergence_factor`` × its
initial loss (checked every ``check_every`` steps and at each record). It is then frozen:
``diverged_at`` holds the step at which that was detected, its later records are ``inf``, and it
costs no more compute (diverged rows are dropped from the state arrays).

>>> from sgdtheory.problems import NoisyQuadratic
>>> res = run(NoisyQuadratic([1.0, 0.5], [1.0, 1.0]), lr=[0.1, 5.0], batch=4, steps=20,
...           replicas=3, seed=0, record_every=10, progress=False)
>>> res.train_loss.shape, res.steps.tolist(), res.diverged.tolist()
((2, 3, 3), [0, 10, 20], [[False, False, False], [True, True, True]])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from dataclasses import replace as dc_replace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import optim
from ._checks import integer, real
from .backend import Backend, get_backend, to_numpy
from .problems import Layout

__all__ = [
    "Result",
    "batch_increase",
    "constant",
    "linear_decay",
    "piecewise_linear",
    "run",
    "step_decay",
    "warmup",
]

Schedule = Callable[[np.ndarray], np.ndarray]

# --------------------------------------------------------------------------- schedules


def constant() -> Schedule:
    """Multiplier 1 at every step.

    >>> constant()(np.array([0.0, 0.5]))
    array([1., 1.])
    """
    return lambda f: np.ones_like(np.asarray(f, dtype=float))


def warmup(fraction: float) -> Schedule:
    """Linear warmup over the first ``fraction`` of the run, then constant: m(f) = min(1, f/w).

    (The first step, f = 0, has rate 0, as in optax's linear warmup from 0.)

    >>> warmup(0.5)(np.array([0.25, 0.5, 0.75]))
    array([0.5, 1. , 1. ])
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"warmup fraction must lie in (0, 1], got {fraction!r}")
    return lambda f: np.minimum(1.0, np.asarray(f, dtype=float) / fraction)


def linear_decay(final: float = 0.0, warmup: float = 0.0) -> Schedule:
    """Linear warmup to 1 over the first ``warmup`` fraction, then linear decay to ``final``.

    >>> linear_decay(0.0)(np.array([0.0, 0.5, 1.0]))
    array([1. , 0.5, 0. ])
    >>> linear_decay(0.0, warmup=0.5)(np.array([0.25, 0.5, 0.75]))
    array([0.5, 1. , 0.5])
    """
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup must lie in [0, 1), got {warmup!r}")
    if not (np.isfinite(final) and final >= 0):
        raise ValueError(f"final must be ≥ 0, got {final!r}")
    if warmup == 0:
        return piecewise_linear([0.0, 1.0], [1.0, final])
    return piecewise_linear([0.0, warmup, 1.0], [0.0, 1.0, final])


def piecewise_linear(points, values) -> Schedule:
    """Linear interpolation through (points[k], values[k]) (fractions in [0, 1], increasing).

    >>> piecewise_linear([0, 0.5, 1], [1, 1, 0.1])(np.array([0.25, 0.75]))
    array([1.  , 0.55])
    """
    x = np.asarray(points, dtype=float)
    y = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.shape != y.shape or x.size < 1:
        raise ValueError(f"points and values must be 1-D of equal length, got {x.shape}, "
                         f"{y.shape}")
    if np.any(np.diff(x) < 0) or not np.all(np.isfinite(x)):
        raise ValueError("points must be finite and non-decreasing")
    if not np.all(np.isfinite(y)) or np.any(y < 0):
        raise ValueError("values must be finite and ≥ 0")
    return lambda f: np.interp(np.asarray(f, dtype=float), x, y)


def step_decay(boundaries, factor: float = 0.1) -> Schedule:
    """Multiply by ``factor`` at each boundary fraction: m(f) = factor^{#(boundaries ≤ f)}.

    >>> step_decay([0.5, 0.75], 0.1)(np.array([0.0, 0.5, 0.8]))
    array([1.  , 0.1 , 0.01])
    """
    b = np.sort(np.asarray(boundaries, dtype=float).ravel())
    if not (np.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be > 0, got {factor!r}")
    return lambda f: factor ** np.searchsorted(b, np.asarray(f, dtype=float), side="right")


def batch_increase(schedule: Schedule, max_factor: float | None = None) -> Schedule:
    """Batch-size multiplier 1/schedule(f): increase the batch instead of decaying the rate.

    Smith et al. (2018): where ``schedule`` would divide the learning rate by k, multiply the
    batch by k (capped at ``max_factor``). Use as ``run(..., batch_schedule=...)``; the batch of
    step t is max(1, round(B · multiplier)).

    >>> batch_increase(step_decay([0.5], 0.2))(np.array([0.0, 0.6]))
    array([1., 5.])
    """

    def mult(f):
        s = np.asarray(schedule(f), dtype=float)
        if np.any(s <= 0):
            raise ValueError("batch_increase needs a schedule that stays > 0")
        m = 1.0 / s
        return m if max_factor is None else np.minimum(m, max_factor)

    return mult


# --------------------------------------------------------------------------- result


_STATS = ("grad_sq", "g_h_g", "tr_sigma", "tr_h_sigma")
_RECORDS = ("train_loss", "test_loss", "ema_train_loss", "ema_test_loss") + _STATS


@dataclass
class Result:
    """Output of :func:`run`. Arrays are of the backend used (``to_numpy()`` converts).

    Shapes: S = configuration shape (broadcast of lr, batch, momentum), R = replicas,
    K = number of records.

    Attributes:
        train_loss: (*S, R, K) training loss (mean over examples) at the recorded steps;
            ``inf`` from a replica's divergence on.
        test_loss: (*S, R, K) or None (problems without a test loss).
        ema_train_loss, ema_test_loss: at the EMA iterate (``ema`` given) or None.
        steps: recorded steps (updates done), (K,), or (*S, K) when they differ by
            configuration (``epochs`` with several batch sizes).
        examples: examples processed at those steps (Σ of batch sizes), (K,) or (*S, K).
        epochs: examples / N on finite data, else None.
        diverged: (*S, R) bool. diverged_at: (*S, R) int step of detection, −1 if none.
        grad_sq, g_h_g, tr_sigma, tr_h_sigma: (*S, R, K) exact |G|², GᵀHG, tr Σ, tr HΣ at the
            iterate (``record_stats``); b_noise, b_simple, eps_max: derived (properties).
        lr, batch, momentum: (*S) NumPy arrays of the grid. replicas, seed, backend: as run.
    """

    train_loss: Any
    test_loss: Any
    ema_train_loss: Any
    ema_test_loss: Any
    steps: np.ndarray
    examples: np.ndarray
    epochs: np.ndarray | None
    diverged: Any
    diverged_at: Any
    grad_sq: Any
    g_h_g: Any
    tr_sigma: Any
    tr_h_sigma: Any
    lr: np.ndarray
    batch: np.ndarray
    momentum: np.ndarray
    replicas: int
    seed: int
    backend: str

    @property
    def b_noise(self):
        """B_noise = tr(HΣ)/GᵀHG per record (record_stats), else None."""
        return None if self.g_h_g is None else _div(self.tr_h_sigma, self.g_h_g)

    @property
    def b_simple(self):
        """B_simple = tr Σ/|G|² per record (record_stats), else None."""
        return None if self.grad_sq is None else _div(self.tr_sigma, self.grad_sq)

    @property
    def eps_max(self):
        """ε_max = |G|²/GᵀHG per record (record_stats), else None."""
        return None if self.grad_sq is None else _div(self.grad_sq, self.g_h_g)

    def to_numpy(self) -> Result:
        """A copy with every array converted to NumPy."""
        conv = {f.name: (to_numpy(getattr(self, f.name))
                         if hasattr(getattr(self, f.name), "shape") else getattr(self, f.name))
                for f in fields(self)}
        return dc_replace(self, **conv)

    def mean(self, name: str = "train_loss") -> np.ndarray:
        """Mean over replicas of a recorded quantity, NumPy (*S, K)."""
        return to_numpy(self._get(name)).mean(-2)

    def stderr(self, name: str = "train_loss") -> np.ndarray:
        """Standard error of :meth:`mean` (std with ddof=1 over √R), NumPy (*S, K)."""
        x = to_numpy(self._get(name))
        if x.shape[-2] < 2:
            raise ValueError("stderr needs at least 2 replicas")
        with np.errstate(invalid="ignore"):
            return x.std(-2, ddof=1) / math.sqrt(x.shape[-2])

    def _get(self, name):
        val = getattr(self, name)
        if val is None:
            raise ValueError(f"{name} was not recorded in this run")
        return val


def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return a / b


# --------------------------------------------------------------------------- input checks


def _grid(lr, batch, momentum):
    try:
        lr_a = np.asarray(lr, dtype=float)
        b_a = np.asarray(batch, dtype=float)
        mu_a = np.asarray(momentum, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"lr, batch and momentum must be numbers or arrays: {exc}") from exc
    for name, a in (("lr", lr_a), ("batch", b_a), ("momentum", mu_a)):
        if a.size == 0:
            raise ValueError(f"{name} must not be empty")
    if not np.all(np.isfinite(lr_a)) or np.any(lr_a <= 0):
        raise ValueError(f"lr must be finite and > 0, got {lr!r}")
    if (np.asarray(batch).dtype == bool or not np.all(np.isfinite(b_a)) or np.any(b_a < 1)
            or np.any(b_a > 2**62) or np.any(b_a != np.round(b_a))):
        raise ValueError(f"batch must hold positive integers, got {batch!r}")
    if not np.all(np.isfinite(mu_a)) or np.any(mu_a < 0) or np.any(mu_a >= 1):
        raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
    try:
        shape = np.broadcast_shapes(lr_a.shape, b_a.shape, mu_a.shape)
    except ValueError as exc:
        raise ValueError(f"lr {lr_a.shape}, batch {b_a.shape} and momentum {mu_a.shape} "
                         f"do not broadcast together") from exc
    return (np.broadcast_to(lr_a, shape).copy(), np.broadcast_to(b_a, shape).astype(np.int64),
            np.broadcast_to(mu_a, shape).copy(), shape)


def _pos_int(name, v, minimum=1):
    return integer(name, v, minimum)


def _record_plan(steps, record_every, record_steps):
    if record_steps is not None and record_every is not None:
        raise ValueError("give record_steps or record_every, not both")
    if record_steps is not None:
        rs = np.unique(np.asarray(record_steps, dtype=float).ravel())
        if rs.size == 0 or np.any(rs != np.round(rs)) or rs[0] < 0 or rs[-1] > steps:
            raise ValueError(f"record_steps must be integers in [0, steps={steps}], "
                             f"got {record_steps!r}")
        return rs.astype(np.int64)
    every = max(1, steps // 100) if record_every is None else _pos_int("record_every",
                                                                       record_every)
    return np.unique(np.append(np.arange(0, steps + 1, every), steps)).astype(np.int64)


# --------------------------------------------------------------------------- the simulation


@dataclass
class _Group:
    batch: int
    cfg: np.ndarray  # flat config indices
    steps: int
    rec: np.ndarray  # record steps
    lr_mult: np.ndarray  # (steps,)
    batches: np.ndarray  # (steps,) batch per step


def run(problem, *, lr, batch=1, steps=None, epochs=None, momentum=0.0, nesterov=False,
        schedule: Schedule | None = None, batch_schedule: Schedule | None = None,
        ema: float | None = None, replicas: int = 1, seed: int = 0, record_every=None,
        record_steps=None, record_epochs=None, record_stats: bool = False, init=None,
        replace: bool = False, dtype: str = "float64", backend: str | Backend | None = None,
        device=None, chunk_size: int | None = None, divergence_factor: float = 1e6,
        check_every: int = 16, progress: bool | None = None) -> Result:
    r"""Simulate SGD / heavy ball / Nesterov on ``problem`` for a grid of configurations.

    Args:
        problem: a model of :mod:`sgdtheory.problems` (anything with ``kernel``, ``dim``,
            ``theta0``, ``n_data``).
        lr: η, multiplier of the mean minibatch gradient (> 0); scalar or array.
        batch: B, examples per step (positive integers); scalar or array.
        momentum: μ ∈ [0, 1); scalar or array. lr, batch, momentum broadcast to the grid S.
        nesterov: Nesterov momentum (torch form) instead of heavy ball.
        steps: number of updates T; or ``epochs`` (finite data only): T = ⌊epochs·⌊N/B⌋⌋
            per batch size (each epoch one reshuffle, a partial last batch is dropped; the
            Result's ``epochs`` field gives the examples actually seen / N).
        schedule: lr multiplier m(f) of the step fraction f = t/T (step t uses η·m(t/T)).
        batch_schedule: batch multiplier of f (e.g. :func:`batch_increase`); needs ``steps``.
        ema: β ∈ (0, 1): also record the losses at the EMA of the iterates.
        replicas: independent runs per configuration. seed: int ≥ 0.
        record_every / record_steps: record after these numbers of updates (default ≈ 100
            records, always 0 and T). With ``epochs`` use ``record_epochs`` (default each
            epoch 0, 1, …, and the last step when ``epochs`` is fractional).
        record_stats: also record |G|², GᵀHG, tr Σ, tr HΣ (→ B_noise, B_simple, ε_max).
        init: initial parameters (p,), default ``problem.theta0``.
        replace: finite data: draw batches with replacement instead of shuffled epochs.
        dtype: "float64" or "float32" (float32: about twice as fast, ample for Monte Carlo).
        backend, device: see :func:`sgdtheory.backend.get_backend` (default $SGDTHEORY_BACKEND
            or NumPy).
        chunk_size: at most this many (replica, configuration) rows are simulated at once
            (default: what fits in ~256 MiB of state, counting one pass over a finite dataset
            per row for the losses). Each chunk of replicas draws from its own random stream,
            so the numbers depend on ``chunk_size`` (fix it to compare runs that differ in
            arguments that change the default, e.g. momentum or ``ema``).
        divergence_factor: a replica diverges when its loss is non-finite or above this times
            its initial loss (or this value itself when the initial loss is 0).
        check_every: steps between divergence checks (also checked at every record).
        progress: tqdm bar (None: only on a terminal).

    Speed: float32 and a scalar ``lr`` without momentum take a fused in-place update on the
    diagonal noisy quadratic. On a small CPU, one BLAS thread (``OPENBLAS_NUM_THREADS=1``
    or threadpoolctl) is usually fastest: the per-step products are small.

    Returns:
        :class:`Result`.

    Raises:
        ValueError: non-positive lr, non-integer or non-positive batch, batch > N without
            replacement, momentum outside [0, 1), shapes that do not broadcast, both or neither
            of steps/epochs, an unknown backend, an init of the wrong shape.
    """
    be = get_backend(backend, device)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    lr_g, b_g, mu_g, shape = _grid(lr, batch, momentum)
    replicas = _pos_int("replicas", replicas)
    seed = _pos_int("seed", seed, 0)
    check_every = _pos_int("check_every", check_every)
    if not (np.isfinite(divergence_factor) and divergence_factor > 1):
        raise ValueError(f"divergence_factor must be > 1, got {divergence_factor!r}")
    if ema is not None and not 0 < ema < 1:
        raise ValueError(f"ema must lie in (0, 1), got {ema!r}")
    n_data = getattr(problem, "n_data", None)
    p = problem.dim
    theta0 = np.asarray(problem.theta0 if init is None else init, dtype=float)
    if theta0.shape != (p,) or not np.all(np.isfinite(theta0)):
        raise ValueError(f"init must be a finite vector of shape ({p},), got {theta0.shape}")
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if epochs is not None:
        if n_data is None:
            raise ValueError("epochs needs a finite dataset (problem.n_data); use steps")
        if batch_schedule is not None:
            raise ValueError("batch_schedule needs steps, not epochs")
        if record_every is not None or record_steps is not None:
            raise ValueError("with epochs, give record_epochs (not record_every/record_steps)")
        epochs = real("epochs", epochs)
        if not epochs > 0:
            raise ValueError(f"epochs must be > 0, got {epochs!r}")
    else:
        steps = _pos_int("steps", steps, 0)
        if record_epochs is not None:
            raise ValueError("record_epochs needs epochs")

    for name, fn in (("schedule", schedule), ("batch_schedule", batch_schedule)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be a function of the training fraction f ∈ [0, 1) "
                             f"(e.g. simulate.linear_decay(0.1)), got {fn!r}")
    flat_b = b_g.ravel()
    groups = []
    for b in np.unique(flat_b):
        b = int(b)
        if n_data is not None and not replace and b > n_data:
            raise ValueError(f"batch ({b}) exceeds n_data ({n_data}) for sampling without "
                             f"replacement (use replace=True or a smaller batch)")
        if epochs is not None:
            spe = n_data // b
            t_g = int(math.floor(epochs * spe + 1e-9))
            if t_g == 0:
                raise ValueError(f"epochs={epochs} is less than one step of batch {b} on "
                                 f"{n_data} examples")
            if record_epochs is None:  # every whole epoch, and the end of a fractional one
                rec_e = np.unique(np.r_[np.arange(0, math.floor(epochs) + 1), epochs])
            else:
                rec_e = np.asarray(record_epochs, dtype=float).ravel()
            if (rec_e.size == 0 or not np.all(np.isfinite(rec_e)) or np.any(rec_e < 0)
                    or np.any(rec_e > epochs + 1e-9)):
                raise ValueError(f"record_epochs must lie in [0, epochs={epochs}]")
            rec = np.unique(np.floor(rec_e * spe + 1e-9).astype(np.int64))
            if rec.size != np.unique(rec_e).size:
                raise ValueError(f"record epochs {np.unique(rec_e).tolist()} are closer together "
                                 f"than one step of batch {b} ({spe} steps per epoch): pass "
                                 "record_epochs")
        else:
            t_g = steps
            rec = _record_plan(steps, record_every, record_steps)
        frac = np.arange(t_g) / max(t_g, 1)
        mult = np.ones(t_g) if schedule is None else np.asarray(schedule(frac), dtype=float)
        if mult.shape != (t_g,) or not np.all(np.isfinite(mult)) or np.any(mult < 0):
            raise ValueError("schedule must return finite multipliers ≥ 0, one per step")
        if batch_schedule is None:
            bs = np.full(t_g, b, dtype=np.int64)
        else:
            bm = np.asarray(batch_schedule(frac), dtype=float)
            if bm.shape != (t_g,) or not np.all(np.isfinite(bm)) or np.any(bm <= 0):
                raise ValueError("batch_schedule must return finite multipliers > 0")
            bs = np.maximum(1, np.round(b * bm)).astype(np.int64)
            if n_data is not None and not replace and bs.max() > n_data:
                raise ValueError(f"batch_schedule reaches batch {bs.max()} > n_data ({n_data})")
        groups.append(_Group(b, np.flatnonzero(flat_b == b), t_g, rec, mult, bs))

    n_rec = groups[0].rec.size
    if any(g.rec.size != n_rec for g in groups):
        raise ValueError("record plans differ between batch sizes")
    kernel = problem.kernel(be, dtype)
    has_test = bool(getattr(kernel, "has_test", False))
    n_cfg = int(np.prod(shape, dtype=np.int64))
    total = n_cfg * replicas

    def alloc():
        return be.asarray(np.full((total, n_rec), np.inf), dtype=dtype)

    rec_arrays = {"train_loss": alloc()}
    if has_test:
        rec_arrays["test_loss"] = alloc()
    if ema is not None:
        rec_arrays["ema_train_loss"] = alloc()
        if has_test:
            rec_arrays["ema_test_loss"] = alloc()
    if record_stats:
        for k in _STATS:
            rec_arrays[k] = alloc()
    diverged_at = np.full(total, -1, dtype=np.int64)

    if chunk_size is None:  # ~256 MiB of per-row state (and of per-row passes over the data)
        item = 4 if dtype == "float32" else 8
        extra = 4 + (1 if np.any(mu_g > 0) else 0) + (1 if ema is not None else 0)
        per_row = max(p, 1) * extra * item + (3 * n_data * item if n_data else 0)
        chunk_size = max(1, (256 << 20) // per_row)
    chunk_size = _pos_int("chunk_size", chunk_size)
    work = sum(g.steps * g.cfg.size for g in groups) * replicas
    bar = tqdm(total=work, disable=(None if progress is None else not progress),
               desc="simulate", unit="row-step", leave=False)
    ctx = _Ctx(be, kernel, dtype, theta0, replace, nesterov, ema, divergence_factor,
               check_every, record_stats, has_test, rec_arrays, diverged_at, replicas, bar)
    try:
        with np.errstate(all="ignore"):
            for g in groups:
                c_per = min(g.cfg.size, chunk_size)
                r_per = max(1, min(replicas, chunk_size // c_per))
                for r0 in range(0, replicas, r_per):
                    for c0 in range(0, g.cfg.size, c_per):
                        cfg = g.cfg[c0:c0 + c_per]
                        _simulate_chunk(ctx, g, cfg, lr_g.ravel()[cfg], mu_g.ravel()[cfg],
                                        r0, min(r_per, replicas - r0), seed)
    finally:
        bar.close()

    def out(name):
        if name not in rec_arrays:
            return None
        return rec_arrays[name].reshape(shape + (replicas, n_rec))

    steps_rec, examples = _step_axes(groups, shape, n_rec)
    epochs_rec = None if n_data is None else examples / float(n_data)
    dat = be.asarray(diverged_at.reshape(shape + (replicas,)), dtype="int64")
    return Result(
        train_loss=out("train_loss"), test_loss=out("test_loss"),
        ema_train_loss=out("ema_train_loss"), ema_test_loss=out("ema_test_loss"),
        steps=steps_rec, examples=examples, epochs=epochs_rec,
        diverged=dat >= 0, diverged_at=dat,
        grad_sq=out("grad_sq"), g_h_g=out("g_h_g"), tr_sigma=out("tr_sigma"),
        tr_h_sigma=out("tr_h_sigma"), lr=lr_g, batch=b_g, momentum=mu_g,
        replicas=replicas, seed=seed, backend=be.name)


def _step_axes(groups, shape, n_rec):
    """Recorded steps and examples: (K,) when equal for all configurations, else (*S, K)."""
    per = [(g, g.rec, np.concatenate([[0], np.cumsum(g.batches)])[g.rec].astype(float))
           for g in groups]

    def combine(j, dtype):
        first = per[0][j]
        if all(np.array_equal(item[j], first) for item in per):
            return first.astype(dtype)
        out = np.empty((int(np.prod(shape, dtype=np.int64)), n_rec), dtype=dtype)
        for item in per:
            out[item[0].cfg] = item[j]
        return out.reshape(shape + (n_rec,))

    return combine(1, np.int64), combine(2, float)


@dataclass
class _Ctx:
    be: Backend
    kernel: Any
    dtype: str
    theta0: np.ndarray
    replace: bool
    nesterov: bool
    ema: float | None
    factor: float
    check_every: int
    record_stats: bool
    has_test: bool
    rec: dict
    diverged_at: np.ndarray
    replicas: int
    bar: Any


def _simulate_chunk(ctx: _Ctx, g: _Group, cfg, lr_c, mu_c, r0, n_rep, seed):
    """Run one block of n_rep replicas × len(cfg) configurations of one batch size."""
    be, k = ctx.be, ctx.kernel
    n_c = cfg.size
    n = n_rep * n_c
    p = ctx.theta0.shape[0]
    # row r·n_c + c  ↔  replica r0 + r, configuration cfg[c]
    rows = (cfg[None, :] * ctx.replicas + (r0 + np.arange(n_rep))[:, None]).ravel()
    theta = be.zeros((n, p), ctx.dtype) + be.asarray(ctx.theta0, dtype=ctx.dtype)
    opt = optim.sgd(_per_row(be, lr_c, n_rep, ctx.dtype), _per_row(be, mu_c, n_rep, ctx.dtype),
                    ctx.nesterov)
    state = opt.init(theta)
    avg = be.copy(theta) if ctx.ema is not None else None
    layout = Layout(n_rep, n_c, None)
    rep_np = np.repeat(np.arange(n_rep), n_c)
    loss0 = be.to_numpy(k.loss(theta)).astype(float)
    thr = np.where(loss0 > 0, loss0 * ctx.factor, ctx.factor)
    thr_b = be.asarray(thr, dtype="float64")
    sampler = k.sampler(be.rng([seed, g.batch, r0]), n_rep, ctx.replace)
    rec_pos = {int(t): i for i, t in enumerate(g.rec)}
    plain_scalar = state.velocity is None and isinstance(state.lr, float)
    fused = getattr(sampler, "sgd_step", None) if plain_scalar else None
    for t in range(g.steps + 1):
        is_rec = t in rec_pos
        if is_rec or t % ctx.check_every == 0 or t == g.steps:
            loss = k.loss(theta)
            bad = ~be.xp.isfinite(loss) | (loss > thr_b)
            bad_np = be.to_numpy(bad).astype(bool)
            if is_rec:
                i = rec_pos[t]
                keep_idx = be.asarray(rows[~bad_np], dtype="int64")
                good = ~bad
                _write(be, ctx.rec["train_loss"], keep_idx, i, loss[good])
                if ctx.has_test:
                    _write(be, ctx.rec["test_loss"], keep_idx, i, k.test_loss(theta)[good])
                if avg is not None:
                    _write(be, ctx.rec["ema_train_loss"], keep_idx, i, k.loss(avg)[good])
                    if ctx.has_test:
                        _write(be, ctx.rec["ema_test_loss"], keep_idx, i, k.test_loss(avg)[good])
                if ctx.record_stats:
                    st = k.stats(theta)
                    for name in _STATS:
                        _write(be, ctx.rec[name], keep_idx, i, st[name][good])
            if bad_np.any():
                ctx.diverged_at[rows[bad_np]] = t
                keep = ~bad
                keep_np = ~bad_np
                rows, rep_np = rows[keep_np], rep_np[keep_np]
                theta, thr_b, state = theta[keep], thr_b[keep], state.take(keep)
                if avg is not None:
                    avg = avg[keep]
                layout = Layout(n_rep, n_c, be.asarray(rep_np, dtype="int64"))
                if rows.size == 0:
                    ctx.bar.update((g.steps - t) * n)
                    return
        if t == g.steps:
            break
        m_t = float(g.lr_mult[t])
        if fused is not None:
            if m_t != 0.0:
                fused(theta, layout, int(g.batches[t]), state.lr * m_t)
            else:
                sampler.grad(theta, layout, int(g.batches[t]))  # keep the random stream
            if avg is not None:
                optim.ema_update(avg, theta, ctx.ema)
            if t % ctx.check_every == ctx.check_every - 1:
                ctx.bar.update(ctx.check_every * n)
            continue
        grad = sampler.grad(theta, layout, int(g.batches[t]))
        theta, state = opt.update(grad, state, theta, m_t)
        if avg is not None:
            optim.ema_update(avg, theta, ctx.ema)
        if t % ctx.check_every == ctx.check_every - 1:
            ctx.bar.update(ctx.check_every * n)
    ctx.bar.update(g.steps % ctx.check_every * n)


def _per_row(be, values, n_rep, dtype):
    """A hyperparameter of the chunk's configurations: a float when they share it, else a
    column (n_rep·n_cfg, 1) in row order (replica-major)."""
    if np.all(values == values[0]):
        return float(values[0])
    return be.asarray(np.tile(values, n_rep)[:, None], dtype=dtype)


def _write(be, dst, idx, col, values):
    """dst[idx, col] = values (dst on the backend; rows not listed keep ``inf``)."""
    if values.shape[0]:
        dst[idx, col] = be.astype(values, dst.dtype)
