r"""Range of good base learning rates vs batch size (Masters & Luschi, "Revisiting small batch
training for deep neural networks", Graphcore 2018).

Online linear regression with Gaussian features (docs/design.md §4.3): a spectrum with one large
eigenvalue λ_max and a bulk of small ones, label noise σ², start e₀ with E[e_j²] = 1. Every
run sees the same number of examples E (so T = E/B steps) at a constant **base rate**
η̃ = η/B (the per-example step; ``lr`` η = η̃·B multiplies the mean minibatch gradient).

For each batch size B the base rate is scanned on a log grid and the final excess loss
L − σ²/2 = ½ eᵀHe (population loss) is recorded. A base rate is *good* when that excess is
within a factor (1 + ``good_tol``) of the best excess of the whole sweep (all B), and *stable*
when the final loss is below the initial loss.

Theory overlay: the exact expected final loss from the moment recursion of docs/design.md §3 (closed
form of :func:`sgdtheory.nqm.linreg_expected_loss`), from which the predicted good range
follows, and the curvature limit in base-rate units η_c(B)/B
(:func:`sgdtheory.theory.linreg_stability_limit`). At small B, η_c(B) ≈ 2B/(tr H + (B+1)λ_max)
so η_c(B)/B is nearly constant; once B ≫ tr H/λ_max it falls like 2/(Bλ_max). The lower
edge of the good range is set by convergence within E examples (≈ independent of B at a fixed
base rate), so the range of good base rates shrinks as B grows.

Checks: the measured good range (decades of base rate; edges interpolated in log η̃ between
grid points) shrinks as B grows; its edges agree with the exact theory within a factor 1.7;
the largest stable base rate matches η_c(B)/B within a factor 2 (one grid step is √2 at the
default resolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sgdtheory import theory
from sgdtheory.experiments import _plotting as P
from sgdtheory.experiments._common import Check, factor_check
from sgdtheory.problems import LinearRegression
from sgdtheory.simulate import run

__all__ = ["NAME", "TITLE", "Config", "PRESETS", "compute", "plot", "base_grid", "spectrum"]

NAME = "small_batch_stability"
TITLE = "Range of good base learning rates η/B vs batch size, with the curvature limit"


@dataclass(frozen=True)
class Config:
    dim: int = 16  # d: one outlier eigenvalue + (d-1) bulk
    lam_max: float = 1.0  # outlier eigenvalue of H
    lam_bulk: tuple = (0.05, 0.2)  # bulk eigenvalues log-spaced in this interval
    noise_std: float = 0.1  # σ, label noise
    batches: tuple = (1, 2, 4, 8, 16, 32, 64, 128)  # B
    examples: int = 8192  # E, examples per run (T = E/B steps)
    base_lr_range: tuple = (2.0**-12, 2.0**0)  # η̃ grid endpoints (per-example step)
    grid_per_octave: int = 2  # grid points per factor 2 of η̃
    replicas: int = 16
    good_tol: float = 9.0  # good: excess loss <= (1 + good_tol) × best excess
    edge_tol: float = 1.7  # allowed edge mismatch, a factor in base rate (≈ 1.5 grid steps)
    min_drop: float = 0.5  # required shrink of the good range, B_min → B_max (decades)
    max_widen: float = 0.25  # allowed widening between neighbouring B (decades, noise)


PRESETS = {
    "quick": Config(batches=(1, 4, 16, 64), examples=4096, replicas=6,
                    lam_bulk=(0.1, 0.4), min_drop=0.3),
    "default": Config(),
    "paper": Config(replicas=32, grid_per_octave=4),
}


def spectrum(config: Config) -> np.ndarray:
    """λ: [λ_max, bulk log-spaced over ``lam_bulk``] (d,)."""
    lo, hi = config.lam_bulk
    return np.concatenate([[config.lam_max], np.geomspace(hi, lo, config.dim - 1)])


def base_grid(config: Config) -> np.ndarray:
    """Base rates η̃ on a log2 grid with ``grid_per_octave`` points per octave."""
    lo, hi = np.log2(config.base_lr_range)
    n = int(round((hi - lo) * config.grid_per_octave)) + 1
    return 2.0 ** np.linspace(lo, hi, n)


def _edges(x, f):
    """Edges of the good interval {f ≤ 0} around the minimum of f on the log grid x.

    ``f`` = log(loss/threshold) (inf where unstable). Each edge is the zero crossing found by
    linear interpolation in (log x, f) between the last good and first bad grid point (the
    grid end, or the last good point next to an unstable one, when there is no crossing).
    Returns (nan, nan) when no grid point is good.
    """
    x = np.asarray(x, dtype=float)
    f = np.asarray(f, dtype=float)
    i0 = int(np.argmin(f))
    if not f[i0] <= 0:
        return np.nan, np.nan
    lo = i0
    while lo > 0 and f[lo - 1] <= 0:
        lo -= 1
    hi = i0
    while hi < f.size - 1 and f[hi + 1] <= 0:
        hi += 1
    lx = np.log(x)

    def cross(i_good, i_bad):
        if i_bad < 0 or i_bad >= f.size or not np.isfinite(f[i_bad]):
            return float(x[i_good])
        t = f[i_good] / (f[i_good] - f[i_bad])
        return float(np.exp(lx[i_good] + t * (lx[i_bad] - lx[i_good])))

    return cross(lo, lo - 1), cross(hi, hi + 1)


def _theory_final_excess(lam, base, batch, examples, noise_var):
    """Exact E[L_T] − σ²/2 for base rates ``base`` (array) at batch B, T = E/B, m₀ = 1.

    Closed form of the moment recursion m ← A m + c (c = (η²/B)σ²λ; docs/design.md §3):
    m_T = m* + A^T (m₀ − m*), m* = (I − A)⁻¹ c, with A = V diag(ρ) Vᵀ symmetric
    (the same numbers as :func:`sgdtheory.nqm.linreg_expected_loss`, without the T-step loop).
    Unstable rates (ρ_max ≥ 1) give inf.
    """
    steps = examples // batch
    lrs = np.asarray(base, dtype=float) * batch
    d = lam.size
    a = np.stack([theory.linreg_moment_matrix(lam, lr, batch) for lr in lrs])  # (G, d, d)
    c = (lrs[:, None] ** 2 / batch) * noise_var * lam[None, :]
    rho, vecs = np.linalg.eigh(a)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        m_star = np.linalg.solve(np.eye(d)[None] - a, c[..., None])[..., 0]
        coef = np.einsum("gji,gj->gi", vecs, 1.0 - m_star)
        m_t = m_star + np.einsum("gji,gi->gj", vecs, rho**steps * coef)
        out = 0.5 * (m_t @ lam)
    unstable = (np.abs(rho).max(axis=1) >= 1.0) | ~np.isfinite(out) | (out < 0)
    return np.where(unstable, np.inf, out)


def compute(config: Config, backend, seed: int = 0) -> dict:
    """Scan base rates per batch size (simulation + exact theory); ranges and checks."""
    lam = spectrum(config)
    noise_var = config.noise_std**2
    base = base_grid(config)
    batches = np.asarray(config.batches)
    fine = np.geomspace(base[0], base[-1], 300)
    prob = LinearRegression(lam, noise_std=config.noise_std)
    init_loss = float(prob.loss(prob.theta0))
    n_b, n_g = batches.size, base.size
    excess = np.empty((n_b, n_g, config.replicas))
    theory_fine = np.empty((n_b, fine.size))
    for i, b in enumerate(batches):
        steps = config.examples // int(b)
        res = run(prob, lr=base * b, batch=int(b), steps=steps, replicas=config.replicas,
                  seed=int(seed) * 1000 + i, record_steps=[0, steps], backend=backend,
                  check_every=max(16, steps // 8), progress=False).to_numpy()
        excess[i] = res.test_loss[..., -1] - noise_var / 2.0
        theory_fine[i] = _theory_final_excess(lam, fine, int(b), config.examples, noise_var)
    eta_c = np.asarray(theory.linreg_stability_limit(lam, batches.astype(float)))
    base_c = eta_c / batches
    stable = np.median(excess + noise_var / 2.0, axis=-1) < init_loss  # (B, G)
    with np.errstate(invalid="ignore", over="ignore"):
        mean = np.where(stable, excess.mean(axis=-1), np.inf)
        se = np.where(stable, excess.std(axis=-1, ddof=1) / np.sqrt(config.replicas), np.nan)
    best_sim = float(np.min(mean))
    best_th = float(np.min(theory_fine))
    thr = 1.0 + config.good_tol
    with np.errstate(divide="ignore", over="ignore"):
        f_sim = np.log(mean / (thr * best_sim))
        f_th = np.log(theory_fine / (thr * best_th))
    edges_sim = np.array([_edges(base, f_sim[i]) for i in range(n_b)])
    edges_th = np.array([_edges(fine, f_th[i]) for i in range(n_b)])
    stable_edge = np.array([base[np.flatnonzero(stable[i])[-1]] if stable[i].any() else np.nan
                            for i in range(n_b)])
    width_sim = np.log10(edges_sim[:, 1] / edges_sim[:, 0])
    width_th = np.log10(edges_th[:, 1] / edges_th[:, 0])

    checks: list[Check] = []
    w = np.nan_to_num(width_sim, nan=0.0)  # no good base rate: an empty range
    shrinks = bool(np.all(np.diff(w) <= config.max_widen) and w[0] - w[-1] >= config.min_drop)
    checks.append(Check("good base-rate range shrinks as B grows", float(width_th[0] -
                                                                         width_th[-1]),
                        float(w[0] - w[-1]), config.min_drop, shrinks,
                        "decades lost from B_min to B_max (theory vs simulated); pass if "
                        f">= {config.min_drop:g} and no widening between neighbouring B by "
                        f"more than {config.max_widen:g} decades"))
    dev = np.abs(np.log(edges_sim / edges_th))  # (B, 2)
    dev = np.where(np.isfinite(dev), dev, np.inf)
    j = np.unravel_index(int(np.argmax(dev)), dev.shape)
    checks.append(factor_check("good-range edges vs exact theory (worst edge)",
                               edges_th[j], edges_sim[j], config.edge_tol,
                               f"B={batches[j[0]]}, {'lower' if j[1] == 0 else 'upper'} edge; "
                               f"pass within a factor {config.edge_tol:g}"))
    ratio = stable_edge / base_c
    k = int(np.argmax(np.abs(np.log(ratio))))
    checks.append(factor_check("largest stable base rate vs η_c(B)/B (worst B)", base_c[k],
                               stable_edge[k], 2.0,
                               f"B={batches[k]}: last stable grid point vs curvature limit; "
                               "pass within a factor 2 (grid step √2)"))
    return {
        "eigenvalues": lam,
        "batches": batches,
        "base_lr": base,
        "base_lr_fine": fine,
        "examples": config.examples,
        "excess_mean": mean,
        "excess_se": se,
        "theory_fine": theory_fine,
        "eta_c": eta_c,
        "base_lr_c": base_c,
        "stable": stable,
        "stable_edge": stable_edge,
        "edges_sim": edges_sim,
        "edges_theory": edges_th,
        "good_threshold": thr,
        "best_sim": best_sim,
        "best_theory": best_th,
        "checks": checks,
    }


def plot(data: dict):
    """Left: final excess loss vs base rate for several B; right: good ranges vs B."""
    from matplotlib.lines import Line2D

    fig, axes = P.subplots(1, 2, panel_size=(4.6, 3.9),
                           title=f"Good base learning rates shrink with batch size "
                                 f"({int(data['examples'])} examples per run)")
    ax0, ax1 = axes
    batches = np.asarray(data["batches"])
    base, fine = np.asarray(data["base_lr"]), np.asarray(data["base_lr_fine"])
    P.log_axes(ax0)
    ax1.set_xscale("log")
    show = np.unique(np.linspace(0, batches.size - 1, min(5, batches.size)).round().astype(int))
    for n, i in enumerate(show):
        c = P.color(n)
        th = np.asarray(data["theory_fine"][i])
        ok = np.isfinite(th) & (th < 1e3)  # drop the diverging tail (overflows log axes)
        P.theory(ax0, fine[ok], th[ok], c=c, label=f"B = {batches[i]}")
        m = np.asarray(data["excess_mean"][i])
        okm = np.isfinite(m)
        P.simulated(ax0, base[okm], m[okm], np.asarray(data["excess_se"][i])[okm], c=c, ms=3.5)
        ax0.axvline(data["base_lr_c"][i], color=c, ls=":", lw=1.0)
    thr = data["good_threshold"] * data["best_theory"]
    ax0.axhline(thr, color="0.3", ls="--", lw=1.0)
    ax0.text(base[0] * 1.1, thr * 1.15, f"good: ≤ {data['good_threshold']:g}× best",
             fontsize=7.5, color="0.3")
    finite = np.asarray(data["excess_mean"])[np.isfinite(data["excess_mean"])]
    ax0.set_ylim(finite.min() / 1.5, finite.max() * 40)  # headroom for the legend
    ax0.set_xlabel("base learning rate η̃ = η/B (per-example step)")
    ax0.set_ylabel("final excess loss  L − σ²/2")
    P.legend(ax0, loc="upper center", extra=[(Line2D([], [], color="0.4", ls=":"),
                                              "curvature limit η_c(B)/B")], ncol=2)

    y = np.arange(batches.size)
    es, et = np.asarray(data["edges_sim"]), np.asarray(data["edges_theory"])
    for i in range(batches.size):
        stable = np.asarray(data["stable"][i])
        if stable.any():
            ax1.plot([base[0], base[np.flatnonzero(stable)[-1]]], [y[i], y[i]], color="0.8",
                     lw=7, solid_capstyle="butt", zorder=1)
        if np.all(np.isfinite(es[i])):
            ax1.plot(es[i], [y[i], y[i]], color=P.color(0), lw=3.5, solid_capstyle="butt",
                     zorder=2)
        ax1.plot(et[i], [y[i], y[i]], "|", color="k", ms=12, mew=1.6, zorder=3)
    bc = np.asarray(data["base_lr_c"])
    ax1.plot(bc, y, color=P.color(1), marker="o", ms=3.5, lw=1.4, zorder=3)
    ax1.set_yticks(y, [str(b) for b in batches])
    ax1.set_ylim(-0.7, batches.size - 0.3)
    ax1.set_xlim(base[0] / 1.5, base[-1] * 1.5)
    ax1.set_xlabel("base learning rate η̃ = η/B")
    ax1.set_ylabel("batch size B")
    ax1.grid(True, axis="x", which="major", alpha=0.25)
    handles = [Line2D([], [], color="0.8", lw=7), Line2D([], [], color=P.color(0), lw=3.5),
               Line2D([], [], color="k", marker="|", ls="none", ms=10, mew=1.6),
               Line2D([], [], color=P.color(1), marker="o", ms=3.5, lw=1.4)]
    labels = ["stable (simulated)", "good (simulated)", "good-range edges (theory)",
              "curvature limit η_c(B)/B"]
    ax1.legend(handles, labels, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2,
               fontsize=7.5, frameon=False)
    P.check_note(fig, data["checks"])
    return fig
