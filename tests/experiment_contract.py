"""The contract every experiment module keeps (used by tests/test_experiment_*.py)."""

from __future__ import annotations

import dataclasses

import pytest

from sgdtheory.experiments import PRESET_NAMES, _common


def assert_contract(mod, data=None) -> None:
    """NAME, TITLE, frozen Config presets, compute/plot; with ``data`` (a compute result):
    every recorded check passes and the figure draws from the data alone."""
    assert mod.NAME == mod.__name__.rsplit(".", 1)[-1]
    assert isinstance(mod.TITLE, str) and mod.TITLE
    assert set(mod.PRESETS) == set(PRESET_NAMES)
    for cfg in mod.PRESETS.values():
        assert dataclasses.is_dataclass(cfg) and isinstance(cfg, mod.Config)
        field = dataclasses.fields(cfg)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, field, None)
    assert callable(mod.compute) and callable(mod.plot)
    assert {"NAME", "TITLE", "Config", "PRESETS", "compute", "plot"} <= set(mod.__all__)
    if data is None:
        return
    checks = data["checks"]
    assert checks and all(isinstance(c, _common.Check) for c in checks)
    failed = [(c.name, c.predicted, c.measured, c.note) for c in checks if not c.passed]
    assert not failed, failed
    fig = mod.plot(data)
    assert len(fig.axes) >= 2
