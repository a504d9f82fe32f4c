r"""``python -m validate.experiments``: the seeds' experiments on a real network — measure a
reference run, predict from the measurements, then run the sweep and check (docs/design.md §7).

Layout (read in this order):

* :mod:`.recipes` — per data set, the standard training run that sweeps vary and how the
  reference run is measured;
* :mod:`.runs` — the jobs: pure functions ``fn(settings, data, device) -> dict`` (a training
  run, a measured reference run, a memory run);
* :mod:`.runner` — grid → jobs → ``concurrent.futures`` executor (local process pool or Dask) →
  one JSON per finished run keyed by a hash of its settings → resume;
* :mod:`.predict` — the predictions from the reference run's measurements;
* :mod:`.base` — :class:`~.base.Context`, check records, and
  :func:`~.base.run_experiment` (reference → predict → sweep → analyse → JSON + figure);
* :mod:`.cli` — the command line (also behind ``python -m validate.cifar``);
* one module per experiment: :mod:`.lr_sweep`, :mod:`.memory`, :mod:`.critical_batch`,
  :mod:`.stable_range`, :mod:`.linear_scaling` (the last three share the jobs of
  :mod:`.batch_runs`).

**Adding an experiment.** Write ``validate/experiments/<name>.py`` defining

* ``NAME`` (str) and ``TITLE`` (one line, shown by ``--list``);
* ``Config`` — a frozen dataclass of the study's size (grid, seeds, ``epochs`` (None: the
  recipe's), optional ``points``/``lanczos_iters``/``hutchinson`` for the reference run), units in
  comments, checked in ``__post_init__``;
* ``PRESETS = {"smoke": …, "quick": …, "default": …, "paper": …}`` — smoke ≤ 30 s on 2 CPU
  cores (CI), quick ≤ 5 min on digits, default the digits run README reports, paper CIFAR-10 on
  a GPU;
* ``reference_job(ctx) -> Job`` — the run whose measurements the predictions use (usually
  :func:`.runs.reference_run` at the middle of the grid);
* ``predict(ctx, reference_result) -> dict`` — predictions with standard errors, from the
  reference run only; an optional ``"summary"`` list of lines is printed before the sweep;
* ``jobs(ctx) -> list[Job]`` — the sweep (each :class:`~.runner.Job` names a function
  ``"module:function"`` and its JSON-able settings; new kinds of run are new functions, e.g. in
  :mod:`.runs`, taking ``(settings, data, device)`` and returning a JSON-able dict with wall
  times under ``"timing"``); or ``jobs(ctx, predictions)`` for a sweep placed around predicted
  values (called with ``predictions=None`` by the CLI to check the grid before any run: it
  raises ``ValueError`` on a bad grid and may return ``[]``);
* optionally ``follow_up(ctx, predictions, records) -> list[Job]`` — the next stage of a sweep
  that depends on the results so far (e.g. a scan at small B that picks the rate the next stage
  scales); called after each stage with all records so far, until it returns ``[]``;
* ``analyse(ctx, predictions, reference_record, records) -> dict`` — with ``"checks"`` (a
  list of :func:`~.base.claim` / :func:`~.base.factor_claim` records, the tolerances those the
  issue fixed), optionally ``"findings"`` (lines) and ``"runs"`` (a compact row per run); the
  rest is stored as ``analysis`` and is what the figure is drawn from;
* ``plot(report) -> matplotlib.figure.Figure`` — from the saved report alone, with
  :mod:`sgdtheory.experiments._plotting` (the runner adds the checks footer and saves it);

and add its name to :data:`EXPERIMENTS`. ``Context.train_settings(**changes)`` gives the
recipe's run with changes (``lr_factor``, ``batch_size``, ``subset``, ``seed``, …).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXPERIMENTS", "PRESET_NAMES", "load"]

#: Experiment module names, in the order ``--list`` shows them.
EXPERIMENTS = ("lr_sweep", "memory", "critical_batch", "stable_range", "linear_scaling")

#: Preset names every experiment defines.
PRESET_NAMES = ("smoke", "quick", "default", "paper")


def load(name: str) -> ModuleType:
    """Import the experiment module ``validate.experiments.<name>`` (``ValueError`` if unknown).
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"{__name__}.{name}")
