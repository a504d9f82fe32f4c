"""The Monte Carlo simulator against the exact recursions (nqm), brute-force loops and torch."""

import warnings

import numpy as np
import pytest

from sgdtheory import nqm, simulate, theory
from sgdtheory import problems as P

H = np.array([1.0, 0.5, 0.1, 0.02])
NQM = P.NoisyQuadratic(H, H)  # c = h: "Fisher = Hessian"


def _within_3se(res, expected, name="train_loss"):
    """|mean − truth| ≤ 3 standard errors at every recorded step after step 0 (exact there)."""
    mean, se = res.mean(name), res.stderr(name)
    np.testing.assert_allclose(mean[..., 0], expected[..., 0], rtol=1e-12)
    z = (mean - expected)[..., 1:] / se[..., 1:]
    assert np.all(np.abs(z) <= 3), np.abs(z).max()


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.6, False), (0.6, True)])
def test_nqm_mean_loss_matches_exact_expectation(momentum, nesterov):
    lrs, batches = np.array([0.3, 0.9]), np.array([[2], [8]])
    res = simulate.run(NQM, lr=lrs, batch=batches, momentum=momentum, nesterov=nesterov,
                       steps=60, replicas=4000, seed=2, record_every=15, progress=False)
    assert res.train_loss.shape == (2, 2, 4000, 5)
    exact = nqm.expected_loss(H, H, lrs, batches, 60, momentum=momentum,
                              nesterov=nesterov)[..., res.steps]
    _within_3se(res, exact)


def test_nqm_ema_and_schedule_match_exact():
    sched = simulate.linear_decay(0.1, warmup=0.2)
    res = simulate.run(NQM, lr=0.8, batch=4, steps=50, schedule=sched, ema=0.9,
                       replicas=4000, seed=3, record_every=10, progress=False)
    lrs = 0.8 * sched(np.arange(50) / 50)
    _within_3se(res, nqm.expected_loss(H, H, lrs, 4)[res.steps])
    _within_3se(res, nqm.expected_loss(H, H, lrs, 4, ema_decay=0.9)[res.steps],
                "ema_train_loss")


def test_batch_increase_schedule_matches_exact():
    bsched = simulate.batch_increase(simulate.step_decay([0.5], 0.25))
    res = simulate.run(NQM, lr=0.5, batch=2, steps=40, batch_schedule=bsched, replicas=4000,
                       seed=4, record_every=10, progress=False)
    batches = 2 * bsched(np.arange(40) / 40)
    assert batches[0] == 2 and batches[-1] == 8
    np.testing.assert_array_equal(res.examples, np.r_[0, np.cumsum(batches)][res.steps])
    _within_3se(res, nqm.expected_loss(H, H, np.full(40, 0.5), batches)[res.steps])


def test_linear_regression_matches_exact_recursion():
    lam = np.array([1.0, 0.3, 0.1])
    prob = P.LinearRegression(lam, noise_std=0.5)
    lrs, batches = np.array([0.2, 0.6]), np.array([1, 4])
    res = simulate.run(prob, lr=lrs, batch=batches, steps=40, replicas=4000, seed=4,
                       record_every=10, progress=False)
    exact = np.stack([nqm.linreg_expected_loss(lam, lr, b, 40, noise_var=0.25)
                      for lr, b in zip(lrs, batches, strict=True)])[:, res.steps]
    _within_3se(res, exact)
    np.testing.assert_array_equal(res.to_numpy().test_loss, res.to_numpy().train_loss)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_update_is_torch_sgd(nesterov):
    """Noise-free NQM: the trajectory equals torch.optim.SGD step by step (exact)."""
    import torch

    h = np.array([[2.0, 0.3], [0.3, 0.5]])
    prob = P.NoisyQuadratic(h, [0.0, 0.0], theta_star=[0.5, -1.0], theta0=[2.0, 1.0])
    res = simulate.run(prob, lr=0.3, momentum=0.7, nesterov=nesterov, steps=12,
                       schedule=simulate.step_decay([0.5], 0.5), record_every=1,
                       progress=False)
    w = torch.tensor([2.0, 1.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.3, momentum=0.7, nesterov=nesterov)
    ht, ts = torch.tensor(h), torch.tensor([0.5, -1.0], dtype=torch.float64)
    losses = []
    for t in range(13):
        loss = 0.5 * (w - ts) @ ht @ (w - ts)
        losses.append(loss.item())
        if t == 6:
            for group in opt.param_groups:
                group["lr"] = 0.15
        opt.zero_grad()
        loss.backward()
        opt.step()
    np.testing.assert_allclose(res.train_loss[0], losses, rtol=1e-12)


def test_full_batch_linear_regression_is_gradient_descent():
    """B = N without replacement is deterministic GD: compare with an explicit loop."""
    prob = P.LinearRegressionData(np.array([1.0, 0.5, 0.25]), n_data=32, noise_std=0.1,
                                  seed=0)
    res = simulate.run(prob, lr=[0.5, 1.2], batch=32, epochs=5, replicas=2, seed=0,
                       progress=False)
    np.testing.assert_array_equal(res.steps, np.arange(6))
    np.testing.assert_allclose(res.epochs, np.arange(6))
    for i, lr in enumerate([0.5, 1.2]):
        w, losses = prob.theta0.copy(), []
        for _ in range(6):
            losses.append(0.5 * np.mean((prob.x @ w - prob.y) ** 2))
            w = w - lr * prob.x.T @ (prob.x @ w - prob.y) / 32
        np.testing.assert_allclose(res.train_loss[i, 0], losses, rtol=1e-10)
        np.testing.assert_allclose(res.train_loss[i, 1], losses, rtol=1e-10)


def test_divergence_is_a_result_without_warnings():
    class Spy(P.NoisyQuadratic):
        rows = []

        def kernel(self, backend, dtype):
            k = super().kernel(backend, dtype)
            make = k.sampler

            def sampler(gen, n_rep, replace=False):
                s = make(gen, n_rep, replace)
                grad = s.grad

                def spy_grad(theta, layout, batch):
                    Spy.rows.append(theta.shape[0])
                    return grad(theta, layout, batch)

                s.grad = spy_grad
                return s

            k.sampler = sampler
            return k

    prob = Spy(H, H)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = simulate.run(prob, lr=[0.5, 2.5], batch=4, steps=400, replicas=3, seed=0,
                           record_every=100, dtype="float32", check_every=8, progress=False)
    r = res.to_numpy()
    assert not r.diverged[0].any() and r.diverged[1].all()
    assert np.all(r.diverged_at[0] == -1)
    # the top mode grows ×(1 − 2.5)² = 2.25 per step: loss > 1e6 × L₀ after about 17 steps,
    # detected at a check (every 8 steps)
    at = r.diverged_at[1]
    assert np.all(at % 8 == 0) and np.all((at >= 16) & (at <= 40)), at
    assert np.all(np.isinf(r.train_loss[1, :, 1:])) and np.all(np.isfinite(r.train_loss[0]))
    assert max(Spy.rows[at.max():]) == 3  # the diverged replicas cost nothing more
    assert Spy.rows[0] == 6 and len(Spy.rows) == 400


def test_same_seed_same_numbers_and_chunks():
    kw = dict(lr=[0.1, 0.4, 0.7], batch=[[3], [5]], steps=30, replicas=40, record_every=10,
              progress=False)
    a = simulate.run(NQM, seed=7, **kw).train_loss
    b = simulate.run(NQM, seed=7, **kw).train_loss
    c = simulate.run(NQM, seed=8, **kw).train_loss
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # chunks (here of 2 configurations × 1 replica): other streams, same shapes, and again
    # reproducible; the distribution is checked in test_chunked_run_matches_exact
    e = simulate.run(NQM, seed=7, chunk_size=2, **kw)
    assert e.train_loss.shape == a.shape == (2, 3, 40, 4)
    f = simulate.run(NQM, seed=7, chunk_size=2, **kw).train_loss
    np.testing.assert_array_equal(e.train_loss, f)


def test_chunked_run_matches_exact():
    res = simulate.run(NQM, lr=[0.2, 0.5], batch=4, steps=30, replicas=3000, seed=1,
                       record_every=10, chunk_size=500, progress=False)
    _within_3se(res, nqm.expected_loss(H, H, np.array([0.2, 0.5]), 4, 30)[..., res.steps])


@pytest.mark.parametrize("prob", [NQM, P.FiniteSumQuadratic.random(np.array([1.0, 0.4]), 20,
                                                                    seed=2)],
                         ids=["nqm", "finite_sum"])
def test_numpy_and_torch_agree(prob):
    import torch

    kw = dict(lr=[0.3, 0.8], batch=4, momentum=0.3, steps=30, replicas=3000, record_every=10,
              progress=False)
    a = simulate.run(prob, seed=0, backend="numpy", **kw)
    b = simulate.run(prob, seed=0, backend="torch", **kw)
    assert isinstance(a.train_loss, np.ndarray) and isinstance(b.train_loss, torch.Tensor)
    assert isinstance(b.diverged, torch.Tensor)
    z = (a.mean() - b.mean())[..., 1:] / np.hypot(a.stderr(), b.stderr())[..., 1:]
    assert np.all(np.abs(z) <= 3)
    nb = b.to_numpy()
    assert isinstance(nb.train_loss, np.ndarray) and nb.train_loss.shape == a.train_loss.shape
    again = simulate.run(prob, seed=0, backend="torch", **kw).to_numpy()
    np.testing.assert_array_equal(again.train_loss, nb.train_loss)  # same seed, same numbers


def test_torch_float32_matches_exact():
    res = simulate.run(NQM, lr=0.5, batch=2, steps=40, replicas=4000, seed=5, record_every=10,
                       backend="torch", dtype="float32", progress=False)
    assert str(res.train_loss.dtype) == "torch.float32"
    mean, se = res.mean(), res.stderr()
    exact = nqm.expected_loss(H, H, 0.5, 2, 40)[res.steps]
    assert np.all(np.abs(mean - exact)[1:] <= 3 * se[1:])


def test_record_stats_and_finite_data_epochs():
    prob = P.LinearRegressionData(np.linspace(1.0, 0.1, 6), n_data=64, n_test=50, noise_std=0.3,
                                  seed=1)
    res = simulate.run(prob, lr=[0.1, 0.3], batch=[[8], [16]], epochs=3, replicas=4, seed=0,
                       record_stats=True, progress=False)
    r = res.to_numpy()
    assert r.steps.shape == (2, 2, 4)
    np.testing.assert_array_equal(r.steps[0, 0], [0, 8, 16, 24])
    np.testing.assert_array_equal(r.steps[1, 0], [0, 4, 8, 12])
    np.testing.assert_allclose(r.epochs, np.arange(4.0))  # the same for every batch size
    np.testing.assert_allclose(r.examples, np.arange(4.0) * 64)
    st = prob.stats(prob.theta0)
    np.testing.assert_allclose(r.grad_sq[..., 0], st.grad_sq)
    np.testing.assert_allclose(r.b_noise[..., 0], st.b_noise)
    np.testing.assert_allclose(r.b_simple[..., 0], st.b_simple)
    np.testing.assert_allclose(r.eps_max[..., 0], st.eps_max)
    np.testing.assert_allclose(r.test_loss[..., 0], prob.test_loss(prob.theta0), rtol=1e-12)
    assert np.all(r.train_loss[..., -1] < r.train_loss[..., 0])


def test_logistic_runs_and_decreases():
    prob = P.LogisticRegression.gaussian_mixture(200, 4, separation=2.0, l2=0.01, n_test=100)
    res = simulate.run(prob, lr=[0.5, 1.0], batch=10, epochs=2, replicas=8, seed=0,
                       record_stats=True, progress=False)
    assert np.all(res.train_loss[..., -1] < np.log(2))
    assert np.all(res.test_loss[..., -1] < np.log(2))
    assert np.all(np.isfinite(res.b_noise))


def test_progress_bar(capsys):
    simulate.run(NQM, lr=0.1, steps=50, replicas=2, progress=True, record_every=25)
    assert "simulate" in capsys.readouterr().err


def test_schedules():
    f = np.linspace(0, 0.99, 100)
    np.testing.assert_allclose(simulate.constant()(f), 1.0)
    lin = simulate.linear_decay(0.0, warmup=0.1)(f)
    assert lin[0] == 0 and lin.max() == pytest.approx(1.0) and lin[-1] < 0.02
    st = simulate.step_decay([0.3, 0.6], 0.1)(f)
    np.testing.assert_allclose(st, np.where(f < 0.3, 1, np.where(f < 0.6, 0.1, 0.01)))
    np.testing.assert_allclose(simulate.warmup(0.5)(f), np.minimum(1, f / 0.5))
    bi = simulate.batch_increase(simulate.step_decay([0.5], 0.1), max_factor=4)(f)
    np.testing.assert_allclose(bi, np.where(f < 0.5, 1, 4))


def test_bad_input_raises_value_error():
    data = P.LinearRegressionData([1.0, 1.0], n_data=10, seed=0)
    with pytest.raises(ValueError, match=r"batch \(16\) exceeds n_data \(10\)"):
        simulate.run(data, lr=0.1, batch=16, steps=3, progress=False)
    simulate.run(data, lr=0.1, batch=16, steps=3, replace=True, progress=False)  # allowed
    with pytest.raises(ValueError, match="lr must be finite and > 0"):
        simulate.run(NQM, lr=[0.1, 0.0], steps=3)
    with pytest.raises(ValueError, match="lr must be finite and > 0"):
        simulate.run(NQM, lr=-1.0, steps=3)
    with pytest.raises(ValueError, match="do not broadcast"):
        simulate.run(NQM, lr=[0.1, 0.2], batch=[1, 2, 3], steps=3)
    with pytest.raises(ValueError, match="batch must hold positive integers"):
        simulate.run(NQM, lr=0.1, batch=2.5, steps=3)
    with pytest.raises(ValueError, match="momentum must lie in"):
        simulate.run(NQM, lr=0.1, momentum=1.0, steps=3)
    with pytest.raises(ValueError, match="unknown backend"):
        simulate.run(NQM, lr=0.1, steps=3, backend="tensorflow")
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        simulate.run(NQM, lr=0.1)
    with pytest.raises(ValueError, match="epochs needs a finite dataset"):
        simulate.run(NQM, lr=0.1, epochs=2)
    with pytest.raises(ValueError, match="init must be"):
        simulate.run(NQM, lr=0.1, steps=2, init=np.zeros(3))
    with pytest.raises(ValueError, match="positive semi-definite"):
        simulate.run(P.NoisyQuadratic([[0.0, 1.0], [1.0, 0.0]], [1.0, 1.0]), lr=0.1, steps=2)
    with pytest.raises(ValueError, match="record_steps"):
        simulate.run(NQM, lr=0.1, steps=5, record_steps=[0, 9])
    with pytest.raises(ValueError, match="ema"):
        simulate.run(NQM, lr=0.1, steps=5, ema=1.0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": [], "steps": 3}, "lr must not be empty"),
    ({"batch": 2**70, "steps": 3}, "batch must hold positive integers"),
    ({"batch": True, "steps": 3}, "batch must hold positive integers"),
    ({"schedule": 0.5, "steps": 3}, "schedule must be a function"),
    ({"batch_schedule": "double", "steps": 3}, "batch_schedule must be a function"),
    ({"epochs": "a"}, "epochs must be a real number"),
    ({"epochs": 0.05}, "less than one step"),
    ({"epochs": 1, "record_epochs": [np.nan]}, "record_epochs must lie in"),
    ({"replicas": "3", "steps": 3}, "replicas must be an integer"),
    ({"seed": None, "steps": 3}, "seed must be an integer"),
])
def test_more_bad_input_raises_value_error(kwargs, match):
    data = P.FiniteSumQuadratic.random([1.0, 0.5], 20)
    with pytest.raises(ValueError, match=match):
        simulate.run(data, **({"lr": 0.1, "batch": 2, "progress": False} | kwargs))


def test_fractional_epochs_record_the_last_step():
    data = P.FiniteSumQuadratic.random([1.0, 0.5], 20)
    res = simulate.run(data, lr=0.1, batch=3, epochs=2.5, progress=False)
    assert res.steps.tolist() == [0, 6, 12, 15]  # 6 steps per epoch; ⌊2.5·6⌋ = 15
    assert np.all(np.isfinite(res.train_loss[..., -1]))


def test_one_step_at_eps_opt_and_twice_eps_opt():
    """Divergence beyond 2ε_opt: the expected one-step change is ≈ 0 there, < 0 below."""
    theta = np.array([1.0, -1.0, 1.0, 1.0])
    st = NQM.stats(theta)
    e_opt = st.eps_opt(2)
    res = simulate.run(NQM, lr=[e_opt, 2 * e_opt], batch=2, steps=1, init=theta,
                       replicas=40_000, seed=0, record_steps=[0, 1], progress=False)
    d = res.train_loss[..., 1] - res.train_loss[..., 0]
    mean, se = d.mean(-1), d.std(-1) / np.sqrt(d.shape[-1])
    dl_opt = theory.delta_loss_opt(2, st.delta_loss_max, st.b_noise)
    assert abs(mean[0] + dl_opt) <= 3 * se[0]
    assert abs(mean[1]) <= 3 * se[1]


def test_fused_sgd_path_with_optimum_and_dropped_replicas():
    """Scalar lr (the fused in-place update): θ* ≠ 0 matches nqm; replicas dropped mid-run."""
    prob = P.NoisyQuadratic(H, H, theta_star=[1.0, -2.0, 0.5, 3.0])
    res = simulate.run(prob, lr=0.7, batch=3, steps=30, replicas=4000, seed=6, record_every=10,
                       progress=False)
    _within_3se(res, nqm.expected_loss(H, H, 0.7, 3, 30)[res.steps])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = simulate.run(prob, lr=0.7, batch=1, steps=60, replicas=400, seed=0,
                           record_every=20, divergence_factor=1.05, check_every=4,
                           dtype="float32", progress=False)
    r = res.to_numpy()
    # a loss above 1.05 × L₀ happens to some replicas only: they are flagged, the rest go on
    assert 0 < r.diverged.sum() < 400
    at = r.diverged_at[r.diverged]
    assert np.all(at % 4 == 0) and np.all(at > 0)
    for k, step in enumerate(r.steps):
        flagged = r.diverged & (r.diverged_at <= step)
        assert np.all(np.isinf(r.train_loss[..., k][flagged]))
        assert np.all(np.isfinite(r.train_loss[..., k][~flagged]))


# --------------------------------------------------------------------------- the plan


def test_plan_is_frozen_and_inspectable():
    data = P.LinearRegressionData([1.0, 0.5, 0.2], n_data=64, seed=0)
    pl = simulate.plan(data, lr=[0.1, 0.2, 0.3], batch=[[4], [16]], momentum=0.5, epochs=2,
                       replicas=5, seed=3, schedule=simulate.step_decay([0.5], 0.1))
    assert pl.shape == (2, 3) and pl.n_configs == 6 and pl.n_records == 3
    assert [g.batch for g in pl.groups] == [4, 16]
    g4, g16 = pl.groups
    assert g4.steps == 2 * (64 // 4) and g16.steps == 2 * (64 // 16)
    np.testing.assert_array_equal(g4.configs, [0, 1, 2])
    np.testing.assert_array_equal(g4.record_steps, [0, 16, 32])
    np.testing.assert_array_equal(g4.lr_mult, np.where(np.arange(32) / 32 < 0.5, 1.0, 0.1))
    np.testing.assert_array_equal(g4.record_examples, [0.0, 64.0, 128.0])
    assert pl.work == (32 * 3 + 8 * 3) * 5
    np.testing.assert_array_equal(pl.record_axis("examples"), [0.0, 64.0, 128.0])
    assert pl.record_axis("steps").shape == (2, 3, 3)  # steps differ between batch sizes
    with pytest.raises(AttributeError):
        pl.replicas = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        pl.lr[0, 0] = 1.0


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_chunks_cover_every_row_once_within_the_size(chunk_size):
    pl = simulate.plan(NQM, lr=[0.1, 0.2, 0.3], batch=[[1], [2]], steps=3, replicas=5,
                       chunk_size=chunk_size)
    seen = []
    for c in pl.chunks():
        assert c.n_rep * c.configs.size <= chunk_size
        assert np.all(pl.batch.ravel()[c.configs] == c.group.batch)
        seen += [(int(k), c.r0 + r) for r in range(c.n_rep) for k in c.configs]
    assert sorted(seen) == [(k, r) for k in range(6) for r in range(5)]


def test_default_chunk_size_counts_state_and_data():
    """~256 MiB: (4 + momentum + ema) arrays of p per row, plus 3 passes over N per row."""
    data = P.LinearRegressionData([1.0] * 10, n_data=1000, seed=0)
    pl = simulate.plan(data, lr=0.1, momentum=0.5, ema=0.9, steps=2, dtype="float32")
    assert pl.chunk_size == (256 << 20) // (10 * 6 * 4 + 3 * 1000 * 4)
    assert simulate.plan(NQM, lr=0.1, steps=2).chunk_size == (256 << 20) // (4 * 4 * 8)


def test_execute_reuses_a_plan_and_equals_run():
    settings = dict(lr=[0.2, 0.5], batch=3, momentum=[0.0, 0.5], steps=20, replicas=6,
                    seed=4, ema=0.8, record_every=5)
    pl = simulate.plan(NQM, **settings)
    a = simulate.execute(NQM, pl, progress=False)
    b = simulate.execute(NQM, pl, progress=False)
    c = simulate.run(NQM, progress=False, **settings)
    for res in (b, c):
        np.testing.assert_array_equal(res.train_loss, a.train_loss)
        np.testing.assert_array_equal(res.ema_train_loss, a.ema_train_loss)
    with pytest.raises(ValueError, match="plan is for dim=4"):
        simulate.execute(P.NoisyQuadratic([1.0], [1.0]), pl)
