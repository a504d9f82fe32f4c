"""Argument checks shared by the modules: each raises ValueError naming the argument."""

from __future__ import annotations

import math
import numbers

__all__ = ["integer", "real"]


def integer(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum`` (ints, integral floats and NumPy integers; no bools).

    >>> integer("steps", 10.0)
    10
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    if not (math.isfinite(value) and float(value).is_integer() and value >= minimum):
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def real(name: str, value) -> float:
    """``value`` as a finite Python float (a real scalar; no bools, strings or arrays).

    >>> real("lr", 0.5)
    0.5
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if getattr(value, "ndim", None) == 0 or getattr(value, "shape", None) == (1,):
            try:
                value = value.item()  # 0-d NumPy, torch or CuPy array
            except (AttributeError, ValueError, RuntimeError):
                pass
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)
