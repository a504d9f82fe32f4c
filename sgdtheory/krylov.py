r"""Krylov tools on a matrix given only as a matvec (Hessian-vector products, say).

Any symmetric linear map A: ℝ^dim → ℝ^dim given as ``matvec(v) -> A v`` on 1-D arrays of one
backend (NumPy, CuPy or torch; ``like`` is an example array fixing backend, dtype and
device — NumPy float64 when omitted). Small dense work (k×k or m×m eigenproblems) runs in
NumPy; every dim-sized vector stays on the backend. Random probe vectors are drawn with a NumPy
generator from ``seed`` and moved to the backend, so a seed gives the same probes on every
backend.

* :func:`top_eigenvalues`: top eigenvalues by Lanczos (SciPy ``eigsh`` on a ``LinearOperator``
  for NumPy; a restarted Lanczos with full reorthogonalisation for torch/CuPy) or by power
  (subspace) iteration.
* :func:`hutchinson_trace`: tr(A) ≈ mean of zᵀAz (Hutchinson 1989) or Hutch++ (Meyer et al.
  2021), with a standard error.
* :func:`spectral_density`: stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017;
  Ghorbani, Krishnan & Xiao 2019).

Nothing here imports torch or CuPy at module import.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

from sgdtheory._checks import integer
from sgdtheory.backend import backend_of

__all__ = [
    "KrylovConvergenceWarning",
    "SpectralDensity",
    "hutchinson_trace",
    "spectral_density",
    "top_eigenvalues",
]


class KrylovConvergenceWarning(UserWarning):
    """An iteration stopped at ``max_iter`` before reaching ``tol``; the result is approximate."""


# --------------------------------------------------------------------------- backend operations


class _Ops:
    """The dim-sized vector operations of the solvers: thin calls into the :class:`Backend` of
    ``like`` (NumPy float64 when ``like`` is None), in ``like``'s floating dtype."""

    def __init__(self, like):
        self.be = backend_of(like)
        dt = getattr(like, "dtype", None)
        if dt is None or (self.be.numpy_native and not np.issubdtype(dt, np.floating)):
            dt = np.dtype(float)
        self.dtype = dt

    def asarray(self, x):
        return self.be.asarray(x, dtype=self.dtype)

    def zeros(self, shape):
        return self.be.zeros(shape, dtype=self.dtype)

    def to_numpy(self, x) -> np.ndarray:
        return self.be.to_numpy(x, dtype=float)

    def check(self, name, w, dim):
        shape = tuple(getattr(w, "shape", ()))
        if shape != (dim,):
            raise ValueError(f"matvec must return a 1-D array of length dim={dim}, got shape "
                             f"{shape}")
        if not self.be.is_array(w):
            raise ValueError(f"matvec returned a {type(w).__module__} array for "
                             f"{self.be.name} input: pass `like` with the backend matvec "
                             "expects")
        if not self.be.all_finite(w):
            raise ValueError(f"{name} returned non-finite values")
        return w

    def norm(self, x) -> float:
        return float(self.to_numpy((x * x).sum())) ** 0.5


def _check_args(dim, like):
    dim = integer("dim", dim)
    if like is not None and getattr(like, "shape", None) is None:
        raise ValueError(f"like must be an array (NumPy, CuPy or torch), got {like!r}")
    return dim, _Ops(like)


def _probe(rng, dim, kind="normal"):
    if kind == "rademacher":
        return rng.integers(0, 2, size=dim).astype(float) * 2.0 - 1.0
    if kind == "normal":
        return rng.standard_normal(dim)
    raise ValueError(f"distribution must be 'rademacher' or 'normal', got {kind!r}")


def _orth_against(ops, basis, w, j):
    """w minus its projection on the rows basis[:j] (classical Gram–Schmidt, applied twice)."""
    coeffs = np.zeros(j)
    if j == 0:
        return w, coeffs
    v = basis[:j]
    for _ in range(2):
        h = v @ w
        w = w - h @ v
        coeffs += ops.to_numpy(h)
    return w, coeffs


# --------------------------------------------------------------------------- Lanczos


def _lanczos_restarted(matvec, dim, k, ops, *, tol, max_iter, seed, basis_size=None):
    r"""Top-k (largest algebraic) eigenvalues by thick-restart Lanczos, full reorthogonalisation.

    The Krylov basis V (m + 1 rows) is orthonormalised in full at every step, and the projected
    matrix T = Vᵀ A V is accumulated from the Gram–Schmidt coefficients, so after a thick
    restart (keep the best Ritz vectors Y plus the residual direction; Wu & Simon 2000) the same
    loop continues with T arrowhead-plus-tridiagonal. A Ritz pair (θ, V y) has residual norm
    β_m |y_m|; it is converged when that is ≤ tol·|θ|.
    """
    m = basis_size or min(dim, max(2 * k + 20, 30))
    m = max(min(m, dim, max_iter), k)  # never more matvecs than max_iter in the first cycle
    rng = np.random.default_rng(seed)
    basis = ops.zeros((m + 1, dim))
    t = np.zeros((m + 1, m))
    v0 = ops.asarray(_probe(rng, dim))
    basis[0] = v0 / ops.norm(v0)
    j0, n_mv, scale = 0, 0, 0.0
    while True:
        for j in range(j0, m):
            w = ops.check("matvec", matvec(basis[j]), dim)
            n_mv += 1
            w, h = _orth_against(ops, basis, w, j + 1)
            t[: j + 1, j] = h
            beta = ops.norm(w)
            scale = max(scale, float(np.abs(h).max()), beta)
            if beta <= 1e-12 * scale:  # invariant subspace: continue from a fresh direction
                t[j + 1, j] = 0.0
                if j + 1 < m:
                    w, _ = _orth_against(ops, basis, ops.asarray(_probe(rng, dim)), j + 1)
                    basis[j + 1] = w / ops.norm(w)
                else:
                    basis[j + 1] = 0.0
            else:
                t[j + 1, j] = beta
                basis[j + 1] = w / beta
        tm = t[:m, :m]
        theta, s = np.linalg.eigh(0.5 * (tm + tm.T))
        order = np.argsort(theta)[::-1]
        theta, s = theta[order], s[:, order]
        resid = np.abs(t[m, m - 1] * s[m - 1, :k])
        tiny = np.finfo(float).eps * max(scale, 1e-300)
        if np.all(resid <= tol * np.maximum(np.abs(theta[:k]), tiny)) or m == dim and (
                t[m, m - 1] == 0.0):
            return theta[:k]
        if n_mv >= max_iter:
            warnings.warn(f"Lanczos stopped after {n_mv} matvecs with residuals "
                          f"{resid.max():.3g} > tol·|θ|", KrylovConvergenceWarning, stacklevel=3)
            return theta[:k]
        keep = min(m - 1, k + (m - k) // 2)
        y = ops.asarray(s[:, :keep].T)
        new = y @ basis[:m]
        resid_row = t[m, m - 1] * s[m - 1, :keep]
        basis[:keep] = new
        basis[keep] = basis[m]
        t[:] = 0.0
        t[np.arange(keep), np.arange(keep)] = theta[:keep]
        t[keep, :keep] = resid_row
        j0 = keep


def _power(matvec, dim, k, ops, *, tol, max_iter, seed):
    r"""Subspace (block power) iteration with Rayleigh–Ritz on a block of 2k + 2 vectors;
    converges to the k eigenvalues of largest magnitude at rate |λ_{2k+3}/λ_k| per iteration."""
    rng = np.random.default_rng(seed)
    # guard vectors: rate |λ_{2k+3}/λ_k| instead of |λ_{k+1}/λ_k| (fewer if max_iter is tiny)
    k_out, k = k, max(k, min(dim, 2 * k + 2, max_iter))
    x = ops.zeros((k, dim))
    for i in range(k):
        w, _ = _orth_against(ops, x, ops.asarray(_probe(rng, dim)), i)
        x[i] = w / ops.norm(w)
    n_mv = 0
    while True:
        w = ops.zeros((k, dim))
        for i in range(k):
            w[i] = ops.check("matvec", matvec(x[i]), dim)
        n_mv += k
        tm = ops.to_numpy(x @ w.T)
        theta, s = np.linalg.eigh(0.5 * (tm + tm.T))
        order = np.argsort(np.abs(theta))[::-1]
        theta, s = theta[order], s[:, order]
        st = ops.asarray(s.T)
        xr, wr = st @ x, st @ w
        r = wr - ops.asarray(theta)[:, None] * xr
        resid = np.sqrt(ops.to_numpy((r * r).sum(1)))[:k_out]
        if np.all(resid <= tol * np.maximum(np.abs(theta[:k_out]), 1e-300)):
            return np.sort(theta[:k_out])[::-1]
        if n_mv + k > max_iter:  # another block would exceed the budget
            warnings.warn(f"power iteration stopped after {n_mv} matvecs with residual "
                          f"{resid.max():.3g} > tol·|θ|", KrylovConvergenceWarning, stacklevel=3)
            return np.sort(theta[:k_out])[::-1]
        for i in range(k):
            v, _ = _orth_against(ops, x, wr[i], i)
            nv = ops.norm(v)
            if nv <= 1e-14 * max(ops.norm(wr[i]), 1e-300):  # rank-deficient: fresh direction
                v, _ = _orth_against(ops, x, ops.asarray(_probe(rng, dim)), i)
                nv = ops.norm(v)
            x[i] = v / nv


def top_eigenvalues(matvec, dim, k=1, *, method="lanczos", tol=1e-8, max_iter=None, seed=None,
                    like=None) -> np.ndarray:
    r"""Top k eigenvalues of a symmetric matrix A given by ``matvec(v) = A v``.

    ``method="lanczos"``: the k largest (algebraic) eigenvalues, by SciPy's ARPACK ``eigsh`` on
    a ``LinearOperator`` for NumPy input, and by a thick-restart Lanczos with full
    reorthogonalisation for torch/CuPy (or when k ≥ dim − 1). ``method="power"``: subspace
    (block power) iteration with Rayleigh–Ritz, which finds the k eigenvalues of largest
    *magnitude* (the same for positive semi-definite A, e.g. a Gauss–Newton matrix; a Hessian's
    λ_max for the stability limit 2/λ_max is the largest algebraic one: prefer Lanczos).
    Converged when every Ritz pair has ‖Av − θv‖ ≤ tol·|θ| (eigenvalue error ≲ tol²·‖A‖²/gap).

    Args:
        matvec: v ↦ A v on 1-D arrays of length ``dim`` (the backend of ``like``).
        dim: the dimension (number of parameters).
        k: how many eigenvalues, 1 ≤ k ≤ dim.
        method: "lanczos" or "power".
        tol: relative residual tolerance.
        max_iter: at most this many matvecs (default max(1000, 30·dim) capped at 10⁵; never
            fewer than k are made); on reaching it a :class:`KrylovConvergenceWarning` is
            issued and the current estimates returned.
        seed: seed of the random start vector(s).
        like: an example array giving backend, dtype and device (NumPy float64 if None).

    Returns:
        NumPy float64 array of k eigenvalues, in descending order.

    >>> a = np.diag([5.0, 3.0, 1.0, 0.5])
    >>> top_eigenvalues(lambda v: a @ v, 4, k=2, seed=0).round(10)
    array([5., 3.])
    """
    dim, ops = _check_args(dim, like)
    k = integer("k", k)
    if k > dim:
        raise ValueError(f"k must be an integer in [1, dim={dim}], got {k!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    if max_iter is None:
        max_iter = min(max(1000, 30 * dim), 100_000)
    max_iter = integer("max_iter", max_iter)
    if method == "power":
        return _power(matvec, dim, k, ops, tol=tol, max_iter=max_iter, seed=seed)
    if method != "lanczos":
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    if ops.be.numpy_native and k < dim - 1:
        rng = np.random.default_rng(seed)

        def mv(v):
            w = np.asarray(matvec(np.ascontiguousarray(v.ravel(), dtype=ops.dtype)))
            return ops.check("matvec", w, dim)

        op = LinearOperator((dim, dim), matvec=mv, dtype=ops.dtype)
        v0 = _probe(rng, dim)
        try:
            vals = eigsh(op, k=k, which="LA", tol=tol, maxiter=max_iter, v0=v0,
                         return_eigenvectors=False)
        except ArpackNoConvergence as exc:
            warnings.warn(f"eigsh did not converge: {exc}", KrylovConvergenceWarning,
                          stacklevel=2)
            vals = exc.eigenvalues
        except ArpackError:  # e.g. A v₀ = 0 (a zero matrix): ARPACK cannot start
            return _lanczos_restarted(matvec, dim, k, ops, tol=tol, max_iter=max_iter,
                                      seed=seed)
        return np.sort(np.asarray(vals, dtype=float))[::-1]
    return _lanczos_restarted(matvec, dim, k, ops, tol=tol, max_iter=max_iter, seed=seed)


# --------------------------------------------------------------------------- trace


def hutchinson_trace(matvec, dim, n_samples, *, seed=None, like=None, method="hutchinson",
                     distribution="rademacher") -> tuple[float, float]:
    r"""Stochastic trace estimate tr(A) with its standard error, from ``n_samples`` matvecs.

    ``method="hutchinson"``: tr(A) ≈ (1/n) Σ_i z_iᵀ A z_i with E[zzᵀ] = I (Rademacher or
    Gaussian z); standard error = sample std/√n. For Rademacher probes
    Var(zᵀAz) = 2 Σ_{i≠j} A_ij², for Gaussian 2‖A‖_F².

    ``method="hutch++"`` (Meyer, Musco, Musco & Woodruff 2021): with m = ``n_samples`` matvecs,
    q = m//3 of them sketch the top range Q = orth(A S), q more give tr(QᵀAQ) exactly, and the
    remaining r = m − 2q estimate the rest by Hutchinson on the deflated matrix:

        tr(A) = tr(QᵀAQ) + tr((I−QQᵀ)A(I−QQᵀ)) ≈ tr(QᵀAQ) + (1/r) Σ z_iᵀ(I−QQᵀ)A(I−QQᵀ)z_i.

    The standard error is that of the second (Hutchinson) part given Q. Far more accurate when
    A has a few dominant eigenvalues. zᵀAz is skewed when a few eigenvalues dominate, so with
    few probes build intervals with Student's t on n − 1 (Hutchinson) or r − 1 (Hutch++)
    degrees of freedom.

    Args:
        matvec: v ↦ A v on 1-D arrays of length ``dim``.
        dim: dimension. n_samples: number of matvecs (≥ 2; ≥ 4 for Hutch++).
        seed: seed of the probes. like: example array (backend, dtype, device).
        method: "hutchinson" or "hutch++". distribution: "rademacher" or "normal".

    Returns:
        (estimate, stderr) as floats.

    >>> a = np.diag(np.arange(1.0, 11.0))  # tr = 55; Rademacher probes are exact for diagonals
    >>> hutchinson_trace(lambda v: a @ v, 10, 20, seed=0)
    (55.0, 0.0)
    """
    dim, ops = _check_args(dim, like)
    n_samples = integer("n_samples", n_samples, 2)
    rng = np.random.default_rng(seed)
    if method == "hutchinson":
        vals = np.empty(n_samples)
        for i in range(n_samples):
            z = ops.asarray(_probe(rng, dim, distribution))
            az = ops.check("matvec", matvec(z), dim)
            vals[i] = float(ops.to_numpy((z * az).sum()))
        return float(vals.mean()), float(vals.std(ddof=1) / math.sqrt(n_samples))
    if method != "hutch++":
        raise ValueError(f"method must be 'hutchinson' or 'hutch++', got {method!r}")
    if n_samples < 4:
        raise ValueError(f"hutch++ needs n_samples >= 4, got {n_samples}")
    q = n_samples // 3
    r = n_samples - 2 * q
    sketch = ops.zeros((q, dim))
    for i in range(q):
        sketch[i] = ops.check("matvec", matvec(ops.asarray(_probe(rng, dim, distribution))), dim)
    basis = ops.zeros((q, dim))
    rank = 0
    for i in range(q):
        w, _ = _orth_against(ops, basis, sketch[i], rank)
        nw = ops.norm(w)
        if nw > 1e-10 * max(ops.norm(sketch[i]), 1e-300):
            basis[rank] = w / nw
            rank += 1
    basis = basis[:rank]
    top = 0.0
    for i in range(rank):
        top += float(ops.to_numpy((basis[i] * ops.check("matvec", matvec(basis[i]), dim)).sum()))
    vals = np.empty(r)
    for i in range(r):
        z = ops.asarray(_probe(rng, dim, distribution))
        if rank:
            z = z - (basis @ z) @ basis
        vals[i] = float(ops.to_numpy((z * ops.check("matvec", matvec(z), dim)).sum()))
    return top + float(vals.mean()), float(vals.std(ddof=1) / math.sqrt(r))


# --------------------------------------------------------------------------- spectral density


@dataclass(frozen=True)
class SpectralDensity:
    r"""Stochastic Lanczos quadrature of the eigenvalue density ρ(λ) = (1/dim) Σ_i δ(λ − λ_i).

    Attributes:
        nodes: (n_probes, m) Ritz values θ_{p,j} of each probe's Lanczos run.
        weights: (n_probes, m) quadrature weights τ_{p,j} = (first component of the Ritz vector)²,
            each row summing to 1, so that for unit probe v_p, v_pᵀ f(A) v_p ≈ Σ_j τ_pj f(θ_pj)
            (exact for polynomials f of degree < 2m).
        dim: the dimension.
    """

    nodes: np.ndarray
    weights: np.ndarray
    dim: int

    def density(self, grid, width):
        r"""ρ on ``grid``, each node broadened to a Gaussian of standard deviation ``width``:
        ρ(x) ≈ mean_p Σ_j τ_pj N(x; θ_pj, width²). Integrates to 1."""
        grid = np.asarray(grid, dtype=float)
        if not width > 0:
            raise ValueError(f"width must be positive, got {width!r}")
        d = (grid[..., None, None] - self.nodes) / width
        g = np.exp(-0.5 * d * d) / (width * math.sqrt(2.0 * math.pi))
        return (g * self.weights).sum(-1).mean(-1)

    def trace(self, f=lambda x: x):
        r"""tr f(A) ≈ dim · mean_p Σ_j τ_pj f(θ_pj) (e.g. f = identity: the trace)."""
        return float(self.dim * (self.weights * f(self.nodes)).sum(-1).mean())


def spectral_density(matvec, dim, *, n_probes=8, n_steps=40, seed=None,
                     like=None) -> SpectralDensity:
    r"""Spectral density of symmetric A by stochastic Lanczos quadrature.

    For each of ``n_probes`` random unit vectors v, ``n_steps`` = m Lanczos steps (full
    reorthogonalisation) give T_m = QᵀAQ; its eigenpairs (θ_j, u_j) are Gauss-quadrature nodes
    and weights τ_j = u_j[0]² for v ↦ vᵀ f(A) v. Averaging over probes estimates
    (1/dim) tr f(A) = ∫ f dρ.

    Args:
        matvec: v ↦ A v. dim: dimension. n_probes: number of probe vectors (≥ 1).
        n_steps: Lanczos steps per probe (capped at dim). seed: probes' seed.
        like: example array (backend, dtype, device).

    Returns:
        :class:`SpectralDensity` (nodes, weights; ``.density(grid, width)``, ``.trace(f)``).

    >>> a = np.diag([1.0, 2.0, 3.0, 4.0])
    >>> sd = spectral_density(lambda v: a @ v, 4, n_probes=2, n_steps=4, seed=0)
    >>> np.sort(sd.nodes[0]).round(8)
    array([1., 2., 3., 4.])
    """
    dim, ops = _check_args(dim, like)
    n_probes = integer("n_probes", n_probes)
    m = min(integer("n_steps", n_steps), dim)
    rng = np.random.default_rng(seed)
    nodes = np.empty((int(n_probes), m))
    weights = np.empty((int(n_probes), m))
    for p in range(int(n_probes)):
        basis = ops.zeros((m, dim))
        t = np.zeros((m, m))
        v = ops.asarray(_probe(rng, dim, "rademacher"))
        basis[0] = v / ops.norm(v)
        size = m
        for j in range(m):
            w = ops.check("matvec", matvec(basis[j]), dim)
            w, h = _orth_against(ops, basis, w, j + 1)
            t[: j + 1, j] = h
            if j + 1 == m:
                break
            beta = ops.norm(w)
            if beta <= 1e-12 * max(float(np.abs(h).max()), 1e-300):  # invariant subspace
                size = j + 1
                break
            t[j + 1, j] = beta
            basis[j + 1] = w / beta
        ts = t[:size, :size]
        theta, u = np.linalg.eigh(0.5 * (ts + ts.T))
        nodes[p] = np.pad(theta, (0, m - size), constant_values=theta[-1])
        weights[p] = np.pad(u[0] ** 2, (0, m - size))
    return SpectralDensity(nodes, weights, dim)
