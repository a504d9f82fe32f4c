"""validate.measure's fast paths and hardening, against brute force.

Vectorised unit gradients (layer hooks, vmap) vs one backward pass per example or micro-batch;
batched Hessian products vs one at a time and vs full Hessians; the Lanczos warm start;
summed losses, unresolved estimates, overflowing gradients, NumPy integers and losses linear
in a parameter (issue 13 items 7, 8, 9, 12)."""

import copy
import json
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from linear_models import LinearInExtra, linear_extra_loss  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from sgdtheory import krylov  # noqa: E402
from validate import _noise, measure  # noqa: E402
from validate.measure import (  # noqa: E402
    HessianOperator,
    NoiseMonitor,
    gradient_noise,
    hessian_noise,
    hessian_trace,
    top_hessian_eigenvalue,
)

torch.set_num_threads(1)
DT = torch.float64
CE = nn.CrossEntropyLoss()


def loop_grads(model, criterion, x, y, size=1):
    """Mean gradients of consecutive chunks of ``size`` examples, one backward pass each."""
    m = copy.deepcopy(model)
    out = []
    for s in range(0, x.shape[0], size):
        m.zero_grad()
        criterion(m(x[s:s + size]), y[s:s + size]).backward()
        out.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in m.parameters() if p.requires_grad]).clone())
    return torch.stack(out)


def full_hessian(model, criterion, x, y):
    """∇²L over the flat trainable parameters by torch.autograd.functional.hessian."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(t):
        params, i = {}, 0
        for k, p in named:
            params[k] = t[i:i + p.numel()].view_as(p)
            i += p.numel()
        return criterion(functional_call(model, (params, buffers), (x,)), y)

    return torch.autograd.functional.hessian(f, theta)


# --------------------------------------------------------------------------- models per path


class SeqLinear(nn.Module):
    """Linear on (n, T, d) sequences, a Conv1d, and a weight used twice (tied)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(3, 4, 3, padding=1, stride=1)
        self.tied = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.to(DT)

    def forward(self, x):  # x (n, 3, T)
        h = torch.tanh(self.conv(x)).transpose(1, 2)  # (n, T, 4)
        h = torch.tanh(self.tied(torch.tanh(self.tied(h))))
        return self.head(h).mean(1)


class ConvZoo(nn.Module):
    """Conv2d with groups, stride, dilation and bias; BatchNorm in eval; ReLU(inplace)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.c1 = nn.Conv2d(2, 4, 3, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False)
        self.head = nn.Linear(6, 3)
        self.to(DT)
        with torch.no_grad():  # non-trivial running statistics
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.act(self.bn(self.c1(x)))
        return self.head(torch.tanh(self.c2(h)).mean((2, 3)))


class Bypass(nn.Module):
    """Uses a Linear's weight outside the Linear's forward: the hooks cannot see it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.fc = nn.Linear(4, 3)
        self.to(DT)

    def forward(self, x):
        return self.fc(x) + nn.functional.linear(torch.tanh(x[:, :3]), self.fc.weight.T[:3, :3])


CASES = [
    (SeqLinear, (3, 5)),
    (lambda: ConvZoo().eval(), (2, 7, 7)),
]


@pytest.mark.parametrize("make,shape", CASES)
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("per_call", [None, 1, 5])
def test_hook_path_matches_explicit_loop(make, shape, b, per_call, monkeypatch):
    """``per_call``: convolution weight gradients of that many units per grouped call (as for
    large layers; 5 leaves a remainder) instead of unfolding these small ones."""
    if per_call is not None:
        monkeypatch.setattr(_noise, "_conv_units_per_call",
                            lambda n, n_units, cols, t, w: min(per_call, n_units))
    model = make()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, *shape, generator=g, dtype=DT)
    y = torch.randint(0, 3, (12,), generator=g)
    before = copy.deepcopy(model.state_dict())
    fn = measure.ModelFunction(model, CE)
    chunk = 2 if per_call is None else None  # (all units in one chunk: 12 = 5 + 5 + 2)
    units = torch.cat([u for _, u in _noise.unit_gradients(fn, x, y, b, chunk_units=chunk)])
    assert _noise._HOOK_OK.get(model) is True  # the hook path ran (and verified itself)
    ref = loop_grads(model, CE, x, y, size=b)
    assert torch.allclose(units, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
    vm = _noise._vmap_unit_grads(fn, x, y, 12 // b)
    assert torch.allclose(vm, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
    for k, v in model.state_dict().items():  # the model is left as it was
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_hook_path_refuses_itself_when_a_weight_bypasses_its_layer():
    model = Bypass()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
    est = gradient_noise(model, CE, x, y, method="per_sample")
    assert _noise._HOOK_OK.get(model) is False  # verification failed: vmap from now on
    ref = loop_grads(model, CE, x, y)
    mean = ref.mean(0)
    tr_sigma = float(((ref - mean) ** 2).sum() / 7)
    assert est.tr_sigma == pytest.approx(tr_sigma, rel=1e-9)


def test_dropout_masks_differ_per_example_in_the_hook_path():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 3)).to(DT).train()
    x = torch.ones(6, 4, dtype=DT)  # identical examples: only dropout makes them differ
    y = torch.zeros(6, dtype=torch.long)
    fn = measure.ModelFunction(model, CE)
    units = torch.cat([u for _, u in _noise.unit_gradients(fn, x, y, 1)])
    assert not torch.allclose(units[0], units[1])


# --------------------------------------------------------------------------- Hessian side


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def data(n, seed=1, d=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def test_matmat_equals_single_products_and_full_hessian():
    model = mlp()
    x, y = data(20)
    op = HessianOperator(model, CE, x, y)
    v = torch.randn(5, op.dim, generator=torch.Generator().manual_seed(6), dtype=DT)
    hv = op.matmat(v, chunk=2)
    single = torch.stack([op(r) for r in v])
    hess = full_hessian(model, CE, x, y)
    assert torch.allclose(hv, single, rtol=1e-12, atol=1e-14)
    assert torch.allclose(hv, v @ hess, rtol=1e-10, atol=1e-12)
    assert op.calls == 10


def test_hutchinson_batched_matches_sequential_probes():
    model = mlp(1)
    x, y = data(16, seed=2)
    op = HessianOperator(model, CE, x, y)
    ref = krylov.hutchinson_trace(op, op.dim, 40, seed=3, like=op.like)
    est = hessian_trace(model, CE, x, y, n_samples=40, seed=3)
    assert est == pytest.approx(ref, rel=1e-10)
    exact = float(torch.trace(full_hessian(model, CE, x, y)))
    assert abs(est[0] - exact) <= 4 * est[1]


def test_lanczos_warm_start_and_returned_vector():
    model = mlp(2)
    x, y = data(30, seed=4)
    hess = full_hessian(model, CE, x, y)
    evals, evecs = np.linalg.eigh(hess.numpy())
    lam, vec = top_hessian_eigenvalue(model, CE, x, y, tol=1e-10, max_iter=200,
                                      return_vector=True)
    assert lam == pytest.approx(evals[-1], rel=1e-8)
    assert float(torch.linalg.vector_norm(hess @ vec - lam * vec)) <= 1e-6 * abs(lam)
    # from the eigenvector, two products suffice; from a random start they do not
    with warnings.catch_warnings():
        warnings.simplefilter("error", krylov.KrylovConvergenceWarning)
        warm = top_hessian_eigenvalue(model, CE, x, y, tol=1e-6, max_iter=2,
                                      v0=torch.as_tensor(evecs[:, -1]))
    assert warm == pytest.approx(evals[-1], rel=1e-9)
    with pytest.warns(krylov.KrylovConvergenceWarning, match="Lanczos stopped after 2"):
        top_hessian_eigenvalue(model, CE, x, y, tol=1e-6, max_iter=2, seed=0)
    change = top_hessian_eigenvalue(model, CE, x, y, tol=1e-9, max_iter=200, stop="change")
    assert change == pytest.approx(evals[-1], rel=1e-6)
    with pytest.raises(ValueError, match="v0"):
        top_hessian_eigenvalue(model, CE, x, y, v0=torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="v0"):
        top_hessian_eigenvalue(model, CE, x, y, k=2, v0=vec)


# --------------------------------------------------------------------------- issue 13 items


def test_summed_plain_callable_is_refused_and_mean_callable_accepted():
    """Item 7: a plain callable that sums used to give |G|², tr(Σ) × b² in micro-batch mode."""
    model = mlp()
    x, y = data(16)

    def summed(out, t):
        return nn.functional.cross_entropy(out, t, reduction="sum")

    def averaged(out, t):
        return nn.functional.cross_entropy(out, t)

    def not_per_example(out, t):  # a batch statistic: neither mean nor sum of halves
        return nn.functional.cross_entropy(out, t) * out.shape[0] ** 0.5

    for fn in (lambda c: gradient_noise(model, c, x, y, micro_batch=4),
               lambda c: gradient_noise(model, c, x, y, method="per_sample"),
               lambda c: hessian_noise(model, c, x, y, micro_batch=2),
               lambda c: top_hessian_eigenvalue(model, c, x, y, max_iter=5),
               lambda c: hessian_trace(model, c, x, y, n_samples=2)):
        with pytest.raises(ValueError, match="sums the per-example losses"):
            fn(summed)
        with pytest.raises(ValueError, match="not a mean of per-example losses"):
            fn(not_per_example)
    a = gradient_noise(model, averaged, x, y, micro_batch=4)
    b = gradient_noise(model, CE, x, y, micro_batch=4)
    assert a.grad_sq == pytest.approx(b.grad_sq, rel=1e-12)


def concave(out, t):
    """A mean loss with negative curvature everywhere: GᵀHG < 0."""
    return -((out - t) ** 2).mean()


def test_unresolved_curvature_is_flagged_with_reason_not_bare_nan():
    """Item 8: GᵀHG ≤ 0 gave eps_max/B_noise nan with nothing saying why."""
    torch.manual_seed(7)
    model = nn.Linear(3, 1).to(DT)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(64, 3, generator=g, dtype=DT)
    t = torch.randn(64, 1, generator=g, dtype=DT)
    h = hessian_noise(model, concave, x, t, micro_batch=4)
    assert h.g_h_g < 0 and h.resolved is False
    assert "GᵀHG" in h.reason and "±" in h.reason and "not resolved" in h.reason
    assert "not resolved" in h.summary()
    d = h.as_dict()
    json.dumps(d, allow_nan=False)  # strict JSON
    assert d["eps_max"] is None and d["reason"] == h.reason
    xg, _ = data(512, seed=9)
    yg = (xg @ torch.randn(4, 3, generator=g, dtype=DT)).argmax(1)  # a teacher: |G| sizeable
    good = hessian_noise(mlp(), CE, xg, yg, micro_batch=16)
    assert good.resolved and good.reason == "" and "B_noise" in good.summary()
    # gradient side: |G|² at a minimum of a least-squares fit is ≈ 0 within its error
    lin = nn.Linear(3, 1, bias=False).to(DT)
    w = torch.linalg.lstsq(x, t).solution
    with torch.no_grad():
        lin.weight.copy_(w.T)
    est = gradient_noise(lin, nn.MSELoss(), x, t)
    assert est.resolved is False and "|G|²" in est.reason
    json.dumps(est.as_dict(), allow_nan=False)


def test_monitor_reports_unresolved_curvature_with_reason(tmp_path):
    torch.manual_seed(9)
    model = nn.Linear(3, 1).to(DT)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(32, 3, generator=g, dtype=DT)
    t = torch.randn(32, 1, generator=g, dtype=DT)
    mon = NoiseMonitor(model, criterion=concave, every=1, curvature_every=1, lanczos_iters=3,
                       hessian_micro_batch=4, csv_path=tmp_path / "m.csv")
    with pytest.warns(UserWarning, match="not resolved"):
        for _ in range(3):
            model.zero_grad()
            for xb, tb in zip(x.chunk(4), t.chunk(4), strict=True):
                (concave(model(xb), tb) / 4).backward()
                mon.after_backward()
            rec = mon.step(lr=0.01, inputs=x, targets=t)
    mon.close()
    assert rec["resolved"] is False and "GᵀHG (EMA)" in rec["reason"]
    assert all(not math.isinf(v) for v in rec.values() if isinstance(v, float))


def test_overflowing_gradients_are_scaled_or_refused():
    """Item 9: float32 gradients of 1e20 (squares overflow float32) are computed in scaled
    form; float64 gradients whose squares overflow float64 are refused with a reason."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)

    def big(out, t):
        return 1e20 * nn.functional.cross_entropy(out, t)

    est = gradient_noise(model, big, x, y, method="per_sample")
    ref = gradient_noise(copy.deepcopy(model).double(), CE, x.double(), y, method="per_sample")
    assert est.tr_sigma == pytest.approx(1e40 * ref.tr_sigma, rel=1e-4)
    assert est.grad_sq == pytest.approx(1e40 * ref.grad_sq, rel=1e-3, abs=1e-3 * est.tr_sigma)
    est = gradient_noise(model, big, x, y, micro_batch=4)
    assert math.isfinite(est.b_simple) or not est.resolved

    def huge(out, t):
        return 1e200 * nn.functional.cross_entropy(out, t)

    with pytest.raises(ValueError, match="overflow"):
        gradient_noise(model.double(), huge, x.double(), y)


def test_numpy_integers_accepted():
    """Item 12: np.int64 micro_batch / n_groups / every / batch_size were refused."""
    model = mlp()
    x, y = data(16)
    a = gradient_noise(model, CE, x, y, micro_batch=np.int64(4), n_groups=np.int64(4))
    b = gradient_noise(model, CE, x, y, micro_batch=4, n_groups=4)
    assert a == b
    assert repr(hessian_noise(model, CE, x, y, micro_batch=np.int32(2))) == repr(
        hessian_noise(model, CE, x, y, micro_batch=2))
    mon = NoiseMonitor(model, criterion=CE, every=np.int64(1))
    model.zero_grad()
    CE(model(x), y).backward()
    assert mon.step(lr=0.1, inputs=x, targets=y, batch_size=np.int64(16))["batch"] == 16
    for bad in (True, 2.0, "4"):
        with pytest.raises(ValueError, match="micro_batch"):
            gradient_noise(model, CE, x, y, micro_batch=bad)


def test_loss_linear_in_a_parameter_has_zero_second_derivative_there():
    """Item 12: hessian_noise, top_hessian_eigenvalue and hessian_trace crashed (autograd
    error) when the loss is linear in some parameter."""
    model = LinearInExtra()
    x, y = data(24, seed=14)
    hess = full_hessian(model, linear_extra_loss, x, y)
    assert float(hess[0].abs().max()) == 0.0  # extra (registered first): a zero row
    lam = top_hessian_eigenvalue(model, linear_extra_loss, x, y, tol=1e-10, max_iter=200)
    assert lam == pytest.approx(float(np.linalg.eigvalsh(hess.numpy())[-1]), rel=1e-7)
    est, se = hessian_trace(model, linear_extra_loss, x, y, n_samples=50, seed=1)
    assert abs(est - float(torch.trace(hess))) <= 4 * se + 1e-12
    h = hessian_noise(model, linear_extra_loss, x, y, micro_batch=3)
    units = loop_grads(model, linear_extra_loss, x[:12], y[:12], size=3)
    hh = full_hessian(model, linear_extra_loss, x[12:], y[12:])
    small = float(torch.einsum("kp,pq,kq->k", units, hh, units).mean())
    gbar = units.mean(0)
    ghg = (12 * float(gbar @ hh @ gbar) - 3 * small) / 9
    assert h.g_h_g == pytest.approx(ghg, rel=1e-8)
    # a model without any second derivative: H = 0
    lin = nn.Linear(4, 1).to(DT)
    op = HessianOperator(lin, lambda o, t: o.mean(), x, y)
    assert float(op(torch.ones(op.dim, dtype=DT)).abs().max()) == 0.0
