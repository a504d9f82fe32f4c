r"""Steps to a target vs batch size for SGD, heavy-ball momentum and preconditioned SGD (NQM).

Zhang et al. (2019) on the noisy quadratic model: at the best constant learning rate for each
batch size B, the steps to reach a target loss fall like 1/B up to a critical batch and then
flatten. Their predictions, reproduced here exactly with :mod:`sgdtheory.nqm`:

* heavy-ball momentum (v ← μv + g, θ ← θ − ηv, as ``torch.optim.SGD``) helps only at large
  batch: at small B the best effective rate η/(1−μ) is limited by the gradient noise, which
  momentum does not reduce, so S_SGD/S_momentum ≈ 1; at large B it is limited by curvature
  (stability η h_max < 2(1+μ)), and momentum speeds up the slow directions;
* preconditioning, P = (H/h_max)^{−p}, raises the critical batch: it speeds up the
  low-curvature directions, so perfect scaling extends to larger B.

Model: h_i = 1/i (i = 1…d), c = h ("Fisher = Hessian"), E[θ_i(0)²] = 1, target = ``target``·L₀.
For each optimiser and B the best ``lr`` (multiplier of the mean minibatch gradient) is
searched on a log grid and refined on a finer grid around the coarse optimum; S is the exact
first step with E[L_t] ≤ target (``nqm.steps_to_target``). B_crit = E_min/S_min is fitted per
optimiser with :func:`sgdtheory.theory.fit_steps_examples` (all batch sizes).

Checks: (1) momentum speed-up S_SGD/S_mom at the smallest B within ``small_b_tolerance`` of 1;
(2) at the largest B ≥ ``large_b_speedup``; (3) B_crit(preconditioned)/B_crit(SGD) ≥
``precond_factor``; (4) B_crit(momentum) ≥ B_crit(SGD) (momentum does not lower it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sgdtheory import nqm, theory
from sgdtheory.experiments import _plotting as P
from sgdtheory.experiments._common import Check, relative_check

__all__ = ["NAME", "TITLE", "Config", "PRESETS", "compute", "plot", "OPTIMIZERS", "best_steps"]

NAME = "nqm_optimizers"
TITLE = "Steps to target vs batch size for SGD, momentum and preconditioned SGD (exact NQM)"


@dataclass(frozen=True)
class Config:
    dim: int = 300  # d (h_i = 1/i, c = h): condition number d
    target: float = 0.01  # target loss as a fraction of L0
    batch_min: float = 8.0  # smallest batch (examples)
    batch_max: float = 1e5  # largest batch
    n_batches: int = 11  # log-spaced batch sizes
    momentum: float = 0.9  # μ of heavy ball
    precond_power: float = 0.5  # p of P = (H/h_max)^(−p)
    n_lrs: int = 12  # coarse log grid of lr per (optimiser, B), refined by as many points
    small_b_tolerance: float = 0.1  # |S_SGD/S_mom − 1| at the smallest B
    large_b_speedup: float = 2.0  # S_SGD/S_mom at the largest B must reach this
    precond_factor: float = 2.0  # B_crit(precond)/B_crit(SGD) must reach this


PRESETS = {
    "quick": Config(dim=100, n_batches=6, n_lrs=8, batch_max=1e4, large_b_speedup=1.3),
    "default": Config(),
    "paper": Config(dim=1000, batch_min=1.0, n_batches=21, n_lrs=40, batch_max=1e6),
}

OPTIMIZERS = ("SGD", "momentum", "preconditioned")


def best_steps(h, c, batch: float, target: float, lr_max: float, n_lrs: int, *,
               lr_min: float = 1e-6, max_steps: int = 10**7, **kwargs) -> tuple[float, float]:
    """Fewest steps to ``target`` over constant learning rates, and the best rate.

    A log grid of ``n_lrs`` rates in [lr_min, lr_max) is refined by ``n_lrs`` rates between the
    neighbours of the coarse optimum. ``kwargs`` go to :func:`sgdtheory.nqm.steps_to_target`.

    >>> h = 1.0 / np.arange(1, 11)
    >>> s, lr = best_steps(h, h, 1e6, 0.05 * 0.5 * h.sum(), 1.99, 12)
    >>> s == nqm.steps_to_target(h, h, lr, 1e6, 0.05 * 0.5 * h.sum())
    True
    """
    coarse = np.geomspace(lr_min, lr_max, n_lrs, endpoint=False)
    s = np.asarray(nqm.steps_to_target(h, c, coarse, batch, target, max_steps=max_steps,
                                       **kwargs), dtype=float)
    if not np.isfinite(s).any():
        return float("inf"), float("nan")
    k = int(np.argmin(s))
    lo, hi = coarse[max(k - 1, 0)], coarse[k + 1] if k + 1 < n_lrs else lr_max
    fine = np.geomspace(lo, hi, n_lrs, endpoint=False)
    s2 = np.asarray(nqm.steps_to_target(h, c, fine, batch, target, max_steps=max_steps,
                                        **kwargs), dtype=float)
    j = int(np.argmin(s2))
    if s2[j] <= s[k]:
        return float(s2[j]), float(fine[j])
    return float(s[k]), float(coarse[k])


def compute(config: Config, backend, seed: int) -> dict:
    del backend, seed  # exact computation (NumPy), no randomness
    h = 1.0 / np.arange(1, config.dim + 1)
    c = h.copy()
    target = config.target * 0.5 * float(h.sum())
    batches = np.geomspace(config.batch_min, config.batch_max, config.n_batches)
    mu = config.momentum
    steps = np.full((3, batches.size), np.inf)
    lrs = np.full((3, batches.size), np.nan)
    for j, b in enumerate(batches):
        steps[0, j], lrs[0, j] = best_steps(h, c, b, target, 2.0 / h.max(), config.n_lrs)
        # momentum: rates up to its stability limit 2(1+μ)/h_max; cap the exact scan at a few
        # times the SGD answer (slower rates cannot be the optimum that matters here)
        cap = int(min(10**7, 3 * steps[0, j] + 100))
        # the best effective rate η/(1−μ) is at least about SGD's best rate / 4
        lo = 0.25 * lrs[0, j] * (1 - mu)
        steps[1, j], lrs[1, j] = best_steps(h, c, b, target, 2.0 * (1 + mu) / h.max(),
                                            config.n_lrs, lr_min=lo, max_steps=cap,
                                            momentum=mu)
        steps[2, j], lrs[2, j] = best_steps(h, c, b, target, 2.0 / h.max(), config.n_lrs,
                                            precond_power=config.precond_power)
    s_min, e_min, b_crit = np.zeros(3), np.zeros(3), np.zeros(3)
    for k in range(3):
        ok = np.isfinite(steps[k])
        s_min[k], e_min[k] = theory.fit_steps_examples(steps[k, ok], steps[k, ok] * batches[ok])
        b_crit[k] = e_min[k] / s_min[k]
    speedup = steps[0] / steps[1]
    checks = [
        relative_check("momentum speed-up S_SGD/S_mom at smallest B", 1.0, speedup[0],
                       config.small_b_tolerance,
                       note=f"B = {batches[0]:g}: noise-limited, momentum should not help"),
        Check("momentum speed-up S_SGD/S_mom at largest B >= bound", config.large_b_speedup,
              speedup[-1], config.large_b_speedup, speedup[-1] >= config.large_b_speedup,
              note=f"B = {batches[-1]:g}: curvature-limited, momentum should help "
                   f"(pass when at least the 'predicted' bound)"),
        Check("B_crit(preconditioned)/B_crit(SGD) >= bound", config.precond_factor,
              b_crit[2] / b_crit[0], config.precond_factor,
              b_crit[2] / b_crit[0] >= config.precond_factor,
              note=f"fitted E_min/S_min; preconditioning P = (H/h_max)^-{config.precond_power:g}"
                   f" raises the critical batch (pass when at least the bound)"),
        Check("B_crit(momentum)/B_crit(SGD) >= 1", 1.0, b_crit[1] / b_crit[0], 1.0,
              b_crit[1] / b_crit[0] >= 1.0,
              note="momentum extends perfect scaling (does not lower the critical batch)"),
    ]
    return {"batch": batches, "optimizers": list(OPTIMIZERS), "steps": steps, "best_lr": lrs,
            "s_min": s_min, "e_min": e_min, "b_crit": b_crit, "speedup": speedup,
            "momentum": mu, "precond_power": config.precond_power, "dim": config.dim,
            "target": config.target, "checks": checks}


def plot(data: dict):
    fig, (ax, ax2) = P.subplots(1, 2, panel_size=(4.6, 3.7),
                                title=f"Optimisers on the NQM (d = {int(data['dim'])}, "
                                      f"h_i = 1/i, c = h): steps to reach "
                                      f"{float(data['target']):g}·L₀ at the best lr per B")
    b = np.asarray(data["batch"])
    b_line = np.geomspace(b.min(), b.max(), 300)
    labels = ["SGD", f"momentum μ = {float(data['momentum']):g}",
              f"preconditioned, P = (H/h_max)^-{float(data['precond_power']):g}"]
    markers = "os^"
    for k, lab in enumerate(labels):
        s = np.asarray(data["steps"][k])
        sf, _ = theory.steps_examples(b_line, float(data["s_min"][k]), float(data["e_min"][k]))
        P.theory(ax, b_line, sf, c=P.color(k), lw=1.2, alpha=0.8)
        P.simulated(ax, b, s, c=P.color(k), marker=markers[k],
                    label=f"{lab}: B_crit = {float(data['b_crit'][k]):.0f}")
        ax.axvline(float(data["b_crit"][k]), color=P.color(k), ls=":", lw=1)
    P.log_axes(ax)
    ax.set_xlabel("batch size B (examples)")
    ax.set_ylabel("steps to target S (best lr per B)")
    ax.set_title("points: exact NQM; lines: fitted S_min(1 + B_crit/B); dotted: B_crit",
                 fontsize=8.5)
    P.legend(ax, key=False, loc="upper right")
    sp = np.asarray(data["speedup"])
    ax2.axhline(1.0, color="0.4", lw=1)
    P.simulated(ax2, b, sp, c=P.color(1), marker="s", filled=True,
                label="S_SGD / S_momentum (exact)")
    ax2.set_xscale("log")
    ax2.set_xlabel("batch size B (examples)")
    ax2.set_ylabel("speed-up of momentum over SGD (×)")
    ax2.set_title("momentum helps only at large batch", fontsize=9)
    P.legend(ax2, key=False, loc="upper left")
    P.check_note(fig, data["checks"])
    return fig
