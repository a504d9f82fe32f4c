"""sgdtheory.krylov against dense linear algebra (numpy.linalg.eigvalsh, exact traces)."""

import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from sgdtheory import krylov


def random_psd(p, seed, spread=False):
    """A random PSD matrix: Wishart, or Q diag(λ) Qᵀ with well separated top eigenvalues."""
    rng = np.random.default_rng(seed)
    if not spread:
        a = rng.normal(size=(p, p + 5))
        return a @ a.T / p
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    lam = np.sort(rng.uniform(0.0, 1.0, size=p))[::-1] * 0.6 ** np.arange(p) ** 0.5
    return (q * lam) @ q.T


def matvec_of(a, backend):
    if backend == "torch":
        at = torch.tensor(a, dtype=torch.float64)
        return (lambda v: at @ v), at[0]
    return (lambda v: a @ v), None


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("p, k", [(6, 1), (40, 1), (40, 3), (120, 2)])
def test_lanczos_top_eigenvalues_match_eigvalsh(backend, p, k):
    for seed in range(3):
        a = random_psd(p, seed)
        exact = np.linalg.eigvalsh(a)[::-1][:k]
        mv, like = matvec_of(a, backend)
        got = krylov.top_eigenvalues(mv, p, k, seed=seed, like=like)
        assert isinstance(got, np.ndarray) and got.shape == (k,)
        np.testing.assert_allclose(got, exact, rtol=1e-8)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("p, k", [(6, 1), (40, 1), (40, 2)])
def test_power_iteration_matches_eigvalsh(backend, p, k):
    for seed in range(3):
        a = random_psd(p, seed, spread=True)
        exact = np.linalg.eigvalsh(a)[::-1][:k]
        mv, like = matvec_of(a, backend)
        got = krylov.top_eigenvalues(mv, p, k, method="power", seed=seed, like=like)
        np.testing.assert_allclose(got, exact, rtol=1e-8)


def test_generic_lanczos_restarts_and_indefinite_matrices():
    """The torch/CuPy Lanczos on NumPy input: a small basis forces thick restarts; an
    indefinite matrix gives the largest algebraic eigenvalues (not the largest in magnitude)."""
    rng = np.random.default_rng(3)
    p = 150
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    lam = np.concatenate([[4.0, 3.9, 3.0], rng.uniform(-5.0, 2.0, size=p - 3)])
    a = (q * lam) @ q.T
    exact = np.sort(lam)[::-1][:3]
    ops = krylov._Ops(None)
    got = krylov._lanczos_restarted(lambda v: a @ v, p, 3, ops, tol=1e-10, max_iter=20_000,
                                    seed=0, basis_size=12)
    np.testing.assert_allclose(got, exact, rtol=1e-8)
    at = torch.tensor(a)
    got_t = krylov.top_eigenvalues(lambda v: at @ v, p, 3, like=at[0], seed=1)
    np.testing.assert_allclose(got_t, exact, rtol=1e-8)
    # k >= dim - 1 uses the generic path for NumPy too; exact on a small matrix
    small = random_psd(5, 4)
    got_all = krylov.top_eigenvalues(lambda v: small @ v, 5, 5, seed=0)
    np.testing.assert_allclose(got_all, np.linalg.eigvalsh(small)[::-1], rtol=1e-10,
                               atol=1e-12)
    # a low-rank matrix: the Krylov space closes early (invariant subspace) and restarts
    low = np.outer(np.arange(1.0, 9.0), np.arange(1.0, 9.0))
    got_low = krylov.top_eigenvalues(lambda v: torch.tensor(low) @ v, 8, 2,
                                     like=torch.zeros(8, dtype=torch.float64), seed=0)
    np.testing.assert_allclose(got_low, [np.sum(np.arange(1.0, 9.0) ** 2), 0.0], atol=1e-9)


def test_not_converged_warns():
    a = random_psd(60, 5)
    with pytest.warns(krylov.KrylovConvergenceWarning):
        krylov.top_eigenvalues(lambda v: a @ v, 60, 1, method="power", max_iter=3, seed=0)
    with pytest.warns(krylov.KrylovConvergenceWarning):
        at = torch.tensor(a)
        krylov.top_eigenvalues(lambda v: at @ v, 60, 1, like=at[0], max_iter=5, tol=1e-14,
                               seed=0)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_max_iter_bounds_the_matvecs(method):
    """The torch path (own Lanczos) and power iteration never exceed max_iter matvecs."""
    at = torch.tensor(random_psd(60, 5))
    calls = []

    def mv(v):
        calls.append(1)
        return at @ v

    with pytest.warns(krylov.KrylovConvergenceWarning):
        krylov.top_eigenvalues(mv, 60, 1, like=at[0], method=method, max_iter=5, tol=1e-14,
                               seed=0)
    assert len(calls) <= 5


def test_hutchinson_within_interval_and_coverage():
    """Hutchinson's 95% interval (± 1.96 stderr) covers tr(A) 92–98% of 1,000 seeds."""
    rng = np.random.default_rng(6)
    p = 30
    a = rng.normal(size=(p, p))
    a = a + a.T + np.diag(rng.uniform(0, 3, size=p))
    tr = np.trace(a)
    est, se = krylov.hutchinson_trace(lambda v: a @ v, p, 50, seed=0)
    assert abs(est - tr) <= 3 * se
    # Rademacher: Var(zᵀAz) = 2 Σ_{i≠j} A_ij²
    var = 2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2))
    hits, ses = 0, []
    t_q = stats.t.ppf(0.975, 19)
    for seed in range(1000):
        e, s = krylov.hutchinson_trace(lambda v: a @ v, p, 20, seed=seed)
        hits += abs(e - tr) <= t_q * s
        ses.append(s)
    assert 0.92 <= hits / 1000 <= 0.98
    assert np.mean(np.square(ses)) * 20 == pytest.approx(var, rel=0.05)
    # Gaussian probes: Var = 2‖A‖_F²
    at = torch.tensor(a)
    e, s = krylov.hutchinson_trace(lambda v: at @ v, p, 400, seed=1, distribution="normal",
                                   like=at[0])
    assert abs(e - tr) <= 3 * s
    assert s**2 * 400 == pytest.approx(2 * np.sum(a**2), rel=0.2)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_hutch_plus_plus_beats_hutchinson_on_decaying_spectrum(backend):
    p = 200
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    lam = 100.0 * 0.8 ** np.arange(p)
    a = (q * lam) @ q.T
    mv, like = matvec_of(a, backend)
    tr = lam.sum()
    errs = {"hutchinson": [], "hutch++": []}
    for seed in range(20):
        for method in errs:
            e, _ = krylov.hutchinson_trace(mv, p, 30, seed=seed, like=like, method=method)
            errs[method].append(e - tr)
    for method, err in errs.items():  # unbiased
        assert abs(np.mean(err)) <= 3 * np.std(err, ddof=1) / np.sqrt(len(err)), method
    assert np.mean(np.abs(errs["hutch++"])) < 0.5 * np.mean(np.abs(errs["hutchinson"]))
    e, s = krylov.hutchinson_trace(mv, p, 90, seed=99, like=like, method="hutch++")
    assert abs(e - tr) <= 3 * s and s < 0.1 * tr
    # a matrix of rank below the sketch size is recovered exactly
    low = (q[:, :3] * [5.0, 2.0, 1.0]) @ q[:, :3].T
    mv, like = matvec_of(low, backend)
    e, s = krylov.hutchinson_trace(mv, p, 30, seed=0, like=like, method="hutch++")
    assert e == pytest.approx(8.0, rel=1e-10) and s < 1e-8


def test_spectral_density_quadrature_against_dense():
    p = 40
    a = random_psd(p, 8)
    lam = np.linalg.eigvalsh(a)
    # m = dim: the quadrature nodes are the eigenvalues
    sd = krylov.spectral_density(lambda v: a @ v, p, n_probes=2, n_steps=p, seed=0)
    np.testing.assert_allclose(np.sort(sd.nodes[0]), lam, rtol=1e-7, atol=1e-9)
    assert sd.weights.sum(1) == pytest.approx([1.0, 1.0], rel=1e-12)
    # m < dim: tr(A²) within 3 standard errors over probes
    at = torch.tensor(a)
    sd = krylov.spectral_density(lambda v: at @ v, p, n_probes=150, n_steps=6, seed=1,
                                 like=at[0])
    per_probe = p * (sd.weights * sd.nodes**2).sum(1)
    se = per_probe.std(ddof=1) / np.sqrt(len(per_probe))
    assert abs(sd.trace(lambda x: x**2) - np.sum(lam**2)) <= 3 * se
    grid = np.linspace(lam.min() - 1, lam.max() + 1, 4001)
    dens = sd.density(grid, width=0.05)
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("call, match", [
    (lambda: krylov.top_eigenvalues(lambda v: v, 0), "dim"),
    (lambda: krylov.top_eigenvalues(lambda v: v, 4, k=5), "k must"),
    (lambda: krylov.top_eigenvalues(lambda v: v, 4, method="qr"), "method"),
    (lambda: krylov.top_eigenvalues(lambda v: v, 4, tol=0.0), "tol"),
    (lambda: krylov.top_eigenvalues(lambda v: v[:2], 4), "length dim=4"),
    (lambda: krylov.top_eigenvalues(lambda v: v * np.nan, 4), "non-finite"),
    (lambda: krylov.top_eigenvalues(lambda v: torch.tensor(v), 4, method="power"), "like"),
    (lambda: krylov.hutchinson_trace(lambda v: v, 4, 1), "n_samples"),
    (lambda: krylov.hutchinson_trace(lambda v: v, 4, 3, method="hutch++"), ">= 4"),
    (lambda: krylov.hutchinson_trace(lambda v: v, 4, 5, distribution="cauchy"), "rademacher"),
    (lambda: krylov.spectral_density(lambda v: v, 4, n_probes=0), "n_probes"),
    (lambda: krylov.spectral_density(lambda v: v, 4, n_probes=None), "n_probes"),
    (lambda: krylov.top_eigenvalues(lambda v: v, None), "dim"),
    (lambda: krylov.hutchinson_trace(lambda v: v, 3, None), "n_samples"),
    (lambda: krylov.spectral_density(lambda v: v, 4).density([0.0], width=0), "width"),
])
def test_bad_input_raises_value_error(call, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", krylov.KrylovConvergenceWarning)
        with pytest.raises(ValueError, match=match):
            call()


def test_zero_matrix_has_top_eigenvalue_zero():
    """A v₀ = 0 stops ARPACK (error -9); the Lanczos fallback returns the exact 0."""
    for k in (1, 2):
        np.testing.assert_array_equal(krylov.top_eigenvalues(lambda v: 0 * v, 50, k=k),
                                      np.zeros(k))
