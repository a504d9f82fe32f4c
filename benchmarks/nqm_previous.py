"""The previous exact search of :func:`sgdtheory.nqm.steps_to_target` (until this benchmark's
version): the moment trajectory of each configuration scanned in blocks of steps by repeated
squaring, cost ∝ the answer. Kept here only to time it against the current one
(``benchmarks/bench_nqm.py`` part 5); it uses the library's moment maps.
"""

from __future__ import annotations

import numpy as np

from sgdtheory.nqm import (
    _CHUNK,
    _initial_state,
    _linear_system,
    _orbit,
    _Problem,
    _stationary_moments,
)


def power_bound(M) -> np.ndarray:
    """sup_{j≥0} ‖M^j‖_∞ per leading index, or inf if repeated squaring does not contract.

    Square until ‖M^{2^k}‖_∞ < 1; every j < 2^k is a product of distinct M^{2^i}, i < k, so
    sup_j ‖M^j‖ ≤ Π_{i<k} max(1, ‖M^{2^i}‖).
    """
    bound = np.ones(M.shape[0])
    P = M
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(64):
            norm = np.abs(P).sum(axis=-1).max(axis=-1)
            if np.all(norm < 1.0):
                return bound
            bound = bound * np.maximum(norm, 1.0)
            P = np.matmul(P, P)
    return np.full(M.shape[0], np.inf)


def scan(pr: _Problem, cfg, max_steps, out, where, has_v, has_ema, nesterov=False):
    """Exact first crossing by scanning the moment trajectory in blocks (stable configs only).

    Blocks grow geometrically from 32 steps. Early exit when the target lies below the
    stationary loss L*: for every later t, E[θ_i²] ≥ max(0, s_i* − sup_j‖M_i^j‖ ‖s_i − s_i*‖_∞)
    (see :func:`power_bound`); once ½Σ_i h_i of that exceeds the target it is never reached.
    """
    lr, batch, mu, beta, target = cfg
    k = 1 + has_v + has_ema
    d = pr.h.size
    s0 = _initial_state(pr, k, has_ema)
    k_max = int(min(1 << 16, max(32, _CHUNK // (d * k * k))))
    for ci, oi in enumerate(where):
        M, b, idx = _linear_system(pr, lr[ci], batch[ci], mu[ci], beta[ci], has_v, has_ema,
                                   nesterov)
        sstar = _stationary_moments(M, b)
        lstar = 0.5 * pr.h @ sstar[:, idx]
        amp = power_bound(M) if lstar > target[ci] else None
        s, t0, K = s0, 0, min(32, k_max)
        while t0 <= max_steps:
            if amp is not None:  # E[θ_i²] ≥ max(0, s_i* − sup_j‖M_i^j‖ ‖s_i − s_i*‖_∞) from now on
                floor_ = sstar[:, idx] - amp * np.abs(s - sstar).max(axis=1)
                if 0.5 * pr.h @ np.maximum(floor_, 0.0) > target[ci]:
                    break
            n = min(K + 1, max_steps - t0 + 1)
            traj = _orbit(M, b, s, n)
            loss = 0.5 * pr.h @ traj[..., idx]
            hit = np.flatnonzero(loss <= target[ci])
            if hit.size:
                out[oi] = t0 + hit[0]
                break
            if n < K + 1:
                break
            s, t0 = traj[:, K], t0 + K
            K = min(2 * K, k_max)
