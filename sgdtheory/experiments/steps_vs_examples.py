r"""Steps vs examples to reach a target loss: hyperbolas, and B_crit vs the run's B_noise.

McCandlish et al. (2018, eq. 2.11): reaching a given loss with batch B takes

    S = S_min (1 + B_crit/B) steps and E = B·S = E_min (1 + B/B_crit) examples,
    (S/S_min − 1)(E/E_min − 1) = 1,   B_crit = E_min/S_min ≈ B_noise averaged over the run.

What is computed. The noisy quadratic model (Zhang et al. 2019) with h_i = 1/i (i = 1…d),
c = h ("Fisher = Hessian"), E[θ_i(0)²] = 1, solved exactly by :mod:`sgdtheory.nqm`: for
every batch B on a log grid and every target loss (fractions of the initial loss L₀), the
fewest steps over a log grid of constant learning rates (``nqm.optimal_steps_curve``). S_min
and E_min are fitted per target with :func:`sgdtheory.theory.fit_steps_examples`, and
B_crit = E_min/S_min.

Run-averaged noise scale (the check's reference). Along the exact expected trajectory of
SGD at batch B = B_crit with its best learning rate η*, s_i(t) = E[θ_i(t)²] follows
s_i(t) = s_i* + (1 − η*h_i)^{2t}(s_i(0) − s_i*), s_i* = η*c_i/(B h_i(2 − η*h_i)), and

    B_noise(t) = tr(HΣ) / E[GᵀHG]_t = Σ_i h_i c_i / Σ_i h_i³ s_i(t),

the ratio of expectations over the SGD state (the form the two-batch estimators measure).
``b_noise_run`` is its plain average over the steps t = 0 … S−1 of that run, further averaged
over the learning rates whose step count is within 2 % of the fewest (the optimum is flat in η,
and B_noise(t) depends on which nearly tied rate is used). Uniform
weighting over steps is the one the derivation of S(B) uses: each step costs one unit of S
and its noise term is B_noise(t)/B, so S − S_min = (1/B)·Σ_t B_noise(t) to first order, i.e.
B_crit = E_min/S_min is the step average of B_noise. (Averaging along the noiseless
large-batch trajectory instead over-weights the late steps where the stiff directions have
already converged and GᵀHG → 0; the SGD state at B_crit keeps them at their noise floor.)

Checks: per target, fitted B_crit within a factor 2 of ``b_noise_run``; and the hyperbola
fits the exact points (max relative error of S over B ≤ ``fit_tolerance``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sgdtheory import nqm, theory
from sgdtheory.experiments import _plotting as P
from sgdtheory.experiments._common import Check, factor_check, relative_check

__all__ = [
    "NAME", "TITLE", "Config", "PRESETS", "compute", "plot", "b_noise_along_run",
    "run_averaged_b_noise", "sgd_second_moments",
]

NAME = "steps_vs_examples"
TITLE = "Steps vs examples to a target loss (exact NQM), fitted hyperbolas, B_crit vs B_noise"


@dataclass(frozen=True)
class Config:
    dim: int = 100  # d, NQM dimensions (h_i = 1/i, c = h)
    targets: tuple = (0.1, 0.03, 0.01, 0.003)  # target losses as fractions of L0
    batch_min: float = 1.0  # smallest batch (examples)
    batch_max: float = 1e5  # largest batch
    n_batches: int = 26  # log-spaced batch sizes
    n_lrs: int = 100  # log-spaced constant learning rates in [lr_min, 1.99/h_max]
    lr_min: float = 1e-4
    factor: float = 2.0  # B_crit must lie within this factor of the run-averaged B_noise
    fit_tolerance: float = 0.2  # max |S_fit/S − 1| over the batch grid
    near_optimal: float = 0.02  # rates within 2% of the fewest steps enter the B_noise average


PRESETS = {
    "quick": Config(dim=30, targets=(0.1, 0.01), n_batches=12, n_lrs=40),
    "default": Config(),
    "paper": Config(dim=1000, targets=(0.1, 0.03, 0.01, 0.003, 0.001), n_batches=41,
                    n_lrs=300),
}


def sgd_second_moments(h, c, lr: float, batch: float, steps: int, init_sq=1.0) -> np.ndarray:
    r"""s_i(t) = E[θ_i(t)²] of SGD on the NQM for t = 0…steps, shape (steps+1, d).

    s_i(t) = s_i* + q_i^t (s_i(0) − s_i*), q_i = (1 − ηh_i)², s_i* = η²c_i/(B(1 − q_i)).

    >>> sgd_second_moments(np.array([1.0]), np.array([1.0]), 0.5, 1.0, 1)[:, 0].tolist()
    [1.0, 0.5]
    """
    h, c = np.asarray(h, float), np.asarray(c, float)
    q = (1.0 - lr * h) ** 2
    s_star = lr**2 * c / batch / (1.0 - q)
    t = np.arange(steps + 1)[:, None]
    return s_star + q**t * (np.asarray(init_sq, float) - s_star)


def b_noise_along_run(h, c, lr: float, batch: float, steps: int) -> np.ndarray:
    """B_noise(t) = Σ h c / Σ h³ s(t) for t = 0…steps−1 along the expected SGD trajectory."""
    s = sgd_second_moments(h, c, lr, batch, steps)[:-1]
    return float(np.sum(h * c)) / (s @ h**3)


def run_averaged_b_noise(h, c, batch: float, target: float, lrs, near_optimal: float) -> float:
    """Step-averaged B_noise(t) along the expected SGD run at ``batch`` (see module docstring).

    The steps-to-target curve is flat near its best learning rate, so the average is also
    taken over every rate of ``lrs`` whose step count is within ``near_optimal`` (relative)
    of the fewest: the result does not hinge on which of nearly tied rates the grid picks.
    """
    steps = np.asarray(nqm.steps_to_target(h, c, lrs, batch, target), dtype=float)
    best = np.nanmin(steps)
    near = np.flatnonzero(steps <= best * (1.0 + near_optimal))
    return float(np.mean([np.mean(b_noise_along_run(h, c, float(lrs[j]), batch,
                                                    int(steps[j]))) for j in near]))


def compute(config: Config, backend, seed: int) -> dict:
    del backend, seed  # exact computation: no randomness, NumPy only
    h = 1.0 / np.arange(1, config.dim + 1)
    c = h.copy()
    loss0 = 0.5 * float(h.sum())
    batches = np.geomspace(config.batch_min, config.batch_max, config.n_batches)
    lrs = np.geomspace(config.lr_min, 1.99 / h.max(), config.n_lrs)
    n_t = len(config.targets)
    steps = np.full((n_t, batches.size), np.nan)
    best_lr = np.full_like(steps, np.nan)
    s_min, e_min, b_crit, b_run, fit_err = (np.zeros(n_t) for _ in range(5))
    checks: list[Check] = []
    for k, frac in enumerate(config.targets):
        target = frac * loss0
        r = nqm.optimal_steps_curve(h, c, batches, target, lrs)
        steps[k], best_lr[k] = r.steps, r.lr
        ok = np.isfinite(r.steps)
        s_min[k], e_min[k] = theory.fit_steps_examples(r.steps[ok], r.examples[ok])
        b_crit[k] = theory.critical_batch(s_min[k], e_min[k])
        s_fit, _ = theory.steps_examples(batches[ok], s_min[k], e_min[k])
        fit_err[k] = float(np.max(np.abs(s_fit / r.steps[ok] - 1.0)))
        b_run[k] = run_averaged_b_noise(h, c, b_crit[k], target, lrs, config.near_optimal)
        checks.append(factor_check(
            f"B_crit vs run-averaged B_noise, target {frac:g} L0", b_run[k], b_crit[k],
            config.factor,
            note="fitted E_min/S_min vs step average of tr(H Sigma)/E[G^T H G] along the "
                 "exact expected SGD run at B = B_crit (its best lr); pass within the factor"))
        checks.append(relative_check(
            f"hyperbola fit, target {frac:g} L0: 1 + max |S_fit/S - 1|", 1.0, 1.0 + fit_err[k],
            config.fit_tolerance,
            note="S = S_min(1 + B_crit/B) fitted by theory.fit_steps_examples vs the exact "
                 "NQM steps at the best lr; rel_error is the worst misfit over the batch grid"))
    return {"batch": batches, "targets": np.asarray(config.targets, float), "loss0": loss0,
            "steps": steps, "best_lr": best_lr, "s_min": s_min, "e_min": e_min,
            "b_crit": b_crit, "b_noise_run": b_run, "fit_error": fit_err, "dim": config.dim,
            "checks": checks}


def plot(data: dict):
    fig, (ax, ax2) = P.subplots(1, 2, panel_size=(4.6, 3.7),
                                title="Steps vs examples to reach a target loss "
                                      f"(exact NQM, d = {int(data['dim'])}, h_i = 1/i, c = h)")
    batches = np.asarray(data["batch"])
    b_line = np.geomspace(batches.min() / 2, batches.max() * 2, 300)
    for k, frac in enumerate(np.asarray(data["targets"])):
        s = np.asarray(data["steps"][k])
        ok = np.isfinite(s)
        sf, ef = theory.steps_examples(b_line, float(data["s_min"][k]), float(data["e_min"][k]))
        P.theory(ax, ef, sf, c=P.color(k))
        P.simulated(ax, (s * batches)[ok], s[ok], c=P.color(k), ms=3.5,
                    label=f"L = {frac:g}·L₀ (B_crit = {float(data['b_crit'][k]):.0f})")
        bc = float(data["b_crit"][k])
        sc, ec = theory.steps_examples(bc, float(data["s_min"][k]), float(data["e_min"][k]))
        ax.plot([ec], [sc], marker="*", ms=10, color=P.color(k), mec="k", mew=0.6, zorder=4)
    P.log_axes(ax)
    ax.set_xlabel("examples processed E = B·S")
    ax.set_ylabel("optimisation steps S")
    ax.set_ylim(top=ax.get_ylim()[1] * 30)
    star = ax.plot([], [], "*", color="0.5", mec="k", ms=7)[0]
    P.legend(ax, key=False, loc="upper right",
             extra=[(star, "B = B_crit (S = 2S_min, E = 2E_min)")])
    ax.set_title("points: exact NQM at best lr; lines: fitted hyperbola", fontsize=9)
    targets = np.asarray(data["targets"]) * 1.0
    b_run = np.asarray(data["b_noise_run"])
    order = np.argsort(targets)
    P.theory(ax2, targets[order], b_run[order], c="0.2",
             label="run-averaged B_noise (exact, at B = B_crit)")
    ax2.fill_between(targets[order], b_run[order] / 2, b_run[order] * 2, color="0.88",
                     zorder=0, label="factor-2 band")
    for k in range(targets.size):
        P.simulated(ax2, [targets[k]], [data["b_crit"][k]], c=P.color(k), marker="s", ms=6,
                    filled=True)
    ax2.plot([], [], "s", color="0.4", label="fitted B_crit = E_min/S_min")
    P.log_axes(ax2)
    ax2.invert_xaxis()
    ax2.set_xlabel("target loss L/L₀ (training proceeds →)")
    ax2.set_ylabel("batch size (examples)")
    ax2.set_title("critical batch vs noise scale", fontsize=9)
    P.legend(ax2, key=False, loc="upper left")
    P.check_note(fig, data["checks"])
    return fig
