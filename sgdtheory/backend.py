r"""Array backends: NumPy (default), CuPy, or torch on a chosen device.

Choose the backend once at the entry point and pass it down; functions that receive arrays
find their backend from them (:func:`backend_of`, as SciPy and the array API do)::

    get_backend(name=None, device=None) -> Backend
        name: "numpy" | "cupy" | "torch" (None: $SGDTHEORY_BACKEND, else "numpy");
        device: torch device string ("cpu", "cuda", "cuda:1"); CuPy: GPU index or None.
    backend_of(x) -> Backend                         # the backend (and device) of array x
    available_backends() -> tuple[str, ...]          # names usable on this machine
    Backend.name, .xp, .device                       # xp: numpy, cupy or torch module
    Backend.numpy_native                             # arrays are NumPy (SciPy takes them)
    Backend.rng(seed) -> generator                   # numpy Generator / cupy Generator /
                                                     #   torch.Generator on ``device``
    Backend.asarray(x, dtype=None) -> array          # on the backend (and device)
    Backend.to_numpy(x, dtype=None) -> np.ndarray    # any backend array (or list) to NumPy
    Backend.dtype(name) -> backend dtype             # "float32" | "float64" | "int64" | …
    Backend.zeros(shape, dtype) / .empty(shape, dtype)
    Backend.copy(x) / .astype(x, dtype) / .concatenate(arrays, axis=0) / .all_finite(x)
    Backend.standard_normal(gen, shape, dtype, out=None, scale=None) -> N(0, 1)·scale fill
    Backend.uniform(gen, shape, dtype) -> U[0, 1);  Backend.synchronize()
    Backend.permutations(gen, rows, n) -> (rows, n) int64 array     # one permutation per row
    Backend.is_array(x) -> bool

This is the only module of :mod:`sgdtheory` that imports CuPy or names a backend; torch is
imported lazily (inside :func:`get_backend`, or when :func:`backend_of` meets a tensor), so
``import sgdtheory`` never needs either.

>>> be = get_backend("numpy")
>>> be.name, be.to_numpy(be.asarray([1, 2], dtype="float32")).dtype
('numpy', dtype('float32'))
>>> be.standard_normal(be.rng(0), (2,), "float64").shape
(2,)
>>> backend_of(np.zeros(3)) == be
True
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BACKENDS",
    "Backend",
    "array_module",
    "available_backends",
    "backend_of",
    "get_backend",
    "to_numpy",
]

#: Backend names :func:`get_backend` accepts.
BACKENDS = ("numpy", "cupy", "torch")
_ENV = "SGDTHEORY_BACKEND"


def _cupy_status() -> tuple[Any, str]:
    """(cupy module or None, reason it is unusable)."""
    try:
        cp = importlib.import_module("cupy")
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return None, f"cupy is not installed ({type(exc).__name__}: {exc})"
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return None, f"cupy cannot reach a GPU ({type(exc).__name__}: {exc})"
    if n < 1:
        return None, "cupy found no CUDA GPU"
    return cp, ""


def _torch_status() -> tuple[Any, str]:
    try:
        torch = importlib.import_module("torch")
    except Exception as exc:
        return None, f"torch is not installed ({type(exc).__name__}: {exc})"
    return torch, ""


def available_backends() -> tuple[str, ...]:
    """Names of the backends usable here, e.g. ``("numpy", "torch")``; torch on CPU counts.

    >>> "numpy" in available_backends()
    True
    """
    names = ["numpy"]
    if importlib.util.find_spec("cupy") is not None and _cupy_status()[0] is not None:
        names.append("cupy")
    if importlib.util.find_spec("torch") is not None:
        names.append("torch")
    return tuple(names)


def _describe_available() -> str:
    parts = []
    for name in available_backends():
        if name == "torch":
            torch = _torch_status()[0]
            cuda = "cuda available" if torch.cuda.is_available() else "cpu only"
            parts.append(f"torch ({cuda})")
        else:
            parts.append(name)
    return ", ".join(parts)


_DTYPES = ("float16", "float32", "float64", "int32", "int64", "bool")


@dataclass(frozen=True)
class Backend:
    """An array backend: the array module ``xp`` plus the few calls that differ between them.

    Attributes:
        name: ``"numpy"``, ``"cupy"`` or ``"torch"``.
        xp: the module (numpy, cupy or torch).
        device: torch device string (``"cpu"``, ``"cuda:0"``); CuPy GPU index; ``None`` for
            NumPy.
    """

    name: str
    xp: Any
    device: Any = None

    # ----------------------------------------------------------------- dtypes and arrays

    def dtype(self, name):
        """Backend dtype for a name in :data:`_DTYPES`, a NumPy dtype, or a torch dtype."""
        if self.name == "torch" and isinstance(name, self.xp.dtype):
            return name
        try:
            key = name if isinstance(name, str) else np.dtype(name).name
        except TypeError:
            key = None
        if key not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {name!r}")
        if self.name == "torch":
            return getattr(self.xp, key)
        return np.dtype(key)

    def is_array(self, x) -> bool:
        """Whether ``x`` is an array of this backend."""
        if self.name == "torch":
            return isinstance(x, self.xp.Tensor)
        return isinstance(x, self.xp.ndarray)

    def asarray(self, x, dtype=None):
        """``x`` (scalar, list, NumPy or backend array) as an array of this backend."""
        dt = None if dtype is None else self.dtype(dtype)
        if self.name == "torch":
            torch = self.xp
            if isinstance(x, torch.Tensor):
                return x.to(device=self.device, dtype=dt if dt is not None else x.dtype)
            arr = np.asarray(_to_numpy_any(x))
            if not arr.flags.writeable:  # torch cannot share read-only memory: copy
                arr = arr.copy()
            if dt is None and arr.dtype == np.float64:
                dt = torch.float64
            return torch.as_tensor(arr, dtype=dt, device=self.device)
        if self.name == "cupy":
            with self.xp.cuda.Device(self.device or 0):
                return self.xp.asarray(x if self.is_array(x) else _to_numpy_any(x), dtype=dt)
        return np.asarray(_to_numpy_any(x), dtype=dt)

    def to_numpy(self, x, dtype=None) -> np.ndarray:
        """Any backend array (or scalar/list) as a NumPy array (copied off the GPU), optionally
        converted to ``dtype`` (e.g. ``float`` for float64 host arithmetic)."""
        if type(x) in (np.ndarray, float, int):  # fast path: already on the host
            return np.asarray(x, dtype=dtype)
        out = _to_numpy_any(x)
        return out if dtype is None else out.astype(dtype, copy=False)

    @property
    def numpy_native(self) -> bool:
        """Whether this backend's arrays are NumPy arrays on the host (SciPy takes them)."""
        return self.name == "numpy"

    def copy(self, x):
        """A new array with the values of ``x`` (same dtype and device)."""
        return x.clone() if self.name == "torch" else x.copy()

    def astype(self, x, dtype):
        """``x`` as ``dtype`` (no copy when it already is)."""
        dt = self.dtype(dtype)
        return x.to(dt) if self.name == "torch" else x.astype(dt, copy=False)

    def concatenate(self, arrays, axis: int = 0):
        """Join arrays of this backend along an existing ``axis``."""
        if self.name == "torch":
            return self.xp.cat(list(arrays), dim=axis)
        return self.xp.concatenate(list(arrays), axis=axis)

    def all_finite(self, x) -> bool:
        """Whether every entry of ``x`` (an array of this backend, or a number) is finite."""
        if type(x) is float:
            return math.isfinite(x)
        if self.name == "numpy":
            return bool(np.all(np.isfinite(x)))
        return bool(self.xp.isfinite(x).all())

    def zeros(self, shape, dtype="float64"):
        if self.name == "torch":
            return self.xp.zeros(shape, dtype=self.dtype(dtype), device=self.device)
        return self.xp.zeros(shape, dtype=self.dtype(dtype))

    def empty(self, shape, dtype="float64"):
        if self.name == "torch":
            return self.xp.empty(shape, dtype=self.dtype(dtype), device=self.device)
        return self.xp.empty(shape, dtype=self.dtype(dtype))

    # ----------------------------------------------------------------- randomness

    def rng(self, seed):
        """A generator of this backend seeded by ``seed`` (int ≥ 0, or a sequence of ints).

        NumPy: ``np.random.Generator(PCG64)``; CuPy: ``cupy.random.default_rng``; torch: a
        ``torch.Generator`` on ``device``. Same seed, same backend → the same stream.
        """
        seq = np.random.SeedSequence(_seed_entropy(seed))
        if self.name == "numpy":
            return np.random.Generator(np.random.PCG64(seq))
        s = int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
        if self.name == "cupy":
            return self.xp.random.default_rng(s)
        gen = self.xp.Generator(device=self.device)
        gen.manual_seed(s)
        return gen

    def standard_normal(self, gen, shape, dtype="float64", out=None, scale=None):
        """Fill ``out`` (or a new array of ``shape``) with N(0, 1) draws from ``gen``.

        NumPy float32 uses Box–Muller on float32 uniforms (fast; tails cut at |z| ≈ 5.77,
        mass 8·10⁻⁹); NumPy float64 the ziggurat of ``Generator.standard_normal``; torch
        ``torch.randn``; CuPy its generator's ``standard_normal``. ``scale`` (broadcast
        along the last axis, e.g. standard deviations per parameter) multiplies the draws.
        """
        if self.name == "torch":
            if out is not None:
                z = self.xp.randn(out.shape, generator=gen, out=out)
            else:
                z = self.xp.randn(shape, generator=gen, dtype=self.dtype(dtype),
                                  device=self.device)
        else:
            dt = self.dtype(dtype) if out is None else out.dtype
            if self.name == "numpy" and dt == np.float32:
                z = np.empty(shape, dtype=np.float32) if out is None else out
                _box_muller_f32(gen, z, scale)
                return z
            if out is not None:
                gen.standard_normal(out=out, dtype=dt)
                z = out
            else:
                z = gen.standard_normal(shape, dtype=dt)
        if scale is not None:
            z *= scale
        return z

    def uniform(self, gen, shape, dtype="float64"):
        """U[0, 1) draws of ``shape``."""
        if self.name == "torch":
            return self.xp.rand(shape, generator=gen, dtype=self.dtype(dtype),
                                device=self.device)
        return gen.random(shape, dtype=self.dtype(dtype))

    def permutations(self, gen, rows: int, n: int):
        """``rows`` independent uniform permutations of ``range(n)``, shape (rows, n), int64."""
        if self.name == "numpy":
            base = np.broadcast_to(np.arange(n, dtype=np.int64), (rows, n))
            return gen.permuted(base, axis=1)
        if self.name == "torch":
            keys = self.xp.rand((rows, n), generator=gen, device=self.device)
            return self.xp.argsort(keys, dim=1)
        keys = gen.random((rows, n))
        return self.xp.argsort(keys, axis=1).astype(self.xp.int64)

    def synchronize(self) -> None:
        """Wait for queued GPU work (no-op on CPU); use before timing."""
        if self.name == "cupy":
            self.xp.cuda.Device(self.device or 0).synchronize()
        elif self.name == "torch" and str(self.device).startswith("cuda"):
            self.xp.cuda.synchronize(self.device)

    def __repr__(self) -> str:
        dev = "" if self.device is None else f", device={self.device!r}"
        return f"Backend({self.name!r}{dev})"


_NUMPY = Backend("numpy", np, None)


def _box_muller_f32(gen, out: np.ndarray, scale=None) -> None:
    r"""Fill the C-contiguous float32 array ``out`` with N(0, 1) draws by Box–Muller.

    z₁ = √(−2 ln u) cos 2πv, z₂ = √(−2 ln u) sin 2πv from float32 uniforms u ∈ (0, 1],
    v ∈ [0, 1) (24-bit resolution, so |z| ≤ √(48 ln 2) ≈ 5.77: a tail mass of 8·10⁻⁹ is
    cut). On CPU this is 2–4× faster than NumPy's float32 ziggurat, which is no faster than
    its float64 one; float64 draws keep NumPy's ziggurat. ``scale`` (last axis) multiplies
    the draws (folded into the radius when the two halves line up).
    """
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    flat = out.reshape(-1)
    n = flat.size
    m = (n + 1) // 2
    p = out.shape[-1] if out.ndim else 1
    uv = gen.random(2 * m, dtype=np.float32)
    u, v = uv[:m], uv[m:]
    np.subtract(np.float32(1.0), u, out=u)  # (0, 1]: log is finite
    np.log(u, out=u)
    # z[i] and z[m + i] share u[i] and (n even, m a multiple of p) their column: a scale ≥ 0
    # folds into the radius, √(−2 ln u · s²) = s √(−2 ln u)
    folded = (scale is not None and n % 2 == 0 and m % p == 0
              and bool(np.all(np.asarray(scale) >= 0)))
    if folded:
        u.reshape(-1, p)[...] *= np.float32(-2.0) * np.square(scale, dtype=np.float32)
    else:
        u *= np.float32(-2.0)
    np.sqrt(u, out=u)
    v *= np.float32(2.0 * np.pi)
    np.cos(v, out=flat[:m])
    flat[:m] *= u
    if n > m:
        np.sin(v[:n - m], out=flat[m:])
        flat[m:] *= u[:n - m]
    if scale is not None and not folded:
        out *= scale


def _seed_entropy(seed):
    if isinstance(seed, (bool, np.bool_)):
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(seed, (int, np.integer)):
        if seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        return int(seed)
    try:
        vals = [int(s) for s in seed]
    except TypeError as exc:
        raise ValueError(f"seed must be a non-negative int or ints, got {seed!r}") from exc
    if any(v < 0 for v in vals):
        raise ValueError(f"seed entries must be non-negative, got {seed!r}")
    return vals


def _to_numpy_any(x) -> np.ndarray:
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        return x.detach().cpu().numpy()
    if mod == "cupy":
        return x.get()
    if isinstance(x, (list, tuple)):
        return np.asarray([_to_numpy_any(v) for v in x]) if any(
            type(v).__module__.split(".")[0] in ("torch", "cupy") for v in x) else np.asarray(x)
    return np.asarray(x)


def to_numpy(x) -> np.ndarray:
    """A NumPy copy/view of a NumPy, CuPy or torch array (or anything ``np.asarray`` takes).

    >>> to_numpy([1.0, 2.0])
    array([1., 2.])
    """
    return _to_numpy_any(x)


def backend_of(x) -> Backend:
    """The backend that owns ``x``: torch (on ``x``'s device) or CuPy (on its GPU) for their
    arrays, NumPy for anything else (NumPy arrays, scalars, lists).

    The library is imported only when ``x`` already is one of its arrays, so this is how the
    backend-agnostic modules (theory, estimators, krylov) reach CuPy or torch without
    importing either themselves.

    >>> backend_of([1.0, 2.0])
    Backend('numpy')
    """
    root = type(x).__module__.split(".")[0]
    if root == "torch":
        import torch

        return Backend("torch", torch, str(x.device))
    if root == "cupy":
        import cupy

        return Backend("cupy", cupy, x.device.id)
    return _NUMPY


def array_module(x):
    """The array library that owns ``x`` (``backend_of(x).xp``): torch, cupy or numpy.

    >>> array_module(np.zeros(2)) is np
    True
    """
    return backend_of(x).xp


def _cupy_index(device) -> int:
    """A CuPy GPU index from None (0), an int, "3", "cuda" (0) or "cuda:3"."""
    if device is None:
        return 0
    text = str(device).strip().lower()
    if text == "cuda":
        return 0
    text = text.removeprefix("cuda:")
    if not text.isdigit():
        raise ValueError(f"invalid CuPy device {device!r}: give a GPU index (0, 1, …), "
                         f"'cuda' or 'cuda:N'")
    return int(text)


def get_backend(name: str | Backend | None = None, device=None) -> Backend:
    """The array backend called ``name`` (None: ``$SGDTHEORY_BACKEND`` or ``"numpy"``).

    Args:
        name: ``"numpy"``, ``"cupy"``, ``"torch"`` (or ``"torch:cuda"``-style shorthand
            ``"torch:<device>"``), or a :class:`Backend` (returned unchanged).
        device: torch device (default ``"cpu"``), or a CuPy GPU index (default 0; ``"cuda"``
            and ``"cuda:N"`` are accepted too).

    Raises:
        ValueError: unknown name; CuPy asked for where CuPy or a GPU is unusable; torch asked
            for where it is not installed, or a CUDA device without CUDA. The message lists
            the backends available here.

    >>> get_backend("numpy")
    Backend('numpy')
    """
    if isinstance(name, Backend):
        return name
    if name is None:
        name = os.environ.get(_ENV, "") or "numpy"
    if not isinstance(name, str):
        raise ValueError(f"backend name must be a string, got {name!r}")
    key = name.strip().lower()
    if key.startswith("torch:"):
        key, device = "torch", key.split(":", 1)[1]
    if key not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)} "
                         f"(available here: {_describe_available()})")
    if key == "numpy":
        if device not in (None, "cpu"):
            raise ValueError(f"the numpy backend runs on the CPU only, got device={device!r}")
        return _NUMPY
    if key == "cupy":
        cp, why = _cupy_status()
        if cp is None:
            raise ValueError(f"backend 'cupy' needs a usable CUDA GPU: {why}. "
                             f"Available here: {_describe_available()}")
        return Backend("cupy", cp, _cupy_index(device))
    torch, why = _torch_status()
    if torch is None:
        raise ValueError(f"backend 'torch' is unusable: {why}. "
                         f"Available here: {_describe_available()}")
    dev = "cpu" if device is None else str(device)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"torch device {dev!r} needs CUDA, which this machine lacks. "
                         f"Available here: {_describe_available()}")
    try:
        torch.device(dev)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid torch device {device!r}: {exc}") from exc
    return Backend("torch", torch, dev)
