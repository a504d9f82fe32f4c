r"""What every experiment shares: its :class:`Context`, check records, and
:func:`run_experiment` — reference run → predictions → sweep → analysis → JSON + figure.

Outputs of :func:`run_experiment` in ``out``:

* ``<experiment>.json`` — strict JSON: the experiment, preset and resolved config; the recipe
  (the standard training run and measurement settings); the data's identity and sizes; the
  model and its parameter count; torch version, device, seed, executor; the reference run's
  measurements; the predictions with their standard errors; every run's result (a compact row
  per run; the full record is ``runs/<key>.json``); ``checks`` — a list of
  ``{name, predicted, measured, rule, pass, tolerance, note}``; ``findings`` (measured facts
  that are reported, not checked); the analysis the figure is drawn from; timings.
* ``<experiment>.png`` — the figure (house style of :mod:`sgdtheory.experiments._plotting`).
* ``runs/<key>.json`` — one per finished run (the resume store of :mod:`.runner`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

from sgdtheory.experiments._common import Check, factor_check
from validate._io import jsonable, write_json

from .recipes import Recipe
from .runner import DataSpec, Job, code_fingerprint, make_executor, run_jobs

__all__ = ["Context", "check_batches", "claim", "factor_claim", "run_experiment", "summary_table",
           "sweep_jobs"]


@dataclass(frozen=True)
class Context:
    """Everything an experiment's functions need, resolved once by the CLI.

    Attributes:
      experiment, preset: names. config: the experiment's ``Config`` (from its ``PRESETS``).
      recipe: the data set's :class:`~validate.experiments.recipes.Recipe`.
      data: how workers load the data. identity: :func:`validate.data.data_identity`.
      input_shape, num_classes, n_train: of the data. device: ``'cpu'`` or ``'cuda'``.
      seed: the base seed; run r of a grid point uses ``seed + r``.
    """

    experiment: str
    preset: str
    config: object
    recipe: Recipe
    data: DataSpec
    identity: dict
    input_shape: tuple
    num_classes: int
    n_train: int
    device: str
    seed: int = 0

    @property
    def epochs(self) -> int:
        """The config's ``epochs`` when set, else the recipe's."""
        e = getattr(self.config, "epochs", None)
        return int(e) if e is not None else int(self.recipe.train.epochs)

    def train_settings(self, **changes) -> dict:
        """The recipe's training run with ``changes`` (and this context's epochs), as the dict
        a job stores."""
        changes.setdefault("epochs", self.epochs)
        cfg = self.recipe.train.replace(**changes)
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(cfg).items()}

    def measure_settings(self) -> dict:
        """The recipe's measurement settings with the config's overrides (``points``,
        ``lanczos_iters``, ``hutchinson`` when the config sets them)."""
        m = dataclasses.asdict(self.recipe.measure)
        for k in ("points", "lanczos_iters", "hutchinson"):
            v = getattr(self.config, k, None)
            if v is not None:
                m[k] = v
        return m


def check_batches(experiment: str, batches, n_train: int) -> None:
    """Refuse a grid whose batch sizes (examples per step) exceed the ``n_train`` training
    examples: one ValueError naming ``experiment`` and those sizes."""
    big = [b for b in batches if b > n_train]
    if big:
        raise ValueError(f"{experiment}: batch sizes {big} exceed the {n_train} training "
                         "examples")


def _num(x):
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def claim(name: str, predicted, measured, passed: bool, rule: str, *, tolerance=None,
          note: str = "", uses_prediction: bool = True) -> dict:
    """A check record ``{name, predicted, measured, rule, pass, tolerance, note}``; a value
    that is not a finite number is stored as ``None`` and — when the rule uses it (the
    measured value always; the prediction unless ``uses_prediction=False``, for a rule on the
    measurements alone with the prediction shown beside it) — the check fails, with the reason
    in ``note``."""
    pred, meas = _num(predicted), _num(measured)
    missing = [w for w, v in (("predicted", pred if uses_prediction else 0.0),
                              ("measured", meas)) if v is None]
    if missing:
        passed = False
        note = (note + "; " if note else "") + " and ".join(missing) + " not resolved " \
            f"(value {predicted!r} / {measured!r})"
    return {"name": name, "predicted": pred, "measured": meas, "rule": rule,
            "pass": bool(passed), "tolerance": tolerance, "note": note}


def factor_claim(name: str, predicted, measured, factor: float, note: str = "") -> dict:
    """Passes when measured/predicted lies in [1/factor, factor]
    (:func:`sgdtheory.experiments._common.factor_check`)."""
    pred, meas = _num(predicted), _num(measured)
    ok = pred is not None and meas is not None and pred > 0 and \
        factor_check(name, pred, meas, factor).passed
    return claim(name, predicted, measured, ok, f"measured/predicted within ×{factor:g}",
                 tolerance=factor, note=note)


def _as_checks(records: list[dict]) -> list[Check]:
    """Check objects for :func:`sgdtheory.experiments._plotting.check_note`."""
    return [Check(r["name"], r["predicted"] if r["predicted"] is not None else math.inf,
                  r["measured"] if r["measured"] is not None else math.inf,
                  r["tolerance"] or 0.0, r["pass"], r["note"]) for r in records]


def summary_table(checks: list[dict]) -> str:
    """Plain-text table of the checks: name, predicted, measured, rule, result."""
    def fmt(v):
        return "—" if v is None else f"{v:.4g}"

    rows = [("check", "predicted", "measured", "rule", "result")]
    rows += [(c["name"], fmt(c["predicted"]), fmt(c["measured"]), c["rule"],
              "pass" if c["pass"] else "FAIL") for c in checks]
    widths = [min(max(len(r[i]) for r in rows), 70) for i in range(5)]
    lines = ["  ".join(str(v)[:w].ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


#: The most sweep stages :func:`run_experiment` runs (the sweep and its follow-ups).
MAX_STAGES = 8


def sweep_jobs(module, ctx: Context, predictions: dict | None) -> list[Job]:
    """``module.jobs(ctx, predictions)`` when the module's ``jobs`` takes the predictions (a
    sweep placed around predicted values, e.g. learning rates around ε_opt(B)), else
    ``module.jobs(ctx)``. The CLI checks a grid before any run with ``predictions=None``."""
    import inspect

    if len(inspect.signature(module.jobs).parameters) >= 2:
        return module.jobs(ctx, predictions)
    return module.jobs(ctx)


def run_experiment(module, ctx: Context, *, out, executor: str = "local", workers: int = 1,
                   force: bool = False, progress: bool = True, log=print) -> tuple[dict, int]:
    """Reference run → ``module.predict`` → the sweep ``module.jobs`` (→ the stages of
    ``module.follow_up``, if it defines one) → ``module.analyse`` → ``<out>/<name>.json`` and
    ``<name>.png``. Returns (report, exit status: 0 when every check passes, 1 otherwise).

    The module contract is described in :mod:`validate.experiments`.
    """
    import torch

    from sgdtheory.experiments import _plotting as P

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    name = module.NAME
    common = {"spec": ctx.data, "identity": ctx.identity, "device_type": ctx.device, "out": out,
              "force": force, "progress": progress}
    with make_executor(executor, workers, ctx.device) as (ex, where):
        log(f"{name}: preset {ctx.preset}, data {ctx.identity['source']} "
            f"({ctx.n_train} training examples), device {ctx.device}, runs on {where}")
        ref_job: Job = module.reference_job(ctx)
        ref = run_jobs([ref_job], executor=ex, desc="reference", **common)[0]
        predictions = module.predict(ctx, ref["result"])
        for line in predictions.get("summary", []):
            log("  predicted: " + line)
        jobs = sweep_jobs(module, ctx, predictions)
        records = run_jobs(jobs, executor=ex, desc=name, **common)
        follow_up = getattr(module, "follow_up", None)
        for stage in range(2, MAX_STAGES + 1):  # optional later stages (see follow_up)
            more = follow_up(ctx, predictions, records) if follow_up is not None else []
            if not more:
                break
            records = records + run_jobs(more, executor=ex, desc=f"{name} stage {stage}",
                                         **common)
    analysis = module.analyse(ctx, predictions, ref, records)
    checks = analysis.pop("checks")
    findings = analysis.pop("findings", [])
    rows = analysis.pop("runs", None)
    report = {
        "experiment": name,
        "title": module.TITLE,
        "preset": ctx.preset,
        "config": dataclasses.asdict(ctx.config),
        "recipe": {"name": ctx.recipe.name, "train": ctx.train_settings(),
                   "batches": list(ctx.recipe.batches),
                   "measure": ctx.measure_settings()},
        "data": {**ctx.identity, "spec": dataclasses.asdict(ctx.data)},
        "model": {"name": ref["result"].get("model"), "parameters": ref["result"].get("params")},
        "torch": torch.__version__,
        "code": code_fingerprint(),
        "device": ctx.device,
        "seed": ctx.seed,
        "executor": executor,
        "workers": workers,
        "reference": {"key": ref["key"], "label": ref["label"], "settings": ref["settings"],
                      "result": ref["result"]},
        "predictions": {k: v for k, v in predictions.items() if k != "summary"},
        "prediction_summary": predictions.get("summary", []),
        "runs": rows if rows is not None else [
            {"label": r["label"], "key": r["key"], "result": r["result"]} for r in records],
        "analysis": analysis,
        "checks": checks,
        "all_passed": all(c["pass"] for c in checks),
        "findings": findings,
        "timing": {"elapsed_s": time.perf_counter() - t0,
                   "runs_computed": sum(not r["cached"] for r in [ref, *records]),
                   "runs_cached": sum(r["cached"] for r in [ref, *records]),
                   "run_wall_s": sum(float(r["timing"].get("wall_s") or 0.0)
                                     for r in [ref, *records])},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {"png": f"{name}.png", "runs": "runs/"},
    }
    report = jsonable(report)
    fig = module.plot(report)
    P.check_note(fig, _as_checks(checks))
    P.save(fig, out / f"{name}.png")
    write_json(out / f"{name}.json", report)
    log(summary_table(checks))
    for f in findings:
        log("  finding: " + f)
    log(f"wrote {out / (name + '.json')} and {out / (name + '.png')}")
    return report, 0 if report["all_passed"] else 1
