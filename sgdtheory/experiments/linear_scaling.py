r"""Linear vs square-root learning-rate scaling at a fixed number of examples, vs B/B_noise.

Goyal et al. (2017) scale the learning rate linearly with the batch (η ∝ B, constant base
rate η̃ = η/B) with a gradual warmup; the rule holds up to a batch size set by the gradient
noise scale (McCandlish et al. 2018): ε_opt(B) = ε_max/(1 + B_noise/B) is linear in B only
for B ≪ B_noise and saturates at ε_max beyond.

Setting: online linear regression with Gaussian features (spectrum λ log-spaced, label
noise σ²), start e₀ with e_j = 1, a fixed budget of E examples (T = E/B steps) with a linear
warmup over the first ``warmup`` fraction of the run and a linear decay to 0 afterwards
(:func:`sgdtheory.simulate.linear_decay`), and

    linear:  η(B) = η̃_ref · B          sqrt:  η(B) = η̃_ref · √B     (B_ref = 1).

The reference base rate is *tuned*: η̃_ref minimises the exact expected final loss at B = 1
with the same schedule (:func:`tuned_base_rate`); the one-step optimum ε_max/B_noise at the
start is recorded for comparison (it is several times larger: the noise late in the run
favours a smaller rate).

**B_noise** = tr(HΣ)/GᵀHG grows along the run as |G| shrinks (here from ≈ 20 at the start to
≈ 3000 at the end of the B = 1 run). The x axis uses the **run-averaged** value: the
geometric mean of B_noise over 64 records equally spaced in examples of the B = 1 linear
run (exact statistics from the simulator, averaged over replicas) — a log average because
B_noise spans two decades; the value at the start and the arithmetic mean (dominated by the
noise floor at the end) are recorded too, and the start value is drawn.

Theory lines: the exact expected final loss of the moment recursion with the same schedule
(:func:`sgdtheory.nqm.linreg_expected_loss`). Checks: with η ∝ B the final loss is flat
(within ``flat_tol``, up to 3 s.e.) for B ≤ B_noise/8 (run-averaged); the break point (the
batch, interpolated in log B, where the final excess loss first exceeds (1 + ``margin``)× its
B = 1 value) lies within a factor 3 of the run-averaged B_noise; beyond 2·B_noise the loss
is at least that much worse (or diverged); the simulated losses agree with the exact theory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sgdtheory import nqm, theory
from sgdtheory.experiments import _plotting as P
from sgdtheory.experiments._common import Check, factor_check
from sgdtheory.problems import LinearRegression
from sgdtheory.simulate import linear_decay, run

__all__ = [
    "NAME", "TITLE", "Config", "PRESETS", "compute", "plot", "spectrum", "sweep",
    "tuned_base_rate",
]

NAME = "linear_scaling"
TITLE = "Final loss at fixed examples with η ∝ B and η ∝ √B vs B/B_noise, with warmup"


@dataclass(frozen=True)
class Config:
    dim: int = 32  # d
    lam_max: float = 1.0  # spectrum λ log-spaced from lam_max to lam_min
    lam_min: float = 0.1
    noise_std: float = 0.5  # σ, label noise
    examples: int = 8192  # E, examples per run
    batches: tuple = tuple(2**k for k in range(0, 12))  # B = 1 … 2048
    warmup: float = 0.05  # warmup fraction of the run (then linear decay to 0)
    replicas: int = 16
    margin: float = 1.0  # break: excess loss > (1 + margin) × excess at B = 1
    flat_tol: float = 0.15  # flat: |excess/excess(B=1) − 1| <= flat_tol for B <= B_noise/8


PRESETS = {
    "quick": Config(examples=4096, replicas=16),
    "default": Config(),
    "paper": Config(replicas=64),
}


def spectrum(config: Config) -> np.ndarray:
    return np.geomspace(config.lam_max, config.lam_min, config.dim)


def _schedule(config: Config):
    return linear_decay(0.0, warmup=config.warmup)


def tuned_base_rate(config: Config, lam, base_onestep):
    """η̃_ref: the base rate with the lowest exact expected final loss at B = 1 (same schedule).

    Scanned on a log grid below the one-step optimum ε_max/B_noise and refined by a parabola
    in log η̃ through the best point and its neighbours.
    """
    steps = config.examples
    mult = _schedule(config)(np.arange(steps) / steps)
    grid = np.geomspace(base_onestep / 100.0, base_onestep, 41)
    with np.errstate(over="ignore", invalid="ignore"):
        loss = nqm.linreg_expected_loss(lam, grid[:, None] * mult[None, :], 1, None,
                                        noise_var=config.noise_std**2, init_m=1.0)[..., -1]
    loss = np.where(np.isfinite(loss), loss, np.inf)
    i = int(np.clip(np.argmin(loss), 1, grid.size - 2))
    y0, y1, y2 = np.log(loss[i - 1:i + 2])
    h = np.log(grid[i + 1] / grid[i])
    den = y0 - 2 * y1 + y2
    shift = 0.5 * h * (y0 - y2) / den if den > 0 else 0.0
    return float(grid[i] * np.exp(np.clip(shift, -h, h)))


def _break_point(batches, ratio, threshold):
    """First B (log-interpolated) where ``ratio`` crosses ``threshold`` (inf ratio allowed)."""
    lb = np.log(batches)
    for i in range(1, batches.size):
        if not ratio[i] <= threshold:
            if not np.isfinite(ratio[i]):
                return float(batches[i])
            t = (threshold - ratio[i - 1]) / (ratio[i] - ratio[i - 1])
            return float(np.exp(lb[i - 1] + t * (lb[i] - lb[i - 1])))
    return np.inf


def sweep(config: Config, prob, base_ref: float, backend, seed: int):
    """Simulated and exact final excess losses for both rules at every batch size.

    Returns (sim (2, n_B, replicas), theory (2, n_B), lr (2, n_B), run-averaged B_noise
    (geometric and arithmetic mean over the B = 1 linear run))."""
    lam = prob.lam
    noise_var = config.noise_std**2
    batches = np.asarray(config.batches)
    rules = ("linear", "sqrt")
    sched = _schedule(config)
    n_b = batches.size
    sim = np.empty((2, n_b, config.replicas))
    th = np.empty((2, n_b))
    lr = np.empty((2, n_b))
    b_noise_run = b_noise_arith = np.nan
    for i, b in enumerate(batches):
        b = int(b)
        lrs = np.array([theory.scaled_lr(base_ref, 1, b, rule=r) for r in rules])
        lr[:, i] = lrs
        steps = config.examples // b
        res = run(prob, lr=lrs, batch=b, steps=steps, schedule=sched, replicas=config.replicas,
                  seed=int(seed) * 1000 + i, record_steps=None if b > 1 else
                  np.unique(np.linspace(0, steps, 65).round().astype(int)),
                  record_every=None if b == 1 else steps, record_stats=(b == 1),
                  check_every=max(16, steps // 8), backend=backend, progress=False).to_numpy()
        sim[:, i] = res.test_loss[..., -1] - noise_var / 2.0
        if b == 1:
            bn = res.b_noise[0].mean(axis=0)[:-1]  # linear rule, mean over replicas
            b_noise_run = float(np.exp(np.mean(np.log(bn))))  # geometric mean over the run
            b_noise_arith = float(np.mean(bn))
        mult = sched(np.arange(steps) / steps)
        with np.errstate(over="ignore", invalid="ignore"):
            loss = nqm.linreg_expected_loss(lam, lrs[:, None] * mult[None, :], b, None,
                                            noise_var=noise_var, init_m=1.0)[..., -1]
        th[:, i] = np.where(np.isfinite(loss) & (loss < 1e6), loss - noise_var / 2.0, np.inf)
    return sim, th, lr, b_noise_run, b_noise_arith


def compute(config: Config, backend, seed: int = 0) -> dict:
    lam = spectrum(config)
    prob = LinearRegression(lam, noise_std=config.noise_std)
    stats0 = prob.stats(prob.theta0)
    b_noise0 = float(stats0.b_noise)
    base_onestep = float(stats0.eps_max / stats0.b_noise)  # ε_max/B_noise = |G|²/tr(HΣ)
    base_ref = tuned_base_rate(config, lam, base_onestep)
    batches = np.asarray(config.batches)
    sim, th, lr, b_noise_run, b_noise_arith = sweep(config, prob, base_ref, backend, seed)
    blown = ~(sim < 1e6)
    with np.errstate(invalid="ignore", over="ignore"):
        mean = np.where(blown.any(axis=-1), np.inf, sim.mean(axis=-1))
        se = np.where(blown.any(axis=-1), np.nan, sim.std(axis=-1, ddof=1)
                      / np.sqrt(config.replicas))
    rel = mean / mean[:, :1]
    rel_th = th / th[:, :1]
    thr = 1.0 + config.margin
    b_break = _break_point(batches, rel[0], thr)
    b_break_th = _break_point(batches, rel_th[0], thr)
    checks = _checks(config, batches, mean, se, th, rel, b_noise_run, b_break, b_break_th)
    return {
        "eigenvalues": lam,
        "batches": batches,
        "rules": ["linear", "sqrt"],
        "lr": lr,
        "base_lr_ref": base_ref,
        "base_lr_onestep": base_onestep,
        "b_noise_start": b_noise0,
        "b_noise_run": b_noise_run,
        "b_noise_run_arith": b_noise_arith,
        "examples": config.examples,
        "warmup": config.warmup,
        "excess_mean": mean,
        "excess_se": se,
        "excess_theory": th,
        "break_batch": b_break,
        "break_batch_theory": b_break_th,
        "margin": config.margin,
        "checks": checks,
    }


def _checks(config: Config, batches, mean, se, th, rel, b_noise_run, b_break,
            b_break_th) -> list:
    """The checks of the module docstring, from the final excess losses (linear rule: row 0)."""
    thr = 1.0 + config.margin
    checks: list[Check] = []
    small = batches <= b_noise_run / 8
    se_rel = rel[0] * np.sqrt((se[0] / mean[0]) ** 2 + (se[0, 0] / mean[0, 0]) ** 2)
    dev_all = np.abs(rel[0, small] - 1.0)
    worst = float(rel[0, small][np.argmax(dev_all)])
    flat = bool(np.all(dev_all - 3.0 * se_rel[small] <= config.flat_tol))
    checks.append(Check("linear rule: loss flat for B <= B_noise/8 (run-averaged)", 1.0, worst,
                        config.flat_tol, flat,
                        "excess/excess(B=1) farthest from 1 over B <= B_noise/8; pass if every "
                        f"|ratio - 1| is <= {config.flat_tol:g} + 3 s.e."))
    checks.append(factor_check("linear rule: break point vs run-averaged B_noise",
                               b_noise_run, b_break, 3.0,
                               f"first B with excess > {thr:g}x excess(B=1), log-interpolated "
                               f"(exact theory: {b_break_th:.3g}); pass within a factor 3"))
    big = batches >= 2 * b_noise_run
    worst_big = float(np.min(rel[0, big])) if big.any() else np.nan
    checks.append(Check("linear rule: degraded beyond 2 B_noise", thr, worst_big, thr,
                        bool(big.any()) and worst_big > thr,
                        f"smallest excess/excess(B=1) over B >= 2 B_noise; pass if > {thr:g} "
                        "(inf: diverged)"))
    ok = np.isfinite(mean) & np.isfinite(th)
    z = np.abs(mean[ok] - th[ok]) / se[ok]
    frac = float(np.mean(z <= 3.0))
    checks.append(Check("simulated final loss within 3 s.e. of exact theory", 1.0, frac, 0.8,
                        frac >= 0.8, "fraction of stable (rule, B) points; pass if >= 0.8"))
    return checks


def plot(data: dict):
    """Final excess loss vs B/B_noise for both rules (left) and relative to B = 1 (right)."""
    from matplotlib.lines import Line2D

    fig, axes = P.subplots(1, 2, panel_size=(4.0, 3.4),
                           title=f"Linear vs √B learning-rate scaling: {int(data['examples'])} "
                                 f"examples, warmup {100 * data['warmup']:g}% + linear decay")
    bn = float(data["b_noise_run"])
    x = np.asarray(data["batches"]) / bn
    mean, se, th = (np.asarray(data[k]) for k in ("excess_mean", "excess_se", "excess_theory"))
    labels = {"linear": "η ∝ B (linear)", "sqrt": "η ∝ √B"}
    ref = float(mean[0, 0])
    cap = 1e4  # y range: up to cap × the B = 1 loss; larger values drawn as ✕ at the top
    for ax in axes:
        P.log_axes(ax)
    for r, rule in enumerate(data["rules"]):
        c = P.color(r)
        for ax, scale in ((axes[0], 1.0), (axes[1], 1.0 / ref)):
            top = cap * ref * scale
            okt = np.isfinite(th[r]) & (th[r] * scale < 10 * top)
            P.theory(ax, x[okt], th[r, okt] * scale, c=c, label=labels[rule])
            ok = np.isfinite(mean[r]) & (mean[r] * scale < top)
            P.simulated(ax, x[ok], mean[r, ok] * scale, se[r, ok] * scale, c=c)
            ax.plot(x[~ok], np.full((~ok).sum(), top / (1.6 + 2.0 * r)), "x", color=c, ms=6,
                    mew=1.5)
            ax.set_ylim(ref * scale / 2.0, top)
    for ax in axes:
        ax.axvline(1.0, color="k", lw=1.2)
        ax.axvline(float(data["b_noise_start"]) / bn, color="0.4", ls="--", lw=1.0)
        ax.set_xlabel(f"B / B_noise  (run-averaged B_noise = {bn:.3g})")
    axes[0].set_ylabel("final excess loss  L − σ²/2")
    axes[1].set_ylabel("final excess loss / value at B = 1")
    thr = 1.0 + float(data["margin"])
    axes[1].axhline(thr, color="0.5", ls=":", lw=1.0)
    axes[1].axvline(float(data["break_batch"]) / bn, color=P.color(0), ls=":", lw=1.2)
    handles = [Line2D([], [], color=P.color(0), lw=1.6), Line2D([], [], color=P.color(1), lw=1.6),
               Line2D([], [], color="0.35", lw=1.6),
               Line2D([], [], color="0.35", marker="o", mfc="white", ls="none", ms=4),
               Line2D([], [], color="k", lw=1.2), Line2D([], [], color="0.4", ls="--", lw=1.0),
               Line2D([], [], color=P.color(0), ls=":", lw=1.2),
               Line2D([], [], color="0.3", marker="x", ls="none", mew=1.5)]
    names = ["η ∝ B (linear)", "η ∝ √B", "exact theory", "simulation (±1 s.e.)",
             "B = B_noise (run-avg.)", "B = B_noise (start)",
             f"break: {thr:g}× the B = 1 loss", f"diverged / > {cap:g}×"]
    fig.legend(handles, names, loc="outside right center", fontsize=8, frameon=False)
    P.check_note(fig, data["checks"])
    return fig
