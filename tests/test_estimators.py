"""sgdtheory.estimators against brute force: enumeration of every batch, Monte Carlo on Gaussian
gradients with known G and Σ, explicit leave-one-out loops, SGD on quadratics."""

import itertools
import math

import numpy as np
import pytest
import torch

from sgdtheory import estimators as est
from sgdtheory import theory

# --------------------------------------------------------------------------- problems


def gaussian_problem(p=8, seed=0, g_scale=1.0):
    """A mean gradient G, a full covariance Σ = L Lᵀ and a PSD Hessian H (all explicit)."""
    rng = np.random.default_rng(seed)
    g = g_scale * rng.normal(size=p)
    chol = rng.normal(size=(p, p)) / np.sqrt(p)
    a = rng.normal(size=(p, p))
    h = a @ a.T / p + 0.1 * np.eye(p)
    return g, chol, chol @ chol.T, h


def draw_gradients(rng, shape, g, chol):
    """Gaussian per-example gradients G + L z, shape (*shape, p)."""
    return g + rng.normal(size=(*shape, len(g))) @ chol.T


def finite_dataset(n=6, p=3, seed=0):
    """Per-example gradients of ℓ_i = ½(θ − c_i)ᵀH(θ − c_i) at θ: g_i = H(θ − c_i)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(p, p))
    h = a @ a.T / p + 0.3 * np.eye(p)
    centres = rng.normal(size=(n, p))
    theta = rng.normal(size=p) + 0.7
    grads = (theta - centres) @ h
    return h, grads


def population_stats(grads):
    """G, Σ (1/N normalisation), explicit loops."""
    n = len(grads)
    g = sum(grads) / n
    sigma = sum(np.outer(x - g, x - g) for x in grads) / n
    return g, sigma


def within(mean, stderr, truth, k=3.0):
    return abs(mean - truth) <= k * stderr


# --------------------------------------------------------------------------- two_batch


def test_two_batch_unbiased_on_gaussian_gradients():
    g, chol, sigma, _ = gaussian_problem(p=10, seed=1)
    rng = np.random.default_rng(2)
    reps, bs, bb = 40_000, 4, 32
    # the mean of B Gaussian per-example gradients is N(G, Σ/B)
    small = draw_gradients(rng, (reps,), g, chol / np.sqrt(bs))
    big = draw_gradients(rng, (reps,), g, chol / np.sqrt(bb))
    gs, ts = est.two_batch((small**2).sum(1), (big**2).sum(1), bs, bb)
    assert gs.shape == (reps,)
    se = lambda x: x.std(ddof=1) / np.sqrt(reps)
    assert within(gs.mean(), se(gs), g @ g)
    assert within(ts.mean(), se(ts), np.trace(sigma))


def test_two_batch_exact_on_enumerated_batches_with_and_without_replacement():
    _, grads = finite_dataset(n=5, p=3, seed=3)
    g, sigma = population_stats(grads)
    n = len(grads)

    def mean_sq(batch, replace):
        combos = (itertools.product(range(n), repeat=batch) if replace
                  else itertools.combinations(range(n), batch))
        vals = [np.sum(np.mean(grads[list(c)], axis=0) ** 2) for c in combos]
        return float(np.mean(vals))

    gs, ts = est.two_batch(mean_sq(1, True), mean_sq(3, True), 1, 3)
    assert gs == pytest.approx(g @ g, rel=1e-12)
    assert ts == pytest.approx(np.trace(sigma), rel=1e-12)
    gs, ts = est.two_batch(mean_sq(2, False), mean_sq(4, False), 2, 4, n_data=n)
    assert gs == pytest.approx(g @ g, rel=1e-12)
    assert ts == pytest.approx(np.trace(sigma), rel=1e-12)
    # forgetting the finite-population correction is wrong (documents why n_data exists)
    gs_wrong, _ = est.two_batch(mean_sq(2, False), mean_sq(4, False), 2, 4)
    assert abs(gs_wrong - g @ g) > 1e-3 * (g @ g)
    # the full batch B = N has no noise: still exact
    gs, ts = est.two_batch(mean_sq(2, False), mean_sq(5, False), 2, 5, n_data=n)
    assert (gs, ts) == pytest.approx((g @ g, np.trace(sigma)), rel=1e-12)


def test_two_batch_stats_coverage_and_unbiasedness():
    """95% intervals of two_batch_stats cover |G|², tr(Σ) and B_simple 92–98% of the time."""
    g, chol, sigma, _ = gaussian_problem(p=12, seed=4)
    rng = np.random.default_rng(5)
    reps, m, bs, bb = 2000, 40, 8, 64
    small = draw_gradients(rng, (reps, m), g, chol / np.sqrt(bs))
    big = draw_gradients(rng, (reps, m), g, chol / np.sqrt(bb))
    r = est.two_batch_stats((small**2).sum(-1), (big**2).sum(-1), bs, bb)
    truth = {"grad_sq": g @ g, "tr_sigma": np.trace(sigma),
             "b_simple": np.trace(sigma) / (g @ g)}
    for name, value in truth.items():
        lo, hi = r.ci(name)
        cover = np.mean((lo <= value) & (value <= hi))
        assert 0.92 <= cover <= 0.98, (name, cover)
    # the per-replica standard errors agree with the spread across replicas
    assert np.std(r.grad_sq) == pytest.approx(np.mean(r.grad_sq_stderr), rel=0.1)
    assert np.std(r.tr_sigma) == pytest.approx(np.mean(r.tr_sigma_stderr), rel=0.1)
    assert within(np.mean(r.tr_sigma), np.std(r.tr_sigma) / np.sqrt(reps), np.trace(sigma))


# --------------------------------------------------------------------------- per_sample


def test_per_sample_matches_explicit_u_statistic_loops():
    rng = np.random.default_rng(6)
    grads = rng.normal(size=(7, 4)) + 0.5
    n = len(grads)
    pair_sum = sum(grads[i] @ grads[j] for i in range(n) for j in range(n) if i != j)
    tr_loop = sum(np.sum((gi - grads.mean(0)) ** 2) for gi in grads) / (n - 1)
    gs, ts = est.per_sample(grads)
    assert gs == pytest.approx(pair_sum / (n * (n - 1)), rel=1e-12)
    assert ts == pytest.approx(tr_loop, rel=1e-12)
    # stacked replicas on leading axes
    stack = rng.normal(size=(3, 2, 7, 4))
    gs_s, ts_s = est.per_sample(stack)
    assert gs_s.shape == ts_s.shape == (3, 2)
    assert gs_s[1, 0] == pytest.approx(est.per_sample(stack[1, 0])[0], rel=1e-12)


def test_per_sample_unbiased_on_gaussian_gradients():
    g, chol, sigma, _ = gaussian_problem(p=9, seed=7)
    rng = np.random.default_rng(8)
    reps, n = 20_000, 6
    gs, ts = est.per_sample(draw_gradients(rng, (reps, n), g, chol))
    se = lambda x: x.std(ddof=1) / np.sqrt(reps)
    assert within(gs.mean(), se(gs), g @ g)
    assert within(ts.mean(), se(ts), np.trace(sigma))


def test_per_sample_exact_without_replacement_by_enumeration():
    _, grads = finite_dataset(n=7, p=3, seed=9)
    g, sigma = population_stats(grads)
    n_data, n = len(grads), 3
    vals = np.array([est.per_sample(grads[list(c)], n_data=n_data)
                     for c in itertools.combinations(range(n_data), n)])
    assert vals.mean(0) == pytest.approx([g @ g, np.trace(sigma)], rel=1e-12)
    # on the whole dataset the estimate is the truth itself
    assert est.per_sample(grads, n_data=n_data) == pytest.approx((g @ g, np.trace(sigma)),
                                                                 rel=1e-12)


def test_per_sample_equals_theory_on_least_squares():
    """ℓ_i = ½(x_iᵀθ − y_i)²: per_sample on all N examples = quadratic_stats of (H, Σ, G)."""
    rng = np.random.default_rng(10)
    n, p = 50, 4
    x, y, theta = rng.normal(size=(n, p)), rng.normal(size=n), rng.normal(size=p)
    grads = (x @ theta - y)[:, None] * x
    hess = x.T @ x / n
    g, sigma = population_stats(grads)
    qs = theory.quadratic_stats(hess, sigma, g)
    gs, ts = est.per_sample(grads, n_data=n)
    assert (gs, ts) == pytest.approx((qs.grad_sq, qs.tr_sigma), rel=1e-10)
    # curvature: ĝᵀHĝ averaged exactly over all batches without replacement of sizes 2 and 3
    def mean_ghg(b):
        combos = list(itertools.combinations(range(8), b))
        return np.mean([grads[list(c)].mean(0) @ hess @ grads[list(c)].mean(0) for c in combos])

    g8, s8 = population_stats(grads[:8])
    qs8 = theory.quadratic_stats(hess, s8, g8)
    ghg, ths = est.two_batch_curvature(mean_ghg(2), mean_ghg(3), 2, 3, n_data=8)
    assert (ghg, ths) == pytest.approx((qs8.g_h_g, qs8.tr_h_sigma), rel=1e-10)
    e, b = est.curvature_scales(qs8.grad_sq, ghg, ths)
    assert (e, b) == pytest.approx((qs8.eps_max, qs8.b_noise), rel=1e-10)


def test_per_sample_stats_jackknife_matches_explicit_leave_one_out():
    rng = np.random.default_rng(11)
    grads = rng.normal(size=(9, 5)) + 0.3
    n = len(grads)
    loo = np.array([est.per_sample(np.delete(grads, i, axis=0)) for i in range(n)])
    dev = loo - loo.mean(0)
    cov = (n - 1) / n * dev.T @ dev
    r = est.per_sample_stats(grads)
    assert (r.grad_sq, r.tr_sigma) == pytest.approx(est.per_sample(grads), rel=1e-12)
    assert r.grad_sq_stderr == pytest.approx(np.sqrt(cov[0, 0]), rel=1e-9)
    assert r.tr_sigma_stderr == pytest.approx(np.sqrt(cov[1, 1]), rel=1e-9)
    assert r.cov == pytest.approx(cov[0, 1], rel=1e-9)
    b = r.tr_sigma / r.grad_sq
    delta = np.sqrt(cov[1, 1] - 2 * b * cov[0, 1] + b * b * cov[0, 0]) / r.grad_sq
    assert (r.b_simple, r.b_simple_stderr) == pytest.approx((b, delta), rel=1e-9)
    # finite population: same jackknife with the (1 − n/N) factor
    n_data = 30
    loo_w = np.array([est.per_sample(np.delete(grads, i, axis=0), n_data=n_data)
                      for i in range(n)])
    dev_w = loo_w - loo_w.mean(0)
    cov_w = (n - 1) / n * dev_w.T @ dev_w * (1 - n / n_data)
    r_w = est.per_sample_stats(grads, n_data=n_data)
    assert r_w.grad_sq_stderr == pytest.approx(np.sqrt(cov_w[0, 0]), rel=1e-9)
    assert r_w.tr_sigma_stderr == pytest.approx(np.sqrt(cov_w[1, 1]), rel=1e-9)


def test_per_sample_stats_coverage():
    """Jackknife 95% intervals cover the truth 92–98% of the time (2,000 replicas, n = 64)."""
    g, chol, sigma, _ = gaussian_problem(p=16, seed=12, g_scale=0.6)
    rng = np.random.default_rng(13)
    reps, n = 2000, 64
    r = est.per_sample_stats(draw_gradients(rng, (reps, n), g, chol))
    truth = {"grad_sq": g @ g, "tr_sigma": np.trace(sigma),
             "b_simple": np.trace(sigma) / (g @ g)}
    for name, value in truth.items():
        lo, hi = r.ci(name)
        cover = np.mean((lo <= value) & (value <= hi))
        assert 0.92 <= cover <= 0.98, (name, cover)
    for name in ("grad_sq", "tr_sigma"):
        vals = getattr(r, name)
        assert within(vals.mean(), vals.std() / np.sqrt(reps), truth[name])


# --------------------------------------------------------------------------- ratios and EMAs


def test_mean_of_per_step_ratios_is_biased_ratio_of_means_is_not():
    """E[tr/|G|²] ≠ E[tr]/E[|G|²]: averaging per-step B_simple estimates overshoots."""
    g, chol, sigma, _ = gaussian_problem(p=40, seed=14, g_scale=0.2)
    rng = np.random.default_rng(15)
    steps, bs, bb = 50_000, 16, 128
    small = draw_gradients(rng, (steps,), g, chol / np.sqrt(bs))
    big = draw_gradients(rng, (steps,), g, chol / np.sqrt(bb))
    gs, ts = est.two_batch((small**2).sum(1), (big**2).sum(1), bs, bb)
    truth = np.trace(sigma) / (g @ g)
    r = est.two_batch_stats((small**2).sum(1), (big**2).sum(1), bs, bb)
    assert within(r.b_simple, r.b_simple_stderr, truth)
    per_step = ts / gs
    assert np.all(gs > 0)  # the bias below is not from a few negative denominators
    bias = per_step.mean() - truth
    assert bias > 0.05 * truth  # measured: +8% (per-step |G|² has a 16% relative spread)
    assert bias > 10 * r.b_simple_stderr
    assert np.median(per_step) < truth - 10 * r.b_simple_stderr  # the median is biased too
    # the streaming estimate (separate EMAs, then the ratio) is unbiased too
    ema = est.NoiseScaleEMA(beta=0.9995)
    for a, b in zip(gs[-20_000:], ts[-20_000:], strict=True):
        ema.update(a, b)
    assert within(ema.b_simple, ema.b_simple_stderr, truth)
    assert ema.reliable and ema.n_updates == 20_000


def test_noise_scale_ema_matches_explicit_weighted_averages():
    rng = np.random.default_rng(16)
    beta, t = 0.9, 25
    gs, ts = rng.normal(1.0, 0.5, size=t), rng.normal(20.0, 4.0, size=t)
    ema = est.NoiseScaleEMA(beta=beta)
    for a, b in zip(gs, ts, strict=True):
        ema.update(np.float32(a) if a > 1 else a, torch.tensor(b, dtype=torch.float64))
    w = beta ** np.arange(t)[::-1]
    mean_g, mean_t = w @ gs / w.sum(), w @ ts / w.sum()
    assert ema.grad_sq == pytest.approx(mean_g, rel=1e-6)
    assert ema.tr_sigma == pytest.approx(mean_t, rel=1e-12)
    assert ema.b_simple == pytest.approx(mean_t / mean_g, rel=1e-6)
    # standard error: reliability-weighted variance times Σw²/(Σw)²
    v1, v2 = w.sum(), (w**2).sum()
    var_t = w @ (ts - mean_t) ** 2 / (v1 - v2 / v1)
    assert ema.tr_sigma_stderr == pytest.approx(np.sqrt(var_t * v2 / v1**2), rel=1e-9)
    assert ema.n_eff == pytest.approx(v1**2 / v2, rel=1e-12)
    lo, hi = ema.b_simple_ci()
    assert lo < ema.b_simple < hi


def test_noise_scale_ema_coverage_and_negative_steps_kept():
    """Noisy per-step estimates (often negative): the EMA ratio's 95% interval covers 92–98%."""
    rng = np.random.default_rng(17)
    reps, steps, beta = 1000, 80, 0.93
    true_g, true_t = 1.0, 40.0
    gs = true_g + 1.5 * rng.normal(size=(reps, steps))  # ~25% of single steps are negative
    ts = true_t + 10.0 * rng.normal(size=(reps, steps)) + 5.0 * (gs - true_g)
    assert np.mean(gs < 0) > 0.2
    covered_b = covered_g = 0
    for i in range(reps):
        ema = est.NoiseScaleEMA(beta=beta)
        for a, b in zip(gs[i], ts[i], strict=True):
            ema.update(a, b)
        lo, hi = ema.b_simple_ci()
        covered_b += lo <= true_t / true_g <= hi
        half = ema.grad_sq_stderr * 1.96
        covered_g += abs(ema.grad_sq - true_g) <= half
    assert 0.92 <= covered_b / reps <= 0.98, covered_b / reps
    assert 0.92 <= covered_g / reps <= 0.98, covered_g / reps


def test_noise_scale_ema_clamps_and_flags_unreliable():
    ema = est.NoiseScaleEMA(beta=0.9)
    assert math.isnan(ema.b_simple) and not ema.reliable
    ema.update(-0.5, 10.0)
    assert ema.b_simple == math.inf and not ema.reliable
    ema.update(0.6, -8.0)
    ema.update(0.1, -8.0)
    assert ema.tr_sigma < 0 and ema.b_simple == 0.0  # clamped at 0, averages keep the sign
    for _ in range(50):
        ema.update(1.0, 5.0)
    assert ema.reliable and ema.b_simple > 0


def test_curvature_two_batch_unbiased_with_independent_noisy_hessian():
    g, chol, sigma, h = gaussian_problem(p=8, seed=18)
    rng = np.random.default_rng(19)
    reps, bs, bb = 40_000, 4, 32
    small = draw_gradients(rng, (reps,), g, chol / np.sqrt(bs))
    big = draw_gradients(rng, (reps,), g, chol / np.sqrt(bb))
    noise = rng.normal(size=(2, reps, 8, 8)) * 0.3
    h_hat = h + 0.5 * (noise + noise.swapaxes(-1, -2))  # an independent unbiased Hessian
    ghg_s = np.einsum("ri,rij,rj->r", small, h_hat[0], small)
    ghg_b = np.einsum("ri,rij,rj->r", big, h_hat[1], big)
    qs = theory.quadratic_stats(h, sigma, g)
    ghg, ths = est.two_batch_curvature(ghg_s, ghg_b, bs, bb)
    se = lambda x: x.std(ddof=1) / np.sqrt(reps)
    assert within(ghg.mean(), se(ghg), qs.g_h_g)
    assert within(ths.mean(), se(ths), qs.tr_h_sigma)
    gs, _ = est.two_batch((small**2).sum(1), (big**2).sum(1), bs, bb)
    r = est.two_batch_curvature_stats(ghg_s, ghg_b, bs, bb, grad_sq=gs)
    assert within(r.b_noise, r.b_noise_stderr, qs.b_noise)
    assert within(r.eps_max, r.eps_max_stderr, qs.eps_max)
    # streaming version
    ema = est.CurvatureEMA(beta=0.9999)
    for a, b, c in zip(ghg[:5000], ths[:5000], gs[:5000], strict=True):
        ema.update(a, b, grad_sq=c)
    e = ema.estimate()
    assert within(e.b_noise, e.b_noise_stderr, qs.b_noise)
    assert within(e.eps_max, e.eps_max_stderr, qs.eps_max)
    assert ema.reliable and ema.b_noise == e.b_noise and ema.eps_max == e.eps_max
    lo, hi = e.ci("b_noise")
    assert lo < e.b_noise < hi


@pytest.mark.parametrize("name", ["linreg", "finite_sum"])
def test_two_batch_on_simulator_problems_matches_their_exact_stats(name):
    """sgdtheory.problems: online linear regression (multiplicative noise, Σ depends on θ) and a
    finite-sum quadratic sampled without replacement (n_data correction)."""
    from sgdtheory import problems

    if name == "linreg":
        prob = problems.LinearRegression(np.linspace(0.2, 1.0, 6), noise_std=0.5)
        theta, n_data = np.full(6, 0.7), None
    else:
        prob = problems.FiniteSumQuadratic.random(np.linspace(0.2, 1.0, 6), 40, 1.0, 0)
        theta, n_data = np.full(6, 0.3), prob.n_data
    reps, bs, bb = 20_000, 4, 16
    thetas = np.broadcast_to(theta, (reps, 6))
    small = prob.sample_grad(thetas, bs, 1)
    big = prob.sample_grad(thetas, bb, 2)
    h = np.diag(prob.hessian(theta)) if np.ndim(prob.hessian(theta)) == 1 else prob.hessian(
        theta)
    truth = prob.stats(theta)
    gs, ts = est.two_batch((small**2).sum(1), (big**2).sum(1), bs, bb, n_data=n_data)
    ghg, ths = est.two_batch_curvature(np.einsum("ri,ij,rj->r", small, h, small),
                                       np.einsum("ri,ij,rj->r", big, h, big), bs, bb,
                                       n_data=n_data)
    se = lambda x: x.std(ddof=1) / np.sqrt(reps)
    for value, target in ((gs, truth.grad_sq), (ts, truth.tr_sigma), (ghg, truth.g_h_g),
                          (ths, truth.tr_h_sigma)):
        assert within(value.mean(), se(value), target)


def test_curvature_scales_uses_theory_and_handles_nonpositive():
    assert est.curvature_scales(2.0, 4.0, 12.0) == (theory.eps_max(2.0, 4.0),
                                                     theory.b_noise(12.0, 4.0))
    e, b = est.curvature_scales(np.array([1.0, -0.1, 1.0]), np.array([2.0, 1.0, -1.0]),
                                np.array([-3.0, 3.0, 3.0]))
    assert list(e) == [0.5, 0.0, np.inf] and list(b) == [0.0, 3.0, np.inf]


# --------------------------------------------------------------------------- sequential variant


def test_sequential_variant_bias_on_moving_quadratic():
    """SGD on a diagonal quadratic (p = 20, h ∈ [0.1, 1], Σ = diag(h), B = 4, lr = 0.05,
    θ₀ = 3, window k = 8, 4000 replicas): the sequential-batch estimator is biased, the
    same-point two-batch estimator is not. Exact E|G_t|² from the moment recursion."""
    p, batch, lr, k, reps = 20, 4, 0.05, 8, 4000
    h = np.linspace(0.1, 1.0, p)
    c = h.copy()
    rng = np.random.default_rng(20)
    theta = np.full((reps, p), 3.0)
    second = np.full(p, 9.0)  # E[θ_i²], exact recursion s ← (1 − ηh)²s + η²c/B
    seq = [est.SequentialNoiseScale(k, batch, beta=0.9) for _ in range(3)]
    window, out = [], {}
    for t in range(251):
        grad = h * theta
        g = grad + rng.normal(size=(reps, p)) * np.sqrt(c / batch)
        g_big = grad + rng.normal(size=(reps, p)) * np.sqrt(c / (k * batch))
        window = [*window[-(k - 1):], g]
        if t in (25, 100, 150, 250):
            mean = sum(window) / k
            seq_est = est.two_batch((g**2).sum(1), (mean**2).sum(1), batch, k * batch)
            same = est.two_batch((g**2).sum(1), (g_big**2).sum(1), batch, k * batch)
            out[t] = (float((h**2 * second).sum()), seq_est, same)
        for i, s in enumerate(seq):  # the class on three replicas reproduces the formula
            r = s.update(g[i])
            if t == 250:
                assert r == pytest.approx((out[t][1][0][i], out[t][1][1][i]), rel=1e-9)
        theta = theta - lr * g
        second = (1 - lr * h) ** 2 * second + lr**2 * c / batch
    tr_true = c.sum()
    se = lambda x: x.std(ddof=1) / np.sqrt(reps)
    ratios = {}
    for t, (gs_true, (sg, st), (pg, pt)) in out.items():
        # unbiased same-point estimator
        assert within(pg.mean(), se(pg), gs_true) and within(pt.mean(), se(pt), tr_true)
        ratios[t] = (sg.mean() / gs_true, st.mean() / tr_true,
                     (st.mean() / sg.mean()) / (tr_true / gs_true))
    # moving phase (|G|² ≈ 4 tr(Σ)/B): the window's older, larger gradients hide the noise
    assert ratios[25][1] < 0.0 and ratios[25][0] > 1.2
    # B_simple over-estimated as the trajectory nears the noise floor, then |G|² < 0
    assert 1.05 < ratios[100][2] < 1.25
    assert ratios[150][2] > 2.0
    assert ratios[250][0] < -0.3
    for t in out:
        assert not within(out[t][1][0].mean(), se(out[t][1][0]), out[t][0], k=5.0)


# --------------------------------------------------------------------------- advisor


def test_advise_batch_size_against_steps_examples():
    b_noise, e_max, batch = 800.0, 0.4, 64
    a = est.advise_batch_size(b_noise, e_max, batch, lr=0.1, momentum=0.9, b_noise_stderr=50)
    assert a.recommended_batch == 800.0
    # S = S_min(1 + B_noise/B), E = E_min(1 + B/B_noise) with B_crit = E_min/S_min = B_noise
    s_now, e_now = theory.steps_examples(batch, 1.0, b_noise)
    s_rec, e_rec = theory.steps_examples(a.recommended_batch, 1.0, b_noise)
    assert a.step_speedup == pytest.approx(s_now / s_rec, rel=1e-12)
    assert a.example_cost == pytest.approx(e_rec / e_now, rel=1e-12)
    assert a.eps_opt_rec == pytest.approx(e_max / (1 + b_noise / 800.0), rel=1e-12)
    assert a.eps_opt_now == pytest.approx(e_max / (1 + b_noise / 64.0), rel=1e-12)
    text = str(a)
    assert "MEAN minibatch gradient" in text and "800 examples" in text
    assert f"{a.step_speedup:.3g}x fewer steps" in text
    # lr 0.1 with μ = 0.9 is the effective rate 1 = lr/(1 − μ), compared with ε_opt(64)
    assert f"{1.0 / a.eps_opt_now:.3g}x the best lr with momentum 0.9" in text
    # limits and rounding
    assert est.advise_batch_size(b_noise, e_max, 64, max_batch=512).recommended_batch == 512
    assert est.advise_batch_size(b_noise, e_max, 64, multiple_of=96).recommended_batch == 768
    small = est.advise_batch_size(10.0, e_max, 256)
    assert small.step_speedup < 1 and small.example_cost < 1
    assert "fewer examples" in str(small)


# --------------------------------------------------------------------------- backends


def test_torch_tensors_give_the_numpy_results():
    rng = np.random.default_rng(21)
    grads = rng.normal(size=(5, 12, 6)) + 0.2
    gt = torch.tensor(grads)
    gs_t, ts_t = est.per_sample(gt)
    assert isinstance(gs_t, torch.Tensor) and gs_t.shape == (5,)
    gs_n, ts_n = est.per_sample(grads)
    np.testing.assert_allclose(gs_t.numpy(), gs_n, rtol=1e-12)
    np.testing.assert_allclose(ts_t.numpy(), ts_n, rtol=1e-12)
    r_t, r_n = est.per_sample_stats(gt), est.per_sample_stats(grads)
    np.testing.assert_allclose(r_t.b_simple_stderr, r_n.b_simple_stderr, rtol=1e-10)
    a, b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(1.2, dtype=torch.float64)
    gs, ts = est.two_batch(a, b, 10, 100)
    assert isinstance(gs, torch.Tensor)
    assert (float(gs), float(ts)) == pytest.approx(est.two_batch(3.0, 1.2, 10, 100))
    ghg, ths = est.two_batch_curvature(a, b, 10, 100, n_data=1000)
    assert (float(ghg), float(ths)) == pytest.approx(
        est.two_batch_curvature(3.0, 1.2, 10, 100, n_data=1000))
    s = est.SequentialNoiseScale(3, 8)
    for row in torch.tensor(grads[0]):
        s.update(row)
    assert s.ema.n_updates == 10 and math.isfinite(s.tr_sigma)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_sequential_window_matches_explicit_mean_over_long_runs(backend):
    rng = np.random.default_rng(22)
    grads = rng.normal(size=(300, 5)) + 1.0
    k, batch = 2, 8
    s = est.SequentialNoiseScale(k, batch, beta=0.5)
    for t, row in enumerate(grads):  # 300 > 64·k: the running sum is refreshed
        r = s.update(torch.tensor(row) if backend == "torch" else row)
        if t < k - 1:
            assert r is None
            continue
        mean = grads[t - k + 1: t + 1].mean(0)
        expected = est.two_batch(row @ row, mean @ mean, batch, k * batch)
        assert r == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert s.ema.n_updates == 299 and s.b_simple == s.ema.b_simple


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, match", [
    (lambda: est.two_batch(1.0, 0.5, 10, 10), "b_small must be smaller than b_big"),
    (lambda: est.two_batch(1.0, 0.5, 20, 10), "b_small must be smaller"),
    (lambda: est.two_batch(1.0, 0.5, 0, 10), "b_small must be at least 1"),
    (lambda: est.two_batch(float("nan"), 0.5, 1, 10), "grad_sq_small must be finite"),
    (lambda: est.two_batch(1.0, -0.5, 1, 10), "grad_sq_big must be non-negative"),
    (lambda: est.two_batch(1.0, 0.5, 1, 10, n_data=5), "must not exceed n_data"),
    (lambda: est.two_batch(torch.tensor(float("inf")), 0.5, 1, 10), "must be finite"),
    (lambda: est.two_batch_curvature(1.0, np.inf, 1, 10), "ghg_big must be finite"),
    (lambda: est.two_batch_stats([1.0], [0.5], 1, 10), "at least two"),
    (lambda: est.per_sample(np.ones((1, 4))), "at least two"),
    (lambda: est.per_sample(np.ones(4)), r"shape \(\.\.\., n, p\)"),
    (lambda: est.per_sample(np.array([[1.0, np.nan], [0.0, 1.0]])), "grads must be finite"),
    (lambda: est.per_sample(np.ones((5, 2)), n_data=3), "n_data"),
    (lambda: est.per_sample_stats(np.ones((2, 4))), "at least three"),
    (lambda: est.NoiseScaleEMA(beta=1.0), "beta"),
    (lambda: est.NoiseScaleEMA().update(float("nan"), 1.0), "grad_sq must be finite"),
    (lambda: est.NoiseScaleEMA().update(1.0, np.ones(3)), "tr_sigma must be a real scalar"),
    (lambda: est.CurvatureEMA().update(1.0, 2.0, 3.0).update(1.0, 2.0), "every update"),
    (lambda: est.SequentialNoiseScale(1, 8), "window"),
    (lambda: est.SequentialNoiseScale(4, -1), "batch must be positive"),
    (lambda: est.SequentialNoiseScale(4, 2).update(np.ones((2, 2))), "1-D"),
    (lambda: est.advise_batch_size(-1.0, 1.0, 8), "b_noise must be positive"),
    (lambda: est.advise_batch_size(10.0, 1.0, 8, lr=0.0), "lr must be positive"),
    (lambda: est.advise_batch_size(10.0, 1.0, 8, min_batch=16, max_batch=8), "min_batch"),
    (lambda: est.advise_batch_size(10.0, 1.0, 8, momentum=1.0), "momentum"),
    (lambda: est.two_batch_stats([1.0, 2.0], [0.5, 0.6], 1, 10).ci("lr"), "name"),
    (lambda: est.per_sample_stats([[1.0, 2.0], [3.0, 4.0]]), "at least three"),  # a list
    (lambda: est.NoiseScaleEMA().update("1", 1.0), "grad_sq must be a real number"),
    (lambda: est.SequentialNoiseScale(None, 10), "window"),
    (lambda: est.advise_batch_size(10.0, 1.0, 8, b_noise_stderr=-1.0), "b_noise_stderr"),
    (lambda: est.advise_batch_size(1e3, 1.0, 8, min_batch=65, max_batch=100, multiple_of=64),
     "no multiple of 64"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_advise_batch_size_respects_multiple_of_within_limits():
    """The recommendation is a multiple of ``multiple_of`` inside [min_batch, max_batch],
    the one nearest B_noise (checked against a brute-force search over the multiples)."""
    for b_noise, lo, hi, step in [(1000, 1, 100, 64), (1000, 1, 1e5, 64), (30, 100, 1e4, 8),
                                  (3, 1, None, 1), (90, 10, 500, 32)]:
        rec = est.advise_batch_size(b_noise, 1.0, 8, min_batch=lo, max_batch=hi,
                                    multiple_of=step).recommended_batch
        top = 10**6 if hi is None else hi
        cands = [m * step for m in range(1, int(top // step) + 1) if lo <= m * step <= top]
        assert rec == min(cands, key=lambda c: (abs(c - b_noise), c))


def test_noise_scale_ema_is_a_ratio_ema_of_tr_sigma_over_grad_sq():
    """NoiseScaleEMA names RatioEMA's numerator tr Σ and denominator |G|², nothing more."""
    rng = np.random.default_rng(40)
    a, b = est.NoiseScaleEMA(beta=0.8), est.RatioEMA(beta=0.8)
    gs, ts = rng.normal(1.0, 0.3, size=30), rng.normal(10.0, 2.0, size=30)
    for g, t in zip(gs, ts, strict=True):
        a.update(g, t)
        b.update(t, g)
    for mine, generic in (("grad_sq", "denominator"), ("tr_sigma", "numerator"),
                          ("grad_sq_stderr", "denominator_stderr"),
                          ("tr_sigma_stderr", "numerator_stderr"), ("b_simple", "ratio"),
                          ("b_simple_stderr", "ratio_stderr"), ("reliable", "reliable"),
                          ("df", "df"), ("n_eff", "n_eff")):
        assert getattr(a, mine) == getattr(b, generic), mine
    assert a.b_simple_ci() == b.ratio_ci()
    w = 0.8 ** np.arange(30)[::-1]  # brute force: the weighted means, then their ratio
    assert a.b_simple == pytest.approx((w @ ts) / (w @ gs), rel=1e-12)


def test_advice_names_the_estimate_it_was_given_and_the_lr_to_set_with_momentum():
    """Issue 13, item 16: advice from B_simple says B_simple; momentum users get their lr."""
    b_simple, e_max, mu = 1000.0, 2.0, 0.9
    a = est.advise_batch_size(b_simple, e_max, 100, estimate="B_simple", momentum=mu)
    text = str(a)
    assert a.estimate == "B_simple"
    assert "B_simple" in text.splitlines()[0] and "B_noise ≈" not in text
    assert "B_noise" in str(est.advise_batch_size(b_simple, e_max, 100)).splitlines()[0]
    # heavy ball v ← μv + g, θ ← θ − lr·v: at a fixed point of v the step is lr·g/(1 − μ), so
    # lr = ε_opt·(1 − μ) takes the step ε_opt·g that plain SGD takes at its best rate
    assert a.lr_opt_rec == pytest.approx(a.eps_opt_rec * (1 - mu), rel=1e-12)
    assert a.lr_opt_now == pytest.approx(a.eps_opt_now * (1 - mu), rel=1e-12)
    assert f"set lr = eps_opt*(1-momentum) = {a.lr_opt_rec:.3g} at batch 1,000" in text
    # brute force: heavy ball at that lr on L = ½hθ² (a slow direction, lr·h ≪ (1 − μ)²)
    # decays at the rate of plain SGD at ε_opt, ln(1 − ε_opt·h) per step
    h, theta, v, lr, logs = 0.001, 1.0, 0.0, a.lr_opt_rec, []
    for _ in range(6000):
        v = mu * v + h * theta
        theta -= lr * v
        logs.append(np.log(abs(theta)))
    rate = (logs[-1] - logs[2999]) / 3000
    assert rate == pytest.approx(np.log1p(-a.eps_opt_rec * h), rel=0.02)
    with pytest.raises(ValueError, match="estimate"):
        est.advise_batch_size(b_simple, e_max, 100, estimate="noise")


def test_ratio_scalar_path_equals_the_array_path():
    """Floats take a pure-Python path through the delta-method ratio; it gives exactly the
    array path's numbers on every combination of signs, zeros, subnormals, huge values, inf
    and NaN."""
    import itertools
    import math

    from sgdtheory import estimators as est

    vals = [-np.inf, -2.0, 0.0, 5e-324, 0.5, 1e300, np.inf, np.nan]
    for combo in itertools.product(vals, repeat=5):
        r_s, se_s = est._ratio(*combo)  # scalars: the fast path
        r_a, se_a = est._ratio(*(np.array([v]) for v in combo))
        for x, y in ((r_s, r_a[0]), (se_s, se_a[0])):
            assert isinstance(x, float)
            assert x == y or (math.isnan(x) and math.isnan(y)), combo
