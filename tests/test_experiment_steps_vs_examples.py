"""Experiment steps_vs_examples: exact second moments and best-lr steps against brute force."""

from __future__ import annotations

import numpy as np

from sgdtheory import nqm
from sgdtheory.experiments import steps_vs_examples


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
