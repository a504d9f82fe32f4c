r"""Memory curve: loss of the batch seen k steps ago, minus the loss of unseen data, vs k.

Myrtle ("How to train your ResNet", part 2) recomputed the loss of recently seen batches at
the final weights: at a high learning rate the most recent batches have a lower loss than
unseen data, but the advantage is gone within a fraction of an epoch (the network forgets
what it saw earlier in the epoch); at a low learning rate it persists for several epochs.

Here the same measurement is made on one-pass SGD for linear regression with Gaussian
features (spectrum λ, label noise σ²), in its stationary state, and compared with the exact
derived gap Δ_k of :func:`sgdtheory.memory.memory_gap`. An "epoch" is a nominal dataset of
``n_data`` examples, ``n_data/B`` steps. The two learning rates are set by the memory horizon
1/(η̃ λ̄) (base rate η̃ = η/B, λ̄ = tr H / d the mean eigenvalue): ``horizon_high`` and
``horizon_low`` epochs.

Estimator (exact in expectation, low variance): for a probe batch used at step s and
evaluated at step s + k, G = [ℓ_batch(e_{s+k}) − ℓ_batch(e_s)] − [L(e_{s+k}) − L(e_s)], with
L(e) = ½(λᵀe² + σ²) the exact loss on unseen data. E[ℓ_batch(e_s)] = E[L(e_s)] because the
batch is independent of e_s, so E[G] = Δ_k, and the label-noise part ½ξ² cancels in the
first bracket. Replicas start from e ~ N(0, diag m*) (m* the stationary second moments; the
gap depends on e only through them). Probe batches are taken every ``probe_every`` steps;
standard errors are across independent replicas.

The simulation loop is experiment-specific (it stores probe batches and re-evaluates them);
data are drawn exactly as in the one-pass linear-regression model of docs/design.md §4.3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sgdtheory import memory, optim, theory
from sgdtheory.backend import get_backend
from sgdtheory.experiments import _plotting as P
from sgdtheory.experiments._common import Check, relative_check

__all__ = [
    "NAME", "TITLE", "Config", "PRESETS", "compute", "plot", "lag_grid", "learning_rates",
    "simulate_gaps", "spectrum",
]

NAME = "memory_curve"
TITLE = "Loss of the batch seen k steps ago minus unseen loss, high vs low lr, with derived curve"


@dataclass(frozen=True)
class Config:
    dim: int = 16  # d, number of features
    lam_max: float = 1.0  # largest eigenvalue of H (log-spaced spectrum)
    lam_min: float = 0.1  # smallest eigenvalue of H
    noise_var: float = 1.0  # σ², label-noise variance
    batch: int = 8  # B, examples per step (mean gradient)
    n_data: int = 1024  # nominal epoch, in examples (epoch = n_data / B steps)
    horizon_high: float = 0.125  # memory horizon 1/(η̃ λ̄) at the high lr, in epochs
    horizon_low: float = 4.0  # memory horizon at the low lr, in epochs
    max_lag_epochs: float = 4.0  # largest lag k, in epochs
    n_lags: int = 24  # lags on a log grid from 1 step
    replicas: int = 512  # independent SGD runs per learning rate
    n_probes: int = 32  # probe batches per replica
    probe_every: int = 16  # steps between probe batches
    close_epochs: float = 0.5  # the high-lr gap must have closed (< close_frac) by here
    close_frac: float = 0.1
    persist_epochs: float = 2.0  # the low-lr gap must still exceed persist_frac here
    persist_frac: float = 0.2


PRESETS = {
    "quick": Config(replicas=192, n_probes=16, probe_every=16, n_lags=16),
    "default": Config(),
    "paper": Config(replicas=1024, n_probes=48, probe_every=16, n_lags=32),
}


def spectrum(config: Config) -> np.ndarray:
    """λ: ``dim`` eigenvalues log-spaced from ``lam_max`` down to ``lam_min``."""
    return np.geomspace(config.lam_max, config.lam_min, config.dim)


def learning_rates(config: Config) -> dict:
    """High and low ``lr`` (mean-gradient units) from the memory horizons (in epochs).

    η̃ = 1/(horizon·N·λ̄) is the base rate, η = η̃·B.
    """
    lam_bar = float(spectrum(config).mean())
    out = {}
    for key, hor in (("high", config.horizon_high), ("low", config.horizon_low)):
        base = 1.0 / (hor * config.n_data * lam_bar)
        out[key] = theory.lr_from_base(base, config.batch)
    return out


def lag_grid(config: Config) -> np.ndarray:
    """Integer lags k (steps), log-spaced from 1 to ``max_lag_epochs`` epochs, unique."""
    k_max = int(round(config.max_lag_epochs * config.n_data / config.batch))
    return np.unique(np.round(np.geomspace(1, k_max, config.n_lags)).astype(np.int64))


def simulate_gaps(lam, lrs, batch, noise_var, lags, *, replicas, n_probes, probe_every,
                  backend, seed):
    """Monte Carlo memory gap of one-pass SGD: per replica mean of G over probe batches.

    Args:
        lam: λ (d,). lrs: learning rates (L,), mean-gradient units. batch: B.
        noise_var: σ². lags: integer lags (K,), ≥ 1.
        replicas, n_probes, probe_every: sample sizes (see the module docstring).
        backend: :class:`sgdtheory.backend.Backend`. seed: int.

    Returns:
        (L, replicas, K) NumPy array of per-replica mean gaps, and (L,) fresh (unseen) loss
        averaged over the run.
    """
    be = get_backend(backend)
    xp = be.xp
    gen = be.rng(seed)
    lam = np.asarray(lam, dtype=float)
    d = lam.size
    lrs = np.asarray(lrs, dtype=float)
    n_l = lrs.size
    r_tot = n_l * replicas
    lags = np.asarray(lags, dtype=np.int64)
    k_max = int(lags.max())
    m_star = np.stack([memory.stationary_moments(lam, lr, batch, noise_var=noise_var)
                       for lr in lrs])  # (L, d)
    sqrt_lam = be.asarray(np.sqrt(lam), dtype="float64")
    lam_b = be.asarray(lam, dtype="float64")
    lr_col = be.asarray(np.repeat(lrs, replicas)[:, None], dtype="float64")  # (R, 1)
    # the step η·(mean gradient) taken as the base rate η/B times the summed gradient
    opt = optim.sgd(lr_col / batch)
    e = be.standard_normal(gen, (r_tot, d)) * be.asarray(np.repeat(np.sqrt(m_star), replicas,
                                                                    axis=0), dtype="float64")
    sigma = float(np.sqrt(noise_var))
    n_slots = k_max // probe_every + 2
    probe_x = be.zeros((n_slots, r_tot, batch, d))
    probe_xi = be.zeros((n_slots, r_tot, batch))
    probe_pre = be.zeros((n_slots, r_tot))  # ℓ_batch(e_s) − L(e_s)
    acc = be.zeros((r_tot, lags.size))
    counts = np.zeros(lags.size)
    fresh_sum = be.zeros((r_tot,))
    last_probe = (n_probes - 1) * probe_every
    n_steps = last_probe + k_max
    lag_index = {int(k): i for i, k in enumerate(lags)}
    state = opt.init(e)

    def batch_minus_fresh(ex, x, xi):
        resid = xp.einsum("rbd,rd->rb", x, ex) - xi
        seen = 0.5 * (resid * resid).mean(axis=1)
        fresh = 0.5 * ((ex * ex) @ lam_b + noise_var)
        return seen - fresh, fresh

    for t in range(n_steps):
        x = be.standard_normal(gen, (r_tot, batch, d)) * sqrt_lam
        xi = be.standard_normal(gen, (r_tot, batch)) * sigma
        if t % probe_every == 0 and t <= last_probe:
            slot = (t // probe_every) % n_slots
            probe_x[slot] = x
            probe_xi[slot] = xi
            probe_pre[slot] = batch_minus_fresh(e, x, xi)[0]
        resid = xp.einsum("rbd,rd->rb", x, e) - xi
        e, state = opt.update(xp.einsum("rbd,rb->rd", x, resid), state, e)  # Σ_i x_i r_i
        now = t + 1  # e is e_{now}
        fresh_sum = fresh_sum + 0.5 * ((e * e) @ lam_b + noise_var)
        first = max(0, now - k_max)
        s0 = -(-first // probe_every) * probe_every
        for s in range(s0, min(now - 1, last_probe) + 1, probe_every):
            i = lag_index.get(now - s)
            if i is None:
                continue
            slot = (s // probe_every) % n_slots
            g, _ = batch_minus_fresh(e, probe_x[slot], probe_xi[slot])
            acc[:, i] = acc[:, i] + (g - probe_pre[slot])
            counts[i] += 1
    per_rep = be.to_numpy(acc) / counts[None, :]
    fresh = be.to_numpy(fresh_sum).reshape(n_l, replicas).mean(axis=1) / n_steps
    return per_rep.reshape(n_l, replicas, lags.size), fresh


def compute(config: Config, backend, seed: int = 0) -> dict:
    """Derived and simulated memory gaps at a high and a low learning rate, with checks."""
    lam = spectrum(config)
    lrs = learning_rates(config)
    lags = lag_grid(config)
    steps_per_epoch = config.n_data / config.batch
    names = ("high", "low")
    lr_arr = np.array([lrs[n] for n in names])
    per_rep, fresh_sim = simulate_gaps(
        lam, lr_arr, config.batch, config.noise_var, lags, replicas=config.replicas,
        n_probes=config.n_probes, probe_every=config.probe_every, backend=backend, seed=seed)
    sim = per_rep.mean(axis=1)
    se = per_rep.std(axis=1, ddof=1) / np.sqrt(config.replicas)
    derived = np.stack([memory.memory_gap(lam, lr, config.batch, lags,
                                          noise_var=config.noise_var) for lr in lr_arr])
    fresh = np.array([memory.memory_curve(lam, lr, config.batch, 1,
                                          noise_var=config.noise_var)[1] for lr in lr_arr])
    checks: list[Check] = []
    for i, n in enumerate(names):
        z = np.abs(sim[i] - derived[i]) / se[i]
        frac = float(np.mean(z <= 3.0))
        checks.append(Check(f"{n} lr: simulated within 3 s.e. of derived", 1.0, frac, 0.8,
                            frac >= 0.8, "fraction of lags with |sim - derived| <= 3 s.e.; "
                                         "pass if >= 0.8 (lags share replicas: correlated)"))
        w = 1.0 / se[i] ** 2
        amp_rep = (per_rep[i] * w * derived[i]).sum(axis=1) / np.sum(w * derived[i] ** 2)
        amp = float(amp_rep.mean())
        amp_se = float(amp_rep.std(ddof=1) / np.sqrt(config.replicas))
        checks.append(relative_check(f"{n} lr: fitted amplitude sim/derived", 1.0, amp,
                                     3.0 * amp_se, "weighted least-squares scale of the "
                                     "simulated on the derived gap; tolerance = 3 s.e."))
    k_close = config.close_epochs * steps_per_epoch
    k_persist = config.persist_epochs * steps_per_epoch
    j_c = int(np.argmin(np.abs(np.log(lags / k_close))))
    j_p = int(np.argmin(np.abs(np.log(lags / k_persist))))
    close_pred = float(derived[0, j_c] / derived[0, 0])
    close_meas = float(sim[0, j_c] / sim[0, 0])
    checks.append(Check(f"high lr: gap closes within {config.close_epochs:g} epoch", close_pred,
                        close_meas, config.close_frac, close_meas < config.close_frac,
                        f"gap(k={lags[j_c]})/gap(k=1), derived vs simulated; pass if "
                        f"simulated < {config.close_frac}"))
    persist_pred = float(derived[1, j_p] / derived[1, 0])
    persist_meas = float(sim[1, j_p] / sim[1, 0])
    checks.append(Check(f"low lr: gap persists for {config.persist_epochs:g} epochs",
                        persist_pred, persist_meas, config.persist_frac,
                        persist_meas > config.persist_frac,
                        f"gap(k={lags[j_p]})/gap(k=1), derived vs simulated; pass if "
                        f"simulated > {config.persist_frac}"))
    k_fine = np.unique(np.round(np.geomspace(1, lags.max(), 200)).astype(np.int64))
    derived_fine = np.stack([memory.memory_gap(lam, lr, config.batch, k_fine,
                                               noise_var=config.noise_var) for lr in lr_arr])
    return {
        "eigenvalues": lam,
        "lr": lr_arr,
        "base_lr": lr_arr / config.batch,
        "lr_names": list(names),
        "batch": config.batch,
        "n_data": config.n_data,
        "steps_per_epoch": steps_per_epoch,
        "lags": lags,
        "gap_sim": sim,
        "gap_se": se,
        "gap_derived": derived,
        "lags_fine": k_fine,
        "gap_derived_fine": derived_fine,
        "fresh_loss": fresh,
        "fresh_loss_sim": fresh_sim,
        "close_lag": int(lags[j_c]),
        "persist_lag": int(lags[j_p]),
        "checks": checks,
    }


def plot(data: dict):
    """Left: gap relative to the unseen loss vs k (steps, epochs on top); right: Δ_k/Δ_1."""
    fig, axes = P.subplots(1, 2, panel_size=(4.6, 3.5),
                           title="Memory of seen batches: one-pass SGD, linear regression")
    spe = float(data["steps_per_epoch"])
    lags, fine = np.asarray(data["lags"]), np.asarray(data["lags_fine"])
    ax0, ax1 = axes
    for i, name in enumerate(data["lr_names"]):
        c = P.color(i)
        fresh = float(data["fresh_loss"][i])
        lab = (f"{name} lr: η={data['lr'][i]:.3g} (η̃={data['base_lr'][i]:.2g}, "
               f"B={int(data['batch'])})")
        P.theory(ax0, fine, 100 * data["gap_derived_fine"][i] / fresh, c=c, label=lab)
        P.simulated(ax0, lags, 100 * data["gap_sim"][i] / fresh,
                    100 * data["gap_se"][i] / fresh, c=c)
        d1 = float(data["gap_derived"][i][0])
        P.theory(ax1, fine / spe, data["gap_derived_fine"][i] / d1, c=c, label=f"{name} lr")
        P.simulated(ax1, lags / spe, data["gap_sim"][i] / d1, data["gap_se"][i] / abs(d1), c=c)
    ax0.set_xscale("log")
    ax0.axhline(0.0, color="0.3", lw=0.8)
    ax0.set_xlabel("k: steps since the batch was used")
    ax0.set_ylabel("seen-batch vs unseen loss (% difference)")
    top = ax0.secondary_xaxis("top", functions=(lambda k: k / spe, lambda ep: ep * spe))
    top.set_xlabel(f"epochs (N = {int(data['n_data'])} examples)", fontsize=8.5)
    P.legend(ax0, loc="lower right")
    ax1.set_xscale("log")
    ax1.axhline(0.0, color="0.3", lw=0.8)
    ax1.axvline(data["close_lag"] / spe, color="0.5", ls=":", lw=1.0)
    ax1.axvline(data["persist_lag"] / spe, color="0.5", ls="--", lw=1.0)
    ax1.set_xlabel("k in epochs")
    ax1.set_ylabel("gap relative to the latest batch, Δ_k / Δ_1")
    ax1.set_title("dotted: check 'closed'; dashed: check 'persists'", fontsize=8)
    P.legend(ax1, loc="lower left", bbox_to_anchor=(0.0, 0.06))
    P.check_note(fig, data["checks"])
    return fig
