r"""The jobs of the batch-size experiments (:mod:`.critical_batch`, :mod:`.stable_range`,
:mod:`.linear_scaling`): one training run (:func:`validate.train.train`) with, as its settings
ask,

* ``curve`` — the training loss L(θ_s) (the training criterion, mean over the whole training
  subset, no augmentation, as :func:`validate.train.train` measures its initial and final
  training loss) at a log-spaced set of steps (every step up to ``dense``, then each step at
  least ``ratio`` × the previous one, plus the steps in ``at``), and for each of the ``targets``
  the first step at which L ≤ target (:func:`crossing_step`, interpolated log-linearly between
  evaluations); with ``stop`` the run ends once the lowest target is reached (it is not a
  failure), and with ``give_up`` = q a run whose training loss is still not below the chance
  loss (:func:`validate.train.chance_loss`: a network that collapsed, or never left the start)
  at an evaluation after q × its step budget ends there as a failure (it cannot reach a
  target: a collapsed network stays at chance);
* ``measure`` — the reference measurements of :func:`validate.experiments.runs.measure_point`
  (|G|², tr(Σ), GᵀHG, tr(HΣ), B_simple, B_noise, ε_max, λ_max, tr(H), with standard errors) at
  ``measure['points']`` evenly spaced steps;
* ``sharpness`` — λ_max (Lanczos) and tr(H) (Hutch++) of the final model, on the Hessian batch
  of :func:`validate.experiments.runs.measure_point` (the whole training subset on digits).

Units: L is the mean loss; ``lr`` multiplies the mean minibatch gradient; steps are optimiser
steps of B examples; λ_max, tr(H) those of the mean training loss. The job is a pure function of
its settings, the data and the device type (bit for bit on CPU with one thread), as the runner's
per-run store needs; ``settings['runs_code']`` (:func:`job_settings`) ties the stored result to
the code of :mod:`validate.experiments.runs` that this module calls.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np

__all__ = ["crossing_step", "evaluation_steps", "batch_run", "job_settings", "train_loss"]

#: The job function of every run of the batch-size experiments.
JOB = "validate.experiments.batch_runs:batch_run"


def job_settings(**settings) -> dict:
    """A job's settings with ``runs_code``, the fingerprint of the code that
    :mod:`validate.experiments.runs` adds to this module's (so a change there reruns it)."""
    from .runner import code_fingerprint

    return {**settings, "runs_code": code_fingerprint("validate.experiments.runs")}


def evaluation_steps(total: int, *, ratio: float = 1.03, dense: int = 20, at=()) -> list[int]:
    """Steps 0 … ``total`` at which the training loss is evaluated: every step up to ``dense``,
    then each step at least ``ratio`` × the previous one (rounded up), the last step, and the
    steps ``at``.

    >>> evaluation_steps(40, ratio=1.5, dense=3, at=(7,))
    [0, 1, 2, 3, 5, 7, 8, 12, 18, 27, 40]
    """
    if not ratio > 1:
        raise ValueError(f"curve ratio must be > 1, got {ratio!r}")
    steps = set(range(min(dense, total) + 1))
    s = max(dense, 1)
    while s < total:
        s = max(s + 1, math.ceil(s * ratio))
        steps.add(min(s, total))
    steps.add(total)
    steps.update(int(a) for a in at if 0 <= int(a) <= total)
    return sorted(steps)


def crossing_step(steps, losses, target: float) -> float:
    r"""The first step at which the loss is ≤ ``target``: between the last evaluation above it,
    (s₀, L₀), and the first at or below it, (s₁, L₁), log-linearly,
    s = exp(log s₀ + (log L₀ − log T)/(log L₀ − log L₁)·(log s₁ − log s₀)) (linearly in s when
    s₀ = 0); nan when the loss never falls to ``target``.

    >>> round(crossing_step([1, 10, 100], [1.0, 0.1, 0.01], 0.03), 3)
    33.333
    >>> crossing_step([0, 4], [2.0, 1.0], 5.0), crossing_step([0, 4], [2.0, 1.0], 0.5)
    (0.0, nan)
    """
    s = np.asarray(steps, dtype=float)
    v = np.asarray(losses, dtype=float)
    below = np.flatnonzero(np.isfinite(v) & (v <= target))
    if below.size == 0:
        return float("nan")
    i = int(below[0])
    if i == 0:
        return float(s[0])
    s0, s1, l0, l1 = s[i - 1], s[i], v[i - 1], v[i]
    if not (l0 > 0 and l1 > 0 and target > 0 and l0 > l1):
        return float(s1)
    w = (math.log(l0) - math.log(target)) / (math.log(l0) - math.log(l1))
    if s0 <= 0:
        return float(s0 + w * (s1 - s0))
    return float(math.exp(math.log(s0) + w * (math.log(s1) - math.log(s0))))


def train_loss(state, criterion_sum, eval_batch: int) -> float:
    """The training loss of ``state.model`` on the whole training subset (mean, no augmentation,
    training mode with BatchNorm's running statistics left untouched: as
    :func:`validate.train.train` measures its initial and final training loss)."""
    from validate.train import evaluate

    return evaluate(state.model, state.plain, state.train_labels, batch=int(eval_batch),
                    criterion=criterion_sum, train_mode=True)[0]


def _sharpness(state, criterion, spec: dict, seed: int) -> dict:
    """λ_max (top eigenvalue, Lanczos ≤ ``lanczos_iters`` HVPs) and tr(H) (Hutch++,
    ``hutchinson`` HVPs) of the model on the Hessian batch(es) of
    :func:`validate.experiments.runs.measure_point`; with several sampled batches the values are
    their means and λ_max's standard error their spread/√reps (0 on the whole subset)."""
    from sgdtheory.krylov import KrylovConvergenceWarning
    from validate import measure as M

    from .runs import _hessian_batches, _seed

    hess, whole = _hessian_batches(state, spec, state.step, seed)
    lams, traces, trace_ses, converged = [], [], [], True
    for r, (xh, yh) in enumerate(hess):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", KrylovConvergenceWarning)
            lam = M.top_hessian_eigenvalue(state.model, criterion, xh, yh, k=1,
                                           max_iter=int(spec["lanczos_iters"]), tol=1e-4,
                                           seed=_seed(seed, state.step, 20 + r))
        converged &= not any(issubclass(w.category, KrylovConvergenceWarning) for w in caught)
        lams.append(float(lam))
        tr, tr_se = M.hessian_trace(state.model, criterion, xh, yh,
                                    n_samples=int(spec["hutchinson"]),
                                    seed=_seed(seed, state.step, 30 + r), method="hutch++")
        traces.append(tr)
        trace_ses.append(tr_se)
    reps = len(lams)
    trace_se = float(np.sqrt(np.sum(np.square(trace_ses))) / reps)
    if reps > 1:
        trace_se = max(trace_se, float(np.std(traces, ddof=1) / math.sqrt(reps)))
    return {"step": state.step, "lambda_max": float(np.mean(lams)),
            "lambda_max_stderr": 0.0 if whole else (float(np.std(lams, ddof=1) / math.sqrt(reps))
                                                    if reps > 1 else None),
            "lanczos_converged": bool(converged), "trace_h": float(np.mean(traces)),
            "trace_h_stderr": trace_se, "hessian_batch": int(hess[0][1].shape[0]),
            "hessian_whole_subset": whole, "hessian_reps": reps}


def _chance(cfg, data) -> float:
    """The chance loss (:func:`validate.train.chance_loss`) of the run's training subset (the
    subset :func:`validate.train.train` draws from the run's seed)."""
    from validate.train import chance_loss, subset_size

    n = subset_size(cfg, data.train_images.shape[0])
    idx = np.sort(np.random.default_rng(int(cfg.seed)).permutation(
        data.train_images.shape[0])[:n]) if n < data.train_images.shape[0] else slice(None)
    return chance_loss(data.train_labels[idx], data.num_classes, cfg.label_smoothing)


class _Recorder:
    """The training callback of :func:`batch_run`: at the steps of the loss curve it evaluates
    L (and stops the run at the lowest target, or gives up at chance), at the measurement steps
    it calls :func:`validate.experiments.runs.measure_or_stop`, and at the last step it
    measures the sharpness; ``rec`` holds what it recorded and ``seconds`` the time spent."""

    def __init__(self, settings: dict, cfg, data):
        from torch import nn

        self.cfg = cfg
        self.curve = settings.get("curve")
        self.measure = settings.get("measure")
        self.sharp = settings.get("sharpness")
        self.seed = int(settings.get("measure_seed", cfg.seed))
        self.crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.crit_sum = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing,
                                            reduction="sum")
        self.targets = sorted((float(t) for t in (self.curve or {}).get("targets") or ()),
                              reverse=True)
        self.give_up = (self.curve or {}).get("give_up")
        self.chance = _chance(cfg, data) if self.give_up is not None else None
        self.rec = {"steps": [], "losses": [], "measurements": [], "sharpness": None,
                    "stopped_at_target": None, "gave_up": None}
        self.seconds = {"curve_s": 0.0, "measure_s": 0.0, "sharpness_s": 0.0}
        self.plan: dict = {}

    def _make_plan(self, total: int) -> None:
        """The measurement steps, and the curve's evaluation steps (which include them)."""
        from .runs import measurement_steps

        curve = self.curve
        pts = measurement_steps(total, int(self.measure["points"])) if self.measure else []
        self.plan["measure"] = set(pts)
        self.plan["curve"] = set(evaluation_steps(
            total, ratio=float(curve.get("ratio", 1.03)), dense=int(curve.get("dense", 20)),
            at=[*curve.get("at", ()), *pts])) if curve else set()

    def _curve_point(self, state) -> bool:
        """Evaluate L at this step; True when the run ends here: L ≤ the lowest target with
        ``stop`` (not a failure), or L not below the chance loss after ``give_up`` × the
        budget (a failure; see :func:`batch_run`)."""
        t, rec = state.step, self.rec
        t0 = time.perf_counter()
        loss = train_loss(state, self.crit_sum, self.cfg.eval_batch)
        rec["steps"].append(t)
        rec["losses"].append(loss)
        self.seconds["curve_s"] += time.perf_counter() - t0
        if self.curve.get("stop") and self.targets and math.isfinite(loss) and \
                loss <= self.targets[-1]:
            rec["stopped_at_target"] = t
            state.diverged = True  # ends training; not a failure (see batch_run)
            return True
        if self.chance is not None and t >= self.give_up * state.total_steps and t > 0 and \
                not loss < self.chance:
            rec["gave_up"] = (t, loss)
            state.diverged = True  # ends training: a failure (see batch_run)
            return True
        return False

    def _measure_point(self, state) -> bool:
        """The reference measurements at this step (with L when the curve evaluated it here);
        True when a non-finite value ended the run."""
        from .runs import measure_or_stop

        t, rec = state.step, self.rec
        t0 = time.perf_counter()
        m = measure_or_stop(state, self.crit, self.measure, self.seed, rec["measurements"])
        if m is None:
            return True
        if rec["steps"] and rec["steps"][-1] == t:
            m["train_loss"] = rec["losses"][-1]
        rec["measurements"].append(m)
        self.seconds["measure_s"] += time.perf_counter() - t0
        return False

    def __call__(self, state):
        if not self.plan:
            self._make_plan(state.total_steps)
        t = state.step
        if t in self.plan["curve"] and self._curve_point(state):
            return
        if t in self.plan["measure"] and self._measure_point(state):
            return
        if self.sharp and t == state.total_steps:
            t0 = time.perf_counter()
            self.rec["sharpness"] = _sharpness(state, self.crit, self.sharp, self.seed)
            self.seconds["sharpness_s"] += time.perf_counter() - t0


def batch_run(settings: dict, data, device) -> dict:
    """One training run with ``settings['train']`` and the optional ``curve``, ``measure`` and
    ``sharpness`` records described in the module docstring.

    Returns the numbers of :func:`validate.experiments.runs.train_run` plus ``curve``
    (``{'steps', 'losses'}``), ``targets`` (``[{target, step, examples, reached}]``),
    ``stopped_at_target`` (the step the run ended at because every target was reached, else
    None), ``measurements`` and ``sharpness`` (None when the run ended early or failed before
    the end), and ``timing``.
    """
    from validate.train import train

    from .runs import _summary, train_config

    cfg = train_config(settings)
    cb = _Recorder(settings, cfg, data)
    rec = cb.rec
    result = train(cfg, data, device=device, progress=False, callback=cb)
    out, timing = _summary(result)
    if rec["stopped_at_target"] is not None:  # our own early stop, not a failure of training
        out.update(failed=False, failure=None, failed_at_step=None)
    if rec["gave_up"] is not None:
        t, loss = rec["gave_up"]
        out.update(failed=True, failed_at_step=t, failure=(
            f"collapsed to chance (training loss {loss:.4g} not below the chance loss "
            f"{cb.chance:.4g} after {t} of {out['total_steps']} steps; stopped)"))
    out["stopped_at_target"] = rec["stopped_at_target"]
    out["curve"] = {"steps": rec["steps"], "losses": rec["losses"]}
    b = int(cfg.batch_size)
    out["targets"] = []
    for target in cb.targets:
        s = crossing_step(rec["steps"], rec["losses"], target)
        out["targets"].append({"target": target, "step": s, "examples": s * b,
                               "reached": bool(math.isfinite(s))})
    out["measurements"] = rec["measurements"]
    out["sharpness"] = rec["sharpness"]
    if cb.measure or cb.sharp:
        out["dim"] = sum(p.numel() for p in result["model"].parameters() if p.requires_grad)
    timing.update(cb.seconds)
    out["timing"] = timing
    return out
