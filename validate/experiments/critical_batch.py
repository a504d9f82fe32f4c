r"""The critical batch size on a real network (McCandlish et al. 2018, "An empirical model of
large-batch training"): beyond B_crit larger batches stop buying fewer steps, and B_crit is
predicted by the gradient noise scale measured during training.

**Reference run** (:mod:`.batch_runs`, the measured run everything is predicted from): batch
``reference_batch`` (default the smallest of the grid, B = 8 on digits) at ``reference_factor``
× the data set's standard rate (η = f·η̃₀·B), a constant rate (no warm-up, no decay: the
paper's setting), the recipe's epochs; its training loss L (mean over the whole training
subset) is followed along the run and B_simple, B_noise, ε_max are measured at ``points``
evenly spaced steps (:func:`validate.experiments.runs.measure_point`).

**Targets**: the training losses the reference run reaches at ``fractions`` (25/50/75%) of its
budget.

**Predictions** (nothing fitted to the sweep):

* at the loss of each target, B_simple = tr(Σ)/|G|² and B_noise = tr(HΣ)/GᵀHG, pooled over the
  measurement point at the target's step and its ``window`` neighbours on each side as ratios of
  means (McCandlish et al. App. A average the numerator and denominator before dividing), with
  delta-method standard errors from the points' jackknife errors (taken as independent);
* the learning rate of each batch size: ε_opt(B) = ε_max/(1 + B_noise/B) (eq. 2.7; the
  effective rate η/(1−μ) with momentum), the median over the reference run's points up to the
  last target of the per-point value; the sweep tries lr = ε_opt(B)·2^k for k in
  ``lr_exponents`` (the grid is reported in the JSON and on the figure).

**Sweep**: for each B in ``batches`` (×2 grid), each lr of its grid and ``seeds`` seeds, train at
that constant rate until the training loss reaches the lowest target (or ``cap`` × the reference
run's steps; for B ≥ the reference batch fewer steps suffice at the best rate; a run still at the
chance loss after ``give_up`` of that budget has collapsed and is stopped as failed), recording
the steps S to each target (:func:`.batch_runs.crossing_step`, log-spaced evaluations of L) and
E = S·B. **Grid extension** (:func:`follow_up`): while, at some B, the best rate for some target
is the highest (lowest) rate tried there, the next rate ×2 above (below) is added, at most
``extend`` times on each side — so the best rate of the grid is bracketed, wherever ε_opt(B)
puts the grid's centre. Every rate tried is reported.

**Analysis**: per target and B, the best lr of the grid is the one with the fewest steps (the
geometric mean over the seeds that reached the target, among rates at which more than half the
seeds reached it — part 1's rule for a working grid point), as in the paper's grid search; per
target, S = S_min(1 + B_crit/B) ⇔ E = E_min(1 + B/B_crit) is fitted by least squares in log
space to those geometric-mean S (:func:`fit_hyperbola`, through
:func:`sgdtheory.theory.fit_steps_examples`), with jackknife standard errors over the seeds (the
best rates held fixed).

**Checks** (tolerances fixed by the issue):

1. the data lie on the hyperbola: the worst |S_fit/S − 1| over B ≤ 30%, per target;
2. B_crit grows as the target loss falls (strictly, over the targets in order);
3. the fitted B_crit is within 3× of the measured B_simple at that loss, per target.

**Findings**: which of B_simple and B_noise tracks B_crit better (the mean |log ratio| over the
targets), where the best rates lie on their grids, E_min and S_min.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sgdtheory import theory

from . import predict as pr
from .base import Context, check_batches, claim, factor_claim
from .batch_runs import JOB, job_settings
from .runner import Job

NAME = "critical_batch"
TITLE = "Steps and examples to target training losses vs batch size: the fitted critical batch " \
        "B_crit against B_simple and B_noise measured along a reference run"


@dataclass(frozen=True)
class Config:
    """The study's size (units in comments); the data set's recipe gives the model and data."""

    batches: tuple = (8, 16, 32, 64, 128, 256, 512, 1024)  # B (×2 grid, examples per step)
    lr_exponents: tuple = (-1, 0, 1, 2)  # lr grid at B: ε_opt(B)·2^k (effective rate)
    fractions: tuple = (0.25, 0.5, 0.75)  # targets: reference's loss at these fractions of it
    seeds: int = 3                  # runs per (B, lr) (seed, seed + 1, …)
    reference_batch: int | None = None  # reference run's B; None: the smallest of ``batches``
    reference_factor: float = 1.0   # reference run's lr = f·η̃₀·B (η̃₀ the recipe's base rate)
    cap: float = 1.25               # a sweep run stops after cap × the reference's steps
    #                                 (× B_ref/B below the reference batch) if not at the target
    give_up: float = 0.25           # … or at chance loss after this fraction of those steps
    extend: int = 2                 # rates added (×2 steps) beyond each end of a B's grid
    window: int = 1                 # neighbouring measurement points pooled on each side
    curve_ratio: float = 1.03       # successive loss evaluations ≥ this ratio of steps apart
    epochs: int | None = None       # reference run's epochs (its budget); None: the recipe's
    points: int | None = None       # reference-run measurement points; None: recipe
    lanczos_iters: int | None = None  # Lanczos HVPs per point; None: recipe
    hutchinson: int | None = None   # Hutch++ HVPs per point; None: recipe

    def __post_init__(self):
        b = np.asarray(self.batches, dtype=float)
        if b.ndim != 1 or b.size < 3 or np.any(b < 1) or np.any(np.diff(b) <= 0) or \
                np.any(b != np.round(b)):
            raise ValueError(f"batches must be ≥ 3 increasing positive integers, got "
                             f"{self.batches!r}")
        f = np.asarray(self.fractions, dtype=float)
        if f.ndim != 1 or f.size < 2 or np.any(f <= 0) or np.any(f > 1) or np.any(np.diff(f) <= 0):
            raise ValueError(f"fractions must be ≥ 2 increasing numbers in (0, 1], got "
                             f"{self.fractions!r}")
        k = np.asarray(self.lr_exponents, dtype=float)
        if k.ndim != 1 or k.size < 1 or np.any(np.diff(k) <= 0):
            raise ValueError(f"lr_exponents must be increasing numbers, got "
                             f"{self.lr_exponents!r}")
        for name in ("seeds", "window", "extend"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "seeds" else 0):
                raise ValueError(f"{name} must be an integer ≥ {1 if name == 'seeds' else 0}, "
                                 f"got {v!r}")
        if not (isinstance(self.give_up, (int, float)) and 0 < self.give_up <= 1):
            raise ValueError(f"give_up must lie in (0, 1], got {self.give_up!r}")
        for name in ("reference_factor", "cap"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not self.curve_ratio > 1:
            raise ValueError(f"curve_ratio must be > 1, got {self.curve_ratio!r}")


PRESETS = {
    "smoke": Config(batches=(8, 32, 128), lr_exponents=(0, 1), fractions=(0.5, 0.75), seeds=2,
                    extend=1, epochs=2, points=5, lanczos_iters=8, hutchinson=4,
                    curve_ratio=1.1),
    "quick": Config(batches=(8, 16, 32, 64, 128, 256, 512), lr_exponents=(0, 1, 2), seeds=1,
                    epochs=10, points=11, lanczos_iters=20, hutchinson=8),
    "default": Config(lanczos_iters=40, hutchinson=20),
    "paper": Config(batches=(64, 128, 256, 512, 1024, 2048, 4096, 8192), seeds=2, epochs=10,
                    cap=0.6, points=21),
}


# ---------------------------------------------------------------------------- the reference
def reference_batch(ctx: Context) -> int:
    c = ctx.config
    return int(c.reference_batch if c.reference_batch is not None else c.batches[0])


def reference_steps(ctx: Context) -> int:
    """The reference run's total steps (its budget): epochs × ⌊N/B⌋."""
    return ctx.epochs * (ctx.n_train // reference_batch(ctx))


def target_steps(ctx: Context) -> list[int]:
    """The reference run's steps at ``fractions`` of its budget."""
    return [int(round(q * reference_steps(ctx))) for q in ctx.config.fractions]


def _constant(ctx: Context, **changes) -> dict:
    """The recipe's run at a constant rate (no warm-up or decay), with ``changes``."""
    return ctx.train_settings(schedule="constant", warmup=0.0, **changes)


def reference_job(ctx: Context) -> Job:
    b, f = reference_batch(ctx), float(ctx.config.reference_factor)
    return Job(JOB, job_settings(
        train=_constant(ctx, lr_factor=f, batch_size=b, seed=ctx.seed),
        curve={"ratio": ctx.config.curve_ratio, "dense": 20, "at": target_steps(ctx)},
        measure=ctx.measure_settings(), measure_seed=ctx.seed),
        f"reference B={b} f={f:g} constant lr, {ctx.epochs} epochs")


# ---------------------------------------------------------------------------- predictions
def pooled_ratio(points: list[dict], num: str, den: str) -> tuple[float, float]:
    """(mean num / mean den, delta-method standard error) over ``points`` (records of
    :func:`validate.experiments.runs.measure_point`; each mean's error from the points'
    standard errors, the two taken as independent); nan when a mean is not positive.

    >>> pooled_ratio([{"a": 2.0, "a_stderr": 0.0, "b": 1.0, "b_stderr": 0.0},
    ...               {"a": 4.0, "a_stderr": 0.0, "b": 1.0, "b_stderr": 0.0}], "a", "b")
    (3.0, 0.0)
    """
    f = pr._f
    a = np.array([f(m[num]) for m in points])
    b = np.array([f(m[den]) for m in points])
    sa = np.array([f(m[f"{num}_stderr"]) for m in points])
    sb = np.array([f(m[f"{den}_stderr"]) for m in points])
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        return float("nan"), float("nan")
    ma, mb = a[ok].mean(), b[ok].mean()
    if not (ma > 0 and mb > 0):
        return float("nan"), float("nan")
    se_a = math.sqrt(np.nansum(sa[ok] ** 2)) / ok.sum()
    se_b = math.sqrt(np.nansum(sb[ok] ** 2)) / ok.sum()
    r = ma / mb
    return float(r), float(r * math.hypot(se_a / ma, se_b / mb))


def window_points(measurements: list[dict], step: int, window: int) -> list[dict]:
    """The valid measurement point nearest ``step`` and its ``window`` neighbours each side."""
    pts = pr.valid_points(measurements)
    if not pts:
        raise ValueError("the reference run has no valid measurement")
    i = int(np.argmin([abs(m["step"] - step) for m in pts]))
    return pts[max(0, i - window):i + window + 1]


def lr_grid(ctx: Context, eps_opt_lr: float) -> list[float]:
    """The sweep's rates at one B: ε_opt(B) (as an lr) × 2^k, k in ``lr_exponents``."""
    return [float(eps_opt_lr * 2.0**k) for k in ctx.config.lr_exponents]


def step_cap(ctx: Context, batch: int) -> int:
    """Most steps of a sweep run at ``batch``: cap × the reference's steps (× B_ref/B below)."""
    ref = reference_steps(ctx) * float(ctx.config.cap)
    return int(math.ceil(ref * max(1.0, reference_batch(ctx) / batch)))


def predict(ctx: Context, ref: dict) -> dict:
    """Targets, B_simple and B_noise at each, ε_opt(B) and the lr grid of each B."""
    if ref.get("failed"):
        raise ValueError(f"the reference run failed ({ref.get('failure')}): choose a lower "
                         "reference_factor")
    tr = ctx.recipe.train
    mu = float(tr.momentum)
    curve = ref["curve"]
    loss_at = dict(zip(curve["steps"], curve["losses"], strict=True))
    meas = ref["measurements"]
    targets = []
    for q, s in zip(ctx.config.fractions, target_steps(ctx), strict=True):
        loss = loss_at.get(s)
        if loss is None or not math.isfinite(loss):
            raise ValueError(f"the reference run has no training loss at step {s} (fraction "
                             f"{q:g} of its budget)")
        pts = window_points(meas, s, ctx.config.window)
        bs, bs_se = pooled_ratio(pts, "tr_sigma", "grad_sq")
        bn, bn_se = pooled_ratio(pts, "tr_h_sigma", "g_h_g")
        em, em_se = pooled_ratio(pts, "grad_sq", "g_h_g")
        targets.append({"fraction": q, "step": s, "loss": loss, "b_simple": bs,
                        "b_simple_stderr": bs_se, "b_noise": bn, "b_noise_stderr": bn_se,
                        "eps_max": em, "eps_max_stderr": em_se,
                        "points": [m["step"] for m in pts],
                        "b_simple_by_point": [m["b_simple"] for m in pts],
                        "b_noise_by_point": [m["b_noise"] for m in pts]})
    last = target_steps(ctx)[-1]
    early = [m for m in pr.valid_points(meas) if m["step"] <= last]
    eps, grids = {}, {}
    for b in ctx.config.batches:
        by_point = [0.5 * pr.eps_opt_lr(b, m["eps_max"], m["b_noise"], mu) for m in early]
        finite = [v for v in by_point if math.isfinite(v) and v > 0]
        if not finite:
            raise ValueError("ε_max and B_noise are not resolved at any point of the reference "
                             "run: no learning-rate grid can be placed")
        eps[str(b)] = {"lr": float(np.median(finite)), "by_point": by_point}
        grids[str(b)] = lr_grid(ctx, eps[str(b)]["lr"])
    summary = [f"reference run: B = {reference_batch(ctx)}, constant lr "
               f"{ref['peak_lr']:.4g}, {ref['total_steps']} steps"]
    for t in targets:
        summary.append(
            f"target {t['loss']:.4g} (loss at {100 * t['fraction']:g}%, step {t['step']}): "
            f"B_simple = {t['b_simple']:.3g} ± {t['b_simple_stderr']:.2g}, B_noise = "
            f"{t['b_noise']:.3g} ± {t['b_noise_stderr']:.2g}")
    summary.append("ε_opt(B) as lr: " + ", ".join(f"B={b}: {v['lr']:.3g}"
                                                  for b, v in eps.items())
                   + f"; grid ×2^k, k = {list(ctx.config.lr_exponents)}")
    return {"targets": targets, "eps_opt": eps, "lr_grid": grids,
            "reference_batch": reference_batch(ctx), "reference_lr": ref["peak_lr"],
            "reference_steps": ref["total_steps"],
            "step_cap": {str(b): step_cap(ctx, b) for b in ctx.config.batches},
            "summary": summary}


# ---------------------------------------------------------------------------- the sweep
def _job(ctx: Context, predictions: dict, batch: int, k: float, seed: int) -> Job:
    """The run at ``batch`` with lr = ε_opt(B)·2^k and ``seed``, to the targets."""
    lr = float(predictions["eps_opt"][str(batch)]["lr"] * 2.0**k)
    epochs = int(math.ceil(step_cap(ctx, batch) / (ctx.n_train // batch)))
    return Job(JOB, job_settings(
        train=_constant(ctx, lr=lr, batch_size=batch, seed=seed, epochs=epochs),
        curve={"ratio": ctx.config.curve_ratio, "dense": 20, "stop": True,
               "give_up": ctx.config.give_up,
               "targets": [t["loss"] for t in predictions["targets"]]}),
        f"B={batch} lr=ε_opt·2^{k:g}={lr:.3g} seed={seed}")


def jobs(ctx: Context, predictions: dict | None = None) -> list[Job]:
    """The sweep's first stage (B × lr grid × seeds); with ``predictions=None`` only the grid
    is checked."""
    check_batches(NAME, ctx.config.batches, ctx.n_train)
    if reference_batch(ctx) > ctx.n_train:
        raise ValueError(f"critical_batch: reference_batch {reference_batch(ctx)} exceeds the "
                         f"{ctx.n_train} training examples")
    if predictions is None:
        return []
    return [_job(ctx, predictions, b, k, ctx.seed + r) for b in ctx.config.batches
            for k in ctx.config.lr_exponents for r in range(ctx.config.seeds)]


def exponent(predictions: dict, batch: int, lr: float) -> float:
    """k of a rate lr = ε_opt(B)·2^k (rounded to 1e-6)."""
    return round(math.log2(lr / predictions["eps_opt"][str(batch)]["lr"]), 6)


def grids(ctx: Context, predictions: dict, records: list[dict]) -> dict:
    """For each B: {k: {"steps": targets × seeds array (nan: not reached or failed),
    "failed": runs failed}} over every rate tried so far, k ascending."""
    out = {b: {} for b in ctx.config.batches}
    n_t = len(predictions["targets"])
    for rec in records:
        t = rec["settings"]["train"]
        b = int(t["batch_size"])
        k = exponent(predictions, b, t["lr"])
        cell = out[b].setdefault(k, {"steps": np.full((n_t, ctx.config.seeds), np.nan),
                                     "failed": 0})
        r = rec["result"]
        s = int(t["seed"]) - ctx.seed
        if r["failed"]:
            cell["failed"] += 1
            continue
        for i, x in enumerate(r["targets"]):
            if x["reached"] and x["step"] is not None:
                cell["steps"][i, s] = x["step"]
    return {b: dict(sorted(g.items())) for b, g in out.items()}


def follow_up(ctx: Context, predictions: dict, records: list[dict]) -> list[Job]:
    """The next rates to try: at each B, ×2 beyond an end of the rates tried where that end is
    the best rate for some target (or, where no rate reached a target, beyond the top when the
    top rate's runs did not fail, else below the bottom), at most ``extend`` per side."""
    c = ctx.config
    lo0, hi0 = min(c.lr_exponents), max(c.lr_exponents)
    out = []
    for b, g in grids(ctx, predictions, records).items():
        ks = list(g)
        if not ks:
            continue
        up = down = False
        for t_i in range(len(predictions["targets"])):
            i, _ = best_rates(ks, np.array([g[k]["steps"][t_i] for k in ks]))
            if i is None:
                if g[ks[-1]]["failed"] * 2 <= c.seeds:
                    up = True
                else:
                    down = True
            else:
                up |= i == len(ks) - 1
                down |= i == 0
        new = []
        if up and ks[-1] + 1 <= hi0 + c.extend:
            new.append(ks[-1] + 1)
        if down and ks[0] - 1 >= lo0 - c.extend:
            new.append(ks[0] - 1)
        out += [_job(ctx, predictions, b, k, ctx.seed + r) for k in new
                for r in range(c.seeds)]
    return out


# ---------------------------------------------------------------------------- the fit
def fit_hyperbola(batches, steps) -> dict:
    r"""Fit S = S_min(1 + B_crit/B) (⇔ E = E_min(1 + B/B_crit), E = S·B, B_crit = E_min/S_min)
    by least squares in log space (:func:`sgdtheory.theory.fit_steps_examples`) to the geometric
    mean over seeds of ``steps`` (seeds × batches, nan where a seed did not reach the target —
    the mean is over the others; a 1-D array is one seed), with jackknife standard errors over
    the seeds (each seed left out in turn; None with one seed, or when leaving a seed out
    empties a batch size).

    Returns ``{s_min, e_min, b_crit, log_s_min_stderr, log_b_crit_stderr, s_min_stderr,
    b_crit_stderr, steps (geometric means), fitted, misfit}``; ``misfit`` is the worst
    |S_fit/S − 1| over the batch sizes.

    >>> b = np.array([8.0, 32.0, 128.0, 512.0])
    >>> r = fit_hyperbola(b, 100.0 * (1 + 64.0 / b))
    >>> round(r["s_min"], 6), round(r["b_crit"], 6), round(r["misfit"], 9)
    (100.0, 64.0, 0.0)
    """
    b = np.asarray(batches, dtype=float).ravel()
    s = np.asarray(steps, dtype=float)
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2 or s.shape[1] != b.size:
        raise ValueError(f"steps must be (seeds, {b.size}) for {b.size} batch sizes, got shape "
                         f"{s.shape}")
    if b.size < 3:
        raise ValueError("fit_hyperbola needs at least three batch sizes (two parameters)")
    if not (np.all(np.isfinite(b)) and np.all(b > 0) and np.all(np.isnan(s) | (s > 0)) and
            np.all(np.isfinite(s) | np.isnan(s)) and np.all(np.isfinite(s).any(axis=0))):
        raise ValueError("steps and batches must be positive and finite (steps nan where not "
                         "reached), with at least one seed at each batch size")

    def geo(rows):
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.exp(np.nanmean(np.log(rows), axis=0))

    def fit(rows):
        g = geo(rows)
        s_min, e_min = theory.fit_steps_examples(g, g * b)
        return s_min, e_min, g

    s_min, e_min, g = fit(s)
    b_crit = float(theory.critical_batch(s_min, e_min))
    fitted = s_min * (1.0 + b_crit / b)
    n = s.shape[0]
    se_s = se_b = None
    keep = [np.delete(s, i, axis=0) for i in range(n)]
    if n >= 2 and all(np.isfinite(k).any(axis=0).all() for k in keep):
        jack = np.array([[math.log(v[0]), math.log(v[1] / v[0])]
                         for v in (fit(k) for k in keep)])
        var = (n - 1) / n * np.sum((jack - jack.mean(axis=0)) ** 2, axis=0)
        se_s, se_b = (float(v) for v in np.sqrt(var))
    return {"s_min": float(s_min), "e_min": float(e_min), "b_crit": b_crit,
            "log_s_min_stderr": se_s, "log_b_crit_stderr": se_b,
            "s_min_stderr": None if se_s is None else float(s_min) * se_s,
            "b_crit_stderr": None if se_b is None else b_crit * se_b,
            "steps": g.tolist(), "fitted": fitted.tolist(),
            "misfit": float(np.max(np.abs(fitted / g - 1.0)))}


def best_rates(lrs, steps) -> tuple[int | None, np.ndarray]:
    """(index of the rate with the fewest steps — the geometric mean over the seeds that reached
    the target, among rates at which more than half the seeds reached it (part 1's rule: a grid
    point works when at most half its seeds fail) —, that rate's steps per seed, nan where a
    seed did not reach it); (None, empty) when no rate qualifies.

    ``steps``: rates × seeds (nan: not reached).

    >>> best_rates([0.1, 0.2, 0.4], [[50, 60, 70], [30, 40, 50], [20, np.nan, np.nan]])
    (1, array([30., 40., 50.]))
    >>> best_rates([0.1, 0.2], [[50, 60, 70], [30, np.nan, 40]])[0]
    1
    """
    s = np.asarray(steps, dtype=float)
    reached = np.isfinite(s) & (s > 0)
    ok = 2 * reached.sum(axis=1) > s.shape[1]
    if not ok.any():
        return None, np.zeros(0)
    geo = np.full(s.shape[0], np.inf)
    for i in np.flatnonzero(ok):
        geo[i] = np.exp(np.log(s[i, reached[i]]).mean())
    i = int(np.argmin(geo))
    return i, np.where(reached[i], s[i], np.nan)


# ---------------------------------------------------------------------------- analysis
def _fmt(v, spec=".3g") -> str:
    return "—" if v is None or not math.isfinite(v) else format(v, spec)


def _best_and_fit(ctx: Context, predictions: dict, table: dict, t_i: int):
    """For target ``t_i``: the best rate of each B (:func:`best_rates`; None where no rate
    qualifies) and the fit of S = S_min(1 + B_crit/B) over the B that have one
    (:func:`fit_hyperbola`, with at least three; ``{'error'}`` when it refuses the data)."""
    rows, used, best = [], [], []
    for b in ctx.config.batches:
        ks = list(table[b])
        k, s = best_rates(ks, np.array([table[b][x]["steps"][t_i] for x in ks]))
        best.append(None if k is None else {
            "batch": b, "lr_index": k, "exponent": ks[k], "at_edge": k in (0, len(ks) - 1),
            "lr": predictions["eps_opt"][str(b)]["lr"] * 2.0 ** ks[k], "steps": s.tolist()})
        if k is not None:
            rows.append(s)
            used.append(b)
    fit = None
    if len(used) >= 3:
        try:
            fit = fit_hyperbola(used, np.array(rows).T)
        except ValueError as e:
            fit = {"error": " ".join(str(e).split())}
    return best, {"target": predictions["targets"][t_i]["loss"], "batches": used, "fit": fit,
                  "missing": [b for b in ctx.config.batches if b not in used]}


def _check_on_hyperbola(t: dict, f: dict, fit: dict | None) -> dict:
    """Check 1 (per target): the worst |S_fit/S − 1| over B ≤ 0.3."""
    miss = f"; no rate reached it at B = {f['missing']}" if f["missing"] else ""
    return claim(
        f"data on the hyperbola (target {t['loss']:.3g})", 0.0,
        None if fit is None else fit["misfit"],
        bool(fit is not None and fit["misfit"] <= 0.3),
        "worst |S_fit/S − 1| over B ≤ 0.3", tolerance=0.3, uses_prediction=False,
        note=("S_min = " + _fmt(fit["s_min"]) + f", B_crit = {_fmt(fit['b_crit'])}"
              if fit else "fewer than 3 batch sizes reached the target") + miss)


def _check_grows(tgt: list[dict], bc: list[float]) -> dict:
    """Check 2: B_crit grows as the target loss falls — the smallest ratio B_crit(next lower
    target)/B_crit > 1 (the smallest such ratio of B_simple shown beside it)."""
    bsim = [t["b_simple"] for t in tgt]
    ratios = [bc[i + 1] / bc[i] for i in range(len(bc) - 1)]
    pred_ratios = [bsim[i + 1] / bsim[i] for i in range(len(bsim) - 1)]
    min_ratio = min(ratios) if ratios and all(math.isfinite(r) for r in ratios) else math.nan
    return claim(
        "B_crit grows as the target loss falls", min(pred_ratios) if pred_ratios else None,
        min_ratio, bool(math.isfinite(min_ratio) and min_ratio > 1.0),
        "B_crit(next lower target)/B_crit > 1 for every pair (measured: the smallest ratio)",
        tolerance=1.0, uses_prediction=False,
        note="B_crit by target: " + ", ".join(f"{t['loss']:.3g}: {_fmt(v)}"
                                               for t, v in zip(tgt, bc, strict=True))
        + "; predicted: the smallest such ratio of B_simple (shown, not part of the rule)")


def _check_vs_b_simple(t: dict, fit: dict | None) -> dict:
    """Check 3 (per target): the fitted B_crit within 3× of B_simple measured at that loss."""
    se = fit["b_crit_stderr"] if fit else None
    return factor_claim(
        f"B_crit vs B_simple at that loss (target {t['loss']:.3g})", t["b_simple"],
        fit["b_crit"] if fit else None, 3.0,
        note=f"B_crit ± {_fmt(se)} (jackknife over seeds); B_simple ± "
             f"{_fmt(t['b_simple_stderr'])}; B_noise = {_fmt(t['b_noise'])} ± "
             f"{_fmt(t['b_noise_stderr'])}")


def _tracking(tgt: list[dict], bc: list[float]):
    r"""Which noise scale tracks B_crit better: the mean over the targets of |ln(B_crit/B_x)|
    for B_x = B_simple and B_noise. Returns (those means, the better one's name or None, the
    finding or None)."""
    dev = {}
    for key in ("b_simple", "b_noise"):
        d = [abs(math.log(b / t[key])) for t, b in zip(tgt, bc, strict=True)
             if math.isfinite(b) and t[key] and math.isfinite(t[key]) and t[key] > 0]
        dev[key] = float(np.mean(d)) if d else math.nan
    if not (math.isfinite(dev["b_simple"]) and math.isfinite(dev["b_noise"])):
        return dev, None, None
    better = "B_simple" if dev["b_simple"] <= dev["b_noise"] else "B_noise"
    return dev, better, (
        f"{better} tracks the fitted B_crit better: mean |ln(B_crit/B_simple)| = "
        f"{dev['b_simple']:.3g} (a typical factor {math.exp(dev['b_simple']):.3g}), mean "
        f"|ln(B_crit/B_noise)| = {dev['b_noise']:.3g} (factor "
        f"{math.exp(dev['b_noise']):.3g}); per target B_crit / B_simple / B_noise: "
        + "; ".join(f"{t['loss']:.3g}: {_fmt(b)} / {_fmt(t['b_simple'])} / "
                    f"{_fmt(t['b_noise'])}" for t, b in zip(tgt, bc, strict=True)))


def _grid_findings(c, table: dict, tgt: list[dict], chosen: list[list]) -> list[str]:
    """The rates tried at each B (as k in ε_opt(B)·2^k), the best rates still at an edge of
    them, and the best k per B and target."""
    edges = []
    for t, best in zip(tgt, chosen, strict=True):
        for x in best:
            if x is not None and x["at_edge"]:
                edges.append(f"B={x['batch']} (target {t['loss']:.3g}, k={x['exponent']:g})")
    return [
        f"rates tried, as k in ε_opt(B)·2^k (initial {list(c.lr_exponents)}, extended up to "
        f"{c.extend} steps each side while the best was at an edge): "
        + "; ".join(f"B={b}: {[float(k) for k in table[b]]}" for b in c.batches),
        "best lr still at the edge of the rates tried (the optimum may lie outside): "
        + (", ".join(edges) if edges else "none"),
        "best lr per B as ε_opt(B)·2^k, k per target: " + "; ".join(
            f"B={b}: " + "/".join(_fmt(best[b_i]["exponent"], "g") if best[b_i] else "—"
                                  for best in chosen)
            for b_i, b in enumerate(c.batches))]


def _fit_findings(tgt: list[dict], ok_fits: list, records: list[dict]) -> list[str]:
    """S_min, E_min and B_crit (± jackknife) per target, and how many sweep runs failed."""
    findings = []
    for t, fit in zip(tgt, ok_fits, strict=True):
        if fit:
            findings.append(f"target {t['loss']:.3g}: S_min = {fit['s_min']:.3g} ± "
                            f"{_fmt(fit['s_min_stderr'])} steps, E_min = {fit['e_min']:.3g} "
                            f"examples, B_crit = {fit['b_crit']:.3g} ± "
                            f"{_fmt(fit['b_crit_stderr'])}")
    failed = sum(bool(r["result"]["failed"]) for r in records)
    findings.append(f"{failed} of {len(records)} sweep runs failed (non-finite, > 10× initial "
                    "loss, or no progress), counted as not reaching any target")
    return findings


def _rows(records: list[dict]) -> list[dict]:
    """The compact row of each sweep run stored in the report."""
    return [{"label": r["label"], "key": r["key"], "batch_size": r["settings"]["train"][
        "batch_size"], "lr": r["result"]["peak_lr"], "seed": r["settings"]["train"]["seed"],
        "failed": r["result"]["failed"], "failure": r["result"]["failure"],
        "steps_run": r["result"]["steps"], "stopped_at_target": r["result"]["stopped_at_target"],
        "steps_to_target": [t["step"] for t in r["result"]["targets"]]} for r in records]


def analyse(ctx: Context, predictions: dict, ref: dict, records: list[dict]) -> dict:
    """Best rates and hyperbola fits per target, the checks (module docstring), findings."""
    c = ctx.config
    tgt = predictions["targets"]
    table = grids(ctx, predictions, records)
    chosen, fits = [], []
    for t_i in range(len(tgt)):
        best, fit = _best_and_fit(ctx, predictions, table, t_i)
        chosen.append(best)
        fits.append(fit)
    ok_fits = [f["fit"] if f["fit"] and "error" not in f["fit"] else None for f in fits]
    checks = [_check_on_hyperbola(t, f, fit)
              for t, f, fit in zip(tgt, fits, ok_fits, strict=True)]
    bc = [fit["b_crit"] if fit else math.nan for fit in ok_fits]
    checks.append(_check_grows(tgt, bc))
    checks += [_check_vs_b_simple(t, fit) for t, fit in zip(tgt, ok_fits, strict=True)]
    dev, better, tracks = _tracking(tgt, bc)
    findings = [] if tracks is None else [tracks]
    findings += _grid_findings(c, table, tgt, chosen)
    findings += _fit_findings(tgt, ok_fits, records)
    return {
        "batches": list(c.batches), "lr_exponents": list(c.lr_exponents),
        "targets": [t["loss"] for t in tgt],
        "grid": {str(b): {"exponents": list(g), "lr": [
            predictions["eps_opt"][str(b)]["lr"] * 2.0**k for k in g],
            "steps": [g[k]["steps"].tolist() for k in g],
            "failed_runs": [g[k]["failed"] for k in g]} for b, g in table.items()},
        "best": chosen, "fits": fits,
        "tracks_better": better, "mean_abs_log_ratio": dev,
        "reference_curve": ref["result"]["curve"],
        "checks": checks, "findings": findings, "runs": _rows(records),
    }


# ---------------------------------------------------------------------------- figure
def _hyperbola_panels(ax_e, ax_s, P, a: dict, tg: list[dict]) -> None:
    r"""(a) examples E = S·B vs steps S and (b) S vs B, per target: the geometric mean over the
    seeds of the best rate's steps (± s.e. as a factor exp(s.e. of log S)), the fitted
    hyperbola S = S_min(1 + B_crit/B) and ◆ at (B_crit, 2·S_min)."""
    from matplotlib.lines import Line2D

    bs = np.asarray(a["batches"], dtype=float)
    bb = np.geomspace(bs.min() / 4, bs.max() * 4, 200)
    for i, (t, f) in enumerate(zip(tg, a["fits"], strict=True)):
        col = P.color(i)
        fit = f["fit"] if f["fit"] and "error" not in f["fit"] else None
        best = [x for x in a["best"][i] if x is not None]
        if best:
            b = np.array([x["batch"] for x in best], dtype=float)
            s = np.array([[np.nan if v is None else v for v in x["steps"]] for x in best],
                         dtype=float)
            ls = np.log(s)
            n = np.isfinite(ls).sum(axis=1)
            g = np.exp(np.nanmean(ls, axis=1))
            se = np.exp(np.where(n > 1, np.nanstd(ls, axis=1, ddof=min(1, s.shape[1] - 1))
                                 / np.sqrt(np.maximum(n, 1)), 0.0))
            yerr = np.vstack([g - g / se, g * se - g])
            P.simulated(ax_e, g, g * b, yerr=yerr * b, c=col, label=f"L = {t['loss']:.3g}")
            P.simulated(ax_s, b, g, yerr=yerr, c=col, label=f"L = {t['loss']:.3g}")
        if fit:
            sf = fit["s_min"] * (1 + fit["b_crit"] / bb)
            P.theory(ax_e, sf, sf * bb, c=col, lw=1.2)
            P.theory(ax_s, bb, sf, c=col, lw=1.2)
            ax_s.plot(fit["b_crit"], 2 * fit["s_min"], "D", color=col, ms=5, mec="k", mew=0.5)
    ax_e.set_xscale("log")
    ax_e.set_yscale("log")
    ax_e.set_xlabel("optimiser steps S to the target")
    ax_e.set_ylabel("examples E = S·B")
    ax_e.set_title("(a) S = S_min(1 + B_crit/B), E = E_min(1 + B/B_crit)", fontsize=9)
    P.legend(ax_s, key=False, loc="upper right", title="target training loss",
             title_fontsize=7.5, extra=[
                 (Line2D([], [], color="0.35", lw=1.2), "fitted hyperbola"),
                 (Line2D([], [], color="0.35", marker="o", mfc="white", ls="none", ms=4),
                  "measured: geometric mean\nover seeds (± s.e.)")])
    ax_s.set_xscale("log", base=2)
    ax_s.set_yscale("log")
    ax_s.set_xlabel("batch size B")
    ax_s.set_ylabel("steps S (best lr of the grid)")
    ax_s.set_title("(b) steps vs B; ◆ at (B_crit, 2·S_min)", fontsize=9)


def _b_crit_panel(ax_b, P, a: dict, tg: list[dict]) -> None:
    """(c) the fitted B_crit (± jackknife, a ×3 band: check 3) vs the target loss, with
    B_simple = tr Σ/|G|² and B_noise = tr(HΣ)/GᵀHG measured along the reference run there."""
    loss = np.array([t["loss"] for t in tg])
    bc = np.array([f["fit"]["b_crit"] if f["fit"] and "error" not in f["fit"] else np.nan
                   for f in a["fits"]])
    bce = np.array([(f["fit"].get("b_crit_stderr") or 0.0)
                    if f["fit"] and "error" not in f["fit"] else np.nan for f in a["fits"]])
    P.simulated(ax_b, loss, bc, yerr=bce, c=P.color(0), label="fitted B_crit (± jackknife)",
                filled=True, ms=5)
    for k, (key, lab, m) in enumerate((("b_simple", "B_simple = tr Σ/|G|²", "s"),
                                       ("b_noise", "B_noise = tr(HΣ)/GᵀHG", "^"))):
        v = np.array([np.nan if t[key] is None else t[key] for t in tg], dtype=float)
        e = np.array([np.nan if t[f"{key}_stderr"] is None else t[f"{key}_stderr"]
                      for t in tg], dtype=float)
        P.simulated(ax_b, loss * (1.04 if k else 0.96), v, yerr=np.nan_to_num(e),
                    c=P.color(k + 1), marker=m, label=lab + " (reference run)")
        ax_b.plot(loss, v, color=P.color(k + 1), lw=0.8, alpha=0.6)
    ax_b.fill_between(loss, bc / 3, bc * 3, color=P.color(0), alpha=0.12, lw=0,
                      label="×3 of B_crit (check)")
    ax_b.set_xscale("log")
    ax_b.set_yscale("log")
    ax_b.invert_xaxis()
    ax_b.set_xlabel("target training loss (falls →)")
    ax_b.set_ylabel("batch size (examples)")
    ax_b.set_title("(c) B_crit vs the measured noise scales", fontsize=9)
    P.legend(ax_b, key=False, loc="best")


def _grid_curve(g: dict, mid: int):
    """(k, geometric mean over the seeds that reached target ``mid`` of their steps — nan
    where at most half of them reached it —, whether more than half did) for one B's grid."""
    ks = np.asarray(g["exponents"], dtype=float)
    steps = np.asarray([[np.nan if v is None else v for v in row[mid]]
                        for row in g["steps"]], dtype=float).reshape(len(ks), -1)
    ok = np.isfinite(steps) & (steps > 0)
    reached = 2 * ok.sum(axis=1) > steps.shape[1]
    geo = np.full(len(ks), np.nan)
    for i in np.flatnonzero(reached):
        geo[i] = np.exp(np.log(steps[i, ok[i]]).mean())
    return ks, geo, reached


def _lr_grid_panel(ax_l, a: dict, tg: list[dict]) -> None:
    """(d) steps to the middle target vs lr/ε_opt(B) = 2^k at each B (the lr grid); × where
    most seeds did not reach it."""
    import matplotlib as mpl

    mid = len(tg) // 2
    curves = [_grid_curve(a["grid"][str(b)], mid) for b in a["batches"]]
    top = max([np.nanmax(c[1]) for c in curves if np.isfinite(c[1]).any()] or [1.0])
    cmap = mpl.colormaps["viridis"]
    for b_i, (b, (ks, geo, reached)) in enumerate(zip(a["batches"], curves, strict=True)):
        col = cmap(b_i / max(len(curves) - 1, 1) * 0.9)
        ax_l.plot(2.0**ks, geo, "-o", color=col, ms=3.5, mfc="white", lw=1.0, label=f"B={b}")
        ax_l.plot(2.0**ks[~reached], np.full((~reached).sum(), top * 1.5), "x", color=col, ms=4)
    ax_l.set_xscale("log", base=2)
    ax_l.set_yscale("log")
    ax_l.set_xlabel("lr / ε_opt(B)   (ε_opt from the reference run)")
    ax_l.set_ylabel(f"steps to L = {tg[mid]['loss']:.3g}")
    ax_l.set_title("(d) the rates tried at each B (×: most seeds did not reach L)", fontsize=9)
    ax_l.legend(fontsize=6.5, ncol=2, loc="best", frameon=False)


def plot(report: dict):
    """(a) examples vs steps to each target with the fitted hyperbolas (the paper's figure);
    (b) steps vs B with the fits and B_crit; (c) B_crit vs target loss with B_simple and B_noise
    measured along the reference run; (d) steps to the middle target vs lr/ε_opt(B) at each B
    (the lr grid)."""
    from sgdtheory.experiments import _plotting as P

    a = report["analysis"]
    tg = report["predictions"]["targets"]
    fig, axes = P.subplots(2, 2, panel_size=(4.6, 3.5),
                           title=f"Critical batch on {report['data']['source']}: "
                                 f"{report['model']['name']} ({report['model']['parameters']} "
                                 "parameters), constant lr, best of a grid around ε_opt(B)")
    ax_e, ax_s, ax_b, ax_l = axes
    _hyperbola_panels(ax_e, ax_s, P, a, tg)
    _b_crit_panel(ax_b, P, a, tg)
    _lr_grid_panel(ax_l, a, tg)
    return fig
