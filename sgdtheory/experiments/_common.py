"""Shared pieces of the experiments: the check record and small helpers.

Every experiment module ``sgdtheory.experiments.<name>`` defines

* ``NAME`` (str) and ``TITLE`` (one line, shown by ``--list``);
* ``Config``: a frozen dataclass of the experiment's parameters (units in comments);
* ``PRESETS``: ``{"quick": Config(...), "default": Config(...), "paper": Config(...)}``;
* ``compute(config, backend, seed) -> dict``: runs theory and simulation and returns plain data
  (NumPy arrays, floats, lists) including ``"checks": [Check, ...]``;
* ``plot(data) -> matplotlib.figure.Figure``: draws theory as lines and simulation as points
  with error bars, from ``data`` alone (so a figure can be redrawn from the saved data).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import asdict, dataclass

import numpy as np

from sgdtheory._checks import _short, fits_in_memory, flag, integer, real, real_array

__all__ = ["Check", "ConfigChecks", "check_run", "factor_check", "minibatch_grads",
           "relative_check"]


@dataclass(frozen=True)
class Check:
    """One quantitative comparison of theory and simulation.

    ``passed`` is decided by the experiment (most checks: ``rel_error <= tolerance``; some are
    qualitative, e.g. "the best factor falls as N grows", and then ``predicted``/``measured``
    hold the compared numbers and ``note`` says what was tested).
    """

    name: str
    predicted: float
    measured: float
    tolerance: float
    passed: bool
    note: str = ""
    #: how ``tolerance`` is applied: "relative" (|measured − predicted| ≤ tolerance·|predicted|),
    #: "factor" (measured/predicted within [1/tolerance, tolerance]) or "custom" (a bound or
    #: a qualitative test, described in ``note``; ``rel_error`` is then only informative)
    rule: str = "custom"

    def __post_init__(self):
        """Plain Python values; no NaN (a quantity that could not be measured is ``inf`` with
        the reason in ``note``, and the check fails)."""
        for name in ("name", "note"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {_short(getattr(self, name))}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {_short(self.rule)}")
        for name in ("predicted", "measured", "tolerance"):
            object.__setattr__(self, name, _number(name, getattr(self, name)))
        object.__setattr__(self, "passed", flag("passed", self.passed))

    @property
    def rel_error(self) -> float:
        """|measured - predicted| / |predicted| (inf when predicted is 0 and measured is not,
        or when either is infinite, unless both are the same infinity: 0)."""
        if self.measured == self.predicted:
            return 0.0
        if self.predicted == 0 or not (math.isfinite(self.predicted)
                                       and math.isfinite(self.measured)):
            return math.inf
        with np.errstate(over="ignore"):
            return float(np.float64(abs(self.measured - self.predicted)) / abs(self.predicted))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rel_error"] = self.rel_error
        d["passed"] = bool(self.passed)
        return d


#: the ways a check's tolerance is applied (see :attr:`Check.rule`)
RULES = ("relative", "factor", "custom")


def _number(name: str, value) -> float:
    """A real number as a float: ±inf allowed (e.g. a diverged measurement), NaN refused."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {_short(value)}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name} is too large for a float64, got {_short(value)}") from None
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN: record a quantity that could not be measured "
                         "as inf, with the reason in the note, and fail the check")
    return value


def _tolerance(name: str, value) -> float:
    value = _number(name, value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return value


def relative_check(name: str, predicted: float, measured: float, tolerance: float,
                   note: str = "") -> Check:
    """A check that passes when ``|measured - predicted| <= tolerance * |predicted|``
    (never when either is infinite)."""
    predicted, measured = _number("predicted", predicted), _number("measured", measured)
    tolerance = _tolerance("tolerance", tolerance)
    with np.errstate(over="ignore"):
        ok = bool(math.isfinite(measured) and math.isfinite(predicted)
                  and np.float64(abs(measured - predicted)) <= tolerance * abs(predicted))
    return Check(name, predicted, measured, tolerance, ok, note, "relative")


def factor_check(name: str, predicted: float, measured: float, factor: float,
                 note: str = "") -> Check:
    """A check that passes when ``measured / predicted`` lies in ``[1/factor, factor]``.

    ``tolerance`` is recorded as the allowed factor (≥ 1).
    """
    predicted, measured = _number("predicted", predicted), _number("measured", measured)
    factor = _tolerance("factor", factor)
    if factor < 1:
        raise ValueError(f"factor must be ≥ 1, got {factor!r}")
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        ratio = float(np.float64(measured) / predicted) if predicted else math.inf
    ok = math.isfinite(ratio) and 1.0 / factor <= ratio <= factor
    return Check(name, predicted, measured, factor, ok, note, "factor")


def minibatch_grads(problem, backend, gen, theta, batch: int, n_draws: int, *,
                    replace: bool = True, dtype: str = "float64", max_elements: int = 4_000_000):
    """``n_draws`` independent minibatch-mean gradients G_B at one point θ, on ``backend``.

    Uses the problem's vectorised sampler (``problem.kernel(backend, dtype).sampler``), so a
    noisy quadratic draws G_B = G + N(0, Σ/B) in one Gaussian draw and a finite dataset draws
    B example indices per row (with replacement unless ``replace=False``).

    Args:
        problem: a :mod:`sgdtheory.problems` problem.
        backend: a :class:`sgdtheory.backend.Backend`. gen: its generator (``backend.rng``).
        theta: the point θ, shape (p,) (NumPy or list).
        batch: B, examples per minibatch (integer ≥ 1).
        n_draws: number of independent minibatches.
        max_elements: draws are made in chunks of at most this many batch·p elements.

    Returns:
        Backend array (n_draws, p), a fresh copy (safe to keep).
    """
    from sgdtheory.problems import Layout

    batch, n_draws = integer("batch", batch), integer("n_draws", n_draws)
    max_elements = integer("max_elements", max_elements)
    replace = flag("replace", replace)
    kernel = problem.kernel(backend, dtype)
    theta = real_array("theta", theta)
    if theta.shape != (problem.dim,) or not np.all(np.isfinite(theta)):
        raise ValueError(f"theta must be a finite point of shape ({problem.dim},), got "
                         f"{_short(theta)}")
    fits_in_memory("n_draws", 8.0 * n_draws * problem.dim, "use fewer n_draws")
    theta = theta.reshape(1, -1)
    per_draw = theta.shape[1] * (1 if problem.n_data is None else int(batch))
    chunk = max(1, min(n_draws, max_elements // max(per_draw, 1)))
    parts = []
    for start in range(0, n_draws, chunk):
        n = min(chunk, n_draws - start)
        rows = backend.asarray(np.repeat(theta, n, axis=0), dtype=dtype)
        g = kernel.sampler(gen, n, replace).grad(rows, Layout(n, 1), int(batch))
        parts.append(backend.copy(g))
    return parts[0] if len(parts) == 1 else backend.concatenate(parts)


class ConfigChecks:
    """Base of every experiment's frozen ``Config``: ``__post_init__`` checks each field
    against the kind of its default, with a ValueError naming the field — ints ≥ 1 (NumPy
    integers accepted, stored as int), finite floats > 0 (≥ 0 for noise levels), non-empty
    tuples of those, strings, bools."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _field(f.name, getattr(self, f.name), f.default))


def _field(name: str, value, default):
    if isinstance(default, bool):
        return flag(name, value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {_short(value)}")
        return value
    if isinstance(default, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or not value:
            raise ValueError(f"{name} must be a non-empty tuple of numbers, got {_short(value)}")
        real_array(name, list(value))  # refuses bools, complex, strings, ragged nesting
        return tuple(_field(name, v, default[0]) for v in value)
    if isinstance(default, int):
        return integer(name, value, 1)
    value = real(name, value)
    low_ok = value >= 0 if "noise" in name else value > 0
    if not low_ok:
        raise ValueError(f"{name} must be {'≥' if 'noise' in name else '>'} 0, got {value!r}")
    return value


def check_run(config, config_class, backend, seed):
    """The arguments of an experiment's ``compute`` checked: a ``config_class`` instance, a
    backend (a :class:`~sgdtheory.backend.Backend`, a name, or None for the default) and an
    integer seed ≥ 0. Returns (config, backend, seed)."""
    from sgdtheory.backend import get_backend

    if not isinstance(config, config_class):
        raise ValueError(f"config must be a {config_class.__module__}.Config (e.g. "
                         f"PRESETS['default']), got {_short(config)}")
    return config, get_backend(backend), integer("seed", seed, 0)
