r"""The models the simulator runs (docs/design.md §4), with their exact gradient statistics.

Conventions (docs/design.md §2): the training loss L is the *mean* of per-example losses ℓ_i;
G = ∇L, H = ∇²L; Σ = Cov(∇ℓ_i) with the 1/N normalisation on a finite dataset. A minibatch
gradient is the *mean* G_B = (1/B) Σ_{i∈batch} ∇ℓ_i. Parameters are the last axis of every
array, replicas / configurations the leading axes.

Problems (all frozen dataclasses; construct once, then call the methods)::

    NoisyQuadratic(h, c, theta_star=None, theta0=None)
        L = ½ (θ−θ*)ᵀH(θ−θ*), per-example gradient H(θ−θ*) + ξ, ξ ~ N(0, Σ) with Σ = c.
        h, c: diagonals (p,) or full symmetric PSD matrices (p, p). G_B is exact in one
        draw: H(θ−θ*) + N(0, Σ/B).
    FiniteSumQuadratic(h, centers, theta0=None)      # or .random(h, n_data, spread, seed)
        ℓ_i = ½ (θ−θ_i)ᵀH(θ−θ_i), i = 1..N (centers (N, p)).
    LinearRegression(lam, noise_std=0.0, w_star=None, theta0=None)      # online
        x ~ N(0, diag(λ)), y = w*ᵀx + n, n ~ N(0, σ²); ℓ = ½(xᵀw − y)².
    LinearRegressionData(lam, n_data, n_test=0, noise_std=0.0, seed=0, w_star=None,
                         theta0=None)
        the same model on a fixed training set of N examples (and n_test held out);
        test_loss is on the held-out set, or the exact population loss when n_test = 0.
    LogisticRegression(x, y, l2=0.0, theta0=None, x_test=None, y_test=None)
        ℓ_i = log(1 + exp(−y_i x_iᵀw)) + (l2/2)|w|², y_i = ±1  (non-quadratic);
        LogisticRegression.gaussian_mixture(n_data, dim, separation=1.0, l2=0.0, n_test=0,
                                            seed=0)

Methods every problem has (``theta``: NumPy, shape (..., p); float64 results)::

    .dim                      p        .n_data      N (None for infinite / online data)
    .theta0                   default initial parameters (p,)
    .loss(theta) -> (...)     .grad(theta) -> (..., p)
    .test_loss(theta) -> (...) | None   (None where the model has no test loss)
    .hessian(theta) -> (p,) diagonal or (p, p);   .sigma(theta) -> (p,) or (p, p)
    .stats(theta) -> theory.QuadraticStats  (grad_sq, g_h_g, tr_sigma, tr_h_sigma, eps_max,
                                            b_noise, b_simple) at one point θ (p,)
    .sample_grad(theta, batch, rng, *, replace=False) -> (..., p)
        one minibatch mean gradient per leading index of ``theta``; finite data draws the
        batch without replacement unless ``replace``; rng: numpy Generator or int seed.
    .kernel(backend, dtype) -> the vectorised form used by :func:`sgdtheory.simulate.run`.

Kernels (internal protocol; documented for people adding a model)::

    k.loss(theta) (n, p) -> (n,);  k.test_loss(theta) | None;  k.stats(theta) -> dict of (n,)
    k.sampler(gen, n_rep, replace) -> s;  s.grad(theta, layout, batch) -> (n, p)
        optional s.sgd_step(theta, layout, batch, lr): a fused in-place plain-SGD update
        ``layout`` says which replica each row belongs to (rows of one replica share the
        random draws, so a grid of learning rates sees common random numbers).
    finite datasets: k.batch_grad(theta, layout, idx) for example indices idx (n_rep, B);
        one sampler (shuffled epochs, or draws with replacement) serves them all.

Each problem validates its fields with the shared validators of this module (``_psd``,
``_vector``, ``_optional``, ``_samples``) in ``__post_init__``; ``Problem.kernel`` builds the
kernel class named for it at the end of the module.

>>> p = NoisyQuadratic(h=[1.0, 2.0], c=[1.0, 1.0])
>>> p.loss(p.theta0), p.stats(p.theta0).b_noise
(1.5, 0.3333333333333333)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import theory
from ._checks import integer, real
from .backend import Backend, array_module, get_backend

__all__ = [
    "FiniteSumQuadratic",
    "LinearRegression",
    "LinearRegressionData",
    "LogisticRegression",
    "NoisyQuadratic",
    "Problem",
]


# --------------------------------------------------------------------------- validation


def _floats(name, x) -> np.ndarray:
    try:
        return np.asarray(x, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be real numbers, got {x!r}") from exc


def _noise_std(value) -> float:
    sigma = real("noise_std", value)
    if sigma < 0:
        raise ValueError(f"noise_std must be finite and ≥ 0, got {value!r}")
    return sigma


def _vector(name, x, p=None):
    a = _floats(name, x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector, got shape {a.shape}")
    if p is not None and a.shape[0] != p:
        raise ValueError(f"{name} must have shape ({p},), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    return a


def _psd(name, x, p=None, *, spectrum=False):
    """A diagonal (p,) with entries ≥ 0, or a symmetric PSD (p, p) matrix; with ``spectrum``
    only the diagonal form (the eigenvalues of a diagonal covariance) is accepted."""
    a = _floats(name, x)
    if a.size == 0:
        raise ValueError(f"{name} must not be empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    if spectrum and a.ndim != 1:
        raise ValueError(f"{name} must be the 1-D spectrum (d,) of the feature covariance")
    if a.ndim == 1:
        if p is not None and a.shape != (p,):
            raise ValueError(f"{name} diagonal must have shape ({p},), got {a.shape}")
        if np.any(a < 0):
            raise ValueError(f"{name} must be positive semi-definite (a negative diagonal "
                             f"entry {a.min():g})")
        return a
    if a.ndim != 2 or a.shape[0] != a.shape[1] or (p is not None and a.shape[0] != p):
        want = f"({p},) or ({p}, {p})" if p is not None else "(p,) or (p, p)"
        raise ValueError(f"{name} must have shape {want}, got {a.shape}")
    scale = max(float(np.abs(a).max()), 1e-300)
    if not np.allclose(a, a.T, rtol=1e-10, atol=1e-12 * scale):
        raise ValueError(f"{name} must be symmetric")
    a = 0.5 * (a + a.T)
    lo = np.linalg.eigvalsh(a)[0]
    if lo < -1e-10 * scale:
        raise ValueError(f"{name} must be positive semi-definite (smallest eigenvalue {lo:g})")
    return a


def _optional(name, x, default):
    """A finite vector shaped like ``default`` (its length p), or ``default`` when x is None."""
    return default if x is None else _vector(name, x, default.shape[0])


def _samples(name, x, d=None):
    """A finite (n ≥ 1, d) array of examples (rows), d checked when given."""
    a = _floats(name, x)
    want = "d" if d is None else d
    if a.ndim != 2 or a.shape[0] < 1 or (d is not None and a.shape[1] != d):
        raise ValueError(f"{name} must have shape (n ≥ 1, {want}), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    return a


def _assign(obj, **fields) -> None:
    """Store validated values on a frozen dataclass (in ``__post_init__``)."""
    for name, value in fields.items():
        object.__setattr__(obj, name, value)


def _theta(theta, p):
    t = np.asarray(theta, dtype=float)
    if t.ndim == 0 or t.shape[-1] != p:
        raise ValueError(f"theta must have shape (..., {p}), got {t.shape}")
    return t


def _point(theta, p):
    t = _theta(theta, p)
    if t.ndim != 1:
        raise ValueError(f"theta must be one point of shape ({p},) here, got {t.shape}")
    return t


def _batch_arg(batch, n_data, replace):
    if isinstance(batch, bool) or not float(batch).is_integer() or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    batch = int(batch)
    if n_data is not None and not replace and batch > n_data:
        raise ValueError(f"batch ({batch}) exceeds n_data ({n_data}) for sampling without "
                         f"replacement (pass replace=True, or a smaller batch)")
    return batch


def _gen(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _sqrt_psd(a):
    """R with R Rᵀ = a for a diagonal (p,) (returns √a) or a PSD matrix (symmetric root)."""
    if a.ndim == 1:
        return np.sqrt(a)
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _mat(a, x):
    """x @ A for rows x (..., p), A a diagonal (p,) or symmetric matrix."""
    return x * a if a.ndim == 1 else x @ a


def _out(x):
    """0-d results as Python floats (scalars in, scalars out)."""
    x = np.asarray(x)
    return float(x) if x.ndim == 0 else x


# --------------------------------------------------------------------------- kernels


@dataclass
class Layout:
    """Which replica each row of a (n, p) state belongs to.

    ``rep is None``: rows are replica-major, ``n = n_rep * n_cfg`` (row r·n_cfg + c is
    replica r, configuration c). Otherwise ``rep`` (n,) is the replica of each row (after
    diverged rows were dropped).
    """

    n_rep: int
    n_cfg: int
    rep: Any = None

    def split(self, per_rep):
        """(R', C', a') with per-replica draws ``per_rep`` (n_rep, ...) aligned to rows so
        that rows reshape to (R', C', ...) and a' has leading axis R'."""
        if self.rep is None:
            return self.n_rep, self.n_cfg, per_rep
        return self.rep.shape[0], 1, per_rep[self.rep]


class _Kernel:
    """Backend form of a problem: arrays on ``backend`` with ``dtype``."""

    has_test = False

    def __init__(self, backend: Backend, dtype):
        self.be = backend
        self.xp = backend.xp
        self.dtype = dtype

    def arr(self, x):
        return self.be.asarray(np.asarray(x, dtype=float), dtype=self.dtype)

    def test_loss(self, theta):
        return None

    def sampler(self, gen, n_rep, replace=False):
        raise NotImplementedError


def _rowsum(x):
    return x.sum(-1)


def _constant_noise_stats(k, g, hg) -> dict:
    """Kernel ``stats`` of a model whose tr Σ and tr HΣ do not depend on θ (``k.tr_sigma``,
    ``k.tr_h_sigma``): |G|², GᵀHG per row from G (n, p) and HG, the traces repeated."""
    def full(v):
        return k.xp.full_like(g[:, 0], v) if g.shape[0] else g[:, 0]

    return {"grad_sq": _rowsum(g * g), "g_h_g": _rowsum(hg * g),
            "tr_sigma": full(k.tr_sigma), "tr_h_sigma": full(k.tr_h_sigma)}


def _bmm_rows(xb, theta, r, c):
    """Residual-style product: xb (R, B, p), theta (R*C, p) → (R, B, C)."""
    return xb @ theta.reshape(r, c, -1).swapaxes(1, 2)


def _bmm_back(xb, coef, scale):
    """Gradient back-projection: xb (R, B, p), coef (R, B, C) → (R*C, p) of Xᵀcoef·scale."""
    g = (xb.swapaxes(1, 2) @ coef).swapaxes(1, 2)
    g = g.reshape(-1, g.shape[-1])
    return g * scale


class _DataKernel(_Kernel):
    """Kernel of a finite dataset of ``self.n`` examples: ``batch_grad(theta, layout, idx)``
    is the mean gradient over the examples ``idx`` (n_rep, B) of each replica."""

    n: int

    def sampler(self, gen, n_rep, replace=False):
        return _DataSampler(self, _ShuffleState(self.be, gen, n_rep, self.n, replace))

    def batch_grad(self, theta, layout, idx):
        raise NotImplementedError


class _DataSampler:
    """Minibatches of a finite dataset: shuffled epochs without replacement (a partial last
    batch is dropped), or independent draws with replacement; one stream per replica."""

    def __init__(self, k: _DataKernel, state):
        self.k, self.state = k, state

    def grad(self, theta, layout, batch):
        return self.k.batch_grad(theta, layout, self.state.indices(batch))

    @property
    def epochs(self):
        """Reshuffles so far (epochs started)."""
        return self.state.epochs


class _ShuffleState:
    """Per-replica permutations of range(N), reshuffled each epoch; shared cursor."""

    def __init__(self, be, gen, n_rep, n_data, replace):
        self.be, self.gen, self.n_rep, self.n, self.replace = be, gen, n_rep, n_data, replace
        self.perm = None
        self.cursor = n_data
        self.epochs = 0

    def indices(self, batch):
        if self.replace:
            u = self.be.uniform(self.gen, (self.n_rep, batch), "float64")
            return self.be.astype(u * self.n, "int64")
        if batch > self.n:
            raise ValueError(f"batch ({batch}) exceeds n_data ({self.n}) for sampling without "
                             f"replacement")
        if self.cursor + batch > self.n:  # new epoch: reshuffle (a partial tail is dropped)
            self.perm = self.be.permutations(self.gen, self.n_rep, self.n)
            self.cursor = 0
            self.epochs += 1
        idx = self.perm[:, self.cursor:self.cursor + batch]
        self.cursor += batch
        return idx


# --------------------------------------------------------------------------- noisy quadratic


class Problem:
    """Shared helpers of the problems (see the module docstring for the interface)."""

    theta0: np.ndarray
    n_data: int | None = None

    @property
    def dim(self) -> int:
        """p, the number of parameters (the length of ``theta0``)."""
        return self.theta0.shape[0]

    def test_loss(self, theta):
        return None

    def stats(self, theta) -> theory.QuadraticStats:
        """|G|², GᵀHG, tr Σ, tr HΣ (→ ε_max, B_noise, B_simple) at θ (p,), exactly."""
        t = _point(theta, self.dim)
        return theory.quadratic_stats(self.hessian(t), self.sigma(t), self.grad(t))

    def sample_grad(self, theta, batch, rng, *, replace=False):
        """One minibatch mean gradient G_B per leading index of ``theta`` (..., p).

        Args:
            theta: parameters (..., p).
            batch: B (examples per batch, integer ≥ 1; ≤ N without replacement).
            rng: numpy Generator or int seed.
            replace: finite data only: draw the B examples with replacement.
        """
        t = _theta(theta, self.dim)
        batch = _batch_arg(batch, self.n_data, replace)
        flat = t.reshape(-1, self.dim)
        k = self.kernel(get_backend("numpy"), "float64")
        s = k.sampler(_gen(rng), flat.shape[0], replace)
        g = s.grad(np.ascontiguousarray(flat), Layout(flat.shape[0], 1), batch)
        return np.asarray(g).reshape(t.shape)

    def kernel(self, backend: Backend, dtype):
        """The vectorised form :func:`sgdtheory.simulate.run` runs: arrays on ``backend`` in
        ``dtype`` (each problem's kernel class is named at the end of this module)."""
        return self._kernel(self, backend, dtype)


@dataclass(frozen=True, eq=False)
class NoisyQuadratic(Problem):
    r"""Noisy quadratic model: L(θ) = ½ (θ−θ*)ᵀ H (θ−θ*), additive Gaussian gradient noise.

    Per-example gradient H(θ−θ*) + ξ with ξ ~ N(0, Σ); so the minibatch mean is exactly
    G_B = H(θ−θ*) + N(0, Σ/B) (one draw, whatever B). Σ does not depend on θ.

    Args:
        h: H as a diagonal (p,) (eigenbasis, h_i ≥ 0) or a symmetric PSD matrix (p, p).
        c: Σ as a diagonal (p,) of noise variances c_i ≥ 0, or a PSD matrix (p, p).
        theta_star: optimum θ* (p,), default 0.
        theta0: default start, default θ* + 1 (so E[(θ_i − θ*_i)²] = 1 at t = 0).

    >>> NoisyQuadratic([1.0, 4.0], [0.5, 0.5]).grad([[1.0, 1.0]])
    array([[1., 4.]])
    """

    h: Any
    c: Any
    theta_star: Any = None
    theta0: Any = None

    def __post_init__(self):
        h = _psd("h", self.h)
        p = h.shape[0]
        c = _psd("c", self.c, p)
        ts = _optional("theta_star", self.theta_star, np.zeros(p))
        _assign(self, h=h, c=c, theta_star=ts, theta0=_optional("theta0", self.theta0, ts + 1.0))

    def loss(self, theta):
        """½ (θ−θ*)ᵀH(θ−θ*), shape (...)."""
        e = _theta(theta, self.dim) - self.theta_star
        return _out(0.5 * np.sum(_mat(self.h, e) * e, axis=-1))

    def grad(self, theta):
        """G = H(θ−θ*), shape (..., p)."""
        return _mat(self.h, _theta(theta, self.dim) - self.theta_star)

    def hessian(self, theta=None):
        """H: the diagonal (p,) or the matrix (p, p) as given."""
        return self.h

    def sigma(self, theta=None):
        """Σ (constant): the diagonal (p,) or the matrix (p, p) as given."""
        return self.c


class _NQMKernel(_Kernel):
    def __init__(self, prob: NoisyQuadratic, be, dtype):
        super().__init__(be, dtype)
        self.diag_h = prob.h.ndim == 1
        self.h = self.arr(prob.h)
        self.ts = self.arr(prob.theta_star)
        self.zero_star = not np.any(prob.theta_star)
        self.diag_c = prob.c.ndim == 1
        self.root_c = self.arr(_sqrt_psd(prob.c).T)  # rows z @ root_c ~ N(0, Σ)
        st = prob.stats(prob.theta_star + 1.0)
        self.tr_sigma, self.tr_h_sigma = st.tr_sigma, st.tr_h_sigma

    def _e(self, theta):
        return theta if self.zero_star else theta - self.ts

    def loss(self, theta):
        e = self._e(theta)
        if self.diag_h:  # one pass, no temporaries
            return 0.5 * self.xp.einsum("ij,ij,j->i", e, e, self.h)
        return 0.5 * _rowsum((e @ self.h) * e)

    def stats(self, theta):
        g = self._e(theta)
        g = g * self.h if self.diag_h else g @ self.h
        return _constant_noise_stats(self, g, g * self.h if self.diag_h else g @ self.h)

    def sampler(self, gen, n_rep, replace=False):
        s = _NQMSampler(self, gen, n_rep)
        if not (self.diag_h and self.diag_c):
            s.sgd_step = None  # the fused update needs diagonal h and c
        return s


class _NQMSampler:
    def __init__(self, k: _NQMKernel, gen, n_rep):
        self.k, self.gen = k, gen
        self.z = k.be.empty((n_rep, k.h.shape[0]), k.dtype)
        self.g = None

    #: elements of θ updated per tile of the fused step (noise + parameters stay in cache)
    TILE = 1 << 18

    def sgd_step(self, theta, layout, batch, lr):
        """Fused plain-SGD update in place, θ ← θ − η(h(θ−θ*) + √(c/B) z), for diagonal h and
        c and one scalar η: θ ← (1 − ηh)θ + ηhθ* − (η√(c/B)) z, tile by tile of replicas."""
        k = self.k
        scale = k.root_c * (float(lr) / math.sqrt(batch))
        a = 1.0 - lr * k.h
        shift = None if k.zero_star else (lr * k.h) * k.ts
        if layout.rep is not None:  # after diverged rows were dropped: gather the draws
            z = k.be.standard_normal(self.gen, None, out=self.z)
            z *= scale
            theta *= a
            if shift is not None:
                theta += shift
            theta -= z[layout.rep]
            return
        n_rep, n_cfg = layout.n_rep, layout.n_cfg
        tile = max(1, self.TILE // (theta.shape[1] * n_cfg))
        if tile < n_rep and tile % 2:
            tile += 1  # even tiles let the numpy float32 fill fold in the scale
        tile = min(tile, n_rep)
        if getattr(self, "z_tile", None) is None or self.z_tile.shape[0] != tile:
            self.z_tile = k.be.empty((tile, theta.shape[1]), k.dtype)  # stays in cache
        for r0 in range(0, n_rep, tile):
            r1 = min(n_rep, r0 + tile)
            z = k.be.standard_normal(self.gen, None, out=self.z_tile[:r1 - r0], scale=scale)
            th = theta[r0 * n_cfg:r1 * n_cfg]
            th *= a
            if shift is not None:
                th += shift
            if n_cfg == 1:
                th -= z
            else:
                th.reshape(r1 - r0, n_cfg, -1)[...] -= z[:, None, :]

    def grad(self, theta, layout, batch):
        k = self.k
        z = k.be.standard_normal(self.gen, None, out=self.z)
        if k.diag_c:
            z *= k.root_c * (1.0 / math.sqrt(batch))  # √(c/B) z ~ N(0, Σ/B)
        else:
            z = (z @ k.root_c) * (1.0 / math.sqrt(batch))
        if self.g is None or self.g.shape != theta.shape:
            self.g = k.be.empty(theta.shape, k.dtype)
        g = self.g
        e = k._e(theta)
        if k.diag_h:
            k.xp.multiply(e, k.h, out=g)
        else:
            k.xp.matmul(e, k.h, out=g)
        r, c, zz = layout.split(z)
        if c == 1:
            g += zz
        else:
            g.reshape(r, c, -1)[...] += zz[:, None, :]
        return g


# --------------------------------------------------------------------------- finite-sum quadratic


@dataclass(frozen=True, eq=False)
class FiniteSumQuadratic(Problem):
    r"""Finite-sum quadratic: ℓ_i = ½ (θ−θ_i)ᵀ H (θ−θ_i), i = 1..N.

    L = ½ (θ−θ̄)ᵀH(θ−θ̄) + ½ tr(HC), G = H(θ−θ̄), Σ = H C H with θ̄ the mean and C the
    (1/N) covariance of the centres θ_i. Batches are drawn without replacement within an
    epoch (reshuffled each epoch): Cov(G_B) = (Σ/B)(N−B)/(N−1).

    Args:
        h: H, diagonal (p,) or symmetric PSD (p, p).
        centers: θ_i, shape (N, p).
        theta0: default start, default θ̄ + 1.

    >>> q = FiniteSumQuadratic([1.0], [[0.0], [2.0]])
    >>> q.loss([1.0]), q.sigma([0.0])
    (0.5, array([[1.]]))
    """

    h: Any
    centers: Any
    theta0: Any = None

    def __post_init__(self):
        h = _psd("h", self.h)
        ctr = _samples("centers", self.centers, h.shape[0])
        _assign(self, h=h, centers=ctr, theta0=_optional("theta0", self.theta0, ctr.mean(0) + 1.0))

    @classmethod
    def random(cls, h, n_data: int, spread=1.0, seed=0, theta0=None):
        """N centres θ_i ~ N(0, spread²·I) (spread scalar or (p,)), drawn from ``seed``."""
        h = _psd("h", h)
        n_data = integer("n_data", n_data)
        rng = np.random.default_rng(integer("seed", seed, 0))
        ctr = rng.standard_normal((n_data, h.shape[0])) * _floats("spread", spread)
        return cls(h, ctr, theta0)

    @property
    def n_data(self) -> int:
        return self.centers.shape[0]

    @property
    def center_mean(self):
        return self.centers.mean(0)

    def loss(self, theta):
        """(1/N) Σ_i ½ (θ−θ_i)ᵀH(θ−θ_i), shape (...)."""
        e = _theta(theta, self.dim) - self.center_mean
        dc = self.centers - self.center_mean
        const = 0.5 * np.sum(_mat(self.h, dc) * dc) / self.n_data
        return _out(0.5 * np.sum(_mat(self.h, e) * e, axis=-1) + const)

    def grad(self, theta):
        return _mat(self.h, _theta(theta, self.dim) - self.center_mean)

    def hessian(self, theta=None):
        return self.h

    def sigma(self, theta=None):
        """Σ = (1/N) Σ_i (H(θ_i − θ̄))(H(θ_i − θ̄))ᵀ, a (p, p) matrix (independent of θ)."""
        a = _mat(self.h, self.centers - self.center_mean)
        return a.T @ a / self.n_data


class _FiniteQuadKernel(_DataKernel):
    def __init__(self, prob: FiniteSumQuadratic, be, dtype):
        super().__init__(be, dtype)
        self.n = prob.n_data
        self.diag_h = prob.h.ndim == 1
        self.h = self.arr(prob.h)
        self.hc = self.arr(_mat(prob.h, prob.centers))  # rows Hθ_i (N, p)
        self.mean = self.arr(prob.center_mean)
        self.const = float(prob.loss(prob.center_mean))
        st = prob.stats(prob.center_mean)
        self.tr_sigma, self.tr_h_sigma = st.tr_sigma, st.tr_h_sigma

    def _h(self, e):
        return e * self.h if self.diag_h else e @ self.h

    def loss(self, theta):
        e = theta - self.mean
        return 0.5 * _rowsum(self._h(e) * e) + self.const

    def stats(self, theta):
        g = self._h(theta - self.mean)
        return _constant_noise_stats(self, g, self._h(g))

    def batch_grad(self, theta, layout, idx):
        mean_hc = self.hc[idx].mean(1)  # (R, p): (1/B) Σ_batch Hθ_i
        g = self._h(theta)
        r, c, m = layout.split(mean_hc)
        if c == 1:
            g -= m
        else:
            g.reshape(r, c, -1)[...] -= m[:, None, :]
        return g


# --------------------------------------------------------------------------- linear regression


def _linreg_gaussian_sigma(lam, e, noise_var):
    """Σ = H e eᵀ H + (eᵀHe + σ²) H for x ~ N(0, diag λ) (Gaussian fourth moments)."""
    he = lam * e
    return np.outer(he, he) + (e @ he + noise_var) * np.diag(lam)


@dataclass(frozen=True, eq=False)
class LinearRegression(Problem):
    r"""Online linear regression with Gaussian features (fresh examples every step).

    x ~ N(0, diag(λ)), y = w*ᵀx + n, n ~ N(0, σ²), ℓ = ½(xᵀw − y)², e = w − w*:
    L = ½(eᵀHe + σ²), G = He, H = diag(λ), Σ = H e eᵀ H + (eᵀHe + σ²) H (docs/design.md §3).
    The test loss equals L (population loss).

    Args:
        lam: λ, feature variances (d,), ≥ 0.
        noise_std: σ, label-noise standard deviation.
        w_star: teacher weights (d,), default 0.
        theta0: default start, default w* + 1 (so m_j(0) = E[e_j²] = 1).

    >>> LinearRegression([1.0, 2.0], noise_std=1.0).loss([0.0, 0.0])
    0.5
    """

    lam: Any
    noise_std: float = 0.0
    w_star: Any = None
    theta0: Any = None
    has_test = True

    def __post_init__(self):
        lam = _psd("lam", self.lam, spectrum=True)
        ws = _optional("w_star", self.w_star, np.zeros(lam.shape[0]))
        _assign(self, lam=lam, noise_std=_noise_std(self.noise_std), w_star=ws,
                theta0=_optional("theta0", self.theta0, ws + 1.0))

    def loss(self, theta):
        """½ (eᵀHe + σ²), shape (...)."""
        e = _theta(theta, self.dim) - self.w_star
        return _out(0.5 * (np.sum(self.lam * e * e, axis=-1) + self.noise_std**2))

    def test_loss(self, theta):
        """Population loss (= :meth:`loss` for online data)."""
        return self.loss(theta)

    def grad(self, theta):
        return self.lam * (_theta(theta, self.dim) - self.w_star)

    def hessian(self, theta=None):
        return self.lam

    def sigma(self, theta):
        e = _point(theta, self.dim) - self.w_star
        return _linreg_gaussian_sigma(self.lam, e, self.noise_std**2)


class _LinRegOnlineKernel(_Kernel):
    has_test = True

    def __init__(self, prob: LinearRegression, be, dtype):
        super().__init__(be, dtype)
        self.lam = self.arr(prob.lam)
        self.sqrt_lam = self.arr(np.sqrt(prob.lam))
        self.ws = self.arr(prob.w_star)
        self.noise_var = float(prob.noise_std) ** 2
        self.noise_std = float(prob.noise_std)
        self.sum_lam = float(prob.lam.sum())
        self.sum_lam2 = float((prob.lam**2).sum())

    def loss(self, theta):
        e = theta - self.ws
        return 0.5 * (_rowsum(self.lam * e * e) + self.noise_var)

    def test_loss(self, theta):
        return self.loss(theta)

    def stats(self, theta):
        e = theta - self.ws
        he = self.lam * e
        ehe = _rowsum(he * e) + self.noise_var
        grad_sq = _rowsum(he * he)
        g_h_g = _rowsum(he * he * self.lam)
        return {"grad_sq": grad_sq, "g_h_g": g_h_g,
                "tr_sigma": grad_sq + ehe * self.sum_lam,
                "tr_h_sigma": g_h_g + ehe * self.sum_lam2}

    def sampler(self, gen, n_rep, replace=False):
        return _LinRegOnlineSampler(self, gen, n_rep)


class _LinRegOnlineSampler:
    def __init__(self, k, gen, n_rep):
        self.k, self.gen, self.n_rep = k, gen, n_rep

    def grad(self, theta, layout, batch):
        k = self.k
        d = k.lam.shape[0]
        xb = k.be.standard_normal(self.gen, (self.n_rep, batch, d), k.dtype) * k.sqrt_lam
        yb = xb @ k.ws
        if k.noise_std > 0:
            yb += k.noise_std * k.be.standard_normal(self.gen, (self.n_rep, batch), k.dtype)
        return _lsq_grad(theta, layout, xb, yb)


def _lsq_grad(theta, layout, xb, yb):
    """(1/B) X_bᵀ(X_b w − y_b) for each row w of theta; xb (R, B, d), yb (R, B)."""
    r, c, xx = layout.split(xb)
    _, _, yy = layout.split(yb)
    res = _bmm_rows(xx, theta, r, c)  # (R', B, C')
    res -= yy[:, :, None]
    return _bmm_back(xx, res, 1.0 / xx.shape[1])


@dataclass(frozen=True, eq=False)
class LinearRegressionData(Problem):
    r"""Linear regression on a fixed dataset of N Gaussian examples (plus a held-out set).

    x_i ~ N(0, diag(λ)), y_i = w*ᵀx_i + n_i, n_i ~ N(0, σ²) drawn once from ``seed``.
    ℓ_i = ½(x_iᵀw − y_i)², L = mean over the N training examples, with r_i = x_iᵀw − y_i:
    G = Xᵀr/N, H = XᵀX/N, Σ = Xᵀ diag(r²) X/N − GGᵀ. Minibatches are drawn without
    replacement, reshuffled every epoch. ``test_loss`` is the mean loss on the ``n_test``
    held-out examples, or the exact population loss ½(eᵀ diag(λ) e + σ²) when n_test = 0.

    Args:
        lam: λ (d,), feature variances. n_data: N. n_test: held-out examples (0: population).
        noise_std: σ. seed: draws the data (and w* when not given).
        w_star: teacher (d,), default N(0, 1) entries from ``seed``.
        theta0: default start, default 0.
    """

    lam: Any
    n_data: int
    n_test: int = 0
    noise_std: float = 0.0
    seed: int = 0
    w_star: Any = None
    theta0: Any = None
    x: Any = field(init=False, repr=False)
    y: Any = field(init=False, repr=False)
    x_test: Any = field(init=False, repr=False)
    y_test: Any = field(init=False, repr=False)
    has_test = True

    def __post_init__(self):
        lam = _psd("lam", self.lam, spectrum=True)
        d = lam.shape[0]
        _assign(self, lam=lam, n_data=integer("n_data", self.n_data),
                n_test=integer("n_test", self.n_test, 0), noise_std=_noise_std(self.noise_std))
        rng = np.random.default_rng(integer("seed", self.seed, 0))
        # w* is drawn (before the data) only when not given
        ws = rng.standard_normal(d) if self.w_star is None else _vector("w_star", self.w_star, d)
        _assign(self, w_star=ws, theta0=_optional("theta0", self.theta0, np.zeros(d)))

        def draw(n):
            x = rng.standard_normal((n, d)) * np.sqrt(lam)
            return x, x @ ws + self.noise_std * rng.standard_normal(n)

        (x, y), (xt, yt) = draw(self.n_data), draw(self.n_test)
        _assign(self, x=x, y=y, x_test=xt, y_test=yt)

    def _res(self, theta):
        return _theta(theta, self.dim) @ self.x.T - self.y

    def loss(self, theta):
        """(1/N) Σ_i ½ (x_iᵀw − y_i)², shape (...)."""
        return _out(0.5 * np.mean(self._res(theta) ** 2, axis=-1))

    def population_loss(self, theta):
        """½ (eᵀ diag(λ) e + σ²): the expected loss on a fresh example."""
        e = _theta(theta, self.dim) - self.w_star
        return _out(0.5 * (np.sum(self.lam * e * e, axis=-1) + self.noise_std**2))

    def test_loss(self, theta):
        if self.n_test == 0:
            return self.population_loss(theta)
        r = _theta(theta, self.dim) @ self.x_test.T - self.y_test
        return _out(0.5 * np.mean(r**2, axis=-1))

    def grad(self, theta):
        return self._res(theta) @ self.x / self.n_data

    def hessian(self, theta=None):
        return self.x.T @ self.x / self.n_data

    def sigma(self, theta):
        r = self._res(_point(theta, self.dim))
        g = r @ self.x / self.n_data
        return (self.x * (r**2)[:, None]).T @ self.x / self.n_data - np.outer(g, g)


class _QuadForm:
    """The mean squared error ½ mean (Xw − y)² of rows w, in O(d²) per row instead of O(n·d).

    Exactly, for any reference point a (here ≈ the least-squares solution, so the terms are
    small and nothing cancels): L(w) = L(a) + g_aᵀ(w − a) + ½ (w − a)ᵀH(w − a) with
    H = XᵀX/n and g_a = Xᵀ(Xa − y)/n computed in float64. Used when d < n.
    """

    def __init__(self, k: _Kernel, x, y):
        n, d = x.shape
        self.direct = n == 0 or d >= n
        if self.direct:
            self.x, self.y = k.arr(x), k.arr(y)
            return
        h = x.T @ x / n
        try:
            a = np.linalg.solve(h, x.T @ y / n)
        except np.linalg.LinAlgError:
            a = np.linalg.lstsq(h, x.T @ y / n, rcond=None)[0]
        r = x @ a - y
        self.l_a = float(0.5 * np.mean(r**2))
        self.h, self.a, self.g_a = k.arr(h), k.arr(a), k.arr(x.T @ r / n)

    def __call__(self, theta):
        if self.direct:
            r = theta @ self.x.T - self.y
            return 0.5 * (r * r).mean(-1)
        e = theta - self.a
        return _rowsum((0.5 * (e @ self.h) + self.g_a) * e) + self.l_a


class _LinRegDataKernel(_DataKernel):
    has_test = True

    def __init__(self, prob: LinearRegressionData, be, dtype):
        super().__init__(be, dtype)
        self.prob = prob
        self.n = prob.n_data
        self.x = self.arr(prob.x)
        self.y = self.arr(prob.y)
        self.loss = _QuadForm(self, prob.x, prob.y)
        self._stat_arrays = None
        if prob.n_test:
            self._test = _QuadForm(self, prob.x_test, prob.y_test)
        else:
            self.lam, self.ws = self.arr(prob.lam), self.arr(prob.w_star)
            self.noise_var = float(prob.noise_std) ** 2

    def test_loss(self, theta):
        if self.prob.n_test:
            return self._test(theta)
        e = theta - self.ws
        return 0.5 * (_rowsum(self.lam * e * e) + self.noise_var)

    def stats(self, theta):
        if self._stat_arrays is None:  # H, |x_i|², x_iᵀHx_i: computed on first use
            x = self.prob.x
            h = x.T @ x / self.n
            self._stat_arrays = (self.arr(h), self.arr(np.sum(x**2, 1)),
                                 self.arr(np.sum((x @ h) * x, 1)))
        h, x_sq, x_h_x = self._stat_arrays
        r = theta @ self.x.T - self.y  # (n, N)
        g = (r @ self.x) / self.n
        grad_sq = _rowsum(g * g)
        g_h_g = _rowsum((g @ h) * g)
        r2 = r * r
        return {"grad_sq": grad_sq, "g_h_g": g_h_g,
                "tr_sigma": (r2 @ x_sq) / self.n - grad_sq,
                "tr_h_sigma": (r2 @ x_h_x) / self.n - g_h_g}

    def batch_grad(self, theta, layout, idx):
        return _lsq_grad(theta, layout, self.x[idx], self.y[idx])


# --------------------------------------------------------------------------- logistic regression


def _sigmoid(z):
    """1/(1 + e^{−z}) = ½(1 + tanh(z/2)), without overflow, for NumPy, CuPy or torch arrays
    (absolute error ≈ 1e-16; relative accuracy is lost in the far negative tail)."""
    return 0.5 * (1.0 + array_module(z).tanh(0.5 * z))


def _softplus(z):
    """log(1 + e^z) = max(z, 0) + log1p(e^{−|z|}), without overflow, for NumPy, CuPy or
    torch arrays (the logistic loss is softplus(−margin))."""
    xp = array_module(z)
    return z.clip(min=0) + xp.log1p(xp.exp(-abs(z)))


@dataclass(frozen=True, eq=False)
class LogisticRegression(Problem):
    r"""Logistic regression on a finite dataset (a non-quadratic noisy loss).

    ℓ_i(w) = log(1 + exp(−y_i x_iᵀw)) + (l2/2)|w|² with labels y_i = ±1. With
    m_i = y_i x_iᵀw, s = sigmoid, the per-example gradient is −y_i s(−m_i) x_i + l2·w, and
    exactly over the N examples: G = mean of those, H = Xᵀ diag(s(m)s(−m)) X/N + l2·I,
    Σ = (1/N) Σ_i (∇ℓ_i − G)(∇ℓ_i − G)ᵀ (the l2 term cancels). Batches without replacement.

    Args:
        x: features (N, d). y: labels (N,), ±1 (0/1 are mapped to −1/+1).
        l2: weight decay coefficient λ ≥ 0 (part of every ℓ_i).
        theta0: default start, default 0.
        x_test, y_test: optional held-out set for ``test_loss`` (mean, without l2 term).
    """

    x: Any
    y: Any
    l2: float = 0.0
    theta0: Any = None
    x_test: Any = None
    y_test: Any = None

    def __post_init__(self):
        x = _samples("x", self.x)
        l2 = real("l2", self.l2)
        if l2 < 0:
            raise ValueError(f"l2 must be finite and ≥ 0, got {self.l2!r}")
        _assign(self, x=x, y=self._labels("y", self.y, x.shape[0]), l2=l2,
                theta0=_optional("theta0", self.theta0, np.zeros(x.shape[1])))
        if (self.x_test is None) != (self.y_test is None):
            raise ValueError("give both x_test and y_test, or neither")
        if self.x_test is not None:
            xt = _samples("x_test", self.x_test, x.shape[1])
            _assign(self, x_test=xt, y_test=self._labels("y_test", self.y_test, xt.shape[0]))

    @staticmethod
    def _labels(name, y, n):
        y = np.asarray(y, dtype=float)
        if y.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {y.shape}")
        if np.all(np.isin(y, (0.0, 1.0))):
            y = 2.0 * y - 1.0
        if not np.all(np.isin(y, (-1.0, 1.0))):
            raise ValueError(f"{name} must hold labels ±1 (or 0/1)")
        return y

    @classmethod
    def gaussian_mixture(cls, n_data: int, dim: int, separation=1.0, l2=0.0, n_test=0,
                         seed=0):
        """Two Gaussian classes N(±(separation/2)·u, I) in ``dim`` dims (u a fixed unit
        vector), equal priors; N training examples and ``n_test`` held out, from ``seed``."""
        n_data, dim = integer("n_data", n_data), integer("dim", dim)
        n_test = integer("n_test", n_test, 0)
        rng = np.random.default_rng(integer("seed", seed, 0))
        u = rng.standard_normal(dim)
        u /= np.linalg.norm(u)

        def draw(n):
            y = np.where(rng.random(n) < 0.5, -1.0, 1.0)
            return y[:, None] * (0.5 * separation) * u + rng.standard_normal((n, dim)), y

        x, y = draw(int(n_data))
        xt, yt = draw(int(n_test)) if n_test else (None, None)
        return cls(x, y, l2=l2, x_test=xt, y_test=yt)

    @property
    def n_data(self) -> int:
        return self.x.shape[0]

    def _margins(self, theta, x=None, y=None):
        x = self.x if x is None else x
        y = self.y if y is None else y
        return (_theta(theta, self.dim) @ x.T) * y

    def loss(self, theta):
        t = _theta(theta, self.dim)
        m = self._margins(t)
        return _out(np.mean(np.logaddexp(0.0, -m), axis=-1) + 0.5 * self.l2 * np.sum(t * t, -1))

    def test_loss(self, theta):
        if self.x_test is None:
            return None
        m = self._margins(theta, self.x_test, self.y_test)
        return _out(np.mean(np.logaddexp(0.0, -m), axis=-1))

    def _per_example(self, theta):
        t = _point(theta, self.dim)
        coef = -self.y * _sigmoid(-self._margins(t))
        return coef[:, None] * self.x  # gradients without the l2 term, (N, d)

    def grad(self, theta):
        t = _theta(theta, self.dim)
        coef = -self.y * _sigmoid(-self._margins(t))
        return coef @ self.x / self.n_data + self.l2 * t

    def hessian(self, theta):
        m = self._margins(_point(theta, self.dim))
        s = _sigmoid(m) * _sigmoid(-m)
        return (self.x * s[:, None]).T @ self.x / self.n_data + self.l2 * np.eye(self.dim)

    def sigma(self, theta):
        g = self._per_example(theta)
        g = g - g.mean(0)
        return g.T @ g / self.n_data


class _LogisticKernel(_DataKernel):
    def __init__(self, prob: LogisticRegression, be, dtype):
        super().__init__(be, dtype)
        self.prob = prob
        self.n = prob.n_data
        self.l2 = float(prob.l2)
        self.x, self.y = self.arr(prob.x), self.arr(prob.y)
        self.has_test = prob.x_test is not None
        if self.has_test:
            self.xt, self.yt = self.arr(prob.x_test), self.arr(prob.y_test)

    def loss(self, theta):
        m = (theta @ self.x.T) * self.y
        return _softplus(-m).mean(-1) + 0.5 * self.l2 * _rowsum(theta * theta)

    def test_loss(self, theta):
        if not self.has_test:
            return None
        m = (theta @ self.xt.T) * self.yt
        return _softplus(-m).mean(-1)

    def stats(self, theta):
        xp = self.xp
        m = (theta @ self.x.T) * self.y  # (n, N)
        coef = -self.y * _sigmoid(-m)
        g0 = (coef @ self.x) / self.n  # (n, d), gradient without l2
        g = g0 + self.l2 * theta
        s = _sigmoid(m) * _sigmoid(-m)
        h = xp.einsum("nk,ki,kj->nij", s, self.x, self.x) / self.n
        sig = xp.einsum("nk,ki,kj->nij", coef * coef, self.x, self.x) / self.n
        sig = sig - g0[:, :, None] * g0[:, None, :]
        hg = (h @ g[:, :, None])[:, :, 0] + self.l2 * g
        tr_sigma = sig.diagonal(0, 1, 2).sum(-1)
        tr_h_sigma = (h * sig).sum((1, 2)) + self.l2 * tr_sigma
        return {"grad_sq": _rowsum(g * g), "g_h_g": _rowsum(hg * g), "tr_sigma": tr_sigma,
                "tr_h_sigma": tr_h_sigma}

    def batch_grad(self, theta, layout, idx):
        r, c, xb = layout.split(self.x[idx])
        _, _, yb = layout.split(self.y[idx])
        m = _bmm_rows(xb, theta, r, c) * yb[:, :, None]  # (R', B, C')
        coef = -yb[:, :, None] * _sigmoid(-m)
        g = _bmm_back(xb, coef, 1.0 / idx.shape[1])
        if self.l2:
            g += self.l2 * theta
        return g


# --------------------------------------------------------------------------- problem → kernel

NoisyQuadratic._kernel = _NQMKernel
FiniteSumQuadratic._kernel = _FiniteQuadKernel
LinearRegression._kernel = _LinRegOnlineKernel
LinearRegressionData._kernel = _LinRegDataKernel
LogisticRegression._kernel = _LogisticKernel
