r"""The noise scale grows during training; a two-batch EMA estimator tracks it.

As training proceeds |G| shrinks while the gradient noise does not, so

    B_simple(t) = tr(Σ)/|G|²   and   B_noise(t) = tr(HΣ)/GᵀHG

grow (McCandlish et al. 2018, §3 and App. C). They are estimated during a run from the squared
norms of the minibatch gradients at two batch sizes, E|G_B|² = |G|² + tr(Σ)/B (App. A):
:func:`sgdtheory.estimators.two_batch` gives unbiased |G|² and tr(Σ) each step, and
:class:`~sgdtheory.estimators.NoiseScaleEMA` averages numerator and denominator separately
(bias-corrected EMAs, decay β) before dividing, with a delta-method standard error.

What is simulated. SGD on the noisy quadratic model h_i = 1/i (i = 1…d), c = h, θ(0) = 1,
learning rate ``lr`` (multiplier of the mean gradient), ``replicas`` independent runs. Each
step draws, per replica, a "small" batch of b examples and b' = B − b further examples (the
data-parallel set-up: one worker's batch and the all-reduced batch of B that contains it), so
G_b and G_B = (b G_b + b' G_b')/B are nested minibatch means; the step uses G_B. The squared
norms |G_b|², |G_B|² go into one NoiseScaleEMA per replica.

Exact references. Along the expected trajectory (s_i(t) = E[θ_i(t)²] from the exact NQM
recursion, checked against :func:`sgdtheory.nqm.expected_loss`): B_simple(t) = tr(Σ)/E|G|²_t,
B_noise(t) = tr(HΣ)/E[GᵀHG]_t. For the estimator check, the quantity an EMA with decay β can
estimate without bias on a given replica is the lag-matched ratio
Σ_s w_s tr(Σ) / Σ_s w_s |G(θ_s)|² (w_s = β^{t−s}, the same bias-corrected weights, |G(θ_s)|²
the exact squared gradient norm of that replica at step s). The estimator's z-score is
(estimate − lag-matched exact)/(estimator's standard error).

Checks: (1) ≥ ``coverage`` (90 %) of the recorded (replica, step) points have |z| ≤ 3;
(2) B_noise grows: exact B_noise at the last record over the first ≥ ``growth``; (3) the
simulated mean training loss agrees with the exact NQM loss (≥ 90 % of records within 3
standard errors over replicas).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from sgdtheory import nqm, optim
from sgdtheory.backend import get_backend
from sgdtheory.estimators import NoiseScaleEMA
from sgdtheory.experiments import _plotting as P
from sgdtheory.experiments._common import Check
from sgdtheory.experiments.steps_vs_examples import sgd_second_moments
from sgdtheory.problems import Layout, NoisyQuadratic

__all__ = ["NAME", "TITLE", "Config", "PRESETS", "compute", "plot", "nested_batch_grads"]

NAME = "noise_scale_during_training"
TITLE = "B_noise(t), B_simple(t) along an SGD run and the two-batch EMA estimator tracking them"


@dataclass(frozen=True)
class Config:
    dim: int = 50  # d, NQM dimensions (h_i = 1/i, c = h)
    lr: float = 0.1  # η, multiplier of the mean minibatch gradient
    batch: int = 8192  # B, the big (all-reduced) batch used for the step
    batch_small: int = 1024  # b, one worker's batch (nested in B): 8 workers
    steps: int = 1500  # T
    replicas: int = 6  # independent runs, one estimator each
    beta: float = 0.95  # EMA decay of the estimator (≈ 40 effective steps)
    n_records: int = 30  # log-spaced record steps in [record_min, T]
    record_min: int = 20
    coverage: float = 0.9  # fraction of |z| ≤ 3 required
    growth: float = 2.0  # required B_noise(end)/B_noise(start)


PRESETS = {
    "quick": Config(dim=20, steps=300, replicas=6, beta=0.9, n_records=12, record_min=10),
    "default": Config(),
    "paper": Config(dim=200, steps=10_000, replicas=32, n_records=60),
}


def _bias_corrected_ema(x: np.ndarray, beta: float) -> np.ndarray:
    """m_t = Σ_{s≤t} β^{t−s} x_s / Σ_{s≤t} β^{t−s} along axis 0 (x: (T, ...))."""
    out = np.empty_like(x)
    num = np.zeros_like(x[0])
    den = 0.0
    for t in range(x.shape[0]):
        num = beta * num + x[t]
        den = beta * den + 1.0
        out[t] = num / den
    return out


def nested_batch_grads(backend, small, rest, theta, layout, b: int, batch: int):
    """(G_b, G_B): a worker's minibatch mean and the mean over B = b + b' that contains it.

    ``small`` and ``rest`` are independent problem samplers; G_B = (b G_b + b' G_b')/B with
    b' = B − b, so Cov(G_B) = Σ/B and G_b is the mean of b of its examples.
    """
    g_small = small.grad(theta, layout, b)
    g_small = backend.copy(g_small)
    g_big = (b * g_small + (batch - b) * rest.grad(theta, layout, batch - b)) / batch
    return g_small, g_big


def compute(config: Config, backend, seed: int) -> dict:
    backend = get_backend(backend)
    if not 0 < config.batch_small < config.batch:
        raise ValueError("batch_small must lie in (0, batch)")
    h = 1.0 / np.arange(1, config.dim + 1)
    c = h.copy()
    problem = NoisyQuadratic(h, c)
    kernel = problem.kernel(backend, "float64")
    gen = backend.rng(seed)
    r, b, bb = config.replicas, config.batch_small, config.batch
    small = kernel.sampler(gen, r)
    rest = kernel.sampler(gen, r)
    layout = Layout(r, 1)
    theta = backend.asarray(np.repeat(problem.theta0[None, :], r, axis=0), dtype="float64")
    xp_h = backend.asarray(h, dtype="float64")
    records = np.unique(np.geomspace(config.record_min, config.steps,
                                     config.n_records).astype(int))
    ests = [NoiseScaleEMA(config.beta) for _ in range(r)]
    opt = optim.sgd(config.lr)
    state = opt.init(theta)
    grad_sq_path = np.empty((config.steps, r))  # exact |G(θ_t)|² of each replica, t = 0..T-1
    est = np.full((records.size, r), np.nan)
    est_se = np.full_like(est, np.nan)
    loss = np.empty((records.size, r))
    k = 0
    tr_sigma = float(c.sum())
    for t in range(config.steps):
        g_exact = theta * xp_h
        grad_sq_path[t] = backend.to_numpy((g_exact * g_exact).sum(-1))
        g_small, g_big = nested_batch_grads(backend, small, rest, theta, layout, b, bb)
        sq_small = backend.to_numpy((g_small * g_small).sum(-1))
        sq_big = backend.to_numpy((g_big * g_big).sum(-1))
        for i in range(r):
            ests[i].update_two_batch(sq_small[i], sq_big[i], b, bb)
        theta, state = opt.update(g_big, state, theta)  # θ ← θ − η G_B
        if k < records.size and t + 1 == records[k]:
            # the estimate after the update at step t uses gradients at θ_0..θ_t
            est[k] = [e.b_simple for e in ests]
            est_se[k] = [e.b_simple_stderr for e in ests]
            loss[k] = backend.to_numpy(kernel.loss(theta))
            k += 1
    lagged = tr_sigma / _bias_corrected_ema(grad_sq_path, config.beta)[records - 1]
    # exact expected trajectory (s_i(t) = E θ_i(t)²)
    s = sgd_second_moments(h, c, config.lr, bb, config.steps)
    t_all = np.arange(config.steps + 1)
    b_simple_exp = tr_sigma / (s @ h**2)
    b_noise_exp = float(h @ c) / (s @ h**3)
    loss_exact = nqm.expected_loss(h, c, config.lr, bb, config.steps)
    # checks
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (est - lagged) / est_se
    valid = np.isfinite(z)
    frac = float(np.mean(np.abs(z[valid]) <= 3.0)) if valid.any() else 0.0
    growth = float(b_noise_exp[records[-1] - 1] / b_noise_exp[0])
    loss_mean = loss.mean(1)
    loss_se = loss.std(1, ddof=1) / np.sqrt(r)
    lz = (loss_mean - loss_exact[records]) / loss_se
    k3 = float(stats.t.ppf(stats.norm.cdf(3.0), r - 1))  # "3 s.e." with r − 1 d.o.f.
    loss_frac = float(np.mean(np.abs(lz) <= k3))
    checks = [
        Check("two-batch EMA B_simple: fraction of |z| <= 3", config.coverage, frac,
              config.coverage, frac >= config.coverage and valid.sum() >= 0.8 * z.size,
              note=f"z = (estimate - lag-matched exact B_simple)/estimator stderr over "
                   f"{int(valid.sum())} (replica, step) records; pass when the fraction "
                   f"reaches {config.coverage:g} (the 'predicted' value)"),
        Check("B_noise grows: B_noise(T)/B_noise(0) >= growth", config.growth, growth,
              config.growth, growth >= config.growth,
              note="exact tr(H Sigma)/E[G^T H G] along the expected trajectory, last record "
                   "over start; pass when at least the 'predicted' factor"),
        Check("simulated mean loss vs exact NQM: fraction within 3 s.e.", 0.9, loss_frac, 0.9,
              loss_frac >= 0.9,
              note=f"mean over {r} replicas vs nqm.expected_loss at the record steps (3 s.e. "
                   f"as a Student-t quantile with {r - 1} d.o.f.: {k3:.2f} s.e.)"),
    ]
    return {"records": records, "estimate": est, "estimate_se": est_se, "lagged_exact": lagged,
            "z": z, "t": t_all, "b_simple_expected": b_simple_exp,
            "b_noise_expected": b_noise_exp, "loss_exact": loss_exact,
            "loss_records": loss, "lr": config.lr, "batch": bb, "batch_small": b,
            "beta": config.beta, "dim": config.dim, "checks": checks}


def plot(data: dict):
    fig, (ax, ax3, ax2) = P.subplots(1, 3, panel_size=(4.1, 3.6),
                                     title="Noise scale during training (NQM d = "
                                           f"{int(data['dim'])}, lr = {float(data['lr']):g}, "
                                           f"B = {int(data['batch'])}, two-batch estimator "
                                           f"with b = {int(data['batch_small'])})")
    t = np.asarray(data["t"])[1:]
    rec = np.asarray(data["records"])
    b_noise, b_simple = (np.asarray(data[k])[1:] for k in ("b_noise_expected",
                                                            "b_simple_expected"))
    P.theory(ax, t, b_noise, c=P.color(1),
             label=r"exact $B_{noise}=\mathrm{tr}(H\Sigma)/E[G^THG]$")
    P.theory(ax, t, b_simple, c=P.color(0),
             label=r"exact $B_{simple}=\mathrm{tr}(\Sigma)/E|G|^2$")
    est, se = np.asarray(data["estimate"]), np.asarray(data["estimate_se"])
    lag = np.asarray(data["lagged_exact"])
    ok = np.isfinite(est) & np.isfinite(se)
    n_rep = est.shape[1]
    for i in range(1, n_rep):
        ax.plot(rec[ok[:, i]], est[ok[:, i], i], ".", color=P.color(2), alpha=0.35, ms=3,
                zorder=2, label=f"estimates of {n_rep - 1} other runs" if i == 1 else None)
    P.simulated(ax, rec[ok[:, 0]], est[ok[:, 0], 0], se[ok[:, 0], 0], c=P.color(2), ms=3.5,
                label=f"two-batch EMA estimate ± s.e. (β = {float(data['beta']):g}), run 1")
    P.theory(ax, rec, lag[:, 0], c="k", ls="--", lw=1.1, zorder=5,
             label="lag-matched exact B_simple, run 1")
    P.log_axes(ax)
    top = max(float(np.nanmax(b_noise)), float(np.nanmax(b_simple)))
    ax.set_ylim(0.5, top * 20)
    ax.set_xlabel("SGD step t")
    ax.set_ylabel("noise scale (examples)")
    P.legend(ax, key=False, loc="upper left", fontsize=7)
    z = np.asarray(data["z"])
    for i in range(n_rep):
        m = np.isfinite(z[:, i])
        ax3.plot(rec[m], z[m, i], "o", ms=3, mfc="white", color=P.color(i), mew=0.9)
    ax3.axhspan(-3, 3, color="0.9", zorder=0, label="|z| ≤ 3")
    ax3.axhline(0, color="0.3", lw=1)
    ax3.set_xscale("log")
    zmax = float(np.nanmax(np.abs(z[np.isfinite(z)]))) if np.isfinite(z).any() else 3.0
    ax3.set_ylim(-max(4.5, 1.1 * zmax), max(4.5, 1.1 * zmax))
    ax3.set_xlabel("SGD step t")
    ax3.set_ylabel("z = (estimate − lag-matched exact) / s.e.")
    ax3.set_title(f"estimator z-scores, {n_rep} runs", fontsize=9)
    P.legend(ax3, key=False, loc="lower left")
    loss = np.asarray(data["loss_records"])
    P.theory(ax2, t, np.asarray(data["loss_exact"])[1:], c="0.2", label="exact E[L_t] (nqm)")
    P.simulated(ax2, rec, loss.mean(1), loss.std(1, ddof=1) / np.sqrt(loss.shape[1]),
                c=P.color(0), label=f"simulated, mean ± s.e. of {loss.shape[1]} runs")
    P.log_axes(ax2)
    ax2.set_xlabel("SGD step t")
    ax2.set_ylabel("training loss L (mean over examples)")
    ax2.set_title("loss falls as the noise scale grows", fontsize=9)
    P.legend(ax2, key=False, loc="lower left")
    P.check_note(fig, data["checks"])
    return fig
