r"""The noisy quadratic model (NQM) and linear regression with Gaussian features, solved exactly.

**NQM** (Zhang et al. 2019), in the eigenbasis of H: L(θ) = ½ Σ_i h_i θ_i², the per-example
gradient is h_i θ_i + ξ_i with Var(ξ_i) = c_i (c = h is the "Fisher = Hessian" case), and the
minibatch mean gradient of B examples (drawn with replacement) has noise variance c_i/B.
``lr`` (η) multiplies that **mean** gradient. With s_i(t) = E[θ_i(t)²], plain SGD gives

    s_i(t+1) = (1 − ηh_i)² s_i(t) + η² c_i / B,
    s_i(t) = (1 − ηh_i)^{2t} s_i(0) + (η² c_i/B) (1 − (1 − ηh_i)^{2t}) / (1 − (1 − ηh_i)²),

and E[L_t] = ½ Σ_i h_i s_i(t) (every dimension is independent). Options, all exact:

* ``momentum`` μ: heavy ball as in ``torch.optim.SGD`` (v ← μv + g, θ ← θ − ηv, v₀ = 0);
  the second moments (E[θ²], E[θv], E[v²]) of each dimension follow a 3×3 linear system
  (see :func:`expected_loss`). ``nesterov=True``: torch's Nesterov form (v ← μv + g,
  θ ← θ − η(g + μv)), stable for ηh̃_max < 2(1+μ)/(1+2μ).
* ``precond_power`` p: preconditioner P = (H/h_max)^{−p}, i.e. θ ← θ − ηP g_B. In the
  eigenbasis p_i = (h_i/h_max)^{−p}, which replaces h_i by p_i h_i and c_i by p_i² c_i in the
  dynamics (the loss keeps the weights h_i). The normalisation by h_max keeps the top
  curvature, hence the stability limit η < 2(1+μ)/h_max, unchanged.
* ``ema_decay`` β: report the loss of the exponential moving average of the iterates,
  θ̄_{t+1} = βθ̄_t + (1−β)θ_{t+1}, θ̄_0 = θ_0 (a small linear system on the joint moments).
* learning-rate schedules: pass ``steps=None`` and an ``lr`` whose last axis is the
  schedule (``lr[..., t]`` is the rate of step t+1).

Broadcasting: ``lr``, ``batch``, ``momentum``, ``ema_decay`` (and ``target``) broadcast to a
*configuration shape* S; per-dimension arrays (``h``, ``c``, ``init_sq``) have shape (d,).
Trajectories have shape S + (steps+1,). Constant-rate trajectories are computed in closed
form (SGD) or by repeated squaring of the moment matrix (momentum/EMA); no Python loop runs
over the steps. A diverging configuration is a result: its loss is ``inf`` once it overflows
(never NaN, and without a floating-point warning).

**Steps to a target** (:func:`steps_to_target`) are exact: the first t at which the
step-by-step recursion is at or below the target, found without stepping through t. With
momentum, Nesterov or an EMA each dimension is a 2×2 linear map A plus noise, whose t-th
power has a closed form through its eigenvalues that stays exact where they coincide
(:class:`_Modes`); the loss at any t is an O(d) sum, and Newton's method on certified lower
bounds of the loss locates the first crossing. Where the loss oscillates near the target it
is evaluated at every step of a stretch as exponential sums (Taylor moments, a few flops per
dimension and step) within certified error bounds (:class:`_Sweep`; docs/design.md §3).

**Linear regression with Gaussian features** (docs/design.md §3): x ~ N(0, diag(λ)),
y = w*ᵀx + ε with Var ε = σ², e = w − w*, m_j = E[e_j²]; batches of B with replacement give
exactly

    m_j ← m_j (1 − 2ηλ_j + η²λ_j²(1 + 1/B)) + (η²/B) λ_j (Σ_k λ_k m_k + σ²),

and the population loss is ½(Σ_j λ_j m_j + σ²) (see :func:`linreg_expected_loss`).
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import numpy as np

from sgdtheory import _alloc, _checks

__all__ = [
    "OptimalSteps",
    "expected_loss",
    "linreg_expected_loss",
    "linreg_moments",
    "optimal_steps_curve",
    "stationary_loss",
    "steps_to_target",
]

_CHUNK = 1 << 21  # elements per working array (≈ 16 MiB of float64)


# --------------------------------------------------------------------------- input checks


def _array(name: str, x) -> np.ndarray:
    """A finite real float array (no None, str, bool, complex or ragged input)."""
    a = _checks.real_array(name, x)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got {x!r}")
    return a


def _positive(name: str, x, *, allow_zero: bool = False) -> np.ndarray:
    a = _array(name, x)
    if np.any(a < 0) if allow_zero else np.any(a <= 0):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, "
                         f"got {x!r}")
    return a


def _unit_interval(name: str, x) -> np.ndarray:
    a = _array(name, x)
    if np.any(a < 0) or np.any(a >= 1):
        raise ValueError(f"{name} must lie in [0, 1), got {x!r}")
    return a


def _per_dim(name: str, x, d: int) -> np.ndarray:
    a = _positive(name, x, allow_zero=True)
    if a.ndim > 1 or (a.ndim == 1 and a.shape[0] != d):
        raise ValueError(f"{name} must be a scalar or have shape ({d},) like h, got {a.shape}")
    return np.broadcast_to(a, (d,)).astype(float)


def _steps(name: str, steps) -> int:
    """A step count: an int or NumPy integer in [0, 2⁵³] (exact as a float64)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"{name} must be a non-negative integer, got {steps!r}")
    if steps < 0 or steps > 2**53:
        raise ValueError(f"{name} must be an integer in [0, 2**53], got {steps!r}")
    return int(steps)


def _fits_memory(name: str, n_values: int) -> None:
    """Refuse an output of ``n_values`` float64 larger than half the machine's memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        total = 16 * 2**30
    if 8.0 * n_values > total / 2:
        raise ValueError(f"{name} too large: the result would need {8.0 * n_values / 2**30:.3g} "
                         f"GiB (of {total / 2**30:.3g} GiB of memory)")


def _broadcast(**arrays) -> list[np.ndarray]:
    try:
        return list(np.broadcast_arrays(*arrays.values()))
    except ValueError as exc:
        shapes = ", ".join(f"{k} {np.shape(v)}" for k, v in arrays.items())
        raise ValueError(f"shapes do not broadcast: {shapes}") from exc


class _Problem(NamedTuple):
    h: np.ndarray  # loss weights h_i (d,)
    hd: np.ndarray  # curvature in the dynamics, p_i h_i
    cd: np.ndarray  # per-example noise variance in the dynamics, p_i² c_i
    x0: np.ndarray  # E[θ_i(0)²]


def _problem(h, c, init_sq=0.0, precond_power=0.0) -> _Problem:
    """Checked NQM, with the dimensions that can never move (c_i = 0 and θ_i(0) = 0) dropped."""
    h = _positive("h", h)
    if h.ndim != 1 or h.size == 0:
        raise ValueError(f"h must be a non-empty 1-D array of curvatures, got shape {h.shape}")
    d = h.shape[0]
    c = _per_dim("c", c, d)
    x0 = _per_dim("init_sq", init_sq, d)
    p = _array("precond_power", precond_power)
    if p.ndim != 0:
        raise ValueError(f"precond_power must be a scalar, got shape {p.shape}")
    p = float(p)
    with np.errstate(over="ignore"):
        scale = (h / h.max()) ** (-p)
        finite = np.all(np.isfinite(scale**2 * c)) and np.all(np.isfinite(scale * h))
    if not finite:
        raise ValueError(f"precond_power={precond_power!r} overflows the preconditioner "
                         f"(p_i h_i or p_i² c_i beyond float64)")
    with np.errstate(over="ignore"):
        if not np.isfinite(np.sum(0.5 * h * x0)):
            raise ValueError("the initial loss ½Σ h_i init_sq_i overflows float64 "
                             "(h or init_sq too large)")
    keep = (c > 0) | (x0 > 0)
    return _Problem(h[keep], (scale * h)[keep], (scale**2 * c)[keep], x0[keep])


# --------------------------------------------------------------------------- moment systems


def _sgd_factors(pr: _Problem, lr, batch):
    """log q_i, 1 − q_i and the noise injection n_i = η²c_i/B, q_i = (1 − ηh_i)², shape S+(d,)."""
    # (unstable rates may overflow: their loss is inf, reported without a warning)
    with np.errstate(over="ignore", divide="ignore"):
        u = lr[..., None] * pr.hd
        # log q = 2 log|1 − u|, without cancellation on both sides of u = 1
        logq = 2.0 * np.log1p(np.where(u <= 1.0, -u, u - 2.0))
        logq = np.maximum(logq, -1e4)  # q = 0 (u = 1): q^t = 0 for t ≥ 1, 1 at t = 0
        omq = u * (2.0 - u)  # 1 − q
        noise = lr[..., None] ** 2 * pr.cd / batch[..., None]
    return logq, omq, noise


def _sgd_loss_at(pr: _Problem, logq, omq, noise, t):
    """E[L_t] for SGD, configurations on axis 0 of logq/omq/noise (C, d), times t (T,) → (C, T)."""
    a = 0.5 * pr.h * pr.x0
    out = np.empty((logq.shape[0], t.size))
    tchunk = max(1, _CHUNK // max(1, logq.shape[1]))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        ratio_w = np.where(omq != 0, 0.5 * pr.h * noise / np.where(omq != 0, omq, 1.0), 0.0)
        lin_w = np.where(omq == 0, 0.5 * pr.h * noise, 0.0)
        for ci in range(logq.shape[0]):
            lq = logq[ci]
            for t0 in range(0, t.size, tchunk):
                tt = t[t0:t0 + tchunk].astype(float)
                em = np.expm1(tt[:, None] * lq)  # q^t − 1
                out[ci, t0:t0 + tchunk] = ((em + 1.0) @ a - em @ ratio_w[ci]
                                           + tt * lin_w[ci].sum())
    bad = np.isnan(out)
    if np.any(bad):  # 0·inf where η²c̃/B overflows: E[L_0] = ½Σhs(0), inf afterwards
        bad[:, t == 0] = False
        out[:, t == 0] = np.where(np.isnan(out[:, t == 0]), a.sum(), out[:, t == 0])
        out[bad] = np.inf
    return out


def _linear_system(pr: _Problem, lr, batch, mu, beta, has_v: bool, has_ema: bool,
                   nesterov: bool = False):
    """Per-dimension linear dynamics z' = A z + g ζ of z = (θ[, v][, θ̄]), Var ζ = c̃/B.

    Heavy ball: θ' = (1 − ηh̃)θ − ημv − ηζ. Nesterov (θ' = θ − η(g + μv'), v' = μv + g):
    θ' = (1 − ηh̃(1+μ))θ − ημ²v − η(1+μ)ζ. Both: v' = h̃θ + μv + ζ; θ̄' = βθ̄ + (1−β)θ'.

    Returns the second-moment map on vec(E[zzᵀ]): S' = M S + b with M = A⊗A, b = n·(g⊗g),
    shapes S+(d, k², k²) and S+(d, k²), plus the index of the loss component.
    """
    shape = np.broadcast_shapes(lr.shape, batch.shape, mu.shape, beta.shape) + pr.h.shape
    k = 1 + has_v + has_ema
    A, g = _transfer(pr, lr, mu, beta, has_v, has_ema, nesterov, shape)
    M = np.einsum("...ik,...jl->...ijkl", A, A).reshape(shape + (k * k, k * k))
    noise = np.broadcast_to(pr.cd / batch[..., None], shape)
    b = noise[..., None] * np.einsum("...i,...j->...ij", g, g).reshape(shape + (k * k,))
    idx = (k - 1) * (k + 1) if has_ema else 0  # E[θ̄²] or E[θ²]
    return M, b, idx


def _transfer(pr: _Problem, lr, mu, beta, has_v: bool, has_ema: bool, nesterov: bool, shape):
    """A (shape + (k, k)) and g (shape + (k,)) of z' = A z + g ζ (see :func:`_linear_system`)."""
    k = 1 + has_v + has_ema
    eta = np.broadcast_to(lr[..., None], shape)
    hd = np.broadcast_to(pr.hd, shape)
    A = np.zeros(shape + (k, k))
    g = np.zeros(shape + (k,))
    A[..., 0, 0] = 1.0 - eta * hd
    g[..., 0] = -eta
    if has_v:
        m = np.broadcast_to(mu[..., None], shape)
        if nesterov:
            A[..., 0, 0] = 1.0 - eta * hd * (1.0 + m)
            A[..., 0, 1] = -eta * m * m
            g[..., 0] = -eta * (1.0 + m)
        else:
            A[..., 0, 1] = -eta * m
        A[..., 1, 0] = hd
        A[..., 1, 1] = m
        g[..., 1] = 1.0
    if has_ema:
        b_ = np.broadcast_to(beta[..., None], shape)
        A[..., -1, :] = (1.0 - b_)[..., None] * A[..., 0, :]
        A[..., -1, -1] = b_
        g[..., -1] = (1.0 - b_) * g[..., 0]
    return A, g


def _initial_state(pr: _Problem, k: int, has_ema: bool) -> np.ndarray:
    s0 = np.zeros(pr.h.shape + (k, k))
    s0[..., 0, 0] = pr.x0
    if has_ema:  # θ̄_0 = θ_0
        s0[..., 0, -1] = s0[..., -1, 0] = s0[..., -1, -1] = pr.x0
    return s0.reshape(pr.h.shape + (k * k,))


def _orbit(M, b, s0, n: int) -> np.ndarray:
    """States s_t = F^t(s_0), t = 0..n−1, of the affine map F(s) = Ms + b, by doubling.

    M (N, m, m), b (N, m), s0 (N, m) → (N, n, m). With F^K = (M^K, G_K):
    s_{K+t} = M^K s_t + G_K and F^{2K} = (M^{2K}, M^K G_K + G_K); ⌈log₂ n⌉ rounds.
    """
    out = np.empty(s0.shape[:1] + (n,) + s0.shape[1:])
    out[:, 0] = s0
    P, G, K = M, b, 1
    with np.errstate(over="ignore", invalid="ignore"):
        while K < n:
            L = min(K, n - K)
            out[:, K:K + L] = np.matmul(out[:, :L], np.swapaxes(P, -1, -2)) + G[:, None, :]
            if 2 * K < n:
                G = np.einsum("nij,nj->ni", P, G) + G
                P = np.matmul(P, P)
            K *= 2
    return out


def _stationary_moments(M, b) -> np.ndarray:
    """Fixed point s* = (I − M)⁻¹ b of the moment map, batched over leading axes (a
    pseudo-inverse where I − M is singular in float64, i.e. 1 − ηh̃ rounds to 1)."""
    eye = np.eye(M.shape[-1])
    try:
        return np.linalg.solve(eye - M, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return (np.linalg.pinv(eye - M) @ b[..., None])[..., 0]


def _quiet(fn):
    """Run ``fn`` with NumPy's floating-point warnings off: a value beyond float64 (a
    diverging run, or extreme inputs) is returned as inf, never as a warning or NaN. (Also
    settles the allocator once per process: :func:`sgdtheory._alloc.settle`.)"""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _alloc.settle()
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return wrapper


def _unstable(pr: _Problem, lr, mu, nesterov: bool = False):
    """True where some dimension has ηh̃_i ≥ 2(1+μ) (Nesterov: 2(1+μ)/(1+2μ)): there the
    deterministic map has an eigenvalue ≤ −1 and the moment system diverges."""
    if pr.h.size == 0:
        return np.zeros(np.broadcast_shapes(lr.shape, mu.shape), dtype=bool)
    limit = 2.0 * (1.0 + mu) / (1.0 + 2.0 * mu) if nesterov else 2.0 * (1.0 + mu)
    return lr * pr.hd.max() >= limit


# --------------------------------------------------------------------------- 2×2 closed form

_LOG_TINY = -700.0  # log of a base that is exactly 0: its powers t ≥ 1 vanish, its 0th is 1


class _Pair(NamedTuple):
    """Per-dimension 2×2 dynamics z' = A z + g ζ of one optimiser setting, arrays of shape (d,).

    ``a`` = (A00, A01, A10, A11); ``e`` = the entries of I − A, computed without cancellation;
    ``omd`` = 1 − det A (accurate); ``g`` = the noise gain; ``idx`` = the component whose second
    moment weights the loss; ``hh`` = ½h; ``s0`` / ``sst`` = ½h (S00, S01, S11) with S = E[zzᵀ]
    at t = 0 and at stationarity for B = 1 (stationary moments scale as 1/B) — weighted by ½h
    already, which stays finite where S* alone would overflow (ηh̃ → 0).
    """

    a: tuple
    e: tuple
    omd: np.ndarray
    g: tuple
    idx: int
    hh: np.ndarray
    s0: tuple
    sst: tuple


def _pair_system(pr: _Problem, eta: float, mu: float, beta: float, kind: str) -> _Pair:
    """The 2×2 system of SGD (embedded as A = diag(1 − ηh̃, 0)), heavy ball or Nesterov on
    z = (θ, v), or SGD with an EMA on z = (θ, θ̄) — the same maps as :func:`_linear_system`."""
    hd, x0 = pr.hd, pr.x0
    u = eta * hd
    zero, one = np.zeros_like(hd), np.ones_like(hd)
    if kind == "sgd":
        a, e = (1.0 - u, zero, zero, zero), (u, zero, zero, one)
        g, omd, idx, s0 = (-eta * one, zero), one, 0, (x0, zero, zero)
    elif kind == "heavy":
        a = (1.0 - u, -eta * mu * one, hd, mu * one)
        e = (u, eta * mu * one, -hd, (1.0 - mu) * one)
        g, omd, idx, s0 = (-eta * one, one), (1.0 - mu) * one, 0, (x0, zero, zero)
    elif kind == "nesterov":
        a = (1.0 - u * (1.0 + mu), -eta * mu * mu * one, hd, mu * one)
        e = (u * (1.0 + mu), eta * mu * mu * one, -hd, (1.0 - mu) * one)
        g = (-eta * (1.0 + mu) * one, one)
        omd, idx, s0 = (1.0 - mu) + mu * u, 0, (x0, zero, zero)  # det A = μ(1 − ηh̃)
    else:  # "ema": θ̄' = βθ̄ + (1 − β)θ', θ̄_0 = θ_0
        a = (1.0 - u, zero, (1.0 - beta) * (1.0 - u), beta * one)
        e = (u, zero, -(1.0 - beta) * (1.0 - u), (1.0 - beta) * one)
        g = (-eta * one, -(1.0 - beta) * eta * one)
        omd, idx, s0 = (1.0 - beta) + beta * u, 1, (x0, x0, x0)  # det A = β(1 − ηh̃)
    hh = 0.5 * pr.h
    s0 = tuple(hh * x for x in s0)
    return _Pair(a, e, omd, g, idx, hh, s0, _pair_stationary(a, e, omd, g, pr.cd, hh))


def _pair_stationary(a, e, omd, g, cd, weight):
    """``weight`` × stationary E[zzᵀ] of z' = Az + gζ, Var ζ = c̃ (B = 1), in closed form.

    A^j = p_{j+1} I + p_j Ā (Cayley–Hamilton; Ā = A − τI, p_j the impulse response of
    x_j = τx_{j−1} − δx_{j−2}, τ = tr A, δ = det A), so S* = c̃ Σ_j A^j g gᵀ A^jᵀ
    = c̃ [γ1 (g + ā)(g + ā)ᵀ + (γ0 − γ1)(g gᵀ + ā āᵀ)], ā = Āg, with the AR(2) autocovariances
    γ1 = τ / ((1 − δ) P Q), γ0 − γ1 = 1 / ((1 − δ) Q), P = det(I − A), Q = det(I + A).
    ``weight``/P is formed first (P ∝ ηh̃ may be tiny where the weight ½h is too).
    """
    a00, a01, a10, a11 = a
    e00, e01, e10, e11 = e
    p_ = e00 * e11 - e01 * e10
    q_ = (2.0 - e00) * (2.0 - e11) - e01 * e10
    gamma1 = (a00 + a11) * (weight / p_) / (omd * q_)
    diff = weight / (omd * q_)
    g0, g1 = g
    b0, b1 = -a11 * g0 + a01 * g1, a10 * g0 - a00 * g1  # ā = Āg
    c0, c1 = g0 + b0, g1 + b1
    return (cd * (gamma1 * c0 * c0 + diff * (g0 * g0 + b0 * b0)),
            cd * (gamma1 * c0 * c1 + diff * (g0 * g1 + b0 * b1)),
            cd * (gamma1 * c1 * c1 + diff * (g1 * g1 + b1 * b1)))


class _Modes(NamedTuple):
    r"""One kind of dimension (real or complex roots of A) of a :class:`_Pair`, in closed form.

    The deviation E[z_t z_tᵀ] − S* = A^t D A^tᵀ (D = S0 − S*) has loss component r_t D r_tᵀ,
    r_t = e_idxᵀ A^t = p_t w + e_t z by Cayley–Hamilton, p_t = (r1^t − r2^t)/(r1 − r2):

    * real roots, |r1| ≥ |r2|, q = r2/r1: p_t = r1^{t−1} X_t, X_t = (1 − q^t)/(1 − q),
      e_t = r1^{t−1}, Y_t = 1, w = A_{idx,·} − r1 e_idx, z = r1 e_idx;
    * complex roots ρe^{±iφ}: p_t = ρ^{t−1} X_t, X_t = sin(tφ)/sin φ, e_t = ρ^{t−1} Y_t,
      Y_t = cos(tφ), w = A_{idx,·} − ρ cos φ e_idx, z = ρ e_idx.

    So ½h r_t D r_tᵀ = env_t (k_a X_t² + 2 k_b X_t Y_t + k_c Y_t²), env_t = e^{−κ(t−1)},
    κ = −2 log|r1| (or −2 log ρ), with no division by a root gap: exact also where the roots
    (nearly) coincide, X_t → t.
    """

    cplx: bool
    sel: np.ndarray  # indices of these dimensions in the system
    kappa: np.ndarray
    sgn: np.ndarray  # sign of r1 (real roots; 1 for complex)
    scale: np.ndarray  # 1 − q (real) or sin φ (complex)
    rate: np.ndarray  # log|q| (real, ≥ _LOG_TINY) or φ (complex)
    qneg: np.ndarray  # q < 0
    neg: np.ndarray  # positions with q < 0
    dbl: np.ndarray  # positions with a double root (q = 1, X_t = t)
    safe: np.ndarray  # scale with 0 replaced by 1
    k0: tuple  # (k_a, k_b, k_c) for D = S0
    k1: tuple  # (k_a, k_b, k_c) for D = S*(B = 1)
    w: tuple  # w = (w_0, w_1) and z_idx, to rebuild the state row r_t
    zi: np.ndarray


def _sym_form(d, v, w):
    """v D wᵀ for D = (d00, d01, d11) symmetric and 2-vectors v, w."""
    return v[0] * (d[0] * w[0] + d[1] * w[1]) + v[1] * (d[1] * w[0] + d[2] * w[1])


def _pair_modes(sy: _Pair) -> list[_Modes]:
    """Roots of each dimension's A and the coefficients of :class:`_Modes` (non-empty kinds)."""
    a00, a01, a10, a11 = sy.a
    e00, e01, e10, e11 = sy.e
    i = sy.idx
    a_ii, a_io, a_oo = (a00, a01, a11) if i == 0 else (a11, a10, a00)
    e_ii, e_oo = (e00, e11) if i == 0 else (e11, e00)
    tau, det = a00 + a11, a00 * a11 - a01 * a10
    disc = (e11 - e00) ** 2 + 4.0 * a01 * a10
    out = []
    for cplx in (False, True):
        sel = np.flatnonzero(disc < 0) if cplx else np.flatnonzero(disc >= 0)
        if sel.size == 0:
            continue
        ta, de = tau[sel], det[sel]
        with np.errstate(divide="ignore", invalid="ignore"):
            if not cplx:
                s = np.sqrt(disc[sel])
                sgn = np.where(ta >= 0, 1.0, -1.0)
                r1 = 0.5 * (ta + sgn * s)
                ar1 = np.abs(r1)
                zero = ar1 == 0
                # r1 > 0: 1 − r1 is the small root of det(E − yI) = y² − tr(E) y + det(E)
                y1 = 2.0 * (e00 * e11 - e01 * e10)[sel] / ((e00 + e11)[sel] + s)
                log_r1 = np.where(r1 > 0, np.log1p(-np.where(r1 > 0, y1, 0.0)), np.log(ar1))
                kappa = np.minimum(-2.0 * log_r1, -2.0 * _LOG_TINY)
                scale = np.where(zero, 1.0, s / np.where(zero, 1.0, ar1))  # 1 − q
                qneg = de < 0
                rate = np.where(qneg, np.log(np.abs(de)) - 2.0 * np.log(ar1),
                                np.log1p(-np.minimum(scale, 1.0)))
                rate = np.maximum(np.where(zero, _LOG_TINY, rate), _LOG_TINY)
                # A_ii − r1 and A_oo − r1 multiply to A_io A_oi: take the larger directly
                d1, d2 = a_ii[sel] - r1, a_oo[sel] - r1
                wi = np.where(np.abs(d1) >= np.abs(d2), d1,
                              (a01 * a10)[sel] / np.where(d2 != 0, d2, 1.0))
                zi = r1
            else:
                si, rho = np.sqrt(-disc[sel]), np.sqrt(de)
                kappa = -np.log1p(-sy.omd[sel])  # ρ² = δ = 1 − (1 − δ)
                sgn, qneg = np.ones_like(ta), np.zeros(ta.shape, bool)
                rate, scale = np.arctan2(si, ta), si / (2.0 * rho)  # φ, sin φ
                wi = 0.5 * (e_oo[sel] - e_ii[sel])  # A_ii − ρ cos φ = (A_ii − A_oo)/2
                zi = rho
        wv = (wi, a_io[sel]) if i == 0 else (a_io[sel], wi)
        zv = (zi, 0.0) if i == 0 else (0.0, zi)
        ks = []
        for d in (sy.s0, sy.sst):  # (already weighted by ½h)
            dd = tuple(x[sel] for x in d)
            ks.append((_sym_form(dd, wv, wv), _sym_form(dd, wv, zv), _sym_form(dd, zv, zv)))
        perm = np.argsort(kappa, kind="stable")  # slowest first (used by _newton_below)
        sel, kappa, sgn, scale, rate, qneg, k0, k1, wv, zi = (
            tuple(x[perm] for x in a) if isinstance(a, tuple) else a[perm]
            for a in (sel, kappa, sgn, scale, rate, qneg, ks[0], ks[1], wv, zi))
        dbl = np.flatnonzero(scale == 0) if not cplx else np.empty(0, int)
        out.append(_Modes(cplx, sel, kappa, sgn, scale, rate, qneg, np.flatnonzero(qneg), dbl,
                          np.where(scale == 0, 1.0, scale), k0, k1, wv, zi))
    return out


def _mode_x(m: _Modes, t):
    """X_t of :class:`_Modes` (Y_t is 1 for real roots, cos(tφ) for complex), t ≥ 1 real."""
    if m.cplx:
        return np.sin(t * m.rate) / m.scale
    x = -np.expm1(t * m.rate) / m.safe  # 0 ≤ q < 1
    if m.dbl.size or m.neg.size:
        x = np.array(x, copy=True)
        tt = np.broadcast_to(t, x.shape)
        x[..., m.dbl] = tt[..., m.dbl]  # q = 1 (double root): X_t = t
        if m.neg.size:  # q < 0: (1 − q^t)/(1 − q), q^t = (−1)^t |q|^t
            tn = tt[..., m.neg]
            sign = np.where(np.remainder(tn, 2.0) == 1.0, -1.0, 1.0)
            x[..., m.neg] = (1.0 - sign * np.exp(tn * m.rate[m.neg])) / m.scale[m.neg]
    return x


def _mode_devs(m: _Modes, t):
    """Σ_i ½h_i r_t D r_tᵀ over the dimensions of ``m`` for D = S0 and D = S*(B = 1).

    ``t`` (n, 1) → two arrays (n,). With these, E[L_t] = dev0 + (L*₁ − dev1)/B.
    """
    x = _mode_x(m, t)
    env = np.exp(-m.kappa * (t - 1.0))
    xx = env * x * x
    if m.cplx:
        y = np.cos(t * m.rate)
        xy, yy = env * x * y, env * y * y
    else:
        xy, yy = env * x, env
    return tuple((xx * k[0] + 2.0 * xy * k[1] + yy * k[2]).sum(axis=-1) for k in (m.k0, m.k1))


def _devs_at(modes, t):
    """(dev0, dev1) summed over all modes (:func:`_mode_devs`) at the times ``t`` (n,)."""
    d0, d1 = np.zeros(t.size), np.zeros(t.size)
    for m in modes:
        a, b = _mode_devs(m, t[:, None])
        d0 += a
        d1 += b
    return d0, d1


def _state_row(sy: _Pair, modes, t: float):
    """r_t = e_idxᵀ A^t (its two components over all dimensions) at an integer t ≥ 1."""
    r = np.zeros((2, sy.hh.size))
    for m in modes:
        env = np.exp(-0.5 * m.kappa * (t - 1.0))
        x = _mode_x(m, t)
        if m.cplx:
            p, e = env * x, env * np.cos(t * m.rate)
        else:  # r1^{t−1} = sgn^{t−1} |r1|^{t−1}
            e = np.where((m.sgn < 0) & ((t - 1.0) % 2.0 == 1.0), -env, env)
            p = e * x
        r[:, m.sel] = p * np.asarray(m.w)
        r[sy.idx, m.sel] += e * m.zi
    return r


# --------------------------------------------------------------------------- public API


def _flag(name: str, x) -> bool:
    return _checks.flag(name, x)


def _configs(lr, batch, momentum, ema_decay, *, schedule: bool):
    lr = _positive("lr", lr, allow_zero=schedule)
    batch = _positive("batch", batch)
    mu = _unit_interval("momentum", momentum)
    beta = _unit_interval("ema_decay", 0.0 if ema_decay is None else ema_decay)
    lr, batch, mu, beta = _broadcast(lr=lr, batch=batch, momentum=mu, ema_decay=beta)
    return lr, batch, mu, beta


@_quiet
def expected_loss(h, c, lr, batch, steps=None, *, momentum=0.0, init_sq=1.0, precond_power=0.0,
                  ema_decay=None, nesterov=False):
    r"""Exact expected NQM loss E[L_t], t = 0..steps, of SGD / heavy ball / preconditioned SGD.

    SGD, with q_i = (1 − ηh̃_i)², h̃ = ph, c̃ = p²c, s_i(0) = ``init_sq``:

        E[L_t] = ½ Σ_i h_i [ q_i^t s_i(0) + (η² c̃_i/B)(1 − q_i^t)/(1 − q_i) ].

    Heavy ball (torch form, v₀ = 0), a = 1 − ηh̃_i, n_i = c̃_i/B, per dimension:

        E[θ²]'  = a² E[θ²] − 2aημ E[θv] + η²μ² E[v²] + η² n
        E[θv]'  = a h̃ E[θ²] + μ(a − ηh̃) E[θv] − ημ² E[v²] − η n
        E[v²]'  = h̃² E[θ²] + 2h̃μ E[θv] + μ² E[v²] + n

    (it is computed as the moment map of the linear dynamics, M = A⊗A, by repeated squaring).
    Nesterov replaces a by 1 − ηh̃(1+μ), ημ by ημ² in the θ row and the noise gain η by η(1+μ).

    Args:
        h: curvatures h_i > 0, shape (d,) (eigenvalues of H).
        c: per-example gradient-noise variances c_i ≥ 0, scalar or (d,).
        lr: η, multiplier of the **mean** minibatch gradient (> 0). Array → a grid of
            configurations. With ``steps=None`` its last axis is a schedule (rates ≥ 0).
        batch: B, examples per step (> 0; need not be an integer); broadcasts with ``lr``
            (with a schedule it may also vary along the last axis).
        steps: number of steps T (integer ≥ 0), or None for a schedule.
        momentum: μ ∈ [0, 1), heavy ball v ← μv + g, θ ← θ − ηv; broadcasts with ``lr``.
        init_sq: E[θ_i(0)²] ≥ 0, scalar or (d,).
        precond_power: p of P = (H/h_max)^{−p} (0: plain SGD; 1: Newton-like).
        ema_decay: β ∈ [0, 1) to report the loss at the EMA iterate θ̄ instead of θ_t.
        nesterov: torch's Nesterov momentum, θ ← θ − η(g + μv) after v ← μv + g.

    Returns:
        E[L_t], shape S + (T+1,) where S is the broadcast shape of (lr, batch, momentum,
        ema_decay) (without their schedule axis).

    >>> h = np.array([1.0, 0.1])
    >>> expected_loss(h, h, 0.5, 10, 2).round(6)  # t=1: ½[1·(0.25 + 0.025) + 0.1·(0.9025 + 0.0025)]
    array([0.55    , 0.18275 , 0.087838])
    >>> expected_loss(h, h, [0.5, 0.1], 10, 1).shape
    (2, 2)
    >>> expected_loss(h, h, [0.5, 0.5], 10).round(6)  # a schedule of two steps
    array([0.55    , 0.18275 , 0.087838])
    """
    nesterov = _flag("nesterov", nesterov)
    schedule = steps is None
    if not schedule:
        steps = _steps("steps", steps)
    lr, batch, mu, beta = _configs(lr, batch, momentum, ema_decay, schedule=schedule)
    pr = _problem(h, c, init_sq, precond_power)
    if schedule:
        if lr.ndim == 0:
            raise ValueError("lr must be an array whose last axis is the schedule when "
                             "steps=None (pass steps=T for a constant rate)")
        return _schedule_loss(pr, lr, batch, mu, beta, ema_decay is not None, nesterov)
    shape = lr.shape
    _fits_memory("steps", lr.size * (steps + 1.0))
    if pr.h.size == 0:
        return np.zeros(shape + (steps + 1,))
    has_v, has_ema = bool(np.any(mu > 0)), ema_decay is not None
    t = np.arange(steps + 1)
    flat = [a.reshape(-1) for a in (lr, batch, mu, beta)]
    if not (has_v or has_ema):
        logq, omq, noise = _sgd_factors(pr, flat[0], flat[1])
        out = _sgd_loss_at(pr, logq, omq, noise, t)
    else:
        out = np.empty((flat[0].size, steps + 1))
        k = 1 + has_v + has_ema
        s0 = _initial_state(pr, k, has_ema)
        d = pr.h.size
        dchunk = max(1, _CHUNK // ((steps + 1) * k * k))
        for ci in range(flat[0].size):
            M, b, idx = _linear_system(pr, *(a[ci] for a in flat), has_v, has_ema, nesterov)
            acc = np.zeros(steps + 1)
            for d0 in range(0, d, dchunk):
                sl = slice(d0, d0 + dchunk)
                traj = _orbit(M[sl], b[sl], s0[sl], steps + 1)[..., idx]
                with np.errstate(over="ignore", invalid="ignore"):
                    acc += 0.5 * pr.h[sl] @ traj
            out[ci] = acc
    out[np.isnan(out)] = np.inf  # overflow (unstable, or moments beyond float64)
    return out.reshape(shape + (steps + 1,))


def _schedule_loss(pr: _Problem, lr, batch, mu, beta, has_ema: bool, nesterov: bool):
    """Step-by-step moment recursion for a schedule (time on the last axis of the configs)."""
    T = lr.shape[-1]
    shape = lr.shape[:-1]
    out = np.empty(shape + (T + 1,))
    if pr.h.size == 0:
        out[...] = 0.0
        return out
    has_v = bool(np.any(mu > 0))
    k = 1 + has_v + has_ema
    s = np.broadcast_to(_initial_state(pr, k, has_ema), shape + pr.h.shape + (k * k,)).copy()
    idx = (k - 1) * (k + 1) if has_ema else 0
    out[..., 0] = 0.5 * s[..., idx] @ pr.h
    gone = np.zeros(shape, bool)  # overflowed: the loss is inf from then on
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(T):
            M, b, _ = _linear_system(pr, lr[..., t], batch[..., t], mu[..., t], beta[..., t],
                                     has_v, has_ema, nesterov)
            s = np.einsum("...ij,...j->...i", M, s) + b
            gone |= ~np.all(np.isfinite(s), axis=(-2, -1))
            s[gone] = 0.0
            out[..., t + 1] = np.where(gone, np.inf, 0.5 * s[..., idx] @ pr.h)
    return out


@_quiet
def stationary_loss(h, c, lr, batch, *, momentum=0.0, precond_power=0.0, ema_decay=None,
                    nesterov=False):
    r"""Limit of E[L_t] as t → ∞ at a constant rate (``inf`` when unstable).

    SGD: s_i* = η c̃_i / (B h̃_i (2 − ηh̃_i)), L* = ½ Σ h_i s_i*. Heavy ball (fixed point of the
    3×3 system): s_i* = η c̃_i (1+μ) / (B h̃_i (1−μ)(2(1+μ) − ηh̃_i)). With ``ema_decay`` or
    ``nesterov`` the stationary moments of the joint system are solved for. Unstable
    (ηh̃_max ≥ 2(1+μ), Nesterov 2(1+μ)/(1+2μ)) → inf.

    Args: as :func:`expected_loss` (``lr`` > 0 constant; all configuration arguments broadcast).

    Returns:
        L*, a float or an array of the broadcast configuration shape.

    >>> h = np.array([1.0, 0.1])
    >>> round(stationary_loss(h, h, 0.5, 10), 12)  # ½[0.5/(10·1.5) + 0.1·0.05/(10·1.95)]
    0.017948717949
    >>> round(stationary_loss(h, h, 0.5, 10, momentum=0.5), 12)  # ½[0.06 + 0.1·0.075/1.475]
    0.032542372881
    >>> stationary_loss(h, h, 2.0, 10)
    inf
    """
    nesterov = _flag("nesterov", nesterov)
    lr, batch, mu, beta = _configs(lr, batch, momentum, ema_decay, schedule=False)
    pr = _problem(h, c, 0.0, precond_power)
    out = _stationary(pr, lr, batch, mu, beta, ema_decay is not None, nesterov)
    out = np.where(np.isnan(out), np.inf, out)  # beyond float64
    return float(out) if out.ndim == 0 else out


def _stationary(pr: _Problem, lr, batch, mu, beta, has_ema: bool,
                nesterov: bool = False) -> np.ndarray:
    unstable = _unstable(pr, lr, mu, nesterov)
    eta, m = lr[..., None], mu[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        if not (has_ema or nesterov):
            s = eta * pr.cd * (1 + m) / (batch[..., None] * pr.hd * (1 - m)
                                         * (2 * (1 + m) - eta * pr.hd))
            out = 0.5 * s @ pr.h
        elif not (has_ema and np.any(mu > 0)):  # a 2×2 system: closed form
            sy = _pair_system(pr, eta, m, beta[..., None], "ema" if has_ema else "nesterov")
            out = sy.sst[2 * sy.idx].sum(axis=-1) / batch
        else:
            M, b, idx = _linear_system(pr, lr, batch, mu, beta, True, has_ema, nesterov)
            M = np.where(unstable[..., None, None, None], 0.0, M)
            out = 0.5 * _stationary_moments(M, b)[..., idx] @ pr.h
    return np.where(unstable, np.inf, out)


# --------------------------------------------------------------------------- steps to target


@_quiet
def steps_to_target(h, c, lr, batch, target, *, momentum=0.0, init_sq=1.0, precond_power=0.0,
                    ema_decay=None, nesterov=False, max_steps=10**7):
    r"""First step t ≤ ``max_steps`` with E[L_t] ≤ ``target``, vectorised over configurations.

    Returns ``inf`` where the target is not reached within ``max_steps`` and for unstable
    configurations (ηh̃_max ≥ 2(1+μ), which diverge). The answer is the *first* crossing,
    also where the loss oscillates and crosses the target several times. For SGD started
    above stationarity in every dimension (s_i(0) ≥ s_i*), E[L_t] − L* = Σ_i w_i q_i^t with
    w_i ≥ 0 is decreasing and log-convex in t, so Newton's method on log(E[L_t] − L*)
    approaches the crossing from below (a few closed-form evaluations per configuration).
    With momentum, Nesterov, an EMA (not both), or SGD started below stationarity somewhere,
    each dimension's moments follow a 2×2 map whose powers are in closed form
    (:class:`_Modes`): lower bounds of the loss valid for all later steps, Newton's method on
    them and exact O(d) evaluations find the crossing (:func:`_pair_search`); the loss is
    computed step by step only over short stretches where it oscillates near the target.
    All batch sizes and targets of one (lr, momentum, ema_decay) share that work. Momentum
    together with an EMA (a 3×3 map) is computed step by step, all batch sizes at once (cost
    ∝ the answer; an unreachable target stops once the accumulated noise alone exceeds it).

    Args:
        h, c, lr, batch, momentum, init_sq, precond_power, ema_decay, nesterov: as
            :func:`expected_loss` (constant ``lr`` > 0).
        target: loss to reach (> 0); broadcasts with the configurations.
        max_steps: largest step count searched (integer ≥ 0).

    Returns:
        Steps (float: an integer or ``inf``), shape S (a float for scalar configurations).

    >>> h = 1.0 / np.arange(1, 101)
    >>> l0 = expected_loss(h, h, 1.0, 1, 0)[0]
    >>> steps_to_target(h, h, [0.5, 1.0, 1.9, 2.5], 100, 0.1 * l0)  # 2.5 > 2/h_max diverges
    array([55., 28., 23., inf])
    >>> steps_to_target(h, h, [0.5, 1.0, 1.9], 100, 0.1 * l0, momentum=0.5)
    array([28., 15., 10.])
    """
    nesterov = _flag("nesterov", nesterov)
    lr, batch, mu, beta = _configs(lr, batch, momentum, ema_decay, schedule=False)
    target = _positive("target", target)
    max_steps = _steps("max_steps", max_steps)
    lr, batch, mu, beta, target = _broadcast(lr=lr, batch=batch, momentum=mu, ema_decay=beta,
                                             target=target)
    pr = _problem(h, c, init_sq, precond_power)
    shape = lr.shape
    flat = [np.ascontiguousarray(a).reshape(-1) for a in (lr, batch, mu, beta, target)]
    out = np.full(flat[0].size, np.inf)
    if pr.h.size == 0:  # the loss is identically 0
        out[:] = 0.0
        return float(out[0]) if not shape else out.reshape(shape)
    has_v, has_ema = bool(np.any(flat[2] > 0)), ema_decay is not None
    l0 = 0.5 * pr.h @ pr.x0
    unstable = _unstable(pr, flat[0], flat[2], nesterov)
    out[(l0 <= flat[4])] = 0.0
    todo = np.flatnonzero(~unstable & (l0 > flat[4]))
    if todo.size == 0:
        pass
    elif has_v and has_ema:  # a 3×3 map: scanned
        _triple_steps(pr, [a[todo] for a in flat], max_steps, out, todo, nesterov)
    elif has_v or has_ema:
        kind = "ema" if has_ema else ("nesterov" if nesterov else "heavy")
        _pair_steps(pr, kind, [a[todo] for a in flat], max_steps, out, todo)
    else:
        rest = _sgd_newton(pr, [a[todo] for a in flat], max_steps, out, todo)
        if rest.size:  # loss not monotone, several crossings possible
            _pair_steps(pr, "sgd", [a[rest] for a in flat], max_steps, out, rest)
    out[np.isnan(out)] = np.inf  # defensive: a crossing not computable in float64
    return float(out[0]) if not shape else out.reshape(shape)


def _sgd_newton(pr: _Problem, cfg, max_steps: int, out: np.ndarray, where: np.ndarray):
    """First crossings of SGD configurations, grouped by learning rate (see steps_to_target).

    For one η, q_i, a_i = ½h_i s_i(0) and b_i = ½h_i B s_i* do not depend on B, so
    E[L_t] − L* = Σ_i (a_i − b_i/B) q_i^t needs one exp per (configuration, dimension) and one
    matrix product per evaluation. Writes answers into ``out[where]``; returns the indices
    (into ``out``) left for the exact scan (non-monotone loss with ≥ 2 possible crossings).
    """
    lr, batch, _, _, target = cfg
    d = pr.h.size
    a = 0.5 * pr.h * pr.x0
    lr_u, inv = np.unique(lr, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(lr_u.size + 1))
    kchunk = max(1, _CHUNK // d)
    order_h = np.argsort(pr.hd, kind="stable")
    leftover = []

    def one_rate(li):
        eta = lr_u[li]
        logq, omq, _ = _sgd_factors(pr, np.array(eta), np.array(1.0))
        b = 0.5 * pr.h * eta**2 * pr.cd / omq  # ½h_i B s_i*
        W = np.stack([a, a * logq, b, b * logq], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            b_mono = np.max(np.where(b > 0, b / a, 0.0))  # w_i ≥ 0 ∀i ⇔ B ≥ max b_i/a_i
        members = order[bounds[li]:bounds[li + 1]]
        for k0 in range(0, members.size, kchunk):
            mem = members[k0:k0 + kchunk]
            bat, tgt = batch[mem], target[mem]
            gap = tgt - b.sum() / bat  # target − L*: need Σ w q^t ≤ gap
            mono = bat >= b_mono
            out[where[mem[mono & (gap <= 0)]]] = np.inf
            sel = mono & (gap > 0)
            _newton_group(logq, W, bat[sel], gap[sel], max_steps, out, where[mem[sel]],
                          order_h)
            if not np.all(mono):
                nm = ~mono
                w = a - b / bat[nm, None]
                seq = np.concatenate([w[:, np.argsort(logq)], -gap[nm, None]], axis=1)
                sgn = np.sign(seq)
                changes = np.array([np.count_nonzero(np.diff(r[r != 0])) for r in sgn])
                one = changes <= 1  # Descartes: at most one crossing of the target
                out[where[mem[nm][one & (gap[nm] <= 0)]]] = np.inf
                sel = one & (gap[nm] > 0)
                _bisect_group(logq, W, bat[nm][sel], gap[nm][sel], max_steps, out,
                              where[mem[nm][sel]])
                # E[L_t] ≥ L* − Σ_{w_i<0} |w_i| for all t: above the target → never reached
                floor_ = -gap[nm] + np.minimum(w, 0.0).sum(axis=1)
                out[where[mem[nm][~one & (floor_ > 0)]]] = np.inf
                leftover.append(where[mem[nm][~one & (floor_ <= 0)]])

    for li in range(lr_u.size):
        one_rate(li)
    return np.concatenate(leftover) if leftover else np.empty(0, dtype=int)


def _eval_group(logq, W, t, bat):
    """S(t) = Σ_i w_i q_i^t and dS/dt for configurations (t, bat) sharing one η."""
    e = np.multiply.outer(t, logq)
    np.exp(e, out=e)
    r = e @ W
    return r[:, 0] - r[:, 2] / bat, r[:, 1] - r[:, 3] / bat


def _newton_group(logq, W, bat, gap, max_steps, out, dest, order):
    """Newton on log S(t) from below (S decreasing and log-convex), on integer steps.

    Start: for the first k dimensions J_k of ``order`` (ascending h̃: slowest first when
    ηh̃ ≤ 1), S(t) ≥ (Σ_{J_k} w_j) min_{J_k} q_j^t (all w_j ≥ 0), a lower bound t₀ ≤ t_c.
    """
    if bat.size == 0:
        return
    ks = np.unique(np.geomspace(1, logq.size, 48).astype(int)) - 1
    cum = np.cumsum(W[order][:, [0, 2]], axis=0)[ks]  # Σ_{J_k} a, Σ_{J_k} b
    rate = -np.minimum.accumulate(logq[order])[ks]
    wk = cum[None, :, 0] - cum[None, :, 1] / bat[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        tk = np.log(wk / gap[:, None]) / rate
    t0 = np.max(np.where(wk > gap[:, None], tk, 0.0), axis=1)
    lo = np.maximum(np.ceil(t0) - 1.0, 0.0)
    beyond = lo >= max_steps
    out[dest[beyond]] = np.inf
    lo, bat, gap, dest = lo[~beyond], bat[~beyond], gap[~beyond], dest[~beyond]
    w0 = W.sum(axis=0)  # at t = 0 every q_i^t is 1
    s_lo, ds_lo = w0[0] - w0[2] / bat, w0[1] - w0[3] / bat
    start = lo > 0
    if np.any(start):
        s_lo[start], ds_lo[start] = _eval_group(logq, W, lo[start], bat[start])
        bad = start & (s_lo <= gap)  # rounding put t₀ past the crossing: restart at 0
        lo[bad], s_lo[bad], ds_lo[bad] = 0.0, w0[0] - w0[2] / bat[bad], w0[1] - w0[3] / bat[bad]
    for _ in range(200):
        if lo.size == 0:
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            step = (np.log(gap) - np.log(s_lo)) * s_lo / ds_lo
        step = np.where(np.isfinite(step) & (step > 0), step, 0.0)
        n = np.maximum(lo + 1.0, np.ceil(lo + step))
        beyond = n > max_steps  # the crossing lies beyond n − 1 ≥ max_steps
        out[dest[beyond]] = np.inf
        keep = ~beyond
        lo, n, bat, gap, dest = lo[keep], n[keep], bat[keep], gap[keep], dest[keep]
        s_n, ds_n = _eval_group(logq, W, n, bat)
        hit = s_n <= gap
        out[dest[hit]] = n[hit]
        keep = ~hit
        lo, s_lo, ds_lo = n[keep], s_n[keep], ds_n[keep]
        bat, gap, dest = bat[keep], gap[keep], dest[keep]
    _bisect_group(logq, W, bat, gap, max_steps, out, dest, lo=lo)  # not expected


def _bisect_group(logq, W, bat, gap, max_steps, out, dest, lo=None):
    """Doubling then bisection on integers, valid when S(t) − gap changes sign at most once."""
    lo = np.zeros(bat.size) if lo is None else lo
    hi = np.full(bat.size, np.inf)
    while True:  # doubling: find hi with S(hi) ≤ gap
        open_ = np.isinf(hi) & (lo < max_steps)
        if not np.any(open_):
            break
        t = np.minimum(np.maximum(2.0 * lo, lo + 1.0), max_steps)[open_]
        hit = _eval_group(logq, W, t, bat[open_])[0] <= gap[open_]
        idx = np.flatnonzero(open_)
        hi[idx[hit]] = t[hit]
        lo[idx[~hit]] = t[~hit]
    while True:
        open_ = np.isfinite(hi) & (hi - lo > 1)
        if not np.any(open_):
            break
        mid = np.floor(0.5 * (lo + hi))[open_]
        hit = _eval_group(logq, W, mid, bat[open_])[0] <= gap[open_]
        idx = np.flatnonzero(open_)
        hi[idx[hit]] = mid[hit]
        lo[idx[~hit]] = mid[~hit]
    out[dest] = hi


def _groups(cfg, per: int):
    """Indices of the configurations sharing (η, μ, β), in chunks of at most ``per``."""
    lr, _, mu, beta, _ = cfg
    uniq, inv = np.unique(np.stack([lr, mu, beta], axis=1), axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(uniq.shape[0] + 1))
    for gi, (eta, m_, b_) in enumerate(uniq):
        members = order[bounds[gi]:bounds[gi + 1]]
        for k0 in range(0, members.size, per):
            yield float(eta), float(m_), float(b_), members[k0:k0 + per]


def _triple_steps(pr: _Problem, cfg, max_steps: int, out: np.ndarray, where, nesterov: bool):
    """First crossings with momentum and an EMA together (3×3 per dimension), by scanning.

    z = (θ, v, θ̄); the row r_t = e_θ̄ᵀ A^t follows r ← rA step by step (the moment recursion
    itself), and E[L_t] = ½Σh r_t S0 r_tᵀ + (L*₁ − ½Σh r_t S*₁ r_tᵀ)/B serves every batch size
    and target of one (η, μ, β) at once, in blocks of steps doubling from 64. The second term,
    the loss of the noise injected so far, never decreases (a sum of positive semi-definite
    terms) and E[L_t] is at least that; once it is above the target, the target is never
    reached. Cost ∝ the answer (or the time the noise takes to build up past the target).
    """
    lr, batch, _, _, target = cfg
    d = pr.h.size
    hh = 0.5 * pr.h
    for eta, mu, beta, mem in _groups(cfg, max(1, _CHUNK // max(1, 4 * d))):
        b_ref = float(batch[mem].max())
        A, _ = _transfer(pr, np.array(eta), np.array(mu), np.array(beta), True, True,
                         nesterov, pr.h.shape)
        M, b, _ = _linear_system(pr, np.array(eta), np.array(b_ref), np.array(mu),
                                 np.array(beta), True, True, nesterov)
        w1 = hh[:, None, None] * _stationary_moments(M, b).reshape(d, 3, 3)
        w0 = np.zeros((d, 3, 3))
        w0[:, 0, 0] = w0[:, 0, 2] = w0[:, 2, 0] = w0[:, 2, 2] = hh * pr.x0  # θ̄_0 = θ_0
        pairs = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
        w = np.array([[f * x[:, i, j] for (i, j), f in zip(pairs, (1, 1, 1, 2, 2, 2),
                                                           strict=True)] for x in (w0, w1)])
        ls1 = float(w1[:, 2, 2].sum())
        if not (np.isfinite(ls1) and np.all(np.isfinite(w)) and np.all(np.isfinite(A))):
            continue  # noise per step beyond float64 even at the largest B: E[L_t≥1] = inf
        inv_b = b_ref / batch[mem]
        tgt = target[mem]
        r = np.zeros((3, d))
        r[2] = 1.0  # r_0 = e_θ̄
        a = [[np.ascontiguousarray(A[:, k, m]) for m in range(3)] for k in range(3)]
        live = np.ones(mem.size, bool)
        t0, n = 0, 64
        nb = max(1, _CHUNK // (6 * d))
        quad = np.empty((min(nb, 4096), 6, d))
        while np.any(live) and t0 <= max_steps:
            n = int(min(n, max_steps + 1 - t0))
            dev = np.empty((2, n))
            for j0 in range(0, n, nb):
                m_ = min(nb, n - j0)
                for j in range(m_):
                    for p, (i, k) in enumerate(pairs):
                        np.multiply(r[i], r[k], out=quad[j, p])
                    r = np.stack([r[0] * a[0][col] + r[1] * a[1][col] + r[2] * a[2][col]
                                  for col in range(3)])
                dev[:, j0:j0 + m_] = np.einsum("pkd,tkd->pt", w, quad[:m_])
            if not np.all(np.isfinite(dev)):  # moments beyond float64: the loss is inf
                n = int(np.argmin(np.all(np.isfinite(dev), axis=0)))
                dev, live_after = dev[:, :n], False
            else:
                live_after = True
            ts = t0 + np.arange(n)
            for j in np.flatnonzero(live):
                below = dev[0] + (ls1 - dev[1]) * inv_b[j] <= tgt[j]
                if np.any(below):
                    out[where[mem[j]]] = ts[np.argmax(below)]
                    live[j] = False
            if not live_after:
                break
            t0 += n
            n = min(2 * n, 4096)
            # E[L_t] ≥ the accumulated noise, which only grows: above the target, never reached
            live &= ~((ls1 - dev[1, -1]) * inv_b > tgt * (1 + 1e-12))
        # unresolved: inf (out was initialised to inf)


def _pair_steps(pr: _Problem, kind: str, cfg, max_steps: int, out: np.ndarray, where):
    """First crossings of 2×2 systems (:func:`_pair_search`), grouped by (η, μ, β).

    The moment map depends on (η, μ, β) but not on B, and E[L_t] = dev0(t) + (L*₁ − dev1(t))/B,
    so all batch sizes (and targets) of one (η, μ, β) share the closed form.
    """
    _, batch, _, _, target = cfg
    for eta, mu, beta, mem in _groups(cfg, max(1, _CHUNK // max(1, 4 * pr.h.size))):
        _pair_search(pr, kind, eta, mu, beta, batch[mem], target[mem], max_steps, out,
                     where[mem])


def _pair_search(pr: _Problem, kind: str, eta: float, mu: float, beta: float, batch, target,
                 max_steps: int, out: np.ndarray, dest: np.ndarray):
    r"""Exact first t ≥ 1 with E[L_t] ≤ target for configurations sharing (η, μ, β).

    Each configuration keeps t₁: E[L_t] > target is proven for every t < t₁. From t₁ the loss
    is bounded below for all t ≥ t₁ by G(t) = L* + Σ_i P_i e^{−κ_i (t−t₁)} − N
    (:func:`_pair_bound`); G decreases and its exponential sum is log-convex, so Newton's method
    from below finds the first integer t_G with G(t_G) ≤ target without passing it
    (:func:`_newton_below`). Every t in [t₁, t_G) is then proven above the target; E[L_{t_G}]
    is evaluated exactly (closed form): at or below the target it is the answer, otherwise
    t₁ ← t_G + 1. If G never reaches the target (or only beyond ``max_steps``) the answer is
    inf. Where that bound makes little progress (an oscillating loss near the target), the
    configurations "crawl": a window [t_s, t_s + w) starting at the earliest of them is proven
    above the target by per-dimension minima over the window (:func:`_window_bound`; for
    several configurations one bound of dev0 and one of dev1 serve all batch sizes; w doubles
    on success, halves on failure), and where a window fails the loss is evaluated at every
    step of the next stretch within a certified error (:func:`_sweep_round`: exponential sums
    by Taylor moments, a few flops per dimension and step; the stretch doubles while the loss
    stays clear of the target), any step not proven above the target evaluated in closed
    form. (Should a mode grow, the exact recursion from the closed-form state steps through
    instead: :func:`_block_devs`.) Crawlers go back to Newton after long windows hold, and
    every 16 rounds. Writes into ``out[dest]``.

    (One function of ~90 lines on purpose: the search loop shares a dozen arrays of per-
    configuration state — t₁, live, crawling, rounds, the window — that small functions would
    have to pass back and forth on every round.)
    """
    b_ref = float(batch.max())  # noise terms at the largest batch (the least likely to overflow)
    sy = _pair_system(pr._replace(cd=pr.cd / b_ref), eta, mu, beta, kind)
    modes = _pair_modes(sy)
    ls1 = float(sy.sst[2 * sy.idx].sum())  # L* at B = b_ref
    peaks = [None if m.cplx else _peak_times(m) for m in modes]
    kappa = np.concatenate([m.kappa for m in modes])
    segs = []  # column blocks of the modes (each sorted by κ) and prefix lengths for the start
    for a in np.cumsum([0] + [m.kappa.size for m in modes[:-1]]):
        b = a + modes[len(segs)].kappa.size
        ks = np.unique(np.geomspace(1, b - a, 24).astype(int)) - 1
        segs.append((a, b, ks, np.concatenate([[0], ks[:-1] + 1])))
    inv_b = b_ref / batch  # E[L_t] = dev0 + (L*_ref − dev1) b_ref/B
    lstar = ls1 * inv_b
    live = np.ones(batch.size, bool)
    if not all(np.all(np.isfinite(x)) for m in modes for x in (m.kappa, *m.k0)):
        raise ValueError(f"lr={eta!r}: the moment dynamics are beyond float64")
    # noise injected per step beyond float64: E[L_t] = inf for every t ≥ 1
    live[~np.isfinite(lstar) | ~np.all([np.all(np.isfinite(k)) for m in modes for k in m.k1])
         ] = False
    out[dest[~live]] = np.inf
    # common start: E[L_t] ≥ dev0(t) (the noise accumulated so far, (L*₁ − dev1(t))/B, is
    # ≥ 0) and dev0(t) ≥ Σ_i P_i e^{−κ_i (t−1)} for all B (S0 ⪰ 0): one Newton solve per target
    tgt, t_inv = np.unique(target, return_inverse=True)
    p0, neg0 = _pair_bound(modes, peaks, np.ones(1), np.zeros(1))
    tau0 = _newton_below(np.repeat(p0, tgt.size, axis=0), kappa, segs, tgt + neg0,
                         np.full(tgt.size, max_steps - 1.0))
    t1 = 1.0 + tau0[t_inv.reshape(-1)]

    def finish(rows, value):
        out[dest[rows]] = value
        live[rows] = False

    def past_max():
        finish(np.flatnonzero(live & (t1 > max_steps)), np.inf)

    crawling = np.zeros(batch.size, bool)
    rounds = np.zeros(batch.size)  # crawl rounds since the last Newton attempt
    win, scan_len = 64.0, 32.0  # shared window and exact block lengths of the crawlers
    sweep = None  # built when first needed (:func:`_sweep`), False where it does not apply
    sweep_len = fails = skip = 0  # sweep stretch; windows failed in a row; sweeps before the next
    past_max()
    while np.any(live):
        idx = np.flatnonzero(live & ~crawling)
        if idx.size:
            _newton_round(modes, peaks, kappa, segs, ls1, t1, idx, inv_b, target, max_steps,
                          finish, crawling)
            past_max()
        crawl = np.flatnonzero(live & crawling)
        if crawl.size == 0:
            win, scan_len = 64.0, 32.0
            continue
        rounds[crawl] += 1
        back = crawl[rounds[crawl] >= 16]  # retry Newton now and then
        crawling[back], rounds[back] = False, 0.0
        # one window [t_s, t₂] for all crawlers: E[L_t] ≥ L* + min dev0 − max dev1 / B
        # (two rows for any number of them), or per member min(dev0 − dev1/B) if ≤ 2
        t_s = t1[crawl].min()
        if skip:  # windows keep failing: sweep on without trying one
            skip -= 1
            sweep_len = _sweep_on(sweep, modes, ls1, int(t_s), sweep_len, live, t1, inv_b,
                                  target, max_steps, finish)
            past_max()
            continue
        t2 = min(t_s + win - 1.0, max_steps)
        cover = crawl[t1[crawl] <= t2]
        if cover.size <= 2:
            one = np.ones(cover.size)
            lb = _window_bound(modes, t_s * one, t2 * one, one, -inv_b[cover])
        else:
            lb0, lb1 = _window_bound(modes, np.array([t_s, t_s]), np.array([t2, t2]),
                                     np.array([1.0, 0.0]), np.array([0.0, -1.0]))
            lb = lb0 + lb1 * inv_b[cover]
        ok = lstar[cover] + lb - 1e-11 * lstar[cover] > target[cover]
        t1[cover[ok]] = t2 + 1.0
        if np.all(ok):
            win, fails = 2.0 * win, 0
            if win > 1024.0:  # long windows hold: back to Newton
                crawling[cover], rounds[cover] = False, 0.0
            past_max()
            continue
        win /= 2.0
        past_max()
        if sweep is None:
            sweep = _sweep(modes) or False
            sweep_len = sweep.w if sweep else 0
        if sweep:  # the loss at every step of the next stretch (shared by all members)
            # a window now pays only if it holds for ≳ 300 steps (≈ one bound's cost in sweep
            # steps at d = 10⁴); after failures, 1, 3, 7, 15 sweeps before the next try
            win, fails = max(win, 512.0), fails + 1
            skip = 2 ** min(fails - 1, 4) - 1
            sweep_len = _sweep_on(sweep, modes, ls1, int(t1[cover[~ok]].min()), sweep_len,
                                  live, t1, inv_b, target, max_steps, finish)
            past_max()
            continue
        if win >= 32.0:
            continue
        win = 64.0
        t_s = int(t1[cover[~ok]].min())  # exact block, shared by the members it covers
        n = int(min(scan_len, max_steps + 1 - t_s))
        scan_len = min(2.0 * scan_len, 4096.0)
        d0, d1 = _block_devs(sy, modes, t_s, n)
        ts = t_s + np.arange(n)
        for j in np.flatnonzero(live & (t1 >= t_s) & (t1 < t_s + n)):
            below = (d0 + (ls1 - d1) * inv_b[j] <= target[j]) & (ts >= t1[j])
            if np.any(below):
                finish(j, ts[np.argmax(below)])
            else:
                t1[j] = t_s + n
        past_max()


def _newton_round(modes, peaks, kappa, segs, ls1, t1, idx, inv_b, target, max_steps, finish,
                  crawling):
    """One bound + Newton + exact evaluation round of :func:`_pair_search` for members idx."""
    lstar = ls1 * inv_b[idx]
    p, neg = _pair_bound(modes, peaks, t1[idx], inv_b[idx])
    gap = target[idx] - lstar + neg - 1e-11 * lstar
    finish(idx[gap <= 0], np.inf)  # G(t) > target for all t ≥ t₁
    keep = ~(gap <= 0)
    idx, p, gap = idx[keep], p[keep], gap[keep]
    unknown = ~np.isfinite(gap)  # a bound that failed (overflow): evaluate t₁ exactly
    p[unknown], gap[unknown] = 0.0, 1.0
    tau = _newton_below(p, kappa, segs, gap, max_steps - t1[idx])
    finish(idx[np.isinf(tau)], np.inf)
    keep = np.isfinite(tau)
    idx, tau = idx[keep], tau[keep]
    if idx.size == 0:
        return
    tg = t1[idx] + tau
    d0, d1 = _devs_at(modes, tg)
    hit = d0 + (ls1 - d1) * inv_b[idx] <= target[idx]
    finish(idx[hit], tg[hit])
    t1[idx[~hit]] = tg[~hit] + 1.0
    crawling[idx[~hit & (tau < 8)]] = True  # little progress: the loss oscillates near target


def _sweep_on(sweep, modes, ls1, t_s, n, live, t1, inv_b, target, max_steps, finish) -> int:
    """One :func:`_sweep_round` of n steps from t_s; returns the next stretch's length: one
    window after the loss came near the target, else twice this one (up to _SWEEP_GROW
    windows)."""
    near = _sweep_round(sweep, modes, ls1, t_s, n, live, t1, inv_b, target, max_steps, finish)
    return sweep.w if near else min(2 * n, _SWEEP_GROW * sweep.w)


def _sweep_round(sweep, modes, ls1, t_s, n, live, t1, inv_b, target, max_steps, finish):
    """Settle steps t_s … t_s + n − 1 for the live members whose t₁ lies in them.

    :func:`_sweep_devs` gives the loss at each step within a bound on its error; the first
    step not proven above the target is evaluated in closed form (:func:`_mode_devs`, as in
    :func:`_newton_round`): at or below the target it is the answer, otherwise the search
    goes on from the next step. Members with no such step move t₁ past the stretch. Returns
    whether any step needed the closed form (the loss came near the target).
    """
    n = int(min(n, max_steps + 1 - t_s))
    members = np.flatnonzero(live & (t1 >= t_s) & (t1 < t_s + n))
    if members.size == 0:
        return False
    if members.size <= 2:  # each member's loss as one row: L* + dev0 − dev1/B
        rows, err = _sweep_devs(sweep, t_s, n, np.stack([np.ones(members.size),
                                                         -inv_b[members]], axis=1))
        lower = {j: ls1 * inv_b[j] + rows[r] - err[r] for r, j in enumerate(members)}
    else:  # dev0 and dev1, shared by all
        (d0, d1), (e0, e1) = _sweep_devs(sweep, t_s, n)
        lower = {j: d0 + (ls1 - d1) * inv_b[j] - (e0 + e1 * inv_b[j]) for j in members}
    ts = t_s + np.arange(n)
    exact = {}
    for j in members:
        maybe = (lower[j] <= target[j]) & (ts >= t1[j])
        for t in ts[maybe]:
            if t not in exact:
                exact[t] = [float(v[0]) for v in _devs_at(modes, np.array([float(t)]))]
            if exact[t][0] + (ls1 - exact[t][1]) * inv_b[j] <= target[j]:
                finish(j, float(t))
                break
        else:
            t1[j] = float(t_s + n)
    return bool(exact)


def _window_bound(modes, t1, t2, c0, c1):
    r"""Σ_i min_{t₁ ≤ t ≤ t₂} ½h_i r_t D r_tᵀ (a lower bound) for D = c0 S0 + c1 S*₁, per row.

    ``t1``, ``t2``, ``c0``, ``c1``: arrays (n,); returns (n,).

    Per dimension dev_t = env_t Q(X_t, Y_t) (:class:`_Modes`): env decreases, so
    dev ≥ min Q · env_{t₂} (min Q ≥ 0) or min Q · env_{t₁}. min Q over the window: real roots,
    the quadratic in X over X's range (X monotone for q ≥ 0; between X_{t₁} and X_{t₁+1} for
    q < 0); complex roots, Q = P0 + P1 cos 2θ + P2 sin 2θ (θ = tφ) at the window's ends, or
    P0 − √(P1² + P2²) where its minimum falls inside. A margin of 1e-11 of the terms'
    magnitude covers rounding.
    """
    w0, w1 = c0[:, None], c1[:, None]
    a1, a2 = t1[:, None], t2[:, None]
    total = np.zeros(t1.size)
    for m in modes:
        ka = w0 * m.k0[0] + w1 * m.k1[0]
        kb = w0 * m.k0[1] + w1 * m.k1[1]
        kc = w0 * m.k0[2] + w1 * m.k1[2]
        e1, e2 = np.exp(-m.kappa * (a1 - 1.0)), np.exp(-m.kappa * (a2 - 1.0))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if not m.cplx:
                x1, x2 = _mode_x(m, a1), _mode_x(m, a2)
                lo, hi = np.minimum(x1, x2), np.maximum(x1, x2)
                if m.neg.size:
                    x3 = _mode_x(m, a1 + 1.0)[:, m.neg]
                    lo[:, m.neg] = np.minimum(x1[:, m.neg], x3)
                    hi[:, m.neg] = np.maximum(x1[:, m.neg], x3)
                qmin = _quad_min(ka, kb, kc, lo, hi)
                xm = np.maximum(np.abs(lo), np.abs(hi))
            else:
                s = m.scale
                th1, th2 = a1 * m.rate, a2 * m.rate
                ends = []
                for th in (th1, th2):
                    x, y = np.sin(th) / s, np.cos(th)
                    ends.append((ka * x + 2.0 * kb * y) * x + kc * y * y)
                qmin = np.minimum(*ends)
                fa = ka / (s * s)
                p0, p1, p2 = 0.5 * (fa + kc), 0.5 * (kc - fa), kb / s
                r = np.hypot(p1, p2)
                tstar = 0.5 * (np.arctan2(p2, p1) + np.pi)  # 2θ* − α = π: the minimum
                k = np.ceil((th1 - tstar) / np.pi)
                inside = tstar + k * np.pi <= th2
                qmin = np.where(inside, np.minimum(qmin, p0 - r - 1e-12 * (np.abs(p0) + r)),
                                qmin)
                xm = 1.0 / s
            lb = np.where(qmin >= 0, qmin * e2, np.where(e1 > 0, qmin * e1, 0.0))
            mag = (np.abs(ka) * xm * xm + 2.0 * np.abs(kb) * xm + np.abs(kc)) * e1
        total += lb.sum(axis=1) - 1e-11 * np.where(np.isfinite(mag), mag, 0.0).sum(axis=1)
    return total


def _peak_times(m: _Modes):
    """Continuous maximisers over t of env_t X_t and env_t X_t² (real roots, 0 ≤ q ≤ 1).

    log(env_t X_t^k) = −κ(t−1) + k log(1 − q^t) + const is concave: its maximum is at
    q^t = κ/(κ + k L_q), L_q = −log q, i.e. t* = log(1 + k L_q/κ)/L_q (→ k/κ as q → 1).
    """
    lq = -m.rate
    out = []
    for k in (1.0, 2.0):
        with np.errstate(divide="ignore", invalid="ignore"):
            tp = np.where(lq > 0, np.log1p(k * lq / m.kappa) / np.where(lq > 0, lq, 1.0),
                          k / m.kappa)
        out.append(np.where(np.isfinite(tp), tp, 0.0))
    return out


def _quad_min(ka, kb, kc, lo, hi):
    """min of ka g² + 2kb g + kc over g ∈ [lo, hi], elementwise (the clipped vertex if convex)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        v = np.clip(-kb / ka, lo, hi)
        f_v = (ka * v + 2.0 * kb) * v + kc
        f_ends = np.minimum((ka * lo + 2.0 * kb) * lo + kc, (ka * hi + 2.0 * kb) * hi + kc)
    return np.where(ka > 0, f_v, f_ends)


def _bound_times(m: _Modes, peaks, t1):
    """The parts of :func:`_pair_bound` that depend on t₁ (u, 1) only, arrays (u, d_m):
    env_{t₁}, the range [lo, hi] of X_t over t ≥ t₁ (real roots), and the maxima over t ≥ t₁
    of env_t |X_t| and env_t X_t²."""
    env1 = np.exp(-m.kappa * (t1 - 1.0))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if m.cplx:
            f = []
            for k in (1.0, 2.0):
                tm = np.maximum(t1, k / m.kappa)
                f.append(np.minimum(np.exp(-m.kappa * (tm - 1.0)) * tm**k, env1 / m.scale**k))
            return env1, None, None, f[0], f[1]
        lo = _mode_x(m, t1)
        hi = np.broadcast_to(np.where(m.scale > 0, 1.0 / m.scale, 1e300), lo.shape).copy()
        if m.neg.size:  # X_t oscillates between X_{t₁} and X_{t₁+1}
            x2 = _mode_x(m, t1 + 1.0)[:, m.neg]
            x1 = lo[:, m.neg]
            lo[:, m.neg], hi[:, m.neg] = np.minimum(x1, x2), np.maximum(x1, x2)
        f = []
        for k, tp in zip((1.0, 2.0), peaks, strict=True):
            tm = np.maximum(t1, tp)
            fm = np.exp(-m.kappa * (tm - 1.0)) * _mode_x(m, tm) ** k
            if m.neg.size:
                fm[:, m.neg] = env1[:, m.neg] * hi[:, m.neg] ** k
            f.append(fm)
    return env1, lo, hi, f[0], f[1]


def _pair_bound(modes, peaks, t1, inv_b):
    r"""Lower bound E[L_t] − L* ≥ Σ_i P_i e^{−κ_i (t − t₁)} − N for all t ≥ t₁, per member.

    ``t1``, ``inv_b`` (n,). Per dimension dev_t = env_t Q(X_t, Y_t) with env_t > 0
    decreasing (:class:`_Modes`); two bounds, the better one kept:

    * Q ≥ Q_lo over the values (X, Y) take for t ≥ t₁ — X_t ∈ [X_{t₁}, 1/(1 − q)] (0 ≤ q < 1,
      X increasing), between X_{t₁} and X_{t₁+1} (q < 0), any phase (complex roots: Q_lo is
      the smallest eigenvalue of the form in (sin θ, cos θ)) — so dev_t ≥ Q_lo env_t: a
      decaying exponential if Q_lo ≥ 0, else at least Q_lo env_{t₁};
    * term by term: the positive parts of k_a X², 2k_b X, k_c at X = X_{t₁} times env_t
      (real roots), the negative ones at their maxima over t ≥ t₁ of env_t X_t^k
      (:func:`_peak_times`; |X_t| ≤ min(t, 1/sin φ) for complex roots) — finite where the
      roots (nearly) coincide and the first bound is not.

    Returns P·env_{t₁} (n, d) ≥ 0 and N (n,) ≥ 0, N with a margin of 1e-11 of the terms'
    magnitude for rounding. The t₁-only parts are computed once per distinct t₁.
    """
    ut, inv = np.unique(t1, return_inverse=True)
    ib = inv_b[:, None]
    ps, neg = [], np.zeros(t1.size)
    for m, pk in zip(modes, peaks, strict=True):
        env1, lo, hi, f1, f2 = _bound_times(m, pk, ut[:, None])
        mag = [((np.abs(k[0]) * f2 + 2.0 * np.abs(k[1]) * f1 + np.abs(k[2]) * env1)
                .sum(axis=1)[inv]) for k in (m.k0, m.k1)]
        neg += 1e-11 * (mag[0] + inv_b * mag[1])
        env1, f1, f2 = env1[inv], f1[inv], f2[inv]
        if not m.cplx:
            lo, hi = lo[inv], hi[inv]
        ka = m.k0[0] - ib * m.k1[0]
        kb = m.k0[1] - ib * m.k1[1]
        kc = m.k0[2] - ib * m.k1[2]
        if m.cplx:
            fa, fb = ka / (m.scale * m.scale), kb / m.scale
            qlo = (0.5 * (fa + kc) - np.hypot(0.5 * (fa - kc), fb)
                   - 1e-12 * (np.abs(fa) + np.abs(fb) + np.abs(kc)))
        else:
            qlo = _quad_min(ka, kb, kc, lo, hi)
        p = np.maximum(qlo, 0.0) * env1
        rows, cols = np.nonzero(qlo < 0)  # Q_lo < 0: keep the better of the two bounds
        if rows.size:
            ka, kb, kc, e1 = ka[rows, cols], kb[rows, cols], kc[rows, cols], env1[rows, cols]
            f1, f2 = f1[rows, cols], f2[rows, cols]
            pa, pb, pc = np.maximum(ka, 0.0), np.maximum(kb, 0.0), np.maximum(kc, 0.0)
            with np.errstate(invalid="ignore", over="ignore"):
                n_whole = np.where(e1 > 0, -qlo[rows, cols] * e1, 0.0)
            if m.cplx:
                p_split = 0.0
                n_split = (pa - ka) * f2 + 2.0 * np.abs(kb) * f1 + (pc - kc) * e1
            else:
                x = lo[rows, cols]
                p_split = (pa * x + 2.0 * pb) * x + pc
                n_split = (pa - ka) * f2 + 2.0 * (pb - kb) * f1 + (pc - kc) * e1
            split = n_split < n_whole
            p[rows, cols] = np.where(split, p_split * e1, 0.0)
            neg += np.bincount(rows, weights=np.where(split, n_split, n_whole),
                               minlength=t1.size)
        ps.append(p)
    return np.concatenate(ps, axis=1), neg


def _newton_below(p, kappa, segs, gap, tmax):
    """First integer τ ≥ 0 with Φ(τ) = Σ_i p_i e^{−κ_i τ} ≤ gap (p ≥ 0, gap > 0), per row.

    Φ is decreasing and log-convex, so Newton's method on log Φ from below never passes the
    crossing (as :func:`_newton_group`); it starts from the bound Φ(τ) ≥ (Σ_{J_k} p)
    e^{−max_{J_k} κ τ} over the k slowest dimensions J_k of each block ``segs`` (slices of
    the columns, each sorted by κ). Returns τ (``inf`` where the crossing lies beyond
    ``tmax``; lo + 1 with Φ > gap proven up to lo if not converged).
    """
    res = np.full(p.shape[0], np.inf)
    phi0 = p.sum(axis=1)
    res[phi0 <= gap] = 0.0
    rows = np.flatnonzero(phi0 > gap)
    if rows.size == 0:
        return res
    pr, g = p[rows], gap[rows]
    lo = np.zeros(rows.size)
    for a, b, ks, starts in segs:
        cum = np.cumsum(np.add.reduceat(pr[:, a:b], starts, axis=1), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            tk = np.log(cum / g[:, None]) / kappa[a + ks]
        lo = np.maximum(lo, np.max(np.where((cum > g[:, None]) & np.isfinite(tk), tk, 0.0),
                                   axis=1))
    lo = np.maximum(np.ceil(lo) - 1.0, 0.0)
    e = pr * np.exp(-np.multiply.outer(lo, kappa))
    s_lo = e.sum(axis=1)
    for _ in range(100):
        back = s_lo <= g  # rounding put the start past the crossing: restart at 0
        if np.any(back):
            lo[back], e[back] = 0.0, pr[back]
            s_lo[back] = e[back].sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = (np.log(s_lo) - np.log(g)) * s_lo / (e @ kappa)
        step = np.where(np.isfinite(step) & (step > 0), step, 0.0)
        n = np.maximum(lo + 1.0, np.ceil(lo + step))
        e = pr * np.exp(-np.multiply.outer(n, kappa))
        s_lo = e.sum(axis=1)
        beyond = n - 1.0 >= tmax[rows]  # proven above the target through n − 1 ≥ tmax
        hit = ~beyond & (s_lo <= g)
        res[rows[hit]] = n[hit]
        keep = ~(beyond | hit)
        rows, lo, g, pr, e, s_lo = rows[keep], n[keep], g[keep], pr[keep], e[keep], s_lo[keep]
        if rows.size == 0:
            return res
    res[rows] = lo + 1.0
    return res


def _block_devs(sy: _Pair, modes, t_s: int, n: int):
    """Exact (dev0, dev1) at t_s … t_s + n − 1: the recursion r ← rA from the closed-form r_{t_s}.

    This is the step-by-step moment recursion itself (E_t = A^t D A^tᵀ, one step per row),
    started at t_s instead of 0.
    """
    a00, a01, a10, a11 = sy.a
    r0, r1 = _state_row(sy, modes, float(t_s))
    w = np.stack([sy.s0[0], 2.0 * sy.s0[1], sy.s0[2], sy.sst[0], 2.0 * sy.sst[1], sy.sst[2]])
    dev = np.empty((2, n))
    nb = max(1, _CHUNK // (3 * r0.size))
    quad = np.empty((min(nb, n), 3, r0.size))
    for j0 in range(0, n, nb):
        m = min(nb, n - j0)
        for j in range(m):
            quad[j, 0], quad[j, 1], quad[j, 2] = r0 * r0, r0 * r1, r1 * r1
            r0, r1 = r0 * a00 + r1 * a10, r0 * a01 + r1 * a11
        dev[0, j0:j0 + m] = np.einsum("tkd,kd->t", quad[:m], w[:3])
        dev[1, j0:j0 + m] = np.einsum("tkd,kd->t", quad[:m], w[3:])
    return dev[0], dev[1]


# --------------------------------------------------------------------------- exact sweeps

_SWEEP_WS = (16, 32, 64, 128, 256, 512)  # candidate window lengths (steps) of a sweep
_SWEEP_GROW = 16  # a sweep covers up to this many windows while the loss stays clear
_TAYLOR_R = 2.0  # Taylor terms: |λ| (w − 1)/2 ≤ R, so every |λs| ≤ R in the window
_TAYLOR_K = 24  # the highest Taylor order
# (radius r, order K) of the Taylor groups: remainders r^K/K! e^r/(1 − r/(K+1)) of 1.2e-15 and
# 2.2e-16 of Σ|b|, below the rounding term γ_J Σ|b| e^R of a sum of J terms
_TAYLOR_ORDERS = ((0.5, 14), (_TAYLOR_R, _TAYLOR_K))
_NEAR_DOUBLE = 1e-6  # 1 − q or sin φ below this: the dimension stays in closed form
_EPS = 2.3e-16  # unit roundoff (with a little room)


def _taylor_tail(r: float, k: int) -> float:
    """Σ_{j≥k} r^j/j! · e^r ≥ |e^z − Σ_{j<k} z^j/j!| for |z| ≤ r (also for Re z < 0)."""
    return r**k / math.factorial(k) / (1 - r / (k + 1)) * math.exp(r)


class _Sweep(NamedTuple):
    r"""dev0, dev1 of a :class:`_Pair` (:func:`_mode_devs`) at every step of a stretch, fast.

    Per dimension dev(t) = env_t Q(X_t, Y_t) is a sum of at most three exponentials in
    τ = t − 1 (:func:`_exp_terms`), so dev_c(t) = Re Σ_j a_cj e^{λ_j τ}, Re λ_j ≤ 0. Over a
    window of w steps centred at τ_c, the terms with |λ_j|(w − 1)/2 ≤ R ("slow") are
    e^{λ_j τ_c} Σ_k (λ_j h)^k/k! (s/h)^k (s = τ − τ_c, h = (w − 1)/2): K moments
    M_ck = Σ_j a_cj e^{λ_j τ_c} (λ_j h)^k/k! — a product with the fixed matrix
    V_jk = (λ_j h)^k/k!, |V_jk| ≤ R^k/k! — and a polynomial in s/h ∈ [−1, 1] of degree K − 1
    at the w steps. Consecutive windows' e^{λ τ_c} follow by multiplying with e^{λw}.
    The few fast terms are summed directly (their e^{λs}, s < w, tabulated), and dimensions
    with (nearly) double roots, whose exponentials would cancel, are evaluated in closed form
    (``direct``). Each window also gets a bound on its error (:func:`_sweep_devs`).
    """

    w: int  # window length (steps)
    slow: list  # :class:`_Taylor` groups of the slow terms
    lam_fast: np.ndarray  # (J_f,) complex
    a_fast: np.ndarray  # (2, J_f) complex
    m_fast: np.ndarray  # (2, J_f)
    table: np.ndarray  # (w, J_f) complex, e^{λs} for s = 0 … w − 1
    direct: list  # :class:`_Modes` kept in closed form
    powers: np.ndarray  # (w, K) real, (s/h)^k for s = τ − τ_c, h = (w − 1)/2


class _Taylor(NamedTuple):
    """Slow terms of a :class:`_Sweep` sharing a Taylor order: real exponents (and real
    coefficients) in real arithmetic, a quarter of the work; |λ|(w − 1)/2 ≤ r."""

    lam: np.ndarray  # (J,) real or complex
    a: np.ndarray  # (2, J), the dtype of lam
    mag: np.ndarray  # (2, J) Σ|a| of the terms merged into each (equal λ)
    vander: np.ndarray  # (J, K) (λh)^k/k!, h = (w − 1)/2: scaled, so that no moment underflows
    tail: float  # :func:`_taylor_tail` (r, K)


def _taylor_groups(lam, a, mag, half: float) -> list:
    """The slow terms (|λ| half ≤ R) split by real or complex exponent and by the Taylor order
    their radius |λ| half needs (_TAYLOR_ORDERS)."""
    radius = np.abs(lam) * half
    real = (lam.imag == 0) & np.all(a.imag == 0, axis=0)
    groups, lo = [], -1.0
    for r, k in _TAYLOR_ORDERS:
        for is_real in (True, False):
            sel = (radius > lo) & (radius <= r) & (real == is_real)
            if not np.any(sel):
                continue
            lg = lam[sel].real if is_real else lam[sel]
            vander = np.ones((lg.size, k), lg.dtype)
            for j in range(1, k):
                vander[:, j] = vander[:, j - 1] * (lg * half) / j
            ag = a[:, sel].real if is_real else a[:, sel]
            groups.append(_Taylor(lg, ag, mag[:, sel], vander, _taylor_tail(r, k)))
        lo = r
    return groups


def _exp_terms(m: _Modes):
    r"""(λ, a, keep) for the dimensions of ``m``: dev_c(t) = Re Σ a_c e^{λτ}, τ = t − 1.

    Complex roots (θ = tφ, s = sin φ, f_a = k_a/s²): Q = P0 + P1 cos 2θ + P2 sin 2θ with
    P0 = (f_a + k_c)/2, P1 = (k_c − f_a)/2, P2 = k_b/s, so dev = P0 e^{−κτ}
    + Re[(P1 − iP2) e^{2iφ} e^{(−κ + 2iφ)τ}]. Real roots (u = q^t, 1 − q = σ): Q = C0 + C1 u
    + C2 u², C0 = k_a/σ² + 2k_b/σ + k_c, C1 = −2k_a/σ² − 2k_b/σ, C2 = k_a/σ², and
    q^t = q · e^{(log|q| + iπ[q<0]) τ}. ``keep`` marks the dimensions represented so (not
    near a double root, where these coefficients would cancel).
    """
    k = m.kappa
    if m.cplx:
        s, phi = m.scale, m.rate
        keep = s >= _NEAR_DOUBLE
        lam = [-k + 0j, -k + 2j * phi]
        coef = []
        for ka, kb, kc in (m.k0, m.k1):
            fa = ka / np.where(keep, s * s, 1.0)
            p0, p1, p2 = 0.5 * (fa + kc), 0.5 * (kc - fa), kb / np.where(keep, s, 1.0)
            coef.append([p0 + 0j, (p1 - 1j * p2) * np.exp(2j * phi)])
    else:
        sig = m.scale
        keep = sig >= _NEAR_DOUBLE
        aq = np.exp(m.rate)
        q = np.where(m.qneg, -aq, aq)
        lq = m.rate + 1j * np.pi * m.qneg
        lam = [-k + 0j, -k + lq, -k + 2.0 * m.rate + 0j]
        coef = []
        for ka, kb, kc in (m.k0, m.k1):
            sg = np.where(keep, sig, 1.0)
            fa, fb = ka / (sg * sg), kb / sg
            coef.append([fa + 2.0 * fb + kc + 0j, (-2.0 * fa - 2.0 * fb) * q + 0j,
                         fa * q * q + 0j])
    lam = np.concatenate([x[keep] for x in lam])
    a = np.stack([np.concatenate([x[keep] for x in c]) for c in coef])
    return lam, a, keep


def _modes_subset(m: _Modes, keep: np.ndarray) -> _Modes:
    """The dimensions ``keep`` (a mask over ``m``'s) as a :class:`_Modes` of their own."""
    f = {name: getattr(m, name) for name in ("sel", "kappa", "sgn", "scale", "rate", "qneg")}
    f = {n: v[keep] for n, v in f.items()}
    k0, k1 = (tuple(x[keep] for x in kk) for kk in (m.k0, m.k1))
    w = tuple(np.broadcast_to(x, keep.shape)[keep] for x in m.w)
    dbl = np.flatnonzero(f["scale"] == 0) if not m.cplx else np.empty(0, int)
    return _Modes(m.cplx, f["sel"], f["kappa"], f["sgn"], f["scale"], f["rate"], f["qneg"],
                  np.flatnonzero(f["qneg"]), dbl, np.where(f["scale"] == 0, 1.0, f["scale"]),
                  k0, k1, w, np.broadcast_to(m.zi, keep.shape)[keep])


def _sweep(modes) -> _Sweep | None:
    """The :class:`_Sweep` of these modes, or None where a mode grows (κ < 0).

    The window length w minimises the work per step, J(K + 10)/w for the Taylor part (J
    exponentials and a J × K product per window) plus one product per fast term (their
    e^{λs}, s < w, are tabulated once: at most _CHUNK/8 of them, as building the table costs
    more than a stretch of a few windows uses).
    """
    if any(np.any(m.kappa < 0) for m in modes):
        return None
    lams, coefs, direct = [], [], []
    for m in modes:
        lam, a, keep = _exp_terms(m)
        lams.append(lam)
        coefs.append(a)
        if not np.all(keep):
            direct.append(_modes_subset(m, ~keep))
    lam, a, mag = _merge_terms(np.concatenate(lams), np.concatenate(coefs, axis=1))
    size = np.abs(lam)
    best = None
    for w in _SWEEP_WS:
        n_fast = int(np.count_nonzero(size * (0.5 * (w - 1)) > _TAYLOR_R))
        cost = lam.size * (_TAYLOR_K + 10) / w + n_fast
        if w * n_fast <= _CHUNK // 8 and (best is None or cost < best[0]):
            best = (cost, w)
    if best is None or lam.size * _TAYLOR_K > 4 * _CHUNK:  # (V would pass 128 MiB)
        return None
    w = best[1]
    half = 0.5 * (w - 1)
    slow = size * half <= _TAYLOR_R
    s = np.arange(w) - half
    with np.errstate(under="ignore"):  # e^{λs} = (e^λ)^s, s < w: relative rounding ≤ 2sε
        table = np.cumprod(np.broadcast_to(np.exp(lam[~slow]), (w, int((~slow).sum()))), axis=0)
        table = np.concatenate([np.ones((1, table.shape[1]), complex), table[:-1]])
    return _Sweep(w, _taylor_groups(lam[slow], a[:, slow], mag[:, slow], half), lam[~slow],
                  a[:, ~slow], mag[:, ~slow], table, direct,
                  (s / half)[:, None] ** np.arange(_TAYLOR_K))


def _merge_terms(lam, a):
    """Terms with equal exponents summed into one (heavy ball: every complex dimension decays
    as μ^τ): (λ, Σa, Σ|a|), the last for the error bounds."""
    uniq, inv = np.unique(lam, return_inverse=True)
    if uniq.size == lam.size:
        return lam, a, np.abs(a)
    inv = inv.reshape(-1)
    out = np.zeros((2, uniq.size), complex)
    mag = np.zeros((2, uniq.size))
    for c in range(2):
        np.add.at(out[c], inv, a[c])
        np.add.at(mag[c], inv, np.abs(a[c]))
    return uniq, out, mag


def _sweep_devs(sw: _Sweep, t_s: int, n: int, mix=None):
    """Σ_c mix_rc dev_c at t_s … t_s + n − 1 and bounds on their errors: two arrays (m, n) for
    the m rows of ``mix`` (default the identity: dev0 and dev1), in pieces of whole windows
    that keep the working arrays within _CHUNK numbers (:func:`_sweep_piece`). A member's loss
    E[L_t] = L* + dev0 − dev1/B is one row (1, −1/B): half the work of both."""
    mix = np.eye(2) if mix is None else np.asarray(mix, float).reshape(-1, 2)
    n_direct = sum(m.kappa.size for m in sw.direct)
    n_terms = sum(g.lam.size for g in sw.slow) + sw.lam_fast.size
    per = sw.w * max(1, min(
        _CHUNK // max(1, mix.shape[0] * n_terms),
        _CHUNK // max(1, sw.w * n_direct)))
    if n <= per:
        return _sweep_piece(sw, t_s, n, mix)
    parts = [_sweep_piece(sw, t_s + a, min(per, n - a), mix) for a in range(0, n, per)]
    return tuple(np.concatenate(x, axis=1) for x in zip(*parts, strict=True))


def _sweep_piece(sw: _Sweep, t_s: int, n: int, mix):
    """:func:`_sweep_devs` for ⌈n/w⌉ windows at once (see :class:`_Sweep`).

    The bounds cover the Taylor remainder, the fast terms dropped as negligible
    (|b| ≤ 1e-20 Σ|b|; |e^{λs}| ≤ 1 for s ≥ 0) and rounding: γ_m Σ|b| e^R with m the number
    of terms summed (|b| from the magnitudes of the merged terms), plus ε(4|λ|τ + 2k) per term
    for the exponent λτ and the k-th power of e^{λw} (the closed form :func:`_mode_devs`
    rounds its exponents too), and 1e-290 for values near underflow.
    """
    w, nw, rows = sw.w, -(-n // sw.w), mix.shape[0]
    starts = t_s - 1.0 + w * np.arange(nw)  # τ at each window's first step
    tau_end = starts + (w - 1.0)
    k_pow = np.arange(nw)
    dev = np.zeros((rows, nw, w))
    err = np.full((rows, nw), 1e-290)  # (subnormals)
    mag = np.zeros((rows, nw))
    with np.errstate(under="ignore"):
        for g in sw.slow:
            k = g.vander.shape[1]
            e = _window_exps(g.lam, starts[0] + 0.5 * (w - 1), w, nw)  # (nw, J)
            x = (mix @ g.a)[:, None, :] * e
            moments = (x.reshape(rows * nw, -1) @ g.vander).real.reshape(rows, nw, k)
            dev += moments @ sw.powers[:, :k].T  # (rows, nw, w)
            size = (np.abs(mix) @ g.mag)[:, None, :] * (np.abs(e) * np.exp(_TAYLOR_R))
            m_g = size.sum(axis=-1)
            mag += m_g
            err += m_g * (g.tail + _EPS * (g.lam.size + k + 8 + 2 * k_pow)) \
                + 4.0 * _EPS * (size @ np.abs(g.lam)) * tau_end
        if sw.lam_fast.size:
            ef = _window_exps(sw.lam_fast, starts[0], w, nw)
            xf = (mix @ sw.a_fast)[:, None, :] * ef
            size = (np.abs(mix) @ sw.m_fast)[:, None, :] * np.abs(ef)
            drop = size <= 1e-20 * (size.sum(axis=-1) + mag)[..., None]
            err += np.where(drop, size, 0.0).sum(axis=-1) * (1 + 1e-15)
            xf[drop] = 0.0
            dev += (xf @ sw.table.T).real
            err += _EPS * ((sw.lam_fast.size + 8 + 2 * (k_pow + w)) * size.sum(axis=-1)
                           + 4.0 * (size @ np.abs(sw.lam_fast)) * tau_end)
        dev = dev.reshape(rows, -1)[:, :n]
        err = np.repeat(err, w, axis=1)[:, :n]
        if sw.direct:
            t = t_s + np.arange(n, dtype=float)[:, None]
            dev += mix @ np.sum([np.stack(_mode_devs(m, t)) for m in sw.direct], axis=0)
    return dev, err


def _window_exps(lam, tau0: float, w: int, nw: int):
    """e^{λ(τ0 + kw)} for k < nw, (nw, J): one exponential, then products with e^{λw}."""
    out = np.empty((nw, lam.size), lam.dtype)
    out[0] = np.exp(lam * tau0)
    if nw > 1:
        step = np.exp(lam * w)
        for k in range(1, nw):
            np.multiply(out[k - 1], step, out=out[k])
    return out


# --------------------------------------------------------------------------- critical batch


class OptimalSteps(NamedTuple):
    """Steps-vs-batch curve at the best learning rate of a grid (:func:`optimal_steps_curve`).

    ``batch`` (n_b,), ``steps`` (n_b,) fewest steps over the grid (``inf`` if none reached the
    target), ``lr`` (n_b,) the argmin (``nan`` if none), ``examples`` = steps·batch, and
    ``grid`` (n_b, n_lr) all steps.
    """

    batch: np.ndarray
    steps: np.ndarray
    lr: np.ndarray
    examples: np.ndarray
    grid: np.ndarray


@_quiet
def optimal_steps_curve(h, c, batches, target, lrs, *, momentum=0.0, init_sq=1.0,
                        precond_power=0.0, ema_decay=None, nesterov=False,
                        max_steps=10**7) -> OptimalSteps:
    r"""Steps to target at the best learning rate for each batch size (Zhang et al. 2019).

    S(B) = min_η steps_to_target(η, B): it falls like 1/B below the critical batch and
    flattens above it. Fit S_min, E_min with :func:`sgdtheory.theory.fit_steps_examples`
    (B_crit = E_min/S_min).

    Args:
        h, c, init_sq, momentum, precond_power, ema_decay, nesterov, max_steps: as
            :func:`steps_to_target` (``momentum`` a scalar here).
        batches: batch sizes B (n_b,), examples per step, > 0. target: loss to reach.
        lrs: candidate rates η (n_lr,), multipliers of the mean minibatch gradient (not base
            rates η/B; the same grid is tried at every B).

    >>> h = 1.0 / np.arange(1, 51)
    >>> r = optimal_steps_curve(h, h, [1, 4, 64], 0.05, np.geomspace(0.01, 1.9, 30))
    >>> r.steps  # ∝ 1/B at small B, flat at large B
    array([1898.,  484.,   46.])
    >>> r.examples
    array([1898., 1936., 2944.])
    """
    batches = _positive("batches", batches)
    lrs = _positive("lrs", lrs)
    if batches.ndim != 1 or lrs.ndim != 1:
        raise ValueError("batches and lrs must be 1-D arrays")
    if lrs.size == 0:
        raise ValueError("lrs must hold at least one learning rate")
    for name, value in (("target", target), ("momentum", momentum),
                        ("ema_decay", 0.0 if ema_decay is None else ema_decay)):
        if _array(name, value).ndim != 0:
            raise ValueError(f"{name} must be a scalar here, got shape {np.shape(value)}")
    grid = steps_to_target(h, c, lrs[None, :], batches[:, None], target, momentum=momentum,
                           init_sq=init_sq, precond_power=precond_power, ema_decay=ema_decay,
                           nesterov=nesterov, max_steps=max_steps)
    grid = np.asarray(grid, dtype=float).reshape(batches.size, lrs.size)
    best = np.argmin(grid, axis=1)
    steps = grid[np.arange(batches.size), best]
    lr = np.where(np.isfinite(steps), lrs[best], np.nan)
    return OptimalSteps(batches, steps, lr, steps * batches, grid)


# --------------------------------------------------------------------------- linear regression


def _linreg_inputs(lam, lr, batch, steps, noise_var, init_m):
    lam = _positive("lam", lam, allow_zero=True)
    if lam.ndim != 1 or lam.size == 0:
        raise ValueError(f"lam must be a non-empty 1-D array of eigenvalues, got {lam.shape}")
    noise_var = _positive("noise_var", noise_var, allow_zero=True)
    if noise_var.ndim != 0:
        raise ValueError(f"noise_var must be a scalar, got shape {noise_var.shape}")
    noise_var = float(noise_var)
    m0 = _per_dim("init_m", init_m, lam.size)
    schedule = steps is None
    lr = _positive("lr", lr, allow_zero=schedule)
    batch = _positive("batch", batch)
    if schedule:
        if lr.ndim == 0:
            raise ValueError("lr must be an array whose last axis is the schedule when "
                             "steps=None (pass steps=T for a constant rate)")
        lr, batch = _broadcast(lr=lr, batch=batch)
    else:
        steps = _steps("steps", steps)
        lr, batch = _broadcast(lr=lr, batch=batch)
        lr = np.broadcast_to(lr[..., None], lr.shape + (steps,))
        batch = np.broadcast_to(batch[..., None], batch.shape + (steps,))
    return lam, lr, batch, noise_var, m0


def _linreg_run(lam, lr, batch, noise_var, m0, keep_moments: bool):
    T = lr.shape[-1]
    shape = lr.shape[:-1]
    m = np.broadcast_to(m0, shape + lam.shape).copy()
    loss = np.empty(shape + (T + 1,))
    moments = np.empty(shape + (T + 1,) + lam.shape) if keep_moments else None
    loss[..., 0] = 0.5 * (m @ lam + noise_var)
    if keep_moments:
        moments[..., 0, :] = m
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(T):
            eta, b = lr[..., t, None], batch[..., t, None]
            u = eta * lam
            diag = (1.0 - u) ** 2 + u * u / b  # = 1 − 2ηλ + η²λ²(1 + 1/B)
            total = (m @ lam + noise_var)[..., None]
            # written so that an overflowing run gives inf, never 0·inf = NaN: a zero
            # moment, eigenvalue or total injects nothing
            m = (np.where(m > 0, m * diag, 0.0)
                 + np.where((lam > 0) & (total > 0), (eta * eta / b) * lam * total, 0.0))
            loss[..., t + 1] = 0.5 * (m @ lam + noise_var)
            if keep_moments:
                moments[..., t + 1, :] = m
    return loss, moments


@_quiet
def linreg_moments(lam, lr, batch, steps=None, *, noise_var=0.0, init_m=1.0):
    r"""Trajectory of m_j(t) = E[(w_t − w*)_j²] for SGD on linear regression, Gaussian features.

        m ← A m + (η²/B) σ² λ,   A = diag(1 − 2ηλ_j + η²λ_j²(1 + 1/B)) + (η²/B) λλᵀ

    (A is :func:`sgdtheory.theory.linreg_moment_matrix`; applied here in O(d) per step).

    Args:
        lam: λ_j ≥ 0, eigenvalues of the feature covariance, shape (d,).
        lr: η, multiplier of the **mean** minibatch gradient; an array → a grid of
            configurations; with ``steps=None`` its last axis is a schedule (rates ≥ 0).
        batch: B (> 0), examples per step drawn with replacement; broadcasts with ``lr``.
        steps: T (integer ≥ 0), or None for a schedule.
        noise_var: σ², label-noise variance. init_m: m_j(0) (scalar or (d,), e.g. w*² for w₀=0).

    Returns:
        m, shape S + (T+1, d).

    >>> linreg_moments([1.0], 0.5, 1, 1)  # 1 − 1 + 0.25·2 + 0.25
    array([[1.  ],
           [0.75]])
    """
    lam, lr, batch, noise_var, m0 = _linreg_inputs(lam, lr, batch, steps, noise_var, init_m)
    _fits_memory("steps" if steps is not None else "lr", lr.size * (1.0 + lam.size))
    m = _linreg_run(lam, lr, batch, noise_var, m0, True)[1]
    return np.where(np.isnan(m), np.inf, m)


@_quiet
def linreg_expected_loss(lam, lr, batch, steps=None, *, noise_var=0.0, init_m=1.0):
    r"""Exact expected population loss ½(Σ_j λ_j m_j(t) + σ²), t = 0..T, of online SGD.

    Per-example loss ½(xᵀw − y)², x ~ N(0, diag(λ)), y = w*ᵀx + ε, Var ε = σ²; batches of B
    drawn with replacement (or fresh data); m_j = E[e_j²] follows

        m_j ← m_j (1 − 2ηλ_j + η²λ_j²(1 + 1/B)) + (η²/B) λ_j (Σ_k λ_k m_k + σ²).

    Stable iff the spectral radius of A is < 1, i.e. η < η_c(B)
    (:func:`sgdtheory.theory.linreg_stability_limit`); beyond it the loss grows geometrically and is
    reported as inf once it overflows float64 (no warning).

    Args: as :func:`linreg_moments`.

    Returns:
        E[L_t], shape S + (T+1,).

    >>> linreg_expected_loss([1.0, 0.5], 0.5, 2, 2, noise_var=0.1)  # m = (0.575, 0.69375) at t=1
    array([0.8      , 0.5109375, 0.340625 ])
    """
    lam, lr, batch, noise_var, m0 = _linreg_inputs(lam, lr, batch, steps, noise_var, init_m)
    _fits_memory("steps" if steps is not None else "lr", lr.size + lam.size)
    loss = _linreg_run(lam, lr, batch, noise_var, m0, False)[0]
    return np.where(np.isnan(loss), np.inf, loss)

