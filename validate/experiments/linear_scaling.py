r"""The linear scaling rule on a real network (Goyal et al. 2017, "Accurate, large minibatch SGD:
training ImageNet in 1 hour"): lr = B·η̃₀ with a gradual warm-up keeps the small-batch accuracy
up to some B_break, and beyond it accuracy drops; the noise scale (McCandlish et al.) or the
curvature limit predicts where.

**Stage 1** (the sweep): at the smallest batch B₀ = ``batches[0]``, a ×2 scan of the base rate
η̃ (``base_rates``, the step per example) × ``seeds``, with the run of every stage: the recipe's
epochs (fixed for every B), a linear warm-up over the first ``warmup`` (5%) of the run, then the
recipe's linear decay to 0. η̃₀ is the rate with the best mean final test accuracy (a failed run
counting as chance accuracy 1/K; ties: the lowest mean test loss).

**Stage 2** (:func:`follow_up`): for every B in ``batches`` (a ×2 grid up to where it breaks),
lr = B·η̃₀ with the warm-up, and — for the figure — the same without warm-up, × ``seeds``. (The
B₀ runs with warm-up are stage 1's runs at η̃₀, reused.)

**Predictions** (from part 1's reference run — the lr sweep's — and η̃₀; nothing fitted to stage
2): B_noise = tr(HΣ)/GᵀHG measured along the reference run, averaged over its measurement points
(:func:`step_average`: McCandlish et al.'s critical batch is the noise scale averaged over
training, and the uniform average over steps is the one the derivation of S(B) gives — each
step's noise term is B_noise(t)/B, see :mod:`sgdtheory.experiments.steps_vs_examples`; standard
error from the points' jackknife errors; points where it is not resolved are left out and
counted), B_simple likewise for comparison; the curvature limit
B_curv = η_c/η̃₀, the batch at which lr = B·η̃₀ reaches η_c = 2(1+μ)/λ_max (the largest λ_max
along the reference run; the Nesterov form where used). The predicted break is the smaller of
B_noise and B_curv — the curvature limit *binds* when B_curv < B_noise. For reference the batch
at which B·η̃₀ reaches the noise-aware limit η_c(B) of part 1 is reported too.

**Measured**: acc₀ = the mean test accuracy at B₀ (with warm-up); B_break = the largest B up to
which every batch size's mean accuracy is within 1 point of acc₀.

**Checks** (tolerances fixed by the issue):

1. the accuracy stays within 1 point of acc₀ up to B_break and drops beyond: the batch sizes
   within 1 point form a prefix of the grid that ends inside it (measured: the number of B
   beyond the first drop that come back within 1 point; must be 0, and a drop must occur);
2. B_break within 4× of the predicted break min(B_noise, B_curv) (which one binds is stated).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from . import predict as pr
from .base import Context, check_batches, claim, factor_claim
from .batch_runs import JOB, job_settings
from .critical_batch import pooled_ratio
from .runner import Job

NAME = "linear_scaling"
TITLE = "Test accuracy vs batch size with lr = B·η̃₀ (5% warm-up, and without): where linear " \
        "scaling breaks, against B_noise and the curvature limit"

#: Accuracy (fraction) within which a batch size counts as keeping the small-batch accuracy.
WITHIN = 0.01


@dataclass(frozen=True)
class Config:
    """The study's size (units in comments)."""

    batches: tuple = (8, 16, 32, 64, 128, 256, 512, 1024)  # B (×2 grid); B₀ the first
    base_rates: tuple = tuple(2.0**k for k in range(-10, -2))  # η̃ scan at B₀ (×2 grid)
    warmup: float = 0.05            # linear warm-up, fraction of the run (then linear decay)
    seeds: int = 3                  # runs per point (seed, seed + 1, …)
    epochs: int | None = None       # every run's epochs (fixed for every B); None: recipe's
    reference_factor: float = 2.0   # reference run (part 1's): lr = f·η̃₀·B at the recipe's B
    reference_epochs: int | None = None  # reference run's epochs; None: the recipe's (part 1's)
    points: int | None = None       # reference-run measurement points; None: recipe
    lanczos_iters: int | None = None
    hutchinson: int | None = None

    def __post_init__(self):
        for name in ("batches", "base_rates"):
            v = np.asarray(getattr(self, name), dtype=float)
            if v.ndim != 1 or v.size < (3 if name == "batches" else 2) or np.any(v <= 0) or \
                    np.any(np.diff(v) <= 0):
                raise ValueError(f"{name} must be increasing positive numbers (≥ 3 batches, "
                                 f"≥ 2 rates), got {getattr(self, name)!r}")
        if any(int(b) != b for b in self.batches):
            raise ValueError(f"batches must be integers, got {self.batches!r}")
        if not (0 < self.warmup < 1):
            raise ValueError(f"warmup must lie in (0, 1), got {self.warmup!r}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be a positive integer, got {self.seeds!r}")
        if not (isinstance(self.reference_factor, (int, float)) and self.reference_factor > 0):
            raise ValueError(f"reference_factor must be positive, got {self.reference_factor!r}")


PRESETS = {
    "smoke": Config(batches=(8, 64, 512), base_rates=(2.0**-7, 2.0**-5), seeds=1, epochs=2,
                    reference_epochs=2, points=3, lanczos_iters=20, hutchinson=8),
    "quick": Config(base_rates=tuple(2.0**k for k in range(-9, -3)), seeds=2, epochs=10,
                    points=11, lanczos_iters=60, hutchinson=20),
    "default": Config(),
    "paper": Config(batches=(128, 256, 512, 1024, 2048, 4096, 8192),
                    base_rates=tuple(2.0**k for k in range(-13, -7)), seeds=2, epochs=10),
}


def _run(ctx: Context, b: int, eta: float, warmup: float, seed: int, label: str) -> Job:
    return Job(JOB, job_settings(train=ctx.train_settings(lr=float(eta) * b, batch_size=b,
                                                          seed=seed, warmup=float(warmup))),
               label)


def reference_job(ctx: Context) -> Job:
    """Part 1's reference run (see :func:`validate.experiments.stable_range.reference_job`)."""
    from .stable_range import reference_job as part1_reference

    return part1_reference(ctx)


def jobs(ctx: Context) -> list[Job]:
    """Stage 1: the base-rate scan at the smallest batch."""
    c = ctx.config
    check_batches(NAME, c.batches, ctx.n_train)
    b0 = int(c.batches[0])
    return [_run(ctx, b0, eta, c.warmup, ctx.seed + r, f"scan B={b0} base={eta:.3g} "
                 f"seed={ctx.seed + r}")
            for eta in c.base_rates for r in range(c.seeds)]


def _acc(ctx: Context, result: dict) -> float:
    """Final test accuracy, a failed run counting as chance 1/K."""
    if result["failed"] or result["test_acc"] is None:
        return 1.0 / ctx.num_classes
    return float(result["test_acc"])


def best_base_rate(ctx: Context, scan: list[dict]) -> tuple[float, dict]:
    """(η̃₀, {rate: (mean accuracy, mean test loss, failed runs)}) from stage 1's records."""
    table: dict[float, list] = {}
    grid = np.asarray(ctx.config.base_rates, dtype=float)
    for rec in scan:
        t = rec["settings"]["train"]
        eta = float(grid[np.argmin(np.abs(np.log(t["lr"] / t["batch_size"] / grid)))])
        r = rec["result"]
        table.setdefault(eta, []).append((_acc(ctx, r), r["test_loss"] if not r["failed"]
                                          else None, bool(r["failed"])))
    stats = {}
    for eta, v in table.items():
        losses = [x[1] for x in v if x[1] is not None]
        stats[eta] = (float(np.mean([x[0] for x in v])),
                      float(np.mean(losses)) if losses else math.inf, sum(x[2] for x in v))
    best = max(stats, key=lambda e: (stats[e][0], -stats[e][1]))
    return float(best), stats


def follow_up(ctx: Context, predictions: dict, records: list[dict]) -> list[Job]:
    """Stage 2 once stage 1 is done: every B at lr = B·η̃₀, with and without warm-up."""
    c = ctx.config
    n1 = len(c.base_rates) * c.seeds
    if len(records) > n1:
        return []
    eta0, _ = best_base_rate(ctx, records[:n1])
    out = []
    for b in c.batches:
        for w, tag in ((c.warmup, "warmup"), (0.0, "no warmup")):
            for r in range(c.seeds):
                out.append(_run(ctx, int(b), eta0, w, ctx.seed + r,
                                f"scale B={b} lr={eta0 * b:.3g} {tag} seed={ctx.seed + r}"))
    return out


def step_average(points: list[dict], key: str) -> tuple[float, float, int]:
    """(mean of ``key`` over the points where it is resolved — a finite positive value —, its
    standard error √(Σ s.e.²)/n from the points' own errors, n).

    >>> step_average([{"b": 2.0, "b_stderr": 0.3}, {"b": None, "b_stderr": None},
    ...               {"b": 4.0, "b_stderr": 0.4}], "b")
    (3.0, 0.25, 2)
    """
    vals = [(float(m[key]), float(m[f"{key}_stderr"] or 0.0)) for m in points
            if m.get(key) is not None and math.isfinite(m[key]) and m[key] > 0]
    if not vals:
        return float("nan"), float("nan"), 0
    v = np.array(vals)
    return float(v[:, 0].mean()), float(math.sqrt(np.sum(v[:, 1] ** 2)) / len(v)), len(v)


def predict(ctx: Context, ref: dict) -> dict:
    """B_noise and B_simple pooled over the reference run; λ_max and the curvature limit; the
    noise-aware limit η_c(B) per B."""
    tr = ctx.recipe.train
    mu, nest = float(tr.momentum), bool(tr.nesterov) and tr.momentum > 0
    meas = ref["measurements"]
    pts = pr.valid_points(meas)
    if not pts:
        raise ValueError("the reference run has no valid measurement")
    bn, bn_se, bn_n = step_average(pts, "b_noise")
    bs, bs_se, bs_n = step_average(pts, "b_simple")
    pooled = {"b_noise": pooled_ratio(pts, "tr_h_sigma", "g_h_g"),
              "b_simple": pooled_ratio(pts, "tr_sigma", "grad_sq")}
    median = {k: float(np.median([m[k] for m in pts if m[k] is not None and m[k] > 0]))
              for k in ("b_noise", "b_simple")}
    lam = pr.largest_lambda(meas)
    curv, curv_se = pr.curvature_limit(lam["lambda_max"], mu, nest, lam["stderr"] or 0.0)
    noise = {}
    for b in ctx.config.batches:
        try:
            v, se, _ = pr.noise_limit(lam["point"]["lambda_top"], lam["point"]["trace_h"],
                                      ref["dim"], b, mu, nest, top_stderr=lam["stderr"] or 0.0,
                                      trace_stderr=lam["point"]["trace_h_stderr"] or 0.0)
        except ValueError:
            v, se = None, None
        noise[str(b)] = {"lr": v, "stderr": se}
    summary = [f"B_noise (reference run, mean over {bn_n} of {len(pts)} points) = {bn:.3g} ± "
               f"{bn_se:.2g}; B_simple = {bs:.3g} ± {bs_se:.2g} ({bs_n} points); medians "
               f"{median['b_noise']:.3g}, {median['b_simple']:.3g}; ratios of the means "
               f"{pooled['b_noise'][0]:.3g}, {pooled['b_simple'][0]:.3g}",
               f"largest λ_max {lam['lambda_max']:.4g}: curvature limit η_c = {curv:.4g} "
               "(B_curv = η_c/η̃₀ once η̃₀ is chosen at the smallest batch)"]
    return {"b_noise": {"value": bn, "stderr": bn_se, "points": bn_n, "of": len(pts),
                        "median": median["b_noise"], "ratio_of_means": pooled["b_noise"][0]},
            "b_simple": {"value": bs, "stderr": bs_se, "points": bs_n, "of": len(pts),
                         "median": median["b_simple"],
                         "ratio_of_means": pooled["b_simple"][0]},
            "lambda_max": {k: v for k, v in lam.items() if k != "point"},
            "curvature_limit": {"lr": curv, "stderr": curv_se}, "noise_limit": noise,
            "momentum": mu, "summary": summary}


def _fmt(v, spec=".3g") -> str:
    return "—" if v is None or not math.isfinite(v) else format(v, spec)


def _table(ctx: Context, records: list[dict], warmup: float):
    """(mean accuracy, its standard error, mean final training loss, failed runs) per B."""
    c = ctx.config
    acc = {b: [] for b in c.batches}
    loss = {b: [] for b in c.batches}
    fails = {b: 0 for b in c.batches}
    for rec in records:
        t = rec["settings"]["train"]
        if abs(t["warmup"] - warmup) > 1e-12:
            continue
        r = rec["result"]
        acc[t["batch_size"]].append(_acc(ctx, r))
        loss[t["batch_size"]].append(np.nan if r["failed"] or r["final_train_loss"] is None
                                     else r["final_train_loss"])
        fails[t["batch_size"]] += bool(r["failed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = np.array([np.mean(acc[b]) if acc[b] else np.nan for b in c.batches])
        se = np.array([np.std(acc[b], ddof=1) / math.sqrt(len(acc[b])) if len(acc[b]) > 1
                       else np.nan for b in c.batches])
        lo = np.array([np.nanmean(loss[b]) if loss[b] else np.nan for b in c.batches])
    return m, se, lo, [fails[b] for b in c.batches]


def break_point(batches, acc, acc0: float, within: float = WITHIN):
    """(B_break, index of the first drop or None, recoveries): B_break the largest B up to which
    every accuracy is ≥ acc0 − within; recoveries the batch sizes beyond the first drop that
    are back within it.

    >>> break_point([8, 16, 32, 64], [0.95, 0.945, 0.90, 0.948], 0.95)
    (16, 2, [64])
    """
    good = np.asarray(acc, dtype=float) >= acc0 - within - 1e-12
    drop = int(np.argmin(good)) if not good.all() else None
    if drop == 0:
        return None, 0, [int(b) for b, g in zip(batches, good, strict=True) if g]
    if drop is None:
        return int(batches[-1]), None, []
    rec = [int(b) for b, g in zip(batches[drop:], good[drop:], strict=True) if g]
    return int(batches[drop - 1]), drop, rec


def analyse(ctx: Context, predictions: dict, ref: dict, records: list[dict]) -> dict:
    c = ctx.config
    n1 = len(c.base_rates) * c.seeds
    scan, scale = records[:n1], records[n1:]
    eta0, stats = best_base_rate(ctx, scan)
    acc_w, se_w, loss_w, fail_w = _table(ctx, scale, c.warmup)
    acc_n, se_n, loss_n, fail_n = _table(ctx, scale, 0.0)
    acc0 = float(acc_w[0])
    b_break, drop, recover = break_point(c.batches, acc_w, acc0)
    checks, findings = [], []
    rule_note = "mean accuracy per B (warm-up): " + ", ".join(
        f"{b}: {100 * a:.1f}%" for b, a in zip(c.batches, acc_w, strict=True))
    checks.append(claim(
        "accuracy within 1 point up to B_break, drops beyond", 0.0,
        float(len(recover)) if drop is not None else None,
        bool(drop is not None and drop > 0 and not recover),
        "batch sizes within 1 point of acc(B₀) form a prefix ending inside the grid (measured: "
        "how many beyond the first drop recover; 0 and a drop needed)", tolerance=0.0,
        note=(f"acc(B₀={c.batches[0]}) = {100 * acc0:.1f}%; B_break = {b_break}; "
              if b_break else f"acc(B₀) = {100 * acc0:.1f}%; ")
        + ("no drop within the grid; " if drop is None else
           "the first batch size already drops; " if drop == 0 else "")
        + (f"back within 1 point at B = {recover}; " if recover else "") + rule_note))
    bn = predictions["b_noise"]["value"]
    b_curv = predictions["curvature_limit"]["lr"] / eta0
    binds = "curvature limit" if b_curv < bn else "B_noise"
    pred_break = min(bn, b_curv) if math.isfinite(bn) else b_curv
    checks.append(factor_claim(
        f"B_break vs the predicted break ({binds} binds)", pred_break, b_break, 4.0,
        note=f"B_noise = {_fmt(bn)} ± {_fmt(predictions['b_noise']['stderr'])} (mean over the "
             f"reference run; median {_fmt(predictions['b_noise']['median'])}, ratio of the means "
             f"{_fmt(predictions['b_noise']['ratio_of_means'])}); B_curv = "
             f"η_c/η̃₀ = {predictions['curvature_limit']['lr']:.3g}/{eta0:.3g} = {b_curv:.3g} "
             f"(λ_max = {predictions['lambda_max']['lambda_max']:.3g}); B_simple = "
             f"{_fmt(predictions['b_simple']['value'])}"))
    # the noise-aware limit η_c(B) of part 1: where B·η̃₀ first exceeds it
    cross = [b for b in c.batches
             if predictions["noise_limit"][str(b)]["lr"] is not None
             and b * eta0 > predictions["noise_limit"][str(b)]["lr"]]
    findings.append(f"η̃₀ = {eta0:.4g} (lr {eta0 * c.batches[0]:.3g} at B₀ = {c.batches[0]}); "
                    "scan at B₀ (mean accuracy, failed runs): " + ", ".join(
                        f"{e:.3g}: {100 * s[0]:.1f}% ({s[2]})" for e, s in sorted(stats.items())))
    findings.append(f"lr = B·η̃₀ first exceeds the noise-aware limit η_c(B) of part 1 at B = "
                    f"{cross[0] if cross else 'none in the grid'}; the curvature limit at B = "
                    f"{b_curv:.3g}")
    b_break_n, drop_n, _ = break_point(c.batches, acc_n, acc0)
    findings.append(
        f"without warm-up: B_break = {b_break_n} (with warm-up {b_break}); accuracy per B: "
        + ", ".join(f"{b}: {100 * a:.1f}%" for b, a in zip(c.batches, acc_n, strict=True))
        + f"; failed runs per B: {dict(zip(c.batches, fail_n, strict=True))}")
    if drop is not None and drop > 0:
        findings.append(f"the drop at B = {c.batches[drop]}: "
                        f"{100 * (acc0 - acc_w[drop]):.1f} points below acc(B₀); failed runs "
                        f"with warm-up per B: {dict(zip(c.batches, fail_w, strict=True))}")
    rows = [{"label": r["label"], "key": r["key"], "batch_size": r["settings"]["train"][
        "batch_size"], "lr": r["result"]["peak_lr"], "warmup": r["settings"]["train"]["warmup"],
        "seed": r["settings"]["train"]["seed"],
        **{k: r["result"].get(k) for k in ("failed", "failure", "test_acc", "test_loss",
                                            "final_train_loss", "steps")}} for r in records]
    return {"batches": list(c.batches), "epochs": ctx.epochs, "warmup": c.warmup,
            "base_rate": eta0, "scan": {str(e): list(s) for e, s in sorted(stats.items())},
            "acc0": acc0, "b_break": b_break, "first_drop_index": drop,
            "b_break_no_warmup": b_break_n, "b_curv": b_curv, "binds": binds,
            "predicted_break": pred_break,
            "warmup_runs": {"acc": acc_w.tolist(), "acc_stderr": se_w.tolist(),
                            "train_loss": loss_w.tolist(), "failed": fail_w},
            "no_warmup_runs": {"acc": acc_n.tolist(), "acc_stderr": se_n.tolist(),
                               "train_loss": loss_n.tolist(), "failed": fail_n},
            "checks": checks, "findings": findings, "runs": rows}


def _arr(x):
    return np.array([np.nan if v is None else v for v in x], dtype=float)


def plot(report: dict):
    """(a) final test accuracy vs B with lr = B·η̃₀ (warm-up and none), the 1-point band,
    B_break, B_noise, B_simple and B_curv; (b) final training loss vs B; (c) the base-rate scan
    at the smallest batch that chose η̃₀."""
    from sgdtheory.experiments import _plotting as P

    a = report["analysis"]
    pred = report["predictions"]
    bs = np.asarray(a["batches"], dtype=float)
    fig, axes = P.subplots(1, 3, panel_size=(4.2, 3.5),
                           title=f"Linear scaling lr = B·η̃₀ on {report['data']['source']}: "
                                 f"{report['model']['name']}, {a['epochs']} epochs, "
                                 f"η̃₀ = {a['base_rate']:.3g}")
    ax, ax_l, ax_s = axes
    for k, (key, lab) in enumerate((("warmup_runs", f"{100 * a['warmup']:g}% warm-up"),
                                    ("no_warmup_runs", "no warm-up"))):
        r = a[key]
        acc = 100 * _arr(r["acc"])
        P.simulated(ax, bs * (1 + 0.03 * k), acc, np.nan_to_num(100 * _arr(r["acc_stderr"])),
                    c=P.color(k), marker="os"[k], label=lab, filled=k == 0)
        ax.plot(bs, acc, color=P.color(k), lw=0.9, alpha=0.7)
        P.simulated(ax_l, bs * (1 + 0.03 * k), _arr(r["train_loss"]), c=P.color(k),
                    marker="os"[k], label=lab, filled=k == 0)
        ax_l.plot(bs, _arr(r["train_loss"]), color=P.color(k), lw=0.9, alpha=0.7)
    ax.axhspan(100 * (a["acc0"] - WITHIN), 100 * a["acc0"] + 100 * WITHIN, color="0.6",
               alpha=0.2, lw=0, label="acc(B₀) ± 1 point")
    lines = [(pred["b_noise"]["value"], "B_noise (reference run)", "-", P.color(2)),
             (pred["b_simple"].get("median"), "B_simple (median over the run)", "--",
              P.color(2)),
             (a["b_curv"], "B_curv = η_c/η̃₀", ":", "k")]
    for axis in (ax, ax_l):
        for v, lab, ls, col in lines:
            if v is not None and math.isfinite(v):
                axis.axvline(v, color=col, ls=ls, lw=1.1, label=lab if axis is ax else None)
        if a["b_break"]:
            axis.axvline(a["b_break"], color=P.color(0), lw=3, alpha=0.25,
                         label="measured B_break" if axis is ax else None)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("batch size B (lr = B·η̃₀)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("(a) accuracy; a failed run counts as chance", fontsize=9)
    P.legend(ax, key=False, loc="lower left", fontsize=6.5)
    ax_l.set_yscale("log")
    ax_l.set_ylabel("final training loss (working runs)")
    ax_l.set_title("(b) training loss", fontsize=9)
    P.legend(ax_l, key=False, loc="best", fontsize=6.5)
    etas = np.array([float(e) for e in a["scan"]])
    acc_s = 100 * np.array([a["scan"][e][0] for e in a["scan"]])
    ax_s.plot(etas, acc_s, "-o", color=P.color(0), mfc="white", ms=4)
    ax_s.axvline(a["base_rate"], color="k", lw=1.0, ls=":", label="η̃₀ (best)")
    ax_s.set_xscale("log", base=2)
    ax_s.set_xlabel(f"base rate η̃ at B₀ = {a['batches'][0]}")
    ax_s.set_ylabel("mean final test accuracy (%)")
    ax_s.set_title("(c) the scan that chose η̃₀", fontsize=9)
    P.legend(ax_s, key=False, loc="lower left")
    return fig
