"""The experiments behind ``python -m sgdtheory.figures``, one module per figure.

See docs/design.md §5 for what each shows and checks.

Each module ``sgdtheory.experiments.<name>`` follows the contract in
:mod:`sgdtheory.experiments._common` (``NAME``, ``TITLE``, ``Config``, ``PRESETS``,
``compute(config, backend, seed) -> data``, ``plot(data) -> Figure``). :data:`EXPERIMENTS`
lists them in the order the CLI runs them; :func:`load` imports one by name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXPERIMENTS", "PRESET_NAMES", "load"]

#: Experiment module names, in the order of docs/design.md §5 (and of the CLI run).
EXPERIMENTS = (
    "eps_opt_vs_batch",
    "loss_change_vs_lr",
    "steps_vs_examples",
    "noise_scale_during_training",
    "curvature_vs_forgetting",
    "memory_curve",
    "small_batch_stability",
    "linear_scaling",
    "nqm_optimizers",
)

#: Preset names every experiment defines.
PRESET_NAMES = ("quick", "default", "paper")


def load(name: str) -> ModuleType:
    """Import the experiment module ``sgdtheory.experiments.<name>``.

    Raises:
        ValueError: ``name`` is not in :data:`EXPERIMENTS`.
        ImportError: the module (or something it needs) cannot be imported.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"{__name__}.{name}")
