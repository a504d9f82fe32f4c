r"""ε_opt(B) = ε_max/(1 + B_noise/B): the measured one-step optimal step on three spectra.

McCandlish et al. (2018, eq. 2.6): on the local quadratic model the expected loss after one
SGD step with the *mean* minibatch gradient G_B (batch B drawn with replacement, Cov = Σ/B),

    E[L(θ − ε G_B)] = L − ε|G|² + ½ ε² (GᵀHG + tr(HΣ)/B),

is minimal at ε_opt(B) = ε_max/(1 + B_noise/B), ε_max = |G|²/GᵀHG, B_noise = tr(HΣ)/GᵀHG.

What is simulated. A noisy quadratic model (docs/design.md §4.1) L(θ) = ½ Σ_i h_i θ_i² with
per-example gradient noise of variance c_i = κ h_i ("Fisher ∝ Hessian"), at the point
θ = (1, …, 1), for three Hessian spectra h_i ∝ 1/i, h_i = 1 and h_i ∝ 1/i² (i = 1…p). κ is
chosen so that B_noise equals ``config.b_noise`` examples; B runs over B/B_noise from 0.01 to
100. For each B we draw ``n_pairs`` minibatch gradients G_B from the problem's sampler and
use each with its mirror image 2G − G_B (antithetic pairs: the same Gaussian law, and the
linear noise term cancels within a pair); the loss L(θ − εG_B) of every draw is evaluated on a
fine log-spaced grid of ε with the same draws for every ε (common random numbers). The
measured ε_opt is the arg-min of the Monte Carlo mean loss on the grid, refined by the vertex
of the parabola through the grid minimum and its two neighbours (a line search that does not
use the prediction). Its standard error comes from ``n_groups`` independent groups of draws.

Checks: for each spectrum, max over B of |ε_opt,measured/ε_opt(B) − 1| ≤ 3 %, and the largest
Monte Carlo relative standard error ≤ 0.5 % (well below the tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sgdtheory import theory
from sgdtheory.backend import get_backend
from sgdtheory.experiments import _plotting as P
from sgdtheory.experiments._common import Check, relative_check

__all__ = [
    "NAME", "TITLE", "Config", "PRESETS", "compute", "plot", "SPECTRA", "line_search",
    "noise_for_b_noise", "spectrum",
]

NAME = "eps_opt_vs_batch"
TITLE = "Measured one-step optimal step ε_opt/ε_max vs B/B_noise on three spectra"

#: name → exponent a of the spectrum h_i = i^(−a)
SPECTRA = {r"$h_i \propto 1/i$": 1.0, r"$h_i = 1$ (flat)": 0.0, r"$h_i \propto 1/i^2$": 2.0}


@dataclass(frozen=True)
class Config:
    dim: int = 20  # p, number of parameters
    b_noise: float = 1000.0  # B_noise at θ (examples); κ is set to give it
    ratio_min: float = 0.01  # smallest B/B_noise
    ratio_max: float = 100.0  # largest B/B_noise
    n_ratios: int = 9  # batch sizes, log-spaced in B/B_noise
    n_pairs: int = 150_000  # antithetic pairs of minibatch gradients per (spectrum, B)
    n_groups: int = 30  # independent groups for the standard error
    n_eps: int = 601  # grid points of ε/ε_max, log-spaced on [1e-3.5, 10^0.5]
    tolerance: float = 0.03  # max relative error of the measured ε_opt
    mc_tolerance: float = 0.005  # max allowed Monte Carlo relative standard error


PRESETS = {
    "quick": Config(dim=20, n_ratios=5, n_pairs=4_000, n_groups=10, n_eps=301,
                    mc_tolerance=0.03, tolerance=0.1),
    "default": Config(),
    "paper": Config(dim=100, n_ratios=17, n_pairs=1_000_000, n_groups=40, n_eps=1201,
                    mc_tolerance=0.003),
}


def spectrum(dim: int, exponent: float) -> np.ndarray:
    """Hessian eigenvalues h_i = i^(−exponent), i = 1…dim.

    >>> spectrum(3, 1.0).tolist()
    [1.0, 0.5, 0.3333333333333333]
    """
    return 1.0 / np.arange(1, dim + 1, dtype=float) ** exponent


def noise_for_b_noise(h: np.ndarray, theta: np.ndarray, b_noise: float) -> np.ndarray:
    """Noise variances c = κh with κ set so that B_noise = tr(HΣ)/GᵀHG = ``b_noise``.

    With G = Hθ: tr(HΣ) = κ Σh², GᵀHG = Σ h³θ², so κ = b_noise Σh³θ² / Σh².

    >>> h = np.array([1.0, 2.0]); c = noise_for_b_noise(h, np.ones(2), 10.0)
    >>> round(float(h @ c / (h**3).sum()), 12)
    10.0
    """
    kappa = b_noise * float(np.sum(h**3 * theta**2)) / float(np.sum(h**2))
    return kappa * h


def line_search(eps: np.ndarray, mean_loss: np.ndarray) -> float:
    """Arg-min of a sampled curve, refined by the parabola through the minimum and neighbours.

    The parabola is fitted in ε through the three grid points (exact when the curve is a
    parabola, whatever the spacing).

    >>> e = np.geomspace(0.1, 10, 201); round(line_search(e, (e - 2.0) ** 2), 3)
    2.0
    """
    k = int(np.argmin(mean_loss))
    if k == 0 or k == len(eps) - 1:
        return float(eps[k])
    x = eps[k - 1:k + 2]
    y = mean_loss[k - 1:k + 2]
    scale = x[1]
    a, b, _ = np.polyfit(x / scale, y, 2)
    if a <= 0:
        return float(eps[k])
    return float(scale * np.clip(-b / (2 * a), x[0] / scale, x[2] / scale))


def _one_step_moments(backend, gen, h, c, theta, batch, n_pairs, chunk=20_000):
    """Per-draw coefficients of L(θ − εG_B) for ``n_pairs`` antithetic pairs of G_B.

    G_B = G + ξ with ξ ~ N(0, diag(c)/B) (the NQM's batch-mean gradient, batch B drawn with
    replacement: one Gaussian draw whatever B is), and its mirror 2G − G_B. Since the loss is
    quadratic, L(θ − εg) = L(θ) − ε gᵀHθ + ½ ε² gᵀHg exactly; returns (gᵀHθ, gᵀHg) per draw as
    NumPy arrays of length 2·n_pairs, pair members at i and i + n_pairs.
    """
    xp_h = backend.asarray(h, dtype="float64")
    grad = xp_h * backend.asarray(theta, dtype="float64")
    scale = backend.asarray(np.sqrt(c / batch), dtype="float64")
    lin, quad = [], []
    for start in range(0, n_pairs, chunk):
        n = min(chunk, n_pairs - start)
        xi = backend.standard_normal(gen, (n, h.size), "float64") * scale
        lin_noise = backend.to_numpy(xi @ grad)
        quad_noise = backend.to_numpy((xi * xi) @ xp_h)
        cross = backend.to_numpy(xi @ (xp_h * grad))
        lin.append(lin_noise)
        quad.append((quad_noise, cross))
    g_np = h * theta
    g_sq, ghg = float(g_np @ g_np), float(g_np @ (h * g_np))
    lin_noise = np.concatenate(lin)
    quad_noise = np.concatenate([q for q, _ in quad])
    cross = np.concatenate([x for _, x in quad])
    lin_all = np.concatenate([g_sq + lin_noise, g_sq - lin_noise])
    quad_all = np.concatenate([ghg + 2 * cross + quad_noise, ghg - 2 * cross + quad_noise])
    return lin_all, quad_all


def compute(config: Config, backend, seed: int) -> dict:
    backend = get_backend(backend)
    gen = backend.rng(seed)
    ratios = np.geomspace(config.ratio_min, config.ratio_max, config.n_ratios)
    eps_grid_rel = np.logspace(-3.5, 0.5, config.n_eps)  # ε/ε_max
    names = list(SPECTRA)
    out = {"spectra": names, "ratio": ratios, "b_noise": config.b_noise, "dim": config.dim}
    measured = np.zeros((len(names), ratios.size))
    stderr = np.zeros_like(measured)
    predicted = np.zeros_like(measured)
    eps_max_all = np.zeros(len(names))
    checks: list[Check] = []
    for s, name in enumerate(names):
        h = spectrum(config.dim, SPECTRA[name])
        theta = np.ones(config.dim)
        c = noise_for_b_noise(h, theta, config.b_noise)
        stats = theory.quadratic_stats(h, c, h * theta)
        eps_max_all[s] = stats.eps_max
        eps = stats.eps_max * eps_grid_rel
        loss0 = 0.5 * float(h @ theta**2)
        for r, ratio in enumerate(ratios):
            batch = ratio * stats.b_noise
            lin, quad = _one_step_moments(backend, gen, h, c, theta, batch, config.n_pairs)
            groups = np.arange(lin.size) % config.n_groups
            lin_g = np.bincount(groups, lin) / np.bincount(groups)
            quad_g = np.bincount(groups, quad) / np.bincount(groups)

            def curve(lin_mean, quad_mean, eps=eps, loss0=loss0):
                return loss0 - eps * lin_mean + 0.5 * eps**2 * quad_mean

            measured[s, r] = line_search(eps, curve(lin.mean(), quad.mean()))
            per_group = np.array([line_search(eps, curve(a, b))
                                  for a, b in zip(lin_g, quad_g, strict=True)])
            stderr[s, r] = per_group.std(ddof=1) / np.sqrt(config.n_groups)
            predicted[s, r] = stats.eps_opt(batch)
        rel = measured[s] / predicted[s] - 1
        worst = int(np.argmax(np.abs(rel)))
        checks.append(relative_check(
            f"eps_opt h_i = i^-{SPECTRA[name]:g}: worst B", predicted[s, worst], measured[s, worst],
            config.tolerance,
            note=f"max over B/B_noise in [{config.ratio_min:g}, {config.ratio_max:g}] of "
                 f"|measured/predicted - 1| (worst at B/B_noise = {ratios[worst]:.3g})"))
    mc = float(np.max(stderr / measured))
    checks.append(Check("Monte Carlo rel. stderr of eps_opt (max) <= bound", config.mc_tolerance,
                        mc, config.mc_tolerance, mc <= config.mc_tolerance,
                        note="largest standard error / estimate over all points; passes when "
                             "below the bound ('predicted'), well under the eps_opt tolerance"))
    out.update(eps_max=eps_max_all, measured=measured, stderr=stderr, predicted=predicted,
               checks=checks)
    return out


def plot(data: dict):
    ratio = np.asarray(data["ratio"])
    meas, err, pred = (np.asarray(data[k]) for k in ("measured", "stderr", "predicted"))
    eps_max = np.asarray(data["eps_max"])
    fig, (ax, ax2) = P.subplots(1, 2, panel_size=(4.4, 3.4),
                                title="One-step optimal learning rate vs batch size (noisy "
                                      f"quadratic, p = {int(data['dim'])}, c ∝ h, "
                                      f"B_noise = {float(data['b_noise']):g})")
    x = np.geomspace(ratio.min() / 1.5, ratio.max() * 1.5, 200)
    P.theory(ax, x, 1.0 / (1.0 + 1.0 / x), c="0.2", label=r"theory $1/(1+B_{noise}/B)$")
    markers = "osD^v"
    for s, name in enumerate(data["spectra"]):
        P.simulated(ax, ratio, meas[s] / eps_max[s], err[s] / eps_max[s], c=P.color(s),
                    marker=markers[s % 5], label=f"simulated, {name}")
        P.simulated(ax2, ratio * (1 + 0.04 * (s - 1)), 100 * (meas[s] / pred[s] - 1),
                    100 * err[s] / pred[s], c=P.color(s), marker=markers[s % 5], label=name)
    P.log_axes(ax)
    ax.set_xlabel(r"$B/B_{noise}$ (batch size / noise scale)")
    ax.set_ylabel(r"$\epsilon_{opt}/\epsilon_{max}$ (measured by line search)")
    P.legend(ax, key=False, loc="upper left")
    ax.set_title("line search on the Monte Carlo mean loss (±1 s.e.)", fontsize=9)
    tol = max(c.tolerance for c in data["checks"] if c.name.startswith("eps_opt h_i"))
    ax2.axhspan(-100 * tol, 100 * tol, facecolor="0.88", edgecolor="0.55", lw=0.8, zorder=0,
                label=f"±{100 * tol:g}% tolerance")
    ax2.axhline(0, color="0.2", lw=1.2)
    ax2.set_xscale("log")
    ax2.set_xlabel(r"$B/B_{noise}$")
    ax2.set_ylabel(r"measured / predicted $\epsilon_{opt}$ − 1 (%)")
    ax2.set_ylim(-150 * tol, 150 * tol)
    ax2.set_title("relative error of the measured optimum", fontsize=9)
    P.legend(ax2, key=False, loc="lower right")
    P.check_note(fig, data["checks"])
    return fig
