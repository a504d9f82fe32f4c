r"""Closed forms of the gradient-noise-scale model and the SGD stability limits.

Conventions (README "Units and conventions"): L is the *mean* loss over examples, G = ∇L,
H = ∇²L, Σ the covariance of per-example gradients (1/N normalisation on a finite set).
``lr`` (ε or η) multiplies the *mean* minibatch gradient G_B = (1/B) Σ_{i∈batch} ∇ℓ_i; the
base rate η̃ = η/B is the step per example. Batches are drawn with replacement (or from
infinite data) so Cov(G_B) = Σ/B; for batches drawn without replacement from N examples use
:func:`effective_batch`.

One SGD step on the local quadratic model (McCandlish et al. 2018, eq. 2.3),

    E[L(θ − ε G_B)] = L − ε|G|² + ½ ε² (GᵀHG + tr(HΣ)/B),

gives ε_max, ε_opt(B), ΔL_max, B_noise and the steps/examples trade-off below.

Every function accepts Python scalars and NumPy arrays (which broadcast); the scalar formulas
also work on CuPy and torch arrays. Out-of-domain input raises ``ValueError`` naming the
argument: NaN/inf, bools used as numbers, complex values, strings, None, ragged lists; flags
(``nesterov``) take bools only. A finite input whose exact result is beyond float64 gives
±inf (or 0), without NumPy warnings; never NaN.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, fields

import numpy as np
from scipy import optimize

from sgdtheory._checks import _short, flag, integer, real_array
from sgdtheory.backend import array_module

__all__ = [
    "QuadraticStats",
    "b_noise",
    "b_simple",
    "base_lr",
    "critical_batch",
    "delta_loss_max",
    "delta_loss_opt",
    "effective_batch",
    "effective_lr",
    "eps_max",
    "eps_opt",
    "expected_loss_change",
    "fit_steps_examples",
    "gd_stability_limit",
    "linreg_moment_matrix",
    "linreg_stability_limit",
    "lr_from_base",
    "quadratic_stats",
    "scaled_lr",
    "smith_le_noise_scale",
    "spectrum_from_top_and_trace",
    "steps_examples",
    "temperature",
]


# --------------------------------------------------------------------------- input checks


def _module(x):
    """The array module of ``x``: torch or cupy for their arrays, NumPy otherwise."""
    return array_module(x)


def _foreign_dtype_is_real(x) -> bool:
    """A torch or CuPy array holds real numbers (not bool, not complex)."""
    dtype = x.dtype
    kind = getattr(dtype, "kind", None)
    if kind is not None:  # CuPy: NumPy dtypes
        return kind in "iuf"
    return not (dtype.is_complex or dtype == _module(x).bool)  # torch


def _arr(name: str, x):
    """``x`` checked as finite real number(s): a NumPy float64 scalar for a scalar, the torch /
    CuPy array itself, else a float64 NumPy array. Bools, complex values, strings, None and
    ragged nesting raise ValueError naming the argument."""
    if isinstance(x, (bool, np.bool_)):
        raise ValueError(f"{name} must be a real number, not a bool, got {x!r}")
    if isinstance(x, numbers.Real) and not isinstance(x, np.ndarray):
        try:
            value = np.float64(float(x))  # NumPy scalars mix with CuPy and torch arrays alike
        except (OverflowError, TypeError, ValueError):
            raise ValueError(f"{name} must be a finite real number, got {_short(x)}") from None
        if not np.isfinite(value):
            raise ValueError(f"{name} must be finite, got {x!r}")
        return value
    xp = _module(x)
    if xp is np:
        x = real_array(name, x)
    elif not _foreign_dtype_is_real(x):
        raise ValueError(f"{name} must hold real numbers (not bool or complex), got {x.dtype}")
    if not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"{name} must be finite, got {_short(x)}")
    return x


def _quiet(fn):
    """Run ``fn`` with NumPy's overflow/underflow/divide-by-zero warnings off.

    Every input is checked finite first, so these only arise when a true value is beyond
    float64: it then comes out as ±inf or 0, which is the documented result.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(over="ignore", under="ignore", divide="ignore"):
            return fn(*args, **kwargs)

    return wrapper


def _positive(name: str, x, *, allow_zero: bool = False):
    x = _arr(name, x)
    xp = _module(x)
    bad = xp.any(x < 0) if allow_zero else xp.any(x <= 0)
    if bool(bad):
        what = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be {what}, got {_short(x)}")
    return x


def _momentum(momentum):
    mu = _arr("momentum", momentum)
    xp = _module(mu)
    if bool(xp.any(mu < 0)) or bool(xp.any(mu >= 1)):
        raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
    return mu


def _integer(name: str, x, minimum: int = 1) -> int:
    """An int ≥ ``minimum`` (ints, integral floats, NumPy integers, 0-d integer arrays; no
    bools); beyond float64's range a ValueError, not an OverflowError."""
    if isinstance(x, np.ndarray) and x.ndim == 0 and x.dtype.kind in "iuf":
        x = x.item()
    try:
        return integer(name, x, minimum)
    except OverflowError:
        raise ValueError(f"{name} is too large, got {_short(x)}") from None


def _scalar(name: str, x) -> float:
    """A checked value that must be a single number, as a float."""
    if getattr(x, "ndim", 0) != 0:
        raise ValueError(f"{name} must be a scalar here, got shape {tuple(x.shape)}")
    return float(x)


def _out(value):
    """Scalars in, scalars out: 0-d NumPy results become Python floats."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return float(value)
    return value


# --------------------------------------------------------------------------- noise scale


@_quiet
def eps_max(grad_sq, g_h_g):
    r"""Optimal step of noiseless gradient descent along G: ε_max = |G|² / GᵀHG.

    Args:
        grad_sq: |G|², squared norm of the mean-loss gradient (loss/param² units).
        g_h_g: GᵀHG, curvature along G (must be > 0).

    Returns:
        ε_max, in the units of ``lr`` (multiplier of the mean minibatch gradient).

    >>> eps_max(4.0, 2.0)
    2.0
    """
    grad_sq = _positive("grad_sq", grad_sq, allow_zero=True)
    g_h_g = _positive("g_h_g", g_h_g)
    return _out(grad_sq / g_h_g)


@_quiet
def b_noise(tr_h_sigma, g_h_g):
    r"""Gradient noise scale B_noise = tr(HΣ) / GᵀHG (McCandlish et al. eq. 2.7).

    Args:
        tr_h_sigma: tr(HΣ), Σ the per-example gradient covariance (≥ 0).
        g_h_g: GᵀHG (> 0).

    Returns:
        B_noise, in examples.

    >>> b_noise(30.0, 3.0)
    10.0
    """
    tr_h_sigma = _positive("tr_h_sigma", tr_h_sigma, allow_zero=True)
    g_h_g = _positive("g_h_g", g_h_g)
    return _out(tr_h_sigma / g_h_g)


@_quiet
def b_simple(tr_sigma, grad_sq):
    r"""Simple noise scale B_simple = tr(Σ) / |G|² (equals B_noise when H ∝ I).

    It is also the batch at which the minibatch-gradient noise equals the signal:
    E|G_B − G|² / |G|² = B_simple / B.

    Args:
        tr_sigma: tr(Σ), total per-example gradient variance (≥ 0).
        grad_sq: |G|² (> 0).

    Returns:
        B_simple, in examples.

    >>> b_simple(100.0, 4.0)
    25.0
    """
    tr_sigma = _positive("tr_sigma", tr_sigma, allow_zero=True)
    grad_sq = _positive("grad_sq", grad_sq)
    return _out(tr_sigma / grad_sq)


@_quiet
def eps_opt(batch, eps_max, b_noise):
    r"""Optimal step at batch size B: ε_opt(B) = ε_max / (1 + B_noise/B).

    Args:
        batch: B, examples per step (> 0; use :func:`effective_batch` for batches drawn
            without replacement from a finite set).
        eps_max: ε_max, in ``lr`` units (> 0).
        b_noise: B_noise, in examples (≥ 0).

    Returns:
        ε_opt(B) in ``lr`` units (multiplier of the mean minibatch gradient).

    >>> eps_opt(10.0, 1.0, 10.0)
    0.5
    """
    batch = _positive("batch", batch)
    eps_max_ = _positive("eps_max", eps_max)
    b_noise_ = _positive("b_noise", b_noise, allow_zero=True)
    return _out(eps_max_ / (1.0 + b_noise_ / batch))


@_quiet
def delta_loss_max(grad_sq, g_h_g):
    r"""Largest one-step loss decrease of noiseless GD: ΔL_max = ½ |G|⁴ / GᵀHG.

    Args:
        grad_sq: |G|², squared norm of the mean-loss gradient (≥ 0).
        g_h_g: GᵀHG, curvature along G (> 0).

    Returns:
        ΔL_max, in loss units (of the mean loss), reached at ``lr`` = ε_max.

    >>> delta_loss_max(2.0, 4.0)
    0.5
    """
    grad_sq = _positive("grad_sq", grad_sq, allow_zero=True)
    g_h_g = _positive("g_h_g", g_h_g)
    return _out(0.5 * (grad_sq * (grad_sq / g_h_g)))  # no 0·inf when ½|G|² underflows


@_quiet
def delta_loss_opt(batch, delta_loss_max, b_noise):
    r"""Expected one-step decrease at ε_opt(B): ΔL_opt(B) = ΔL_max / (1 + B_noise/B).

    Args:
        batch: B, examples per step (> 0, drawn with replacement).
        delta_loss_max: ΔL_max, in loss units (≥ 0).
        b_noise: B_noise, in examples (≥ 0).

    Returns:
        ΔL_opt(B), in loss units: −E[ΔL] of one SGD step at ``lr`` = ε_opt(B).

    >>> delta_loss_opt(5.0, 3.0, 10.0)
    1.0
    """
    batch = _positive("batch", batch)
    dl = _positive("delta_loss_max", delta_loss_max, allow_zero=True)
    b_noise_ = _positive("b_noise", b_noise, allow_zero=True)
    return _out(dl / (1.0 + b_noise_ / batch))


def _n_data(n_data):
    """A dataset size N > 1 (the factor (N−B)/(N−1) needs N ≠ 1)."""
    n_data = _arr("n_data", n_data)
    if bool(_module(n_data).any(n_data <= 1)):
        raise ValueError(f"n_data must be > 1 (examples in the dataset), got {n_data!r}")
    return n_data


@_quiet
def effective_batch(batch, n_data):
    r"""Batch size with replacement that has the noise of B drawn *without* replacement from N.

    Without replacement Cov(G_B) = (Σ/B)(N−B)/(N−1), so B_eff = B (N−1)/(N−B)
    (infinite when B = N: full-batch GD has no noise).

    Args:
        batch: B, examples per step, drawn without replacement (0 < B ≤ N).
        n_data: N, examples in the dataset (> 1).

    Returns:
        B_eff, in examples: use it wherever a formula assumes sampling with replacement.

    >>> effective_batch(10, 19)
    20.0
    """
    batch = _positive("batch", batch)
    n_data = _n_data(n_data)
    xp = _module(batch)
    if bool(xp.any(batch > n_data)):
        raise ValueError(f"batch ({batch!r}) must not exceed n_data ({n_data!r})")
    if isinstance(batch, float) and isinstance(n_data, float):
        return _out(batch * (n_data - 1.0) / (n_data - batch)) if batch < n_data \
            else float("inf")
    return _out(batch * (n_data - 1.0) / (n_data - batch))


@_quiet
def expected_loss_change(lr, batch, grad_sq, g_h_g, tr_h_sigma, *, n_data=None):
    r"""Expected change of the quadratic-model loss after one SGD step.

        E[L(θ − ε G_B)] − L(θ) = −ε|G|² + ½ ε² (GᵀHG + tr(HΣ)/B),

    with tr(HΣ)/B multiplied by (N−B)/(N−1) when ``n_data`` = N is given (batches drawn
    without replacement). It is negative exactly for 0 < ε < 2 ε_opt(B), minimal (−ΔL_opt)
    at ε_opt(B).

    Args:
        lr: ε, multiplier of the mean minibatch gradient (> 0).
        batch: B, examples per step (> 0).
        grad_sq: |G|² (≥ 0). g_h_g: GᵀHG. tr_h_sigma: tr(HΣ) (≥ 0).
        n_data: optional dataset size N ≥ B (N > 1) for sampling without replacement.

    >>> expected_loss_change(0.5, 10.0, 1.0, 1.0, 10.0)
    -0.25
    """
    lr = _positive("lr", lr)
    batch = _positive("batch", batch)
    grad_sq = _positive("grad_sq", grad_sq, allow_zero=True)
    g_h_g = _arr("g_h_g", g_h_g)
    tr_h_sigma = _positive("tr_h_sigma", tr_h_sigma, allow_zero=True)
    factor = 1.0
    if n_data is not None:
        n_data = _n_data(n_data)
        if bool(_module(batch).any(batch > n_data)):
            raise ValueError(f"batch ({batch!r}) must not exceed n_data ({n_data!r})")
        factor = (n_data - batch) / (n_data - 1.0)
    # ε(½ c − |G|²) with c = ε GᵀHG + (ε/B) tr(HΣ): no 0·inf when ε is tiny and ε/B is not;
    # when both terms of c overflow with opposite signs, c = ε (GᵀHG + tr(HΣ)/B) instead
    with np.errstate(invalid="ignore"):
        curv = lr * g_h_g + tr_h_sigma * (lr / batch) * factor
        xp = _module(curv)
        if bool(xp.any(xp.isnan(curv))):
            curv = xp.where(xp.isnan(curv), lr * (g_h_g + tr_h_sigma / batch * factor), curv)
    return _out(lr * (0.5 * curv - grad_sq))


@dataclass(frozen=True)
class QuadraticStats:
    """Noise-scale quantities at one point of a quadratic model (see :func:`quadratic_stats`).

    ``eps_max`` and ``b_noise`` are ``inf`` when GᵀHG ≤ 0 (no curvature along G: the loss
    keeps falling along −G); ``b_simple`` is ``inf`` when G = 0. The fields must be finite
    real numbers (|G|² ≥ 0); they are stored as floats. A derived value beyond float64 is
    ``inf``.
    """

    grad_sq: float
    g_h_g: float
    tr_sigma: float
    tr_h_sigma: float

    def __post_init__(self):
        for f in fields(self):
            value = _scalar(f.name, _arr(f.name, getattr(self, f.name)))
            object.__setattr__(self, f.name, value)
        if self.grad_sq < 0:
            raise ValueError(f"grad_sq must be non-negative (a squared norm), got {self.grad_sq}")

    @property
    def eps_max(self) -> float:
        return self.grad_sq / self.g_h_g if self.g_h_g > 0 else float("inf")

    @property
    def b_noise(self) -> float:
        return self.tr_h_sigma / self.g_h_g if self.g_h_g > 0 else float("inf")

    @property
    def b_simple(self) -> float:
        return self.tr_sigma / self.grad_sq if self.grad_sq > 0 else float("inf")

    @property
    def delta_loss_max(self) -> float:
        """ΔL_max = ½|G|⁴/GᵀHG (0 at G = 0; ``inf`` when GᵀHG ≤ 0 < |G|²)."""
        return 0.5 * (self.grad_sq * self.eps_max) if self.grad_sq > 0 else 0.0

    @_quiet
    def eps_opt(self, batch):
        """ε_opt(B) = ε_max/(1 + B_noise/B) = |G|²/(GᵀHG + tr(HΣ)/B) for this point (``lr``
        units; ``inf`` when GᵀHG ≤ 0, or GᵀHG + tr(HΣ)/B ≤ 0 with an indefinite H: the
        quadratic model has no optimal step)."""
        batch = _positive("batch", batch)
        if self.g_h_g <= 0:
            return _out(batch * 0.0 + float("inf"))
        den = self.g_h_g + self.tr_h_sigma / batch
        if self.tr_h_sigma >= 0:  # den > 0
            return _out(self.grad_sq / den)
        xp = _module(den)
        pos = den > 0
        return _out(xp.where(pos, self.grad_sq / xp.where(pos, den, 1.0), float("inf")))


def _symmetric_matrix_or_diag(name: str, a, p: int, *, psd: bool):
    a = np.asarray(_arr(name, a), dtype=float)
    if a.ndim == 1:
        if a.shape != (p,):
            raise ValueError(f"{name} diagonal must have shape ({p},) to match grad, "
                             f"got {a.shape}")
        if psd and np.any(a < 0):
            raise ValueError(f"{name} must be positive semi-definite (negative diagonal entry)")
        return a
    if a.shape != (p, p):
        raise ValueError(f"{name} must have shape ({p}, {p}) or ({p},) to match grad, "
                         f"got {a.shape}")
    scale = float(np.abs(a).max()) or 1.0
    a_s = a / scale  # entries in [−1, 1]: no overflow in the checks below
    if not np.allclose(a_s, a_s.T, rtol=1e-10, atol=1e-12):
        raise ValueError(f"{name} must be symmetric")
    if psd and np.linalg.eigvalsh(0.5 * (a_s + a_s.T))[0] < -1e-10:
        raise ValueError(f"{name} must be positive semi-definite")
    return a


@_quiet
def quadratic_stats(hessian, sigma, grad) -> QuadraticStats:
    r"""|G|², GᵀHG, tr(Σ), tr(HΣ) and the derived ε_max, B_noise, B_simple.

    Args:
        hessian: H, symmetric (p, p), or its diagonal (p,) when H is diagonal.
        sigma: Σ, per-example gradient covariance, symmetric PSD (p, p) or diagonal (p,).
        grad: G, the mean-loss gradient (p,).

    Returns:
        :class:`QuadraticStats` (floats; attributes grad_sq, g_h_g, tr_sigma, tr_h_sigma,
        eps_max, b_noise, b_simple).

    >>> s = quadratic_stats([1.0, 2.0], [3.0, 1.0], [1.0, 1.0])
    >>> (s.grad_sq, s.g_h_g, s.tr_sigma, s.tr_h_sigma, s.b_noise)
    (2.0, 3.0, 4.0, 5.0, 1.6666666666666667)
    """
    g = np.asarray(_arr("grad", grad), dtype=float)
    if g.ndim != 1 or g.size == 0:
        raise ValueError(f"grad must be a non-empty 1-D vector, got shape {g.shape}")
    p = g.shape[0]
    h = _symmetric_matrix_or_diag("hessian", hessian, p, psd=False)
    s = _symmetric_matrix_or_diag("sigma", sigma, p, psd=True)
    with np.errstate(invalid="ignore"):  # inf − inf from overflow: reported below
        hg = h * g if h.ndim == 1 else h @ g
        if h.ndim == 1 and s.ndim == 1:
            tr_h_sigma = float(h @ s)
        elif h.ndim == 1:
            tr_h_sigma = float(h @ np.diagonal(s))
        elif s.ndim == 1:
            tr_h_sigma = float(np.diagonal(h) @ s)
        else:
            tr_h_sigma = float(np.einsum("ij,ji->", h, s))
        values = {"grad_sq": float(g @ g), "g_h_g": float(g @ hg),
                  "tr_sigma": float(s.sum() if s.ndim == 1 else np.trace(s)),
                  "tr_h_sigma": tr_h_sigma}
    sources = {"grad_sq": "grad", "g_h_g": "grad and hessian", "tr_sigma": "sigma",
               "tr_h_sigma": "hessian and sigma"}
    for key, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{sources[key]} are too large: {key} overflows float64")
    return QuadraticStats(**values)


# --------------------------------------------------------------------------- steps / examples


@_quiet
def steps_examples(batch, s_min, e_min):
    r"""Steps and examples to reach a target at batch B (McCandlish et al. eq. 2.11).

        S = S_min (1 + B_crit/B),   E = E_min (1 + B/B_crit),   B_crit = E_min/S_min,

    so that (S/S_min − 1)(E/E_min − 1) = 1 and E = S·B.

    Args:
        batch: B (> 0). s_min: fewest steps (large-batch limit, > 0).
        e_min: fewest examples (small-batch limit, > 0).

    Returns:
        (steps, examples).

    >>> steps_examples(10.0, 100.0, 1000.0)
    (200.0, 2000.0)
    """
    batch = _positive("batch", batch)
    s_min = _positive("s_min", s_min)
    e_min = _positive("e_min", e_min)
    b_crit = e_min / s_min
    return _out(s_min * (1.0 + b_crit / batch)), _out(e_min * (1.0 + batch / b_crit))


@_quiet
def critical_batch(s_min, e_min):
    r"""Critical batch size B_crit = E_min / S_min (in examples).

    >>> critical_batch(100.0, 3200.0)
    32.0
    """
    return _out(_positive("e_min", e_min) / _positive("s_min", s_min))


@_quiet
def fit_steps_examples(steps, examples):
    r"""Fit S_min and E_min to measured (steps, examples) pairs at one target loss.

    The hyperbola (S/S_min − 1)(E/E_min − 1) = 1 is equivalent to S_min/S + E_min/E = 1,
    which is linear in (S_min, E_min): solve it by least squares, then refine by minimising
    the squared log-error of the predicted steps, S_pred(B) = S_min + E_min/B with B = E/S.

    Args:
        steps: S_k, steps to reach the target for several batch sizes (≥ 2 points).
        examples: E_k = B_k·S_k, examples processed to reach it.

    Returns:
        (s_min, e_min).

    >>> s, e = steps_examples(np.array([1.0, 10.0, 100.0]), 50.0, 500.0)
    >>> [round(v, 6) for v in fit_steps_examples(s, e)]
    [50.0, 500.0]
    """
    s = np.asarray(_positive("steps", steps), dtype=float).ravel()
    e = np.asarray(_positive("examples", examples), dtype=float).ravel()
    if s.shape != e.shape:
        raise ValueError(f"steps and examples must have the same shape, got {s.shape}, {e.shape}")
    if s.size < 2:
        raise ValueError("fit_steps_examples needs at least two (steps, examples) points")
    # S_min/S + E_min/E = 1 is homogeneous: fit in units of max S and max E, scale back
    s_scale, e_scale = float(s.max()), float(e.max())
    s, e = s / s_scale, e / e_scale
    if np.any(s < 1e-300) or np.any(e < 1e-300):
        raise ValueError("steps and examples each span more than 300 orders of magnitude: "
                         "no fit in float64")
    batch = e / s
    if np.ptp(np.log(batch)) < 1e-9:
        raise ValueError("fit_steps_examples needs at least two different batch sizes "
                         "(examples/steps); S_min and E_min are not identifiable from one")
    a = np.stack([1.0 / s, 1.0 / e], axis=1)
    try:
        (s0, e0), *_ = np.linalg.lstsq(a, np.ones_like(s), rcond=None)
    except np.linalg.LinAlgError:
        raise ValueError("steps and examples: the linear least-squares start of the fit "
                         "failed") from None
    if not (s0 > 0 and e0 > 0):
        s0, e0 = s.min() * 0.5, e.min() * 0.5

    def residual(log_params):
        s_min, e_min = np.exp(log_params)
        return np.log(s_min + e_min / batch) - np.log(s)

    sol = optimize.least_squares(residual, np.log([s0, e0]), method="lm", xtol=1e-14,
                                 ftol=1e-14)
    s_min, e_min = np.exp(sol.x) * (s_scale, e_scale)
    if not (np.isfinite(s_min) and np.isfinite(e_min) and s_min > 0 and e_min > 0):
        raise ValueError("steps and examples: the fit of S_min and E_min did not converge")
    return float(s_min), float(e_min)


# --------------------------------------------------------------------------- learning-rate units


@_quiet
def base_lr(lr, batch):
    r"""Base learning rate η̃ = η/B: the step per example (sum convention).

    >>> base_lr(0.4, 128)
    0.003125
    """
    return _out(_positive("lr", lr) / _positive("batch", batch))


@_quiet
def lr_from_base(base, batch):
    r"""Learning rate η = η̃·B that multiplies the mean minibatch gradient.

    >>> lr_from_base(0.003125, 128)
    0.4
    """
    return _out(_positive("base", base) * _positive("batch", batch))


@_quiet
def effective_lr(lr, momentum):
    r"""Effective learning rate of heavy-ball momentum (torch form), η/(1−μ).

    >>> effective_lr(0.1, 0.9)
    1.0000000000000002
    """
    return _out(_positive("lr", lr) / (1.0 - _momentum(momentum)))


@_quiet
def temperature(lr, batch, momentum=0.0):
    r"""SGD temperature T = η / (B (1−μ)) (Smith & Le), in base-rate units.

    >>> temperature(0.1, 10, 0.5)
    0.02
    """
    return _out(_positive("lr", lr) / (_positive("batch", batch) * (1.0 - _momentum(momentum))))


@_quiet
def smith_le_noise_scale(lr, batch, n_data, momentum=0.0):
    r"""Smith–Le noise scale g = T·N = η N / (B (1−μ)) (dimensionless).

    >>> smith_le_noise_scale(0.1, 100, 50000)
    50.0
    """
    return _out(temperature(lr, batch, momentum) * _positive("n_data", n_data))


@_quiet
def scaled_lr(lr_ref, batch_ref, batch, rule: str = "linear"):
    r"""Scale a learning rate tuned at ``batch_ref`` to ``batch``.

    ``rule="linear"``: η = η_ref·B/B_ref (constant base rate η/B, right for B ≪ B_noise);
    ``rule="sqrt"``: η = η_ref·√(B/B_ref) (constant noise variance η²/B).

    >>> scaled_lr(0.1, 128, 512), scaled_lr(0.1, 128, 512, rule="sqrt")
    (0.4, 0.2)
    """
    if not isinstance(rule, str) or rule not in ("linear", "sqrt"):
        raise ValueError(f"rule must be 'linear' or 'sqrt', got {_short(rule)}")
    ratio = _positive("batch", batch) / _positive("batch_ref", batch_ref)
    lr_ref = _positive("lr_ref", lr_ref)
    if rule == "linear":
        return _out(lr_ref * ratio)
    if rule == "sqrt":
        return _out(lr_ref * ratio**0.5)
    raise ValueError(f"rule must be 'linear' or 'sqrt', got {rule!r}")


# --------------------------------------------------------------------------- stability limits


@_quiet
def gd_stability_limit(lambda_max, momentum=0.0, *, nesterov=False):
    r"""Largest stable ``lr`` of gradient descent on a quadratic: 2(1+μ)/λ_max.

    Heavy-ball momentum in torch form (v ← μv + g, θ ← θ − ηv) is stable on the mode λ
    iff 0 < ηλ < 2(1+μ). Nesterov in torch form (v ← μv + g, θ ← θ − η(g + μv)) iff
    0 < ηλ < 2(1+μ)/(1+2μ): its map [[1 − ηλ(1+μ), −ημ²], [λ, μ]] has the eigenvalue −1
    there. Also the stability limits of the additive-noise NQM.

    >>> gd_stability_limit(4.0), gd_stability_limit(4.0, momentum=0.9)
    (0.5, 0.95)
    >>> round(gd_stability_limit(4.0, momentum=0.9, nesterov=True), 12)  # 3.8/(4·2.8)
    0.339285714286
    """
    mu = _momentum(momentum)
    nesterov = flag("nesterov", nesterov)
    limit = 2.0 * (1.0 + mu) / _positive("lambda_max", lambda_max)
    return _out(limit / (1.0 + 2.0 * mu) if nesterov else limit)


def _eigenvalues(eigenvalues):
    lam = np.asarray(_positive("eigenvalues", eigenvalues, allow_zero=True), dtype=float)
    if lam.ndim != 1 or lam.size == 0 or not np.any(lam > 0):
        raise ValueError("eigenvalues must be a non-empty 1-D array with a positive entry")
    return lam


@_quiet
def linreg_moment_matrix(eigenvalues, lr, batch):
    r"""Transition matrix of E[e_j²] for SGD on linear regression with Gaussian features.

    With x ~ N(0, diag(λ)), e = w − w*, m_j = E[e_j²] and batches of B drawn with
    replacement (docs/design.md §3),

        m ← A m + (η²/B) σ² λ,   A = diag(1 − 2ηλ_j + η²λ_j²(1 + 1/B)) + (η²/B) λλᵀ.

    Args:
        eigenvalues: λ, the feature covariance spectrum (d,), ≥ 0.
        lr: η (scalar, multiplier of the mean minibatch gradient). batch: B (scalar).

    Returns:
        A, shape (d, d); entries beyond float64 (huge η) are ``inf``.

    >>> linreg_moment_matrix([1.0], 0.5, 1)  # (1-0.5)^2 + 0.25 + 0.25
    array([[0.75]])
    """
    lam = _eigenvalues(eigenvalues)
    lr, batch = _scalar("lr", _positive("lr", lr)), _scalar("batch", _positive("batch", batch))
    u = lr * lam
    v = u / math.sqrt(batch)  # A = diag((1 − u)² + v²) + v vᵀ
    with np.errstate(invalid="ignore"):
        cross = np.outer(v, v)
    lost = np.isnan(cross) & np.outer(lam > 0, lam > 0)  # v_j underflowed, v_l overflowed
    if lost.any():
        log_v = math.log(lr) - 0.5 * math.log(batch) + np.log(np.where(lam > 0, lam, 1.0))
        cross[lost] = np.exp(np.add.outer(log_v, log_v))[lost]
    cross[~np.outer(lam > 0, lam > 0)] = 0.0  # λ_j = 0: exactly 0 (not inf·0)
    return np.diag((1.0 - u) ** 2 + v * v) + cross


def _momentum_scalar(momentum) -> float:
    """A single momentum μ ∈ [0, 1), as a float."""
    return _scalar("momentum", _momentum(momentum))


def _counts(counts, lam: np.ndarray) -> np.ndarray:
    """Multiplicities n_j of the eigenvalues: positive, finite, the shape of ``eigenvalues``."""
    if counts is None:
        return np.ones_like(lam)
    n = np.asarray(_positive("counts", counts), dtype=float)
    if n.shape != lam.shape:
        raise ValueError(f"counts must have the shape of eigenvalues {lam.shape}, got {n.shape}")
    return n


def _secular_coefficients(mu: float, batch: float, nesterov: bool):
    """(c, a₂, a₁, u_B, scale) of the momentum secular equation (see linreg_stability_limit).

    B − s(u) = (a₂u² + a₁u − a₀)·(−1)/den(u) with every aᵢ divided by ``scale`` = max(B, 1)
    (so that nothing overflows at B up to 1e308); u_B is the positive root of
    a₂u² + a₁u − a₀ = 0, where s(u_B) = B.
    """
    scale = max(batch, 1.0)
    if batch < 1e-290:  # η_c ∝ B: below this it is not a normal float64 for any spectrum
        raise ValueError(f"batch {batch:.3g} is too small: η_c(B) ∝ B underflows float64")
    if nesterov:
        c = mu * (1.0 + 2.0 * mu)
        a2 = c * (1.0 / scale + batch / scale)
        a1 = (1.0 + mu) / scale + (batch / scale) * (1.0 - mu - 4.0 * mu * mu)
    else:
        c = a2 = 0.0
        a1 = (1.0 + mu) / scale + (batch / scale) * (1.0 - mu)
    a0 = 2.0 * (batch / scale) * (1.0 - mu * mu)
    disc = math.sqrt(a1 * a1 + 4.0 * a2 * a0)
    u_b = 2.0 * a0 / (a1 + disc) if a1 >= 0 else (disc - a1) / (2.0 * a2)
    return c, a2, a1, u_b, scale


def _secular_margin(t: float, lam: np.ndarray, counts: np.ndarray, mu: float, coef) -> float:
    """1 − 2/(φ+1) at η = t·u_B/λ_max (λ scaled to max 1): same sign as φ − 1, bounded."""
    c, a2, a1, u_b, scale = coef
    u = t * u_b * lam
    # n_j s_j/(B − s_j) = n_j u(1 + μ + cu) / ((u_B − u)(a₁ + a₂(u + u_B))), u_B − u exact-ish
    with np.errstate(over="ignore"):
        terms = u * (1.0 + mu + c * u) / (scale * u_b * (1.0 - t * lam) * (a1 + a2 * (u + u_b)))
        phi = float(counts @ terms)
    return 1.0 - 2.0 / (phi + 1.0)


@_quiet
def linreg_stability_limit(eigenvalues, batch, *, momentum=0.0, nesterov=False, counts=None):
    r"""Largest stable ``lr`` η_c(B) of SGD (or torch momentum) on Gaussian linear regression.

    Model (docs/design.md §3): x ~ N(0, H), H = diag(λ), e = w − w*, Ĥ = (1/B) Σ_i x_i x_iᵀ
    over a batch of B examples drawn with replacement (or from infinite data), minibatch
    gradient g = Ĥe (label noise only adds a constant forcing: it does not move the limit).
    Torch's heavy ball (v ← μv + g, θ ← θ − ηv) and Nesterov (θ ← θ − η(g + μv_new)) are

        v' = μv + g,   e' = e − a g − b v,   (a, b) = (η, ημ) heavy ball, (η(1+μ), ημ²) Nesterov.

    Second moments. Gaussian fourth moments, E[x xᵀ M x xᵀ] = 2HMH + tr(HM)H, give
    E[Ĥ M Ĥ] = (1 + 1/B) HMH + tr(HM) H/B. The recursion M ← E[M̂ M M̂ᵀ] of all (2d)² moments
    of z = (e, v) is a positive map that commutes with flipping the sign of any direction,
    so its spectral radius is reached on the 2×2 blocks Z_j = E[(e_j, v_j)ᵀ(e_j, v_j)]:

        Z_j ← K_j Z_j K_jᵀ + (λ_j/B) (λ_j P_j + Σ_k n_k λ_k P_k) c cᵀ,
        K_j = [[1 − aλ_j, −b], [λ_j, μ]],   c = (−a, 1)ᵀ,   P_j = E[e_j²],

    n_k the multiplicity of λ_k: a block-diagonal positive map D plus a rank-one positive
    coupling. Let h_j be the stationary E[e²] of z ← K_j z + c ξ (unit white noise ξ) and
    s = λ_j² h_j, a function of u = ηλ_j:

        heavy ball: s(u) = (1+μ) u / ((1−μ)(2(1+μ) − u)),
        Nesterov:   s(u) = u (1 + μ + μ(1+2μ)u) / ((1 − μ + μu)(2(1+μ) − (1+2μ)u)).

    For positive maps ρ(D + u vᵀ) < 1 ⇔ ρ(D) < 1 and vᵀ(I − D)⁻¹u < 1, i.e. s(ηλ_j) < B for
    every j and

        φ(η) = Σ_j n_j s(ηλ_j) / (B − s(ηλ_j)) < 1.

    s increases with u from 0 (to ∞ at the GD limit u = 2(1+μ), resp. 2(1+μ)/(1+2μ)), so φ
    increases from 0 to ∞ on 0 < η < u_B/λ_max, where s(u_B) = B (a quadratic in u), and η_c
    is its unique root (Brent's method, machine precision); every larger η is unstable. At
    μ = 0 both forms give s = u/(2 − u), φ(η) = (η/B) Σ_j n_j λ_j / (2 − ηλ_j(1 + 1/B)).
    Limits: at small B, η_c → (1 − μ) κ B, linear in B, with κ the root of
    Σ_j n_j κλ_j/(2 − κλ_j) = 1 (κ ≈ 2/tr H when tr H ≫ λ_max: the effective rate
    η/(1−μ) ≈ 2B/tr H); as B → ∞, η_c → :func:`gd_stability_limit` (λ_max, μ, nesterov).
    It does not depend on the dataset size.

    Args:
        eigenvalues: λ (k,), feature covariance spectrum (≥ 0, one positive), or the distinct
            values of it with ``counts``.
        batch: B, scalar or array (examples per step, > 0).
        momentum: μ ∈ [0, 1), a scalar (torch heavy ball, or Nesterov with ``nesterov``).
        nesterov: torch's Nesterov form (bool).
        counts: multiplicities n_j (k,), positive (default 1 each): λ_j stands for n_j equal
            directions, e.g. top Lanczos eigenvalues plus one bulk value with count p − k
            (:func:`spectrum_from_top_and_trace`). Exactly equal to repeating λ_j n_j times.

    Returns:
        η_c(B) in ``lr`` units (same shape as ``batch``).

    >>> round(linreg_stability_limit([1.0], 1), 12)  # d=1, B=1: φ(η) = η/(2−2η) = 1
    0.666666666667
    >>> round(linreg_stability_limit([1.0], 1e12, momentum=0.9), 6)  # → 2(1+μ)/λ_max
    3.8
    """
    lam = _eigenvalues(eigenvalues)
    n = _counts(counts, lam)
    mu = _momentum_scalar(momentum)
    nesterov = flag("nesterov", nesterov)
    batches = np.asarray(_positive("batch", batch), dtype=float)
    lam_max = float(lam.max())
    lam_s = lam / lam_max  # scale-free: η_c(λ) = η_c(λ/λ_max)/λ_max
    with np.errstate(over="ignore"):
        total = n @ lam_s
    if not np.isfinite(total):
        raise ValueError(f"counts are too large: Σ n_j λ_j/λ_max overflows, got {counts!r}")
    out = np.empty_like(batches)
    hi = np.nextafter(1.0, 0.0)
    for idx, b in np.ndenumerate(batches):
        coef = _secular_coefficients(mu, float(b), nesterov)
        args = (lam_s, n, mu, coef)
        if _secular_margin(hi, *args) <= 0:  # root within one rounding step of the pole
            t = hi
        else:
            try:
                t = optimize.brentq(_secular_margin, 0.0, hi, args=args, xtol=1e-300,
                                    rtol=4 * np.finfo(float).eps, maxiter=4000)
            except (ValueError, RuntimeError):  # not expected: φ is continuous, monotone
                raise ValueError(f"eigenvalues and batch {b:.6g}: no root of the secular "
                                 "equation found (please report this input)") from None
        with np.errstate(over="ignore", under="ignore"):
            out[idx] = t * coef[3] / lam_max
        if not (np.isfinite(out[idx]) and out[idx] >= np.finfo(float).tiny):
            given = "" if counts is None else f", counts with Σn = {n.sum():.3g}"
            raise ValueError(f"η_c = {t * coef[3]:.3g}/λ_max is not a normal float64 for "
                             f"eigenvalues with λ_max = {lam_max:.3g}{given} and batch {b:.3g}")
    return _out(out)


@_quiet
def spectrum_from_top_and_trace(top_eigenvalues, trace, dim, *, trace_se=0.0):
    r"""A spectrum (eigenvalues, counts) from the top-k Hessian eigenvalues, tr(H) and p.

    For :func:`linreg_stability_limit` on a measured network: Lanczos gives the top k
    eigenvalues λ_1 … λ_k, Hutchinson the trace tr(H) (± ``trace_se``), and p is the
    parameter count. **Assumption:** the p − k unresolved directions share the remaining
    trace equally,

        λ_rest = (tr H − Σ_{i≤k} λ_i) / (p − k),   with multiplicity p − k,

    which keeps tr H exact (the small-B limit η_c ≈ 2B(1−μ)/tr H) and λ_max exact (the
    large-B limit) and needs p − k directions only as one number.

    A trace below Σλ_i is a contradiction unless it is a Hutchinson fluctuation: a deficit
    up to 2·``trace_se`` (two standard errors) is taken as λ_rest = 0, a larger one raises
    ``ValueError``; so does a λ_rest above min λ_i by more than 2·trace_se/(p − k) (then the
    given eigenvalues are not the top ones, or ``dim`` is wrong).

    Args:
        top_eigenvalues: λ_1 … λ_k (k,), ≥ 0 (the largest eigenvalues of H).
        trace: tr(H), Hutchinson estimate (finite).
        dim: p, number of parameters (integer ≥ k).
        trace_se: standard error of ``trace`` (≥ 0; default 0: an exact trace).

    Returns:
        ``(eigenvalues, counts)``: the top eigenvalues with count 1 each, then λ_rest with
        count p − k (left out when p = k or λ_rest = 0).

    >>> lam, n = spectrum_from_top_and_trace([5.0, 3.0], 12.0, 10)
    >>> lam.tolist(), n.tolist()
    ([5.0, 3.0, 0.5], [1.0, 1.0, 8.0])
    """
    top = np.asarray(_positive("top_eigenvalues", top_eigenvalues, allow_zero=True),
                     dtype=float)
    if top.ndim != 1 or top.size == 0:
        raise ValueError(f"top_eigenvalues must be a non-empty 1-D array, got shape {top.shape}")
    trace = _scalar("trace", _arr("trace", trace))
    trace_se = _scalar("trace_se", _positive("trace_se", trace_se, allow_zero=True))
    dim = _integer("dim", dim, minimum=top.size)
    rest_dim = dim - top.size
    with np.errstate(over="ignore"):
        remainder = trace - float(top.sum())
    if not np.isfinite(remainder):
        raise ValueError(f"trace and top_eigenvalues overflow float64 (trace={trace!r})")
    if remainder < 0 or rest_dim == 0:
        if abs(remainder) > 2.0 * trace_se:
            what = ("is below the sum of" if remainder < 0
                    else f"with dim = k = {dim} exceeds the sum of all")
            raise ValueError(f"trace ({trace:.6g} ± {trace_se:.2g}) {what} the top eigenvalues "
                             f"({top.sum():.6g}) by more than 2 standard errors")
        remainder = 0.0
    rest = remainder / rest_dim if rest_dim else 0.0
    if rest > top.min() + 2.0 * trace_se / max(rest_dim, 1):
        raise ValueError(f"trace: the remaining trace spread over dim − k = {rest_dim} "
                         f"directions gives {rest:.6g} per direction, above the smallest top "
                         f"eigenvalue {top.min():.6g} (top_eigenvalues not the top, or dim wrong)")
    if rest == 0.0:
        return top, np.ones_like(top)
    return np.append(top, rest), np.append(np.ones_like(top), float(rest_dim))
