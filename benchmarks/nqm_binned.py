"""A small NumPy re-implementation of the binned NQM method of Zhang et al. (2019), for timing.

The authors' notebook (github.com/gd-zhang/noisy-quadratic-model) represents the spectrum
h_i = 1/i, i = 1..d, by ``nbins`` geometrically spaced values with counts, advances each bin's
second moments by k steps at once through the eigendecomposition of its 3×3 moment map
(s_k = V Λ^k V⁻¹ (s_0 − s*) + s*), and finds the steps to a loss C by bisection over
k ∈ [0, 10⁷), assuming the loss decreases in k. Written here from that description (not
copied); how it differs from the notebook:

* plain NumPy instead of ``autograd.numpy``; the moment maps are written in this project's
  convention (E[θ²], E[θv], E[v²]) for heavy ball v ← μv + g, θ ← θ − ηv, and
  (E[θ²], E[θθ̄], E[θ̄²]) for the EMA θ̄ ← βθ̄ + (1 − β)θ (the notebook uses a rescaled,
  equivalent state);
* ``hoist=False`` recomputes the eigendecomposition at every bisection step, as the notebook
  does; ``hoist=True`` computes it once per configuration (same answers, faster);
* the answer is the first k the bisection finds with L_k < C (the notebook returns that
  k − 1); binning, eigenvectors that are nearly parallel (a double root of the map) and the
  monotonicity assumption make it approximate, unlike :func:`sgdtheory.nqm.steps_to_target`.
"""

from __future__ import annotations

import numpy as np


def binned_spectrum(dim: int, nbins: int):
    """Bin values (geometric from h_1 = 1 to h_d = 1/d) and how many h_i each one stands for:
    h_i goes to the first bin value it is at least as large as (the notebook's rule)."""
    h = 1.0 / np.arange(1, dim + 1)
    edges = np.geomspace(h[0], h[-1], nbins)
    first = np.searchsorted(-edges, -h, side="left")  # first edge with h ≥ edge
    return edges, np.bincount(first, minlength=nbins).astype(float)


def momentum_map(h, lr, mu):
    """3×3 map of (E[θ²], E[θv], E[v²]) per bin and its noise direction (per unit c/B)."""
    a = 1.0 - lr * h
    m = np.zeros(h.shape + (3, 3))
    m[:, 0] = np.stack([a * a, -2 * a * lr * mu, np.full_like(h, (lr * mu) ** 2)], -1)
    m[:, 1] = np.stack([a * h, a * mu - lr * mu * h, np.full_like(h, -lr * mu * mu)], -1)
    m[:, 2] = np.stack([h * h, 2 * h * mu, np.full_like(h, mu * mu)], -1)
    return m, np.array([lr * lr, -lr, 1.0]), 0


def ema_map(h, lr, beta):
    """3×3 map of (E[θ²], E[θθ̄], E[θ̄²]) per bin (SGD with an EMA of the iterates)."""
    a = 1.0 - lr * h
    m = np.zeros(h.shape + (3, 3))
    m[:, 0, 0] = a * a
    m[:, 1] = np.stack([(1 - beta) * a * a, beta * a, np.zeros_like(h)], -1)
    m[:, 2] = np.stack([(1 - beta) ** 2 * a * a, 2 * beta * (1 - beta) * a,
                        np.full_like(h, beta * beta)], -1)
    return m, lr * lr * np.array([1.0, 1 - beta, (1 - beta) ** 2]), 2


def _decompose(m, noise):
    ev, vec = np.linalg.eig(m)
    inv = np.linalg.inv(vec)
    return ev, vec, np.einsum("nij,nj->ni", inv, noise) / (1 - ev), inv


def binned_steps(h, counts, lr, other, batch, target, *, ema=False, hoist=True,
                 high=10**7):
    """Steps to ``target`` for one (lr, μ or β, B) by the binned eigen-method and bisection."""
    m, direction, idx = (ema_map if ema else momentum_map)(h, lr, other)
    noise = (h / batch)[:, None] * direction  # c = h
    s0 = np.zeros((h.size, 3))
    s0[:, 0] = 1.0
    if ema:
        s0[:] = 1.0
    parts = _decompose(m, noise) if hoist else None

    def loss(k):
        ev, vec, star, inv = parts if hoist else _decompose(m, noise)
        c0 = np.einsum("nij,nj->ni", inv, s0) - star
        s = np.einsum("nij,nj->ni", vec, ev**k * c0 + star).real
        return 0.5 * np.sum(h * s[:, idx] * counts)

    low = 0
    with np.errstate(all="ignore"):
        while low < high - 1:
            mid = (low + high) // 2
            if loss(mid) < target:
                high = mid
            else:
                low = mid
    return high if high < 10**7 else np.inf
