"""Experiment eps_opt_vs_batch: its helpers against brute force, and an unbiased measurement."""

from __future__ import annotations

import numpy as np
import pytest

from sgdtheory.backend import get_backend
from sgdtheory.experiments import eps_opt_vs_batch
from sgdtheory.problems import NoisyQuadratic

NUMPY = get_backend("numpy")



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
