"""NoiseMonitor.backward: on measured steps p.grad equals one backward and the record is the
two-batch one of explicit per-micro-batch gradients — from one pass (per-layer products,
measure.split_backward) where the model allows it, else by M backward passes; other steps do
one backward."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from validate.measure import NoiseMonitor, split_backward  # noqa: E402

CE = nn.CrossEntropyLoss()


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def bn_mlp(seed=0):
    """BatchNorm in training mode: micro-batch gradients need one pass per micro-batch."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(),
                         nn.Linear(6, 3)).double().train()


class Tied(nn.Module):
    """A weight also used outside its layer: the per-layer products miss that use (their sum
    disagrees with autograd's gradient), so the split into M passes is used."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)
        self.double()

    def forward(self, x):
        return self.fc(x) + torch.tanh(x[:, :3]) @ self.fc.weight[:, :3].T


MODELS = {"one pass": mlp, "BatchNorm": bn_mlp, "tied": Tied}


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
@pytest.mark.parametrize("kind", list(MODELS))
def test_split_backward_equals_one_backward_and_two_batch_record(m, kind):
    model, (x, y) = MODELS[kind](), data(32)
    calls = []

    def loss_fn(xb, yb):
        calls.append(xb.shape[0])
        return CE(model(xb), yb)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    mon = NoiseMonitor(model, criterion=CE, every=1)
    loss = mon.backward(loss_fn, x, y, micro_batches=m)
    split_calls = [32 // int(m)] * int(m)
    # tied: the one-pass attempt runs once, fails its check, and is not tried again
    assert calls == {"one pass": [32], "BatchNorm": split_calls, "tied": [32] + split_calls}[kind]
    split = flat_grad(model)
    rec = mon.step(lr=0.1, batch_size=32)
    model.load_state_dict(state)  # (BatchNorm's running statistics as before)
    model.zero_grad()
    if kind == "BatchNorm":  # the reference: accumulated micro-batch backward passes
        full = sum(CE(model(xb), yb) / int(m) for xb, yb in zip(x.chunk(int(m)),
                                                                y.chunk(int(m)), strict=True))
    else:
        full = CE(model(x), y)
    full.backward()
    assert torch.allclose(split, flat_grad(model), rtol=1e-12, atol=1e-14)
    assert float(loss) == pytest.approx(float(full.detach()), rel=1e-12)
    # two-batch formula on explicit micro-batch gradients: E|g_k|² = |G|² + tr(Σ)/b
    model.load_state_dict(state)
    g = micro_grads(model, x, y, int(m))
    b, big_b = 32 // int(m), 32
    small = float((g * g).sum(1).mean())
    big = float(g.mean(0).dot(g.mean(0)))
    tr_sigma = (small - big) / (1 / b - 1 / big_b)
    grad_sq = big - tr_sigma / big_b
    assert rec["micro_batches"] == int(m)
    assert rec["tr_sigma"] == pytest.approx(tr_sigma, rel=1e-9)
    assert rec["grad_sq"] == pytest.approx(grad_sq, rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("kind", ["one pass", "BatchNorm"])
def test_unmeasured_steps_do_one_backward(kind):
    model, (x, y) = MODELS[kind](), data(16)
    calls = []

    def loss_fn(xb, yb):
        calls.append(xb.shape[0])
        return CE(model(xb), yb)

    mon = NoiseMonitor(model, criterion=CE, every=3)
    for _ in range(6):
        model.zero_grad()
        mon.backward(loss_fn, x, y, micro_batches=4)
        mon.step(lr=0.1, batch_size=16)
    # steps 0 and 3 measured (one call of 16, or 4 micro-batches of 4), the others one of 16
    measured = [16] if kind == "one pass" else [4, 4, 4, 4]
    assert calls == measured + [16, 16] + measured + [16, 16]
    assert [r["step"] for r in mon.records] == [0, 3]


def test_split_backward_increments_and_grad_accumulation():
    """The increments are ∇L_k/M of explicit micro-batch passes; ∇L is added to p.grad as
    backward() adds it; None (nothing touched) where the per-layer products do not apply."""
    model, (x, y) = mlp(), data(24)
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # accumulates onto what is there
    loss, inc = split_backward(model, model.parameters(), lambda a, b: CE(model(a), b), x, y, 3)
    ref = micro_grads(model, x, y, 3) / 3
    assert torch.allclose(inc, ref, rtol=1e-10, atol=1e-14)
    assert torch.allclose(flat_grad(model) - 1.0, ref.sum(0), rtol=1e-10, atol=1e-14)
    assert float(loss) == pytest.approx(float(CE(model(x), y)), rel=1e-12)
    for make in (bn_mlp, Tied):
        other = make()
        assert split_backward(other, other.parameters(), lambda a, b, o=other: CE(o(a), b),
                              x, y, 3) is None
        assert all(p.grad is None for p in other.parameters())


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


@pytest.mark.parametrize(("args", "match"), [
    (dict(n_units=0), "n_units"), (dict(n_units=5), "split into n_units=5"),
    (dict(n_units=2.0), "n_units"), (dict(model="net"), "torch.nn.Module")])
def test_split_backward_bad_input(args, match):
    model, (x, y) = mlp(), data(16)
    kw = {"model": model, "n_units": 4} | args
    with pytest.raises((ValueError, TypeError), match=match):
        split_backward(kw["model"], model.parameters(), lambda a, b: CE(model(a), b), x, y,
                       kw["n_units"])
    assert all(p.grad is None for p in model.parameters())
