r"""The SGD update, written once: plain SGD, heavy-ball and Nesterov momentum (torch form).

:func:`sgd` returns an :class:`Optimizer`, an optax-shaped pair of functions::

    init(params) -> state
    update(grad, state, params, scale=1.0) -> (params, state)

that applies ``torch.optim.SGD`` (dampening 0, v₀ = 0; docs/design.md §2) with the rate
η_t = η·scale (``scale``: a schedule multiplier m(t/T))::

    v_{t+1} = μ v_t + g_t
    θ_{t+1} = θ_t − η_t v_{t+1}                 heavy ball
    θ_{t+1} = θ_t − η_t (g_t + μ v_{t+1})       Nesterov
    θ_{t+1} = θ_t − η_t g_t                     μ = 0: plain SGD (no velocity kept)

``g`` is the **mean** minibatch gradient, so ``lr`` η multiplies it (base rate η/B per
example); the effective rate is η/(1−μ). η and μ are numbers, or columns (n, 1) holding one
value per row of an (n, p) state (one row per replica × configuration); they ride in the state,
so dropping rows (diverged replicas) is ``state.take(keep)``.

Memory: the update works **in place**, as the simulator's state can be large: it overwrites
``params``, the state's velocity and ``grad`` (used as scratch), and returns them. Treat the
arguments as consumed, as with optax's donated buffers under ``jax.jit``. Arrays may be NumPy,
CuPy or torch; nothing here names a backend.

:func:`ema_update` is the iterate average θ̄ ← β θ̄ + (1−β) θ (in place).

>>> import numpy as np
>>> opt = sgd(lr=0.5, momentum=0.9)
>>> theta = np.array([1.0])
>>> state = opt.init(theta)
>>> for _ in range(2):  # L = ½θ², g = θ
...     theta, state = opt.update(theta.copy(), state, theta)
>>> theta.round(6).tolist(), state.velocity.round(6).tolist()  # θ = 1 − 0.5, then 0.5 − 0.5·1.4
([-0.2], [1.4])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from sgdtheory._checks import _short, flag, real
from sgdtheory.backend import array_module

__all__ = ["Optimizer", "SGDState", "ema_update", "sgd"]


class SGDState(NamedTuple):
    """State of :func:`sgd`: the hyperparameters per row and the velocity.

    Attributes:
        lr: η, a number or a column (n, 1) of per-row rates (multiplier of the mean gradient).
        momentum: μ ∈ [0, 1), a number or a column (n, 1).
        velocity: v, shape of the parameters; ``None`` when μ = 0 (plain SGD keeps no state).
    """

    lr: Any
    momentum: Any
    velocity: Any

    def take(self, rows) -> SGDState:
        """The state of the rows ``rows`` (a boolean mask or indices) of an (n, p) state."""
        return SGDState(*(_take(x, rows) for x in self))


class Optimizer(NamedTuple):
    """``init(params) -> state`` and ``update(grad, state, params, scale=1.0) -> (params,
    state)`` (see the module docstring); ``step`` is ``update`` without its argument checks
    and without its own ``np.errstate``, for a loop that validated its inputs once and runs
    under ``np.errstate(over="ignore", invalid="ignore")`` itself (the simulator: the checks
    cost ~15% of a step on small problems)."""

    init: Callable[[Any], SGDState]
    update: Callable[..., tuple[Any, SGDState]]
    step: Callable[..., tuple[Any, SGDState]]


def _take(x, rows):
    return x[rows] if getattr(x, "ndim", 0) >= 1 else x


def _any_nonzero(x) -> bool:
    return bool((x != 0).any()) if getattr(x, "ndim", 0) >= 1 else x != 0


def sgd(lr, momentum=0.0, nesterov: bool = False) -> Optimizer:
    r"""SGD with heavy-ball or Nesterov momentum, the ``torch.optim.SGD`` update.

    Args:
        lr: η > 0, multiplier of the mean minibatch gradient; a number or a column (n, 1).
        momentum: μ ∈ [0, 1); a number or a column (n, 1). μ = 0 everywhere: plain SGD.
        nesterov: Nesterov momentum θ ← θ − η(g + μv) instead of heavy ball θ ← θ − ηv.

    Returns:
        :class:`Optimizer`. ``update(grad, state, params, scale)`` steps with η·scale;
        ``scale = 0`` (e.g. the first step of a warmup) leaves θ unchanged and still updates v.
    """

    lr, momentum = _hyper("lr", lr, 0.0, None), _hyper("momentum", momentum, 0.0, 1.0)
    nesterov = flag("nesterov", nesterov)

    def init(params) -> SGDState:
        plain = not _any_nonzero(momentum)
        return SGDState(lr, momentum, None if plain else array_module(params).zeros_like(params))

    def update(grad, state: SGDState, params, scale=1.0):
        if not (type(grad) is np.ndarray and type(params) is np.ndarray  # the fast, usual case
                and grad.dtype in _FLOATS and params.dtype in _FLOATS
                and grad.shape == params.shape):
            _same_shape("grad", _float_array("grad", grad), _float_array("params", params))
        if type(state.lr) is not float or type(state.momentum) is not float:
            _columns_fit(state, params)
        if not (type(scale) is float and math.isfinite(scale)):
            scale = real("scale", scale)
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging run: inf, detected
            return _step(grad, state, params, scale)  # by the caller (simulate checks losses)

    def _step(grad, state, params, scale):
        v = state.velocity
        if v is None:
            direction = grad  # θ ← θ − η g
        else:
            v *= state.momentum
            v += grad  # v ← μ v + g
            if nesterov:
                grad += v * state.momentum  # g + μ v
                direction = grad
            else:
                direction = v
        if scale != 0:
            eta = state.lr * scale
            if direction is grad:  # scratch: scale it in place
                direction *= eta
                params -= direction
            else:
                params -= direction * eta
        return params, state

    return Optimizer(init, update, _step)


def ema_update(average, params, decay: float):
    r"""Exponential moving average of the iterates, in place: θ̄ ← β θ̄ + (1−β) θ.

    Computed as θ̄ ← θ̄ − (1−β)(θ̄ − θ). Start it at θ̄₀ = θ₀ (a copy), as
    :func:`sgdtheory.nqm.expected_loss` with ``ema_decay`` does.

    >>> import numpy as np
    >>> ema_update(np.array([1.0]), np.array([0.0]), 0.75).tolist()
    [0.75]
    """
    if not (type(decay) is float and 0.0 <= decay <= 1.0):
        decay = real("decay", decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay!r}")
    if not (type(average) is np.ndarray and type(params) is np.ndarray
            and average.dtype in _FLOATS and params.dtype in _FLOATS
            and average.shape == params.shape):
        _same_shape("average", _float_array("average", average), _float_array("params", params))
    with np.errstate(over="ignore", invalid="ignore"):
        average -= (1.0 - decay) * (average - params)
    return average


_FLOATS = (np.dtype("float32"), np.dtype("float64"))


def _float_array(name, x):
    """``x`` if it is a floating-point array (NumPy, CuPy or torch), else ValueError."""
    dtype = getattr(x, "dtype", None)
    if dtype in _FLOATS and hasattr(x, "shape"):  # the common case, fast
        return x
    kind = getattr(dtype, "kind", None)
    floating = kind == "f" if kind is not None else bool(getattr(dtype, "is_floating_point",
                                                                 False))
    if not floating or not hasattr(x, "shape"):
        raise ValueError(f"{name} must be a floating-point array, got {_short(x)}")
    return x


def _same_shape(name, x, params) -> None:
    if tuple(x.shape) != tuple(params.shape):
        raise ValueError(f"{name} must have the shape of params {tuple(params.shape)}, got "
                         f"{tuple(x.shape)}")


def _columns_fit(state: SGDState, params) -> None:
    """Per-row lr / momentum columns (n, 1) must match params (n, p)."""
    for name in ("lr", "momentum"):
        col = getattr(state, name)
        if getattr(col, "ndim", 0) and (len(params.shape) != 2
                                        or col.shape[0] != params.shape[0]):
            raise ValueError(f"{name} is a column of {col.shape[0]} rows: params must have "
                             f"shape ({col.shape[0]}, p), got {tuple(params.shape)}")


def _hyper(name, value, low, high):
    """A hyperparameter: a real number in the range (lr > 0; 0 ≤ μ < 1), or a column of
    per-row values (a NumPy, CuPy or torch array, checked by the caller that built it)."""
    if hasattr(value, "shape") and getattr(value, "ndim", 0) >= 1:
        dtype = getattr(value, "dtype", None)
        kind = getattr(dtype, "kind", None)
        if kind is not None and kind != "f" or kind is None and not dtype.is_floating_point:
            raise ValueError(f"{name} must hold floats, got dtype {dtype}")
        if len(value.shape) != 2 or value.shape[1] != 1 or value.shape[0] < 1:
            raise ValueError(f"{name} must be a number or a column (n, 1), got shape "
                             f"{tuple(value.shape)}")
        lo = -1.0 if low is None else low
        ok = (value == value) & (value >= lo) & (value > 0 if name == "lr" else value >= lo)
        if high is not None:
            ok = ok & (value < high)
        if not bool(ok.all()):
            raise ValueError(f"{name} values must lie in the range ({name} > 0; momentum in "
                             f"[0, 1)), got {_short(value)}")
        return value
    value = real(name, value)
    if (low is not None and not value >= low) or (high is not None and not value < high) or (
            name == "lr" and not value > 0):
        what = "> 0" if name == "lr" else f"in [{low}, {high})"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value
