"""Experiment memory_curve (quick preset): checks, shapes, and the derived curve recomputed."""

from __future__ import annotations

import numpy as np
from experiment_contract import assert_contract

from sgdtheory import memory
from sgdtheory.experiments import memory_curve

EXPERIMENT = memory_curve  # run by the ``quick`` fixture (conftest.py)


def test_quick_preset_checks_pass_and_figure_draws(quick):
    assert_contract(EXPERIMENT, quick)


def test_memory_curve_shapes_and_derived_curve(quick):
    mod, d = EXPERIMENT, quick
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
