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


def _short(value) -> str:
    """A repr of ``value`` short enough for one error line (huge ints, long arrays)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlong, r.maxstring, r.maxother = 24, 40, 80
    return r.repr(value)


def real_array(name: str, value):
    """``value`` as a float64 NumPy array of real numbers (finiteness is left to the caller).

    Refuses, with a ValueError naming the argument: None, strings and bytes (NumPy would
    parse ``"1.5"``), bools (used as numbers), complex values (NumPy would drop the
    imaginary part with only a warning), ragged nesting, and objects that are not real
    numbers; integers too large for a float64.

    >>> real_array("lr", [1, 2.5]).tolist()
    [1.0, 2.5]
    """
    import numpy as np

    what = f"{name} must be a real number or an array of real numbers"
    if value is None or isinstance(value, (str, bytes)):
        raise ValueError(f"{what}, got {_short(value)}")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{what} (a regular, non-ragged shape), got {_short(value)}") from None
    if arr.dtype.kind == "O":
        flat = arr.ravel()
        if not all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
                   for v in flat):
            raise ValueError(f"{what}, got {_short(value)}")
        try:
            return np.array([float(v) for v in flat], dtype=float).reshape(arr.shape)
        except OverflowError:
            raise ValueError(f"{name} is too large for a float64, got {_short(value)}") from None
    if arr.dtype.kind == "b":
        raise ValueError(f"{what}, not bools, got {_short(value)}")
    if arr.dtype.kind == "c":
        raise ValueError(f"{what}, not complex, got {_short(value)}")
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{what}, got {_short(value)}")
    with np.errstate(over="ignore"):  # long doubles beyond float64: inf, caught by callers
        return arr.astype(float)
