"""Experiment loss_change_vs_lr: zero crossings, curves and the logistic loss vs brute force."""

from __future__ import annotations

import numpy as np
import pytest

from sgdtheory.backend import get_backend
from sgdtheory.experiments import loss_change_vs_lr
from sgdtheory.problems import LogisticRegression, _softplus

NUMPY = get_backend("numpy")



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
