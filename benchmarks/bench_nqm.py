"""Benchmark: exact NQM steps-to-target over a 100 × 20 grid of (lr, batch), d = 10,000.

NQM with h_i = 1/i (i = 1..10,000), c = h, E[θ_i(0)²] = 1, target = 0.01 × initial loss.
``nqm.steps_to_target`` (closed form + Newton on the crossing, vectorised over the grid) is
timed against the step-by-step moment recursion s ← (1 − ηh)² s + η²c/B of the same grid,
vectorised over configurations and dimensions: its cost per step is measured here over a
short run and multiplied by the steps it would need (the largest finite answer), and its
answers are checked exactly on the configurations that finish within a few thousand steps.

    python benchmarks/bench_nqm.py            # prints times and ratios measured in this run
"""

from __future__ import annotations

import time

import numpy as np

from sgdtheory import nqm, theory

D, N_LR, N_B = 10_000, 100, 20


def best_of(fn, repeat=3):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def recursion_steps(h, c, lrs, batches, target, n_steps):
    """Step-by-step recursion over the whole grid; first t with E[L_t] ≤ target (or inf)."""
    s = np.ones((lrs.size, h.size))
    q, noise = (1 - lrs[:, None] * h) ** 2, lrs[:, None] ** 2 * c / batches[:, None]
    half_h = 0.5 * h
    found = np.where(s @ half_h <= target, 0.0, np.inf)
    with np.errstate(over="ignore", invalid="ignore"):  # unstable rates overflow to inf
        for t in range(1, n_steps + 1):
            np.multiply(q, s, out=s)  # in place: no temporaries
            s += noise
            hit = np.isinf(found) & (s @ half_h <= target)
            found[hit] = t
    return found


def main():
    h = 1.0 / np.arange(1, D + 1)
    c = h.copy()
    target = 0.01 * 0.5 * h.sum()
    lrs = np.geomspace(1e-3, 1.99, N_LR)
    batches = 2.0 ** np.arange(N_B)
    lr_grid, b_grid = np.meshgrid(lrs, batches, indexing="ij")

    t_closed, steps = best_of(lambda: nqm.steps_to_target(
        h, c, lr_grid, b_grid, target, max_steps=10**9))
    finite = np.isfinite(steps)
    print(f"steps_to_target, {N_LR} lr x {N_B} batch x d={D}: {t_closed:.3f} s "
          f"({finite.sum()} configurations reach the target, the rest never or beyond 1e9)")

    # step-by-step recursion of the same grid: measured per step, times the steps it needs
    flat_lr, flat_b = lr_grid.ravel(), b_grid.ravel()
    probe = 20
    t0 = time.perf_counter()
    recursion_steps(h, c, flat_lr, flat_b, target, probe)
    per_step = (time.perf_counter() - t0) / probe
    need = steps[finite].max()
    t_rec = per_step * need
    print(f"step-by-step recursion of the grid: {per_step * 1e3:.1f} ms/step x {need:.0f} steps "
          f"= {t_rec:.0f} s (extrapolated from {probe} measured steps)")
    print(f"speed-up of steps_to_target over the recursion: {t_rec / t_closed:.0f}x")

    # exact agreement on configurations the recursion finishes quickly
    quick = np.flatnonzero(finite.ravel() & (steps.ravel() <= 6000))[::5][:10]
    t0 = time.perf_counter()
    ref = recursion_steps(h, c, flat_lr[quick], flat_b[quick], target, 6000)
    t_check = time.perf_counter() - t0
    same = np.array_equal(ref, steps.ravel()[quick])
    print(f"check: recursion answers == steps_to_target on {quick.size} configurations: {same} "
          f"({t_check:.1f} s of recursion)")

    # the critical-batch curve at the best learning rate per batch size
    best = steps.min(axis=0)
    ok = np.isfinite(best)
    s_min, e_min = theory.fit_steps_examples(best[ok], best[ok] * batches[ok])
    print("batch      :", " ".join(f"{b:>7.0f}" for b in batches[::3]))
    print("best steps :", " ".join(f"{s:>7.0f}" for s in best[::3]))
    print(f"fit S = S_min (1 + B_crit/B): S_min = {s_min:.0f}, E_min = {e_min:.3g}, "
          f"B_crit = {e_min / s_min:.1f}")
    if not same:
        raise SystemExit("mismatch between steps_to_target and the recursion")


if __name__ == "__main__":
    main()
