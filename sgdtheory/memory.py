r"""Exact memory curve and forgetting limit of SGD on linear regression with Gaussian features.

Model (docs/design.md §3): x ~ N(0, H), H = diag(λ), y = w*ᵀx + ξ with Var ξ = σ², per-example loss
ℓ = ½(xᵀw − y)², error e = w − w*. One SGD step with ``lr`` η on the *mean* gradient of a
batch of B examples drawn from an infinite stream (each example is used once, "one pass")::

    e_{s+1} = (I − ηĤ_s) e_s + (η/B) Σ_{i∈batch s} x_i ξ_i,     Ĥ_s = (1/B) Σ_i x_i x_iᵀ.

**Memory curve.** Let the batch of step s be evaluated at the weights e_t with k = t − s ≥ 1
(k = 1: the batch that produced the latest update). The memory gap is

    Δ_k = E[ℓ(batch of step t−k; e_t)] − E[ℓ(fresh example; e_t)]   (< 0 while remembered).

Derivation (exact; only the diagonal second moments m_j = E[e_{s,j}²] enter):

1. Write e_t = Φ e_{s+1} + n with Φ = (I − ηĤ_{t−1})⋯(I − ηĤ_{s+1}) and n the later label
   noise propagated to t. Φ and n are independent of batch s, and n is linear in later
   zero-mean ξ's, so every cross term with n vanishes and E[(aᵀn)²] is the same for a seen
   and a fresh probe: it cancels in Δ_k.
2. For a symmetric M, T(M) = E[(I−ηĤ)M(I−ηĤ)] = C∘M + (η²/B) diag(λ) λᵀdiag(M), with
   C_jl = (1 − ηλ_j)(1 − ηλ_l) + η²λ_jλ_l/B (Gaussian fourth moments). Off-diagonal entries
   are multiplied by C_jl, the diagonal by A = diag(C_jj) + (η²/B)λλᵀ
   (:func:`sgdtheory.theory.linreg_moment_matrix`). Hence for a probe vector a independent
   of Φ, E_Φ[Φᵀaaᵀ Φ] = N(a) with

       N(a) = C^{k−1}∘(aaᵀ)|_{off-diagonal} + diag(A^{k−1}(a∘a)),
       aᵀN(a)a = Σ_jl W_jl a_j² a_l²,   W = A^{k−1} + C^{∘(k−1)}|_{off-diagonal},
       E[N(a)] = diag(q),  q = A^{k−1} λ,         E[Φ] = diag(p),  p_j = (1 − ηλ_j)^{k−1}.

3. For a seen example (a, ξ_a) of batch s, e_{s+1} = ū + (η/B) a (ξ_a − aᵀe_s), where
   ū (the update from the other B−1 examples) is independent of a with
   E[ū | e_s] = (I − ηβH)e_s, β = (B−1)/B, and
   E[ū_j²] = m_j(1 − 2ηβλ_j + η²βλ_j²) + η²(β/B) λ_j (λᵀm + σ²).
   Expanding (aᵀΦe_{s+1} − ξ_a)² and using Gaussian moments up to sixth order
   (E[a_m²a_j²a_l²] = λ_mλ_jλ_l(1 + 2δ_mj + 2δ_ml + 2δ_jl + 8δ_mjl)) gives

       2Δ_k = qᵀū² − qᵀm'                                   (other examples vs all B)
              − 2(η/B) Σ_j (1 − ηβλ_j) g_j m_j              (own gradient step on e_s)
              + (η/B)² [σ²(λᵀWλ + 2Σ_j W_jj λ_j²) + S₆]     (own step, second order)
              − 2(η/B) σ² Σ_j λ_j p_j                       (memorised label noise)

   with m' = A m + (η²/B)σ²λ, g_j = λ_j (Wλ)_j + 2 W_jj λ_j², μ = m∘λ and
   S₆ = (Σμ)(λᵀWλ) + 2(μ∘λ)ᵀWλ + 2λᵀW(μ∘λ) + 2(Σμ)Σ_j W_jj λ_j² + 8 Σ_j μ_j W_jj λ_j².

The last term dominates at small η: the example's own label noise is stored in the weights
and decays like (1 − ηλ_j)^{k−1}, i.e. an example is remembered for about 1/(ηλ) steps
= B/(ηλ) = 1/(η̃λ) examples (η̃ = η/B, the base rate). The terms quadratic in Φ decay like
(1 − ηλ_j)^{2(k−1)}.

**Forgetting limit.** A finite set of N examples can be fully used only if the memory
horizon 1/(η̃λ) reaches N: η̃_f = 1/(Nλ) (:func:`forgetting_limit`), a limit on the base rate
that falls like 1/N, unlike the curvature limit η_c(B) of
:func:`sgdtheory.theory.linreg_stability_limit`, which is a limit on η and independent of N.
"""

from __future__ import annotations

import numpy as np

from sgdtheory import theory
from sgdtheory._checks import _short, real_array

__all__ = [
    "forgetting_horizon",
    "forgetting_limit",
    "memory_curve",
    "memory_gap",
    "stationary_moments",
]


def _check_inputs(eigenvalues, lr, batch, noise_var):
    lam = theory._eigenvalues(eigenvalues)
    lr = theory._scalar("lr", theory._positive("lr", lr))
    batch = theory._integer("batch", batch)
    noise_var = theory._scalar("noise_var", theory._positive("noise_var", noise_var,
                                                              allow_zero=True))
    limit = theory.linreg_stability_limit(lam, batch)
    if lr >= limit:
        raise ValueError(f"lr={lr} is at or above the curvature limit {limit:.6g} of "
                         f"batch {batch}: SGD diverges (no stationary state, no memory curve)")
    return lam, lr, batch, noise_var


@theory._quiet
def stationary_moments(eigenvalues, lr, batch, *, noise_var):
    r"""Stationary m*_j = E[e_j²] of online SGD on linear regression: m* = (I − A)⁻¹(η²/B)σ²λ.

    A = D − vvᵀ-type structure (:func:`sgdtheory.theory.linreg_moment_matrix`) gives it in
    closed form by Sherman–Morrison,

        m*_j = (ησ²/B) / ((2 − ηλ_j(1 + 1/B)) (1 − φ(η))),
        φ(η) = (η/B) Σ_k λ_k / (2 − ηλ_k(1 + 1/B))   (< 1 below the curvature limit),

    exact and well conditioned at any small η (forming I − A loses it to rounding). A
    direction with λ_j = 0 never moves; its entry is the λ_j → 0 limit (it enters no loss).

    Args:
        eigenvalues: λ (d,), feature covariance spectrum.
        lr: η, multiplier of the mean minibatch gradient (must be below the curvature limit
            η_c(B) of :func:`sgdtheory.theory.linreg_stability_limit`).
        batch: B, examples per step (drawn fresh, or with replacement).
        noise_var: σ², label-noise variance.

    Returns:
        m* (d,).

    >>> m = stationary_moments([1.0], 0.1, 1, noise_var=1.0)  # 0.01/(1 - 0.82 - 0.01)
    >>> round(float(m[0]), 10)
    0.0588235294
    """
    lam, lr, batch, noise_var = _check_inputs(eigenvalues, lr, batch, noise_var)
    return noise_var * _unit_stationary_moments(lam, lr, batch)


def _unit_stationary_moments(lam, lr, batch):
    """m* at σ² = 1 (m* is proportional to σ²)."""
    r = 1.0 / (2.0 - lr * lam * (1.0 + 1.0 / batch))
    phi = lr / batch * float(lam @ r)
    if not (phi < 1 and np.all(r > 0)):  # only within rounding of the limit (checked before)
        raise ValueError(f"lr={lr!r} is at the curvature limit of batch {batch} to rounding: "
                         "no stationary state")
    return (lr / batch) * r / (1.0 - phi)


@theory._quiet
def memory_gap(eigenvalues, lr, batch, lags, *, noise_var, moments=None):
    r"""Exact memory gap Δ_k = E[loss of the batch seen k steps ago] − E[loss of a fresh example].

    Both losses are per example, ½(xᵀw − y)², evaluated at the same current weights; the
    batch was used (once) by the update k steps ago (k = 1: the latest update). Formula and
    derivation in the module docstring.

    Args:
        eigenvalues: λ (d,), feature covariance spectrum (H = diag λ).
        lr: η, multiplier of the mean minibatch gradient, below the curvature limit η_c(B).
        batch: B, examples per step (integer ≥ 1), fresh examples every step.
        lags: k (integer ≥ 1), scalar or array.
        noise_var: σ², label-noise variance.
        moments: m_j = E[e_j²] at the step that used the batch (d,); default: the stationary
            :func:`stationary_moments`. Only these diagonal second moments matter.

    Returns:
        Δ_k with the shape of ``lags`` (≤ 0 when the batch is remembered).

    >>> # d=1, B=1, σ²=1, m=0: 2Δ₁ = q ū² − q m' + η²(3σ²) − 2ησ² with q=1, ū²=0, m'=η²
    >>> round(float(memory_gap([1.0], 0.1, 1, 1, noise_var=1.0, moments=[0.0])), 12)
    -0.09
    """
    lam, lr, batch, noise_var = _check_inputs(eigenvalues, lr, batch, noise_var)
    lags_arr = _lags(lags)
    k = lags_arr.astype(np.int64).ravel()
    # Δ_k is linear in (σ², m) jointly, and Δ_k(λ, η, σ², m) = L Δ_k(λ/L, ηL, σ²/L, m)
    # (x = √L x̃): compute with max m, σ² ≤ 1 and λ ≤ 1, then scale back (no overflow)
    m, s2, scale = _scaled_moments(lam, lr, batch, noise_var, moments)
    top = float(lam.max())
    with np.errstate(invalid="ignore"):  # 0·inf from extreme spectra: refused below
        out = _gap(lam / top, lr * top, float(batch), s2 / top, m, k) * scale * top
    if np.any(np.isnan(out)):
        raise ValueError("eigenvalues, lr, noise_var and moments span more orders of magnitude "
                         "than float64 holds: the memory gap is not representable")
    return float(out[0]) if lags_arr.ndim == 0 else out.reshape(lags_arr.shape)


def _gap(lam, eta, b, s2, m, k):
    """Δ_k for each lag k at σ² = s2 and moments m (the formula of the module docstring)."""
    beta = (b - 1.0) / b
    d = lam.size

    c = np.outer(1.0 - eta * lam, 1.0 - eta * lam) + ((eta * eta) / b) * np.outer(lam, lam)
    a = theory.linreg_moment_matrix(lam, eta, b)
    rho, vecs = np.linalg.eigh(a)  # A is symmetric
    n = (k - 1).astype(float)
    with np.errstate(over="ignore", invalid="ignore"):
        rho_pow = np.sign(rho)[None, :] ** (k - 1)[:, None] * np.abs(rho)[None, :] ** n[:, None]
        a_pow = np.einsum("ir,kr,jr->kij", vecs, rho_pow, vecs)  # A^{k-1}, (K, d, d)
        c_pow = np.sign(c)[None] ** (k - 1)[:, None, None] * np.abs(c)[None] ** n[:, None, None]
    off = ~np.eye(d, dtype=bool)
    w = a_pow + np.where(off[None], c_pow, 0.0)
    w_diag = np.einsum("kjj->kj", w)

    q = a_pow @ lam  # (K, d)
    p = np.abs(1.0 - eta * lam)[None, :] ** n[:, None] * np.sign(1.0 - eta * lam)[None, :] ** (
        k - 1)[:, None]
    lam_m = lam @ m
    u_bar2 = (m * (1.0 - 2.0 * eta * beta * lam + (eta * eta) * beta * lam**2)
              + (eta * eta) * (beta / b) * lam * (lam_m + s2))
    m_next = a @ m + ((eta * eta) / b) * s2 * lam
    w_lam = w @ lam  # (K, d)
    g = lam * w_lam + 2.0 * lam**2 * w_diag
    lwl = w_lam @ lam
    wd_l2 = w_diag @ lam**2
    mu = m * lam
    s6 = (mu.sum() * lwl + 2.0 * (w_lam @ (mu * lam)) + 2.0 * ((w @ (mu * lam)) @ lam)
          + 2.0 * mu.sum() * wd_l2 + 8.0 * (w_diag @ (mu * lam**2)))
    two_gap = (q @ u_bar2 - q @ m_next
               - 2.0 * (eta / b) * (g @ ((1.0 - eta * beta * lam) * m))
               + ((eta / b) * (eta / b)) * (s2 * (lwl + 2.0 * wd_l2) + s6)
               - 2.0 * (eta / b) * s2 * (p @ lam))
    return 0.5 * two_gap


def _lags(lags) -> np.ndarray:
    """Lags k: integers 1 ≤ k ≤ 2⁵³ (float64 array of the given shape)."""
    arr = real_array("lags", lags)
    if (arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 1)
            or np.any(arr > 2**53) or np.any(arr != np.round(arr))):
        raise ValueError(f"lags must be a non-empty set of integers in [1, 2**53], "
                         f"got {_short(lags)}")
    return arr


def _scaled_moments(lam, lr, batch, noise_var, moments):
    """(m/s, σ²/s, s) with s = max(σ², max m) (or 1 when both are 0): the gap and the losses
    are linear in (σ², m) jointly. ``moments`` None: the stationary m* = σ² m*(σ²=1)."""
    if moments is None:
        unit = _unit_stationary_moments(lam, lr, batch)
        top = max(1.0, float(unit.max()))
        if noise_var == 0:
            return np.zeros_like(unit), 0.0, 1.0
        return unit / top, 1.0 / top, noise_var * top
    m = theory._positive("moments", moments, allow_zero=True)
    m = np.asarray(m, dtype=float)
    if m.shape != lam.shape:
        raise ValueError(f"moments must have the shape of eigenvalues {lam.shape}, "
                         f"got {m.shape}")
    scale = max(noise_var, float(m.max())) or 1.0
    return m / scale, noise_var / scale, scale


@theory._quiet
def memory_curve(eigenvalues, lr, batch, lags, *, noise_var, moments=None):
    r"""Expected loss of the batch seen k steps ago and of a fresh example, at the same weights.

    fresh_k = ½(λᵀm_{s+k} + σ²) with m_{s+k} = m* + A^k (m_s − m*) (constant in the
    stationary state); seen_k = fresh_k + Δ_k (:func:`memory_gap`).

    Args: as :func:`memory_gap`.

    Returns:
        ``(seen, fresh)``, each with the shape of ``lags``.

    >>> seen, fresh = memory_curve([1.0, 0.5], 0.05, 2, [1, 10_000], noise_var=1.0)
    >>> bool(seen[0] < fresh[0]), bool(abs(seen[1] - fresh[1]) < 1e-12)
    (True, True)
    """
    lam, lr, batch, noise_var = _check_inputs(eigenvalues, lr, batch, noise_var)
    gap = np.asarray(memory_gap(lam, lr, batch, lags, noise_var=noise_var, moments=moments))
    m0, s2, scale = _scaled_moments(lam, lr, batch, noise_var, moments)  # losses linear
    m_star = s2 * _unit_stationary_moments(lam, lr, batch)
    a = theory.linreg_moment_matrix(lam, lr, batch)
    rho, vecs = np.linalg.eigh(a)
    k = _lags(lags).ravel()
    coef = vecs.T @ (m0 - m_star)
    m_t = m_star[None, :] + (rho[None, :] ** k[:, None] * coef[None, :]) @ vecs.T
    with np.errstate(invalid="ignore"):
        fresh = 0.5 * (m_t @ lam + s2) * scale
        seen = fresh + gap.ravel()
    if np.any(np.isnan(seen)):
        raise ValueError("eigenvalues, lr, noise_var and moments span more orders of magnitude "
                         "than float64 holds: the losses are not representable")
    shape = np.shape(lags)
    if shape == ():
        return float(seen[0]), float(fresh[0])
    return seen.reshape(shape), fresh.reshape(shape)


@theory._quiet
def forgetting_horizon(base_lr, eigenvalue):
    r"""Memory horizon in examples: 1/(η̃λ) = B/(ηλ) (an example's trace decays like (1−ηλ)^k).

    Args:
        base_lr: η̃ = η/B, step per example (> 0).
        eigenvalue: λ, curvature of the direction considered (> 0).

    >>> forgetting_horizon(0.001, 0.5)
    2000.0
    """
    base_lr = theory._positive("base_lr", base_lr)
    eigenvalue = theory._positive("eigenvalue", eigenvalue)
    return theory._out(1.0 / (base_lr * eigenvalue))


@theory._quiet
def forgetting_limit(n_data, eigenvalue):
    r"""Forgetting limit on the base rate: η̃_f = 1/(Nλ), where the memory horizon equals N.

    Above η̃_f the weights only hold the last 1/(η̃λ) < N examples (the rest of the epoch is
    forgotten); the limit falls like 1/N and does not depend on the batch size.

    Args:
        n_data: N, training-set size (> 0).
        eigenvalue: λ, representative curvature of the directions that must be learnt.

    Returns:
        η̃_f (base-rate units: η = η̃·B).

    >>> forgetting_limit(1000, 0.01)
    0.1
    """
    n_data = theory._positive("n_data", n_data)
    eigenvalue = theory._positive("eigenvalue", eigenvalue)
    return theory._out(1.0 / (n_data * eigenvalue))
