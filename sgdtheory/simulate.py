r"""Monte Carlo SGD: many replicas × a grid of configurations in one vectorised computation.

Units (docs/design.md §2): ``lr`` (η) multiplies the **mean** minibatch gradient
G_B = (1/B) Σ_{i∈batch} ∇ℓ_i (the base rate is η/B). The update is
:func:`sgdtheory.optim.sgd`, ``torch.optim.SGD`` with dampening 0 and v₀ = 0::

    v ← μ v + G_B,   θ ← θ − η_t v            (Nesterov: θ ← θ − η_t (G_B + μ v))

with η_t = η · schedule(t/T). The EMA of the iterates is θ̄_{t+1} = β θ̄_t + (1−β) θ_{t+1},
θ̄_0 = θ_0 (:func:`sgdtheory.optim.ema_update`; as :func:`sgdtheory.nqm.expected_loss` with
``ema_decay``).

API (a plan, then a loop)::

    plan(problem, *, lr, batch=1, steps=None, epochs=None, momentum=0.0, nesterov=False,
         schedule=None, batch_schedule=None, ema=None, replicas=1, seed=0,
         record_every=None, record_steps=None, record_epochs=None, record_stats=False,
         init=None, replace=False, dtype="float64", chunk_size=None,
         divergence_factor=1e6, check_every=16) -> Plan     # validated, frozen, inspectable
    execute(problem, plan, *, backend=None, device=None, progress=None) -> Result
    run(problem, *, backend=None, device=None, progress=None, **settings) -> Result
        # = execute(problem, plan(problem, **settings), backend=..., progress=...)

    Plan: lr, batch, momentum (grid S), groups (one BatchGroup per batch size: configs,
          steps, record_steps, lr_mult, batches), shape, n_records, work, chunks(), ...

    Result: train_loss, test_loss, ema_train_loss, ema_test_loss   (*S, replicas, n_records)
            steps, examples (n_records,) or (*S, n_records); epochs (finite data) or None
            diverged (*S, replicas) bool; diverged_at (*S, replicas) int (-1: never)
            grad_sq, g_h_g, tr_sigma, tr_h_sigma, b_noise, b_simple, eps_max (record_stats)
            lr, batch, momentum: the configuration grid (NumPy arrays of shape S)
            .to_numpy() -> Result;  .mean(name="train_loss"), .stderr(name) over replicas
            (inf where a replica diverged; survivors=True: over the finite ones, .count(name))

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
costs no more compute (diverged rows are dropped from the state arrays). Aggregates over
replicas are then defined, never NaN: :meth:`Result.mean` and :meth:`Result.stderr` are ``inf``
where a replica diverged (or, with ``survivors=True``, over the replicas still finite, with
:meth:`Result.count` of them), and B_noise, B_simple, ε_max are ``inf`` for a diverged replica.

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
from ._checks import (
    _short,
    fits_in_memory,
    flag,
    float_dtype,
    integer,
    known_keywords,
    real,
    real_array,
)
from .backend import Backend, array_module, get_backend, to_numpy
from .problems import Layout

__all__ = [
    "BatchGroup",
    "Chunk",
    "Plan",
    "Result",
    "batch_increase",
    "constant",
    "execute",
    "linear_decay",
    "piecewise_linear",
    "plan",
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
    fraction = real("fraction", fraction)
    if not 0 < fraction <= 1:
        raise ValueError(f"warmup fraction must lie in (0, 1], got {fraction!r}")
    def mult(f):
        with np.errstate(over="ignore"):  # a tiny fraction: f/w = inf, capped at 1
            return np.minimum(1.0, np.asarray(f, dtype=float) / fraction)

    return mult


def linear_decay(final: float = 0.0, warmup: float = 0.0) -> Schedule:
    """Linear warmup to 1 over the first ``warmup`` fraction, then linear decay to ``final``.

    >>> linear_decay(0.0)(np.array([0.0, 0.5, 1.0]))
    array([1. , 0.5, 0. ])
    >>> linear_decay(0.0, warmup=0.5)(np.array([0.25, 0.5, 0.75]))
    array([0.5, 1. , 0.5])
    """
    warmup, final = real("warmup", warmup), real("final", final)
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup must lie in [0, 1), got {warmup!r}")
    if not final >= 0:
        raise ValueError(f"final must be ≥ 0, got {final!r}")
    if warmup == 0:
        return piecewise_linear([0.0, 1.0], [1.0, final])
    return piecewise_linear([0.0, warmup, 1.0], [0.0, 1.0, final])


def piecewise_linear(points, values) -> Schedule:
    """Linear interpolation through (points[k], values[k]) (fractions in [0, 1], increasing).

    >>> piecewise_linear([0, 0.5, 1], [1, 1, 0.1])(np.array([0.25, 0.75]))
    array([1.  , 0.55])
    """
    x = real_array("points", points)
    y = real_array("values", values)
    if x.ndim != 1 or x.size < 1:
        raise ValueError(f"points must be a non-empty 1-D sequence, got shape {x.shape}")
    if x.shape != y.shape:
        raise ValueError(f"values must match points, one per point: got shapes {y.shape} and "
                         f"{x.shape}")
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
    b = np.sort(real_array("boundaries", boundaries).ravel())
    if not np.all(np.isfinite(b)):
        raise ValueError(f"boundaries must be finite fractions, got {_short(boundaries)}")
    factor = real("factor", factor)
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor!r}")

    def mult(f):
        with np.errstate(over="ignore", under="ignore"):  # beyond float64: inf (refused) or 0
            return factor ** np.searchsorted(b, np.asarray(f, dtype=float), side="right")

    return mult


def batch_increase(schedule: Schedule, max_factor: float | None = None) -> Schedule:
    """Batch-size multiplier 1/schedule(f): increase the batch instead of decaying the rate.

    Smith et al. (2018): where ``schedule`` would divide the learning rate by k, multiply the
    batch by k (capped at ``max_factor`` ≥ 1). Use as ``run(..., batch_schedule=...)``; the
    batch of step t is max(1, round(B · multiplier)).

    >>> batch_increase(step_decay([0.5], 0.2))(np.array([0.0, 0.6]))
    array([1., 5.])
    """
    if not callable(schedule):
        _schedule_arg("schedule", schedule if schedule is not None else "None")
    if max_factor is not None:
        max_factor = real("max_factor", max_factor)
        if not max_factor >= 1:
            raise ValueError(f"max_factor must be ≥ 1 (a cap on the batch multiplier), got "
                             f"{max_factor!r}")

    def mult(f):
        s = real_array("schedule", schedule(f))
        if np.any(~(s > 0)):
            raise ValueError("batch_increase needs a schedule that stays > 0")
        with np.errstate(over="ignore"):
            m = 1.0 / s
        return m if max_factor is None else np.minimum(m, max_factor)

    return mult


def _schedule_arg(name, fn):
    if fn is not None and not callable(fn):
        raise ValueError(f"{name} must be a function of the training fraction f ∈ [0, 1) "
                         f"(e.g. simulate.linear_decay(0.1)), got {_short(fn)}")
    return fn


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
        """B_noise = tr(HΣ)/GᵀHG per record (record_stats), else None; ``inf`` where GᵀHG ≤ 0
        or the replica had diverged (no statistics after divergence)."""
        return None if self.g_h_g is None else _ratio(self.tr_h_sigma, self.g_h_g)

    @property
    def b_simple(self):
        """B_simple = tr Σ/|G|² per record (record_stats), else None; ``inf`` where |G|² = 0
        or the replica had diverged."""
        return None if self.grad_sq is None else _ratio(self.tr_sigma, self.grad_sq)

    @property
    def eps_max(self):
        """ε_max = |G|²/GᵀHG per record (record_stats), else None; ``inf`` where GᵀHG ≤ 0 or
        the replica had diverged."""
        return None if self.grad_sq is None else _ratio(self.grad_sq, self.g_h_g)

    def to_numpy(self) -> Result:
        """A copy with every array converted to NumPy."""
        conv = {f.name: (to_numpy(getattr(self, f.name))
                         if hasattr(getattr(self, f.name), "shape") else getattr(self, f.name))
                for f in fields(self)}
        return dc_replace(self, **conv)

    def count(self, name: str = "train_loss") -> np.ndarray:
        """Replicas with a finite value of ``name`` at each record (those that had not
        diverged), NumPy int (*S, K)."""
        return np.isfinite(self._values(name)).sum(-2)

    def mean(self, name: str = "train_loss", *, survivors: bool = False) -> np.ndarray:
        """Mean over replicas of a recorded quantity, NumPy (*S, K).

        A diverged replica records ``inf`` from its divergence on, so the mean over all
        replicas is ``inf`` there: the configuration diverged (``diverged`` says which
        replicas). With ``survivors=True`` it is the mean over the replicas still finite at
        that record (:meth:`count` of them), ``inf`` where none is.
        """
        x, fin, n = self._finite(name, flag("survivors", survivors))
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            m = np.where(fin, x, 0.0).sum(-2) / n
        return np.where(n > 0, m, np.inf)

    def stderr(self, name: str = "train_loss", *, survivors: bool = False) -> np.ndarray:
        """Standard error of :meth:`mean` (std with ddof=1 over √n), NumPy (*S, K).

        Over all R replicas (R ≥ 2): ``inf`` where the mean is ``inf`` (a replica diverged).
        With ``survivors=True``: over the n = :meth:`count` replicas still finite, ``inf``
        where n < 2. Never NaN.
        """
        survivors = flag("survivors", survivors)
        x, fin, n = self._finite(name, survivors)
        if x.shape[-2] < 2:
            raise ValueError(f"stderr needs at least 2 replicas, this run has {x.shape[-2]}")
        m = self.mean(name, survivors=survivors)
        ok = (n >= 2) & np.isfinite(m)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            d = np.where(fin & ok[..., None, :], x - np.where(ok, m, 0.0)[..., None, :], 0.0)
            se = np.sqrt((d * d).sum(-2) / (n - 1)) / np.sqrt(n)
        return np.where(ok, se, np.inf)

    def _values(self, name) -> np.ndarray:
        if not isinstance(name, str) or name not in _RECORDS:
            raise ValueError(f"name must be one of {', '.join(_RECORDS)}, got {_short(name)}")
        val = getattr(self, name)
        if val is None:
            raise ValueError(f"{name} was not recorded in this run")
        return np.asarray(to_numpy(val), dtype=float)

    def _finite(self, name, survivors: bool):
        """(values, mask of the replicas counted, their number per record)."""
        x = self._values(name)
        fin = np.isfinite(x)
        if not survivors:  # all replicas, or none where one is not finite (inf mean)
            fin = np.broadcast_to(fin.all(-2, keepdims=True), x.shape)
            return x, fin, np.where(fin[..., 0, :], x.shape[-2], 0)
        return x, fin, fin.sum(-2)


def _ratio(num, den):
    """num/den per record of (backend) arrays: ``inf`` where den ≤ 0 or either is not finite
    (a diverged replica records inf in both)."""
    xp = array_module(num)
    ok = (den > 0) & xp.isfinite(num) & xp.isfinite(den)
    with np.errstate(over="ignore", under="ignore"):
        return xp.where(ok, num / xp.where(ok, den, 1.0), np.inf)


# --------------------------------------------------------------------------- the plan


def _read_only(*arrays) -> None:
    for a in arrays:
        a.flags.writeable = False


@dataclass(frozen=True)
class BatchGroup:
    """The configurations of one batch size and their step-by-step plan.

    Attributes:
        batch: B, the batch size of these configurations (examples per step).
        configs: flat indices of the configurations in the grid S (C,).
        steps: T, updates for this batch (with ``epochs``, T depends on B).
        record_steps: the steps (updates done) at which losses are recorded (K,).
        lr_mult: the schedule's rate multiplier m(t/T) of each step (T,).
        batches: the batch of each step (T,): B, or B·``batch_schedule`` rounded.
    """

    batch: int
    configs: np.ndarray
    steps: int
    record_steps: np.ndarray
    lr_mult: np.ndarray
    batches: np.ndarray

    def __post_init__(self):
        _read_only(self.configs, self.record_steps, self.lr_mult, self.batches)

    @property
    def record_examples(self) -> np.ndarray:
        """Examples processed at the record steps (Σ of the batch sizes so far), float (K,)."""
        return np.concatenate([[0], np.cumsum(self.batches)])[self.record_steps].astype(float)


@dataclass(frozen=True)
class Chunk:
    """A block of rows simulated at once: replicas r0 … r0+n_rep−1 × ``configs`` of ``group``."""

    group: BatchGroup
    configs: np.ndarray
    r0: int
    n_rep: int


@dataclass(frozen=True)
class Plan:
    r"""Everything :func:`run` decides before the first step: built and validated once by
    :func:`plan`, inspectable, and reusable (run it on several backends, or on datasets of the
    same shape, with :func:`execute`).

    Attributes:
        lr, batch, momentum: the configuration grid, NumPy arrays of shape S (lr in mean-gradient
            units, batch in examples, μ heavy-ball momentum).
        nesterov: Nesterov instead of heavy-ball momentum.
        groups: one :class:`BatchGroup` per distinct batch size (the configurations of one
            batch share their random draws: common random numbers across a grid of rates).
        theta0: initial parameters (p,). n_data: N (None for online data).
        replicas, seed, replace, dtype, ema, record_stats: as given to :func:`plan`.
        chunk_size: at most this many (replica, configuration) rows at once.
        divergence_factor, check_every: the divergence rule (module docstring).

    >>> from sgdtheory.problems import NoisyQuadratic
    >>> p = plan(NoisyQuadratic([1.0], [1.0]), lr=[0.1, 0.2], batch=[[1], [4]], steps=10,
    ...          record_every=5, replicas=3)
    >>> p.shape, p.n_records, [g.batch for g in p.groups], p.work
    ((2, 2), 3, [1, 4], 120)
    """

    lr: np.ndarray
    batch: np.ndarray
    momentum: np.ndarray
    nesterov: bool
    groups: tuple
    theta0: np.ndarray
    n_data: int | None
    replicas: int
    seed: int
    replace: bool
    dtype: str
    ema: float | None
    record_stats: bool
    chunk_size: int
    divergence_factor: float
    check_every: int

    def __post_init__(self):
        _read_only(self.lr, self.batch, self.momentum, self.theta0)

    @property
    def shape(self) -> tuple:
        """S, the broadcast shape of lr, batch and momentum."""
        return self.lr.shape

    @property
    def n_configs(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def n_records(self) -> int:
        return self.groups[0].record_steps.size

    @property
    def work(self) -> int:
        """Row-steps to simulate: Σ over batch groups of steps × configurations × replicas."""
        return sum(g.steps * g.configs.size for g in self.groups) * self.replicas

    @property
    def uses_momentum(self) -> bool:
        return bool(np.any(self.momentum > 0))

    def record_axis(self, values: str = "steps") -> np.ndarray:
        """Recorded ``"steps"`` (int) or ``"examples"`` (float): (K,) when every configuration
        shares them, else (*S, K)."""
        if not isinstance(values, str) or values not in ("steps", "examples"):
            raise ValueError(f"values must be 'steps' or 'examples', got {_short(values)}")
        per = [g.record_steps if values == "steps" else g.record_examples for g in self.groups]
        dtype = np.int64 if values == "steps" else float
        if all(np.array_equal(x, per[0]) for x in per):
            return per[0].astype(dtype)
        out = np.empty((self.n_configs, self.n_records), dtype=dtype)
        for g, x in zip(self.groups, per, strict=True):
            out[g.configs] = x
        return out.reshape(self.shape + (self.n_records,))

    def chunks(self):
        """The :class:`Chunk` s in simulation order: per batch group, blocks of replicas ×
        configurations with at most ``chunk_size`` rows (each its own random stream)."""
        for g in self.groups:
            c_per = min(g.configs.size, self.chunk_size)
            r_per = max(1, min(self.replicas, self.chunk_size // c_per))
            for r0 in range(0, self.replicas, r_per):
                for c0 in range(0, g.configs.size, c_per):
                    yield Chunk(g, g.configs[c0:c0 + c_per], r0, min(r_per, self.replicas - r0))


def plan(problem, *, lr, batch=1, steps=None, epochs=None, momentum=0.0, nesterov=False,
         schedule: Schedule | None = None, batch_schedule: Schedule | None = None,
         ema: float | None = None, replicas: int = 1, seed: int = 0, record_every=None,
         record_steps=None, record_epochs=None, record_stats: bool = False, init=None,
         replace: bool = False, dtype: str = "float64", chunk_size: int | None = None,
         divergence_factor: float = 1e6, check_every: int = 16) -> Plan:
    r"""Validate the settings of a simulation and plan it (a :class:`Plan`).

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
        chunk_size: at most this many (replica, configuration) rows are simulated at once
            (default: what fits in ~256 MiB of state, counting one pass over a finite dataset
            per row for the losses). Each chunk of replicas draws from its own random stream,
            so the numbers depend on ``chunk_size`` (fix it to compare runs that differ in
            arguments that change the default, e.g. momentum or ``ema``).
        divergence_factor: a replica diverges when its loss is non-finite or above this times
            its initial loss (or this value itself when the initial loss is 0).
        check_every: steps between divergence checks (also checked at every record).

    Raises:
        ValueError: a bad setting, named (e.g. batch > N without replacement, momentum ∉ [0, 1),
            shapes that do not broadcast, both or neither of steps/epochs).
    """
    _problem_arg(problem)
    dtype = float_dtype("dtype", dtype)
    lr_g, b_g, mu_g = _grid(lr, batch, momentum)
    nesterov, replace = flag("nesterov", nesterov), flag("replace", replace)
    record_stats = flag("record_stats", record_stats)
    replicas = integer("replicas", replicas)
    seed = integer("seed", seed, 0)
    check_every = integer("check_every", check_every)
    divergence_factor = real("divergence_factor", divergence_factor)
    if not divergence_factor > 1:
        raise ValueError(f"divergence_factor must be > 1, got {divergence_factor!r}")
    if ema is not None:
        ema = real("ema", ema)
        if not 0 < ema < 1:
            raise ValueError(f"ema must lie in (0, 1), got {ema!r}")
    n_data = getattr(problem, "n_data", None)
    theta0 = _initial_point(problem, init)
    steps, epochs = _duration(steps, epochs, n_data, batch_schedule, record_every, record_steps,
                              record_epochs)
    _schedule_arg("schedule", schedule)
    _schedule_arg("batch_schedule", batch_schedule)
    groups = []
    for b in np.unique(b_g):
        b = int(b)
        if n_data is not None and not replace and b > n_data:
            raise ValueError(f"batch ({b}) exceeds n_data ({n_data}) for sampling without "
                             f"replacement (use replace=True or a smaller batch)")
        if epochs is not None:
            t_g, rec = _epoch_records(b, n_data, epochs, record_epochs)
        else:
            t_g, rec = steps, _record_steps(steps, record_every, record_steps)
        frac = np.arange(t_g) / max(t_g, 1)
        groups.append(BatchGroup(b, np.flatnonzero(b_g.ravel() == b), t_g, rec,
                                 _multipliers(schedule, frac),
                                 _step_batches(batch_schedule, frac, b, n_data, replace)))
    if any(g.record_steps.size != groups[0].record_steps.size for g in groups):
        raise ValueError("record plans differ between batch sizes")
    auto_chunk = _default_chunk_size(theta0.size, n_data, dtype, np.any(mu_g > 0), ema)
    chunk_size = auto_chunk if chunk_size is None else integer("chunk_size", chunk_size)
    out = Plan(lr_g, b_g, mu_g, nesterov, tuple(groups), theta0, n_data, replicas, seed,
               replace, dtype, ema, record_stats, chunk_size, divergence_factor, check_every)
    _check_memory(out, auto_chunk)
    return out


#: the settings :func:`plan` takes (and :func:`run` forwards), for run's keyword check
_PLAN_SETTINGS = ("lr", "batch", "steps", "epochs", "momentum", "nesterov", "schedule",
                  "batch_schedule", "ema", "replicas", "seed", "record_every", "record_steps",
                  "record_epochs", "record_stats", "init", "replace", "dtype", "chunk_size",
                  "divergence_factor", "check_every")

#: most steps one run may plan (its per-step rates and batches take 16 bytes a step)
MAX_STEPS = 2**26


def _problem_arg(problem) -> None:
    missing = [a for a in ("kernel", "dim", "theta0") if not hasattr(problem, a)]
    if missing:
        raise ValueError(f"problem must be a model of sgdtheory.problems (with kernel, dim and "
                         f"theta0), got {_short(problem)}")


def _check_memory(plan: Plan, auto_chunk: int) -> None:
    """Refuse, before any work, a plan whose records or one chunk's state would not fit in
    half of this machine's memory, with the estimate."""
    rows = plan.n_configs * plan.replicas
    n_rec = 1 + 1 + 2 * (plan.ema is not None) + 4 * plan.record_stats  # ≤ train, test, …
    fits_in_memory("replicas", rows * plan.n_records * n_rec * 8,
                   "use fewer replicas, configurations (lr, batch, momentum) or records")
    per_row = (256 << 20) / auto_chunk
    fits_in_memory("chunk_size", min(plan.chunk_size, rows) * per_row,
                   "use a smaller chunk_size")


def _grid(lr, batch, momentum):
    """lr, batch (int64) and momentum checked and broadcast to one shape S (NumPy copies)."""
    lr_a = real_array("lr", lr)
    b_a = real_array("batch", batch)
    mu_a = real_array("momentum", momentum)
    for name, a in (("lr", lr_a), ("batch", b_a), ("momentum", mu_a)):
        if a.size == 0:
            raise ValueError(f"{name} must not be empty")
    if not np.all(np.isfinite(lr_a)) or np.any(lr_a <= 0):
        raise ValueError(f"lr must be finite and > 0, got {_short(lr)}")
    if (not np.all(np.isfinite(b_a)) or np.any(b_a < 1) or np.any(b_a > 2**53)
            or np.any(b_a != np.round(b_a))):
        raise ValueError(f"batch must hold positive integers (≤ 2**53), got {_short(batch)}")
    if not np.all(np.isfinite(mu_a)) or np.any(mu_a < 0) or np.any(mu_a >= 1):
        raise ValueError(f"momentum must lie in [0, 1), got {_short(momentum)}")
    try:
        shape = np.broadcast_shapes(lr_a.shape, b_a.shape, mu_a.shape)
    except ValueError as exc:
        raise ValueError(f"lr {lr_a.shape}, batch {b_a.shape} and momentum {mu_a.shape} "
                         f"do not broadcast together") from exc
    return (np.broadcast_to(lr_a, shape).copy(), np.broadcast_to(b_a, shape).astype(np.int64),
            np.broadcast_to(mu_a, shape).copy())


def _initial_point(problem, init) -> np.ndarray:
    p = problem.dim
    theta0 = real_array("init", problem.theta0 if init is None else init)  # a copy
    if theta0.shape != (p,) or not np.all(np.isfinite(theta0)):
        raise ValueError(f"init must be a finite vector of shape ({p},), got "
                         f"{_short(init) if init is not None else theta0.shape}")
    return theta0


def _duration(steps, epochs, n_data, batch_schedule, record_every, record_steps,
              record_epochs):
    """(steps, epochs), exactly one of them given and consistent with the record settings."""
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if epochs is None:
        steps = integer("steps", steps, 0, MAX_STEPS)
        if record_epochs is not None:
            raise ValueError("record_epochs needs epochs")
        return steps, None
    if n_data is None:
        raise ValueError("epochs needs a finite dataset (problem.n_data); use steps")
    if batch_schedule is not None:
        raise ValueError("batch_schedule needs steps, not epochs")
    if record_every is not None or record_steps is not None:
        raise ValueError("with epochs, give record_epochs (not record_every/record_steps)")
    epochs = real("epochs", epochs)
    if not 0 < epochs <= MAX_STEPS:
        raise ValueError(f"epochs must be > 0 (and ≤ {MAX_STEPS}), got {epochs!r}")
    return None, epochs


def _record_steps(steps, record_every, record_steps) -> np.ndarray:
    if record_steps is not None and record_every is not None:
        raise ValueError("give record_steps or record_every, not both")
    if record_steps is not None:
        rs = np.unique(real_array("record_steps", record_steps).ravel())
        if rs.size == 0 or np.any(rs != np.round(rs)) or rs[0] < 0 or rs[-1] > steps:
            raise ValueError(f"record_steps must be integers in [0, steps={steps}], "
                             f"got {_short(record_steps)}")
        return rs.astype(np.int64)
    every = (max(1, steps // 100) if record_every is None
             else integer("record_every", record_every))
    return np.unique(np.append(np.arange(0, steps + 1, min(every, steps + 1)), steps)).astype(
        np.int64)


def _epoch_records(b, n_data, epochs, record_epochs):
    """(T, record steps) of batch ``b`` for a run of ``epochs`` over N examples."""
    spe = n_data // b
    t_g = int(math.floor(epochs * spe + 1e-9))
    if t_g == 0:
        raise ValueError(f"epochs={epochs} is less than one step of batch {b} on "
                         f"{n_data} examples")
    if t_g > MAX_STEPS:
        raise ValueError(f"epochs={epochs} is {t_g} steps of batch {b}, more than the "
                         f"{MAX_STEPS} one run may plan")
    if record_epochs is None:  # every whole epoch, and the end of a fractional one
        rec_e = np.unique(np.r_[np.arange(0, math.floor(epochs) + 1), epochs])
    else:
        rec_e = real_array("record_epochs", record_epochs).ravel()
    if (rec_e.size == 0 or not np.all(np.isfinite(rec_e)) or np.any(rec_e < 0)
            or np.any(rec_e > epochs + 1e-9)):
        raise ValueError(f"record_epochs must lie in [0, epochs={epochs}]")
    rec = np.unique(np.floor(rec_e * spe + 1e-9).astype(np.int64))
    if rec.size != np.unique(rec_e).size:
        raise ValueError(f"record epochs {np.unique(rec_e).tolist()} are closer together "
                         f"than one step of batch {b} ({spe} steps per epoch): pass "
                         "record_epochs")
    return t_g, rec


def _call_schedule(name, fn, frac) -> np.ndarray:
    """``fn(frac)`` as real numbers, one per step (ValueError naming ``name`` otherwise)."""
    try:
        out = fn(frac)
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise ValueError(f"{name}(f) failed on the step fractions: {exc}") from exc
    out = real_array(name, out)
    if out.shape != frac.shape:
        raise ValueError(f"{name} must return one multiplier per step fraction, shape "
                         f"{frac.shape}, got {out.shape}")
    return out


def _multipliers(schedule, frac) -> np.ndarray:
    mult = np.ones(frac.size) if schedule is None else _call_schedule("schedule", schedule, frac)
    if not np.all(np.isfinite(mult)) or np.any(mult < 0):
        raise ValueError("schedule must return finite multipliers ≥ 0, one per step")
    return mult


def _step_batches(batch_schedule, frac, b, n_data, replace) -> np.ndarray:
    if batch_schedule is None:
        return np.full(frac.size, b, dtype=np.int64)
    bm = _call_schedule("batch_schedule", batch_schedule, frac)
    if not np.all(np.isfinite(bm)) or np.any(bm <= 0) or np.any(b * bm > 2**53):
        raise ValueError("batch_schedule must return finite multipliers > 0 (batches ≤ 2**53)")
    bs = np.maximum(1, np.round(b * bm)).astype(np.int64)
    if n_data is not None and not replace and bs.max() > n_data:
        raise ValueError(f"batch_schedule reaches batch {bs.max()} > n_data ({n_data})")
    return bs


def _default_chunk_size(p, n_data, dtype, momentum, ema) -> int:
    """Rows in ~256 MiB of per-row state (and of per-row passes over a finite dataset)."""
    item = 4 if dtype == "float32" else 8
    extra = 4 + (1 if momentum else 0) + (1 if ema is not None else 0)
    per_row = max(p, 1) * extra * item + (3 * n_data * item if n_data else 0)
    return max(1, (256 << 20) // per_row)


# --------------------------------------------------------------------------- the loop


def run(problem, *, backend: str | Backend | None = None, device=None,
        progress: bool | None = None, **settings) -> Result:
    r"""Simulate SGD / heavy ball / Nesterov on ``problem`` for a grid of configurations.

    ``run(problem, **settings)`` is ``execute(problem, plan(problem, **settings))``: the
    settings (lr, batch, steps or epochs, momentum, nesterov, schedule, batch_schedule, ema,
    replicas, seed, record_*, init, replace, dtype, chunk_size, divergence_factor,
    check_every) are those of :func:`plan`, where they are documented and checked.

    Args:
        problem: a model of :mod:`sgdtheory.problems`.
        backend, device: see :func:`sgdtheory.backend.get_backend` (default $SGDTHEORY_BACKEND
            or NumPy).
        progress: tqdm bar (None: only on a terminal).

    Speed: float32 and a scalar ``lr`` without momentum take a fused in-place update on the
    diagonal noisy quadratic. On a small CPU, one BLAS thread (``OPENBLAS_NUM_THREADS=1``
    or threadpoolctl) is usually fastest: the per-step products are small.

    Returns:
        :class:`Result`.

    Raises:
        ValueError: an unknown backend, an unknown (e.g. misspelt) setting, naming it and
            listing the known ones, or a bad setting (see :func:`plan`).
    """
    known_keywords("run", settings, _PLAN_SETTINGS)
    be = get_backend(backend, device)
    return execute(problem, plan(problem, **settings), backend=be, progress=progress)


def _progress_arg(progress):
    return None if progress is None else flag("progress", progress)


def execute(problem, plan: Plan, *, backend: str | Backend | None = None, device=None,
            progress: bool | None = None) -> Result:
    """Run a :class:`Plan` on ``problem`` (the problem it was planned for, or one of the same
    dimension and dataset size) on ``backend``; returns the :class:`Result`."""
    _problem_arg(problem)
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a Plan (from simulate.plan), got {_short(plan)}")
    progress = _progress_arg(progress)
    be = get_backend(backend, device)
    if plan.theta0.shape != (problem.dim,) or getattr(problem, "n_data", None) != plan.n_data:
        raise ValueError(f"plan is for dim={plan.theta0.size}, n_data={plan.n_data}; problem "
                         f"has dim={problem.dim}, n_data={getattr(problem, 'n_data', None)}")
    kernel = problem.kernel(be, plan.dtype)
    has_test = bool(getattr(kernel, "has_test", False))
    names = ["train_loss"] + (["test_loss"] if has_test else [])
    if plan.ema is not None:
        names += ["ema_train_loss"] + (["ema_test_loss"] if has_test else [])
    names += list(_STATS) if plan.record_stats else []
    rows = plan.n_configs * plan.replicas
    records = {k: be.asarray(np.full((rows, plan.n_records), np.inf), dtype=plan.dtype)
               for k in names}
    diverged_at = np.full(rows, -1, dtype=np.int64)
    bar = tqdm(total=plan.work, disable=(None if progress is None else not progress),
               desc="simulate", unit="row-step", leave=False)
    try:
        with np.errstate(all="ignore"):
            for chunk in plan.chunks():
                _Rows(plan, chunk, be, kernel, has_test).simulate(records, diverged_at, bar)
    finally:
        bar.close()
    return _result(plan, be, records, diverged_at)


def _result(plan: Plan, be: Backend, records: dict, diverged_at: np.ndarray) -> Result:
    def out(name):
        if name not in records:
            return None
        return records[name].reshape(plan.shape + (plan.replicas, plan.n_records))

    examples = plan.record_axis("examples")
    dat = be.asarray(diverged_at.reshape(plan.shape + (plan.replicas,)), dtype="int64")
    return Result(
        train_loss=out("train_loss"), test_loss=out("test_loss"),
        ema_train_loss=out("ema_train_loss"), ema_test_loss=out("ema_test_loss"),
        steps=plan.record_axis("steps"), examples=examples,
        epochs=None if plan.n_data is None else examples / float(plan.n_data),
        diverged=dat >= 0, diverged_at=dat,
        grad_sq=out("grad_sq"), g_h_g=out("g_h_g"), tr_sigma=out("tr_sigma"),
        tr_h_sigma=out("tr_h_sigma"), lr=plan.lr.copy(), batch=plan.batch.copy(),
        momentum=plan.momentum.copy(), replicas=plan.replicas, seed=plan.seed, backend=be.name)


class _Rows:
    """The state of one :class:`Chunk`: rows r·C + c ↔ replica r0 + r, configuration c.

    Holds θ (n, p), the optimiser state (per-row lr and μ, velocity), the EMA iterate, the
    divergence thresholds and which replica each row belongs to; rows that diverge are dropped
    from all of them at once.
    """

    def __init__(self, plan: Plan, chunk: Chunk, be: Backend, kernel, has_test: bool):
        self.plan, self.group, self.be, self.kernel, self.has_test = (plan, chunk.group, be,
                                                                      kernel, has_test)
        n_rep, cfg, dtype = chunk.n_rep, chunk.configs, plan.dtype
        self.n = n_rep * cfg.size
        replica = chunk.r0 + np.arange(n_rep)
        self.rows = (cfg[None, :] * plan.replicas + replica[:, None]).ravel()
        self.rep = np.repeat(np.arange(n_rep), cfg.size)
        self.layout = Layout(n_rep, cfg.size, None)
        self.theta = (be.zeros((self.n, plan.theta0.size), dtype)
                      + be.asarray(plan.theta0, dtype))
        self.opt = optim.sgd(_per_row(be, plan.lr.ravel()[cfg], n_rep, dtype),
                             _per_row(be, plan.momentum.ravel()[cfg], n_rep, dtype),
                             plan.nesterov)
        self.state = self.opt.init(self.theta)
        self.avg = be.copy(self.theta) if plan.ema is not None else None
        loss0 = be.to_numpy(kernel.loss(self.theta)).astype(float)
        factor = plan.divergence_factor
        self.threshold = be.asarray(np.where(loss0 > 0, loss0 * factor, factor), "float64")
        self.sampler = kernel.sampler(be.rng([plan.seed, self.group.batch, chunk.r0]), n_rep,
                                      plan.replace)
        plain = self.state.velocity is None and isinstance(self.state.lr, float)
        self.fused = getattr(self.sampler, "sgd_step", None) if plain else None

    def simulate(self, records: dict, diverged_at: np.ndarray, bar) -> None:
        """Run the chunk's steps: update, check divergence (every ``check_every`` steps, at
        every record and at the end), record. The hot loop of the simulator."""
        g, every = self.group, self.plan.check_every
        rec_pos = {int(t): i for i, t in enumerate(g.record_steps)}
        n0, step = self.n, self._step
        lr_mult, batches = g.lr_mult.tolist(), g.batches.tolist()  # Python floats and ints
        for t in range(g.steps + 1):
            if t in rec_pos or t % every == 0 or t == g.steps:
                bad = self._check(t, rec_pos.get(t), records, diverged_at)
                if bad is not None and self.rows.size == 0:
                    bar.update((g.steps - t) * n0)
                    return
            if t == g.steps:
                break
            step(lr_mult[t], batches[t])
            if t % every == every - 1:
                bar.update(every * n0)
        bar.update(g.steps % every * n0)

    def _step(self, m_t: float, batch: int) -> None:
        """One update with the rate multiplier m_t and a batch of ``batch`` examples."""
        if self.fused is not None:
            if m_t != 0.0:
                self.fused(self.theta, self.layout, batch, self.state.lr * m_t)
            else:
                self.sampler.grad(self.theta, self.layout, batch)  # keep the random stream
        else:
            grad = self.sampler.grad(self.theta, self.layout, batch)
            # validated once by the plan; the loop runs under np.errstate (see execute)
            self.theta, self.state = self.opt.step(grad, self.state, self.theta, m_t)
        if self.avg is not None:
            optim.ema_update(self.avg, self.theta, self.plan.ema)

    def _check(self, t: int, record: int | None, records: dict, diverged_at: np.ndarray):
        """Divergence check at step t (and the record ``record``, if any); drops diverged rows.

        Returns the NumPy mask of rows that diverged now, or None when none did."""
        be, k = self.be, self.kernel
        loss = k.loss(self.theta)
        bad = ~be.xp.isfinite(loss) | (loss > self.threshold)
        bad_np = be.to_numpy(bad).astype(bool)
        if record is not None:
            good = ~bad
            keep_idx = be.asarray(self.rows[~bad_np], dtype="int64")

            def write(name, values):
                values = values[good]
                if values.shape[0]:  # rows not listed keep ``inf``
                    records[name][keep_idx, record] = be.astype(values, records[name].dtype)

            write("train_loss", loss)
            if self.has_test:
                write("test_loss", k.test_loss(self.theta))
            if self.avg is not None:
                write("ema_train_loss", k.loss(self.avg))
                if self.has_test:
                    write("ema_test_loss", k.test_loss(self.avg))
            if self.plan.record_stats:
                st = k.stats(self.theta)
                for name in _STATS:
                    write(name, st[name])
        if not bad_np.any():
            return None
        diverged_at[self.rows[bad_np]] = t
        keep, keep_np = ~bad, ~bad_np
        self.rows, self.rep = self.rows[keep_np], self.rep[keep_np]
        self.theta, self.threshold = self.theta[keep], self.threshold[keep]
        self.state = self.state.take(keep)
        if self.avg is not None:
            self.avg = self.avg[keep]
        self.layout = Layout(self.layout.n_rep, self.layout.n_cfg,
                             be.asarray(self.rep, dtype="int64"))
        return bad_np


def _per_row(be, values, n_rep, dtype):
    """A hyperparameter of the chunk's configurations: a float when they share it, else a
    column (n_rep·n_cfg, 1) in row order (replica-major)."""
    if np.all(values == values[0]):
        return float(values[0])
    return be.asarray(np.tile(values, n_rep)[:, None], dtype=dtype)
