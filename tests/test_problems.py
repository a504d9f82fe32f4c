"""Problems: exact G, H, Σ against brute force; minibatch sampling statistics; one SGD step."""

import numpy as np
import pytest

from sgdtheory import problems as P
from sgdtheory import simulate, theory
from sgdtheory.backend import get_backend

RNG = np.random.default_rng(12345)


def _rot(p, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((p, p)))
    return q


def _problems():
    """One small instance of every model (diagonal and full-matrix variants)."""
    q = _rot(3, 0)
    h_full = q @ np.diag([2.0, 1.0, 0.3]) @ q.T
    c_full = q @ np.diag([0.5, 1.5, 1.0]) @ q.T
    return {
        "nqm_diag": P.NoisyQuadratic([2.0, 1.0, 0.3], [1.0, 0.5, 2.0], theta_star=[0.1, 0, -1]),
        "nqm_full": P.NoisyQuadratic(h_full, c_full, theta_star=[0.3, -0.2, 0.5]),
        "finite_quad": P.FiniteSumQuadratic.random(h_full, 12, spread=[1.0, 0.5, 2.0], seed=1),
        "linreg": P.LinearRegression([1.0, 0.5, 0.2], noise_std=0.7, w_star=[1.0, -1.0, 0.5]),
        "linreg_data": P.LinearRegressionData([1.0, 0.5, 0.2], n_data=15, n_test=7,
                                              noise_std=0.4, seed=3),
        "logistic": P.LogisticRegression.gaussian_mixture(20, 3, separation=1.5, l2=0.05,
                                                          n_test=9, seed=4),
    }


PROBLEMS = _problems()


def _fd_grad(f, theta, h=1e-5):
    g = np.zeros_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        g[i] = (f(theta + e) - f(theta - e)) / (2 * h)
    return g


def _per_example_grads(prob, theta):
    """Brute-force per-example gradients of a finite-data model, one example at a time."""
    out = []
    if isinstance(prob, P.FiniteSumQuadratic):
        for ci in prob.centers:
            out.append(_fd_grad(lambda t, ci=ci: 0.5 * (t - ci) @ prob.h @ (t - ci), theta))
    elif isinstance(prob, P.LinearRegressionData):
        for x, y in zip(prob.x, prob.y, strict=True):
            out.append(_fd_grad(lambda t, x=x, y=y: 0.5 * (x @ t - y) ** 2, theta))
    else:
        for x, y in zip(prob.x, prob.y, strict=True):
            out.append(_fd_grad(lambda t, x=x, y=y: np.log1p(np.exp(-y * x @ t))
                                + 0.5 * prob.l2 * t @ t, theta))
    return np.array(out)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_grad_and_hessian_match_finite_differences(name):
    prob = PROBLEMS[name]
    theta = RNG.standard_normal(prob.dim)
    np.testing.assert_allclose(prob.grad(theta), _fd_grad(prob.loss, theta), atol=1e-7)
    h = np.array([_fd_grad(lambda t, i=i: prob.grad(t)[i], theta) for i in range(prob.dim)])
    hess = prob.hessian(theta)
    hess = np.diag(hess) if np.ndim(hess) == 1 else hess
    np.testing.assert_allclose(hess, h, atol=1e-6)
    # batched parameters (..., p)
    thetas = RNG.standard_normal((2, 4, prob.dim))
    assert prob.loss(thetas).shape == (2, 4)
    np.testing.assert_allclose(prob.grad(thetas)[1, 2], prob.grad(thetas[1, 2]))


@pytest.mark.parametrize("name", ["finite_quad", "linreg_data", "logistic"])
def test_finite_data_sigma_is_per_example_covariance(name):
    prob = PROBLEMS[name]
    theta = RNG.standard_normal(prob.dim)
    g = _per_example_grads(prob, theta)
    np.testing.assert_allclose(g.mean(0), prob.grad(theta), atol=1e-7)
    sigma = (g - g.mean(0)).T @ (g - g.mean(0)) / len(g)  # 1/N normalisation
    np.testing.assert_allclose(prob.sigma(theta), sigma, atol=1e-7)


def test_online_linreg_sigma_matches_monte_carlo():
    prob = PROBLEMS["linreg"]
    theta = np.array([0.3, 0.2, -0.4])
    g = prob.sample_grad(np.broadcast_to(theta, (200_000, 3)), 1, 7)
    emp = np.cov(g.T)
    # standard error of each covariance entry ≈ sqrt(var(g_i g_j)/n)
    gc = g - g.mean(0)
    se = np.sqrt(np.var(gc[:, :, None] * gc[:, None, :], axis=0) / len(g))
    assert np.all(np.abs(emp - prob.sigma(theta)) <= 4 * se)
    np.testing.assert_allclose(g.mean(0), prob.grad(theta), atol=4 * g.std(0).max() / 447)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_stats_brute_force(name):
    prob = PROBLEMS[name]
    theta = RNG.standard_normal(prob.dim)
    g = prob.grad(theta)
    h = prob.hessian(theta)
    h = np.diag(h) if np.ndim(h) == 1 else h
    s = prob.sigma(theta)
    s = np.diag(s) if np.ndim(s) == 1 else s
    st = prob.stats(theta)
    np.testing.assert_allclose(
        [st.grad_sq, st.g_h_g, st.tr_sigma, st.tr_h_sigma],
        [g @ g, g @ h @ g, np.trace(s), np.trace(h @ s)], rtol=1e-10)
    assert st.b_noise == pytest.approx(np.trace(h @ s) / (g @ h @ g))
    assert st.b_simple == pytest.approx(np.trace(s) / (g @ g))


@pytest.mark.parametrize("be_name", ["numpy", "torch"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_kernel_matches_exact_methods(name, be_name):
    """The vectorised backend form gives the exact loss, test loss and statistics per row."""
    prob = PROBLEMS[name]
    be = get_backend(be_name)
    k = prob.kernel(be, "float64")
    thetas = RNG.standard_normal((4, prob.dim))
    t = be.asarray(thetas, dtype="float64")
    np.testing.assert_allclose(be.to_numpy(k.loss(t)), prob.loss(thetas), rtol=1e-10)
    tl = prob.test_loss(thetas)
    if tl is None:
        assert k.test_loss(t) is None
    else:
        np.testing.assert_allclose(be.to_numpy(k.test_loss(t)), tl, rtol=1e-10)
    st = {key: be.to_numpy(v) for key, v in k.stats(t).items()}
    for i, th in enumerate(thetas):
        ref = prob.stats(th)
        for key in ("grad_sq", "g_h_g", "tr_sigma", "tr_h_sigma"):
            assert st[key][i] == pytest.approx(getattr(ref, key), rel=1e-9, abs=1e-12)


def test_test_losses():
    d = PROBLEMS["linreg_data"]
    w = RNG.standard_normal(3)
    assert d.test_loss(w) == pytest.approx(0.5 * np.mean((d.x_test @ w - d.y_test) ** 2))
    pop = P.LinearRegressionData([1.0, 0.5], n_data=4, noise_std=0.5, seed=0)
    e = w[:2] - pop.w_star
    assert pop.test_loss(w[:2]) == pytest.approx(0.5 * (e @ (pop.lam * e) + 0.25))
    assert P.NoisyQuadratic([1.0], [1.0]).test_loss([0.0]) is None


@pytest.mark.parametrize("replace", [False, True])
def test_without_replacement_covariance(replace):
    """Cov(G_B) = (Σ/B)(N−B)/(N−1) without replacement, Σ/B with replacement."""
    prob = P.FiniteSumQuadratic.random(np.array([1.0, 2.0]), 10, seed=5)
    n_data, batch, n = 10, 4, 40_000
    theta = np.array([0.5, -0.5])
    g = prob.sample_grad(np.broadcast_to(theta, (n, 2)), batch, 11, replace=replace)
    dev = g - prob.grad(theta)
    sigma = prob.sigma(theta)
    factor = 1.0 if replace else (n_data - batch) / (n_data - 1)
    expected = sigma / batch * factor
    emp = dev.T @ dev / n
    se = np.sqrt(np.var(dev[:, :, None] * dev[:, None, :], axis=0) / n)
    assert np.all(np.abs(emp - expected) <= 3 * se)
    # and the two cases are told apart (factor 2/3): far more than 3 standard errors
    other = sigma / batch * (1.0 if not replace else (n_data - batch) / (n_data - 1))
    assert np.abs(np.trace(emp) - np.trace(other)) > 10 * np.sqrt(np.sum(se**2))


def test_epochs_visit_every_example_once():
    prob = P.LinearRegressionData([1.0], n_data=12, seed=0)
    k = prob.kernel(get_backend("numpy"), "float64")
    s = k.sampler(np.random.default_rng(0), 3)
    batches = [s.state.indices(4) for _ in range(6)]  # two epochs of three batches
    for e in range(2):
        seen = np.concatenate(batches[3 * e:3 * e + 3], axis=1)
        assert np.all(np.sort(seen, axis=1) == np.arange(12))
    assert not np.array_equal(np.concatenate(batches[:3], 1), np.concatenate(batches[3:], 1))


def test_nqm_minibatch_noise_is_sigma_over_b():
    q = _rot(2, 3)
    c = q @ np.diag([2.0, 0.5]) @ q.T
    prob = P.NoisyQuadratic([1.0, 1.0], c)
    n = 100_000
    g = prob.sample_grad(np.zeros((n, 2)), 5, 0)
    emp = g.T @ g / n
    se = np.sqrt(np.var(g[:, :, None] * g[:, None, :], axis=0) / n)
    assert np.all(np.abs(emp - c / 5) <= 3 * se)


# --------------------------------------------------------------------------- one SGD step


def _one_step(prob, theta, lrs, batch, n, seed, dtype="float64"):
    res = simulate.run(prob, lr=lrs, batch=batch, steps=1, replicas=n, seed=seed,
                       init=theta, record_steps=[0, 1], dtype=dtype, progress=False)
    tl = res.to_numpy().train_loss
    d = tl[..., 1] - tl[..., 0]
    return d.mean(-1), d.std(-1, ddof=1) / np.sqrt(n)


@pytest.mark.parametrize("name", ["nqm_diag", "nqm_full", "finite_quad", "linreg",
                                  "linreg_data"])
def test_one_step_loss_change_matches_theory(name):
    """E[L(θ − εG_B)] − L(θ) = −ε|G|² + ½ε²(GᵀHG + tr(HΣ)/B) (× (N−B)/(N−1) finite data)."""
    prob = PROBLEMS[name]
    theta = np.array([0.8, -0.6, 1.1])
    st = prob.stats(theta)
    batch = 3
    lrs = np.array([0.1, 0.5, 1.0, 2.0]) * st.eps_opt(batch)
    mean, se = _one_step(prob, theta, lrs, batch, 20_000, seed=1)
    theory_dl = theory.expected_loss_change(lrs, batch, st.grad_sq, st.g_h_g, st.tr_h_sigma,
                                            n_data=prob.n_data)
    assert np.all(np.abs(mean - theory_dl) <= 3 * se), (mean, theory_dl, se)


def test_one_step_logistic_close_for_small_steps():
    """Non-quadratic loss: the quadratic model is accurate to O(ε³); report the deviation."""
    prob = PROBLEMS["logistic"]
    theta = np.array([0.5, -0.3, 0.2])
    st = prob.stats(theta)
    batch = 4
    lrs = np.array([0.1, 0.3, 1.0, 3.0]) * st.eps_opt(batch)
    mean, se = _one_step(prob, theta, lrs, batch, 20_000, seed=2)
    pred = theory.expected_loss_change(lrs, batch, st.grad_sq, st.g_h_g, st.tr_h_sigma,
                                       n_data=prob.n_data)
    rel = np.abs(mean - pred) / np.abs(pred)
    print("logistic one-step relative deviation at ε/ε_opt = 0.1, 0.3, 1, 3:", rel.round(4))
    assert np.all(np.abs(mean - pred)[:2] <= 3 * se[:2])  # small ε: within Monte Carlo error
    assert rel[2] < 0.2  # at ε_opt the higher-order terms are a modest correction
    assert rel[3] > rel[1]  # and they grow with ε: the quadratic model is a local one
    assert np.all(np.sign(mean[:3]) == -1)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("make", "match"), [
    (lambda: P.NoisyQuadratic([], []), "h must not be empty"),
    (lambda: P.LogisticRegression(np.ones((3, 2)), [0, 1, 0], x_test=[[np.nan, 1.0]],
                                  y_test=[1]), "x_test must be finite"),
    (lambda: P.LogisticRegression(np.ones((3, 2)), [0, 1, 0], x_test=np.zeros((0, 2)),
                                  y_test=[]), "x_test must have shape"),
    (lambda: P.LinearRegression([1.0], noise_std=None), "noise_std"),
    (lambda: P.LinearRegressionData([1.0], n_data=None), "n_data"),
    (lambda: P.LinearRegressionData([1.0], 5, seed=-1), "seed"),
    (lambda: P.FiniteSumQuadratic.random([1.0], 2.5), "n_data"),
    (lambda: P.LogisticRegression.gaussian_mixture(2.7, 2), "n_data"),
    (lambda: P.NoisyQuadratic(["a"], [1.0]), "h must be real numbers"),
])
def test_constructors_reject_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="positive semi-definite"):
        P.NoisyQuadratic([[1.0, 2.0], [2.0, 1.0]], [1.0, 1.0])
    with pytest.raises(ValueError, match="h must be positive semi-definite"):
        P.NoisyQuadratic([1.0, -1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="symmetric"):
        P.NoisyQuadratic([[1.0, 0.5], [0.0, 1.0]], [1.0, 1.0])
    with pytest.raises(ValueError, match="c diagonal must have shape"):
        P.NoisyQuadratic([1.0, 1.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="theta must have shape"):
        P.NoisyQuadratic([1.0, 1.0], [1.0, 1.0]).loss([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="centers must have shape"):
        P.FiniteSumQuadratic([1.0, 1.0], np.zeros((3, 3)))
    with pytest.raises(ValueError, match="exceeds n_data"):
        PROBLEMS["linreg_data"].sample_grad(np.zeros(3), 16, 0)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        PROBLEMS["linreg"].sample_grad(np.zeros(3), 0, 0)
    with pytest.raises(ValueError, match="labels"):
        P.LogisticRegression(np.zeros((2, 1)), [1.0, 3.0])
    with pytest.raises(ValueError, match="noise_std"):
        P.LinearRegression([1.0], noise_std=-1.0)


@pytest.mark.parametrize("make", [
    lambda t0: P.NoisyQuadratic([1.0, 2.0], [1.0, 1.0], theta0=t0),
    lambda t0: P.FiniteSumQuadratic([1.0, 2.0], np.zeros((3, 2)), theta0=t0),
    lambda t0: P.LinearRegression([1.0, 2.0], theta0=t0),
    lambda t0: P.LinearRegressionData([1.0, 2.0], 5, theta0=t0),
    lambda t0: P.LogisticRegression(np.ones((3, 2)), [1, 0, 1], theta0=t0),
])
def test_every_problem_checks_its_start_the_same_way(make):
    """One shared validator: θ₀ of the wrong length or not finite, the same message."""
    np.testing.assert_array_equal(make([0.5, -1.0]).theta0, [0.5, -1.0])
    assert make([0.5, -1.0]).dim == 2
    with pytest.raises(ValueError, match=r"theta0 must have shape \(2,\)"):
        make([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="theta0 must be finite"):
        make([1.0, np.inf])


@pytest.mark.parametrize("make", [lambda lam: P.LinearRegression(lam),
                                  lambda lam: P.LinearRegressionData(lam, 4)])
def test_linear_regression_takes_a_spectrum(make):
    with pytest.raises(ValueError, match="lam must be the 1-D spectrum"):
        make(np.eye(2))
    with pytest.raises(ValueError, match="lam must be positive semi-definite"):
        make([1.0, -0.5])


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_softplus_and_sigmoid_against_direct_formulas(backend):
    """One softplus and one sigmoid for every backend: equal to log(1 + eᶻ) and 1/(1 + e⁻ᶻ)
    where those are finite, and without overflow for |z| = 800."""
    be = get_backend(backend)
    z = np.linspace(-30.0, 30.0, 121)
    sp = be.to_numpy(P._softplus(be.asarray(z)))
    sg = be.to_numpy(P._sigmoid(be.asarray(z)))
    np.testing.assert_allclose(sp, np.log1p(np.exp(z)), rtol=1e-13)
    # ½(1 + tanh(z/2)) is accurate in absolute terms (≈ 1e-16), not relative in the far tail
    np.testing.assert_allclose(sg, 1.0 / (1.0 + np.exp(-z)), rtol=1e-13, atol=1e-15)
    big = be.to_numpy(P._softplus(be.asarray([-800.0, 800.0])))
    np.testing.assert_allclose(big, [0.0, 800.0], atol=1e-300)
