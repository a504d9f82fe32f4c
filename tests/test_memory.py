"""The derived memory curve of sgdtheory.memory against brute-force expectations.

Two independent references, both written here:
* exact expectations by Gauss–Hermite quadrature over every Gaussian variable of a few SGD
  steps (the losses are polynomials of low degree, so the quadrature is exact);
* a vectorised Monte Carlo of one-pass SGD (explicit loop over steps), |mean − Δ_k| ≤ 3 s.e.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sgdtheory import memory, theory


def _sgd_step(e, x, xi, lr, batch):
    """One explicit SGD step on ½(xᵀe − ξ)² averaged over the batch: e ← e − (η/B) Σ x r."""
    r = np.einsum("nbd,nd->nb", x, e) - xi
    return e - lr / batch * np.einsum("nbd,nb->nd", x, r)


def _quadrature_gaps(lam, lr, batch, noise_var, e0, n_batches):
    """Exact E[seen − fresh] for k = 1..n_batches by tensor Gauss–Hermite quadrature."""
    d = lam.size
    zx, wx = np.polynomial.hermite_e.hermegauss(4)  # exact to degree 7 per variable
    n_xi_points = 3 if noise_var > 0 else 1  # no label noise: ξ ≡ 0
    zi, wi = np.polynomial.hermite_e.hermegauss(n_xi_points)
    wx, wi = wx / wx.sum(), wi / wi.sum()
    n_x, n_xi = n_batches * batch * d, n_batches * batch
    gx = np.array(list(itertools.product(range(4), repeat=n_x)))
    gi = np.array(list(itertools.product(range(n_xi_points), repeat=n_xi)))
    zx_all = np.repeat(zx[gx], len(gi), axis=0)
    zi_all = np.tile(zi[gi], (len(gx), 1)) * np.sqrt(noise_var)
    weight = np.repeat(np.prod(wx[gx], axis=1), len(gi)) * np.tile(np.prod(wi[gi], axis=1),
                                                                  len(gx))
    xs = [zx_all[:, i * batch * d:(i + 1) * batch * d].reshape(-1, batch, d) * np.sqrt(lam)
          for i in range(n_batches)]
    xis = [zi_all[:, i * batch:(i + 1) * batch] for i in range(n_batches)]
    e = np.broadcast_to(e0, (len(weight), d))
    e = _sgd_step(e, xs[0], xis[0], lr, batch)
    gaps = []
    for k in range(1, n_batches + 1):
        seen = (0.5 * (np.einsum("nbd,nd->nb", xs[0], e) - xis[0]) ** 2).mean(axis=1)
        fresh = 0.5 * (e**2 @ lam + noise_var)  # exact population loss at e
        gaps.append(weight @ (seen - fresh))
        if k < n_batches:
            e = _sgd_step(e, xs[k], xis[k], lr, batch)
    return np.array(gaps)


@pytest.mark.parametrize(("batch", "noise_var", "n_batches"), [(1, 0.8, 3), (2, 0.0, 2)])
def test_memory_gap_equals_exact_quadrature(batch, noise_var, n_batches):
    lam = np.array([1.0, 0.4])
    e0 = np.array([0.6, -0.9])  # a fixed start: only E[e_j²] = e0_j² may matter
    expected = _quadrature_gaps(lam, 0.3, batch, noise_var, e0, n_batches)
    got = memory.memory_gap(lam, 0.3, batch, np.arange(1, n_batches + 1), noise_var=noise_var,
                            moments=e0**2)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-13)


def test_memory_gap_matches_monte_carlo_within_3_stderr():
    rng = np.random.default_rng(1)
    lam = np.array([1.0, 0.5, 0.2, 0.1])
    lr, batch, noise_var, reps, lags = 0.25, 2, 1.0, 60_000, 12
    m0 = memory.stationary_moments(lam, lr, batch, noise_var=noise_var)
    e = rng.normal(size=(reps, lam.size)) * np.sqrt(m0)
    x0 = rng.normal(size=(reps, batch, lam.size)) * np.sqrt(lam)
    xi0 = rng.normal(size=(reps, batch)) * np.sqrt(noise_var)
    e = _sgd_step(e, x0, xi0, lr, batch)
    gaps = np.empty((lags, reps))
    for k in range(lags):
        seen = (0.5 * (np.einsum("nbd,nd->nb", x0, e) - xi0) ** 2).mean(axis=1)
        x_f = rng.normal(size=(reps, lam.size)) * np.sqrt(lam)  # a fresh example
        fresh = 0.5 * (np.einsum("nd,nd->n", x_f, e) - rng.normal(size=reps)
                       * np.sqrt(noise_var)) ** 2
        gaps[k] = seen - fresh
        x = rng.normal(size=(reps, batch, lam.size)) * np.sqrt(lam)
        xi = rng.normal(size=(reps, batch)) * np.sqrt(noise_var)
        e = _sgd_step(e, x, xi, lr, batch)
    mean, se = gaps.mean(axis=1), gaps.std(axis=1, ddof=1) / np.sqrt(reps)
    derived = memory.memory_gap(lam, lr, batch, np.arange(1, lags + 1), noise_var=noise_var)
    assert np.all(np.abs(mean - derived) <= 3 * se), (mean, derived, se)
    assert derived[0] < -10 * se[0]  # the effect is resolved, not zero


def test_stationary_moments_are_a_fixed_point_and_gap_vanishes():
    lam = np.array([2.0, 1.0, 0.1])
    m = memory.stationary_moments(lam, 0.2, 4, noise_var=0.5)
    a = theory.linreg_moment_matrix(lam, 0.2, 4)
    np.testing.assert_allclose(a @ m + (0.2**2 / 4) * 0.5 * lam, m, rtol=1e-12)
    gap = memory.memory_gap(lam, 0.2, 4, [1, 5, 50, 5000], noise_var=0.5)
    assert gap[0] < gap[1] < gap[2] < 0 and abs(gap[3]) < 1e-12


def test_memory_curve_fresh_term_follows_the_moment_recursion():
    lam = np.array([1.0, 0.3])
    m0 = np.array([0.5, 2.0])
    lr, batch, s2 = 0.1, 3, 0.2
    seen, fresh = memory.memory_curve(lam, lr, batch, [1, 2, 3], noise_var=s2, moments=m0)
    a = theory.linreg_moment_matrix(lam, lr, batch)
    m = m0.copy()
    for i in range(3):
        m = a @ m + (lr**2 / batch) * s2 * lam
        assert fresh[i] == pytest.approx(0.5 * (lam @ m + s2), rel=1e-12)
    gap = memory.memory_gap(lam, lr, batch, [1, 2, 3], noise_var=s2, moments=m0)
    np.testing.assert_allclose(seen - fresh, gap, rtol=1e-10, atol=1e-15)


def test_forgetting_horizon_and_limit():
    assert memory.forgetting_horizon(0.01, 0.5) == pytest.approx(200.0)
    assert memory.forgetting_limit(200, 0.5) == pytest.approx(0.01)
    # the horizon at the limit is the dataset size
    assert memory.forgetting_horizon(memory.forgetting_limit(300, 0.2), 0.2) == pytest.approx(300)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": -0.1}, "lr"), ({"batch": 0}, "batch"), ({"batch": 1.5}, "batch"),
    ({"lags": 0}, "lags"), ({"noise_var": -1.0}, "noise_var"), ({"lr": 5.0}, "curvature"),
    ({"eigenvalues": [[1.0]]}, "eigenvalues"), ({"moments": [1.0]}, "moments"),
    ({"lags": np.inf}, "lags"), ({"lr": [0.1, 0.2]}, "lr"), ({"batch": np.inf}, "batch"),
    ({"eigenvalues": ["a", "b"]}, "eigenvalues"),
    ({"lr": 5.0, "moments": [1.0, 1.0]}, "curvature"),  # as memory_curve: no state to remember
])
def test_bad_input_raises(kwargs, match):
    args = {"eigenvalues": [1.0, 0.5], "lr": 0.1, "batch": 2, "lags": [1, 2],
            "noise_var": 1.0, "moments": None} | kwargs
    with pytest.raises(ValueError, match=match):
        memory.memory_gap(args["eigenvalues"], args["lr"], args["batch"], args["lags"],
                          noise_var=args["noise_var"], moments=args["moments"])
