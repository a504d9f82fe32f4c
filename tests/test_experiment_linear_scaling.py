"""Experiment linear_scaling (quick preset): checks, shapes, the scaling rules, and B_noise
from its definition."""

from __future__ import annotations

import numpy as np
import pytest
from experiment_contract import assert_contract

from sgdtheory.experiments import linear_scaling

EXPERIMENT = linear_scaling  # run by the ``quick`` fixture (conftest.py)


def test_quick_preset_checks_pass_and_figure_draws(quick):
    assert_contract(EXPERIMENT, quick)


def test_linear_scaling_shapes_and_rules(quick):
    mod, d = EXPERIMENT, quick
    cfg = mod.PRESETS["quick"]
    n_b = len(cfg.batches)
    assert d["excess_mean"].shape == (2, n_b) == d["excess_theory"].shape
    np.testing.assert_allclose(d["lr"][0], d["base_lr_ref"] * d["batches"])
    np.testing.assert_allclose(d["lr"][1], d["base_lr_ref"] * np.sqrt(d["batches"]))
    # B_noise at the start from its definition tr(HΣ)/GᵀHG with Σ = Heeᵀ H + (eᵀHe + σ²)H
    lam, e, s2 = d["eigenvalues"], np.ones(cfg.dim), cfg.noise_std**2
    h = np.diag(lam)
    sigma = h @ np.outer(e, e) @ h + (e @ h @ e + s2) * h
    g = h @ e
    assert d["b_noise_start"] == pytest.approx(np.trace(h @ sigma) / (g @ h @ g), rel=1e-12)
    assert d["b_noise_run"] > d["b_noise_start"]  # B_noise grows as |G| shrinks
