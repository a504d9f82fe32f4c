r"""Myrtle's curvature-versus-forgetting sweep on a real network ("How to train your ResNet" 2).

**Grid.** Learning-rate factor f on a ×2 grid (1/8 … 32) around the data set's standard rate
η̃₀ (a base rate, per example; the recipe's ``base_lr``): the run's ``lr`` is η = f·η̃₀·B, so at
one factor the 4× batch takes a 4× larger step (Myrtle's sum convention) — × training-subset
size N (``n_sizes`` sizes ×2 apart, the largest the whole training split; nested seeded
subsets) × two batch sizes B and 4B × ``seeds`` seeds; the same number of epochs for every N
and the recipe's schedule (warm-up, then linear decay), the factor scaling the whole schedule.
Each run records its final train and test loss and accuracy and whether and when it failed
(:mod:`validate.train`: non-finite loss or > 10× the initial loss at any step, or a final
training loss not below the initial one nor below the chance loss).

**Reference run and predictions** (:mod:`validate.experiments.predict`; nothing is fitted to
the sweep): the middle of the grid — the median factor, the whole training split, batch B,
the first seed — measured at evenly spaced steps. From it: the curvature limit
η_c = 2(1+μ)/λ_max with the largest λ_max seen; the noise-aware limit η_c(B) (the predicted
failure rate); 2·ε_opt(B) for reference; the forgetting limit η̃_f = (1−μ)/(N λ_Σ) per N. In
factor units a rate η at batch B is f = η/(B η̃₀).

**Measured failure factor** of one (B, N): the lowest grid factor, above the best working one
(lowest mean test loss among factors where at most half the seeds fail), at which more than half
the seeds fail. Counting from the best working factor leaves out runs at the bottom of the grid
that fail only by training too little (few steps with small N and large B); an N none of whose
factors works "does not train at all" and is left out, as the issue's claim says.
**Best factor**: the lowest mean final test loss over the working factors, refined by a parabola
through it and its neighbours in (log f, log loss).

**Checks** (the seeds' claims; tolerances fixed by the issue, not tuned on data):

1. the failure factor is the same for every N that trains at all — max/min over N ≤ 2 (within
   one grid step), for each batch size;
2. in base-rate units the 4× batch fails at a factor ≥ 2× lower: median_N f_fail(B) /
   median_N f_fail(4B) ≥ 2 (the prediction shown beside it is [η_c(B)/B]/[η_c(4B)/4B]);
3. the measured failure ``lr`` (median over N of f_fail·η̃₀·B) is within 2× of the predicted
   η_c(B), for both batch sizes;
4. the best factor falls as N grows: the least-squares slope of log(best factor) on log N over
   the N that train is < 0, for each batch size.

**Findings** (reported, not checked): how far beyond 2·ε_opt(B) training stays stable and where
the best rate lies relative to it; the forgetting limits against the best factors; λ_max along
the reference run.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from . import predict as pr
from .base import Context, claim, factor_claim
from .runner import Job

NAME = "lr_sweep"
TITLE = "Final train/test loss vs learning-rate factor for four training-set sizes and two " \
        "batch sizes, with the predicted failure rate"


@dataclass(frozen=True)
class Config:
    """The sweep's size (units in comments); the data set's recipe gives the runs themselves."""

    factors: tuple = tuple(2.0**k for k in range(-3, 6))  # f: base rate f·η̃₀ (1/8 … 32)
    n_sizes: int = 4                # training-subset sizes N_max/2^k, k = 0 … n_sizes − 1
    seeds: int = 3                  # runs per grid point (seed, seed + 1, …)
    epochs: int | None = None       # epochs of every run (the same for every N); None: recipe
    points: int | None = None       # reference-run measurement points; None: recipe
    lanczos_iters: int | None = None  # Lanczos HVPs per point; None: recipe
    hutchinson: int | None = None   # Hutch++ HVPs per point; None: recipe

    def __post_init__(self):
        f = np.asarray(self.factors, dtype=float)
        if f.ndim != 1 or f.size < 3 or np.any(f <= 0) or np.any(np.diff(f) <= 0):
            raise ValueError(f"factors must be ≥ 3 increasing positive numbers, got "
                             f"{self.factors!r}")
        for name in ("n_sizes", "seeds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "n_sizes"
                                                                      else 1):
                raise ValueError(f"{name} must be an integer ≥ {2 if name == 'n_sizes' else 1}"
                                 f", got {v!r}")


PRESETS = {
    "smoke": Config(factors=(0.25, 1.0, 4.0, 16.0), n_sizes=2, seeds=1, epochs=2, points=3,
                    lanczos_iters=30, hutchinson=12),
    "quick": Config(seeds=1),
    "default": Config(),
    "paper": Config(seeds=2),
}


# ---------------------------------------------------------------------------- the grid
def sizes(ctx: Context) -> list[int]:
    """Training-subset sizes N_max/2^k (descending), N_max the whole training split."""
    return [ctx.n_train // 2**k for k in range(ctx.config.n_sizes)]


def reference_factor(config: Config) -> float:
    """The middle of the factor grid (its median entry)."""
    return float(config.factors[len(config.factors) // 2])


def reference_job(ctx: Context) -> Job:
    f = reference_factor(ctx.config)
    b = ctx.recipe.batches[0]
    return Job("validate.experiments.runs:reference_run",
               {"train": ctx.train_settings(lr_factor=f, batch_size=b, seed=ctx.seed),
                "measure": ctx.measure_settings(), "measure_seed": ctx.seed},
               f"reference B={b} N={ctx.n_train} f={f:g}")


def jobs(ctx: Context) -> list[Job]:
    out = []
    for b in ctx.recipe.batches:
        for n in sizes(ctx):
            if b > n:
                continue
            for f in ctx.config.factors:
                for r in range(ctx.config.seeds):
                    s = ctx.seed + r
                    out.append(Job("validate.experiments.runs:train_run",
                                   {"train": ctx.train_settings(
                                       lr_factor=float(f), batch_size=b, seed=s,
                                       subset=None if n >= ctx.n_train else n)},
                                   f"B={b} N={n} f={f:g} seed={s}"))
    return out


# ---------------------------------------------------------------------------- predictions
def predict(ctx: Context, ref: dict) -> dict:
    """The predictions drawn on the figure, from the reference run only."""
    tr = ctx.recipe.train
    mu, nest = float(tr.momentum), bool(tr.nesterov) and tr.momentum > 0
    eta0 = float(tr.base_lr)
    meas = ref["measurements"]
    lam = pr.largest_lambda(meas)
    point = lam["point"]
    eta_c, eta_c_se = pr.curvature_limit(lam["lambda_max"], mu, nest, lam["stderr"] or 0.0)
    form = ("Nesterov 2(1+μ)/((1+2μ)λ_max)" if nest else "heavy ball 2(1+μ)/λ_max") \
        if mu > 0 else "2/λ_max"
    noise, eps = {}, {}
    for b in ctx.recipe.batches:
        try:
            v, se, note = pr.noise_limit(point["lambda_top"], point["trace_h"], ref["dim"], b,
                                         mu, nest, top_stderr=lam["stderr"] or 0.0,
                                         trace_stderr=point["trace_h_stderr"] or 0.0)
        except ValueError as e:  # a spectrum the model cannot take: say why, predict nothing
            v, se, note = None, None, " ".join(str(e).split())
        noise[str(b)] = {"lr": v, "stderr": se, "base_rate": None if v is None else v / b,
                         "factor": None if v is None else v / (b * eta0), "note": note}
        by_point = [pr.eps_opt_lr(b, m["eps_max"], m["b_noise"], mu)
                    for m in pr.valid_points(meas)]
        finite = [v for v in by_point if math.isfinite(v)]
        eps[str(b)] = {"by_point": by_point,
                       "min": min(finite) if finite else None,
                       "median": float(np.median(finite)) if finite else None,
                       "max": max(finite) if finite else None}
    lam_s, lam_s_se = pr.lambda_sigma(meas)
    forget = {}
    for n in sizes(ctx):
        base = pr.forgetting_limit(n, lam_s, mu) if lam_s > 0 else float("nan")
        forget[str(n)] = {"base_rate": base, "factor": base / eta0,
                          "stderr_factor": base / eta0 * lam_s_se / lam_s if lam_s > 0 else None}
    summary = [
        f"largest λ_max along the reference run {lam['lambda_max']:.4g} ± "
        f"{lam['stderr'] or 0:.2g} (step {lam['step']}; at step 0: "
        f"{pr.valid_points(meas)[0]['lambda_max']:.4g})",
        f"curvature limit η_c = {form} = {eta_c:.4g} ± {eta_c_se:.2g}",
    ]
    for b in ctx.recipe.batches:
        n_ = noise[str(b)]
        summary.append(
            f"B = {b}: noise-aware limit η_c(B) = "
            + (f"{n_['lr']:.4g} ± {n_['stderr']:.2g} (factor {n_['factor']:.3g})"
               if n_["lr"] is not None else "not available")
            + f"; curvature limit as a factor {eta_c / (b * eta0):.3g}; 2·ε_opt(B) "
            f"{_fmt(eps[str(b)]['min'])} … {_fmt(eps[str(b)]['max'])} along the run")
    summary.append(f"λ_Σ = tr(HΣ)/tr(Σ) = {lam_s:.4g} ± {lam_s_se:.2g}; forgetting limit "
                   "(factor) " + ", ".join(f"N={n}: {v['factor']:.3g}"
                                           for n, v in forget.items()))
    return {"lambda_max": {k: v for k, v in lam.items() if k != "point"},
            "curvature_limit": {"lr": eta_c, "stderr": eta_c_se, "form": form},
            "noise_limit": noise, "two_eps_opt": eps,
            "lambda_sigma": {"value": lam_s, "stderr": lam_s_se},
            "forgetting_limit": forget, "standard_base_rate": eta0, "summary": summary}


def _fmt(v) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.3g}"


# ---------------------------------------------------------------------------- analysis
def _grid(ctx: Context, records: list[dict]):
    """Arrays (B, N, F, seed) of failure flags and final losses (nan when not measured)."""
    bs, ns, fs = ctx.recipe.batches, sizes(ctx), list(ctx.config.factors)
    shape = (len(bs), len(ns), len(fs), ctx.config.seeds)
    failed = np.ones(shape, dtype=bool)
    present = np.zeros(shape, dtype=bool)
    vals = {k: np.full(shape, np.nan) for k in ("test_loss", "final_train_loss", "test_acc",
                                                 "final_train_acc")}
    for rec in records:
        t = rec["settings"]["train"]
        i = bs.index(t["batch_size"])
        j = ns.index(t["subset"] if t["subset"] is not None else ctx.n_train)
        k = fs.index(t["lr_factor"])
        s = t["seed"] - ctx.seed
        r = rec["result"]
        present[i, j, k, s] = True
        failed[i, j, k, s] = bool(r["failed"])
        for key in vals:
            v = r.get(key)
            vals[key][i, j, k, s] = np.nan if v is None else v
    return failed, present, vals


def best_factor(factors, loss) -> float:
    """Minimiser of ``loss`` (nan = failed) over the log-factor grid, refined by a parabola in
    (log f, log loss) through the lowest point and its neighbours when all three are finite."""
    loss = np.asarray(loss, dtype=float)
    logf = np.log(np.asarray(factors, dtype=float))
    ok = np.isfinite(loss)
    if not ok.any():
        return float("nan")
    i = int(np.nanargmin(np.where(ok, loss, np.nan)))
    if 0 < i < len(loss) - 1 and np.all(ok[i - 1:i + 2]) and np.all(loss[i - 1:i + 2] > 0):
        y0, y1, y2 = np.log(loss[i - 1:i + 2])
        d = y0 - 2 * y1 + y2
        if d > 0:
            h = logf[i + 1] - logf[i]
            return float(np.exp(logf[i] + 0.5 * h * (y0 - y2) / d))
    return float(np.exp(logf[i]))


def failure_factor(factors, frac_failed, mean_test) -> float | None:
    """The lowest factor above the best working one where more than half the seeds fail;
    ``inf`` when none fails above it; ``None`` when no factor works (does not train at all)."""
    working = frac_failed <= 0.5
    if not working.any():
        return None
    loss = np.where(working, mean_test, np.nan)
    if not np.isfinite(loss).any():
        return None
    best = int(np.nanargmin(loss))
    above = [k for k in range(best + 1, len(factors)) if not working[k]]
    return float(factors[above[0]]) if above else math.inf


def _slope(n, best) -> float:
    return float(np.polyfit(np.log(n), np.log(best), 1)[0])


def _cell_stats(present, failed, vals):
    r"""Per (B, N, f) cell over its seeds: the fraction of runs that failed, and the mean and
    standard error (std/√n, nan with fewer than two working seeds) of each final value over
    the seeds that worked (nan when none did)."""
    with warnings.catch_warnings():  # all-nan slices (every seed failed) are expected: nan
        warnings.simplefilter("ignore", RuntimeWarning)
        frac = np.where(present, failed, np.nan)
        frac = np.nanmean(frac, axis=-1)                      # (B, N, F)
        ok = ~failed & present
        means = {k: np.where(ok.any(-1), np.nanmean(np.where(ok, v, np.nan), -1), np.nan)
                 for k, v in vals.items()}
        n_ok = ok.sum(-1)
        ses = {k: np.where(n_ok > 1, np.nanstd(np.where(ok, v, np.nan), -1, ddof=1)
                           / np.sqrt(np.maximum(n_ok, 1)), np.nan)
               for k, v in vals.items()}
    return frac, means, ses


def _failure_and_best(factors, present, frac, mean_test):
    """Per (B, N): the failure factor (:func:`failure_factor`), the best factor
    (:func:`best_factor` over the working factors) and whether the N trains at all; nan (and
    False) where the grid has no run or nothing works."""
    shape = present.shape[:2]
    f_fail = np.full(shape, np.nan)
    best = np.full(shape, np.nan)
    trains = np.zeros(shape, dtype=bool)
    for i in range(shape[0]):
        for j in range(shape[1]):
            if not present[i, j].any():
                continue
            ff = failure_factor(factors, frac[i, j], mean_test[i, j])
            trains[i, j] = ff is not None
            if ff is not None:
                f_fail[i, j] = ff
                working = np.where(frac[i, j] <= 0.5, mean_test[i, j], np.nan)
                best[i, j] = best_factor(factors, working)
    return f_fail, best, trains


def _check_same_failure(bs, ns, f_fail, trains):
    """Check 1 per B: max/min over the N that train of the failure factor ≤ 2 (one grid step).
    Returns (checks, the median failure factor over N per B, nan when no N trains)."""
    checks, med_fail = [], []
    for i, b in enumerate(bs):
        ff = f_fail[i, trains[i]]
        names = [n for n, t in zip(ns, trains[i], strict=True) if t]
        spread = float(np.max(ff) / np.min(ff)) if ff.size else math.nan
        idle = [n for n, t in zip(ns, trains[i], strict=True) if not t]
        checks.append(claim(
            f"failure factor the same for every N (B={b})", 1.0, spread,
            bool(ff.size >= 2 and spread <= 2.0), "max/min over N of the failure factor ≤ 2 "
            "(one grid step)", tolerance=2.0,
            note="failure factor per N: " + ", ".join(
                f"N={n}: {_fmt(v)}" for n, v in zip(names, ff, strict=True))
            + (f"; N that do not train at all: {idle}" if idle else "")))
        med_fail.append(float(np.median(ff)) if ff.size else math.nan)
    return checks, med_fail


def _check_batch_ratio(bs, med_fail, noise_limit) -> dict:
    """Check 2: median_N f_fail(B)/median_N f_fail(4B) ≥ 2 (factor units: base rates); the
    prediction shown beside it is the ratio of the noise-aware limits' base rates
    [η_c(B)/B]/[η_c(4B)/4B]."""
    pred_ratio = None
    if all(noise_limit[str(b)]["base_rate"] is not None for b in bs):
        pred_ratio = noise_limit[str(bs[0])]["base_rate"] / noise_limit[str(bs[1])]["base_rate"]
    ratio = med_fail[0] / med_fail[1] if med_fail[1] and math.isfinite(med_fail[1]) \
        else math.nan
    return claim(
        f"4× batch fails at a factor ≥ 2× lower (B={bs[0]} vs {bs[1]})", pred_ratio, ratio,
        bool(math.isfinite(ratio) and ratio >= 2.0), "median_N f_fail(B)/f_fail(4B) ≥ 2",
        tolerance=2.0, uses_prediction=False,
        note="predicted: the ratio of the noise-aware limits in base-rate units (shown, not "
             "part of the rule)")


def _check_failure_lr(bs, med_fail, eta0, predictions) -> list[dict]:
    """Check 3 per B: the measured failure lr, median_N f_fail·η̃₀·B, within 2× of the
    predicted noise-aware limit η_c(B)."""
    nl = predictions["noise_limit"]
    checks = []
    for i, b in enumerate(bs):
        meas = med_fail[i] * eta0 * b if math.isfinite(med_fail[i]) else math.nan
        checks.append(factor_claim(
            f"failure lr vs noise-aware limit η_c(B) (B={b})", nl[str(b)]["lr"], meas, 2.0,
            note=f"measured: median over N of the first failing grid lr f·η̃₀·B; predicted: "
                 f"η_c(B) on the reference spectrum (± {_fmt(nl[str(b)]['stderr'])}); the "
                 f"curvature limit {predictions['curvature_limit']['lr']:.4g}"))
    return checks


def _check_best_falls(bs, ns, best, trains):
    """Check 4 per B: the least-squares slope of log(best factor) on log N, over the N that
    train with a resolved best factor, is < 0 (−1 where forgetting-limited, shown).
    Returns (checks, slopes)."""
    checks, slopes = [], []
    for i, b in enumerate(bs):
        sel = trains[i] & np.isfinite(best[i])
        slope = _slope(np.asarray(ns)[sel], best[i, sel]) if sel.sum() >= 2 else math.nan
        slopes.append(slope)
        checks.append(claim(
            f"best factor falls as N grows (B={b})", -1.0, slope,
            bool(math.isfinite(slope) and slope < 0),
            "least-squares slope of log(best factor) on log N < 0", tolerance=0.0,
            uses_prediction=False,
            note="best factor per N: " + ", ".join(
                f"N={n}: {_fmt(v)}" for n, v in zip(np.asarray(ns)[sel], best[i, sel],
                                                    strict=True))
            + "; predicted −1 where forgetting-limited (shown, not part of the rule)"))
    return checks, slopes


def _stability_findings(bs, factors, frac, best, trains, eta0, predictions) -> list[str]:
    """Per B: the largest working lr (largest grid factor f with at most half the seeds
    failing, as f·η̃₀·B) and the best lr (median over N) as multiples of the reference run's
    median 2·ε_opt(B)."""
    findings = []
    for i, b in enumerate(bs):
        e = predictions["two_eps_opt"][str(b)]
        working = np.where(frac[i] <= 0.5, factors[None, :], np.nan)
        largest_ok = np.nanmax(working[trains[i]]) if trains[i].any() else math.nan
        if e["median"] and math.isfinite(largest_ok):
            lr_ok = largest_ok * eta0 * b
            best_lr = float(np.nanmedian(best[i, trains[i]])) * eta0 * b
            findings.append(
                f"B={b}: training stays stable up to lr {lr_ok:.3g} (largest working grid "
                f"factor {largest_ok:g}), {lr_ok / e['median']:.3g}× the median 2·ε_opt(B) = "
                f"{e['median']:.3g} of the reference run (range {_fmt(e['min'])} … "
                f"{_fmt(e['max'])}); the best lr (median over N) {best_lr:.3g} is "
                f"{best_lr / e['median']:.3g}× it")
    return findings


def _reference_findings(ctx: Context, ref: dict) -> list[str]:
    """λ_max along the reference run, and η·λ_max/(1+μ) there (above 2: beyond the local
    curvature limit of heavy-ball momentum μ)."""
    pts = pr.valid_points(ref["result"]["measurements"])
    findings = ["reference run λ_max: " + ", ".join(
        f"step {m['step']}: {m['lambda_max']:.3g}" for m in pts)]
    mu = float(ctx.recipe.train.momentum)
    prod = [(m["lr"] * m["lambda_max"] / (1 + mu), m["step"]) for m in pts if m["lr"] > 0]
    if prod:
        top, at = max(prod)
        findings.append(
            f"reference run η·λ_max/(1+μ) (above 2: beyond the local curvature limit): max "
            f"{top:.3g} at step {at}, median {float(np.median([v for v, _ in prod])):.3g}, "
            f"above 2 at {sum(v > 2 for v, _ in prod)} of {len(prod)} points — the run trains "
            "on regardless")
    return findings


def _rows(records: list[dict]) -> list[dict]:
    """The compact row of each sweep run stored in the report."""
    return [{"label": r["label"], "key": r["key"],
             **{k: r["settings"]["train"][k] for k in ("batch_size", "subset", "lr_factor",
                                                       "seed")},
             "lr": r["result"]["peak_lr"],
             **{k: r["result"].get(k) for k in (
                 "failed", "failure", "failed_at_step", "initial_train_loss", "chance_loss",
                 "final_train_loss", "final_train_acc", "test_loss", "test_acc", "steps",
                 "total_steps")}} for r in records]


def analyse(ctx: Context, predictions: dict, ref: dict, records: list[dict]) -> dict:
    """Failure and best factors per (B, N), the four checks (module docstring) and the
    findings."""
    factors = np.asarray(ctx.config.factors, dtype=float)
    bs, ns = ctx.recipe.batches, sizes(ctx)
    eta0 = predictions["standard_base_rate"]
    failed, present, vals = _grid(ctx, records)
    frac, means, ses = _cell_stats(present, failed, vals)
    f_fail, best, trains = _failure_and_best(factors, present, frac, means["test_loss"])
    checks, med_fail = _check_same_failure(bs, ns, f_fail, trains)
    checks.append(_check_batch_ratio(bs, med_fail, predictions["noise_limit"]))
    checks += _check_failure_lr(bs, med_fail, eta0, predictions)
    falls, slopes = _check_best_falls(bs, ns, best, trains)
    checks += falls
    # findings: the one-step criterion, forgetting limits, sharpness along the reference run
    findings = _stability_findings(bs, factors, frac, best, trains, eta0, predictions)
    fl = predictions["forgetting_limit"]
    findings.append(f"forgetting limit (factor) vs best factor at B={bs[0]}: " + ", ".join(
        f"N={n}: {fl[str(n)]['factor']:.3g} vs {_fmt(best[0, j])}" for j, n in enumerate(ns)))
    findings += _reference_findings(ctx, ref)
    return {
        "factors": factors.tolist(), "batches": list(bs), "sizes": ns,
        "standard_base_rate": eta0, "epochs": ctx.epochs,
        "frac_failed": frac.tolist(), "trains": trains.tolist(),
        "failure_factor": f_fail.tolist(), "best_factor": best.tolist(),
        "slopes": slopes,
        **{f"mean_{k}": v.tolist() for k, v in means.items()},
        **{f"se_{k}": v.tolist() for k, v in ses.items()},
        "checks": checks, "findings": findings, "runs": _rows(records),
    }


# ---------------------------------------------------------------------------- figure
def _nan(x):
    if isinstance(x, list):
        return [_nan(v) for v in x]
    return np.nan if x is None else x


def _loss_panel(ax, P, a: dict, pred: dict, i: int, key: str) -> None:
    """One loss panel (``key``: final_train_loss or test_loss) at the i-th batch size B: mean
    ± s.e. over the working seeds vs the factor f, one line per N; × at a height above the
    data where most seeds fail; on the test panel ★ at each N's best factor and the forgetting
    limit (1−μ)/(N λ_Σ)/η̃₀ dashed; the predicted failure factor η_c(B)/(B η̃₀) solid, the
    curvature limit 2(1+μ)/(λ_max B η̃₀) dotted, the 2·ε_opt(B) band grey."""
    factors = np.asarray(a["factors"])
    b, ns = a["batches"][i], a["sizes"]
    eta0 = a["standard_base_rate"]
    frac = np.asarray(_nan(a["frac_failed"]), dtype=float)
    best = np.asarray(_nan(a["best_factor"]), dtype=float)
    curv_f = pred["curvature_limit"]["lr"] / (b * eta0)
    noise_f = pred["noise_limit"][str(b)]["factor"]
    e = pred["two_eps_opt"][str(b)]
    mean = np.asarray(_nan(a[f"mean_{key}"]), dtype=float)[i]
    se = np.asarray(_nan(a[f"se_{key}"]), dtype=float)[i]
    finite = mean[np.isfinite(mean) & (mean > 0)]
    top = float(finite.max()) * 3 if finite.size else 10.0
    for j, n in enumerate(ns):
        c = P.color(j)
        good = (frac[i, j] <= 0.5) & np.isfinite(mean[j])
        ax.plot(factors[good], mean[j, good], color=c, lw=0.8, alpha=0.7)
        P.simulated(ax, factors[good], mean[j, good], np.nan_to_num(se[j, good]), c=c,
                    ms=3.5)
        bad = ~(frac[i, j] <= 0.5)
        ax.plot(factors[bad], np.full(bad.sum(), top / 1.25 ** j), "x", color=c, ms=4)
        if key == "test_loss" and np.isfinite(best[i, j]) and good.any():
            k = int(np.nanargmin(np.where(good, mean[j], np.nan)))
            ax.plot(best[i, j], mean[j, k], "*", color=c, ms=9, mec="k", mew=0.5,
                    zorder=5)
            ff = pred["forgetting_limit"][str(n)]["factor"]
            if ff and np.isfinite(ff):
                ax.axvline(ff, color=c, ls="--", lw=0.9, alpha=0.8)
    if e["min"] is not None:
        ax.axvspan(e["min"] / (b * eta0), e["max"] / (b * eta0), color="0.6",
                   alpha=0.18, lw=0)
    if noise_f is not None:
        ax.axvline(noise_f, color="k", lw=1.5)
    ax.axvline(curv_f, color="k", lw=1.0, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    forget = [v["factor"] for v in pred["forgetting_limit"].values()
              if v["factor"] and np.isfinite(v["factor"])]
    ax.set_xlim(min([factors.min(), *forget]) / 1.5, factors.max() * 1.5)
    train = key == "final_train_loss"
    ax.set_title(f"{'train' if train else 'test'}, B = {b}: lr = f·{eta0:.3g}·{b}", fontsize=9)
    ax.set_ylabel("final training loss" if train else "final test loss")
    if i == len(a["batches"]) - 1:
        ax.set_xlabel("lr factor f  (base rate f·η̃₀)")


def _curvature_panel(ax, P, report: dict, pts: list[dict]) -> None:
    """The reference run's λ_max (Lanczos) and tr(H)/p (Hutch++) vs step, with the curvature
    limit 2(1+μ)/η of the run's own lr η at each step."""
    steps = np.array([m["step"] for m in pts], dtype=float)
    lam = np.array([m["lambda_max"] for m in pts])
    P.simulated(ax, steps, lam, [m["lambda_max_stderr"] for m in pts], c=P.color(0),
                label="λ_max (Lanczos)", filled=True)
    tr = np.array([m["trace_h"] for m in pts]) / max(report["reference"]["result"]["dim"], 1)
    P.simulated(ax, steps, np.where(tr > 0, tr, np.nan), c=P.color(2), marker="s",
                label="tr(H)/p (Hutch++)")
    lr = np.array([m["lr"] for m in pts])
    mu = report["recipe"]["train"]["momentum"]
    P.theory(ax, steps, np.where(lr > 0, 2 * (1 + mu) / np.where(lr > 0, lr, 1), np.nan),
             "2(1+μ)/η of the run", c="0.4", ls="--")
    ax.set_yscale("log")
    positive = [v for v in (*lam, *tr) if np.isfinite(v) and v > 0]
    if positive:  # room below the points for the legend; the 2/η curve clipped above
        ax.set_ylim(min(positive) / 300, max(positive) * 20)
    ax.set_title("reference run: curvature", fontsize=9)
    ax.set_xlabel("step")
    P.legend(ax, key=False, loc="lower right", ncol=1)


def _noise_panel(ax, P, pts: list[dict], bs) -> None:
    """The reference run's noise scales B_simple = tr Σ/|G|² and B_noise = tr(HΣ)/GᵀHG
    (examples) vs step, with the batch sizes of the sweep dotted."""
    steps = np.array([m["step"] for m in pts], dtype=float)
    for k, (key, lab) in enumerate((("b_simple", "B_simple = tr Σ/|G|²"),
                                    ("b_noise", "B_noise = tr(HΣ)/GᵀHG"))):
        v = np.array([np.nan if m[key] is None else m[key] for m in pts], dtype=float)
        s = np.array([np.nan if m[f"{key}_stderr"] is None else m[f"{key}_stderr"]
                      for m in pts], dtype=float)
        good = np.isfinite(v) & (v > 0)
        P.simulated(ax, steps[good], v[good], np.nan_to_num(s[good]), c=P.color(k + 3),
                    marker="os"[k], label=lab)
    for b in bs:
        ax.axhline(b, color="0.5", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_title("reference run: noise scales (examples)", fontsize=9)
    ax.set_xlabel("step")
    P.legend(ax, key=False, loc="best")


def _figure_legend(fig, P, ns) -> None:
    """The shared legend on the right: the N colours and the marks of the loss panels."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=P.color(j), marker="o", mfc="white", lw=0.8, ms=4)
               for j in range(len(ns))]
    labels = [f"N = {n}" for n in ns]
    handles += [Line2D([], [], color="k", lw=1.5), Line2D([], [], color="k", lw=1.0, ls=":"),
                Line2D([], [], color="0.6", lw=6, alpha=0.3),
                Line2D([], [], color="0.3", ls="--", lw=0.9),
                Line2D([], [], color="0.3", marker="*", ls="none", ms=9),
                Line2D([], [], color="0.3", marker="x", ls="none")]
    labels += ["predicted failure\nη_c(B) (noise-aware)", "curvature limit\n2(1+μ)/λ_max",
               "2·ε_opt(B) along\nthe reference run", "forgetting limit\n(1−μ)/(N λ_Σ)",
               "best factor (test)", "failed (majority\nof seeds)"]
    fig.legend(handles, labels, loc="outside right center", fontsize=7.5, frameon=False,
               title="mean ± s.e. over\nworking seeds", title_fontsize=7.5)


def plot(report: dict):
    """Rows: the two batch sizes. Columns: final training loss, final test loss (vs factor,
    one line per N, failures as ×, best factors as ★, the predicted failure factor, the
    curvature limit, the 2·ε_opt band and the forgetting limits), and the reference run
    (λ_max with the curvature limit of each rate, the noise scales with the batch sizes)."""
    from sgdtheory.experiments import _plotting as P

    a = report["analysis"]
    pred = report["predictions"]
    fig, axes = P.subplots(2, 3, panel_size=(3.9, 3.0),
                           title=f"lr sweep on {report['data']['source']}: "
                                 f"{report['model']['name']} ({report['model']['parameters']} "
                                 f"parameters), {a['epochs']} epochs")
    for i in range(len(a["batches"])):
        for col, key in enumerate(("final_train_loss", "test_loss")):
            _loss_panel(axes[3 * i + col], P, a, pred, i, key)
    pts = [m for m in report["reference"]["result"]["measurements"] if "error" not in m]
    _curvature_panel(axes[2], P, report, pts)
    _noise_panel(axes[5], P, pts, a["batches"])
    _figure_legend(fig, P, a["sizes"])
    return fig
