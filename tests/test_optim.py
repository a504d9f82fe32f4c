"""sgdtheory.optim: the update against torch.optim.SGD and explicit loops; the fused NQM kernel
against the plain gradient + update."""

from __future__ import annotations

import numpy as np
import pytest

from sgdtheory import optim
from sgdtheory.backend import get_backend
from sgdtheory.problems import Layout, NoisyQuadratic

NUMPY = get_backend("numpy")


def _gradients(steps, n, p, seed=0):
    """Fixed gradients g_t(θ) = A θ + b_t of a quadratic, so every optimiser sees the same."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(p, p))
    a = a @ a.T / p + np.eye(p)
    return a, rng.normal(size=(steps, n, p))


@pytest.mark.parametrize("nesterov", [False, True])
def test_update_equals_torch_sgd_per_row(nesterov):
    """Per-row lr and momentum columns and a schedule (with a zero step) equal one
    torch.optim.SGD per row, step by step."""
    import torch

    n, p, steps = 4, 3, 9
    a, b = _gradients(steps, n, p)
    lr = np.array([[0.1], [0.05], [0.2], [0.1]])
    mu = np.array([[0.9], [0.0], [0.5], [0.7]])
    scale = [0.0, 0.5, 1.0, 1.0, 1.0, 0.3, 1.0, 0.1, 1.0]
    theta = np.ones((n, p))
    opt = optim.sgd(lr, mu, nesterov)
    state = opt.init(theta)
    for t in range(steps):
        theta, state = opt.update(theta @ a + b[t], state, theta, scale[t])
    for i in range(n):
        w = torch.ones(p, dtype=torch.float64, requires_grad=True)
        ref = torch.optim.SGD([w], lr=float(lr[i, 0]), momentum=float(mu[i, 0]),
                              nesterov=nesterov and mu[i, 0] > 0)
        for t in range(steps):
            ref.param_groups[0]["lr"] = float(lr[i, 0]) * scale[t]
            ref.zero_grad()
            w.grad = torch.as_tensor(w.detach().numpy() @ a + b[t, i])
            ref.step()
        np.testing.assert_allclose(theta[i], w.detach().numpy(), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("nesterov", [False, True])
def test_unchecked_step_equals_update(nesterov):
    """``step`` (the simulator's unchecked path) gives bit-identical iterates to ``update``."""
    n, p, steps = 3, 4, 7
    a, b = _gradients(steps, n, p)
    opt = optim.sgd(np.array([[0.1], [0.2], [0.05]]), np.array([[0.9], [0.0], [0.5]]), nesterov)
    t1, t2 = np.ones((n, p)), np.ones((n, p))
    s1, s2 = opt.init(t1), opt.init(t2)
    for t in range(steps):
        t1, s1 = opt.update(t1 @ a + b[t], s1, t1, 0.5)
        t2, s2 = opt.step(t2 @ a + b[t], s2, t2, 0.5)
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_array_equal(s1.velocity, s2.velocity)


def test_plain_sgd_keeps_no_state_and_is_theta_minus_lr_grad():
    opt = optim.sgd(0.3)
    theta = np.array([[1.0, -2.0]])
    state = opt.init(theta)
    assert state.velocity is None
    theta, state = opt.update(np.array([[0.5, 1.0]]), state, theta, 2.0)
    np.testing.assert_array_equal(theta, [[1.0 - 0.3 * 2.0 * 0.5, -2.0 - 0.3 * 2.0 * 1.0]])


def test_take_drops_rows_of_every_per_row_field():
    """Dropping rows mid-run and continuing equals running all rows and selecting."""
    n, p, steps = 5, 2, 6
    a, b = _gradients(steps, n, p, seed=1)
    lr = np.linspace(0.05, 0.2, n)[:, None]
    mu = np.linspace(0.1, 0.8, n)[:, None]
    keep = np.array([True, False, True, True, False])
    opt = optim.sgd(lr, mu, nesterov=True)
    full = np.ones((n, p))
    part = np.ones((n, p))
    s_full, s_part = opt.init(full), opt.init(part)
    for t in range(steps):
        full, s_full = opt.update(full @ a + b[t], s_full, full)
        if t == 3:  # drop rows (as diverged replicas are) before step 3
            part, s_part = part[keep], s_part.take(keep)
        g = part @ a + (b[t][keep] if t >= 3 else b[t])
        part, s_part = opt.update(g, s_part, part)
    np.testing.assert_array_equal(part, full[keep])
    assert s_part.lr.shape == (3, 1) and s_part.velocity.shape == (3, p)


def test_ema_update_is_the_weighted_average_of_the_iterates():
    rng = np.random.default_rng(2)
    iterates = rng.normal(size=(20, 3))
    beta = 0.8
    avg = iterates[0].copy()
    for theta in iterates[1:]:
        optim.ema_update(avg, theta, beta)
    t = len(iterates) - 1  # θ̄_t = β^t θ_0 + (1−β) Σ_{s=1..t} β^{t−s} θ_s
    w = (1 - beta) * beta ** (t - np.arange(1, t + 1))
    np.testing.assert_allclose(avg, beta**t * iterates[0] + w @ iterates[1:], rtol=1e-12)


@pytest.mark.parametrize("tile", [1 << 18, 6])
@pytest.mark.parametrize("dropped", [False, True])
def test_fused_nqm_step_equals_gradient_plus_update(monkeypatch, tile, dropped):
    """The fused in-place kernel (sgd_step) is the plain gradient + optim.sgd update: same
    random stream, same θ up to rounding (float64; several tiles; rows dropped)."""
    from sgdtheory import problems

    monkeypatch.setattr(problems._NQMSampler, "TILE", tile)
    h = np.array([1.0, 0.4, 0.1])
    prob = NoisyQuadratic(h, [0.5, 0.2, 0.3], theta_star=[0.3, -1.0, 2.0])
    kernel = prob.kernel(NUMPY, "float64")
    n_rep, n_cfg, batch, lr = 5, 2, 4, 0.7
    # rows replica-major; after a drop, the replica of each remaining row
    rep = np.repeat([0, 1, 3, 4], n_cfg) if dropped else None
    n = rep.size if dropped else n_rep * n_cfg
    layout = Layout(n_rep, n_cfg, rep)
    start = np.random.default_rng(0).normal(size=(n, 3))
    fused, plain = start.copy(), start.copy()
    s_fused = kernel.sampler(NUMPY.rng(7), n_rep)
    s_plain = kernel.sampler(NUMPY.rng(7), n_rep)
    opt = optim.sgd(lr)
    state = opt.init(plain)
    for _ in range(5):
        s_fused.sgd_step(fused, layout, batch, lr)
        plain, state = opt.update(s_plain.grad(plain, layout, batch), state, plain)
    np.testing.assert_allclose(fused, plain, rtol=1e-12, atol=1e-13)
