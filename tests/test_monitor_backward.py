"""NoiseMonitor.backward: the split backward of measured steps equals one backward (p.grad) and
gives the two-batch record of explicit per-micro-batch gradients; other steps do one backward."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from validate.measure import NoiseMonitor  # noqa: E402

CE = nn.CrossEntropyLoss()


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def micro_grads(model, x, y, m):
    """Each micro-batch's mean-loss gradient by its own autograd call (the reference)."""
    out = []
    for xb, yb in zip(x.chunk(m), y.chunk(m), strict=True):
        g = torch.autograd.grad(CE(model(xb), yb), list(model.parameters()))
        out.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(out)


@pytest.mark.parametrize("m", [2, 4, np.int64(8)])
def test_split_backward_equals_one_backward_and_two_batch_record(m):
    model, (x, y) = mlp(), data(32)
    loss_fn = lambda xb, yb: CE(model(xb), yb)
    mon = NoiseMonitor(model, criterion=CE, every=1)
    loss = mon.backward(loss_fn, x, y, micro_batches=m)
    split = flat_grad(model)
    rec = mon.step(lr=0.1, batch_size=32)
    model.zero_grad()
    full = CE(model(x), y)
    full.backward()
    assert torch.allclose(split, flat_grad(model), rtol=1e-12, atol=1e-14)
    assert float(loss) == pytest.approx(float(full.detach()), rel=1e-12)
    # two-batch formula on explicit micro-batch gradients: E|g_k|² = |G|² + tr(Σ)/b
    g = micro_grads(model, x, y, int(m))
    b, big_b = 32 // int(m), 32
    small = float((g * g).sum(1).mean())
    big = float(g.mean(0).dot(g.mean(0)))
    tr_sigma = (small - big) / (1 / b - 1 / big_b)
    grad_sq = big - tr_sigma / big_b
    assert rec["micro_batches"] == int(m)
    assert rec["tr_sigma"] == pytest.approx(tr_sigma, rel=1e-9)
    assert rec["grad_sq"] == pytest.approx(grad_sq, rel=1e-9, abs=1e-14)


def test_unmeasured_steps_do_one_backward():
    model, (x, y) = mlp(), data(16)
    calls = []

    def loss_fn(xb, yb):
        calls.append(xb.shape[0])
        return CE(model(xb), yb)

    mon = NoiseMonitor(model, criterion=CE, every=3)
    for _ in range(6):
        model.zero_grad()
        mon.backward(loss_fn, x, y, micro_batches=4)
        mon.step(lr=0.1, batch_size=16)
    # steps 0 and 3 measured (4 micro-batches of 4), the other four one call of 16
    assert calls == [4, 4, 4, 4, 16, 16, 4, 4, 4, 4, 16, 16]
    assert [r["step"] for r in mon.records] == [0, 3]


@pytest.mark.parametrize(("kw", "match"), [
    (dict(micro_batches=1), "micro_batches"),
    (dict(micro_batches=True), "micro_batches"),
    (dict(micro_batches=2.0), "micro_batches"),
    (dict(micro_batches=3), "split into micro_batches=3"),
])
def test_backward_bad_input(kw, match):
    model, (x, y) = mlp(), data(16)
    mon = NoiseMonitor(model, criterion=CE, every=1)
    with pytest.raises((ValueError, TypeError), match=match):
        mon.backward(lambda xb, yb: CE(model(xb), yb), x, y, **kw)


def test_backward_needs_mean_accumulation():
    model, (x, y) = mlp(), data(16)
    mon = NoiseMonitor(model, criterion=CE, every=1, accumulation="sum")
    with pytest.raises(ValueError, match="accumulation='mean'"):
        mon.backward(lambda xb, yb: CE(model(xb), yb), x, y)
