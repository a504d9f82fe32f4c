r"""The jobs a sweep is made of: functions ``fn(settings, data, device) -> dict`` run in a worker.

Each is a pure function of its ``settings`` (a JSON-able dict), the data and the device type:
the same settings give the same numbers (bit for bit on CPU with one torch thread), which is
what lets the runner store one JSON per finished run under a hash of its settings and resume.
Wall-clock times go under ``"timing"``, apart from the numbers, so that two executions can be
compared exactly.

* :func:`train_run` — one training run (:func:`validate.train.train`): final train/test loss and
  accuracy, whether and when it failed.
* :func:`reference_run` — a training run measured along the way at ``points`` evenly spaced
  steps (:func:`measure_point`): |G|², tr(Σ), GᵀHG, tr(HΣ), hence B_simple, B_noise, ε_max
  (:func:`validate.measure.hessian_noise`, jackknife standard errors over micro-batches), the
  top Hessian eigenvalues (Lanczos, :func:`validate.measure.top_hessian_eigenvalue`) and tr(H)
  (Hutch++, :func:`validate.measure.hessian_trace`).
* :func:`memory_run` — Myrtle's memory experiment: batches held aside are each trained on once,
  then their loss and that of unseen examples are followed step by step.

Measurement units: L is the mean loss (the training criterion, with its label smoothing); G, H
and Σ those of L (Σ per example, 1/N normalised); ``lr`` multiplies the mean minibatch gradient.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np

__all__ = ["measure_or_stop", "measure_point", "memory_run", "reference_run", "train_run",
           "train_config"]

#: Keys of :func:`validate.train.train`'s result kept in a run's record (numbers only).
RESULT_KEYS = (
    "test_acc", "test_loss", "initial_train_loss", "chance_loss", "final_train_loss",
    "final_train_acc", "failed", "failure", "failed_at_step", "diverged_at_step", "steps",
    "total_steps", "steps_per_epoch", "train_examples", "params", "peak_lr", "base_lr",
    "train_losses",
)


def train_config(settings: dict):
    """The :class:`validate.train.TrainConfig` stored (as a dict) in ``settings['train']``."""
    from validate.train import TrainConfig

    t = dict(settings["train"])
    t["channels"] = tuple(t.get("channels", (8, 16)))
    return TrainConfig(**t)


def _summary(result: dict) -> tuple[dict, dict]:
    """(numbers, timing) of a :func:`validate.train.train` result."""
    out = {k: result.get(k) for k in RESULT_KEYS}
    out["history"] = [{k: v for k, v in h.items() if k not in ("time_s", "examples_per_s")}
                      for h in result["history"]]
    out["model"] = type(result["model"]).__name__
    timing = {"train_s": result["time_s"], "examples_per_s": result["examples_per_s"]}
    return out, timing


def train_run(settings: dict, data, device) -> dict:
    """One training run with ``settings['train']``; returns its numbers and ``timing``."""
    from validate.train import train

    cfg = train_config(settings)
    out, timing = _summary(train(cfg, data, device=device, progress=False))
    out["timing"] = timing
    return out


# ---------------------------------------------------------------------------- reference run
def _seed(*parts) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] % 2**31)


def measurement_steps(total_steps: int, points: int) -> list[int]:
    """``points`` steps evenly spaced from 0 to ``total_steps`` (inclusive, de-duplicated).

    >>> measurement_steps(32, 4)
    [0, 11, 21, 32]
    """
    return sorted({int(round(s)) for s in np.linspace(0, total_steps, points)})


def _hessian_batches(state, measure: dict, step: int, seed: int):
    """The batches defining Ĥ: the whole training subset (no augmentation) once when
    ``hessian_batch`` is None or not smaller than it, else ``hessian_reps`` independent samples
    drawn with replacement (augmented like training)."""
    n = state.train_labels.shape[0]
    hb = measure.get("hessian_batch")
    if hb is None or hb >= n:
        return [(state.plain(slice(0, n)), state.train_labels)], True
    return [state.sample(int(hb), _seed(seed, step, 10 + r))
            for r in range(int(measure.get("hessian_reps", 1)))], False


def measure_point(state, criterion, measure: dict, seed: int) -> dict:
    r"""Noise and curvature of ``state.model`` at ``state.step`` (the model is left unchanged).

    * ``measure_batch`` examples drawn with replacement (augmented as in training) split into
      micro-batches of ``micro_batch``: |G|², tr(Σ), B_simple and, with Ĥ on an independent
      Hessian batch, GᵀHG, tr(HΣ), ε_max = |G|²/GᵀHG, B_noise = tr(HΣ)/GᵀHG (the two-batch
      estimators of :func:`validate.measure.hessian_noise`; jackknife standard errors);
    * on the Hessian batch (the whole training subset, or ``hessian_reps`` sampled ones): the
      ``top_k`` largest eigenvalues by Lanczos (at most ``lanczos_iters`` HVPs) and tr(H) by
      Hutch++ (``hutchinson`` HVPs). With several Hessian batches the values are their means and
      λ_max's standard error their spread/√reps; with the whole training subset λ_max has no
      sampling error (its standard error is reported as 0).
    """
    import torch

    from sgdtheory.krylov import KrylovConvergenceWarning
    from validate import measure as M

    model = state.model
    model.train()
    x, y = state.sample(int(measure["measure_batch"]), _seed(seed, state.step, 0))
    hess, whole = _hessian_batches(state, measure, state.step, seed)
    with torch.no_grad():
        loss = float(criterion(model(x).float(), y))
    hn = M.hessian_noise(model, criterion, x, y, micro_batch=int(measure["micro_batch"]),
                         hessian_inputs=hess[0][0], hessian_targets=hess[0][1])
    tops, traces, trace_ses, converged = [], [], [], True
    for r, (xh, yh) in enumerate(hess):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", KrylovConvergenceWarning)
            top = M.top_hessian_eigenvalue(model, criterion, xh, yh, k=int(measure["top_k"]),
                                           max_iter=int(measure["lanczos_iters"]), tol=1e-4,
                                           seed=_seed(seed, state.step, 20 + r))
        converged &= not any(issubclass(w.category, KrylovConvergenceWarning) for w in caught)
        tops.append([top] if isinstance(top, float) else list(top))
        tr, tr_se = M.hessian_trace(model, criterion, xh, yh, n_samples=int(measure["hutchinson"]),
                                    seed=_seed(seed, state.step, 30 + r), method="hutch++")
        traces.append(tr)
        trace_ses.append(tr_se)
    tops = np.array(tops)
    reps = tops.shape[0]
    lam_se = 0.0 if whole else (float(tops[:, 0].std(ddof=1) / math.sqrt(reps)) if reps > 1
                                else float("nan"))
    trace = float(np.mean(traces))
    trace_se = float(np.sqrt(np.sum(np.square(trace_ses))) / reps)
    if reps > 1:
        trace_se = max(trace_se, float(np.std(traces, ddof=1) / math.sqrt(reps)))
    rec = {
        "step": state.step,
        "epoch": state.step / state.steps_per_epoch,
        "lr": state.lr,
        "measure_loss": loss,
        "lambda_top": tops.mean(0).tolist(),
        "lambda_max": float(tops[:, 0].mean()),
        "lambda_max_stderr": lam_se,
        "lanczos_converged": bool(converged),
        "trace_h": trace,
        "trace_h_stderr": trace_se,
        "hessian_batch": int(hess[0][1].shape[0]),
        "hessian_whole_subset": whole,
        "hessian_reps": reps,
        "measure_batch": hn.batch,
        "micro_batch": hn.micro_batch,
    }
    for k in ("grad_sq", "tr_sigma", "b_simple", "g_h_g", "tr_h_sigma", "eps_max", "b_noise"):
        rec[k] = getattr(hn, k)
        rec[f"{k}_stderr"] = getattr(hn, f"{k}_stderr")
    return rec


def measure_or_stop(state, criterion, measure: dict, seed: int, records: list) -> dict | None:
    """:func:`measure_point` at ``state.step``, or — when the estimators reject a non-finite
    gradient or HVP — None, after appending ``{step, error}`` to ``records`` and ending the run
    (``state.diverged``: a failure of training, the loss is not finite there). Any other
    ValueError propagates."""
    try:
        return measure_point(state, criterion, measure, seed)
    except ValueError as e:
        if "finite" not in str(e):
            raise
        records.append({"step": state.step, "error": " ".join(str(e).split())})
        state.diverged = True
        return None


def reference_run(settings: dict, data, device) -> dict:
    """A training run (``settings['train']``) measured at ``settings['measure']['points']``
    evenly spaced steps by :func:`measure_point`; the records are in ``measurements``.

    A point whose model or measurement is not finite is recorded with its ``error`` and ends the
    run (as a failure of training: the loss is not finite there)."""
    from torch import nn

    from validate.train import train

    cfg = train_config(settings)
    measure = settings["measure"]
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    seed = int(settings.get("measure_seed", cfg.seed))
    seconds = []

    def callback(state):
        if state.step not in measurement_steps(state.total_steps, int(measure["points"])):
            return
        records = state.extra.setdefault("measurements", [])
        t0 = time.perf_counter()
        rec = measure_or_stop(state, criterion, measure, seed, records)
        if rec is None:
            return
        records.append(rec)
        seconds.append(time.perf_counter() - t0)

    result = train(cfg, data, device=device, progress=False, callback=callback)
    out, timing = _summary(result)
    out["measurements"] = result["extra"].get("measurements", [])
    out["dim"] = sum(p.numel() for p in result["model"].parameters() if p.requires_grad)
    timing["measure_s"] = float(np.sum(seconds))
    out["timing"] = timing
    return out


# ---------------------------------------------------------------------------- memory
def memory_plan(settings: dict, n_train: int) -> dict:
    """Which examples are held aside and when each probe batch is trained on.

    ``probes`` batches of B examples are drawn (without replacement, from a generator seeded by
    the run's seed) out of the training split and never used in the ordinary epochs; probe j
    replaces the batch of optimiser step ``start + j·every`` and is followed for ``track``
    steps after it. The unseen examples are the first ``unseen`` examples of the test split
    (all when None).
    """
    cfg = train_config(settings)
    p = settings["memory"]
    b = cfg.batch_size
    n_hold = int(p["probes"]) * b
    if n_hold > n_train - b:
        raise ValueError(f"memory: {p['probes']} probe batches of {b} leave fewer than one "
                         f"batch of the {n_train} training examples for training")
    perm = np.random.default_rng(_seed(cfg.seed, 4242)).permutation(n_train)
    steps = [int(p["start"]) + j * int(p["every"]) for j in range(int(p["probes"]))]
    return {"hold": perm[:n_hold], "rest": np.sort(perm[n_hold:]), "probe_steps": steps,
            "track": int(p["track"])}


def memory_run(settings: dict, data, device) -> dict:
    r"""Myrtle's memory measurement (details in :mod:`validate.experiments.memory`).

    For probe batch P_j trained on (once) by optimiser step s_j, and the unseen examples U (the
    test split), after k = 1 … ``track`` completed steps since then

        G_j(k) = [ℓ_P(θ_{s+k}) − ℓ_P(θ_s)] − [ℓ_U(θ_{s+k}) − ℓ_U(θ_s)],

    with ℓ the mean loss (eval mode) on the batch; the memory gap is gap(k) = −G_j(k), positive
    while P is remembered. P and U are exchangeable before step s, so E[G(k)] is exactly the
    difference between the loss of a seen batch and of unseen data, and subtracting the values
    at θ_s removes the batch-to-batch differences that are not memory. Returns the gaps of
    every probe (``gaps``: probes × track), the run's numbers, and — with
    ``settings['measure']`` — :func:`measure_point` at the first probe's step
    (``probe_start_measurement``: the curvature and noise the probes meet at this rate).
    """
    import dataclasses

    import torch
    import torch.nn.functional as F

    from validate.train import model_inputs, train

    cfg = train_config(settings)
    plan = memory_plan(settings, data.train_images.shape[0])
    b, track = cfg.batch_size, plan["track"]
    steps = plan["probe_steps"]
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    rest = dataclasses.replace(data, train_images=data.train_images[plan["rest"]],
                               train_labels=data.train_labels[plan["rest"]])
    n_probe = len(steps) * b
    n_unseen = settings["memory"].get("unseen") or data.test_images.shape[0]
    hx = torch.cat([model_inputs(data.train_images[plan["hold"]], data, dev),
                    model_inputs(data.test_images[:n_unseen], data, dev)])
    hy = torch.from_numpy(np.concatenate([data.train_labels[plan["hold"]],
                                          data.test_labels[:n_unseen]])).to(dev)
    probe_of_step = {s: j for j, s in enumerate(steps)}
    base = np.full((len(steps), 2), np.nan)          # ℓ_P(θ_s), ℓ_U(θ_s)
    gaps = np.full((len(steps), track), np.nan)

    def hook(step, x, y):
        j = probe_of_step.get(step)
        if j is None:
            return x, y
        return hx[j * b:(j + 1) * b], hy[j * b:(j + 1) * b]

    def losses(model):
        """Mean loss of each probe batch and of the unseen examples (eval mode)."""
        was = model.training
        model.eval()
        with torch.no_grad():
            per = F.cross_entropy(model(hx).float(), hy, reduction="none").double()
        model.train(was)
        probe = per[:n_probe].view(len(steps), b).mean(1).cpu().numpy()
        return probe, float(per[n_probe:].mean())

    measure = settings.get("measure")
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    measured = {}

    def callback(state):
        t = state.step
        if measure and t == steps[0]:  # the curvature the probes meet, before the first one
            try:
                measured.update(measure_point(state, criterion, measure, cfg.seed))
            except ValueError as e:  # non-finite: the run is failing; say so
                measured["error"] = " ".join(str(e).split())
        active = [j for j, s in enumerate(steps) if s <= t <= s + track]
        if not active:
            return
        probe, unseen = losses(state.model)
        for j in active:
            k = t - steps[j]
            if k == 0:
                base[j] = probe[j], unseen
            else:
                gaps[j, k - 1] = -((probe[j] - base[j, 0]) - (unseen - base[j, 1]))

    result = train(cfg, rest, device=dev, progress=False, callback=callback, batch_hook=hook)
    out, timing = _summary(result)
    out["gaps"] = gaps.tolist()
    out["probe_steps"] = steps
    out["held_aside"] = int(plan["hold"].size)
    out["probe_start_measurement"] = measured or None
    out["timing"] = timing
    return out
