"""Argument checks shared by the modules: each raises ValueError naming the argument."""

from __future__ import annotations

import math
import numbers


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


def flag(name: str, value) -> bool:
    """``value`` as a bool: only ``True``/``False`` and NumPy bools (no strings, no 0/1).

    ``"False"`` is truthy in Python, so a flag given as a string would silently turn on.

    >>> flag("nesterov", False)
    False
    """
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and getattr(value, "dtype", None) is not None \
            and value.dtype.kind == "b" and getattr(value, "ndim", 1) == 0:
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}")
