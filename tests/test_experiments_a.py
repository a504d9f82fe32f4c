"""Experiments eps_opt_vs_batch, loss_change_vs_lr, steps_vs_examples,
noise_scale_during_training and nqm_optimizers: their helpers against brute force.

(The quick preset of every experiment, its checks and its figure run in
tests/test_figures_cli.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from sgdtheory import nqm, theory
from sgdtheory.backend import get_backend
from sgdtheory.experiments import (
    eps_opt_vs_batch,
    loss_change_vs_lr,
    noise_scale_during_training,
    nqm_optimizers,
    steps_vs_examples,
)
from sgdtheory.experiments._common import minibatch_grads
from sgdtheory.problems import Layout, LogisticRegression, NoisyQuadratic, _softplus

NUMPY = get_backend("numpy")


# --------------------------------------------------------------------------- shared helpers


def test_minibatch_grads_mean_and_covariance_match_sigma_over_b():
    """G_B from the helper: mean G and total variance tr(Σ)/B, within 3 s.e. (finite data)."""
    prob = LogisticRegression.gaussian_mixture(60, 3, seed=0)
    theta = np.array([0.3, -0.2, 0.1])
    batch, n = 5, 20_000
    g = minibatch_grads(prob, NUMPY, NUMPY.rng(1), theta, batch, n, max_elements=3_000)
    assert g.shape == (n, 3)
    # brute force: per-example gradients, explicit loop
    per_ex = np.array([-y * x / (1 + np.exp(y * x @ theta)) for x, y in zip(prob.x, prob.y,
                                                                        strict=True)])
    grad = per_ex.mean(0)
    sigma = (per_ex - grad).T @ (per_ex - grad) / len(per_ex)
    se = g.std(0, ddof=1) / np.sqrt(n)
    assert np.all(np.abs(g.mean(0) - grad) <= 3 * se)
    total = ((g - grad) ** 2).sum(1)
    assert abs(total.mean() - np.trace(sigma) / batch) <= 3 * total.std() / np.sqrt(n)


# --------------------------------------------------------------------------- eps_opt_vs_batch


def test_noise_for_b_noise_sets_the_noise_scale():
    h = eps_opt_vs_batch.spectrum(7, 2.0)
    theta = np.linspace(0.5, 1.5, 7)
    c = eps_opt_vs_batch.noise_for_b_noise(h, theta, 123.0)
    hess, sig, g = np.diag(h), np.diag(c), h * theta
    assert np.trace(hess @ sig) / (g @ hess @ g) == pytest.approx(123.0, rel=1e-12)


def test_line_search_finds_vertex_of_a_parabola():
    eps = np.geomspace(1e-3, 10.0, 301)
    for vertex in (0.0123, 0.5, 3.3):
        curve = 2.0 - 4.0 * vertex * eps + 2.0 * eps**2
        assert eps_opt_vs_batch.line_search(eps, curve) == pytest.approx(vertex, rel=1e-3)


def test_one_step_moments_equal_direct_loss_of_the_step():
    """The per-draw coefficients reproduce L(θ − εg) computed from the NQM loss directly."""
    h = np.array([1.0, 0.3, 0.05])
    c = np.array([0.5, 0.2, 0.1])
    theta = np.array([1.0, -2.0, 0.5])
    gen = NUMPY.rng(3)
    lin, quad = eps_opt_vs_batch._one_step_moments(NUMPY, gen, h, c, theta, 7.0, 5, chunk=2)
    gen = NUMPY.rng(3)  # same stream: rebuild the draws explicitly
    xi = np.concatenate([NUMPY.standard_normal(gen, (2, 3)), NUMPY.standard_normal(gen, (2, 3)),
                         NUMPY.standard_normal(gen, (1, 3))]) * np.sqrt(c / 7.0)
    grad = h * theta
    draws = np.concatenate([grad + xi, grad - xi])
    problem = NoisyQuadratic(h, c)
    for eps in (0.1, 0.7):
        direct = problem.loss(theta - eps * draws) - problem.loss(theta)
        assert np.allclose(-eps * lin + 0.5 * eps**2 * quad, direct, rtol=1e-12, atol=1e-12)


def test_eps_opt_measurement_is_unbiased_on_a_small_case():
    """Measured ε_opt over seeds scatters around the prediction within 3 s.e."""
    cfg = eps_opt_vs_batch.Config(dim=5, n_ratios=3, n_pairs=3000, n_groups=10, n_eps=401)
    rel = []
    for seed in range(6):
        d = eps_opt_vs_batch.compute(cfg, NUMPY, seed)
        rel.append((d["measured"] / d["predicted"] - 1).ravel())
    rel = np.array(rel)
    se = rel.std(0, ddof=1) / np.sqrt(rel.shape[0])
    assert np.all(np.abs(rel.mean(0)) <= 3 * se + 2e-3)  # 2e-3: line-search grid resolution


# --------------------------------------------------------------------------- loss_change_vs_lr


def test_zero_crossing_of_parabolas_and_no_crossing():
    eps = np.linspace(0.05, 4.0, 80)
    assert loss_change_vs_lr.zero_crossing(eps, 0.5 * eps**2 - 1.3 * eps) == pytest.approx(2.6)
    assert np.isnan(loss_change_vs_lr.zero_crossing(eps, -eps))


def test_quadratic_curves_match_explicit_per_draw_matrix():
    rng = np.random.default_rng(0)
    lin, quad = rng.normal(1.0, 0.2, 500), rng.normal(2.0, 0.5, 500)
    eps = np.linspace(0.1, 2.0, 7)
    mean, sem, groups = loss_change_vs_lr._quadratic_curves(eps, lin, quad, 5)
    per_draw = -np.outer(lin, eps) + 0.5 * np.outer(quad, eps**2)
    assert np.allclose(mean, per_draw.mean(0))
    assert np.allclose(sem, per_draw.std(0, ddof=1) / np.sqrt(500))
    assert np.allclose(groups[0], per_draw[:100].mean(0))


def test_logistic_softplus_loss_equals_problem_loss():
    prob = LogisticRegression.gaussian_mixture(50, 4, seed=2)
    theta = loss_change_vs_lr.logistic_point(prob, 0.5)
    assert np.linalg.norm(prob.grad(theta / 0.5)) < 1e-6  # θ/0.5 is the minimiser
    g = np.random.default_rng(1).normal(size=(6, 4))
    xy = prob.x * prob.y[:, None]
    eps = 0.8
    fast = _softplus(-(xy @ theta - eps * (g @ xy.T))).mean(1)
    assert np.allclose(fast, prob.loss(theta - eps * g), rtol=1e-12)


def test_nqm_crossing_is_at_two_eps_opt_for_a_small_run():
    cfg = loss_change_vs_lr.Config(dim=6, ratios=(0.5,), n_draws=20_000, n_x=81,
                                   logistic_n_data=50, logistic_dim=3, logistic_draws=50,
                                   logistic_n_x=9)
    d = loss_change_vs_lr.compute(cfg, NUMPY, 4)
    nq = d["nqm"]
    assert abs(nq["crossing"][0] - 2.0) <= 4 * nq["crossing_se"][0] + 0.01
    # the shown means are x² − 2x within 4 s.e. (normalised by ΔL_opt)
    x = nq["x"]
    assert np.all(np.abs(nq["mean"][0] - (x * x - 2 * x)) <= 4 * nq["sem"][0] + 1e-9)


# --------------------------------------------------------------------------- steps_vs_examples


def test_sgd_second_moments_match_explicit_recursion_and_nqm():
    h = np.array([1.0, 0.2, 0.05])
    c = np.array([0.3, 0.3, 0.1])
    lr, batch, steps = 0.7, 3.0, 25
    s = steps_vs_examples.sgd_second_moments(h, c, lr, batch, steps)
    ref = np.empty((steps + 1, 3))
    ref[0] = 1.0
    for t in range(steps):  # s(t+1) = (1 − ηh)² s(t) + η² c/B
        ref[t + 1] = (1 - lr * h) ** 2 * ref[t] + lr**2 * c / batch
    assert np.allclose(s, ref, rtol=1e-12)
    assert np.allclose(0.5 * s @ h, nqm.expected_loss(h, c, lr, batch, steps), rtol=1e-12)
    bn = steps_vs_examples.b_noise_along_run(h, c, lr, batch, steps)
    assert np.allclose(bn, (h * c).sum() / (ref[:-1] @ h**3))


def test_steps_vs_examples_quick_consistency():
    d = steps_vs_examples.compute(steps_vs_examples.PRESETS["quick"], None, 0)
    assert np.allclose(d["b_crit"], d["e_min"] / d["s_min"])
    # the best-lr steps are never beaten by any lr on a fine brute-force grid by > 5 %
    h = 1.0 / np.arange(1, d["dim"] + 1)
    target = d["targets"][0] * d["loss0"]
    fine = np.geomspace(1e-3, 1.99, 600)
    for j in (0, len(d["batch"]) // 2, len(d["batch"]) - 1):
        brute = np.min(nqm.steps_to_target(h, h, fine, d["batch"][j], target))
        assert d["steps"][0, j] <= 1.05 * brute + 1


# --------------------------------------------------------------------------- noise scale


def test_bias_corrected_ema_matches_explicit_weights():
    x = np.random.default_rng(0).normal(size=(30, 2))
    beta = 0.8
    out = noise_scale_during_training._bias_corrected_ema(x, beta)
    for t in (0, 7, 29):
        w = beta ** (t - np.arange(t + 1))
        assert np.allclose(out[t], (w[:, None] * x[: t + 1]).sum(0) / w.sum())


def test_nested_batches_have_noise_sigma_over_b():
    """G_b ~ Σ/b, G_B ~ Σ/B, and Cov(G_b, G_B) = Σ/B (G_b is part of G_B): 3 s.e."""
    h = np.array([1.0, 0.5])
    c = np.array([2.0, 1.0])
    prob = NoisyQuadratic(h, c)
    k = prob.kernel(NUMPY, "float64")
    n, b, bb = 40_000, 4, 16
    gen = NUMPY.rng(5)
    theta = np.zeros((n, 2))
    gs, gb = noise_scale_during_training.nested_batch_grads(
        NUMPY, k.sampler(gen, n), k.sampler(gen, n), theta, Layout(n, 1), b, bb)
    for sample, var in ((gs * gs, c / b), (gb * gb, c / bb), (gs * gb, c / bb)):
        se = sample.std(0, ddof=1) / np.sqrt(n)
        assert np.all(np.abs(sample.mean(0) - var) <= 3 * se)


def test_noise_scale_exact_curves_are_the_closed_forms():
    cfg = noise_scale_during_training.Config(dim=8, steps=60, replicas=3, n_records=5,
                                             record_min=5, batch=64, batch_small=8)
    d = noise_scale_during_training.compute(cfg, NUMPY, 0)
    h = 1.0 / np.arange(1, 9)
    s = steps_vs_examples.sgd_second_moments(h, h, cfg.lr, cfg.batch, cfg.steps)
    assert np.allclose(d["b_simple_expected"], h.sum() / (s @ h**2))
    assert np.allclose(d["b_noise_expected"], (h @ h) / (s @ h**3))
    assert d["b_noise_expected"][-1] > d["b_noise_expected"][0]
    assert d["estimate"].shape == (len(d["records"]), 3)


def test_noise_scale_rejects_bad_batches():
    with pytest.raises(ValueError, match="batch_small"):
        noise_scale_during_training.compute(
            noise_scale_during_training.Config(batch=8, batch_small=8), NUMPY, 0)


# --------------------------------------------------------------------------- nqm_optimizers


def test_best_steps_matches_brute_force_grid():
    h = 1.0 / np.arange(1, 21)
    target = 0.02 * 0.5 * h.sum()
    for batch, kw in ((4.0, {}), (1e4, {}), (1e4, {"momentum": 0.5}),
                      (16.0, {"precond_power": 0.5})):
        lr_max = 2.0 * (1 + kw.get("momentum", 0.0))
        s, lr = nqm_optimizers.best_steps(h, h, batch, target, lr_max, 16, lr_min=1e-4,
                                          max_steps=10_000, **kw)
        assert s == nqm.steps_to_target(h, h, lr, batch, target, **kw)
        grid = np.geomspace(1e-3, lr_max, 400, endpoint=False)
        brute = np.min(nqm.steps_to_target(h, h, grid, batch, target,
                                           max_steps=int(2 * s + 10), **kw))
        assert brute <= s <= 1.03 * brute + 1


def test_nqm_optimizers_quick_fields():
    d = nqm_optimizers.compute(nqm_optimizers.PRESETS["quick"], None, 0)
    assert d["steps"].shape == (3, len(d["batch"]))
    assert np.allclose(d["speedup"], d["steps"][0] / d["steps"][1])
    for k in range(3):
        s_fit, _ = theory.steps_examples(d["batch"], d["s_min"][k], d["e_min"][k])
        assert np.max(np.abs(np.log(s_fit / d["steps"][k]))) < np.log(2.0)
