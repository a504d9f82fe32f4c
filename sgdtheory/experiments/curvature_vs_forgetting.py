r"""Curvature versus forgetting: Myrtle's learning-rate × dataset-size × batch-size sweep.

Finite-data linear regression (docs/design.md §4.3): x ~ N(0, diag λ), y = w*ᵀx + noise (σ²),
w* ~ N(0, I), start w = 0; N training examples, shuffled epochs without replacement, a fixed
number of epochs at a constant learning rate; the test loss is the exact population loss.

**Learning-rate factor.** f multiplies a base rate (per-example step) η̃₀:
η̃ = f·η̃₀ and ``lr`` η = η̃·B (the mean-gradient multiplier). At a fixed factor the 4× batch
therefore takes a 4× larger ``lr`` (the sum convention of Myrtle, where the lr is tuned per
batch of summed gradients). η̃₀ is set so that the curvature limit of the small batch falls
between grid points: η̃₀ = η_c(B₁)/(B₁·``curv_factor``).

**Spectrum.** One large eigenvalue λ_max (an outlier, as in neural-network Hessians) and a
bulk of d−1 small ones around λ_bulk. The outlier sets the curvature limit; the bulk is what
must be learnt from many examples.

**Curvature limit** (N-independent): η_c(B) from :func:`sgdtheory.theory.linreg_stability_limit`,
the largest ``lr`` with spectral radius of the moment matrix below 1 (docs/design.md §3). In factor
units f_c(B) = η_c(B)/(B·η̃₀). Because B ≫ tr H/λ_max here, η_c(B) ≈ 2/λ_max barely grows with
B, so f_c(4B) ≈ f_c(B)/4: the instability factor drops by about the batch ratio.

**Forgetting limit** (falls like 1/N, B-independent): the base rate at which the memory
horizon 1/(η̃λ) equals the dataset, η̃_f = 1/(N λ_rep) (:func:`sgdtheory.memory.forgetting_limit`),
with λ_rep the median eigenvalue (the bulk). Why the bulk: the outlier direction is learnt
(and forgotten) within a few steps at every factor on the grid, so it does not decide how
much of the dataset is used; the bulk directions carry the information that needs many
examples, and they keep an example for 1/(η̃λ_bulk) examples. Above η̃_f the stationary SGD
excess ≈ ¼η̃σ² tr H exceeds the finite-data floor; below it the bulk does not converge in
the fixed number of epochs (its bias decays like exp(−2η̃λ_bulk·epochs·N) = exp(−2·epochs
·η̃/η̃_f)). Balancing the two puts the best base rate at η̃* ≈ η̃_f·ln(c·epochs·N)/(2·epochs):
a multiple of η̃_f of order one that grows only like log N (measured here: from ≈ 0.4 η̃_f at
the smallest N to ≈ 1.3 η̃_f at the largest), so the best factor falls nearly like 1/N until
it meets the curvature limit.

Checks: the measured instability factor (smallest factor whose final training loss exceeds
the initial loss) is the same for every N and equals the predicted one within one grid step;
it drops by about the batch ratio at 4B (compared: f_inst(B)/f_inst(4B) vs the predicted
[η_c(B)/B]/[η_c(4B)/4B]); the best factor (lowest mean test loss, interpolated on the log
grid) falls as N grows and lies within a factor 3 of the forgetting limit for every N whose
forgetting limit is below half the curvature limit (near the curvature limit the loss
already rises from curvature effects, which pull the optimum down).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sgdtheory import memory, theory
from sgdtheory.experiments import _plotting as P
from sgdtheory.experiments._common import Check, factor_check
from sgdtheory.problems import LinearRegressionData
from sgdtheory.simulate import run

__all__ = [
    "NAME", "TITLE", "Config", "PRESETS", "compute", "plot", "base_rate", "spectrum", "sweep",
]

NAME = "curvature_vs_forgetting"
TITLE = "Final train/test loss vs lr factor for several dataset sizes and two batch sizes"


@dataclass(frozen=True)
class Config:
    dim: int = 32  # d, features: one outlier + (d-1) bulk directions
    lam_max: float = 1.0  # outlier eigenvalue of H (sets the curvature limit)
    lam_bulk: float = 0.02  # geometric centre of the bulk eigenvalues
    bulk_spread: float = 2.0  # bulk log-spaced from lam_bulk/spread to lam_bulk*spread
    noise_std: float = 1.0  # σ, label noise
    batch: int = 16  # B₁; the second batch size is batch_ratio·B₁
    batch_ratio: int = 4
    n_data: tuple = (512, 1024, 2048, 4096, 8192)  # dataset sizes N (span 16×)
    factors: tuple = tuple(2.0**k for k in range(-3, 6))  # lr factors 1/8 … 32
    curv_factor: float = 6.0  # η̃₀ = η_c(B₁)/(B₁·curv_factor)
    epochs: float = 3.0  # fixed training length, in epochs
    n_datasets: int = 4  # independent datasets per N
    replicas: int = 3  # shuffling seeds per dataset
    forget_tol: float = 3.0  # best factor within this factor of the forgetting limit


PRESETS = {
    "quick": Config(dim=16, n_datasets=4, replicas=3),
    "default": Config(),
    "paper": Config(n_datasets=8, replicas=4),
}


def spectrum(config: Config) -> np.ndarray:
    """λ: [λ_max, bulk log-spaced in [λ_bulk/spread, λ_bulk·spread]] (d,)."""
    bulk = np.geomspace(config.lam_bulk * config.bulk_spread,
                        config.lam_bulk / config.bulk_spread, config.dim - 1)
    return np.concatenate([[config.lam_max], bulk])


def base_rate(config: Config) -> float:
    """η̃₀ (per-example step) with the small-batch curvature limit at ``curv_factor``."""
    lam = spectrum(config)
    eta_c = theory.linreg_stability_limit(lam, config.batch)
    return theory.base_lr(eta_c, config.batch) / config.curv_factor


def _best_factor(factors, loss):
    """Minimiser of ``loss`` over the log-factor grid, refined by a parabola through the
    lowest point and its neighbours (in log f); ``loss`` may hold inf (diverged)."""
    logf = np.log(factors)
    i = int(np.argmin(loss))
    if 0 < i < len(factors) - 1 and np.all(np.isfinite(loss[i - 1:i + 2])):
        y0, y1, y2 = np.log(loss[i - 1:i + 2])
        h = logf[i + 1] - logf[i]
        denom = y0 - 2 * y1 + y2
        if denom > 0:
            return float(np.exp(logf[i] + 0.5 * h * (y0 - y2) / denom))
    return float(factors[i])


def _loglog_slope(n, best) -> float:
    """Least-squares slope of log(best) against log(N): -1 when best ∝ 1/N (forgetting limit).

    A fit over all dataset sizes, rather than step-by-step monotonicity, so that the check
    is not decided by the replica noise of one neighbouring pair."""
    return float(np.polyfit(np.log(n), np.log(best), 1)[0])


def sweep(config: Config, lam, lr, batches, backend, seed: int):
    """Final training and test losses of every (N, batch, factor, dataset × replica) run,
    (N, 2, F, n_datasets·replicas) each, and the mean initial loss per N."""
    n_data = np.asarray(config.n_data)
    reps = config.n_datasets * config.replicas
    train = np.empty((n_data.size, 2, lr.shape[1], reps))
    test = np.empty_like(train)
    init_loss = np.empty(n_data.size)
    for i, n in enumerate(n_data):
        init = []
        for j in range(config.n_datasets):
            prob = LinearRegressionData(lam, int(n), noise_std=config.noise_std,
                                        seed=int(seed) * 1000 + 17 * i + j + 1)
            init.append(prob.loss(prob.theta0))
            res = run(prob, lr=lr, batch=batches[:, None], epochs=config.epochs,
                      replicas=config.replicas, seed=int(seed) * 1000 + 31 * i + j,
                      record_epochs=[0.0, config.epochs], backend=backend, check_every=512,
                      progress=False).to_numpy()
            sl = slice(j * config.replicas, (j + 1) * config.replicas)
            train[i, :, :, sl] = res.train_loss[..., -1]
            test[i, :, :, sl] = res.test_loss[..., -1]
        init_loss[i] = float(np.mean(init))
    return train, test, init_loss


def compute(config: Config, backend, seed: int = 0) -> dict:
    """Run the sweep; return final losses, limits and checks."""
    lam = spectrum(config)
    factors = np.asarray(config.factors, dtype=float)
    batches = np.array([config.batch, config.batch * config.batch_ratio])
    eta0 = base_rate(config)
    lr = factors[None, :] * eta0 * batches[:, None]  # (2, F)
    eta_c = np.array([theory.linreg_stability_limit(lam, b) for b in batches])
    f_curv = eta_c / (batches * eta0)  # curvature limit in factor units, per batch
    lam_rep = float(np.median(lam))
    n_data = np.asarray(config.n_data)
    f_forget = np.array([memory.forgetting_limit(n, lam_rep) for n in n_data]) / eta0
    n_n = n_data.size
    reps = config.n_datasets * config.replicas
    train, test, init_loss = sweep(config, lam, lr, batches, backend, seed)
    # a run "blows up" when its final training loss exceeds the initial loss
    blown = ~(train < init_loss[:, None, None, None])
    frac_blown = blown.mean(axis=-1)  # (N, 2, F)
    unstable = frac_blown > 0.5
    f_inst = np.full((n_n, 2), np.inf)
    for i in range(n_n):
        for b in range(2):
            idx = np.flatnonzero(unstable[i, b])
            if idx.size:
                f_inst[i, b] = factors[idx[0]]
    f_inst_pred = np.array([factors[np.flatnonzero(factors >= fc)[0]]
                            if np.any(factors >= fc) else np.inf for fc in f_curv])
    with np.errstate(invalid="ignore", over="ignore"):
        test_mean = np.where(blown.any(axis=-1), np.inf, test.mean(axis=-1))
        train_mean = np.where(blown.any(axis=-1), np.inf, train.mean(axis=-1))
        test_se = np.where(blown.any(axis=-1), np.nan, test.std(axis=-1, ddof=1) / np.sqrt(reps))
        train_se = np.where(blown.any(axis=-1), np.nan,
                            train.std(axis=-1, ddof=1) / np.sqrt(reps))
    best = np.array([[_best_factor(factors, test_mean[i, b]) for b in range(2)]
                     for i in range(n_n)])
    checks = _checks(config, batches, n_data, f_inst, f_curv, f_forget, best)
    return {
        "eigenvalues": lam,
        "factors": factors,
        "batches": batches,
        "base_lr0": eta0,
        "lr": lr,
        "n_data": n_data,
        "epochs": config.epochs,
        "lam_rep": lam_rep,
        "eta_c": eta_c,
        "f_curv": f_curv,
        "f_forget": f_forget,
        "f_inst": f_inst,
        "f_inst_pred": f_inst_pred,
        "best_factor": best,
        "init_loss": init_loss,
        "noise_var": config.noise_std**2,
        "train_mean": train_mean,
        "train_se": train_se,
        "test_mean": test_mean,
        "test_se": test_se,
        "frac_blown": frac_blown,
        "checks": checks,
    }


def _checks(config: Config, batches, n_data, f_inst, f_curv, f_forget, best) -> list:
    """The checks of the module docstring, from the measured instability and best factors."""
    checks: list[Check] = []
    for b, name in enumerate(("B", f"{config.batch_ratio}B")):
        spread = float(np.max(f_inst[:, b]) / np.min(f_inst[:, b]))
        checks.append(Check(f"instability factor independent of N ({name}={batches[b]})", 1.0,
                            spread, 1.0, spread == 1.0,
                            "max/min over N of the smallest factor that blows up; pass if 1"))
        meas = float(np.median(f_inst[:, b]))
        checks.append(factor_check(f"instability factor vs curvature limit ({name})",
                                   f_curv[b], meas, 2.0,
                                   f"predicted: f_c = η_c(B)/(B η̃₀) = {f_curv[b]:.3g}; the "
                                   "first unstable grid factor must be within one grid step"))
    ratio_pred = float(f_curv[0] / f_curv[1])
    ratio_meas = float(np.median(f_inst[:, 0]) / np.median(f_inst[:, 1]))
    checks.append(factor_check(f"instability factor ratio B/{config.batch_ratio}B",
                               ratio_pred, ratio_meas, 2.0,
                               "[η_c(B)/B]/[η_c(4B)/4B] vs f_inst(B)/f_inst(4B) (base-rate "
                               "limits); pass within a factor 2"))
    slope = _loglog_slope(n_data, best[:, 0])
    falls = bool(slope <= -0.4 and best[0, 0] / best[-1, 0] >= 3.0)
    checks.append(Check("best factor falls as N grows (B)", float(f_forget[0] / f_forget[-1]),
                        float(best[0, 0] / best[-1, 0]), 3.0, falls,
                        f"best(N_min)/best(N_max) >= 3 and least-squares slope of log best vs "
                        f"log N <= -0.4 (measured {slope:.2f}; -1 where forgetting-limited); "
                        "predicted: the forgetting-limit ratio N_max/N_min"))
    forget_ok = f_forget <= f_curv[0] / 2.0  # forgetting-limited: well below the curvature limit
    ratios = best[forget_ok, 0] / f_forget[forget_ok]
    worst = float(ratios[np.argmax(np.abs(np.log(ratios)))]) if ratios.size else np.nan
    checks.append(factor_check("best factor vs forgetting limit (B, worst N)", 1.0, worst,
                               config.forget_tol,
                               "best/f_forget for the N whose forgetting limit is below half "
                               "the curvature limit (forgetting-limited); pass within a factor "
                               f"{config.forget_tol:g}"))
    return checks


def plot(data: dict):
    """Rows: batch sizes; columns: final training loss and test excess loss vs lr factor."""
    from matplotlib.lines import Line2D

    fig, axes = P.subplots(2, 2, panel_size=(4.0, 3.1), sharex=True,
                           title="Curvature vs forgetting: linear regression, "
                                 f"{data['epochs']:g} epochs at constant lr")
    factors = np.asarray(data["factors"])
    n_data = np.asarray(data["n_data"])
    batches = np.asarray(data["batches"])
    noise_floor = float(data["noise_var"]) / 2.0
    for b in range(2):
        for col, key in enumerate(("train", "test")):
            ax = axes[2 * b + col]
            mean = np.asarray(data[f"{key}_mean"])[:, b].copy()
            se = np.asarray(data[f"{key}_se"])[:, b]
            if key == "test":
                mean = mean - noise_floor  # excess test loss ½ eᵀHe
            finite = np.isfinite(mean)
            lo = mean[finite].min()
            hi = (mean + np.nan_to_num(se))[finite].max()  # room for the error bars
            top = hi * 1.6 if key == "test" else hi + 0.12 * (hi - lo)
            for i, n in enumerate(n_data):
                c = P.color(i)
                ok = np.isfinite(mean[i])
                ax.plot(factors[ok], mean[i, ok], color=c, lw=0.8, alpha=0.6)
                P.simulated(ax, factors[ok], mean[i, ok], se[i, ok], c=c, label=f"N = {n}",
                            ms=3.5)
                bad = ~ok
                y_bad = top / 1.15 ** (i + 1) if key == "test" else top - 0.02 * (i + 1) * (
                    hi - lo)
                ax.plot(factors[bad], np.full(bad.sum(), y_bad), "x", color=c, ms=4, zorder=4)
                if key == "test":
                    ax.axvline(data["f_forget"][i], color=c, ls="--", lw=1.0, alpha=0.9)
                    j = int(np.nanargmin(np.where(ok, mean[i], np.nan)))
                    ax.plot(data["best_factor"][i, b], mean[i, j], marker="*", color=c, ms=9,
                            mec="k", mew=0.5, ls="none", zorder=5)
            ax.axvspan(data["f_curv"][b], factors.max() * 2, color="0.85", alpha=0.5, lw=0)
            ax.axvline(data["f_curv"][b], color="k", lw=1.4)
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(_FactorFormatter())
            ax.set_xlim(factors.min() / 1.4, factors.max() * 1.4)
            if key == "test":
                ax.set_yscale("log")
                ax.set_ylim(lo / 1.3, top)
                ax.set_ylabel("test excess loss  L_test − σ²/2")
            else:
                ax.set_ylim(lo - 0.05 * (hi - lo), top)
                ax.set_ylabel("final training loss")
            ax.set_title(f"{key}, B = {batches[b]}:  lr = f · {data['base_lr0']:.3g} · "
                         f"{batches[b]}", fontsize=9)
            if b == 1:
                ax.set_xlabel("lr factor f  (base rate η̃ = f·η̃₀)")
    handles = [Line2D([], [], color=P.color(i), marker="o", mfc="white", ls="-", lw=0.8, ms=4)
               for i in range(len(n_data))]
    labels = [f"N = {n}" for n in n_data]
    handles += [Line2D([], [], color="k", lw=1.4),
                Line2D([], [], color="0.3", ls="--", lw=1.0),
                Line2D([], [], color="0.3", marker="*", ls="none", ms=9),
                Line2D([], [], color="0.3", marker="x", ls="none")]
    labels += ["curvature limit\nη_c(B)/(B η̃₀)", "forgetting limit\n1/(N λ_bulk η̃₀)",
               "best factor (test)", "blew up (loss > initial)"]
    fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False,
               title="mean ± s.e. over\ndatasets × shuffles", title_fontsize=8)
    P.check_note(fig, data["checks"])
    return fig


class _FactorFormatter:
    """Tick labels 1/8, 1/4, …, 1, 2, … for powers of two."""

    def __new__(cls):
        from matplotlib.ticker import FuncFormatter

        def fmt(x, _pos):
            if x >= 1:
                return f"{x:g}"
            return f"1/{1 / x:g}"

        return FuncFormatter(fmt)
