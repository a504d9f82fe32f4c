"""Experiment curvature_vs_forgetting (quick preset): checks, shapes, and the limits recomputed."""

from __future__ import annotations

import numpy as np
from experiment_contract import assert_contract

from sgdtheory import theory
from sgdtheory.experiments import curvature_vs_forgetting

EXPERIMENT = curvature_vs_forgetting  # run by the ``quick`` fixture (conftest.py)


def test_quick_preset_checks_pass_and_figure_draws(quick):
    assert_contract(EXPERIMENT, quick)


def test_curvature_vs_forgetting_shapes_and_limits(quick):
    mod, d = EXPERIMENT, quick
    cfg = mod.PRESETS["quick"]
    n_n, n_f = len(cfg.n_data), len(cfg.factors)
    assert d["test_mean"].shape == (n_n, 2, n_f) == d["train_mean"].shape
    assert d["f_inst"].shape == (n_n, 2) and d["best_factor"].shape == (n_n, 2)
    # lr = factor · η̃₀ · B: the 4× batch takes 4× the lr at the same factor
    np.testing.assert_allclose(d["lr"][1] / d["lr"][0], cfg.batch_ratio)
    # curvature limit in factor units, recomputed from the spectral radius of the moment matrix
    for b, batch in enumerate(d["batches"]):
        lr_c = d["f_curv"][b] * batch * d["base_lr0"]
        rho_below = np.abs(np.linalg.eigvalsh(
            theory.linreg_moment_matrix(d["eigenvalues"], lr_c * 0.999, batch))).max()
        rho_above = np.abs(np.linalg.eigvalsh(
            theory.linreg_moment_matrix(d["eigenvalues"], lr_c * 1.001, batch))).max()
        assert rho_below < 1.0 < rho_above
    # forgetting limit: the memory horizon 1/(η̃ λ_rep) equals N
    horizon = 1.0 / (d["f_forget"] * d["base_lr0"] * d["lam_rep"])
    np.testing.assert_allclose(horizon, d["n_data"], rtol=1e-12)
