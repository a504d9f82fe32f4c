"""Experiment noise_scale_during_training: the EMA reference, nested batches and exact curves."""

from __future__ import annotations

import numpy as np
import pytest

from sgdtheory.backend import get_backend
from sgdtheory.experiments import noise_scale_during_training, steps_vs_examples
from sgdtheory.problems import Layout, NoisyQuadratic

NUMPY = get_backend("numpy")



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
