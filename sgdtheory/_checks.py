"""Argument checks shared by the modules: each raises ValueError naming the argument.

``integer``, ``real``, ``flag`` and ``real_array`` accept NumPy scalars (and 0-d arrays)
wherever they accept Python numbers, refuse bools used as numbers, strings, None and complex
values, and never raise anything but ValueError (values beyond float64 included).
"""

from __future__ import annotations

import functools
import math
import numbers

__all__ = ["fits_in_memory", "flag", "float_dtype", "integer", "known_keywords", "memory_bytes",
           "optional_real", "real", "real_array"]


def _item(value):
    """A NumPy scalar, or a 0-d (or one-element 1-D) NumPy, torch or CuPy array, as its Python
    scalar (NumPy's float16 or uint64 would otherwise overflow in comparisons)."""
    if type(value) in (int, float):
        return value
    if getattr(value, "ndim", None) == 0 or getattr(value, "shape", None) == (1,):
        try:
            return value.item()
        except (AttributeError, ValueError, RuntimeError, TypeError):
            return value
    return value


def _is_number(value) -> bool:
    """A real number that is not a bool (NumPy bools included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int in [``minimum``, ``maximum``] (ints, integral floats, NumPy integers
    and 0-d integer arrays; no bools, strings or None).

    >>> integer("steps", 10.0)
    10
    >>> integer("steps", 10**400)
    Traceback (most recent call last):
    ...
    ValueError: steps must be an integer ≥ 1 that fits in a float64, got 1000000000...00000000000
    """
    value = _item(value)
    if type(minimum) is not int or abs(minimum) > 2**62 or (
            maximum is not None and (type(maximum) is not int or abs(maximum) > 2**62)):
        minimum, maximum = _bound("minimum", minimum), (
            None if maximum is None else _bound("maximum", maximum))
    want = f"an integer ≥ {minimum}" + ("" if maximum is None else f" and ≤ {maximum}")
    if not _is_number(value):
        raise ValueError(f"{name} must be {want}, got {_short(value)}")
    try:
        ok = math.isfinite(value) and float(value).is_integer()
    except OverflowError:  # an int beyond float64
        raise ValueError(f"{name} must be {want} that fits in a float64, "
                         f"got {_short(value)}") from None
    if not ok or value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {want}, got {_short(value)}")
    return int(value)


def _bound(name: str, value) -> int:
    value = _item(value)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or abs(value) > 2**62:
        raise ValueError(f"{name} must be an int within ±2**62, got {_short(value)}")
    return int(value)


def real(name: str, value) -> float:
    """``value`` as a finite Python float (a real scalar; no bools, strings or arrays).

    >>> real("lr", 0.5)
    0.5
    """
    value = _item(value)
    if not _is_number(value):
        raise ValueError(f"{name} must be a real number, got {_short(value)}")
    try:
        out = float(value)
    except (OverflowError, TypeError, ValueError):
        raise ValueError(f"{name} must be a finite real number (within float64), "
                         f"got {_short(value)}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {_short(value)}")
    return out


def optional_real(name: str, value) -> float | None:
    """None, or :func:`real`."""
    return None if value is None else real(name, value)


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
    raise ValueError(f"{name} must be True or False, got {_short(value)}")


def known_keywords(what: str, given, known) -> None:
    """Refuse keywords of ``given`` not in ``known``, naming them and listing the known ones
    (a misspelt keyword forwarded as ``**settings`` would otherwise be a TypeError).

    >>> known_keywords("run", {"lr": 1, "stpes": 2}, ["lr", "steps"])
    Traceback (most recent call last):
    ...
    ValueError: run got an unknown keyword 'stpes'; the known ones are: lr, steps
    """
    unknown = [k for k in given if k not in known]
    if unknown:
        s = "s" if len(unknown) > 1 else ""
        raise ValueError(f"{what} got an unknown keyword{s} "
                         f"{', '.join(repr(k) for k in unknown)}; the known ones are: "
                         f"{', '.join(sorted(known))}")


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


def float_dtype(name: str, value) -> str:
    """``"float32"`` or ``"float64"`` from that string or a NumPy float dtype.

    >>> float_dtype("dtype", "float32")
    'float32'
    """
    import numpy as np

    try:
        key = value if isinstance(value, str) else (
            None if value is None or isinstance(value, bool) else np.dtype(value).name)
    except TypeError:
        key = None
    if key not in ("float32", "float64"):
        raise ValueError(f"{name} must be 'float32' or 'float64', got {_short(value)}")
    return key


@functools.lru_cache(maxsize=1)
def memory_bytes() -> int:
    """This machine's physical memory in bytes (16 GiB when it cannot be told)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 16 << 30


def fits_in_memory(name: str, n_bytes: float, fix: str) -> None:
    """Refuse, naming ``name``, work whose arrays would need more than half of this machine's
    memory (better a clear error up front than a MemoryError or an OOM kill later)."""
    total = memory_bytes()
    if n_bytes > total / 2:
        try:
            need = f"{float(n_bytes) / 2**30:.3g} GiB"
        except OverflowError:  # an int beyond float64
            need = "more than 1e308 bytes"
        raise ValueError(f"{name}: this would need {need} of arrays, more than half of this "
                         f"machine's {total / 2**30:.3g} GiB; {fix}")
