"""sgdtheory.nqm against brute force: explicit moment recursions, Monte Carlo SGD, torch."""

import warnings

import numpy as np
import pytest

from sgdtheory import nqm, theory

H = np.array([1.0, 0.3, 0.05])
C = np.array([1.0, 0.6, 0.02])


# --------------------------------------------------------------------------- brute-force references


def recursion_sgd(h, c, lrs, batches, x0, p=0.0):
    """s ← (1 − ηh̃)² s + η² c̃/B step by step (schedules allowed), loss ½Σ h s."""
    scale = (h / h.max()) ** (-p)
    hd, cd = scale * h, scale**2 * c
    s = np.broadcast_to(np.asarray(x0, float), h.shape).copy()
    out = [0.5 * h @ s]
    with np.errstate(over="ignore"):  # a diverging reference reaches inf
        for lr, b in zip(lrs, batches, strict=True):
            s = (1 - lr * hd) ** 2 * s + lr**2 * cd / b
            out.append(0.5 * h @ s)
    return np.array(out)


def momentum_matrix(h, lr, mu):
    """The 3×3 map of (E[θ²], E[θv], E[v²]) for v ← μv + g, θ ← θ − ηv, written out by hand."""
    a = 1 - lr * h
    return np.array([[a * a, -2 * a * lr * mu, lr**2 * mu**2],
                     [a * h, a * mu - lr * mu * h, -lr * mu**2],
                     [h * h, 2 * h * mu, mu**2]])


def recursion_momentum(h, c, lrs, batches, mu, x0):
    """The same 3×3 map, vectorised over dimensions, one step at a time."""
    x = np.broadcast_to(np.asarray(x0, float), h.shape).copy()
    y, z = np.zeros_like(x), np.zeros_like(x)
    out = [0.5 * h @ x]
    for lr, b in zip(lrs, batches, strict=True):
        a, n = 1 - lr * h, c / b
        x, y, z = (a * a * x - 2 * a * lr * mu * y + lr**2 * mu**2 * z + lr**2 * n,
                   a * h * x + (a * mu - lr * mu * h) * y - lr * mu**2 * z - lr * n,
                   h * h * x + 2 * h * mu * y + mu**2 * z + n)
        out.append(0.5 * h @ x)
    return np.array(out)


def test_vectorised_momentum_reference_is_the_3x3_map():
    s = [np.array([1.0, 0.0, 0.0]) for _ in H]
    for _ in range(5):
        s = [momentum_matrix(h_i, 0.4, 0.7) @ s_i + c_i / 2 * np.array([0.16, -0.4, 1.0])
             for h_i, c_i, s_i in zip(H, C, s, strict=True)]
    ref = recursion_momentum(H, C, [0.4] * 5, [2] * 5, 0.7, 1.0)[-1]
    want = sum(0.5 * h_i * s_i[0] for h_i, s_i in zip(H, s, strict=True))
    assert ref == pytest.approx(want, rel=1e-14)


def recursion_ema(h, c, lr, b, beta, x0, steps):
    """(E[θ²], E[θθ̄], E[θ̄²]) for SGD with θ̄' = βθ̄ + (1−β)θ', θ̄₀ = θ₀; loss at θ̄."""
    x = np.broadcast_to(np.asarray(x0, float), h.shape).copy()
    p, r = x.copy(), x.copy()
    out = [0.5 * h @ r]
    for _ in range(steps):
        a, n = 1 - lr * h, lr**2 * c / b
        x, p, r = (a * a * x + n,
                   (1 - beta) * (a * a * x + n) + beta * a * p,
                   (1 - beta) ** 2 * (a * a * x + n) + 2 * beta * (1 - beta) * a * p
                   + beta**2 * r)
        out.append(0.5 * h @ r)
    return np.array(out)


def first_hit(curve, target):
    hit = np.flatnonzero(curve <= target)
    return float(hit[0]) if hit.size else np.inf


# ------------------------------------------------------------------- closed form = recursion


@pytest.mark.parametrize("lr", [0.05, 1.0, 1.5, 1.99, 2.2])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_sgd_closed_form_equals_recursion(lr, p):
    x0 = np.array([2.0, 0.0, 0.5])
    got = nqm.expected_loss(H, C, lr, 3, 300, init_sq=x0, precond_power=p)
    ref = recursion_sgd(H, C, [lr] * 300, [3] * 300, x0, p)
    np.testing.assert_allclose(got, ref, rtol=1e-12)


@pytest.mark.parametrize("mu", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("lr", [0.1, 1.0, 2.5])
def test_momentum_closed_form_equals_recursion(mu, lr):
    got = nqm.expected_loss(H, C, lr, 2, 200, momentum=mu, init_sq=1.5)
    ref = recursion_momentum(H, C, [lr] * 200, [2] * 200, mu, 1.5)
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_momentum_at_critical_damping_equals_recursion():
    # ηh = (1 − √μ)²: the 2×2 dynamics has a double eigenvalue (not diagonalisable)
    mu = 0.64
    lr = (1 - np.sqrt(mu)) ** 2 / H[0]
    got = nqm.expected_loss(H, C, lr, 4, 150, momentum=mu)
    np.testing.assert_allclose(got, recursion_momentum(H, C, [lr] * 150, [4] * 150, mu, 1.0),
                               rtol=1e-12)


def test_ema_closed_form_and_schedule_equal_recursion():
    got = nqm.expected_loss(H, C, 0.8, 2, 120, ema_decay=0.9, init_sq=0.7)
    ref = recursion_ema(H, C, 0.8, 2, 0.9, 0.7, 120)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    sched = nqm.expected_loss(H, C, np.full(120, 0.8), 2, ema_decay=0.9, init_sq=0.7)
    np.testing.assert_allclose(sched, ref, rtol=1e-12)


def test_schedules_equal_recursion():
    rng = np.random.default_rng(0)
    lrs = rng.uniform(0.0, 1.8, 80)
    batches = rng.integers(1, 9, 80)
    got = nqm.expected_loss(H, C, lrs, batches, init_sq=[1.0, 2.0, 3.0], precond_power=0.3)
    np.testing.assert_allclose(got, recursion_sgd(H, C, lrs, batches, [1.0, 2.0, 3.0], 0.3),
                               rtol=1e-12)
    got_m = nqm.expected_loss(H, C, lrs, batches, momentum=0.7)
    np.testing.assert_allclose(got_m, recursion_momentum(H, C, lrs, batches, 0.7, 1.0),
                               rtol=1e-12)
    # a grid of schedules: leading axes are configurations, the last one is time
    grid = nqm.expected_loss(H, C, np.stack([lrs, lrs[::-1]]), batches)
    np.testing.assert_allclose(grid[1], recursion_sgd(H, C, lrs[::-1], batches, 1.0),
                               rtol=1e-12)


def test_broadcasting_over_configurations():
    lrs, batches = np.array([[0.1], [0.7], [1.4]]), np.array([1, 4, 16, 64])
    got = nqm.expected_loss(H, C, lrs, batches, 25, momentum=0.3)
    assert got.shape == (3, 4, 26)
    for i, lr in enumerate(lrs[:, 0]):
        for j, b in enumerate(batches):
            np.testing.assert_allclose(got[i, j],
                                       recursion_momentum(H, C, [lr] * 25, [b] * 25, 0.3, 1.0),
                                       rtol=1e-12)


def test_divergence_is_inf_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = nqm.expected_loss(H, C, 3.0, 1, 2000)
        out_m = nqm.expected_loss(H, C, 5.0, 1, 2000, momentum=0.5)
        out_s = nqm.expected_loss(H, C, np.full(2000, 3.0), 1)
        out_l = nqm.linreg_expected_loss(H, 3.0, 1, 2000)
    assert out[-1] == out_m[-1] == out_s[-1] == out_l[-1] == np.inf
    assert not np.any(np.isnan(np.concatenate([out, out_m, out_s, out_l])))
    assert np.all(np.diff(out[np.isfinite(out)]) > 0)


# --------------------------------------------------------------------------- stationary loss


@pytest.mark.parametrize("mu", [0.0, 0.5, 0.9])
def test_stationary_loss_solves_the_moment_system(mu):
    lr, b = 0.7, 3.0
    ref = 0.0
    for i in range(H.size):
        s = np.linalg.solve(np.eye(3) - momentum_matrix(H[i], lr, mu),
                            C[i] / b * np.array([lr**2, -lr, 1.0]))
        ref += 0.5 * H[i] * s[0]
    assert nqm.stationary_loss(H, C, lr, b, momentum=mu) == pytest.approx(ref, rel=1e-12)
    long_run = nqm.expected_loss(H, C, lr, b, 20000, momentum=mu)[-1]
    assert long_run == pytest.approx(ref, rel=1e-10)


def test_stationary_loss_ema_and_unstable():
    long_run = recursion_ema(H, C, 0.8, 2, 0.9, 1.0, 4000)[-1]
    assert nqm.stationary_loss(H, C, 0.8, 2, ema_decay=0.9) == pytest.approx(long_run, rel=1e-10)
    got = nqm.stationary_loss(H, C, np.array([1.9, 2.0, 2.9, 3.0]), 1, momentum=[0, 0, 0.5, 0.5])
    assert np.isfinite(got[0]) and got[1] == np.inf and np.isfinite(got[2]) and got[3] == np.inf


# --------------------------------------------------------------------------- Monte Carlo


def _monte_carlo(h, c, lr, batch, steps, mu=0.0, p=0.0, beta=None, n_rep=20000, seed=0):
    """Brute-force SGD on the NQM: every example's noise drawn, the minibatch averaged.

    Per-example noise is a scaled Rademacher sign (non-Gaussian: only its variance c_i
    matters to the theory).
    """
    rng = np.random.default_rng(seed)
    scale = (h / h.max()) ** (-p)
    theta = rng.standard_normal((n_rep, h.size))  # E[θ²] = 1
    ema = theta.copy()
    v = np.zeros_like(theta)
    losses = [0.5 * (theta**2) @ h]
    for _ in range(steps):
        examples = rng.choice([-1.0, 1.0], size=(n_rep, batch, h.size)) * np.sqrt(c)
        g = h * theta + examples.mean(axis=1)
        v = mu * v + scale * g
        theta = theta - lr * v
        ema = ema if beta is None else beta * ema + (1 - beta) * theta
        losses.append(0.5 * ((theta if beta is None else ema) ** 2) @ h)
    losses = np.array(losses)  # (steps+1, n_rep)
    return losses.mean(axis=1), losses.std(axis=1, ddof=1) / np.sqrt(n_rep)


@pytest.mark.parametrize(("mu", "p", "beta"), [(0.0, 0.0, None), (0.8, 0.0, None),
                                               (0.0, 0.5, None), (0.5, 0.0, 0.8)])
def test_expected_loss_matches_monte_carlo(mu, p, beta):
    lr, batch, steps = 0.6, 4, 30
    mean, se = _monte_carlo(H, C, lr, batch, steps, mu=mu, p=p, beta=beta)
    exact = nqm.expected_loss(H, C, lr, batch, steps, momentum=mu, precond_power=p,
                              ema_decay=beta)
    recorded = np.arange(0, steps + 1, 3)
    assert np.all(np.abs(mean - exact)[recorded] <= 3 * se[recorded])


def test_linreg_recursion_equals_dense_moment_matrix():
    lam, sigma2 = np.array([2.0, 1.0, 0.25, 0.01]), 0.3
    m0 = np.array([1.0, 0.5, 2.0, 1.0])
    for lr, b in [(0.1, 1), (0.5, 4), (0.9, 32)]:
        A = theory.linreg_moment_matrix(lam, lr, b)
        m, ref = m0.copy(), [0.5 * (lam @ m0 + sigma2)]
        for _ in range(100):
            m = A @ m + lr**2 / b * sigma2 * lam
            ref.append(0.5 * (lam @ m + sigma2))
        got = nqm.linreg_expected_loss(lam, lr, b, 100, noise_var=sigma2, init_m=m0)
        np.testing.assert_allclose(got, ref, rtol=1e-12)
    traj = nqm.linreg_moments(lam, [0.1, 0.5], [[1], [4]], 10, init_m=m0)
    assert traj.shape == (2, 2, 11, 4)
    np.testing.assert_allclose(0.5 * traj @ lam, nqm.linreg_expected_loss(
        lam, [0.1, 0.5], [[1], [4]], 10, init_m=m0), rtol=1e-14)
    sched = nqm.linreg_expected_loss(lam, np.full(100, 0.5), 4, noise_var=sigma2, init_m=m0)
    np.testing.assert_allclose(
        sched, nqm.linreg_expected_loss(lam, 0.5, 4, 100, noise_var=sigma2, init_m=m0),
        rtol=1e-14)


def test_linreg_matches_monte_carlo():
    rng = np.random.default_rng(1)
    lam, sigma2, w_star = np.array([1.0, 0.4, 0.1]), 0.2, np.array([1.0, -1.0, 2.0])
    lr, batch, steps, n_rep = 0.5, 3, 25, 20000
    w = np.zeros((n_rep, lam.size))
    losses = []
    for t in range(steps + 1):
        e = w - w_star
        losses.append(0.5 * ((e**2) @ lam + sigma2))  # population loss of w
        if t == steps:
            break
        x = rng.standard_normal((n_rep, batch, lam.size)) * np.sqrt(lam)
        y = x @ w_star + np.sqrt(sigma2) * rng.standard_normal((n_rep, batch))
        resid = np.einsum("rbd,rd->rb", x, w) - y
        w = w - lr * np.einsum("rb,rbd->rd", resid, x) / batch  # mean minibatch gradient
    losses = np.array(losses)
    mean, se = losses.mean(axis=1), losses.std(axis=1, ddof=1) / np.sqrt(n_rep)
    exact = nqm.linreg_expected_loss(lam, lr, batch, steps, noise_var=sigma2, init_m=w_star**2)
    assert np.all(np.abs(mean - exact)[1:] <= 3 * se[1:])
    assert exact[0] == pytest.approx(0.5 * (lam @ w_star**2 + sigma2), rel=1e-15)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_convention_matches_torch_sgd(nesterov):
    torch = pytest.importorskip("torch")
    h = torch.tensor([1.0, 0.3, 0.05], dtype=torch.float64)
    theta = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.7, momentum=0.6, nesterov=nesterov)
    losses = []
    for _ in range(40):
        loss = 0.5 * (h * theta**2).sum()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    losses.append(0.5 * (h * theta.detach() ** 2).sum().item())
    got = nqm.expected_loss(h.numpy(), 0.0, 0.7, 1, 40, momentum=0.6, init_sq=[1.0, 4.0, 9.0],
                            nesterov=nesterov)
    np.testing.assert_allclose(got, losses, rtol=1e-12)


# --------------------------------------------------------------------------- steps to target


def test_steps_to_target_sgd_matches_scan_of_recursion():
    h = 1.0 / np.arange(1, 31)
    lrs, batches = np.array([0.05, 0.3, 1.0, 1.7, 1.99, 2.1]), np.array([1, 3, 10, 100])
    target = 0.1 * 0.5 * h.sum()
    got = nqm.steps_to_target(h, h, lrs[:, None], batches, target, max_steps=1000)
    for i, lr in enumerate(lrs):
        for j, b in enumerate(batches):
            curve = recursion_sgd(h, h, [lr] * 1000, [b] * 1000, 1.0)
            want = first_hit(curve, target) if lr * h.max() < 2 else np.inf
            assert got[i, j] == want, (lr, b)
    assert np.isfinite(got).sum() >= 9 and np.isinf(got).sum() >= 8


def test_steps_to_target_non_monotone_sgd():
    # some dimensions start below stationarity: the loss is not monotone in t
    h, c = np.array([1.0, 0.2, 0.01]), np.array([4.0, 0.1, 0.001])
    x0 = np.array([0.0, 5.0, 50.0])
    lrs = np.geomspace(0.05, 1.9, 12)
    curves = [recursion_sgd(h, c, [lr] * 3000, [2] * 3000, x0) for lr in lrs]
    assert any(np.any(np.diff(cv) > 0) and np.any(np.diff(cv) < 0) for cv in curves)
    for target in [0.05, 0.2, 0.6, 2.0]:
        got = nqm.steps_to_target(h, c, lrs, 2, target, init_sq=x0, max_steps=3000)
        want = [first_hit(cv, target) for cv in curves]
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("mu", "beta"), [(0.9, None), (0.5, None), (0.0, 0.9), (0.7, 0.5)])
def test_steps_to_target_momentum_and_ema_match_scan(mu, beta):
    h = 1.0 / np.arange(1, 9)
    target = 0.05 * 0.5 * h.sum()
    lrs = np.array([0.05, 0.4, 1.2, 2.9])
    got = nqm.steps_to_target(h, h, lrs, 8, target, momentum=mu, ema_decay=beta, max_steps=1500)
    for lr, g in zip(lrs, got, strict=True):
        if lr * h.max() >= 2 * (1 + mu):
            assert g == np.inf
            continue
        if beta is None:
            curve = recursion_momentum(h, h, [lr] * 1500, [8] * 1500, mu, 1.0)
        else:
            curve = nqm.expected_loss(h, h, lr, 8, 1500, momentum=mu, ema_decay=beta)
        assert g == first_hit(curve, target), lr


def test_steps_to_target_edge_cases():
    h = np.array([1.0, 0.1])
    # already below target, stationary loss above target, beyond max_steps, unstable
    assert nqm.steps_to_target(h, h, 0.5, 1, 10.0) == 0.0
    assert nqm.steps_to_target(h, h, 1.5, 1, 1e-3) == np.inf
    assert nqm.steps_to_target(h, h, 1e-3, 1e6, 1e-3, max_steps=100) == np.inf
    assert nqm.steps_to_target(h, h, 2.0, 1e6, 1e-3) == np.inf
    # dimensions that never move are dropped: c = 0 and θ₀ = 0
    assert nqm.steps_to_target(h, [0.0, 0.0], 0.5, 1, 1e-3, init_sq=[1.0, 0.0]) == 5.0


def test_optimal_steps_curve_is_argmin_of_grid():
    h = 1.0 / np.arange(1, 11)
    lrs, batches = np.geomspace(0.05, 2.9, 12), np.array([1, 2, 8, 32, 256])
    target = 0.1 * 0.5 * h.sum()
    r = nqm.optimal_steps_curve(h, h, batches, target, lrs, momentum=0.5, max_steps=400)
    for j, b in enumerate(batches):
        per_lr = [first_hit(recursion_momentum(h, h, [lr] * 400, [b] * 400, 0.5, 1.0), target)
                  if lr < 3.0 else np.inf for lr in lrs]
        assert r.steps[j] == min(per_lr)
        assert r.lr[j] == lrs[int(np.argmin(per_lr))]
    assert np.all(np.diff(r.steps) <= 0) and r.steps[0] > 4 * r.steps[-1]
    np.testing.assert_array_equal(r.examples, r.steps * batches)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"batch": 0}, "batch"), ({"batch": -2}, "batch"), ({"lr": -0.1}, "lr"), ({"lr": 0.0}, "lr"),
    ({"lr": np.nan}, "lr"), ({"h": [1.0, np.inf]}, "h"), ({"h": [1.0, 0.0]}, "h"),
    ({"c": [1.0, 2.0, 3.0]}, "c"), ({"c": -1.0}, "c"), ({"init_sq": [1.0, 2.0, 3.0]}, "init_sq"),
    ({"momentum": 1.0}, "momentum"), ({"ema_decay": -0.5}, "ema_decay"),
    ({"steps": -1}, "steps"), ({"steps": 2.5}, "steps"),
    ({"lr": [0.1, 0.2], "batch": [1, 2, 3]}, "lr"),
    ({"precond_power": [1.0, 2.0]}, "precond_power"), ({"precond_power": 1e6}, "precond_power"),
    ({"nesterov": "no"}, "nesterov"),
])
def test_bad_input_raises_naming_argument(kwargs, name):
    args = {"h": [1.0, 0.5], "c": 1.0, "lr": 0.1, "batch": 4, "steps": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        nqm.expected_loss(args.pop("h"), args.pop("c"), args.pop("lr"), args.pop("batch"),
                          args.pop("steps"), **args)


def test_bad_input_other_functions():
    with pytest.raises(ValueError, match="target"):
        nqm.steps_to_target([1.0], 1.0, 0.1, 1, -1.0)
    with pytest.raises(ValueError, match="max_steps"):
        nqm.steps_to_target([1.0], 1.0, 0.1, 1, 0.1, max_steps=-5)
    with pytest.raises(ValueError, match="batch"):
        nqm.stationary_loss([1.0], 1.0, 0.1, 0)
    with pytest.raises(ValueError, match="lr"):
        nqm.expected_loss([1.0], 1.0, 0.1, 1)  # steps=None needs a schedule array
    with pytest.raises(ValueError, match="lr"):
        nqm.expected_loss([1.0], 1.0, [0.1, -0.1], 1)
    with pytest.raises(ValueError, match="lam"):
        nqm.linreg_expected_loss([[1.0]], 0.1, 1, 3)
    with pytest.raises(ValueError, match="noise_var"):
        nqm.linreg_expected_loss([1.0], 0.1, 1, 3, noise_var=-1.0)
    with pytest.raises(ValueError, match="batch"):
        nqm.linreg_moments([1.0], 0.1, 0.0, 3)
    with pytest.raises(ValueError, match="init_m"):
        nqm.linreg_expected_loss([1.0, 2.0], 0.1, 1, 3, init_m=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="batches"):
        nqm.optimal_steps_curve([1.0], 1.0, [0, 1], 0.1, [0.1])


# --------------------------------------------------------------------------- Nesterov momentum


def recursion_nesterov(h, c, lrs, batches, mu, x0):
    """Moments of v ← μv + g, θ ← θ − η(g + μv) with g = hθ + ζ, Var ζ = c/B, written out.

    Substituting v' gives θ' = aθ − ημ²v − η(1+μ)ζ with a = 1 − ηh(1+μ), and v' = hθ + μv + ζ;
    the products of these two lines, averaged, are the three equations below.
    """
    x = np.broadcast_to(np.asarray(x0, float), h.shape).copy()  # E[θ²]
    y, z = np.zeros_like(x), np.zeros_like(x)  # E[θv], E[v²]
    out = [0.5 * h @ x]
    for lr, b in zip(lrs, batches, strict=True):
        a, p, q, n = 1 - lr * h * (1 + mu), -lr * mu**2, -lr * (1 + mu), c / b
        x, y, z = (a * a * x + 2 * a * p * y + p * p * z + q * q * n,
                   a * h * x + (a * mu + p * h) * y + p * mu * z + q * n,
                   h * h * x + 2 * h * mu * y + mu**2 * z + n)
        out.append(0.5 * h @ x)
    return np.array(out)


@pytest.mark.parametrize(("mu", "lr"), [(0.5, 0.6), (0.9, 0.3), (0.3, 1.4)])
def test_nesterov_closed_form_equals_recursion(mu, lr):
    got = nqm.expected_loss(H, C, lr, 2, 300, momentum=mu, init_sq=1.5, nesterov=True)
    ref = recursion_nesterov(H, C, [lr] * 300, [2] * 300, mu, 1.5)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    sched = nqm.expected_loss(H, C, np.full(300, lr), 2, momentum=mu, init_sq=1.5,
                              nesterov=True)
    np.testing.assert_allclose(sched, ref, rtol=1e-12)


def test_nesterov_matches_monte_carlo():
    """Brute-force Nesterov SGD (Rademacher per-example noise) within 3 s.e. at every step."""
    rng = np.random.default_rng(11)
    lr, batch, steps, mu, n_rep = 0.5, 4, 30, 0.7, 20000
    theta = rng.standard_normal((n_rep, H.size))
    v = np.zeros_like(theta)
    losses = [0.5 * (theta**2) @ H]
    for _ in range(steps):
        g = H * theta + (rng.choice([-1.0, 1.0], size=(n_rep, batch, H.size))
                         * np.sqrt(C)).mean(axis=1)
        v = mu * v + g
        theta = theta - lr * (g + mu * v)
        losses.append(0.5 * (theta**2) @ H)
    losses = np.array(losses)
    mean, se = losses.mean(axis=1), losses.std(axis=1, ddof=1) / np.sqrt(n_rep)
    exact = nqm.expected_loss(H, C, lr, batch, steps, momentum=mu, nesterov=True)
    assert np.all(np.abs(mean - exact)[1:] <= 3 * se[1:])


@pytest.mark.parametrize("mu", [0.0, 0.5, 0.9])
def test_nesterov_stability_limit_is_the_spectral_radius_threshold(mu):
    """theory.gd_stability_limit(nesterov=True) is where ρ of the 2×2 map reaches 1, and the
    NQM's stationary loss is finite just below it and inf just above."""
    lam = 2.0
    limit = theory.gd_stability_limit(lam, mu, nesterov=True)

    def rho(lr):
        a = np.array([[1 - lr * lam * (1 + mu), -lr * mu**2], [lam, mu]])
        return np.abs(np.linalg.eigvals(a)).max()

    assert rho(limit * (1 - 1e-6)) < 1 < rho(limit * (1 + 1e-6))
    h = np.array([lam, 0.1])
    assert np.isfinite(nqm.stationary_loss(h, h, limit * 0.999, 4, momentum=mu, nesterov=True))
    assert nqm.stationary_loss(h, h, limit * 1.001, 4, momentum=mu, nesterov=True) == np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tail = nqm.expected_loss(h, h, limit * 1.05, 4, 5000, momentum=mu, nesterov=True)[-1]
    assert tail == np.inf


def test_nesterov_stationary_and_steps_to_target():
    lr, b, mu = 0.8, 3, 0.6
    long_run = nqm.expected_loss(H, C, lr, b, 20000, momentum=mu, nesterov=True)[-1]
    stat = nqm.stationary_loss(H, C, lr, b, momentum=mu, nesterov=True)
    assert stat == pytest.approx(long_run, rel=1e-10)
    # μ = 0: Nesterov is plain SGD
    assert nqm.stationary_loss(H, C, lr, b, momentum=0.0, nesterov=True) == pytest.approx(
        nqm.stationary_loss(H, C, lr, b), rel=1e-12)
    h = 1.0 / np.arange(1, 31)
    target = 0.2 * 0.5 * h.sum()
    lrs = np.array([0.2, 0.6, 1.0])
    got = nqm.steps_to_target(h, h, lrs, 8, target, momentum=mu, nesterov=True,
                              max_steps=2000)
    for lr_i, g in zip(lrs, got, strict=True):
        curve = recursion_nesterov(h, h, [lr_i] * 2000, [8] * 2000, mu, 1.0)
        hits = np.flatnonzero(curve <= target)
        assert g == (hits[0] if hits.size else np.inf)
