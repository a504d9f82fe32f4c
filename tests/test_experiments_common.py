"""sgdtheory.experiments._common: the shared minibatch sampler against brute force."""

from __future__ import annotations

import numpy as np

from sgdtheory.backend import get_backend
from sgdtheory.experiments._common import minibatch_grads
from sgdtheory.problems import LogisticRegression

NUMPY = get_backend("numpy")



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
