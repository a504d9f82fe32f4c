"""distributed_gradient_noise with two gloo processes on CPU equals the single-process
micro-batch estimate on the same split (each rank's shard = one micro-batch)."""

import datetime
import json
import os
import socket

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from validate.measure import (  # noqa: E402
    DDPNoiseHook,
    distributed_gradient_noise,
    gradient_noise,
)

WORLD, LOCAL = 2, 6


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * LOCAL, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (WORLD * LOCAL,), generator=g)
    return model, x, y


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
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
        # DistributedDataParallel: the comm hook records |g_k|^2 before the all-reduce
        model2, _, _ = _setup()
        ddp = nn.parallel.DistributedDataParallel(model2)
        hook = DDPNoiseHook()
        ddp.register_comm_hook(None, hook)
        nn.CrossEntropyLoss()(ddp(x[sl]), y[sl]).backward()
        averaged = torch.cat([p.grad.reshape(-1) for p in model2.parameters()])
        est3 = distributed_gradient_noise(hook.pop(), LOCAL, global_grad=averaged)
        res = (est.grad_sq, est.tr_sigma, est.batch, est2.grad_sq, est2.tr_sigma, bad,
                     est3.grad_sq, est3.tr_sigma, float((averaged - glob / WORLD).abs().max()))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(res, fh)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_estimate_equals_single_process(tmp_path):
    # spawn, not fork: forking a pytest(-xdist) worker whose torch/OpenMP thread pools are
    # already running can deadlock the child
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    out = {}
    for rank in range(WORLD):
        with open(tmp_path / f"rank{rank}.json") as fh:
            out[rank] = json.load(fh)
    model, x, y = _setup()
    ref = gradient_noise(model, nn.CrossEntropyLoss(), x, y, micro_batch=LOCAL)
    for rank in range(WORLD):
        gs, ts, batch, gs2, ts2, bad, gs3, ts3, diff = out[rank]
        assert batch == WORLD * LOCAL
        assert gs == pytest.approx(ref.grad_sq, rel=1e-10, abs=1e-14)
        assert ts == pytest.approx(ref.tr_sigma, rel=1e-10)
        assert gs2 == pytest.approx(ref.grad_sq, rel=1e-10, abs=1e-14)
        assert ts2 == pytest.approx(ref.tr_sigma, rel=1e-10)
        assert bad is not None and "local_batch" in bad
        assert diff < 1e-12  # DDP averaged the same gradients
        assert gs3 == pytest.approx(ref.grad_sq, rel=1e-10, abs=1e-14)
        assert ts3 == pytest.approx(ref.tr_sigma, rel=1e-10)


def test_requires_initialised_process_group():
    with pytest.raises(ValueError, match="not initialised"):
        distributed_gradient_noise(torch.zeros(3), 4)
