"""Experiment nqm_optimizers: best-lr steps against a brute-force grid, and the fitted curves."""

from __future__ import annotations

import numpy as np

from sgdtheory import nqm, theory
from sgdtheory.experiments import nqm_optimizers


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
