"""theory.py against brute force: enumeration of every batch, Monte Carlo, eigenvalues."""

import itertools

import numpy as np
import pytest
from scipy import optimize

from sgdtheory import theory


def finite_sum_quadratic(n=5, p=3, seed=0):
    """ℓ_i(θ) = ½(θ − θ_i)ᵀ H (θ − θ_i), with a random SPD H and centres θ_i."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(p, p))
    h = a @ a.T / p + 0.2 * np.eye(p)
    centres = rng.normal(size=(n, p))
    theta = rng.normal(size=p) + 1.0
    return h, centres, theta


def mean_loss(theta, h, centres):
    d = theta - centres
    return 0.5 * np.mean(np.einsum("ni,ij,nj->n", d, h, d))


def explicit_stats(h, centres, theta):
    """|G|², GᵀHG, tr(Σ), tr(HΣ) from an explicit loop over examples (1/N normalisation)."""
    grads = [h @ (theta - c) for c in centres]
    g = sum(grads) / len(grads)
    sigma = sum(np.outer(gi - g, gi - g) for gi in grads) / len(grads)
    return g, sigma, g @ g, g @ h @ g, np.trace(sigma), np.trace(h @ sigma)


def enumerated_loss_change(lr, batch, h, centres, theta, replace=True):
    """E[L(θ − ε G_B)] − L(θ), averaged over every possible batch."""
    n = len(centres)
    grads = (theta - centres) @ h
    batches = (itertools.product(range(n), repeat=batch) if replace
               else itertools.combinations(range(n), batch))
    changes = [mean_loss(theta - lr * grads[list(b)].mean(0), h, centres) for b in batches]
    return np.mean(changes) - mean_loss(theta, h, centres)


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("lr", [0.1, 0.7, 2.5])
def test_expected_loss_change_equals_enumeration_with_replacement(lr, batch):
    h, centres, theta = finite_sum_quadratic()
    _, _, grad_sq, g_h_g, _, tr_h_sigma = explicit_stats(h, centres, theta)
    predicted = theory.expected_loss_change(lr, batch, grad_sq, g_h_g, tr_h_sigma)
    exact = enumerated_loss_change(lr, batch, h, centres, theta, replace=True)
    assert predicted == pytest.approx(exact, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("batch", [1, 2, 4, 5])
def test_expected_loss_change_without_replacement(batch):
    h, centres, theta = finite_sum_quadratic(n=5)
    _, _, grad_sq, g_h_g, _, tr_h_sigma = explicit_stats(h, centres, theta)
    exact = enumerated_loss_change(0.4, batch, h, centres, theta, replace=False)
    predicted = theory.expected_loss_change(0.4, batch, grad_sq, g_h_g, tr_h_sigma, n_data=5)
    assert predicted == pytest.approx(exact, rel=1e-12, abs=1e-12)
    # the same through the effective batch size (infinite at B = N: no noise)
    b_eff = theory.effective_batch(batch, 5)
    alt = -0.4 * grad_sq + 0.5 * 0.4**2 * (g_h_g + tr_h_sigma / b_eff)
    assert alt == pytest.approx(exact, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_eps_opt_minimises_enumerated_loss(batch):
    h, centres, theta = finite_sum_quadratic(seed=3)
    g, sigma, grad_sq, g_h_g, tr_sigma, tr_h_sigma = explicit_stats(h, centres, theta)
    s = theory.quadratic_stats(h, sigma, g)
    best = optimize.minimize_scalar(
        lambda e: enumerated_loss_change(e, batch, h, centres, theta), bounds=(0, 10),
        method="bounded", options={"xatol": 1e-12})
    assert theory.eps_opt(batch, s.eps_max, s.b_noise) == pytest.approx(best.x, rel=1e-6)
    # the minimum value is −ΔL_opt(B)
    dl_opt = theory.delta_loss_opt(batch, theory.delta_loss_max(grad_sq, g_h_g), s.b_noise)
    assert -best.fun == pytest.approx(dl_opt, rel=1e-9)


def test_quadratic_stats_matches_explicit_loop():
    h, centres, theta = finite_sum_quadratic(n=7, p=4, seed=5)
    g, sigma, grad_sq, g_h_g, tr_sigma, tr_h_sigma = explicit_stats(h, centres, theta)
    s = theory.quadratic_stats(h, sigma, g)
    assert s.grad_sq == pytest.approx(grad_sq, rel=1e-13)
    assert s.g_h_g == pytest.approx(g_h_g, rel=1e-13)
    assert s.tr_sigma == pytest.approx(tr_sigma, rel=1e-13)
    assert s.tr_h_sigma == pytest.approx(tr_h_sigma, rel=1e-13)
    assert s.eps_max == pytest.approx(theory.eps_max(grad_sq, g_h_g), rel=1e-13)
    assert s.b_noise == pytest.approx(theory.b_noise(tr_h_sigma, g_h_g), rel=1e-13)
    assert s.b_simple == pytest.approx(theory.b_simple(tr_sigma, grad_sq), rel=1e-13)
    # diagonal inputs give the same as the dense diagonal matrices
    hd, sd = np.diag(h).copy(), np.diag(sigma).copy()
    dense = theory.quadratic_stats(np.diag(hd), np.diag(sd), g)
    diag = theory.quadratic_stats(hd, sd, g)
    assert diag == dense
    mixed = theory.quadratic_stats(hd, sigma, g)
    assert mixed.tr_h_sigma == pytest.approx(hd @ np.diag(sigma), rel=1e-13)


def test_expected_loss_change_monte_carlo_gaussian_noise():
    """Gaussian per-example noise: simulated mean ΔL within 3 standard errors of theory."""
    rng = np.random.default_rng(1)
    p, batch, lr, n = 6, 4, 0.3, 200_000
    h = np.diag(np.linspace(0.2, 2.0, p))
    a = rng.normal(size=(p, p))
    sigma = a @ a.T / p
    theta = rng.normal(size=p)
    g = h @ theta
    chol = np.linalg.cholesky(sigma)
    noise = rng.normal(size=(n, batch, p)) @ chol.T
    step = theta - lr * (g + noise.mean(axis=1))
    dl = 0.5 * np.einsum("ni,ij,nj->n", step, h, step) - 0.5 * theta @ h @ theta
    s = theory.quadratic_stats(h, sigma, g)
    predicted = theory.expected_loss_change(lr, batch, s.grad_sq, s.g_h_g, s.tr_h_sigma)
    assert abs(dl.mean() - predicted) < 3 * dl.std(ddof=1) / np.sqrt(n)
    # E|G_B − G|² / |G|² = B_simple / B
    ratio = np.sum(noise.mean(axis=1) ** 2, axis=1) / s.grad_sq
    assert abs(ratio.mean() - s.b_simple / batch) < 3 * ratio.std(ddof=1) / np.sqrt(n)


def test_divergence_beyond_twice_eps_opt():
    h, centres, theta = finite_sum_quadratic(seed=7)
    g, sigma, *_ = explicit_stats(h, centres, theta)
    s = theory.quadratic_stats(h, sigma, g)
    for batch in (1, 2):
        e2 = 2 * s.eps_opt(batch)
        assert enumerated_loss_change(0.999 * e2, batch, h, centres, theta) < 0
        assert enumerated_loss_change(1.001 * e2, batch, h, centres, theta) > 0


def brute_force_linreg_limit(lam, batch):
    def radius(lr):
        return np.max(np.abs(np.linalg.eigvals(theory.linreg_moment_matrix(lam, lr, batch))))
    lo, hi = 1e-9, 2.0 / lam.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if radius(mid) < 1 else (lo, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("batch", [1, 3, 10, 100, 5000])
def test_linreg_stability_limit_vs_eigenvalue_bisection(batch):
    lam = 1.0 / np.arange(1, 31) ** 1.2
    predicted = theory.linreg_stability_limit(lam, batch)
    assert predicted == pytest.approx(brute_force_linreg_limit(lam, batch), rel=1e-9)


def test_linreg_stability_limit_shape_and_limits():
    lam = np.linspace(0.05, 1.0, 40)
    batches = np.array([1, 2, 4, 8, 1e6])
    eta_c = theory.linreg_stability_limit(lam, batches)
    assert eta_c.shape == batches.shape
    assert np.all(np.diff(eta_c) > 0)
    assert eta_c[-1] == pytest.approx(2.0 / lam.max(), rel=1e-4)
    assert eta_c[0] == pytest.approx(2.0 / lam.sum(), rel=0.1)  # ≈ 2B/tr(H) at B=1


def test_linreg_moment_matrix_one_step_monte_carlo():
    """E[e'_j²] after one SGD step from fixed e equals (A e² + (η²/B)σ²λ)_j."""
    rng = np.random.default_rng(2)
    lam = np.array([1.0, 0.5, 0.1])
    e = np.array([0.7, -1.0, 2.0])
    lr, batch, noise_var, n = 0.4, 3, 0.25, 400_000
    x = rng.normal(size=(n, batch, 3)) * np.sqrt(lam)
    eps = rng.normal(size=(n, batch)) * np.sqrt(noise_var)
    resid = x @ e - eps  # prediction minus label, with y = w*·x + ε
    grad = np.einsum("nb,nbj->nj", resid, x) / batch
    e_new_sq = (e - lr * grad) ** 2
    predicted = theory.linreg_moment_matrix(lam, lr, batch) @ e**2 + lr**2 / batch * noise_var * lam
    se = e_new_sq.std(axis=0, ddof=1) / np.sqrt(n)
    assert np.all(np.abs(e_new_sq.mean(0) - predicted) < 3 * se)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_gd_stability_limit_heavy_ball(momentum):
    lam = 3.0
    limit = theory.gd_stability_limit(lam, momentum)
    for factor, grows in ((0.98, False), (1.02, True)):
        theta, v = 1.0, 0.0
        for _ in range(3000):
            v = momentum * v + lam * theta
            theta = theta - factor * limit * v
        assert (abs(theta) > 1.0) is grows


def test_units_helpers():
    assert theory.lr_from_base(theory.base_lr(0.8, 256), 256) == pytest.approx(0.8)
    assert theory.temperature(0.1, 10, 0.9) == pytest.approx(
        theory.base_lr(theory.effective_lr(0.1, 0.9), 10))
    assert theory.smith_le_noise_scale(0.1, 10, 1000) == pytest.approx(10.0)
    np.testing.assert_allclose(theory.scaled_lr(0.1, 32, np.array([32, 64, 128])),
                               [0.1, 0.2, 0.4])
    assert theory.critical_batch(10.0, 640.0) == 64.0


def test_arrays_broadcast():
    batches = np.array([[1.0], [10.0], [100.0]])
    out = theory.eps_opt(batches, np.array([1.0, 2.0]), 10.0)
    assert out.shape == (3, 2)
    np.testing.assert_allclose(out[:, 1], 2.0 / (1 + 10.0 / batches[:, 0]))


def test_torch_arrays_pass_through():
    torch = pytest.importorskip("torch")
    out = theory.eps_opt(torch.tensor([1.0, 10.0], dtype=torch.float64), 1.0, 10.0)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), [1 / 11, 0.5])


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: theory.eps_opt(0, 1.0, 1.0), "batch"),
        (lambda: theory.eps_opt(-4, 1.0, 1.0), "batch"),
        (lambda: theory.eps_opt(4, float("nan"), 1.0), "eps_max"),
        (lambda: theory.eps_max(1.0, 0.0), "g_h_g"),
        (lambda: theory.b_simple(-1.0, 1.0), "tr_sigma"),
        (lambda: theory.expected_loss_change(-0.1, 1, 1, 1, 1), "lr"),
        (lambda: theory.expected_loss_change(0.1, 1, float("inf"), 1, 1), "grad_sq"),
        (lambda: theory.expected_loss_change(0.1, 10, 1, 1, 1, n_data=5), "batch"),
        (lambda: theory.quadratic_stats(np.eye(2), np.eye(3), np.ones(2)), "sigma"),
        (lambda: theory.quadratic_stats([[1, 2], [0, 1]], np.eye(2), np.ones(2)), "hessian"),
        (lambda: theory.quadratic_stats(np.eye(2), [[1, 0], [0, -1]], np.ones(2)), "sigma"),
        (lambda: theory.quadratic_stats(np.eye(2), np.eye(2), np.ones((2, 2))), "grad"),
        (lambda: theory.fit_steps_examples([1, 2], [1, 2, 3]), "steps"),
        (lambda: theory.fit_steps_examples([1], [1]), "two"),
        (lambda: theory.temperature(0.1, 10, 1.0), "momentum"),
        (lambda: theory.scaled_lr(0.1, 1, 2, rule="cubic"), "rule"),
        (lambda: theory.linreg_stability_limit([-1.0, 1.0], 1), "eigenvalues"),
        (lambda: theory.effective_batch(10, 5), "batch"),
        (lambda: theory.eps_opt("abc", 1.0, 1.0), "batch"),
        (lambda: theory.fit_steps_examples([10.0, 10.0], [100.0, 100.0]), "different batch"),
        (lambda: theory.expected_loss_change(0.1, 1, 1, 1, 1, n_data=1), "n_data"),
        (lambda: theory.effective_batch(0.5, 0.7), "n_data"),
        (lambda: theory.linreg_moment_matrix([1.0], [0.1, 0.2], 1), "lr"),
    ],
)
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_quadratic_stats_without_curvature_along_g():
    """GᵀHG ≤ 0: no optimal step (ε_max = ε_opt = inf); G = 0: nothing to gain (ΔL_max = 0)."""
    s = theory.quadratic_stats([1.0, -2.0], [1.0, 1.0], [0.1, 1.0])
    assert s.g_h_g < 0 and s.eps_max == np.inf and s.eps_opt(10) == np.inf
    assert s.delta_loss_max == np.inf
    assert theory.quadratic_stats([1.0, 2.0], [1.0, 1.0], [0.0, 0.0]).delta_loss_max == 0.0
