r"""Unbiased estimators of the gradient noise scale and of the curvature along the gradient.

Conventions (docs/design.md §2): L is the *mean* loss over examples, G = ∇L, H = ∇²L, Σ the
covariance of per-example gradients (1/N normalisation on a finite set of N examples).
A minibatch gradient G_B = (1/B) Σ_{i∈batch} ∇ℓ_i is the *mean* over its B examples, and

    E|G_B|² = |G|² + tr(Σ)/B                        (with replacement / infinite data)
    E|G_B|² = |G|² + tr(Σ)/B · (N−B)/(N−1)          (without replacement from N examples)

(McCandlish et al. 2018, App. A). Every estimator here is an *unbiased* estimate of |G|² and
tr(Σ) (or of GᵀHG and tr(HΣ)); a single estimate is noisy and can be negative. Ratios such as
B_simple = tr(Σ)/|G|² are formed only after averaging numerator and denominator separately
(:class:`NoiseScaleEMA`): the mean of per-step ratios is biased.

Arrays: NumPy, CuPy or torch, replicas on the leading axes and parameters last; results keep
the input's backend (0-d NumPy results become Python floats). Summary objects
(:class:`NoiseEstimate`, :class:`CurvatureEstimate`, the EMAs) hold NumPy floats/arrays and give
a standard error and a confidence interval for every quantity. Nothing here imports torch or
CuPy at module import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from operator import attrgetter

import numpy as np
from scipy import stats as _stats

from sgdtheory import theory
from sgdtheory._checks import _short, integer, real, real_array
from sgdtheory.backend import backend_of

__all__ = [
    "Advice",
    "CurvatureEMA",
    "CurvatureEstimate",
    "NoiseEstimate",
    "NoiseScaleEMA",
    "RatioEMA",
    "SequentialNoiseScale",
    "advise_batch_size",
    "curvature_scales",
    "per_sample",
    "per_sample_stats",
    "two_batch",
    "two_batch_curvature",
    "two_batch_curvature_stats",
    "two_batch_stats",
]


# --------------------------------------------------------------------------- backend helpers


def _is_array(x) -> bool:
    """Whether ``x`` is a CuPy or torch array (kept on its backend)."""
    return not backend_of(x).numpy_native


def _to_numpy(x):
    """A NumPy copy of ``x`` (float64), whatever its backend."""
    return backend_of(x).to_numpy(x, dtype=float)


def _all_finite(x) -> bool:
    return backend_of(x).all_finite(x)


def _any(cond) -> bool:
    return bool(cond.any()) if hasattr(cond, "any") else bool(cond)


def _backend_real(name: str, x):
    """A torch/CuPy array ``x`` checked to hold finite real numbers (no bool or complex)."""
    dtype = x.dtype
    kind = getattr(dtype, "kind", None)  # CuPy: NumPy dtypes; torch: is_complex/is_floating
    real = kind in ("i", "u", "f") if kind is not None else not (
        dtype.is_complex or str(dtype) == "torch.bool")
    if not real:
        raise ValueError(f"{name} must hold real numbers (not bool or complex), got {dtype}")
    if not _all_finite(x):
        raise ValueError(f"{name} must be finite")
    return x


def _value(name: str, x):
    """``x`` checked finite and real: backend arrays pass through, the rest becomes a float or
    a float64 ndarray (strings, bools, complex values, None and ragged lists refused)."""
    if _is_array(x):
        x = _backend_real(name, x)
        if math.prod(x.shape) == 0:
            raise ValueError(f"{name} must not be empty")
        return x
    a = real_array(name, x)
    if a.size == 0:
        raise ValueError(f"{name} must not be empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got {_short(x)}")
    return float(a) if a.ndim == 0 else a


def _float(name: str, x) -> float:
    """A finite Python float from a float, NumPy scalar or 0-d (or 1-element) array/tensor."""
    if type(x) is float or type(x) is np.float64:  # fast path for per-step updates
        if x - x == 0.0:
            return float(x)
        raise ValueError(f"{name} must be finite, got {x!r}")
    if _is_array(x):
        if getattr(x, "ndim", 0) > 1 or math.prod(getattr(x, "shape", ())) != 1:
            raise ValueError(f"{name} must be a real scalar, got shape {tuple(x.shape)}")
        x = _backend_real(name, x).item()  # one copy to the host
    elif isinstance(x, np.ndarray) and x.size != 1:
        raise ValueError(f"{name} must be a real scalar, got shape {x.shape}")
    return real(name, x)


def _out(x):
    if isinstance(x, np.generic) or (isinstance(x, np.ndarray) and x.ndim == 0):
        return float(x)
    return x


def _noise_factor(name: str, batch, n_data):
    """c(B)/B with c(B) = (N−B)/(N−1) (1 with replacement): E|G_B|² = |G|² + tr(Σ)·c(B)/B."""
    if n_data is None:
        return 1.0 / batch
    n = _float("n_data", n_data)
    if n < 2:
        raise ValueError(f"n_data must be at least 2, got {n_data!r}")
    if np.any(np.asarray(batch) > n):
        raise ValueError(f"{name} ({_short(batch)}) must not exceed n_data ({n_data!r})")
    return (n - batch) / (n - 1.0) / batch


#: largest batch size the two-batch formulas take (B_small·B_big stays within float64)
MAX_BATCH = 2.0**53


def _batches(b_small, b_big, n_data):
    bs = _value("b_small", b_small)
    bb = _value("b_big", b_big)
    bs_np, bb_np = _to_numpy(bs), _to_numpy(bb)
    if np.any(bs_np < 1):
        raise ValueError(f"b_small must be at least 1 example, got {_short(b_small)}")
    if np.any(bb_np > MAX_BATCH):
        raise ValueError(f"b_big must be at most 2**53 examples, got {_short(b_big)}")
    if np.any(bb_np <= bs_np):
        raise ValueError(f"b_small must be smaller than b_big, got b_small={b_small!r}, "
                         f"b_big={b_big!r}")
    try:
        np.broadcast_shapes(np.shape(bs_np), np.shape(bb_np))
    except ValueError:
        raise ValueError(f"b_small and b_big must broadcast together, got shapes "
                         f"{np.shape(bs_np)} and {np.shape(bb_np)}") from None
    if n_data is None:  # exact in floating point for integer batches: ("batch", B)
        return ("batch", _out(bs_np)), ("batch", _out(bb_np))
    a_small = _noise_factor("b_small", bs_np, n_data)
    a_big = _noise_factor("b_big", bb_np, n_data)
    return ("factor", _out(a_small)), ("factor", _out(a_big))


def _nonneg(name: str, x):
    x = _value(name, x)
    if _any(x < 0):
        raise ValueError(f"{name} must be non-negative (a squared norm), got {x!r}")
    return x


def _like(value, ref):
    """Convert a NumPy coefficient to ``ref``'s backend when ``ref`` is a torch/CuPy array."""
    if isinstance(value, float) or not _is_array(ref):
        return value
    return backend_of(ref).asarray(value, dtype=ref.dtype)


def _pow2_scale(*arrays) -> float:
    """A power of two s ≈ max |x| over ``arrays`` when that is beyond 2^±400 (else 1): dividing
    by s is exact, and squares and sums of the scaled values cannot overflow or underflow."""
    m = max((float(abs(a).max()) if math.prod(getattr(a, "shape", ())) else 0.0)
            if hasattr(a, "shape") else abs(float(a)) for a in arrays)
    if m == 0.0 or 2.0**-400 < m < 2.0**400:
        return 1.0
    return math.ldexp(1.0, min(math.frexp(m)[1], 1023))


def _two_batch_solve(small, big, a_small, a_big, names="grad_sq_small, grad_sq_big"):
    """Solve E[small] = x + a_s·y, E[big] = x + a_b·y for (x, y), in the scaled form of
    :func:`_pow2_scale` (a solution beyond float64 is ±inf, never NaN).

    ``a_small``/``a_big`` are ("factor", a) or ("batch", B) with a = 1/B.
    """
    try:
        np.broadcast_shapes(*(tuple(getattr(v, "shape", ())) for v in (small, big, a_small[1],
                                                                       a_big[1])))
    except ValueError:
        raise ValueError(f"{names}, b_small and b_big must broadcast together") from None
    s = _pow2_scale(small, big)
    if s != 1.0:
        x, y = _two_batch_solve(small / s, big / s, a_small, a_big, names)
        with np.errstate(over="ignore"):
            return _out(x * s), _out(y * s)
    if a_small[0] == "batch":
        b_s, b_b = _like(a_small[1], small), _like(a_big[1], big)
        y = (small - big) * (b_s * b_b) / (b_b - b_s)
        x = (b_b * big - b_s * small) / (b_b - b_s)
        return _out(x), _out(y)
    a_s, a_b = _like(a_small[1], small), _like(a_big[1], big)
    y = (small - big) / (a_s - a_b)
    x = (a_s * big - a_b * small) / (a_s - a_b)
    return _out(x), _out(y)


# --------------------------------------------------------------------------- summaries


def _t_quantile(confidence: float, df):
    confidence = _float("confidence", confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    df = np.maximum(np.asarray(df, dtype=float), 1.0)
    return _stats.t.ppf(0.5 + 0.5 * confidence, df)


def _ratio(num, den, var_num, var_den, cov):
    """r = max(num, 0)/den and its delta-method standard error (``inf`` when den ≤ 0).

    Var(r) = (var_num − 2r·cov + r²·var_den)/den², computed as m²·(a'² − 2ρa'b' + b'²) with
    a = σ_num/den, b = r·σ_den/den, ρ = cov/(σ_num σ_den) ∈ [−1, 1], m = max(a, b) and
    a' = a/m, b' = b/m: no intermediate overflows or cancels to a negative variance, so the
    error is finite, or ``inf`` when it is beyond float64 (or unknown: an infinite variance),
    never NaN.
    """
    if all(np.ndim(v) == 0 for v in (num, den, var_num, var_den, cov)):
        return _ratio_scalar(*(float(v) for v in (num, den, var_num, var_den, cov)))
    num, den = np.asarray(num, float), np.asarray(den, float)
    var_num, var_den, cov = (np.asarray(v, float) for v in (var_num, var_den, cov))
    with np.errstate(all="ignore"):
        pos = den > 0
        d = np.where(pos, den, 1.0)
        r = np.where(pos, np.maximum(num, 0.0) / d, np.inf)
        s_num = np.sqrt(np.maximum(var_num, 0.0))
        s_den = np.sqrt(np.maximum(var_den, 0.0))
        a = s_num / d
        b = np.where(np.isfinite(r), r, 0.0) * (s_den / d)
        known = np.isfinite(a) & np.isfinite(b) & np.isfinite(cov)
        both = known & (s_num > 0) & (s_den > 0)
        rho = np.clip(np.where(both, cov / np.where(both, s_num, 1.0)
                               / np.where(both, s_den, 1.0), 0.0), -1.0, 1.0)
        m = np.maximum(a, b)
        big = known & (m > 0)
        ap, bp = np.where(big, a / np.where(big, m, 1.0), 0.0), np.where(
            big, b / np.where(big, m, 1.0), 0.0)
        rel = np.maximum(ap * ap - 2.0 * rho * ap * bp + bp * bp, 0.0)
        se = np.where(known, m * np.sqrt(rel), np.inf)
        se = np.where(np.isfinite(r), se, np.inf)
    return _out(r), _out(se)


def _ratio_scalar(num: float, den: float, var_num: float, var_den: float, cov: float):
    """:func:`_ratio` for Python floats, step for step (NaN propagating as in NumPy's maximum):
    a tenth of the time of 0-d arrays, for the estimators' per-step updates."""

    def pos_part(v):  # np.maximum(v, 0.0)
        return v if (v > 0.0 or v != v) else 0.0

    pos = den > 0.0
    d = den if pos else 1.0
    r = pos_part(num) / d if pos else math.inf
    s_num, s_den = math.sqrt(pos_part(var_num)), math.sqrt(pos_part(var_den))
    a = s_num / d
    b = (r if math.isfinite(r) else 0.0) * (s_den / d)
    known = math.isfinite(a) and math.isfinite(b) and math.isfinite(cov)
    rho = cov / s_num / s_den if known and s_num > 0.0 and s_den > 0.0 else 0.0
    rho = min(max(rho, -1.0), 1.0)
    m = a if (a >= b or a != a) else b  # np.maximum
    if known and m > 0.0:
        ap, bp = a / m, b / m
    else:
        ap = bp = 0.0
    rel = pos_part(ap * ap - 2.0 * rho * ap * bp + bp * bp)
    se = m * math.sqrt(rel) if known else math.inf
    return r, (se if math.isfinite(r) else math.inf)


class _Intervals:
    """``ci(name)`` for a summary dataclass with ``name``, ``name_stderr`` and ``df`` fields."""

    def ci(self, name: str, confidence: float = 0.95):
        """(low, high) interval of an estimated quantity (Student's t with ``df``)."""
        return _ci(self, name, confidence)


@dataclass(frozen=True)
class NoiseEstimate(_Intervals):
    """|G|², tr(Σ) and B_simple = tr(Σ)/|G|² with standard errors.

    Attributes (floats, or NumPy arrays for stacked replicas):
        grad_sq, tr_sigma: unbiased estimates of |G|² and tr(Σ) (mean-loss units).
        grad_sq_stderr, tr_sigma_stderr: their standard errors.
        cov: covariance of the two estimates.
        b_simple, b_simple_stderr: max(tr_sigma, 0)/grad_sq (``inf`` when grad_sq ≤ 0) and its
            delta-method standard error, in examples.
        df: degrees of freedom of the standard errors (intervals use Student's t).
    """

    grad_sq: float
    tr_sigma: float
    grad_sq_stderr: float
    tr_sigma_stderr: float
    cov: float
    b_simple: float
    b_simple_stderr: float
    df: float


@dataclass(frozen=True)
class CurvatureEstimate(_Intervals):
    """GᵀHG, tr(HΣ), B_noise = tr(HΣ)/GᵀHG (and ε_max = |G|²/GᵀHG) with standard errors.

    Attributes (floats, or NumPy arrays for stacked replicas):
        g_h_g, tr_h_sigma (+ ``_stderr``): unbiased estimates and standard errors.
        cov: covariance of the two estimates.
        b_noise, b_noise_stderr: max(tr_h_sigma, 0)/g_h_g (``inf`` when g_h_g ≤ 0), examples.
        eps_max, eps_max_stderr: max(grad_sq, 0)/g_h_g in ``lr`` units (multiplier of the mean
            minibatch gradient); None when no |G|² estimate was given.
        df: degrees of freedom of the standard errors.
    """

    g_h_g: float
    tr_h_sigma: float
    g_h_g_stderr: float
    tr_h_sigma_stderr: float
    cov: float
    b_noise: float
    b_noise_stderr: float
    eps_max: float | None
    eps_max_stderr: float | None
    df: float


def _ci(obj, name, confidence):
    if (not isinstance(name, str) or name not in obj.__dataclass_fields__
            or name + "_stderr" not in obj.__dataclass_fields__):
        raise ValueError(f"name must be an estimated quantity of {type(obj).__name__}, "
                         f"got {_short(name)}")
    if getattr(obj, name) is None:
        raise ValueError(f"name: {name} was not estimated (no grad_sq was given)")
    return _interval(getattr(obj, name), getattr(obj, name + "_stderr"), confidence, obj.df)


def _interval(value, stderr, confidence, df):
    """value ± t·stderr; (0, ∞) where the value (a clamped ratio) or its error is infinite."""
    v, se = np.asarray(value, float), np.asarray(stderr, float)
    with np.errstate(over="ignore", invalid="ignore"):
        half = _t_quantile(confidence, df) * se
        ok = np.isfinite(v) & np.isfinite(half)
        lo = np.where(ok, v - np.where(ok, half, 0.0), 0.0)
        hi = np.where(ok, v + np.where(ok, half, 0.0), np.inf)
    return _out(lo), _out(hi)


def _axis(axis, ndim: int) -> int:
    return integer("axis", axis, -max(ndim, 1), max(ndim, 1) - 1)


def _finite_estimates(names: str, *arrays) -> None:
    """Refuse per-step estimates that overflowed float64 (inputs near its limit)."""
    if not all(_all_finite(a) for a in arrays):
        raise ValueError(f"{names}: the per-step estimates overflow float64; rescale the loss")


def _mean_stats(x, y, axis, names="the paired measurements"):
    """Means of paired unbiased draws x, y along ``axis`` with standard errors and covariance.

    Each of x, y is divided by a power of two (:func:`_pow2_scale`) first, so the squares
    cannot overflow; a variance beyond float64 comes back as ``inf``."""
    x, y = _to_numpy(x), _to_numpy(y)
    try:
        x, y = np.broadcast_arrays(x, y)
    except ValueError:
        raise ValueError(f"{names} must have broadcastable shapes, got {x.shape} and "
                         f"{y.shape}") from None
    axis = _axis(axis, x.ndim)
    x, y = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)
    m = x.shape[-1] if x.ndim else 0
    if m < 2:
        raise ValueError(f"need at least two repeated measurements along axis {axis}, got {m}")
    sx, sy = _pow2_scale(x), _pow2_scale(y)
    x, y = x / sx, y / sy
    mx, my = x.mean(-1), y.mean(-1)
    dx, dy = x - mx[..., None], y - my[..., None]
    vx = (dx * dx).sum(-1) / (m - 1) / m
    vy = (dy * dy).sum(-1) / (m - 1) / m
    cxy = (dx * dy).sum(-1) / (m - 1) / m
    with np.errstate(over="ignore"):
        return mx * sx, my * sy, vx * sx * sx, vy * sy * sy, cxy * sx * sy, m - 1


# --------------------------------------------------------------------------- two batch sizes


def two_batch(grad_sq_small, grad_sq_big, b_small, b_big, *, n_data=None):
    r"""Unbiased |G|² and tr(Σ) from squared gradient norms at two batch sizes.

    From E|G_B|² = |G|² + tr(Σ)/B (McCandlish et al. 2018, App. A), with batches of b_small and
    b_big examples,

        |G|²  = (B_big |G_big|² − B_small |G_small|²) / (B_big − B_small)
        tr(Σ) = (|G_small|² − |G_big|²) / (1/B_small − 1/B_big).

    With ``n_data`` = N (batches drawn without replacement from N examples, Σ with 1/N
    normalisation) 1/B becomes (N−B)/((N−1)B) in both equations. Each single estimate is
    unbiased but noisy and may be negative: average |G|² and tr(Σ) separately over many steps
    (:class:`NoiseScaleEMA`) before dividing.

    Args:
        grad_sq_small: |G_small|², squared norm of the *mean* gradient of a batch of b_small.
        grad_sq_big: |G_big|², same for a batch of b_big (independent of, or containing, the
            small batch: the expectations are the same).
        b_small, b_big: batch sizes in examples, 0 < b_small < b_big.
        n_data: optional dataset size N ≥ b_big for sampling without replacement.

    Returns:
        (grad_sq, tr_sigma): unbiased estimates of |G|² and tr(Σ), in the backend of the input
        (arrays broadcast; NumPy scalars become floats).

    >>> two_batch(3.0, 1.2, 10, 100)  # |G|² = 1, tr(Σ) = 20
    (1.0, 20.0)
    """
    a_small, a_big = _batches(b_small, b_big, n_data)
    small = _nonneg("grad_sq_small", grad_sq_small)
    big = _nonneg("grad_sq_big", grad_sq_big)
    return _two_batch_solve(small, big, a_small, a_big)


def two_batch_stats(grad_sq_small, grad_sq_big, b_small, b_big, *, n_data=None, axis=-1):
    r"""Average of many two-batch estimates, with standard errors (:class:`NoiseEstimate`).

    Each pair (|G_small|², |G_big|²) along ``axis`` (e.g. one per training step or per
    data-parallel rank) gives unbiased draws of |G|² and tr(Σ) (:func:`two_batch`); their means
    have standard errors std/√m, and B_simple = tr(Σ)/|G|² is the ratio of the means, with a
    delta-method standard error. Draws are assumed independent.

    Args:
        grad_sq_small, grad_sq_big: arrays with m ≥ 2 repeated measurements along ``axis``.
        b_small, b_big, n_data: as in :func:`two_batch` (scalars).
        axis: axis of the repetitions.

    >>> est = two_batch_stats([3.0, 3.2, 2.8], [1.2, 1.25, 1.15], 10, 100)
    >>> round(est.grad_sq, 6), round(est.tr_sigma, 6), round(est.b_simple, 6)
    (1.0, 20.0, 20.0)
    """
    g, t = two_batch(grad_sq_small, grad_sq_big, b_small, b_big, n_data=n_data)
    _finite_estimates("grad_sq_small, grad_sq_big", g, t)
    mg, mt, vg, vt, c, df = _mean_stats(g, t, axis)
    b, b_se = _ratio(mt, mg, vt, vg, c)
    return NoiseEstimate(_out(mg), _out(mt), _out(np.sqrt(vg)), _out(np.sqrt(vt)), _out(c),
                         b, b_se, df)


def two_batch_curvature(ghg_small, ghg_big, b_small, b_big, *, n_data=None):
    r"""Unbiased GᵀHG and tr(HΣ) from ĝᵀHĝ measured at two batch sizes.

    With ĝ = G_B the mean gradient of a batch of B and H (or an unbiased estimate of it, e.g. a
    Hessian-vector product on an *independent* batch),

        E[ĝᵀHĝ] = GᵀHG + tr(HΣ)/B,

    so the two-batch solve of :func:`two_batch` gives GᵀHG and tr(HΣ), hence
    B_noise = tr(HΣ)/GᵀHG and ε_max = |G|²/GᵀHG (:func:`curvature_scales`). The Hessian batch
    must be independent of ĝ, or E[ĝᵀHĝ] picks up third-moment terms.

    Args:
        ghg_small, ghg_big: ĝᵀHĝ for the mean gradients of batches of b_small and b_big
            (loss units; may be negative when H is indefinite).
        b_small, b_big: batch sizes in examples, 0 < b_small < b_big.
        n_data: optional dataset size N for batches drawn without replacement.

    Returns:
        (g_h_g, tr_h_sigma), unbiased, in the backend of the input.

    >>> ghg, trhs = two_batch_curvature(5.0, 2.3, 10, 100)  # GᵀHG = 2, tr(HΣ) = 30
    >>> round(ghg, 12), round(trhs, 12)
    (2.0, 30.0)
    """
    a_small, a_big = _batches(b_small, b_big, n_data)
    small = _value("ghg_small", ghg_small)
    big = _value("ghg_big", ghg_big)
    return _two_batch_solve(small, big, a_small, a_big, "ghg_small, ghg_big")


def two_batch_curvature_stats(ghg_small, ghg_big, b_small, b_big, *, grad_sq=None,
                              n_data=None, axis=-1):
    r"""Average of many two-batch curvature estimates (:class:`CurvatureEstimate`).

    Args:
        ghg_small, ghg_big: ĝᵀHĝ at the two batch sizes, m ≥ 2 repetitions along ``axis``.
        b_small, b_big, n_data: as in :func:`two_batch_curvature`.
        grad_sq: optional unbiased |G|² draws paired with them (e.g. from :func:`two_batch` on
            the same steps), giving ε_max = |G|²/GᵀHG with a delta-method standard error.
        axis: axis of the repetitions.

    >>> est = two_batch_curvature_stats([5.0, 5.2, 4.8], [2.3, 2.32, 2.28], 10, 100,
    ...                                 grad_sq=[1.0, 1.1, 0.9])
    >>> round(est.g_h_g, 6), round(est.b_noise, 6), round(est.eps_max, 6)
    (2.0, 15.0, 0.5)
    """
    ghg, thS = two_batch_curvature(ghg_small, ghg_big, b_small, b_big, n_data=n_data)
    _finite_estimates("ghg_small, ghg_big", ghg, thS)
    mg, mt, vg, vt, c, df = _mean_stats(ghg, thS, axis)
    b, b_se = _ratio(mt, mg, vt, vg, c)
    if grad_sq is None:
        e, e_se = None, None
    else:
        ms, _, vs, _, csg, _ = _mean_stats(_value("grad_sq", grad_sq), ghg, axis,
                                           "grad_sq and ghg_small, ghg_big")
        e, e_se = _ratio(ms, mg, vs, vg, csg)
    return CurvatureEstimate(_out(mg), _out(mt), _out(np.sqrt(vg)), _out(np.sqrt(vt)), _out(c),
                             b, b_se, e, e_se, df)


def curvature_scales(grad_sq, g_h_g, tr_h_sigma):
    r"""ε_max = |G|²/GᵀHG and B_noise = tr(HΣ)/GᵀHG from (averaged) estimates.

    Uses :func:`sgdtheory.theory.eps_max` and :func:`sgdtheory.theory.b_noise`. Averaged
    unbiased estimates of |G|² and tr(HΣ) can still be slightly negative: they are clamped at
    0; when GᵀHG ≤ 0 (no measured curvature along G) both results are ``inf``.

    Args:
        grad_sq: |G|² estimate. g_h_g: GᵀHG estimate. tr_h_sigma: tr(HΣ) estimate.
            Floats, NumPy arrays or 0-d tensors.

    Returns:
        (eps_max, b_noise): ε_max in ``lr`` units (multiplier of the mean minibatch gradient),
        B_noise in examples.

    >>> curvature_scales(1.0, 2.0, 30.0)
    (0.5, 15.0)
    """
    gs = np.maximum(_to_numpy(_value("grad_sq", grad_sq)), 0.0)
    ghg = _to_numpy(_value("g_h_g", g_h_g))
    ths = np.maximum(_to_numpy(_value("tr_h_sigma", tr_h_sigma)), 0.0)
    gs, ghg, ths = np.broadcast_arrays(gs, ghg, ths)
    pos = ghg > 0
    safe = np.where(pos, ghg, 1.0)
    e = np.where(pos, theory.eps_max(gs, safe), np.inf)
    b = np.where(pos, theory.b_noise(ths, safe), np.inf)
    return _out(e), _out(b)


# --------------------------------------------------------------------------- per-sample gradients


def _per_sample_parts(grads, n_data):
    grads = _value("grads", grads)
    if not hasattr(grads, "shape") or len(grads.shape) < 2:
        raise ValueError("grads must have shape (..., n, p): n per-example gradients of p "
                         f"parameters, got shape {getattr(grads, 'shape', ())}")
    n = grads.shape[-2]
    if n < 2:
        raise ValueError(f"grads must hold at least two per-example gradients, got n={n}")
    scale = _pow2_scale(grads)  # scaled form: |g|² of gradients near 1e200 cannot overflow
    if scale != 1.0:
        grads = grads / scale
    if n_data is not None:
        nd = _float("n_data", n_data)
        if nd < n:
            raise ValueError(f"n_data ({n_data!r}) must be at least the number of samples {n}")
        fpc = (nd - n) / nd  # 1 − n/N
        sig = (nd - 1.0) / nd  # Σ (1/N) = (N−1)/N · S² (1/(N−1))
    else:
        fpc, sig = 1.0, 1.0
    mean = grads.sum(-2) / n
    # |c_i|² and c_i·ḡ with c_i = g_i − ḡ, in chunks of examples: no (n, p) temporary, and no
    # cancellation in |g_i|² − |ḡ|² when the mean dominates the noise
    be = backend_of(grads)
    size = math.prod(grads.shape) // n  # elements of one example across the leading axes
    chunk = max(1, (1 << 22) // max(size, 1))  # bounded temporary: ≤ 4M elements
    a, b = [], []
    for start in range(0, n, chunk):
        c = grads[..., start:start + chunk, :] - mean[..., None, :]
        a.append(be.xp.einsum("...ij,...ij->...i", c, c))
        b.append(be.xp.einsum("...ij,...j->...i", c, mean))
    return n, mean, be.concatenate(a, -1), be.concatenate(b, -1), fpc, sig, scale


def _unscale(x, scale: float, power: int):
    """x·scale^power (the scaled form back in the gradients' units; beyond float64: ±inf)."""
    if scale == 1.0:
        return x
    with np.errstate(over="ignore", under="ignore"):
        for _ in range(power):
            x = x * scale
    return x


def per_sample(grads, *, n_data=None):
    r"""Unbiased |G|² and tr(Σ) from n per-example gradients.

        tr(Σ) = Σ_i |g_i − ḡ|² / (n − 1),     |G|² = |ḡ|² − tr(Σ)/n,

    with ḡ the sample mean. With ``n_data`` = N (sample drawn without replacement from N
    examples, Σ with 1/N normalisation): tr(Σ) = (N−1)/N · Σ|g_i − ḡ|²/(n−1) and
    |G|² = |ḡ|² − Σ|g_i − ḡ|²/(n−1) · (N−n)/(nN).

    Args:
        grads: per-example gradients ∇ℓ_i, shape (..., n, p) with n ≥ 2 (leading axes are
            independent replicas); NumPy, CuPy or torch.
        n_data: optional dataset size N ≥ n for a sample drawn without replacement.

    Returns:
        (grad_sq, tr_sigma), shape ``grads.shape[:-2]``, in the input's backend.

    >>> per_sample(np.array([[1.0, 0.0], [3.0, 2.0]]))  # ḡ = (2, 1), tr(Σ) = 4
    (3.0, 4.0)
    """
    n, mean, a, _, fpc, sig, scale = _per_sample_parts(grads, n_data)
    s2 = a.sum(-1) / (n - 1)
    return (_out(_unscale((mean * mean).sum(-1) - s2 * (fpc / n), scale, 2)),
            _out(_unscale(s2 * sig, scale, 2)))


def per_sample_stats(grads, *, n_data=None) -> NoiseEstimate:
    r"""Per-sample estimates of |G|², tr(Σ), B_simple with jackknife standard errors.

    The estimates are those of :func:`per_sample`. Their (co)variances are the delete-one
    jackknife ((n−1)/n) Σ_i (θ_{−i} − θ̄_{−·})², computed in O(n·p) from the closed-form
    leave-one-out values (with c_i = g_i − ḡ, SS = Σ|c_i|²):

        SS_{−i} = SS − n|c_i|²/(n−1),   ḡ_{−i} = ḡ − c_i/(n−1).

    The jackknife variance of these U-statistics is slightly conservative (Efron–Stein).
    B_simple's standard error is the delta method on the jackknife covariance; intervals use
    Student's t with n − 1 degrees of freedom. With ``n_data`` the variances are multiplied by
    the finite-population factor 1 − n/N (exact for the linear part).

    Calibration (tests/test_estimators.py, Gaussian gradients, 2000 replicas): the 95%
    intervals cover 94–96% while |G|² is measured to better than ~30% (n ≳ B_simple). When
    noise dominates (n ≪ B_simple) the |G|² interval is conservative (≈ 98%) and the B_simple
    interval, a ratio with a noisy denominator, under-covers (≈ 90%): average more samples.

    Args:
        grads: (..., n, p) per-example gradients, n ≥ 3.
        n_data: optional dataset size N for a sample drawn without replacement.

    Returns:
        :class:`NoiseEstimate` (NumPy floats, or arrays of shape ``grads.shape[:-2]``).

    >>> est = per_sample_stats(np.array([[1.0, 0.0], [3.0, 2.0], [2.0, 1.0]]))
    >>> round(est.grad_sq, 6), round(est.tr_sigma, 6)
    (4.333333, 2.0)
    """
    grads = _value("grads", grads)
    shape = getattr(grads, "shape", ())
    if len(shape) >= 2 and shape[-2] == 2:
        raise ValueError("per_sample_stats needs at least three samples for a standard error, "
                         "got n=2")
    n, mean, a, b, fpc, sig, scale = _per_sample_parts(grads, n_data)
    a, b = _to_numpy(a), _to_numpy(b)  # |c_i|² and c_i·ḡ, (..., n)
    m2 = _to_numpy((mean * mean).sum(-1))[..., None]
    ss = a.sum(-1, keepdims=True)
    tr = ss / (n - 1) * sig
    gs = m2 - ss / (n - 1) * (fpc / n)
    ss_loo = ss - n * a / (n - 1)
    m2_loo = m2 - 2.0 * b / (n - 1) + a / (n - 1) ** 2
    tr_loo = ss_loo / (n - 2) * sig
    if n_data is not None:
        fpc_loo = (_float("n_data", n_data) - (n - 1)) / _float("n_data", n_data)
    else:
        fpc_loo = 1.0
    gs_loo = m2_loo - ss_loo / (n - 2) * (fpc_loo / (n - 1))
    dg = gs_loo - gs_loo.mean(-1, keepdims=True)
    dt = tr_loo - tr_loo.mean(-1, keepdims=True)
    k = (n - 1) / n * fpc
    vg, vt, c = k * (dg * dg).sum(-1), k * (dt * dt).sum(-1), k * (dg * dt).sum(-1)
    gs, tr = gs[..., 0], tr[..., 0]
    b_s, b_se = _ratio(tr, gs, vt, vg, c)  # a ratio: the same in the scaled form
    return NoiseEstimate(_out(_unscale(gs, scale, 2)), _out(_unscale(tr, scale, 2)),
                         _out(_unscale(np.sqrt(vg), scale, 2)),
                         _out(_unscale(np.sqrt(vt), scale, 2)), _out(_unscale(c, scale, 4)),
                         b_s, b_se, float(n - 1))


# --------------------------------------------------------------------------- streaming averages


class _EWMoments:
    """Bias-corrected exponentially weighted mean and covariance of a k-vector of draws.

    Draw s of t gets weight β^{t−s}; with W = Σ β^{t−s} and W₂ = Σ β^{2(t−s)} the mean is
    m = Σ β^{t−s} x_s / W (the bias-corrected EMA: m_t = m_{t−1} + (x_t − m_{t−1})/W_t) and the
    weighted scatter M₂ = Σ β^{t−s}(x_s − m)(x_s − m)ᵀ follows West's (1979) update
    M₂ ← β M₂ + (1 − 1/W)(x − m_old)(x − m_old)ᵀ. Treating the draws as independent with a
    common covariance C, Ĉ = M₂/(W − W₂/W) is unbiased and Cov(m) = C·W₂/W², i.e. the
    effective number of draws is n_eff = W²/W₂ (→ (1+β)/(1−β)). O(k²) memory and time.

    Scaled form: component i is stored divided by a power of two s_i (1 until a draw beyond
    2⁴⁰⁰ arrives, then about its magnitude), so squares and sums never overflow even for
    draws near the float64 limit; results are returned in the original units (a variance
    beyond float64 as ``inf``, never NaN). Rescaling by powers of two is exact.
    """

    _SAFE = 2.0**400  # |draw| / s_i up to this: (x − m)² and M₂ stay far below 2¹⁰²⁴

    def __init__(self, beta: float, k: int):
        beta = _float("beta", beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must lie in [0, 1), got {beta!r}")
        self.beta = beta
        self.k = k
        self.w = 0.0
        self.w2 = 0.0
        self.n = 0
        self._mean = [0.0] * k  # plain floats: k ≤ 3, so Python beats NumPy's call overhead
        self._m2 = [[0.0] * k for _ in range(k)]
        self._scale = [1.0] * k
        self._scaled = False

    def update(self, x) -> None:
        if self._scaled or any(abs(xi) > self._SAFE for xi in x):
            self._rescale(x)
        if self._scaled:
            x = [xi / si for xi, si in zip(x, self._scale, strict=True)]
        beta = self.beta
        self.w = w = beta * self.w + 1.0
        self.w2 = beta * beta * self.w2 + 1.0
        d = [xi - mi for xi, mi in zip(x, self._mean, strict=True)]
        self._mean = [mi + di / w for mi, di in zip(self._mean, d, strict=True)]
        f = 1.0 - 1.0 / w
        self._m2 = [[beta * mij + f * di * dj for mij, dj in zip(row, d, strict=True)]
                    for row, di in zip(self._m2, d, strict=True)]
        self.n += 1

    def _rescale(self, x) -> None:
        """Scales s_i (powers of two) for the magnitude of component i: raised to ≈ |x_i| when a
        draw leaves the safe range, lowered again (never below 1) once the draws, the mean and
        its spread have all fallen far below s_i (the huge draws have decayed away)."""
        for i, (xi, si) in enumerate(zip(x, self._scale, strict=True)):
            size = max(abs(xi), abs(self._mean[i]) * si, math.sqrt(abs(self._m2[i][i])) * si)
            if not (size > self._SAFE * si or (si > 1.0 and size < si * 2.0**-200)):
                continue
            new = math.ldexp(1.0, min(math.frexp(size)[1], 1023)) if size > 1.0 else 1.0
            f = si / new
            self._mean[i] *= f
            for j in range(self.k):
                self._m2[i][j] *= f
                self._m2[j][i] *= f
            self._scale[i] = new
        self._scaled = any(s != 1.0 for s in self._scale)

    @property
    def mean(self) -> np.ndarray:
        return np.array(self._mean) * np.array(self._scale)

    def mean_of(self, i) -> float:
        return self._mean[i] * self._scale[i]

    @property
    def n_eff(self) -> float:
        return self.w * self.w / self.w2 if self.n else 0.0

    def _scaled_cov(self) -> np.ndarray:
        """Cov(m) in the scaled units (inf before two draws)."""
        denom = self.w - self.w2 / self.w if self.n else 0.0
        if self.n < 2 or denom <= 0:
            return np.full((self.k, self.k), np.inf)
        return np.array(self._m2) / denom * (self.w2 / self.w**2)

    @property
    def cov_of_mean(self) -> np.ndarray:
        """Cov(m) in the original units (entries beyond float64 are ±inf)."""
        s = np.array(self._scale)
        with np.errstate(over="ignore", invalid="ignore"):
            c = self._scaled_cov() * s[:, None] * s[None, :]
        return np.where(np.isnan(c), np.inf, c)

    def stderr(self, i) -> float:
        """Standard error of component i's mean: √Cov(m)_ii (computed scaled: no overflow)."""
        return float(np.sqrt(self._scaled_cov()[i, i]) * self._scale[i])

    def cov(self, i, j) -> float:
        return float(self.cov_of_mean[i, j])

    def ratio(self, i, j):
        """(r, se) of max(mean_i, 0)/mean_j by the delta method (:func:`_ratio`), in the scaled
        form: the ratio of the scaled means times s_i/s_j."""
        c = self._scaled_cov()
        r, se = _ratio(self._mean[i], self._mean[j], c[i, i], c[j, j], c[i, j])
        f = self._scale[i] / self._scale[j]
        if f == 1.0:
            return r, se
        with np.errstate(over="ignore"):
            return float(np.float64(r) * f), float(np.float64(se) * f)


def _alias(path: str, doc: str) -> property:
    """A read-only property that reads the attribute ``path`` (dotted) under another name."""
    return property(attrgetter(path), doc=doc)


class _StreamingMeans:
    """Bias-corrected EMAs of k per-step estimates (:class:`_EWMoments`) and what every
    streaming estimator shares: β, the update count, the effective sample size, the degrees of
    freedom and the test "average i is significantly positive"."""

    def __init__(self, beta: float, k: int, confidence: float):
        self._m = _EWMoments(beta, k)
        _t_quantile(confidence, 1)
        self.confidence = float(confidence)

    @property
    def beta(self) -> float:
        return self._m.beta

    @property
    def n_updates(self) -> int:
        return self._m.n

    @property
    def n_eff(self) -> float:
        """Effective number of independent steps in the averages, W²/W₂."""
        return self._m.n_eff

    @property
    def df(self) -> float:
        """Degrees of freedom of the standard errors, max(n_eff − 1, 1)."""
        return max(self._m.n_eff - 1.0, 1.0)

    def _mean(self, i) -> float:
        return self._m.mean_of(i) if self._m.n else math.nan

    def _stderr(self, i) -> float:
        return self._m.stderr(i)

    def _significant(self, i) -> bool:
        """Average i exceeds z standard errors (z: Student's t quantile of ``confidence``)."""
        if self._m.n < 2:
            return False
        z = float(_t_quantile(self.confidence, self.df))
        return bool(self._mean(i) > z * self._stderr(i))


class RatioEMA(_StreamingMeans):
    r"""Streaming ratio r = E[numerator]/E[denominator] of two unbiased noisy estimates.

    Keeps bias-corrected exponential moving averages (decay β) of the numerator and the
    denominator *separately*, including negative single-step values (dropping or clamping
    them would bias the averages), and reports their ratio. The standard errors treat the
    steps as independent draws (:class:`_EWMoments`: weighted covariance, effective number of
    draws W²/W₂ ≈ (1+β)/(1−β)); the ratio's is the delta method. A drifting truth inflates
    them (conservative). The ratio is clamped to [0, ∞] and :attr:`reliable` is False until
    the denominator exceeds ``z`` standard errors (z = Student's t quantile of
    ``confidence``).

    Args:
        beta: EMA decay per update, in [0, 1) (0 keeps only the last step).
        confidence: level of the intervals and of the :attr:`reliable` test.

    Update cost: O(1), no history.
    """

    def __init__(self, beta: float = 0.99, *, confidence: float = 0.95):
        super().__init__(beta, 2, confidence)

    def update(self, numerator, denominator) -> RatioEMA:
        """Add one step's unbiased estimates (floats, NumPy scalars or 0-d tensors)."""
        self._m.update((_float("numerator", numerator), _float("denominator", denominator)))
        return self

    numerator = property(lambda self: self._mean(0),
                         doc="Average of the numerator estimates (nan before any update).")
    denominator = property(lambda self: self._mean(1),
                           doc="Average of the denominator estimates (nan before any update).")
    numerator_stderr = property(lambda self: self._stderr(0),
                                doc="Standard error of :attr:`numerator`.")
    denominator_stderr = property(lambda self: self._stderr(1),
                                  doc="Standard error of :attr:`denominator`.")

    @property
    def ratio(self) -> float:
        """max(numerator, 0)/denominator; ``inf`` while the denominator is ≤ 0."""
        if not self._m.n:
            return math.nan
        return self._m.ratio(0, 1)[0]

    @property
    def ratio_stderr(self) -> float:
        if not self._m.n:
            return math.nan
        return self._m.ratio(0, 1)[1]

    @property
    def reliable(self) -> bool:
        """True once the denominator is significantly positive (> z standard errors)."""
        return self._significant(1)

    def ratio_ci(self) -> tuple[float, float]:
        """Delta-method interval of the ratio at level ``confidence`` (t quantile)."""
        return _interval(self.ratio, self.ratio_stderr, self.confidence, self.df)


class NoiseScaleEMA(RatioEMA):
    r"""Streaming B_simple = tr(Σ)/|G|² from per-step unbiased estimates.

    Bias-corrected EMAs of |G|² and tr(Σ) are kept separately (McCandlish et al. App. A.1),
    then divided: the mean of per-step ratios would be biased (E[X/Y] ≠ E[X]/E[Y]), and
    negative per-step estimates are kept for the same reason. :attr:`b_simple` is clamped to
    [0, ∞] and :attr:`reliable` flags whether |G|² is significantly positive.

    Args:
        beta: EMA decay per update (0.99: about 200 effective steps).
        confidence: level of the intervals.

    >>> ema = NoiseScaleEMA(beta=0.9)
    >>> for gs, ts in [(1.2, 18.0), (0.8, 22.0), (1.0, 20.0)]:
    ...     _ = ema.update(gs, ts)
    >>> round(ema.grad_sq, 4), round(ema.tr_sigma, 4), round(ema.b_simple, 2), ema.n_updates
    (0.9934, 20.0664, 20.2, 3)
    """

    def update(self, grad_sq, tr_sigma) -> NoiseScaleEMA:
        """Add one step's unbiased (|G|², tr(Σ)) estimates (e.g. from :func:`two_batch`)."""
        self._m.update((_float("tr_sigma", tr_sigma), _float("grad_sq", grad_sq)))
        return self

    def update_two_batch(self, grad_sq_small, grad_sq_big, b_small, b_big, *, n_data=None):
        """:func:`two_batch` on this step's squared norms, then :meth:`update`."""
        gs, ts = two_batch(_float("grad_sq_small", grad_sq_small),
                           _float("grad_sq_big", grad_sq_big), _float("b_small", b_small),
                           _float("b_big", b_big), n_data=n_data)
        if not (math.isfinite(gs) and math.isfinite(ts)):
            raise ValueError("grad_sq_small, grad_sq_big: the two-batch estimates overflow "
                             "float64; rescale the loss")
        return self.update(gs, ts)

    grad_sq = _alias("denominator", "|G|²: the average of the per-step estimates.")
    tr_sigma = _alias("numerator", "tr Σ: the average of the per-step estimates.")
    grad_sq_stderr = _alias("denominator_stderr", "Standard error of :attr:`grad_sq`.")
    tr_sigma_stderr = _alias("numerator_stderr", "Standard error of :attr:`tr_sigma`.")
    b_simple = _alias("ratio", "B_simple = max(tr Σ, 0)/|G|² (examples); inf while |G|² ≤ 0.")
    b_simple_stderr = _alias("ratio_stderr", "Delta-method standard error of :attr:`b_simple`.")
    b_simple_ci = RatioEMA.ratio_ci

    def estimate(self) -> NoiseEstimate:
        """The current averages as a :class:`NoiseEstimate`."""
        return NoiseEstimate(self.grad_sq, self.tr_sigma, self.grad_sq_stderr,
                             self.tr_sigma_stderr, self._m.cov(0, 1), self.b_simple,
                             self.b_simple_stderr, self.df)


class CurvatureEMA(_StreamingMeans):
    r"""Streaming GᵀHG, tr(HΣ) (and |G|²), hence B_noise and ε_max, with standard errors.

    Same scheme as :class:`NoiseScaleEMA` on the per-step unbiased estimates of
    :func:`two_batch_curvature`: bias-corrected EMAs of each quantity, ratios formed last
    (B_noise = tr(HΣ)/GᵀHG in examples, ε_max = |G|²/GᵀHG in ``lr`` units), delta-method
    standard errors, :attr:`reliable` once GᵀHG is significantly positive.

    Args:
        beta: EMA decay per update. confidence: level of intervals and of :attr:`reliable`.

    >>> ema = CurvatureEMA(beta=0.9)
    >>> for ghg, ths, gs in [(2.2, 28.0, 1.1), (1.8, 32.0, 0.9)]:
    ...     _ = ema.update(ghg, ths, grad_sq=gs)
    >>> round(ema.g_h_g, 4), round(ema.b_noise, 2), round(ema.eps_max, 4)
    (1.9895, 15.13, 0.5)
    """

    def __init__(self, beta: float = 0.99, *, confidence: float = 0.95):
        super().__init__(beta, 3, confidence)
        self._with_grad = None

    def update(self, g_h_g, tr_h_sigma, grad_sq=None) -> CurvatureEMA:
        """Add one step's unbiased GᵀHG, tr(HΣ) and (optionally, every step) |G|² estimates."""
        with_grad = grad_sq is not None
        if self._with_grad is not None and with_grad != self._with_grad:
            raise ValueError("grad_sq must be given at every update or at none")
        self._with_grad = with_grad
        gs = _float("grad_sq", grad_sq) if with_grad else 0.0
        self._m.update((_float("tr_h_sigma", tr_h_sigma), _float("g_h_g", g_h_g), gs))
        return self

    def estimate(self) -> CurvatureEstimate:
        """The current averages as a :class:`CurvatureEstimate`."""
        if not self._m.n:
            raise ValueError("CurvatureEMA has no updates yet")
        m = self._m
        b, b_se = m.ratio(0, 1)
        e, e_se = m.ratio(2, 1) if self._with_grad else (None, None)
        return CurvatureEstimate(m.mean_of(1), m.mean_of(0), m.stderr(1), m.stderr(0),
                                 m.cov(0, 1), float(b), float(b_se), e, e_se, self.df)

    @property
    def g_h_g(self) -> float:
        return float(self._m.mean[1]) if self._m.n else math.nan

    @property
    def tr_h_sigma(self) -> float:
        return float(self._m.mean[0]) if self._m.n else math.nan

    @property
    def grad_sq(self) -> float:
        return float(self._m.mean[2]) if self._m.n and self._with_grad else math.nan

    @property
    def b_noise(self) -> float:
        return self.estimate().b_noise if self._m.n else math.nan

    @property
    def eps_max(self) -> float:
        return self.estimate().eps_max if self._m.n else math.nan

    @property
    def reliable(self) -> bool:
        """True once GᵀHG is significantly positive (> z standard errors)."""
        return self._significant(1)


# --------------------------------------------------------------------------- sequential variant


class SequentialNoiseScale:
    r"""Noise scale from consecutive steps' gradients (the "sequential-batch" variant).

    Instead of a second, larger batch at the *same* parameters, the big batch is the mean of
    the last k minibatch gradients (as in the fastai batch-size finder): with g_t the mean
    gradient of a batch of B at step t and ḡ_t = (1/k)Σ_{j<k} g_{t−j},

        |G|² ≈ (kB|ḡ_t|² − B|g_t|²)/(kB − B),   tr(Σ) ≈ (|g_t|² − |ḡ_t|²)/(1/B − 1/(kB)),

    each fed to a :class:`NoiseScaleEMA`. It needs no extra gradient evaluation but is
    **biased** when the parameters move: the window mixes gradients from different points, so
    E|ḡ_t|² = |mean of G_{t−j}|² + tr(Σ)/(kB) + cross terms, and noise at step t−j moves
    θ_{t−j+1}, correlating G_t with ξ_{t−j}.

    Measured bias (``test_sequential_variant_bias_on_moving_quadratic``: SGD on the diagonal
    quadratic p = 20, h = linspace(0.1, 1), additive noise Σ = diag(h), B = 4, lr = 0.05,
    θ₀ = 3·1, window k = 8, means over 4000 replicas; ratios estimate/truth):

    ======  ==================  =========  =========  ===========
    step    tr(Σ)/(B|G|²)       |G|²       tr(Σ)      B_simple
    ======  ==================  =========  =========  ===========
    25      0.25 (moving)       1.30       −0.20      −0.16
    50      1.05                1.20       0.81       0.68
    100     6.9                 0.89       1.01       1.14
    150     19                  0.41       1.04       2.5
    250     42 (noise floor)    −0.40      1.03       undefined
    ======  ==================  =========  =========  ===========

    Early on, the window's older (larger) gradients inflate |ḡ|², so tr(Σ) is underestimated
    (even negative) and B_simple far too small; near the noise floor the anti-correlation of
    consecutive gradients (each step undoes part of the previous noise) shrinks |ḡ|², so
    |G|² is underestimated, turns negative, and B_simple is overestimated without bound. The
    same-point two-batch estimator is within 3 standard errors of the truth at every step
    (ratios 0.96–1.04). Use the sequential variant only as a cheap, rough indicator, with
    k·lr·h_max ≪ 1 and far from the noise floor.

    Args:
        window: k ≥ 2, number of consecutive gradients averaged into the big batch.
        batch: B, examples in each step's (mean) gradient.
        beta: decay of the internal :class:`NoiseScaleEMA`.
        n_data: optional N for batches drawn without replacement.

    Memory: k gradient copies plus one running sum.
    """

    def __init__(self, window: int, batch, *, beta: float = 0.99, n_data=None):
        self.window = integer("window", window, 2, 2**20)
        self.batch = _float("batch", batch)
        if self.batch < 1:
            raise ValueError(f"batch must be positive, at least 1 example, got {batch!r}")
        if self.batch * self.window > MAX_BATCH:
            raise ValueError(f"batch × window must be at most 2**53 examples, got batch="
                             f"{batch!r}, window={window!r}")
        self.n_data = None if n_data is None else _float("n_data", n_data)
        _batches(self.batch, self.batch * self.window, self.n_data)
        self.ema = NoiseScaleEMA(beta)
        self._grads: list = []
        self._oldest = 0
        self._sum = None
        self._since_refresh = 0

    def update(self, grad):
        """Add this step's mean minibatch gradient (1-D array, any backend).

        Returns the step's (grad_sq, tr_sigma) estimate once the window is full, else None.
        """
        grad = _value("grad", grad)
        if not hasattr(grad, "shape") or len(grad.shape) != 1:
            raise ValueError(f"grad must be a 1-D array, got shape {getattr(grad, 'shape', ())}")
        if self._grads and grad.shape != self._grads[0].shape:
            raise ValueError(f"grad shape {tuple(grad.shape)} does not match the window's "
                             f"{tuple(self._grads[0].shape)}")
        if len(self._grads) < self.window:  # fill the ring buffer
            g = backend_of(grad).copy(grad)
            self._grads.append(g)
            if self._sum is None:
                self._sum = g + 0
            else:
                self._sum += g
        else:  # overwrite the oldest slot in place: no allocation per step
            g = self._grads[self._oldest]
            self._sum -= g
            g[...] = grad
            self._sum += g
            self._oldest = (self._oldest + 1) % self.window
        self._since_refresh += 1
        if self._since_refresh >= 64 * self.window:  # bound the running sum's rounding drift
            self._sum = sum(self._grads[1:], self._grads[0] + 0)
            self._since_refresh = 0
        if len(self._grads) < self.window:
            return None
        with np.errstate(over="ignore"):
            gs_small, gs_big = g @ g, self._sum @ self._sum
        if not (_all_finite(gs_small) and _all_finite(gs_big)):
            raise ValueError("grad is too large: |g|² overflows float64; rescale the loss")
        gs_small = _float("grad", gs_small)
        gs_big = _float("grad", gs_big) / self.window**2
        est = two_batch(gs_small, gs_big, self.batch, self.batch * self.window,
                        n_data=self.n_data)
        self.ema.update(*est)
        return est

    grad_sq = _alias("ema.grad_sq", "|G|² averaged by the internal :class:`NoiseScaleEMA`.")
    tr_sigma = _alias("ema.tr_sigma", "tr Σ averaged by the internal :class:`NoiseScaleEMA`.")
    b_simple = _alias("ema.b_simple", "B_simple of the internal :class:`NoiseScaleEMA`.")
    reliable = _alias("ema.reliable", "Whether |G|² is significantly positive yet.")


# --------------------------------------------------------------------------- batch-size advice


@dataclass(frozen=True)
class Advice:
    r"""A batch-size recommendation from the noise scale (see :func:`advise_batch_size`).

    Attributes:
        batch: current batch size B_now (examples per step).
        recommended_batch: B_rec ≈ the noise scale (rounded, within the given limits).
        b_noise: the noise scale used (examples): B_noise, or B_simple as its stand-in
            (``estimate`` says which); b_noise_stderr: its standard error (None if unknown).
        estimate: "B_noise" or "B_simple", the estimate the caller passed as ``b_noise``.
        eps_max: ε_max (``lr`` units: multiplier of the MEAN minibatch gradient).
        eps_opt_now, eps_opt_rec: ε_opt(B) = ε_max/(1 + B_noise/B) at B_now and B_rec: the
            best lr of plain SGD (no momentum).
        lr_opt_now, lr_opt_rec: the lr to set with heavy-ball momentum μ, ε_opt·(1 − μ) (its
            effective rate lr/(1 − μ) is then ε_opt); equal to eps_opt_* when μ = 0.
        step_speedup: S(B_now)/S(B_rec), fewer optimisation steps by this factor.
        example_cost: E(B_rec)/E(B_now), more examples (compute) by this factor.
        lr: the current ``lr`` if given (None otherwise); momentum: its heavy-ball μ.
    """

    batch: float
    recommended_batch: float
    b_noise: float
    b_noise_stderr: float | None
    estimate: str
    eps_max: float
    eps_opt_now: float
    eps_opt_rec: float
    lr_opt_now: float
    lr_opt_rec: float
    step_speedup: float
    example_cost: float
    lr: float | None
    momentum: float

    def __str__(self) -> str:
        def fmt(x):
            return f"{x:.3g}"

        def n(b):  # a batch size, in examples
            return f"{b:,.0f}" if b >= 10 else f"{b:.3g}"

        err = "" if self.b_noise_stderr is None else f" ± {n(self.b_noise_stderr)}"
        what = ("Gradient noise scale B_noise" if self.estimate == "B_noise" else
                "Simple noise scale B_simple (standing in for B_noise)")
        lines = [
            f"{what} ≈ {n(self.b_noise)}{err} examples (current batch: {n(self.batch)} "
            f"examples).",
            f"Recommended batch: {n(self.recommended_batch)} examples per step.",
            f"Best lr without momentum (eps_opt, multiplier of the MEAN minibatch gradient): "
            f"{fmt(self.eps_opt_rec)} at batch {n(self.recommended_batch)}, "
            f"{fmt(self.eps_opt_now)} at batch {n(self.batch)} "
            f"(large-batch limit eps_max = {fmt(self.eps_max)}).",
        ]
        if self.momentum > 0:
            lines.append(
                f"With momentum {fmt(self.momentum)} set lr = eps_opt*(1-momentum) = "
                f"{fmt(self.lr_opt_rec)} at batch {n(self.recommended_batch)}, "
                f"{fmt(self.lr_opt_now)} at batch {n(self.batch)}.")
        if self.step_speedup >= 1.0:
            lines.append(
                f"Batch {n(self.recommended_batch)} should need {fmt(self.step_speedup)}x "
                f"fewer steps for {fmt(self.example_cost)}x the examples (compute).")
        else:
            lines.append(
                f"Batch {n(self.recommended_batch)} should need "
                f"{fmt(1.0 / self.example_cost)}x fewer examples (compute) for "
                f"{fmt(1.0 / self.step_speedup)}x the steps.")
        if self.lr is not None:
            mom = f" with momentum {fmt(self.momentum)}" if self.momentum > 0 else ""
            lines.append(f"Your lr = {fmt(self.lr)} is {fmt(self.lr / self.lr_opt_now)}x the "
                         f"best lr{mom} at the current batch (beyond 2x a step raises the "
                         f"loss on average).")
        lines.append("These are local (quadratic-model) estimates, and B_noise grows as the "
                     "loss falls: re-measure during training.")
        return "\n".join(lines)


#: the noise-scale estimates :func:`advise_batch_size` takes as ``b_noise``
ESTIMATES = ("B_noise", "B_simple")


def advise_batch_size(b_noise, eps_max, batch, *, b_noise_stderr=None, estimate="B_noise",
                      lr=None, momentum=0.0, min_batch=1, max_batch=None,
                      multiple_of=1) -> Advice:
    r"""Recommend a batch size near B_noise and the matching step size.

    On the steps/examples trade-off S = S_min(1 + B_noise/B), E = E_min(1 + B/B_noise)
    (McCandlish et al. eq. 2.11 with B_crit ≈ B_noise) the batch B_noise costs twice the minimal
    number of steps and twice the minimal number of examples: the balanced choice. Returns
    ε_opt(B) = ε_max/(1 + B_noise/B) at the current and recommended batch, the lr to set with
    heavy-ball momentum μ, ε_opt·(1 − μ) (torch's v ← μv + g, θ ← θ − lr·v has the effective
    rate lr/(1 − μ)), the speed-up in steps S(B_now)/S(B_rec) =
    (1 + B_noise/B_now)/(1 + B_noise/B_rec), and the extra cost in examples
    E(B_rec)/E(B_now) = (1 + B_rec/B_noise)/(1 + B_now/B_noise).

    Args:
        b_noise: the noise scale in examples, > 0: B_noise = tr(HΣ)/GᵀHG, or B_simple =
            tr(Σ)/|G|² as a common stand-in (say which in ``estimate``).
        eps_max: ε_max = |G|²/GᵀHG, in ``lr`` units: the multiplier of the MEAN minibatch
            gradient, > 0.
        batch: the current batch size B_now (examples per step), > 0.
        b_noise_stderr: optional standard error of b_noise (reported only).
        estimate: "B_noise" (default) or "B_simple": which estimate ``b_noise`` is (the advice
            names it).
        lr: optional current ``lr`` (multiplier of the mean minibatch gradient), compared with
            the best lr at B_now for the given ``momentum`` (ε_opt·(1 − μ)).
        momentum: heavy-ball μ ∈ [0, 1) of the optimiser (0: plain SGD).
        min_batch, max_batch: limits on the recommendation (e.g. memory); multiple_of: round
            the recommendation to a multiple of this (e.g. 8 or the number of devices).

    Returns:
        :class:`Advice` (``str(advice)`` explains it in words).

    >>> a = advise_batch_size(b_noise=1000.0, eps_max=2.0, batch=100, momentum=0.9)
    >>> a.recommended_batch, round(a.eps_opt_rec, 3), round(a.lr_opt_rec, 3)
    (1000.0, 1.0, 0.1)
    >>> round(a.step_speedup, 3)
    5.5
    """
    b_noise = _float("b_noise", b_noise)
    eps_max = _float("eps_max", eps_max)
    batch = _float("batch", batch)
    for name, v in (("b_noise", b_noise), ("eps_max", eps_max), ("batch", batch)):
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v!r}")
    if not isinstance(estimate, str) or estimate not in ESTIMATES:
        raise ValueError(f"estimate must be one of {', '.join(ESTIMATES)}, got "
                         f"{_short(estimate)}")
    lo = _float("min_batch", min_batch)
    hi = math.inf if max_batch is None else _float("max_batch", max_batch)
    step = _float("multiple_of", multiple_of)
    for name, v in (("min_batch", lo), ("max_batch", hi), ("multiple_of", step)):
        if not v > 0:
            raise ValueError(f"{name} must be positive, got {v!r}")
    if hi < lo:
        raise ValueError(f"max_batch must be at least min_batch, got min_batch={min_batch!r}, "
                         f"max_batch={max_batch!r}")
    if not math.isfinite(lo / step) or not math.isfinite(b_noise / step):
        raise ValueError(f"multiple_of is too small for min_batch and b_noise, got "
                         f"{multiple_of!r}")
    # the multiple of ``step`` nearest B_noise inside [min_batch, max_batch]
    k_lo, k_hi = math.ceil(lo / step), math.floor(hi / step) if math.isfinite(hi) else math.inf
    if k_hi < max(k_lo, 1):
        raise ValueError(f"multiple_of: no multiple of {multiple_of!r} lies in "
                         f"[min_batch={min_batch!r}, max_batch={max_batch!r}]")
    rec = min(max(round(b_noise / step), k_lo, 1), k_hi) * step
    if not math.isfinite(rec):
        raise ValueError(f"multiple_of: the recommended batch {b_noise:g} rounded to a multiple "
                         f"of {multiple_of!r} overflows float64")
    mu = _float("momentum", momentum)
    if not 0.0 <= mu < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
    lr_v = None if lr is None else _float("lr", lr)
    if lr_v is not None and lr_v <= 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    se = None if b_noise_stderr is None else _float("b_noise_stderr", b_noise_stderr)
    if se is not None and se < 0:
        raise ValueError(f"b_noise_stderr must be non-negative, got {b_noise_stderr!r}")
    with np.errstate(over="ignore", under="ignore"):
        s_now = 1.0 + b_noise / batch
        s_rec = 1.0 + b_noise / rec
        e_now = 1.0 + batch / b_noise
        e_rec = 1.0 + rec / b_noise
        eps_now = float(theory.eps_opt(batch, eps_max, b_noise))
        eps_rec = float(theory.eps_opt(rec, eps_max, b_noise))
        return Advice(batch=batch, recommended_batch=float(rec), b_noise=b_noise,
                      b_noise_stderr=se, estimate=estimate, eps_max=eps_max,
                      eps_opt_now=eps_now, eps_opt_rec=eps_rec, lr_opt_now=eps_now * (1.0 - mu),
                      lr_opt_rec=eps_rec * (1.0 - mu), step_speedup=_safe_div(s_now, s_rec),
                      example_cost=_safe_div(e_rec, e_now), lr=lr_v, momentum=mu)


def _safe_div(a: float, b: float) -> float:
    """a/b for a, b ≥ 1 that may be inf: inf/inf (both beyond float64) is taken as 1."""
    if math.isinf(a) and math.isinf(b):
        return 1.0
    return a / b
