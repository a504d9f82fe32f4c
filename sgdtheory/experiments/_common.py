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

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Check", "factor_check", "minibatch_grads", "relative_check"]


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

    @property
    def rel_error(self) -> float:
        """|measured - predicted| / |predicted| (inf when predicted is 0 and measured is not)."""
        if self.predicted == 0:
            return 0.0 if self.measured == 0 else math.inf
        return abs(self.measured - self.predicted) / abs(self.predicted)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rel_error"] = self.rel_error
        d["passed"] = bool(self.passed)
        return d


def relative_check(name: str, predicted: float, measured: float, tolerance: float,
                   note: str = "") -> Check:
    """A check that passes when ``|measured - predicted| <= tolerance * |predicted|``."""
    predicted, measured = float(predicted), float(measured)
    ok = math.isfinite(measured) and abs(measured - predicted) <= tolerance * abs(predicted)
    return Check(name, predicted, measured, tolerance, ok, note, "relative")


def factor_check(name: str, predicted: float, measured: float, factor: float,
                 note: str = "") -> Check:
    """A check that passes when ``measured / predicted`` lies in ``[1/factor, factor]``.

    ``tolerance`` is recorded as the allowed factor.
    """
    predicted, measured = float(predicted), float(measured)
    ratio = measured / predicted if predicted else math.inf
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

    kernel = problem.kernel(backend, dtype)
    theta = np.asarray(theta, dtype=float).reshape(1, -1)
    per_draw = theta.shape[1] * (1 if problem.n_data is None else int(batch))
    chunk = max(1, min(n_draws, max_elements // max(per_draw, 1)))
    parts = []
    for start in range(0, n_draws, chunk):
        n = min(chunk, n_draws - start)
        rows = backend.asarray(np.repeat(theta, n, axis=0), dtype=dtype)
        g = kernel.sampler(gen, n, replace).grad(rows, Layout(n, 1), int(batch))
        parts.append(backend.copy(g))
    return parts[0] if len(parts) == 1 else backend.concatenate(parts)
