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
    return Check(name, predicted, measured, tolerance, ok, note)


def factor_check(name: str, predicted: float, measured: float, factor: float,
                 note: str = "") -> Check:
    """A check that passes when ``measured / predicted`` lies in ``[1/factor, factor]``.

    ``tolerance`` is recorded as the allowed factor.
    """
    predicted, measured = float(predicted), float(measured)
    ratio = measured / predicted if predicted else math.inf
    ok = math.isfinite(ratio) and 1.0 / factor <= ratio <= factor
    return Check(name, predicted, measured, factor, ok, note)
