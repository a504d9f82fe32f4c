"""nqm.steps_to_target with momentum, Nesterov, EMA and preconditioning: equal to the recursion.

Every answer is compared with the first t at which a step-by-step moment recursion, written out
here from the optimiser's update rule (not from the library), is at or below the target —
on hundreds of random small problems with several batch sizes and targets per call, including
oscillating losses that cross the target several times, (near-)double roots of the transfer
matrix, μ and β near 1, learning rates at the stability edge and unreachable targets.
"""

from __future__ import annotations

import numpy as np
import pytest

from sgdtheory import nqm

T = 3000  # steps of the reference recursion (and max_steps of the searches)


# --------------------------------------------------------------------------- reference recursions


def recursion(kind, h, c, x0, lr, mu, beta, batch, steps, p=0.0):
    """E[L_t], t = 0..steps, by iterating the second moments one step at a time.

    Arrays broadcast as (P, 1, d) for h, c, x0 and (P, 1, 1) for lr, mu, beta, (P, nB, 1) for
    batch; returns (P, nB, steps + 1). Preconditioning: h̃ = ph, c̃ = p²c, p = (h/h_max)^−p.
    Updates (g = h̃θ + ζ, Var ζ = c̃/B): SGD θ' = θ − ηg; heavy ball v' = μv + g,
    θ' = θ − ηv'; Nesterov v' = μv + g, θ' = θ − η(g + μv'); EMA θ̄' = βθ̄ + (1 − β)θ'.
    """
    scale = (h / h.max(axis=-1, keepdims=True)) ** (-p)
    hd, n = scale * h, scale**2 * c / batch
    shape = np.broadcast_shapes(hd.shape, n.shape, lr.shape)
    x = np.broadcast_to(x0, shape).astype(float)  # E[θ²]
    y = np.zeros(shape)  # E[θv] or E[θθ̄]
    z = np.zeros(shape)  # E[v²] or E[θ̄²]
    if kind == "ema":
        y, z = x.copy(), x.copy()
    out = np.empty(shape[:-1] + (steps + 1,))
    weight = 0.5 * h
    out[..., 0] = ((z if kind == "ema" else x) * weight).sum(-1)
    for t in range(steps):
        if kind == "sgd":
            x = (1 - lr * hd) ** 2 * x + lr**2 * n
        elif kind == "heavy":
            a = 1 - lr * hd
            x, y, z = (a * a * x - 2 * a * lr * mu * y + lr**2 * mu**2 * z + lr**2 * n,
                       a * hd * x + (a * mu - lr * mu * hd) * y - lr * mu**2 * z - lr * n,
                       hd * hd * x + 2 * hd * mu * y + mu**2 * z + n)
        elif kind == "nesterov":  # θ' = aθ + qv − η(1+μ)ζ, a = 1 − ηh̃(1+μ), q = −ημ²
            a, q, r = 1 - lr * hd * (1 + mu), -lr * mu**2, -lr * (1 + mu)
            x, y, z = (a * a * x + 2 * a * q * y + q * q * z + r * r * n,
                       a * hd * x + (a * mu + q * hd) * y + q * mu * z + r * n,
                       hd * hd * x + 2 * hd * mu * y + mu**2 * z + n)
        else:  # ema, on (E[θ²], E[θθ̄], E[θ̄²])
            a, nn = 1 - lr * hd, lr**2 * n
            x_new = a * a * x + nn
            y_new = (1 - beta) * x_new + beta * a * y
            z = (1 - beta) ** 2 * x_new + 2 * beta * (1 - beta) * a * y + beta**2 * z
            x, y = x_new, y_new
        out[..., t + 1] = ((z if kind == "ema" else x) * weight).sum(-1)
    return out


def first_hit(curve, target):
    hit = np.flatnonzero(curve <= target)
    return float(hit[0]) if hit.size else np.inf


def crossings(curve, target):
    """Number of times the curve passes from above the target to at or below it."""
    below = curve <= target
    return int(np.count_nonzero(below[1:] & ~below[:-1]))


def stability_limit(kind, mu):
    """ηh̃_max at which the deterministic map reaches an eigenvalue −1."""
    if kind == "heavy":
        return 2 * (1 + mu)
    if kind == "nesterov":
        return 2 * (1 + mu) / (1 + 2 * mu)
    return 2.0


# --------------------------------------------------------------------------- random problems


def random_problems(kind, n, rng, d=4):
    """n problems of d dimensions: curvatures, noise, init and a learning rate in one of
    several regimes — generic, at the stability edge, at a (near-)double root, small."""
    h = np.exp(rng.uniform(np.log(0.01), 0.0, (n, 1, d)))
    c = rng.uniform(0, 1, (n, 1, d)) * (rng.random((n, 1, d)) < 0.8)
    x0 = rng.uniform(0, 2, (n, 1, d)) * (rng.random((n, 1, d)) < 0.9)
    x0[..., 0] = np.maximum(x0[..., 0], 0.1)  # a loss above zero at t = 0
    mu = rng.choice([0.0, 0.3, 0.6, 0.9, 0.99, 0.999], (n, 1, 1))
    beta = rng.choice([0.0, 0.5, 0.9, 0.99, 0.9999], (n, 1, 1))
    if kind in ("sgd", "ema"):
        mu[:] = 0.0
    if kind != "ema":
        beta[:] = 0.0
    hmax = h.max(axis=-1, keepdims=True)
    limit = stability_limit(kind, mu) / hmax
    regime = rng.integers(0, 4, (n, 1, 1))
    lr = rng.uniform(0.02, 0.999, (n, 1, 1)) * limit
    edge = limit * (1 - 10.0 ** rng.uniform(-10, -3, (n, 1, 1)))
    j = rng.integers(0, d, n)
    hj = h[np.arange(n), 0, j][:, None, None]
    wiggle = rng.choice([0.0, 1e-13, -1e-13, 1e-8, -1e-6], (n, 1, 1))
    if kind == "heavy":  # critical damping: ηh = (1 − √μ)²
        double = (1 - np.sqrt(mu)) ** 2 / hj * (1 + wiggle)
    elif kind == "ema":  # 1 − ηh = β: the eigenvalues of θ and θ̄ coincide
        double = (1 - beta) / hj * (1 + wiggle)
    elif kind == "sgd":  # 1 − ηh = 0 for one dimension
        double = 1 / hj * (1 + wiggle)
    else:
        double = lr
    double = np.where((double > 0) & (double < limit), double, lr)
    small = limit * 10.0 ** rng.uniform(-3, -1, (n, 1, 1))
    lr = np.choose(regime, [lr, edge, double, small])
    batch = np.exp(rng.uniform(0, np.log(100), (n, 3, 1)))
    return h, c, x0, lr, mu, beta, batch


def pick_targets(curve, rng):
    """Targets for one loss curve: inside its range, below its minimum (unreachable within
    T), and between two successive local minima (several crossings) — none within 1e-9 of
    any value of the curve up to the answer (where rounding could decide)."""
    lo, l0 = curve.min(), curve[0]
    cand = list(rng.uniform(lo, l0, 2)) + [lo * (1 - 1e-6)]
    inner = np.flatnonzero((curve[1:-1] < curve[:-2]) & (curve[1:-1] <= curve[2:])) + 1
    if inner.size >= 2:
        k = rng.integers(0, inner.size - 1)
        cand.append(0.5 * (curve[inner[k]] + curve[inner[k + 1]]))
    out = []
    for tgt in cand:
        if not 0 < tgt < l0:
            continue
        stop = int(min(first_hit(curve, tgt), len(curve) - 1))
        if np.min(np.abs(curve[:stop + 1] - tgt)) > 1e-9 * tgt:
            out.append(tgt)
    return out


@pytest.mark.parametrize(("p", "stepped"), [(0.0, False), (0.5, False), (0.0, True)])
@pytest.mark.parametrize("kind", ["sgd", "heavy", "nesterov", "ema"])
def test_steps_to_target_equals_recursion_on_random_problems(kind, p, stepped, monkeypatch):
    """``stepped``: without the sweeps (as where a mode grows), stepping the exact recursion
    from the closed-form state instead."""
    if stepped:
        monkeypatch.setattr(nqm, "_sweep", lambda modes: None)
    rng = np.random.default_rng(["sgd", "heavy", "nesterov", "ema"].index(kind) + int(10 * p))
    n = 60
    h, c, x0, lr, mu, beta, batch = random_problems(kind, n, rng)
    if kind == "sgd":  # some dimensions below stationarity: non-monotone SGD losses
        x0 = x0 * (rng.random(x0.shape) < 0.5)
        c = c * 50.0
        x0[..., 0] = np.maximum(x0[..., 0], 0.1)
    curves = recursion(kind, h, c, x0, lr, mu, beta, batch, T, p)
    kwargs = {"momentum": 0.0, "nesterov": kind == "nesterov", "precond_power": p}
    n_checked = n_multi = n_inf = 0
    for i in range(n):
        targets, batches, want = [], [], []
        for b in range(batch.shape[1]):
            for tgt in pick_targets(curves[i, b], rng):
                targets.append(tgt)
                batches.append(batch[i, b, 0])
                want.append(first_hit(curves[i, b], tgt))
                n_multi += crossings(curves[i, b], tgt) >= 2
                n_inf += np.isinf(want[-1])
        if kind in ("heavy", "nesterov"):
            kwargs["momentum"] = float(mu[i, 0, 0])
        if kind == "ema":
            kwargs["ema_decay"] = float(beta[i, 0, 0])
        got = nqm.steps_to_target(h[i, 0], c[i, 0], float(lr[i, 0, 0]), np.array(batches),
                                  np.array(targets), init_sq=x0[i, 0], max_steps=T, **kwargs)
        np.testing.assert_array_equal(got, want, err_msg=f"problem {i}: lr {lr[i, 0, 0]!r}, "
                                      f"mu {mu[i, 0, 0]}, beta {beta[i, 0, 0]}")
        n_checked += len(want)
    assert n_checked >= 200 and n_inf >= 20
    if kind != "sgd":  # the oscillating cases are there
        assert n_multi >= 10


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize(("kind", "mu", "beta"), [
    ("heavy", 0.9999, 0.0), ("nesterov", 0.9999, 0.0), ("ema", 0.0, 0.99999),
    ("heavy", 0.0, 0.0), ("nesterov", 0.5, 0.0), ("ema", 0.0, 0.0)])
def test_momentum_and_beta_near_one_and_zero(kind, mu, beta):
    h = np.array([1.0, 0.2, 0.03])[None, None]
    c = np.array([0.5, 0.2, 0.1])[None, None]
    lr = np.array(0.7 * stability_limit(kind, mu))[None, None, None]
    batch = np.array([1.0, 30.0])[None, :, None]
    steps = 12000
    curves = recursion(kind, h, c, 1.0, lr, mu, beta, batch, steps)
    kw = {"momentum": mu, "nesterov": kind == "nesterov",
          "ema_decay": beta if kind == "ema" else None}
    for b in range(2):
        cv = curves[0, b]
        targets = np.array(pick_targets(cv, np.random.default_rng(b)) + [
            t for t in np.quantile(cv, [0.0, 0.01, 0.3]) * (1 + 1e-7)
            if np.min(np.abs(cv - t)) > 1e-9 * t])
        want = [first_hit(cv, t) for t in targets]
        got = nqm.steps_to_target(h[0, 0], c[0, 0], lr[0, 0, 0], batch[0, b, 0], targets,
                                  max_steps=steps, **kw)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["heavy", "nesterov", "ema", "sgd"])
def test_stability_edge(kind):
    """Just below the limit the top dimension barely decays (or barely stops oscillating);
    at the limit the run diverges: inf."""
    mu = 0.8 if kind in ("heavy", "nesterov") else 0.0
    h, c = np.array([[[1.0, 0.1]]]), np.array([[[0.0, 0.3]]])
    limit = stability_limit(kind, mu)
    kw = {"momentum": mu, "nesterov": kind == "nesterov",
          "ema_decay": 0.9 if kind == "ema" else None}
    for lr in [limit * (1 - 1e-9), limit * (1 - 1e-4)]:
        cv = recursion(kind, h, c, 1.0, np.array([[[lr]]]), mu, 0.9, np.array([[[4.0]]]), T)
        targets = np.array([cv[0, 0, -1] * 1.001, 0.6 * cv[0, 0, 0], cv[0, 0].min() * 0.99])
        got = nqm.steps_to_target(h[0, 0], c[0, 0], lr, 4.0, targets, max_steps=T, **kw)
        np.testing.assert_array_equal(got, [first_hit(cv[0, 0], t) for t in targets])
    assert nqm.steps_to_target(h[0, 0], c[0, 0], limit, 4.0, 1e-3, **kw) == np.inf


def test_unreachable_targets_are_inf_without_stepping():
    """A target below the stationary loss is never reached: inf, decided by bounds (no
    scan through 10⁹ steps)."""
    h = 1.0 / np.arange(1, 101)
    for kw in [{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}, {"ema_decay": 0.99}]:
        lstar = nqm.stationary_loss(h, h, 0.5, 8, **{k: v for k, v in kw.items()})
        got = nqm.steps_to_target(h, h, 0.5, 8, [0.5 * lstar, 0.999 * lstar],
                                  max_steps=10**9, **kw)
        assert np.all(got == np.inf), kw


def test_large_problem_needs_no_long_scan(monkeypatch):
    """d = 10⁴ with an answer of ~10⁶ steps: exact, and fewer than 1000 steps stepped or
    swept."""
    h = 1.0 / np.arange(1, 10_001)
    stepped = []
    block, sweep = nqm._block_devs, nqm._sweep_devs

    def counting(sy, modes, t_s, n):
        stepped.append(n)
        return block(sy, modes, t_s, n)

    def counting_sweep(sw, t_s, n, mix=None):
        stepped.append(n)
        return sweep(sw, t_s, n, mix)

    monkeypatch.setattr(nqm, "_block_devs", counting)
    monkeypatch.setattr(nqm, "_sweep_devs", counting_sweep)
    got = nqm.steps_to_target(h, h, 0.00657933, 4.0, 0.01, momentum=0.5)
    assert sum(stepped) < 1000
    assert 1e6 < got < 2e6
    # the loss at got and got − 1 by 3×3 matrix powers of the moment map (repeated squaring)
    lr, mu, n = 0.00657933, 0.5, h / 4.0
    a = 1 - lr * h
    m = np.stack([np.stack([a * a, -2 * a * lr * mu, np.full_like(h, lr**2 * mu**2)], -1),
                  np.stack([a * h, a * mu - lr * mu * h, np.full_like(h, -lr * mu**2)], -1),
                  np.stack([h * h, 2 * h * mu, np.full_like(h, mu**2)], -1)], -2)
    b = n[:, None] * np.array([lr**2, -lr, 1.0])
    s_star = np.linalg.solve(np.eye(3) - m, b[..., None])[..., 0]
    dev = np.array([1.0, 0.0, 0.0]) - s_star
    loss = [0.5 * h @ (np.einsum("dij,dj->di", np.linalg.matrix_power(m, int(t)), dev)
                       + s_star)[:, 0] for t in (got - 1, got)]
    assert loss[1] <= 0.01 < loss[0]


def test_oscillating_momentum_at_paper_scale_equals_recursion():
    """d = 10⁴, h = c = 1/i, μ = 0.999: the loss oscillates around the target for thousands
    of steps before the first crossing (found by sweeps); equal to the recursion."""
    h = 1.0 / np.arange(1, 10_001)[None, None]
    n_cross = []
    for kind, lr, batch, p in [("heavy", 0.031, 32768.0, 0.0), ("heavy", 0.00208, 65536.0, 0.5),
                               ("nesterov", 0.0132, 262144.0, 0.5)]:
        cv = recursion(kind, h, h, 1.0, np.array([[[lr]]]), 0.999, 0.0,
                       np.array([[[batch]]]), 7000, p)[0, 0]
        want = first_hit(cv, 0.01)
        slope = np.diff(cv[:int(want) + 1])
        assert 3000 < want < 7000 and np.count_nonzero((slope[:-1] < 0) & (slope[1:] >= 0)) >= 5
        n_cross.append(crossings(cv, 0.01))
        got = nqm.steps_to_target(h[0, 0], h[0, 0], lr, batch, 0.01, momentum=0.999,
                                  nesterov=kind == "nesterov", precond_power=p)
        assert got == want, (kind, lr, batch, p)
    assert max(n_cross) >= 3  # crossing the target several times within 7000 steps


def sweep_cases(rng, n):
    """Pair systems of small random problems, with (near-)double roots, β = 0 (roots 0),
    negative root ratios and decays down to underflow."""
    for i in range(n):
        d = 12
        h, c = np.exp(rng.uniform(-6, 0, d)), np.exp(rng.uniform(-6, 0, d))
        kind = ["heavy", "nesterov", "ema", "sgd"][i % 4]
        mu = float(1 - 10 ** rng.uniform(-5, 0)) if kind in ("heavy", "nesterov") else 0.0
        beta = float(rng.choice([0.0, 1 - 10 ** rng.uniform(-5, 0)])) if kind == "ema" else 0.0
        lr = float(10 ** rng.uniform(-4, 0.3))
        if i % 3 == 0 and kind in ("heavy", "ema"):  # (near-)double roots in some dimensions
            hc = (1 - np.sqrt(mu)) ** 2 / lr if kind == "heavy" else (1 - beta) / lr
            h[:6] = hc * (1 + np.array([0.0, 1e-12, -1e-9, 1e-6, -1e-4, 1e-2]))
        pr = nqm._problem(h, c, rng.uniform(0, 2, d), float(rng.choice([0.0, 0.5])))
        if nqm._unstable(pr, lr, mu, kind == "nesterov"):
            continue
        sy = nqm._pair_system(pr, lr, mu, beta, kind)
        yield nqm._pair_modes(sy), int(rng.integers(1, 30000)), int(rng.integers(1, 3000))


@pytest.mark.parametrize("chunk", [None, 700])
def test_sweep_values_within_their_error_bounds(chunk, monkeypatch):
    """Every swept value is within its stated bound of the closed form, and the bound is
    tight enough to decide: ≤ 1e-8 of the largest value in its window (or near underflow).
    ``chunk``: a small working-array budget, so that stretches go in pieces of windows."""
    rng = np.random.default_rng(7)
    n_cases = 0
    for modes, t_s, n in sweep_cases(rng, 400):
        sw = nqm._sweep(modes)
        if chunk:
            monkeypatch.setattr(nqm, "_CHUNK", chunk)
        inv_b = 10.0 ** rng.uniform(-3, 0)  # and one member's loss: dev0 − dev1/B
        mix = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, -inv_b]])
        got, bounds = nqm._sweep_devs(sw, t_s, n, mix)
        monkeypatch.undo()
        t = (t_s + np.arange(n, dtype=float))[:, None]
        devs = [sum(nqm._mode_devs(m, t)[k] for m in modes) for k in (0, 1)]
        for r, ref in enumerate(devs + [devs[0] - inv_b * devs[1]]):
            assert np.all(np.abs(got[r] - ref) <= bounds[r])
            scale = np.abs(ref) if r < 2 else np.abs(devs[0]) + inv_b * np.abs(devs[1])
            starts = np.arange(0, n, sw.w)
            top = np.repeat(np.maximum.reduceat(scale, starts), sw.w)[:n]
            assert np.all(bounds[r] <= 1e-8 * top + 1e-280)
        n_cases += 1
    assert n_cases >= 250


# --------------------------------------------------------------------------- figure settings


@pytest.mark.parametrize("name", ["nqm_optimizers", "steps_vs_examples"])
def test_figure_step_counts_are_reproduced(name):
    """The committed figures' step counts and best rates (default preset) come out the same."""
    from pathlib import Path

    from sgdtheory.experiments import load

    module = load(name)
    data = module.compute(module.PRESETS["default"], None, 0)
    ref = np.load(Path(__file__).resolve().parents[1] / "figures" / f"{name}.npz")
    np.testing.assert_array_equal(data["steps"], ref["steps"])
    np.testing.assert_array_equal(data["best_lr"], ref["best_lr"])


def test_nqm_optimizers_paper_preset_uses_every_rate_of_the_authors_grid():
    """The paper preset: d = 10⁴, B = 2² … 2²⁰ exactly, loss target 0.01, the authors' 100
    rates; its best steps are the minima over those rates of single exact answers."""
    from sgdtheory.experiments import nqm_optimizers as exp

    config = exp.PRESETS["paper"]
    data = exp.compute(config, None, 0)
    np.testing.assert_array_equal(data["batch"], 2.0 ** np.arange(2, 21))
    assert data["steps"].shape == (3, 19) and np.all(np.isfinite(data["steps"]))
    h = 1.0 / np.arange(1, 10_001)
    kws = ({}, {"momentum": config.momentum}, {"precond_power": config.precond_power})
    for j in (0, 9, 18):
        for k, kw in enumerate(kws):
            per_lr = nqm.steps_to_target(h, h, exp.PAPER_LRS, data["batch"][j], 0.01, **kw)
            assert data["steps"][k, j] == per_lr.min()
            assert data["best_lr"][k, j] == exp.PAPER_LRS[np.argmin(per_lr)]
    assert all(c.passed for c in data["checks"])


def recursion_momentum_ema(h, c, x0, lr, mu, beta, batch, steps, nesterov):
    """E[½Σh θ̄_t²] for heavy ball / Nesterov with an EMA θ̄' = βθ̄ + (1−β)θ', θ̄₀ = θ₀, from
    the update rule written as z' = Az + gζ on z = (θ, v, θ̄): S ← A S Aᵀ + (c/B) g gᵀ."""
    d = h.size
    A = np.zeros((d, 3, 3))
    if nesterov:  # θ' = θ − η(g + μv'), v' = μv + g
        A[:, 0] = np.stack([1 - lr * h * (1 + mu), np.full(d, -lr * mu * mu), np.zeros(d)], 1)
        gain = np.array([-lr * (1 + mu), 1.0, 0.0])
    else:  # θ' = θ − ηv'
        A[:, 0] = np.stack([1 - lr * h, np.full(d, -lr * mu), np.zeros(d)], 1)
        gain = np.array([-lr, 1.0, 0.0])
    A[:, 1] = np.stack([h, np.full(d, mu), np.zeros(d)], 1)
    A[:, 2] = (1 - beta) * A[:, 0]
    A[:, 2, 2] = beta
    gain[2] = (1 - beta) * gain[0]
    s = np.zeros((len(batch), d, 3, 3))
    s[:, :, 0, 0] = s[:, :, 0, 2] = s[:, :, 2, 0] = s[:, :, 2, 2] = x0
    noise = (c / np.asarray(batch)[:, None])[..., None, None] * np.outer(gain, gain)
    out = [0.5 * s[..., 2, 2] @ h]
    for _ in range(steps):
        s = np.einsum("dij,bdjk,dlk->bdil", A, s, A) + noise
        out.append(0.5 * s[..., 2, 2] @ h)
    return np.array(out).T  # (batch, steps + 1)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_with_ema_equals_recursion(nesterov):
    rng = np.random.default_rng(5 + nesterov)
    checked = 0
    for _ in range(25):
        h = np.exp(rng.uniform(np.log(0.01), 0, 3))
        c = rng.uniform(0, 1, 3)
        x0 = rng.uniform(0.1, 2, 3)
        mu, beta = rng.choice([0.3, 0.9, 0.99]), rng.choice([0.0, 0.5, 0.9, 0.99])
        lr = rng.uniform(0.05, 0.95) * stability_limit("nesterov" if nesterov else "heavy",
                                                       mu) / h.max()
        batch = np.exp(rng.uniform(0, np.log(100), 3))
        curves = recursion_momentum_ema(h, c, x0, lr, mu, beta, batch, 2000, nesterov)
        targets, batches, want = [], [], []
        for b, cv in zip(batch, curves, strict=True):
            for tgt in pick_targets(cv, rng):
                targets.append(tgt)
                batches.append(b)
                want.append(first_hit(cv, tgt))
        got = nqm.steps_to_target(h, c, lr, np.array(batches), np.array(targets), init_sq=x0,
                                  momentum=mu, ema_decay=beta, nesterov=nesterov,
                                  max_steps=2000)
        np.testing.assert_array_equal(got, want)
        checked += len(want)
    assert checked >= 150
