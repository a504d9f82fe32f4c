"""validate.measure against brute force: explicit per-example loops, finite differences,
full Hessians (torch.autograd.functional.hessian) and repeated sampling."""

import copy
import csv
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from sgdtheory import theory  # noqa: E402
from validate import measure  # noqa: E402
from validate.measure import (  # noqa: E402
    NoiseMonitor,
    gradient_noise,
    hessian_noise,
    hessian_trace,
    hvp,
    top_hessian_eigenvalue,
)

torch.set_num_threads(1)
DT = torch.float64


# --------------------------------------------------------------------------- tiny models


def mlp(seed=0, d_in=4, hidden=6, d_out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(DT)


class SmallCNN(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(27, 3)
        self.to(DT)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.avg_pool2d(torch.tanh(self.conv(x)), 2), 1))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class SmallResNet(nn.Module):
    def __init__(self, seed=0, c=4):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU())
        self.block = Block(c)
        self.head = nn.Linear(c, 3)
        self.to(DT)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def data(n, shape=(4,), seed=1, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=DT)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


CE = nn.CrossEntropyLoss()


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def flat_loss_fn(model, criterion, x, y):
    """L(θ) of a flat parameter vector θ, by functional_call (a brute-force reference)."""
    named = [(k, p) for k, p in model.named_parameters()]
    buffers = {k: b.clone() for k, b in model.named_buffers()}

    def f(theta):
        params, i = {}, 0
        for k, p in named:
            params[k] = theta[i:i + p.numel()].view_as(p)
            i += p.numel()
        return criterion(functional_call(model, (params, buffers), (x,)), y)

    return f


def loop_grads(model, criterion, x, y, size=1):
    """Mean gradients of consecutive chunks of ``size`` examples, one backward pass each."""
    m = copy.deepcopy(model)
    out = []
    for s in range(0, x.shape[0], size):
        m.zero_grad()
        criterion(m(x[s:s + size]), y[s:s + size]).backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]).clone())
    return torch.stack(out)


def two_batch_reference(units, b):
    """|G|², tr(Σ) from unit gradients (M, p) of b examples each, written out by hand."""
    m = units.shape[0]
    small = (units**2).sum(1).mean()
    big = (units.mean(0) ** 2).sum()
    big_b = m * b
    grad_sq = (big_b * big - b * small) / (big_b - b)
    tr_sigma = (small - big) / (1 / b - 1 / big_b)
    return float(grad_sq), float(tr_sigma)


# --------------------------------------------------------------------------- gradient noise


@pytest.mark.parametrize("make,shape", [(mlp, (4,)), (SmallCNN, (1, 6, 6))])
def test_per_sample_matches_explicit_loop(make, shape):
    model = make()
    x, y = data(24, shape)
    est = gradient_noise(model, CE, x, y, method="per_sample", chunk_size=7)
    g = loop_grads(model, CE, x, y)  # (n, p) per-example gradients
    n = g.shape[0]
    mean = g.mean(0)
    tr_sigma = float(((g - mean) ** 2).sum() / (n - 1))
    grad_sq = float((mean**2).sum()) - tr_sigma / n
    assert est.method == "per_sample" and est.batch == n and est.micro_batch == 1
    assert est.tr_sigma == pytest.approx(tr_sigma, rel=1e-5)
    assert est.grad_sq == pytest.approx(grad_sq, rel=1e-5, abs=1e-8 * tr_sigma)
    assert est.b_simple == pytest.approx(tr_sigma / grad_sq, rel=1e-4)
    # jackknife: leave one example out, recompute the estimator, (n-1)/n sum of squares
    loo = []
    for k in range(n):
        gk = torch.cat([g[:k], g[k + 1:]])
        mk = gk.mean(0)
        tk = float(((gk - mk) ** 2).sum() / (n - 2))
        loo.append((float((mk**2).sum()) - tk / (n - 1), tk))
    loo = np.array(loo)
    se = np.sqrt((n - 1) / n * ((loo - loo.mean(0)) ** 2).sum(0))
    assert est.grad_sq_stderr == pytest.approx(se[0], rel=1e-6)
    assert est.tr_sigma_stderr == pytest.approx(se[1], rel=1e-6)


def test_micro_batch_matches_explicit_loop_with_batchnorm():
    model = SmallResNet().train()
    x, y = data(24, (1, 5, 5), seed=3)
    before = copy.deepcopy(model.state_dict())
    est = gradient_noise(model, CE, x, y, micro_batch=4)
    assert est.method == "micro_batch" and est.micro_batch == 4 and est.batch == 24
    ref = two_batch_reference(loop_grads(model, CE, x, y, size=4), 4)
    assert est.grad_sq == pytest.approx(ref[0], rel=1e-8)
    assert est.tr_sigma == pytest.approx(ref[1], rel=1e-8)
    assert math.isfinite(est.tr_sigma_stderr)
    # nothing about the model changed: running statistics, parameters, gradients
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    # auto picks micro-batches for a training-mode BatchNorm network
    assert gradient_noise(model, CE, x, y).method == "micro_batch"


def test_per_sample_equals_micro_batch_of_one():
    model = mlp()
    x, y = data(16)
    a = gradient_noise(model, CE, x, y, method="per_sample")
    b = gradient_noise(model, CE, x, y, method="micro_batch", micro_batch=1)
    assert a.grad_sq == pytest.approx(b.grad_sq, rel=1e-9, abs=1e-12)
    assert a.tr_sigma == pytest.approx(b.tr_sigma, rel=1e-9)


# --------------------------------------------------------------------------- Hessian


@pytest.mark.parametrize("make,shape", [(mlp, (4,)), (SmallCNN, (1, 6, 6)),
                                        (SmallResNet, (1, 5, 5))])
@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_hvp_matches_finite_differences(make, shape, method):
    model = make()
    x, y = data(10, shape, seed=5)
    f = flat_loss_fn(model, CE, x, y)
    theta = flat_params(model)
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    h = 1e-5

    def g(t):
        t = t.clone().requires_grad_(True)
        return torch.autograd.grad(f(t), t)[0]

    fd = (g(theta + h * v) - g(theta - h * v)) / (2 * h)
    hv = hvp(model, CE, x, y, v, method=method)
    assert torch.allclose(hv, fd, rtol=1e-4, atol=1e-4 * float(fd.abs().max()))


def test_hvp_and_eigen_trace_against_full_hessian():
    model = mlp(seed=3)
    x, y = data(20, seed=7)
    theta = flat_params(model)
    hess = torch.autograd.functional.hessian(flat_loss_fn(model, CE, x, y), theta)
    p = theta.numel()
    eye = torch.eye(p, dtype=DT)
    op = measure.HessianOperator(model, CE, x, y)
    cols = torch.stack([op(eye[i]) for i in range(p)], 1)
    assert torch.allclose(cols, hess, rtol=0, atol=1e-6 * float(hess.abs().max()))
    evals = np.linalg.eigvalsh(hess.numpy())
    lam = top_hessian_eigenvalue(model, CE, x, y, tol=1e-10, max_iter=500)
    assert abs(lam - evals[-1]) <= 1e-4 * max(1.0, abs(evals[-1]))
    top3 = top_hessian_eigenvalue(model, CE, x, y, k=3, tol=1e-10, max_iter=500)
    assert np.allclose(top3, evals[::-1][:3], atol=1e-4)
    est, se = hessian_trace(model, CE, x, y, n_samples=60, seed=1)
    exact = float(torch.trace(hess))
    assert se > 0 and abs(est - exact) <= 3 * se


def test_hessian_noise_unbiased_over_repeated_batches():
    """Mean of R estimates within 3 standard errors of the exact full-dataset values."""
    n_data = 40
    model = mlp(seed=11, d_in=3, hidden=5)
    x_all, _ = data(n_data, (3,), seed=12)
    with torch.no_grad():  # labels from a teacher, so that |G| is not negligible
        y_all = (x_all @ torch.tensor([[1.0, -1.0, 0.5], [0.5, 1.0, -1.0], [-1.0, 0.3, 1.0]],
                                      dtype=DT)).argmax(1)
    theta = flat_params(model)
    hess = torch.autograd.functional.hessian(flat_loss_fn(model, CE, x_all, y_all), theta)
    g = loop_grads(model, CE, x_all, y_all)  # (N, p)
    grad = g.mean(0)
    sigma = (g - grad).T @ (g - grad) / n_data  # 1/N normalisation
    exact = {
        "grad_sq": float(grad @ grad),
        "tr_sigma": float(torch.trace(sigma)),
        "g_h_g": float(grad @ hess @ grad),
        "tr_h_sigma": float(torch.trace(hess @ sigma)),
    }
    gen = torch.Generator().manual_seed(0)
    reps, rows = 200, []
    for _ in range(reps):
        idx = torch.randint(0, n_data, (16,), generator=gen)  # with replacement
        hidx = torch.randint(0, n_data, (16,), generator=gen)
        est = hessian_noise(model, CE, x_all[idx], y_all[idx], micro_batch=2,
                            hessian_inputs=x_all[hidx], hessian_targets=y_all[hidx])
        rows.append([getattr(est, k) for k in exact] + [getattr(est, k + "_stderr")
                                                         for k in exact])
    rows = np.array(rows)
    for i, (k, truth) in enumerate(exact.items()):
        vals = rows[:, i]
        se = vals.std(ddof=1) / math.sqrt(reps)
        assert abs(vals.mean() - truth) <= 3 * se, (k, vals.mean(), truth, se)
        # the reported jackknife error describes the spread of single estimates
        ratio = math.sqrt(np.mean(rows[:, 4 + i] ** 2)) / vals.std(ddof=1)
        assert 0.5 < ratio < 2.0, (k, ratio)


def test_gradient_noise_unbiased_over_repeated_batches():
    n_data = 30
    model = SmallCNN(seed=2)
    x_all, y_all = data(n_data, (1, 6, 6), seed=4)
    g = loop_grads(model, CE, x_all, y_all)
    grad = g.mean(0)
    exact = (float(grad @ grad), float(((g - grad) ** 2).sum() / n_data))
    gen = torch.Generator().manual_seed(1)
    vals = []
    for _ in range(150):
        idx = torch.randint(0, n_data, (12,), generator=gen)
        est = gradient_noise(model, CE, x_all[idx], y_all[idx])
        vals.append((est.grad_sq, est.tr_sigma))
    vals = np.array(vals)
    for i in range(2):
        se = vals[:, i].std(ddof=1) / math.sqrt(len(vals))
        assert abs(vals[:, i].mean() - exact[i]) <= 3 * se


def test_hessian_noise_split_halves_and_ratios():
    model = mlp(seed=4)
    x, y = data(32, seed=8)
    est = hessian_noise(model, CE, x, y, micro_batch=4)
    assert (est.batch, est.micro_batch, est.hessian_batch) == (16, 4, 16)
    same = hessian_noise(model, CE, x[:16], y[:16], micro_batch=4,
                         hessian_inputs=x[16:], hessian_targets=y[16:])
    assert est == same
    # brute force: H of the second half, unit gradients of the first half
    hess = torch.autograd.functional.hessian(flat_loss_fn(model, CE, x[16:], y[16:]),
                                             flat_params(model))
    units = loop_grads(model, CE, x[:16], y[:16], size=4)
    small = float(torch.einsum("kp,pq,kq->k", units, hess, units).mean())
    gbar = units.mean(0)
    big = float(gbar @ hess @ gbar)
    ghg = (16 * big - 4 * small) / 12
    trhs = (small - big) / (1 / 4 - 1 / 16)
    assert est.g_h_g == pytest.approx(ghg, rel=1e-8)
    assert est.tr_h_sigma == pytest.approx(trhs, rel=1e-8)
    if est.g_h_g > 0 and est.grad_sq > 0:
        assert est.eps_max == pytest.approx(est.grad_sq / est.g_h_g)
        assert est.b_noise == pytest.approx(est.tr_h_sigma / est.g_h_g)
        assert est.eps_opt(64) == pytest.approx(theory.eps_opt(64, est.eps_max, est.b_noise))


# --------------------------------------------------------------------------- monitor


def test_monitor_cheap_mode_equals_two_batch_of_accumulated_micro_batches(tmp_path):
    model = SmallResNet(seed=1).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    path = tmp_path / "noise.csv"
    mon = NoiseMonitor(model, criterion=CE, every=2, curvature_every=4, csv_path=path,
                       hessian_micro_batch=2, lanczos_iters=10, beta=0.5)
    gen = torch.Generator().manual_seed(0)
    expected = []
    for step in range(5):
        x = torch.randn(12, 1, 5, 5, generator=gen, dtype=DT)
        y = torch.randint(0, 3, (12,), generator=gen)
        if step % 2 == 0:
            expected.append(two_batch_reference(loop_grads(model, CE, x, y, size=3), 3))
        opt.zero_grad()
        for xb, yb in zip(x.chunk(4), y.chunk(4), strict=True):
            (CE(model(xb), yb) / 4).backward()
            mon.after_backward()
        rec = mon.step(lr=0.05, inputs=x, targets=y)
        assert (rec is not None) == (step % 2 == 0)
        opt.step()
    mon.close()
    assert [r["step"] for r in mon.records] == [0, 2, 4]
    for r, (gs, ts) in zip(mon.records, expected, strict=True):
        assert r["grad_sq"] == pytest.approx(gs, rel=1e-6, abs=1e-12)
        assert r["tr_sigma"] == pytest.approx(ts, rel=1e-6)
        assert r["micro_batches"] == 4 and r["batch"] == 12
    assert math.isnan(mon.records[1]["g_h_g"]) and math.isfinite(mon.records[2]["g_h_g"])
    assert math.isfinite(mon.records[0]["lambda_max"])
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and float(rows[2]["lr"]) == 0.05
    assert float(rows[1]["grad_sq"]) == pytest.approx(expected[1][0], rel=1e-6, abs=1e-12)


def test_monitor_sum_accumulation_and_fallback():
    model = mlp()
    x, y = data(16)
    ref = two_batch_reference(loop_grads(model, CE, x, y, size=4), 4)
    mon = NoiseMonitor(model, criterion=CE, every=1, accumulation="sum")
    for xb, yb in zip(x.chunk(4), y.chunk(4), strict=True):
        CE(model(xb), yb).backward()
        mon.after_backward()
    rec = mon.step(lr=0.1, batch_size=16)
    assert rec["grad_sq"] == pytest.approx(ref[0], rel=1e-8, abs=1e-14)
    assert rec["tr_sigma"] == pytest.approx(ref[1], rel=1e-8)
    model.zero_grad()
    CE(model(x), y).backward()  # a single backward: falls back to per-sample gradients
    mon.after_backward()
    rec = mon.step(lr=0.1, inputs=x, targets=y)
    ps = gradient_noise(model, CE, x, y)
    assert rec["tr_sigma"] == pytest.approx(ps.tr_sigma, rel=1e-10)
    with pytest.raises(ValueError, match="micro-batch"):
        mon.after_backward()
        mon.step(lr=0.1, batch_size=16)


# --------------------------------------------------------------------------- bad input


def test_bad_input_raises_value_error():
    model = mlp()
    x, y = data(8)
    with pytest.raises(ValueError, match="reduction"):
        gradient_noise(model, nn.CrossEntropyLoss(reduction="sum"), x, y)
    with pytest.raises(ValueError, match="reduction"):
        hessian_noise(model, nn.CrossEntropyLoss(reduction="none"), x, y)
    with pytest.raises(ValueError, match="scalar"):
        gradient_noise(model, lambda out, t: nn.functional.cross_entropy(out, t, reduction="none"),
                       x, y, method="micro_batch", micro_batch=2)
    with pytest.raises(ValueError, match="same batch size"):
        gradient_noise(model, CE, x, y[:5])
    frozen = mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        gradient_noise(frozen, CE, x, y)
    with pytest.raises(ValueError, match="trainable"):
        top_hessian_eigenvalue(frozen, CE, x, y)
    with pytest.raises(ValueError, match="divide"):
        gradient_noise(model, CE, x, y, micro_batch=3)
    with pytest.raises(ValueError, match="divide"):
        hessian_noise(model, CE, x, y, micro_batch=3)
    with pytest.raises(ValueError, match="micro_batch"):
        gradient_noise(model, CE, x, y, micro_batch=0)
    with pytest.raises(ValueError, match="BatchNorm"):
        gradient_noise(SmallResNet().train(), CE, torch.randn(8, 1, 5, 5, dtype=DT), y,
                       method="per_sample")
    with pytest.raises(ValueError, match="vector"):
        hvp(model, CE, x, y, torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="finite"):
        gradient_noise(model, CE, x * float("nan"), y)
    with pytest.raises(ValueError, match="every"):
        NoiseMonitor(model, every=0)
    with pytest.raises(ValueError, match="lr"):
        NoiseMonitor(model, every=1).step(lr=0.0, batch_size=8)


def test_more_bad_input_named_clearly(tmp_path):
    """Review findings: each of these used to give a wrong number or an unhelpful error."""
    import functools

    model = mlp()
    x, y = data(8)
    summed = functools.partial(nn.functional.cross_entropy, reduction="sum")
    with pytest.raises(ValueError, match="reduction='mean'"):
        gradient_noise(model, summed, x, y, micro_batch=2)
    with pytest.raises(ValueError, match="reduction='mean'"):
        hessian_noise(model, summed, x, y)
    broken = mlp()
    with torch.no_grad():
        broken[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="parameters are not finite"):
        gradient_noise(broken, CE, x, y)
    reg = nn.Linear(4, 1).to(DT)
    with pytest.raises(ValueError, match="targets must be finite"):
        gradient_noise(reg, nn.MSELoss(), x, torch.full((8, 1), float("nan"), dtype=DT))
    bn = SmallResNet().train()
    xi = torch.randn(8, 1, 5, 5, dtype=DT)
    for fn in (gradient_noise, hessian_noise):
        with pytest.raises(ValueError, match="BatchNorm"):
            fn(bn, CE, xi, y, micro_batch=1)
    with pytest.raises(ValueError, match="hessian_micro_batch"):
        NoiseMonitor(model, criterion=CE, hessian_micro_batch=0)
    with pytest.raises(ValueError, match="lanczos_iters"):
        NoiseMonitor(model, criterion=CE, lanczos_iters=1)
    with pytest.raises(ValueError, match="csv_path"):
        NoiseMonitor(model, csv_path=tmp_path / "missing" / "x.csv")
    with pytest.raises(ValueError, match="grad_scale"):
        NoiseMonitor(model, every=1).step(lr=0.1, batch_size=8, grad_scale=0.0)


def test_batchnorm_without_running_stats_counts_as_batch_statistics():
    """BatchNorm(track_running_stats=False) normalises by the batch even in eval mode, so
    per-example gradients are of another function: auto mode must use micro-batches."""
    model = SmallResNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    model.eval()
    x, y = torch.randn(16, 1, 5, 5, dtype=DT), data(16)[1]
    assert gradient_noise(model, CE, x, y).method == "micro_batch"
    with pytest.raises(ValueError, match="BatchNorm"):
        gradient_noise(model, CE, x, y, method="per_sample")


def test_hessian_noise_eps_opt_is_inf_without_positive_curvature():
    est = hessian_noise(mlp(), CE, *data(16), micro_batch=4)
    no_curv = type(est)(**{**est.__dict__, "g_h_g": -1.0})
    assert no_curv.eps_opt(32) == math.inf


def test_monitor_momentum_limits_csv_restart_and_grad_scale(tmp_path):
    """gd_limit and lr_over_eps_opt use the optimiser's momentum (effective step η/(1−μ));
    a new monitor starts a new CSV; grad_scale undoes a GradScaler-style factor exactly."""
    x, y = data(16)
    path = tmp_path / "m.csv"

    def run(mom, nesterov, scale, append=False):
        model = mlp()
        mon = NoiseMonitor(model, criterion=CE, every=1, curvature_every=1, csv_path=path,
                           lanczos_iters=20, momentum=mom, nesterov=nesterov,
                           hessian_micro_batch=4, csv_append=append)
        for xb, yb in zip(x.chunk(4), y.chunk(4), strict=True):
            (scale * CE(model(xb), yb) / 4).backward()
            mon.after_backward()
        rec = mon.step(lr=0.1, inputs=x, targets=y, grad_scale=scale)
        mon.close()
        return rec

    plain = run(0.0, False, 1.0)
    heavy = run(0.9, False, 1.0)
    nest = run(0.9, True, 1024.0, append=True)
    lam = plain["lambda_max"]
    assert plain["gd_limit"] == pytest.approx(2 / lam, rel=1e-12)
    assert heavy["gd_limit"] == pytest.approx(2 * 1.9 / lam, rel=1e-12)
    assert nest["gd_limit"] == pytest.approx(2 * 1.9 / (2.8 * lam), rel=1e-12)
    assert heavy["lr_over_eps_opt"] == pytest.approx(10 * plain["lr_over_eps_opt"], rel=1e-9)
    assert nest["grad_sq"] == pytest.approx(plain["grad_sq"], rel=1e-9)
    assert nest["tr_sigma"] == pytest.approx(plain["tr_sigma"], rel=1e-9)
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [0, 0]  # restarted by the 2nd run, appended by 3rd
