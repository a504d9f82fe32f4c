"""Experiment small_batch_stability (quick preset): checks, shapes, and the theory against an
explicit loop."""

from __future__ import annotations

import numpy as np
import pytest
from experiment_contract import assert_contract

from sgdtheory import theory
from sgdtheory.experiments import small_batch_stability

EXPERIMENT = small_batch_stability  # run by the ``quick`` fixture (conftest.py)


def test_quick_preset_checks_pass_and_figure_draws(quick):
    assert_contract(EXPERIMENT, quick)


def test_small_batch_stability_shapes_and_theory(quick):
    mod, d = EXPERIMENT, quick
    cfg = mod.PRESETS["quick"]
    n_b, n_g = len(cfg.batches), d["base_lr"].size
    assert d["excess_mean"].shape == (n_b, n_g) and d["edges_sim"].shape == (n_b, 2)
    # closed-form theory equals an explicit loop over the moment recursion of docs/design.md §3
    lam, b, base = d["eigenvalues"], 4, np.array([0.01, 0.05])
    steps = cfg.examples // b
    for eta_t, got in zip(base, mod._theory_final_excess(lam, base, b, cfg.examples,
                                                          cfg.noise_std**2), strict=True):
        eta = eta_t * b
        m = np.ones_like(lam)
        for _ in range(steps):
            m = (m * (1 - 2 * eta * lam + eta**2 * lam**2 * (1 + 1 / b))
                 + eta**2 / b * lam * (lam @ m + cfg.noise_std**2))
        assert got == pytest.approx(0.5 * lam @ m, rel=1e-9)
    np.testing.assert_allclose(d["base_lr_c"],
                               theory.linreg_stability_limit(lam, d["batches"].astype(float))
                               / d["batches"])
