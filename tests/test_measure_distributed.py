"""distributed_gradient_noise with two gloo processes on CPU equals the single-process
micro-batch estimate on the same split (each rank's shard = one micro-batch)."""

import socket

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from validate.measure import distributed_gradient_noise, gradient_noise  # noqa: E402

WORLD, LOCAL = 2, 6


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * LOCAL, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (WORLD * LOCAL,), generator=g)
    return model, x, y


def _worker(rank, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        model, x, y = _setup()
        sl = slice(rank * LOCAL, (rank + 1) * LOCAL)
        nn.CrossEntropyLoss()(model(x[sl]), y[sl]).backward()
        local = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        est = distributed_gradient_noise(local, LOCAL)
        glob = local.clone()
        dist.all_reduce(glob)
        est2 = distributed_gradient_noise(local, LOCAL, global_grad=glob / WORLD)
        bad = None
        try:
            distributed_gradient_noise(local, LOCAL + rank)
        except ValueError as exc:
            bad = str(exc)
        out[rank] = (est.grad_sq, est.tr_sigma, est.batch, est2.grad_sq, est2.tr_sigma, bad)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_estimate_equals_single_process():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    model, x, y = _setup()
    ref = gradient_noise(model, nn.CrossEntropyLoss(), x, y, micro_batch=LOCAL)
    for rank in range(WORLD):
        gs, ts, batch, gs2, ts2, bad = out[rank]
        assert batch == WORLD * LOCAL
        assert gs == pytest.approx(ref.grad_sq, rel=1e-10, abs=1e-14)
        assert ts == pytest.approx(ref.tr_sigma, rel=1e-10)
        assert gs2 == pytest.approx(ref.grad_sq, rel=1e-10, abs=1e-14)
        assert ts2 == pytest.approx(ref.tr_sigma, rel=1e-10)
        assert bad is not None and "local_batch" in bad


def test_requires_initialised_process_group():
    with pytest.raises(ValueError, match="not initialised"):
        distributed_gradient_noise(torch.zeros(3), 4)
