r"""Myrtle's memory experiment on a real network: how long is a batch remembered after it is
trained on, at two learning rates ×8 apart?

**Runs** (:func:`validate.experiments.runs.memory_run`): ``probes`` batches of B examples are
held aside from the training split. Training runs at a constant rate after a linear warm-up
of ``warmup_epochs``; from ``start_epochs`` on, every ``every`` steps one probe batch takes the
place of the scheduled batch (it is trained on exactly once), and from then on, after every
optimiser step, the loss of that batch and of unseen data (the test split) are evaluated, for
``track_epochs``. The memory gap at lag k (steps completed since the probe's step, k = 1 right
after it) is

    gap(k) = −{[ℓ_P(θ_{s+k}) − ℓ_P(θ_s)] − [ℓ_U(θ_{s+k}) − ℓ_U(θ_s)]}

(positive while the probe is remembered; subtracting the values at θ_s removes batch-to-batch
differences that are not memory), averaged over the probes of all seeds, with standard errors
across probes; the probes of runs that failed (:mod:`validate.train`: e.g. collapsed to chance,
where a dead network remembers nothing) are left out and reported. The two rates: ``high_factor``
× the standard rate (1: the standard rate itself — at the lr sweep's middle factor 2 a constant
rate collapses some digits runs to chance) and that divided by ``ratio`` (8).

**Prediction** (from the reference run only — the learning-rate sweep's, at its middle factor
``reference_factor``, so both experiments share one measured run —,
:mod:`validate.experiments.predict`): the memory
time τ = (1−μ)/(η λ_Σ) steps, λ_Σ = tr(HΣ)/tr(Σ) pooled over the second half of the reference
run — the e-folding time of gap(k)/gap(1) in the quadratic model (plain SGD: each direction's
share of the memorised gradient noise decays like (1−ηλ_j)^{k−1}, initially at the Σ-weighted
mean rate ηλ_Σ). Drawn as gap(1)·exp(−(k−1)/τ).

**Measured memory time**: the lag at which the mean gap first falls to gap(1)/e, minus one
(steps after the first value; linear interpolation between lags). **Checks** (tolerances fixed
by the issue):

1. at the high rate the gap falls below 10% of its first value within one epoch (the first lag
   with gap ≤ 0.1·gap(1), in epochs of the run's training set, ≤ 1);
2. the memory time scales with 1/lr: τ(low)/τ(high) within 2× of the rate ratio (8);
3. the measured memory time is within 3× of the predicted one (each rate).

A gap that never falls to the threshold within the tracked lags leaves the time unresolved (the
check fails, saying so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import predict as pr
from .base import Context, claim, factor_claim
from .runner import Job

NAME = "memory"
TITLE = "Loss gap between a batch seen k steps ago and unseen data, at two learning rates ×8 " \
        "apart, with the predicted memory time"


@dataclass(frozen=True)
class Config:
    """The memory experiment's size (units in comments)."""

    high_factor: float = 1.0        # high rate: lr = f·η̃₀·B (1: the standard rate)
    reference_factor: float = 2.0   # the reference run's factor (the lr sweep's middle one)
    ratio: float = 8.0              # the low rate is the high one divided by this
    probes: int = 16                # probe batches per run, held aside from training
    unseen: int | None = None       # test examples standing for unseen data (None: all)
    warmup_epochs: float = 2.0      # linear warm-up to the constant rate
    start_epochs: float = 4.0       # the first probe after this many epochs
    every: int = 7                  # optimiser steps between probes
    track_epochs: float = 4.0       # each probe is followed for this many epochs
    seeds: int = 4                  # runs per rate (seed, seed + 1, …)
    epochs: int | None = None       # reference run's epochs; None: the recipe's
    points: int | None = None       # reference-run measurement points; None: recipe
    lanczos_iters: int | None = None
    hutchinson: int | None = None

    def __post_init__(self):
        for name in ("high_factor", "reference_factor", "ratio", "warmup_epochs",
                     "start_epochs", "track_epochs"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if self.ratio <= 1:
            raise ValueError(f"ratio must be > 1, got {self.ratio!r}")
        for name in ("probes", "every", "seeds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")


PRESETS = {
    "smoke": Config(probes=4, warmup_epochs=0.5, start_epochs=1.0, every=3, track_epochs=1.0,
                    seeds=1, epochs=2, points=3, lanczos_iters=30, hutchinson=12),
    "quick": Config(seeds=2),
    "default": Config(),
    "paper": Config(probes=16, unseen=2048, warmup_epochs=1.0, start_epochs=2.0, every=11,
                    track_epochs=3.0, seeds=2),
}


def rates(ctx: Context) -> dict:
    """{'high': factor, 'low': factor}."""
    return {"high": float(ctx.config.high_factor),
            "low": float(ctx.config.high_factor) / float(ctx.config.ratio)}


def plan(ctx: Context) -> dict:
    """Steps per epoch of the training that remains, probe start/spacing/tracking in steps,
    and the epochs and warm-up fraction of each memory run."""
    c, b = ctx.config, ctx.recipe.batches[0]
    spe = (ctx.n_train - c.probes * b) // b
    if spe < 1:
        raise ValueError(f"memory: {c.probes} probe batches of {b} leave no training batch of "
                         f"the {ctx.n_train} training examples")
    start = max(1, round(c.start_epochs * spe))
    track = max(2, round(c.track_epochs * spe))
    last = start + (c.probes - 1) * c.every + track + 1
    epochs = math.ceil(last / spe)
    return {"steps_per_epoch": spe, "start": start, "every": c.every, "track": track,
            "epochs": epochs, "warmup": min(c.warmup_epochs / epochs, 0.5)}


def reference_job(ctx: Context) -> Job:
    """The learning-rate sweep's reference run: ``reference_factor``, the whole training split,
    batch B, the recipe's schedule (same settings as the sweep's, hence the same result)."""
    f, b = float(ctx.config.reference_factor), ctx.recipe.batches[0]
    return Job("validate.experiments.runs:reference_run",
               {"train": ctx.train_settings(lr_factor=f, batch_size=b, seed=ctx.seed),
                "measure": ctx.measure_settings(), "measure_seed": ctx.seed},
               f"reference B={b} N={ctx.n_train} f={f:g}")


def jobs(ctx: Context) -> list[Job]:
    p = plan(ctx)
    b = ctx.recipe.batches[0]
    out = []
    for name, f in rates(ctx).items():
        for r in range(ctx.config.seeds):
            s = ctx.seed + r
            out.append(Job("validate.experiments.runs:memory_run", {
                "train": ctx.train_settings(lr_factor=f, batch_size=b, seed=s,
                                            schedule="constant", warmup=p["warmup"],
                                            epochs=p["epochs"]),
                "memory": {"probes": ctx.config.probes, "start": p["start"],
                           "every": p["every"], "track": p["track"],
                           "unseen": ctx.config.unseen},
                "measure": ctx.measure_settings()},
                f"memory {name} f={f:g} seed={s}"))
    return out


def predict(ctx: Context, ref: dict) -> dict:
    tr = ctx.recipe.train
    mu = float(tr.momentum)
    b = ctx.recipe.batches[0]
    eta0 = float(tr.base_lr)
    lam_s, lam_se = pr.lambda_sigma(ref["measurements"])
    p = plan(ctx)
    out = {"lambda_sigma": {"value": lam_s, "stderr": lam_se}, "rates": {},
           "steps_per_epoch": p["steps_per_epoch"], "standard_base_rate": eta0}
    summary = [f"λ_Σ = tr(HΣ)/tr(Σ) = {lam_s:.4g} ± {lam_se:.2g} (second half of the "
               "reference run)"]
    for name, f in rates(ctx).items():
        lr = f * eta0 * b
        tau = pr.memory_time(lr, lam_s, mu) if lam_s > 0 else float("nan")
        se = tau * lam_se / lam_s if lam_s > 0 else float("nan")
        out["rates"][name] = {"factor": f, "lr": lr, "memory_time_steps": tau,
                              "memory_time_stderr": se,
                              "memory_time_epochs": tau / p["steps_per_epoch"]}
        summary.append(f"{name} rate lr = {lr:.4g}: memory time (1−μ)/(η λ_Σ) = {tau:.3g} ± "
                       f"{se:.2g} steps = {tau / p['steps_per_epoch']:.3g} epochs")
    n = ctx.n_train - ctx.config.probes * b
    fl = pr.forgetting_limit(n, lam_s, mu) if lam_s > 0 else float("nan")
    out["forgetting_limit"] = {"base_rate": fl, "lr": fl * b, "factor": fl / eta0,
                               "n_data": n}
    summary.append(f"forgetting limit (memory of one epoch of {n}): lr {fl * b:.4g} "
                   f"(factor {fl / eta0:.3g})")
    out["summary"] = summary
    return out


def crossing(mean, level: float) -> float:
    """First lag k (1-based, interpolated linearly between lags) where ``mean`` ≤ ``level``;
    nan when it never does."""
    mean = np.asarray(mean, dtype=float)
    for i, v in enumerate(mean):
        if np.isfinite(v) and v <= level:
            if i == 0:
                return 1.0
            prev = mean[i - 1]
            return float(i + (prev - level) / (prev - v)) if prev != v else float(i + 1)
    return float("nan")


def _gaps(records, name):
    """The gaps (probes × lags) of the runs at rate ``name`` that did not fail."""
    rows = [np.asarray([[np.nan if v is None else v for v in row] for row in r["result"]["gaps"]],
                       dtype=float)
            for r in records if r["label"].startswith(f"memory {name} ")
            and not r["result"]["failed"]]
    return np.concatenate(rows) if rows else np.zeros((0, 0))


def _curve(records, name) -> dict:
    r"""The measured gap curve of rate ``name``: mean and standard error (std/√n) over the
    probes of gap(k) per lag k; gap(1) and whether it is resolved (> 2 s.e.); the memory time
    (first lag with gap ≤ gap(1)/e, :func:`crossing`, minus 1: steps after the first value)
    and the first lag with gap ≤ 0.1·gap(1); the failed runs and every run's final test loss."""
    g = _gaps(records, name)
    with np.errstate(invalid="ignore"):
        n = np.isfinite(g).sum(0)
        mean = np.nanmean(g, 0) if g.size else np.array([])
        se = np.nanstd(g, 0, ddof=1) / np.sqrt(np.maximum(n, 1)) if g.size else mean
    first = float(mean[0]) if mean.size else math.nan
    first_se = float(se[0]) if mean.size else math.nan
    resolved = math.isfinite(first) and first > 2 * first_se
    k_e = crossing(mean, first / math.e) if resolved else math.nan
    k_10 = crossing(mean, 0.1 * first) if resolved else math.nan
    failed = [r["result"]["failure"] for r in records
              if r["label"].startswith(f"memory {name} ") and r["result"]["failed"]]
    return {"mean": mean.tolist(), "stderr": se.tolist(), "probes": int(g.shape[0]),
            "first": first, "first_stderr": first_se, "resolved": resolved,
            "memory_time_steps": k_e - 1.0, "lag_10pct": k_10,
            "failed_runs": failed,
            "final_test_loss": [r["result"]["test_loss"] for r in records
                                if r["label"].startswith(f"memory {name} ")]}


def _check_within_epoch(hi: dict, predicted: dict, spe: int) -> dict:
    """Check 1: at the high rate the gap falls below 10% of gap(1) within one epoch (the lag,
    in epochs, ≤ 1); shown beside it: ln 10 predicted memory times τ = (1−μ)/(η λ_Σ)."""
    note_res = "" if hi["resolved"] else "the high-rate gap(1) is not resolved (≤ 2 s.e.)"
    return claim(
        "high rate: gap below 10% of its first value within one epoch",
        predicted["memory_time_steps"] * math.log(10) / spe, hi["lag_10pct"] / spe,
        bool(math.isfinite(hi["lag_10pct"]) and hi["lag_10pct"] / spe <= 1.0),
        "first lag with gap ≤ 0.1·gap(1), in epochs, ≤ 1", tolerance=1.0,
        uses_prediction=False,
        note=(note_res + "; " if note_res else "") + "predicted (shown, not part of the rule): "
        "ln 10 memory times, for a single exponential"
        + ("" if math.isfinite(hi["lag_10pct"]) else "; never within the tracked lags"))


def _check_memory_time(name: str, c: dict, predicted: dict) -> dict:
    """Check 3 (per rate): the measured memory time within 3× of τ = (1−μ)/(η λ_Σ)."""
    return factor_claim(
        f"memory time vs (1−μ)/(η λ_Σ) ({name} rate, lr {predicted['lr']:.3g})",
        predicted["memory_time_steps"], c["memory_time_steps"], 3.0,
        note=f"steps after the first value until gap ≤ gap(1)/e; gap(1) = "
             f"{c['first']:.3g} ± {c['first_stderr']:.2g} over {c['probes']} probes"
             + ("" if math.isfinite(c["memory_time_steps"]) else
                "; the gap did not fall to gap(1)/e within the tracked lags"))


def _area_finding(name: str, c: dict, predicted: dict, spe: int) -> str:
    """gap after one epoch relative to gap(1), and the area Σ_k gap(k)/gap(1) over the tracked
    lags (steps; a single exponential's is ≈ τ), which is stored in ``c['area_steps']``."""
    mean = np.asarray(c["mean"], dtype=float)
    at_epoch = mean[min(spe, mean.size) - 1] / c["first"] if mean.size else math.nan
    area = float(np.nansum(mean) / c["first"]) if mean.size else math.nan
    c["area_steps"] = area
    return (f"{name} rate (lr {predicted['lr']:.3g}): gap(1) = {c['first']:.3g} ± "
            f"{c['first_stderr']:.2g}; after one epoch the gap is {at_epoch:.3g} of it; "
            f"measured memory time {c['memory_time_steps']:.3g} steps vs predicted "
            f"{predicted['memory_time_steps']:.3g}; area under gap(k)/gap(1) over the "
            f"{mean.size} tracked steps {area:.3g} steps")


def _own_curvature_finding(ctx: Context, records, name: str, c: dict,
                           predictions: dict) -> str | None:
    """λ_max and λ_Σ = tr(HΣ)/tr(Σ) (ratio of the means over the runs) measured in the rate's
    own runs when probing starts, and the memory time (1−μ)/(η λ_Σ) they would give (stored in
    ``c``); None when no run measured them."""
    own = [r["result"].get("probe_start_measurement") or {} for r in records
           if r["label"].startswith(f"memory {name} ") and not r["result"]["failed"]]
    own = [m for m in own if m.get("tr_sigma") and m.get("tr_h_sigma") is not None]
    if not own:
        return None
    mu = float(ctx.recipe.train.momentum)
    lam_max = float(np.mean([m["lambda_max"] for m in own]))
    lam_s = float(np.mean([m["tr_h_sigma"] for m in own]) / np.mean([m["tr_sigma"]
                                                                    for m in own]))
    lr = predictions["rates"][name]["lr"]
    tau = pr.memory_time(lr, lam_s, mu) if lam_s > 0 else math.nan
    c.update(own_lambda_max=lam_max, own_lambda_sigma=lam_s, own_memory_time_steps=tau)
    return (f"{name} rate (lr {lr:.3g}), measured in its own runs when probing starts: λ_max "
            f"{lam_max:.3g} (η·λ_max = {lr * lam_max:.2g}), λ_Σ {lam_s:.3g} (the reference "
            f"run's: {predictions['lambda_sigma']['value']:.3g}); with it the memory time "
            f"(1−μ)/(η λ_Σ) would be {tau:.3g} steps (measured "
            f"{c['memory_time_steps']:.3g})")


def analyse(ctx: Context, predictions: dict, ref: dict, records: list[dict]) -> dict:
    """The gap curves of the two rates, the checks (module docstring) and the findings."""
    spe = predictions["steps_per_epoch"]
    pr_ = predictions["rates"]
    curves = {name: _curve(records, name) for name in ("high", "low")}
    hi, lo = curves["high"], curves["low"]
    checks, findings = [_check_within_epoch(hi, pr_["high"], spe)], []
    ratio = lo["memory_time_steps"] / hi["memory_time_steps"] \
        if hi["memory_time_steps"] and math.isfinite(hi["memory_time_steps"]) else math.nan
    checks.append(factor_claim(
        "memory time scales with 1/lr (low/high rate)", float(ctx.config.ratio), ratio, 2.0,
        note="measured τ(low)/τ(high); predicted: the rate ratio"))
    for name in ("high", "low"):
        c = curves[name]
        checks.append(_check_memory_time(name, c, pr_[name]))
        if c["failed_runs"]:
            findings.append(f"{name} rate: {len(c['failed_runs'])} run(s) failed: "
                            f"{c['failed_runs']}")
    findings += [_area_finding(name, curves[name], pr_[name], spe) for name in ("high", "low")]
    for name in ("high", "low"):
        own = _own_curvature_finding(ctx, records, name, curves[name], predictions)
        if own is not None:
            findings.append(own)
    areas = [curves[n].get("area_steps", math.nan) for n in ("high", "low")]
    findings.append(f"area ratio low/high rate {areas[1] / areas[0]:.3g} (the rate ratio is "
                    f"{ctx.config.ratio:g}; areas are truncated at the tracked lags)")
    rows = [{"label": r["label"], "key": r["key"], "lr": r["result"]["peak_lr"],
             **{k: r["result"].get(k) for k in ("failed", "failure", "final_train_loss",
                                                 "test_loss", "test_acc", "steps")}}
            for r in records]
    return {"curves": curves, "steps_per_epoch": spe, "plan": plan(ctx),
            "checks": checks, "findings": findings, "runs": rows}


def plot(report: dict):
    """Left: the memory gap vs steps since the batch was seen (epochs on top), with the
    predicted exponential; right: the gap relative to its first value, in epochs."""
    from sgdtheory.experiments import _plotting as P

    a = report["analysis"]
    pred = report["predictions"]
    spe = float(a["steps_per_epoch"])
    fig, axes = P.subplots(1, 2, panel_size=(4.6, 3.5),
                           title=f"Memory of a seen batch on {report['data']['source']}: "
                                 f"{report['model']['name']}, B = "
                                 f"{report['recipe']['batches'][0]}")
    ax0, ax1 = axes
    for i, name in enumerate(("high", "low")):
        c = a["curves"][name]
        mean = np.array([np.nan if v is None else v for v in c["mean"]], dtype=float)
        se = np.array([np.nan if v is None else v for v in c["stderr"]], dtype=float)
        k = np.arange(1, mean.size + 1, dtype=float)
        col = P.color(i)
        p = pred["rates"][name]
        lab = f"{name} lr η = {p['lr']:.3g} (f = {p['factor']:g})"
        ax0.fill_between(k, mean - se, mean + se, color=col, alpha=0.2, lw=0)
        ax0.plot(k, mean, color=col, lw=1.2, label=lab)
        tau = p["memory_time_steps"]
        first = c["first"]
        if first and tau and math.isfinite(tau) and tau > 0:
            P.theory(ax0, k, first * np.exp(-(k - 1) / tau), c=col, ls="--", lw=1.0)
            P.theory(ax1, k / spe, np.exp(-(k - 1) / tau), c=col, ls="--", lw=1.0)
        own = c.get("own_memory_time_steps")
        if first and own and math.isfinite(own) and own > 0:
            P.theory(ax1, k / spe, np.exp(-(k - 1) / own), c=col, ls=":", lw=1.0)
        if first:
            ax1.fill_between(k / spe, (mean - se) / first, (mean + se) / first, color=col,
                             alpha=0.2, lw=0)
            ax1.plot(k / spe, mean / first, color=col, lw=1.2, label=f"{name} lr")
        mt = c["memory_time_steps"]
        if mt is not None and math.isfinite(mt):
            ax1.plot((mt + 1) / spe, 1 / math.e, "o", color=col, mfc="white", ms=5, zorder=4)
    ax0.set_xscale("log")
    ax0.axhline(0.0, color="0.3", lw=0.8)
    ax0.set_xlabel("k: steps since the batch was trained on")
    ax0.set_ylabel("memory gap: unseen − seen loss change")
    top = ax0.secondary_xaxis("top", functions=(lambda x: x / spe, lambda e: e * spe))
    top.set_xlabel(f"epochs ({int(spe)} steps)", fontsize=8.5)
    from matplotlib.lines import Line2D

    P.legend(ax0, key=False, loc="upper right",
             extra=[(Line2D([], [], color="0.35", ls="--", lw=1.0),
                     "predicted gap(1)·e^{−(k−1)/τ},\nτ = (1−μ)/(η λ_Σ)"),
                    (Line2D([], [], color="0.35", lw=6, alpha=0.3), "measured ± s.e.")])
    ax1.set_xscale("log")
    ax1.axhline(0.0, color="0.3", lw=0.8)
    ax1.axhline(1 / math.e, color="0.5", lw=0.8, ls=":")
    ax1.axhline(0.1, color="0.5", lw=0.8, ls="-.")
    ax1.axvline(1.0, color="0.5", lw=0.8, ls=":")
    ax1.set_ylim(-0.4, 1.3)
    ax1.set_xlabel("k in epochs")
    ax1.set_ylabel("gap(k) / gap(1)")
    ax1.set_title("grey: 1/e (memory time, ○), 10% (dash-dot), one epoch;\n"
                  "coloured dotted: τ from the λ_Σ of the memory runs themselves", fontsize=8)
    P.legend(ax1, key=False, loc="upper right")
    return fig
