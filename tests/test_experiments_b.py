"""Quick presets of curvature_vs_forgetting, memory_curve, small_batch_stability, linear_scaling.

Each experiment is run once (module-scoped fixture) on NumPy with seed 0; the tests assert
that every recorded check passes, that the data have the documented shapes, that the figure
draws, and that the theory overlays agree with independent computations done here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sgdtheory import memory, theory
from sgdtheory.backend import get_backend
from sgdtheory.experiments import _common, load

NAMES = ("curvature_vs_forgetting", "memory_curve", "small_batch_stability", "linear_scaling")


@pytest.fixture(scope="module")
def results():
    be = get_backend("numpy")
    out = {}
    for name in NAMES:
        mod = load(name)
        out[name] = (mod, mod.compute(mod.PRESETS["quick"], be, 0))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_contract_and_all_checks_pass(results, name):
    mod, data = results[name]
    assert mod.NAME == name and isinstance(mod.TITLE, str) and mod.TITLE
    assert set(mod.PRESETS) == {"quick", "default", "paper"}
    for cfg in mod.PRESETS.values():
        assert dataclasses.is_dataclass(cfg)
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.replicas = 1  # type: ignore[misc]
    checks = data["checks"]
    assert checks and all(isinstance(c, _common.Check) for c in checks)
    failed = [(c.name, c.predicted, c.measured, c.note) for c in checks if not c.passed]
    assert not failed, failed
    fig = mod.plot(data)
    assert len(fig.axes) >= 2


def test_curvature_vs_forgetting_shapes_and_limits(results):
    mod, d = results["curvature_vs_forgetting"]
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


def test_memory_curve_shapes_and_derived_curve(results):
    mod, d = results["memory_curve"]
    k = d["lags"]
    assert k[0] == 1 and np.all(np.diff(k) > 0)
    assert d["gap_sim"].shape == d["gap_se"].shape == d["gap_derived"].shape == (2, k.size)
    assert np.all(d["gap_se"] > 0)
    # the high lr forgets faster: its normalised derived gap is below the low lr's at 1 epoch
    j = int(np.argmin(np.abs(k - d["steps_per_epoch"])))
    norm = d["gap_derived"][:, j] / d["gap_derived"][:, 0]
    assert norm[0] < norm[1]
    again = memory.memory_gap(d["eigenvalues"], d["lr"][0], d["batch"], k,
                              noise_var=mod.PRESETS["quick"].noise_var)
    np.testing.assert_allclose(again, d["gap_derived"][0])


def test_small_batch_stability_shapes_and_theory(results):
    mod, d = results["small_batch_stability"]
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


def test_linear_scaling_shapes_and_rules(results):
    mod, d = results["linear_scaling"]
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
