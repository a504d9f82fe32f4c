r"""The stable learning-rate range over batch size (Masters & Luschi 2018, "Revisiting small
batch training for deep neural networks", Graphcore) and the sharpness of the final model over
batch size (Keskar et al. 2017, "On large-batch training … sharp minima").

**Grid.** Base rate η̃ = η/B (the step per example; a ×2 grid) × batch size B (a ×2 grid, 2 … 512
on digits) × momentum μ ∈ ``momenta`` (0.9, heavy ball as torch — Nesterov where the recipe
uses it —, and 0) × ``seeds``, a fixed budget of ``epochs`` for every run, the recipe's schedule
(linear warm-up over the first 20%, linear decay to 0) scaled by the peak lr η = η̃·B. The η̃ grid
of μ is ``base_rates`` × 2^round(log₂(1−μ)) (for μ = 0.9: ÷8), i.e. about the same grid of
effective rates η̃/(1−μ). Each run records its final test accuracy and, when it reaches the
end, λ_max (Lanczos) and tr(H) (Hutch++) of its final model on the whole training subset
(:mod:`.batch_runs`).

**Cells.** The accuracy of a cell is the mean over seeds of the final test accuracy, a failed run
(:mod:`validate.train`: non-finite, > 10× the initial loss, or no progress/collapse to chance)
counting as chance accuracy 1/K; a cell *fails* when more than half its seeds fail (part 1).
The **good range** (per μ): the cells within ``GOOD_RANGE`` (1 point) of the best cell's
accuracy (:func:`good_mask`), outlined on the heat map (:func:`outline_segments`). The **best
base rate** at B: the η̃ of the row's most accurate cell (ties: the lowest mean test loss). The
**largest base rate that does not fail** at B: going up from the best rate, the last cell before
the first failing one (unresolved when no rate above the best fails).

**Predictions** (from the reference run of part 1 — the lr sweep's, the recipe's B at factor 2 —
nothing fitted to this sweep; :mod:`validate.experiments.predict`): the failure rate per example
η_c(B)/B, with η_c(B) the noise-aware limit of SGD (heavy ball / Nesterov for μ > 0) on the
spectrum measured where λ_max was largest (predicted failure: the *first failing* base rate);
for reference 2·ε_opt(B)/B (effective-rate form) and the curvature limit 2(1+μ)/(λ_max B).

**Checks** (per μ; tolerances fixed by the issue):

1. the width of the good range in decades (good cells × log₁₀2) shrinks as B grows: the
   least-squares slope of the width on log₂B is < 0;
2. the largest base rate that does not fail falls with B: slope of its log₂ on log₂B < 0;
3. it stays within 2× of η_c(B)/B: every B's ratio in [1/2, 2] (measured: the worst ratio);
4. at small B the best base rate is roughly constant: max/min over the smallest three B ≤ 2
   (one grid step);
5. (Keskar) large batches end in sharper minima: at each B's best rate, the slope of
   log λ_max on log B is > 0. Reported with it (findings): the size of the effect, and λ_max
   over B at an equal base rate and at an equal lr (:func:`equal_rate_cells`) — whether the
   learning rate explains it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from . import predict as pr
from .base import Context, check_batches, claim
from .batch_runs import JOB, job_settings
from .runner import Job

NAME = "stable_range"
TITLE = "Test accuracy over base rate × batch size (with and without momentum): the good range, " \
        "the predicted failure rate η_c(B)/B, and the final sharpness vs B"

#: A cell is in the good range within this accuracy (fraction) of the best cell (1 point).
GOOD_RANGE = 0.01


@dataclass(frozen=True)
class Config:
    """The study's size (units in comments)."""

    batches: tuple = (2, 4, 8, 16, 32, 64, 128, 256, 512)  # B (×2 grid)
    base_rates: tuple = tuple(2.0**k for k in range(-12, -2))  # η̃ = η/B at μ = 0 (×2 grid)
    momenta: tuple = (0.9, 0.0)     # μ (torch heavy ball; the recipe's Nesterov flag if μ > 0)
    seeds: int = 2                  # runs per cell (seed, seed + 1, …)
    epochs: int | None = 10         # every run's budget in epochs; None: the recipe's
    reference_factor: float = 2.0   # reference run (part 1's): lr = f·η̃₀·B at the recipe's B
    reference_epochs: int | None = None  # reference run's epochs; None: the recipe's (part 1's)
    sharp_lanczos: int = 40         # final-model λ_max: Lanczos HVPs
    sharp_hutchinson: int = 20      # final-model tr(H): Hutch++ HVPs
    points: int | None = None       # reference-run measurement points; None: recipe
    lanczos_iters: int | None = None  # reference run's Lanczos HVPs; None: recipe
    hutchinson: int | None = None   # reference run's Hutch++ HVPs; None: recipe

    def __post_init__(self):
        for name in ("batches", "base_rates"):
            v = np.asarray(getattr(self, name), dtype=float)
            if v.ndim != 1 or v.size < 3 or np.any(v <= 0) or np.any(np.diff(v) <= 0):
                raise ValueError(f"{name} must be ≥ 3 increasing positive numbers, got "
                                 f"{getattr(self, name)!r}")
        if any(int(b) != b for b in self.batches):
            raise ValueError(f"batches must be integers, got {self.batches!r}")
        m = np.asarray(self.momenta, dtype=float)
        if m.ndim != 1 or m.size < 1 or np.any(m < 0) or np.any(m >= 1):
            raise ValueError(f"momenta must be numbers in [0, 1), got {self.momenta!r}")
        for name in ("seeds", "sharp_lanczos", "sharp_hutchinson"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "seeds"
                                                                      else 2):
                raise ValueError(f"{name} must be an integer ≥ {1 if name == 'seeds' else 2}, "
                                 f"got {v!r}")
        if not (isinstance(self.reference_factor, (int, float)) and self.reference_factor > 0):
            raise ValueError(f"reference_factor must be positive, got {self.reference_factor!r}")


PRESETS = {
    "smoke": Config(batches=(4, 16, 64), base_rates=(2.0**-9, 2.0**-7, 2.0**-5, 2.0**-3),
                    momenta=(0.9, 0.0), seeds=1, epochs=1, reference_epochs=2, sharp_lanczos=8,
                    sharp_hutchinson=4, points=3, lanczos_iters=20, hutchinson=8),
    "quick": Config(batches=(4, 8, 16, 32, 64, 128, 256), base_rates=tuple(
        2.0**k for k in range(-11, -3)), seeds=1, epochs=4, sharp_lanczos=16,
        sharp_hutchinson=8, points=11, lanczos_iters=60, hutchinson=20),
    "default": Config(),
    "paper": Config(batches=(16, 32, 64, 128, 256, 512, 1024, 2048), base_rates=tuple(
        2.0**k for k in range(-12, -3)), seeds=2, epochs=10, sharp_lanczos=30,
        sharp_hutchinson=12),
}


# ---------------------------------------------------------------------------- the grid
def rates(config: Config, momentum: float) -> list[float]:
    """The η̃ grid at momentum μ: ``base_rates`` × 2^round(log₂(1−μ)).

    >>> rates(Config(base_rates=(1.0, 2.0, 4.0)), 0.9)
    [0.125, 0.25, 0.5]
    """
    shift = 2.0 ** round(math.log2(1.0 - momentum))
    return [float(r * shift) for r in config.base_rates]


def _nesterov(ctx: Context, momentum: float) -> bool:
    return bool(ctx.recipe.train.nesterov) and momentum > 0


def reference_job(ctx: Context) -> Job:
    """Part 1's reference run (the lr sweep's: the recipe's B at ``reference_factor``, the
    recipe's epochs and schedule, measured at the recipe's points)."""
    f, b = float(ctx.config.reference_factor), ctx.recipe.batches[0]
    epochs = getattr(ctx.config, "reference_epochs", None) or int(ctx.recipe.train.epochs)
    return Job("validate.experiments.runs:reference_run",
               {"train": ctx.train_settings(lr_factor=f, batch_size=b, seed=ctx.seed,
                                            epochs=int(epochs)),
                "measure": ctx.measure_settings(), "measure_seed": ctx.seed},
               f"reference B={b} N={ctx.n_train} f={f:g}")


def jobs(ctx: Context) -> list[Job]:
    c = ctx.config
    check_batches(NAME, c.batches, ctx.n_train)
    sharp = {**ctx.measure_settings(), "lanczos_iters": c.sharp_lanczos,
             "hutchinson": c.sharp_hutchinson}
    out = []
    for mu in c.momenta:
        for b in c.batches:
            for eta in rates(c, mu):
                for r in range(c.seeds):
                    s = ctx.seed + r
                    out.append(Job(JOB, job_settings(
                        train=ctx.train_settings(lr=eta * b, batch_size=b, seed=s,
                                                 momentum=float(mu),
                                                 nesterov=_nesterov(ctx, mu)),
                        sharpness=sharp, measure_seed=s),
                        f"mu={mu:g} B={b} base={eta:.3g} seed={s}"))
    return out


# ---------------------------------------------------------------------------- predictions
def predict(ctx: Context, ref: dict) -> dict:
    """η_c(B)/B (noise-aware, per μ), the curvature limit /B and 2·ε_opt(B)/B."""
    meas = ref["measurements"]
    lam = pr.largest_lambda(meas)
    point = lam["point"]
    out = {"lambda_max": {k: v for k, v in lam.items() if k != "point"}, "momenta": {}}
    summary = [f"largest λ_max along the reference run {lam['lambda_max']:.4g} (step "
               f"{lam['step']})"]
    for mu in ctx.config.momenta:
        nest = _nesterov(ctx, mu)
        curv, curv_se = pr.curvature_limit(lam["lambda_max"], mu, nest, lam["stderr"] or 0.0)
        per_b = {}
        for b in ctx.config.batches:
            try:
                v, se, note = pr.noise_limit(point["lambda_top"], point["trace_h"], ref["dim"],
                                             b, mu, nest, top_stderr=lam["stderr"] or 0.0,
                                             trace_stderr=point["trace_h_stderr"] or 0.0)
            except ValueError as e:
                v, se, note = None, None, " ".join(str(e).split())
            eps = [pr.eps_opt_lr(b, m["eps_max"], m["b_noise"], mu)
                   for m in pr.valid_points(meas)]
            eps = [e for e in eps if math.isfinite(e)]
            per_b[str(b)] = {"lr": v, "stderr": se, "note": note,
                             "base_rate": None if v is None else v / b,
                             "base_rate_stderr": None if se is None else se / b,
                             "curvature_base_rate": curv / b,
                             "two_eps_opt_base_rate": float(np.median(eps)) / b if eps else None}
        out["momenta"][f"{mu:g}"] = {"curvature_limit": {"lr": curv, "stderr": curv_se},
                                     "nesterov": nest, "batches": per_b}
        summary.append(f"μ = {mu:g}: predicted failure base rate η_c(B)/B: " + ", ".join(
            f"B={b}: {_fmt(v['base_rate'])}" for b, v in per_b.items())
            + f"; curvature limit 2(1+μ)/λ_max = {curv:.3g}")
    out["summary"] = summary
    return out


def _fmt(v, spec=".3g") -> str:
    return "—" if v is None or not math.isfinite(v) else format(v, spec)


# ---------------------------------------------------------------------------- the heat map
def good_mask(acc, failed, tolerance: float = GOOD_RANGE):
    """Cells within ``tolerance`` of the best non-failing cell's accuracy (and not failing).

    >>> good_mask([[0.90, 0.95], [0.945, 0.5]], [[False, False], [False, True]]).tolist()
    [[False, True], [True, False]]
    """
    a = np.asarray(acc, dtype=float)
    f = np.asarray(failed, dtype=bool)
    ok = ~f & np.isfinite(a)
    if not ok.any():
        return np.zeros(a.shape, dtype=bool)
    best = np.max(a[ok])
    return ok & (a >= best - tolerance - 1e-12)


def outline_segments(mask) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    r"""The boundary of the cells of ``mask`` (rows × columns; cell (i, j) is the unit square
    [i − ½, i + ½] × [j − ½, j + ½] in (row, column) coordinates): the edges between a cell in
    the mask and one outside it or the grid's border, each as ((r₀, c₀), (r₁, c₁)), sorted.

    >>> outline_segments([[True, True]])  # one row, two cells: a 1 × 2 rectangle
    ... # doctest: +NORMALIZE_WHITESPACE
    [((-0.5, -0.5), (-0.5, 0.5)), ((-0.5, -0.5), (0.5, -0.5)), ((-0.5, 0.5), (-0.5, 1.5)),
     ((-0.5, 1.5), (0.5, 1.5)), ((0.5, -0.5), (0.5, 0.5)), ((0.5, 0.5), (0.5, 1.5))]
    """
    m = np.asarray(mask, dtype=bool)
    rows, cols = m.shape
    segs = []

    def inside(i, j):
        return 0 <= i < rows and 0 <= j < cols and bool(m[i, j])

    for i in range(rows):
        for j in range(cols):
            if not m[i, j]:
                continue
            r0, r1, c0, c1 = i - 0.5, i + 0.5, j - 0.5, j + 0.5
            if not inside(i - 1, j):
                segs.append(((r0, c0), (r0, c1)))
            if not inside(i + 1, j):
                segs.append(((r1, c0), (r1, c1)))
            if not inside(i, j - 1):
                segs.append(((r0, c0), (r1, c0)))
            if not inside(i, j + 1):
                segs.append(((r0, c1), (r1, c1)))
    return sorted(segs)


def largest_working(frac_failed, acc) -> tuple[int | None, int | None]:
    """(index of the best working rate, index of the largest rate that does not fail going up
    from it — None when no rate above the best fails, i.e. unresolved); (None, None) when no
    rate works. ``frac_failed``, ``acc``: per rate, ascending.

    >>> largest_working([0, 0, 0, 1, 0], [0.5, 0.9, 0.8, 0.1, 0.7])
    (1, 2)
    """
    f = np.asarray(frac_failed, dtype=float)
    a = np.asarray(acc, dtype=float)
    working = f <= 0.5
    if not working.any():
        return None, None
    best = int(np.nanargmax(np.where(working, a, -np.inf)))
    for k in range(best + 1, f.size):
        if not working[k]:
            return best, k - 1
    return best, None


def equal_rate_cells(batches, rates_, best_idx, working):
    """The cells of two comparisons at each B (None where that cell fails or is missing):

    * equal base rate: the row η̃ = the best base rate of the *largest* B with a best rate (a
      smaller B is stable there: the failure base rate falls with B);
    * equal lr: the diagonal η = η̃·B = the best lr of the *smallest* B with a best rate (a
      larger B takes a smaller, stable, base rate at that lr).

    Returns (row index, cells per B, the lr, cells per B).

    >>> equal_rate_cells([2, 4, 8], [0.25, 0.5, 1.0], [2, 1, 0], np.ones((3, 3), bool))
    (0, [0, 0, 0], 2.0, [2, 1, 0])
    """
    b = np.asarray(batches, dtype=float)
    lr = np.log2(np.asarray(rates_, dtype=float))
    have = [i for i, j in enumerate(best_idx) if j is not None]
    if not have:
        return None, [None] * b.size, None, [None] * b.size
    j_eq = int(best_idx[have[-1]])
    eq = [j_eq if working[i, j_eq] else None for i in range(b.size)]
    i0 = have[0]
    lr_eq = float(2.0 ** (lr[best_idx[i0]] + math.log2(b[i0])))
    diag = []
    for i in range(b.size):
        k = np.flatnonzero(np.abs(lr + np.log2(b[i]) - math.log2(lr_eq)) < 1e-6)
        diag.append(int(k[0]) if k.size and working[i, k[0]] else None)
    return j_eq, eq, lr_eq, diag


def _slope(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2 or np.ptp(x[ok]) == 0:
        return math.nan
    return float(np.polyfit(x[ok], y[ok], 1)[0])


# ---------------------------------------------------------------------------- analysis
def _cells(ctx: Context, records: list[dict], mu: float):
    """Arrays (B, rates, seeds) of test accuracy (failed → chance), failure, test loss, and
    the final λ_max, its error, tr(H) and its error (nan when not measured or failed)."""
    c = ctx.config
    shape = (len(c.batches), len(c.base_rates), c.seeds)
    v = {k: np.full(shape, np.nan) for k in ("acc", "loss", "lam", "lam_se", "tr", "tr_se")}
    failed = np.ones(shape, dtype=bool)
    chance = 1.0 / ctx.num_classes
    key = f"mu={mu:g} "
    rs = rates(c, mu)
    for rec in records:
        if not rec["label"].startswith(key):
            continue
        t = rec["settings"]["train"]
        i = list(c.batches).index(t["batch_size"])
        j = int(np.argmin([abs(math.log(t["lr"] / t["batch_size"] / e)) for e in rs]))
        s = t["seed"] - ctx.seed
        r = rec["result"]
        failed[i, j, s] = bool(r["failed"])
        v["acc"][i, j, s] = chance if r["failed"] or r["test_acc"] is None else r["test_acc"]
        v["loss"][i, j, s] = np.nan if r["failed"] or r["test_loss"] is None else r["test_loss"]
        sh = r.get("sharpness")
        if sh and not r["failed"]:
            for k, name in (("lam", "lambda_max"), ("lam_se", "lambda_max_stderr"),
                            ("tr", "trace_h"), ("tr_se", "trace_h_stderr")):
                v[k][i, j, s] = np.nan if sh[name] is None else sh[name]
    return v, failed


def _mean_se(x, axis=-1):
    """Mean over ``axis`` ignoring nan, and its standard error (nan with < 2 values)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        n = np.sum(np.isfinite(x), axis=axis)
        m = np.nanmean(x, axis=axis)
        se = np.where(n > 1, np.nanstd(x, axis=axis, ddof=1) / np.sqrt(np.maximum(n, 1)),
                      np.nan)
    return m, se


def _sharp_at(lam, tr, cells):
    """λ_max and tr(H) (mean, standard error over seeds; nan when none) at the given
    (B index, rate index) cells, one per B (None: no cell)."""
    out = []
    for i, j in enumerate(cells):
        if j is None:
            out.append((math.nan, math.nan, math.nan, math.nan))
            continue
        lm, ls = _mean_se(lam[i, j])
        tm, ts = _mean_se(tr[i, j])
        out.append((float(lm), float(ls), float(tm), float(ts)))
    return np.array(out, dtype=float).reshape(len(cells), 4)


def _effect(batches, values) -> tuple[float, float, str]:
    """(slope of log λ on log B, ratio of the largest-B to the smallest-B value, span text)."""
    b = np.asarray(batches, dtype=float)
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v) & (v > 0)
    if ok.sum() < 2:
        return math.nan, math.nan, "fewer than two batch sizes"
    slope = _slope(np.log(b[ok]), np.log(v[ok]))
    idx = np.flatnonzero(ok)
    return slope, float(v[idx[-1]] / v[idx[0]]), f"B = {int(b[idx[0]])} … {int(b[idx[-1]])}"


def _best_and_top(frac, cell_fail, acc, loss):
    """Per B (row): the index of the best base rate — the most accurate cell that does not fail
    (ties: the lowest mean test loss) — and of the largest rate that does not fail going up
    from the best working one (:func:`largest_working`); None where no cell works / unresolved."""
    best_idx, top_idx = [], []
    for i in range(acc.shape[0]):
        row = np.where(cell_fail[i], -np.inf, acc[i])
        if np.all(~np.isfinite(row)):
            best_idx.append(None)
            top_idx.append(None)
            continue
        top = np.max(row)
        tied = np.flatnonzero(row >= top - 1e-12)
        j = int(tied[np.nanargmin(np.where(np.isfinite(loss[i, tied]), loss[i, tied],
                                           np.inf))]) if tied.size > 1 else int(tied[0])
        best_idx.append(j)
        top_idx.append(largest_working(frac[i], np.where(np.isfinite(acc[i]), acc[i],
                                                         -np.inf))[1])
    return best_idx, top_idx


def _check_width(m: str, bs, width, cell_fail, acc) -> dict:
    """Check 1: the least-squares slope of the good range's width (decades) on log₂B < 0."""
    sw = _slope(np.log2(bs), width)
    return claim(
        f"good range narrows as B grows (μ={m})", None, sw,
        bool(math.isfinite(sw) and sw < 0), "least-squares slope of the good range's "
        "width (decades) on log₂B < 0", tolerance=0.0, uses_prediction=False,
        note="width in decades per B: " + ", ".join(
            f"{int(b)}: {w:.2g}" for b, w in zip(bs, width, strict=True))
        + f"; best accuracy {np.nanmax(np.where(cell_fail, np.nan, acc)):.4f}")


def _check_top_falls(m: str, bs, top_rate, top_idx, best_idx, pred_base) -> dict:
    """Check 2: the slope of log₂(largest non-failing η̃) on log₂B < 0 (the slope of
    log₂ η_c(B)/B shown beside it)."""
    st = _slope(np.log2(bs), np.log2(top_rate))
    unresolved = [int(b) for b, t, bi in zip(bs, top_idx, best_idx, strict=True)
                  if t is None and bi is not None]
    return claim(
        f"largest non-failing base rate falls with B (μ={m})", _slope(
            np.log2(bs), np.log2(pred_base)), st, bool(math.isfinite(st) and st < 0),
        "least-squares slope of log₂(largest non-failing η̃) on log₂B < 0", tolerance=0.0,
        uses_prediction=False,
        note="largest non-failing η̃ per B: " + ", ".join(
            f"{int(b)}: {_fmt(t)}" for b, t in zip(bs, top_rate, strict=True))
        + (f"; no failure above the best rate (unresolved) at B = {unresolved}"
           if unresolved else "") + "; predicted: the slope of η_c(B)/B (shown)")


def _check_top_vs_predicted(m: str, bs, ratio) -> dict:
    """Check 3: the largest non-failing η̃ over η_c(B)/B (``ratio``, per B) in [1/2, 2] at
    every B; measured: the ratio farthest from 1 in log."""
    finite = np.isfinite(ratio) & (ratio > 0)
    all_ok = bool(finite.all() and np.all(np.abs(np.log2(ratio[finite])) <= 1.0 + 1e-12))
    worst = float(ratio[finite][np.argmax(np.abs(np.log(ratio[finite])))]) \
        if finite.any() else math.nan
    return claim(
        f"largest non-failing base rate within 2× of η_c(B)/B (μ={m})", 1.0, worst, all_ok,
        "measured/predicted in [1/2, 2] at every B (measured: the worst ratio)",
        tolerance=2.0,
        note="ratio per B: " + ", ".join(f"{int(b)}: {_fmt(r)}"
                                        for b, r in zip(bs, ratio, strict=True))
        + ("; unresolved at some B (no failure in the grid above the best rate)"
           if not finite.all() else ""))


def _check_best_constant(m: str, bs, best_rate) -> dict:
    """Check 4: max/min of the best η̃ over the smallest three B ≤ 2 (one grid step)."""
    small = best_rate[:3]
    spread = float(np.nanmax(small) / np.nanmin(small)) if np.isfinite(small).all() \
        else math.nan
    return claim(
        f"best base rate constant at the smallest three B (μ={m})", 1.0, spread,
        bool(math.isfinite(spread) and spread <= 2.0 + 1e-12),
        "max/min of the best η̃ over the smallest three B ≤ 2 (one grid step)",
        tolerance=2.0,
        note="best η̃ per B: " + ", ".join(f"{int(b)}: {_fmt(r)}"
                                          for b, r in zip(bs, best_rate, strict=True)))


def _check_sharper(m: str, bs, at_best, slope, size, span) -> dict:
    """Check 5 (Keskar): the slope of log λ_max on log B at each B's best rate > 0."""
    return claim(
        f"large batches end sharper: λ_max at the best rate grows with B (μ={m})", None,
        slope, bool(math.isfinite(slope) and slope > 0),
        "least-squares slope of log λ_max on log B at each B's best rate > 0",
        tolerance=0.0, uses_prediction=False,
        note=f"λ_max({span}) ratio {_fmt(size)}; per B: " + ", ".join(
            f"{int(b)}: {_fmt(x)}±{_fmt(s, '.2g')}" for b, x, s in
            zip(bs, at_best[:, 0], at_best[:, 1], strict=True)))


def _per_b(bs, arr) -> str:
    """``B: λ_max`` for each B (first column of a :func:`_sharp_at` array)."""
    return ", ".join(f"{int(b)}: {_fmt(x)}" for b, x in zip(bs, arr[:, 0], strict=True))


def _sharpness_findings(m: str, mu: float, bs, rs, best_rate, at_best, effect, compare):
    """The size of the sharpness effect at the best rates, at an equal base rate and at an
    equal lr (``compare``: :func:`_equal_rate_sharpness`), and λ_max·η_peak/(2(1+μ)) at the
    best rates (1: the curvature limit of the peak lr)."""
    slope, size, span = effect
    j_eq, eq_base, lr_eq, eq_lr = compare
    s_base, r_base, span_b = _effect(bs, eq_base[:, 0])
    s_lr, r_lr, span_l = _effect(bs, eq_lr[:, 0])
    s_tr, r_tr, span_t = _effect(bs, at_best[:, 2])
    direction = "sharper" if slope > 0 else "flatter" if slope < 0 else "undetermined"
    peak_best = best_rate * bs
    curv_ratio = at_best[:, 0] * peak_best / (2 * (1 + mu))
    return [
        f"μ={m}: at each B's best rate large batches end {direction}: λ_max ratio "
        f"{_fmt(size)} over {span} (slope of log λ_max on log B {_fmt(slope)}); tr(H) ratio "
        f"{_fmt(r_tr)} (slope {_fmt(s_tr)}). At an equal base rate η̃ = "
        f"{_fmt(rs[j_eq]) if j_eq is not None else '—'} (the largest B's best): λ_max ratio "
        f"{_fmt(r_base)} over {span_b} (slope {_fmt(s_base)}; per B {_per_b(bs, eq_base)}); at "
        f"an equal lr η = {_fmt(lr_eq) if lr_eq is not None else '—'} (the smallest B's best): "
        f"ratio {_fmt(r_lr)} over {span_l} (slope {_fmt(s_lr)}; per B {_per_b(bs, eq_lr)})",
        f"μ={m}: λ_max·η_peak/(2(1+μ)) at the best rates (1 = the curvature limit of the "
        "peak lr): " + ", ".join(f"{int(b)}: {_fmt(x, '.2g')}"
                                 for b, x in zip(bs, curv_ratio, strict=True))]


def _equal_rate_sharpness(bs, rs, v, cell_fail, best_idx):
    """λ_max and tr(H) (:func:`_sharp_at`) at an equal base rate and at an equal lr
    (:func:`equal_rate_cells`, over the cells that work and have λ_max). Returns
    (the mean λ_max per cell, (row index, at the equal base rate, the lr, at the equal lr))."""
    lam_mean, _ = _mean_se(v["lam"])
    working = ~cell_fail & np.isfinite(lam_mean)
    j_eq, eq_cells, lr_eq, lr_cells = equal_rate_cells(bs, rs, best_idx, working)
    eq_base = _sharp_at(v["lam"], v["tr"], eq_cells)
    eq_lr = _sharp_at(v["lam"], v["tr"], lr_cells)
    return lam_mean, (j_eq, eq_base, lr_eq, eq_lr)


def _momentum(ctx: Context, predictions: dict, records: list[dict], mu: float):
    """The analysis at one momentum μ: (its five checks, its findings, its figure panel)."""
    c = ctx.config
    bs = np.asarray(c.batches, dtype=float)
    m = f"{mu:g}"
    rs = np.asarray(rates(c, mu))
    v, failed = _cells(ctx, records, mu)
    acc, acc_se = _mean_se(v["acc"])
    loss, _ = _mean_se(v["loss"])
    frac = failed.mean(axis=-1)
    cell_fail = frac > 0.5
    good = good_mask(acc, cell_fail)
    width = good.sum(axis=1) * math.log10(2.0)
    best_idx, top_idx = _best_and_top(frac, cell_fail, acc, loss)
    best_rate = np.array([rs[j] if j is not None else np.nan for j in best_idx])
    top_rate = np.array([rs[j] if j is not None else np.nan for j in top_idx])
    pm = predictions["momenta"][m]
    pred_base = np.array([np.nan if pm["batches"][str(b)]["base_rate"] is None
                          else pm["batches"][str(b)]["base_rate"] for b in c.batches])
    ratio = top_rate / pred_base
    at_best = _sharp_at(v["lam"], v["tr"], best_idx)
    effect = _effect(bs, at_best[:, 0])
    checks = [_check_width(m, bs, width, cell_fail, acc),
              _check_top_falls(m, bs, top_rate, top_idx, best_idx, pred_base),
              _check_top_vs_predicted(m, bs, ratio),
              _check_best_constant(m, bs, best_rate),
              _check_sharper(m, bs, at_best, *effect)]
    lam_mean, compare = _equal_rate_sharpness(bs, rs, v, cell_fail, best_idx)
    findings = _sharpness_findings(m, mu, bs, rs, best_rate, at_best, effect, compare)
    j_eq, eq_base, lr_eq, eq_lr = compare
    panel = {
        "rates": rs.tolist(), "acc": acc.tolist(), "acc_stderr": acc_se.tolist(),
        "test_loss": loss.tolist(), "frac_failed": frac.tolist(),
        "cell_failed": cell_fail.tolist(), "good": good.tolist(),
        "width_decades": width.tolist(), "best_index": best_idx, "best_rate":
        best_rate.tolist(), "largest_working_index": top_idx,
        "largest_working_rate": top_rate.tolist(), "predicted_base_rate":
        pred_base.tolist(), "ratio_to_predicted": ratio.tolist(),
        "sharpness_at_best": at_best.tolist(),
        "equal_base_rate": {"rate": None if j_eq is None else float(rs[j_eq]),
                            "sharpness": eq_base.tolist()},
        "equal_lr": {"lr": lr_eq, "sharpness": eq_lr.tolist()},
        "lambda_max": lam_mean.tolist(),
        "outline": outline_segments(good)}
    return checks, findings, panel


def _rows(records: list[dict]) -> list[dict]:
    """The compact row of each sweep run stored in the report."""
    return [{"label": r["label"], "key": r["key"],
             "momentum": r["settings"]["train"]["momentum"],
             "batch_size": r["settings"]["train"]["batch_size"], "lr": r["result"]["peak_lr"],
             "base_rate": r["result"]["base_lr"], "seed": r["settings"]["train"]["seed"],
             **{k: r["result"].get(k) for k in ("failed", "failure", "test_acc", "test_loss",
                                                 "final_train_loss")},
             "lambda_max": (r["result"].get("sharpness") or {}).get("lambda_max"),
             "trace_h": (r["result"].get("sharpness") or {}).get("trace_h")} for r in records]


def analyse(ctx: Context, predictions: dict, ref: dict, records: list[dict]) -> dict:
    """Per momentum (:func:`_momentum`): the heat map's cells, the five checks (module
    docstring), the sharpness findings and the figure panel."""
    c = ctx.config
    checks, findings, panels = [], [], {}
    for mu in c.momenta:
        ch, fi, panels[f"{mu:g}"] = _momentum(ctx, predictions, records, mu)
        checks += ch
        findings += fi
    return {"batches": list(c.batches), "epochs": ctx.epochs, "good_range": GOOD_RANGE,
            "panels": panels, "checks": checks, "findings": findings, "runs": _rows(records)}


# ---------------------------------------------------------------------------- figure
def _arr(x):
    if isinstance(x, list):
        return np.array([_arr(v) for v in x], dtype=float) if x else np.zeros(0)
    return np.nan if x is None else x


def _heat_map(fig, ax, p: dict, pred_m: dict, bs, m: str) -> None:
    """The heat map of test accuracy over (log₂B, log₂η̃) at one momentum: failed cells ×, the
    good range outlined, ★ the best rate of each B, the predicted failure rate η_c(B)/B (solid),
    the curvature limit /B (dotted) and 2·ε_opt(B)/B (dashed)."""
    lb = np.log2(bs)
    rs = np.asarray(p["rates"], dtype=float)
    lr_ = np.log2(rs)
    acc = np.asarray(_arr(p["acc"]), dtype=float)
    db = float(np.median(np.diff(lb))) if lb.size > 1 else 1.0  # grid steps in log₂
    dr = float(np.median(np.diff(lr_))) if lr_.size > 1 else 1.0
    xe = np.concatenate([lb - db / 2, lb[-1:] + db / 2])
    ye = np.concatenate([lr_ - dr / 2, lr_[-1:] + dr / 2])
    mesh = ax.pcolormesh(xe, ye, (100 * acc).T, cmap="viridis", vmin=max(
        0.0, 100 * np.nanmin(acc)), vmax=100 * np.nanmax(acc), shading="flat")
    fig.colorbar(mesh, ax=ax, label="test accuracy (%)", shrink=0.9)
    cf = np.asarray(p["cell_failed"], dtype=bool)
    ii, jj = np.nonzero(cf)
    ax.plot(lb[ii], lr_[jj], "x", color="w", ms=4, mew=1.0)
    for (r0, c0), (r1, c1) in p["outline"]:  # rows: B (x axis), columns: η̃ (y axis)
        ax.plot([lb[0] + r0 * db, lb[0] + r1 * db], [lr_[0] + c0 * dr, lr_[0] + c1 * dr],
                color="#D55E00", lw=2.0, solid_capstyle="round")
    bi = [j for j in p["best_index"]]
    ok = [i for i, j in enumerate(bi) if j is not None]
    ax.plot(lb[ok], lr_[[bi[i] for i in ok]], "*", color="w", ms=8, mec="k", mew=0.5)
    pb = pred_m["batches"]
    pr_base = np.array([np.nan if pb[str(int(b))]["base_rate"] is None
                        else pb[str(int(b))]["base_rate"] for b in bs])
    curv = np.array([pb[str(int(b))]["curvature_base_rate"] for b in bs])
    eps = np.array([np.nan if pb[str(int(b))]["two_eps_opt_base_rate"] is None
                    else pb[str(int(b))]["two_eps_opt_base_rate"] for b in bs])
    ax.plot(lb, np.log2(pr_base), color="w", lw=2.2)
    ax.plot(lb, np.log2(pr_base), color="k", lw=1.2)
    ax.plot(lb, np.log2(curv), color="k", lw=1.0, ls=":")
    ax.plot(lb, np.log2(eps), color="0.85", lw=1.2, ls="--")
    ax.set_xlim(xe[0], xe[-1])
    ax.set_ylim(ye[0], ye[-1])
    ax.set_xticks(lb, [str(int(b)) for b in bs])
    ax.set_yticks(lr_, [f"2^{int(round(v))}" for v in lr_], fontsize=7)
    ax.grid(False)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("base rate η̃ = η/B")
    ax.set_title(f"μ = {m}: test accuracy, good range outlined", fontsize=9)


def _sharpness_panel(ax, P, p: dict, bs, m: str) -> None:
    """The final model's λ_max vs B (± s.e. over seeds) at each B's best η̃, at an equal η̃ and
    at an equal lr; tr(H)/10 at the best η̃; the curvature limit 2(1+μ)/η_peak of the best η̃."""
    for k, (key, lab, mk) in enumerate((
            ("sharpness_at_best", "at each B's best η̃", "o"),
            ("equal_base_rate", f"equal η̃ = {_fmt(p['equal_base_rate']['rate'])}", "s"),
            ("equal_lr", f"equal lr η = {_fmt(p['equal_lr']['lr'])}", "^"))):
        s = np.asarray(_arr(p[key] if key == "sharpness_at_best" else p[key]["sharpness"]),
                       dtype=float)
        if s.size == 0:
            continue
        good = np.isfinite(s[:, 0])
        P.simulated(ax, bs[good] * (1 + 0.04 * (k - 1)), s[good, 0],
                    np.nan_to_num(s[good, 1]), c=P.color(k), marker=mk,
                    label=f"λ_max {lab}", filled=k == 0)
        if k == 0:
            gt = np.isfinite(s[:, 2])
            P.simulated(ax, bs[gt], s[gt, 2] / 10, np.nan_to_num(s[gt, 3]) / 10,
                        c=P.color(4), marker="D", label="tr(H)/10 at the best η̃")
    best = np.asarray(_arr(p["best_rate"]), dtype=float)
    mu = float(m)
    ax.plot(bs, 2 * (1 + mu) / (best * bs), color="0.4", ls="--", lw=1.0,
            label="2(1+μ)/η_peak of the best η̃")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("final-model curvature")
    ax.set_title(f"μ = {m}: final-model sharpness (± s.e. over seeds)", fontsize=9)
    P.legend(ax, key=False, loc="best", fontsize=6.5)


def _figure_legend(fig) -> None:
    """The shared legend on the right: the marks of the heat maps."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="k", lw=1.2), Line2D([], [], color="k", lw=1.0, ls=":"),
               Line2D([], [], color="0.6", lw=1.2, ls="--"),
               Line2D([], [], color="#D55E00", lw=2.0),
               Line2D([], [], color="0.3", marker="*", ls="none", ms=8),
               Line2D([], [], color="0.3", marker="x", ls="none")]
    labels = ["predicted failure η_c(B)/B", "curvature limit\n2(1+μ)/(λ_max B)",
              "2·ε_opt(B)/B (reference)", "good range (within\n1 point of the best)",
              "best η̃ at B", "failed cell"]
    fig.legend(handles, labels, loc="outside right center", fontsize=7.5, frameon=False)


def plot(report: dict):
    """Per momentum: the heat map of test accuracy over (B, η̃) — failed cells ×, the good
    range outlined, ★ the best rate of each B, the predicted failure rate η_c(B)/B (solid),
    the curvature limit /B (dotted) and 2·ε_opt(B)/B (dashed) — and the sharpness of the final
    model against B (at each B's best rate, at an equal base rate, at an equal lr)."""
    from sgdtheory.experiments import _plotting as P

    a = report["analysis"]
    pred = report["predictions"]["momenta"]
    bs = np.asarray(a["batches"], dtype=float)
    mus = list(a["panels"])
    fig, axes = P.subplots(len(mus), 2, panel_size=(4.8, 3.6),
                           title=f"Stable learning-rate range on {report['data']['source']}: "
                                 f"{report['model']['name']}, {a['epochs']} epochs")
    for row, m in enumerate(mus):
        _heat_map(fig, axes[2 * row], a["panels"][m], pred[m], bs, m)
        _sharpness_panel(axes[2 * row + 1], P, a["panels"][m], bs, m)
    _figure_legend(fig)
    return fig
