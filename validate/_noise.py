r"""Gradient noise |G|², tr(Σ), B_simple of a PyTorch network (McCandlish et al. 2018, App. A).

Units: the loss L is the *mean* of per-example losses (``criterion.reduction == 'mean'``);
G = ∇L (loss/param units), Σ = covariance of per-example gradients with the 1/N normalisation,
|G|² and tr(Σ) in (loss/param)², B_simple = tr(Σ)/|G|² in examples.

Both modes are the two-batch estimator of :func:`sgdtheory.estimators.two_batch` applied to M
"units" of b examples each (b = 1: per-sample gradients; b > 1: micro-batches): with the unit
mean gradients g_k and ḡ = (1/M) Σ_k g_k (the gradient of the whole batch of B = M b),

    E[(1/M) Σ_k |g_k|²] = |G|² + tr(Σ)/b,      E[|ḡ|²] = |G|² + tr(Σ)/B,

which two equations give unbiased |G|² and tr(Σ). Standard errors come from a delete-a-group
jackknife over the units (also for the ratio B_simple).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import grad, vmap

from ._common import (
    ModelFunction,
    check_batch,
    check_micro_batch,
    default_micro_batch,
    has_training_batchnorm,
)

__all__ = [
    "DDPNoiseHook",
    "GradientNoise",
    "distributed_gradient_noise",
    "gradient_noise",
    "unit_statistics",
]

_MAX_UNITS = 64  # default largest number of micro-batches


@dataclass(frozen=True)
class GradientNoise:
    """Unbiased |G|², tr(Σ) and B_simple = tr(Σ)/|G|², with jackknife standard errors.

    Attributes:
        grad_sq: |G|², squared norm of the mean-loss gradient ((loss/param)²).
        tr_sigma: tr(Σ), total per-example gradient variance ((loss/param)², 1/N normalised).
        b_simple: tr(Σ)/|G|² in examples (nan when the |G|² estimate is not positive).
        grad_sq_stderr, tr_sigma_stderr, b_simple_stderr: jackknife standard errors
            (nan when fewer than 3 units).
        method: ``'per_sample'``, ``'micro_batch'`` or ``'distributed'``.
        batch: B, examples in the measured batch (the "big" batch).
        micro_batch: b, examples per unit (1 for per-sample gradients; the local batch per rank
            in data-parallel mode).
    """

    grad_sq: float
    tr_sigma: float
    b_simple: float
    grad_sq_stderr: float
    tr_sigma_stderr: float
    b_simple_stderr: float
    method: str
    batch: int
    micro_batch: int


# --------------------------------------------------------------------------- jackknife core


def _ratio(num, den):
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where((den > 0) & (num >= 0), num / np.where(den > 0, den, 1.0), np.nan)
    return out


def _jackknife_se(leave_out: np.ndarray) -> float:
    """Delete-a-group jackknife standard error sqrt((m−1)/m Σ_j (θ_(j) − θ̄)²)."""
    m = leave_out.shape[0]
    if m < 2 or not np.all(np.isfinite(leave_out)):
        return float("nan")
    return float(np.sqrt((m - 1) / m * np.sum((leave_out - leave_out.mean()) ** 2)))


def unit_statistics(total_sq, cross, self_sq, q, counts, b_small: int, combine):
    r"""Two-batch estimates and their leave-one-group-out values from inner products.

    The M units (mean gradients g_k of b examples each) are grouped into m groups j with
    sums S_j = Σ_{k∈j} g_k. With an inner product ⟨·,·⟩ (the Euclidean one, or uᵀHv):

    Args:
        total_sq: ⟨S, S⟩ with S = Σ_k g_k.
        cross: (m,) ⟨S, S_j⟩.
        self_sq: (m,) ⟨S_j, S_j⟩.
        q: (m,) Σ_{k∈j} ⟨g_k, g_k⟩.
        counts: (m,) number of units per group.
        b_small: b, examples per unit.
        combine: ``two_batch`` or ``two_batch_curvature`` (small mean, big, b_small, b_big).

    Returns:
        (point, leave_out): point a pair of floats; leave_out an (m, 2) array, or None when a
        left-out estimate would have fewer than 2 units.
    """
    counts = np.asarray(counts, dtype=float)
    q = np.asarray(q, dtype=float)
    n_units = counts.sum()
    small = q.sum() / n_units
    big = total_sq / n_units**2
    point = tuple(float(v) for v in combine(small, big, b_small, int(n_units) * b_small))
    rest = n_units - counts
    if counts.shape[0] < 3 or rest.min() < 2:
        return point, None
    out = np.empty((counts.shape[0], 2))
    for j in range(counts.shape[0]):
        small_j = (q.sum() - q[j]) / rest[j]
        big_j = (total_sq - 2.0 * cross[j] + self_sq[j]) / rest[j] ** 2
        out[j] = combine(float(small_j), float(big_j), b_small, int(rest[j]) * b_small)
    return point, out


def _gram_statistics(sums: torch.Tensor, q: torch.Tensor, counts):
    """(total, cross, self, q) from group sums (m, p) and per-group Σ|g_k|²."""
    s = sums.double() if sums.numel() <= 2**25 else sums
    gram = (s @ s.T).double().cpu().numpy()
    return gram.sum(), gram.sum(1), np.diag(gram).copy(), q.double().cpu().numpy()


def _noise_result(point, leave_out, method, batch, micro_batch) -> GradientNoise:
    grad_sq, tr_sigma = point
    b_simple = float(_ratio(tr_sigma, grad_sq))
    if leave_out is None:
        errs = (float("nan"),) * 3
    else:
        errs = (
            _jackknife_se(leave_out[:, 0]),
            _jackknife_se(leave_out[:, 1]),
            _jackknife_se(_ratio(leave_out[:, 1], leave_out[:, 0])),
        )
    return GradientNoise(grad_sq, tr_sigma, b_simple, *errs, method, batch, micro_batch)


# --------------------------------------------------------------------------- unit gradients


class _GroupSums:
    """Streams unit gradients (k, p) into m contiguous group sums and Σ|g_k|² per group."""

    def __init__(self, n_units: int, numel: int, dtype, device, n_groups: int):
        self.m = min(n_units, n_groups)
        self.n_units = n_units
        self.sums = torch.zeros(self.m, numel, dtype=dtype, device=device)
        self.q = torch.zeros(self.m, dtype=torch.float64, device=device)
        self.group_of = torch.arange(n_units, device=device) * self.m // n_units
        self.counts = torch.bincount(self.group_of, minlength=self.m).cpu().numpy()

    def add(self, grads: torch.Tensor, start: int) -> None:
        idx = self.group_of[start : start + grads.shape[0]]
        self.sums.index_add_(0, idx, grads)
        self.q.index_add_(0, idx, (grads.double() ** 2).sum(1))


def per_sample_gradients(fn: ModelFunction, x, y, *, randomness: str = "different"):
    """Per-example gradients ∇ℓ_i as a (k, p) tensor, by ``vmap(grad(ℓ))`` (torch.func)."""
    params = tuple(p.detach() for p in fn.params)
    g = vmap(grad(fn.example_loss), in_dims=(None, 0, 0), randomness=randomness)(params, x, y)
    return fn.flatten(g, batch_dims=1)


def micro_batch_gradients(fn: ModelFunction, x, y, micro_batch: int):
    """Yield the mean gradient of each consecutive micro-batch of ``micro_batch`` examples."""
    for start in range(0, x.shape[0], micro_batch):
        sl = slice(start, start + micro_batch)
        yield fn.flat_grad(x[sl], y[sl])


def gradient_noise(
    model: nn.Module,
    criterion,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    method: str = "auto",
    micro_batch: int | None = None,
    chunk_size: int | None = None,
    n_groups: int = 32,
) -> GradientNoise:
    r"""Unbiased |G|², tr(Σ), B_simple on one batch, with standard errors.

    ``per_sample``: per-example gradients g_i by ``torch.func.vmap(grad(ℓ))`` (chunked), then
    tr(Σ) = Σ|g_i − ḡ|²/(n−1) and |G|² = |ḡ|² − tr(Σ)/n (the two-batch formula with b = 1).
    ``micro_batch``: gradients of consecutive micro-batches of b examples (one backward pass
    each, as in gradient accumulation) and their mean as the big-batch gradient,
    |G|² = (B|ḡ|² − b·mean_k|g_k|²)/(B − b), tr(Σ) = (mean_k|g_k|² − |ḡ|²)/(1/b − 1/B).
    ``auto`` picks ``micro_batch`` when the model has a BatchNorm layer in training mode
    (per-example batch statistics do not exist) or ``micro_batch`` is given, else
    ``per_sample``. The model's parameters, gradients and buffers are left unchanged.

    Args:
        model: the network; its trainable parameters (requires_grad) are measured.
        criterion: loss with ``reduction='mean'``.
        inputs, targets: one batch of B examples (leading axis); drawn with replacement for the
            estimates to be unbiased for the population (1/N-normalised Σ of a finite set).
        method: ``'auto'``, ``'per_sample'`` or ``'micro_batch'``.
        micro_batch: b, examples per micro-batch (must divide B into ≥ 2 parts); default: the
            smallest divisor giving at most 64 micro-batches (≥ 2 examples with BatchNorm).
        chunk_size: examples per ``vmap`` call in per-sample mode (memory bound); default
            keeps a chunk of per-example gradients under 2**25 numbers.
        n_groups: the units are summed into this many contiguous groups for the delete-a-group
            jackknife (memory: n_groups × p numbers; ≥ 3 for a standard error).

    Returns:
        :class:`GradientNoise` (floats).

    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    >>> est = gradient_noise(model, nn.CrossEntropyLoss(), x, y)
    >>> est.method, est.batch, est.tr_sigma > 0
    ('per_sample', 32, True)
    >>> gradient_noise(model, nn.CrossEntropyLoss(), x, y, micro_batch=8).method
    'micro_batch'
    """
    fn = ModelFunction(model, criterion)
    n = check_batch(inputs, targets)
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
        raise ValueError(f"n_groups must be a positive integer, got {n_groups!r}")
    if method not in ("auto", "per_sample", "micro_batch"):
        raise ValueError(f"method must be 'auto', 'per_sample' or 'micro_batch', got {method!r}")
    bn = has_training_batchnorm(model)
    if method == "auto":
        method = "micro_batch" if (bn or micro_batch is not None) else "per_sample"
    if method == "per_sample":
        if bn:
            raise ValueError(
                "method='per_sample' needs per-example losses, but the model has BatchNorm in "
                "training mode; use method='micro_batch' (or model.eval())"
            )
        if micro_batch not in (None, 1):
            raise ValueError(f"micro_batch must be None or 1 for per_sample, got {micro_batch}")
        if n < 2:
            raise ValueError(f"per-sample estimates need a batch of at least 2, got {n}")
        if chunk_size is None:
            chunk_size = max(1, min(n, 2**25 // fn.numel))
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        acc = _GroupSums(n, fn.numel, fn.dtype, fn.device, n_groups)
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            acc.add(per_sample_gradients(fn, inputs[sl], targets[sl]), start)
        b = 1
    else:
        if micro_batch is None:
            micro_batch = default_micro_batch(n, max_units=_MAX_UNITS, min_size=2 if bn else 1)
        b = check_micro_batch(micro_batch, n, batch_stats=bn)
        acc = _GroupSums(n // b, fn.numel, fn.dtype, fn.device, n_groups)
        for k, g in enumerate(micro_batch_gradients(fn, inputs, targets, b)):
            acc.add(g.unsqueeze(0), k)
    from sgdtheory.estimators import two_batch

    stats = _gram_statistics(acc.sums, acc.q, acc.counts)
    point, leave_out = unit_statistics(*stats, acc.counts, b, two_batch)
    return _noise_result(point, leave_out, method, n, b)


# --------------------------------------------------------------------------- data parallel


def distributed_gradient_noise(
    local_grad,
    local_batch: int,
    *,
    global_grad: torch.Tensor | None = None,
    group=None,
) -> GradientNoise:
    r"""Data-parallel two-batch estimate: each rank's gradient is a small batch (McCandlish App. A).

    With W ranks, rank k's local mean gradient g_k over b = ``local_batch`` examples is the
    small batch and the all-reduced mean ḡ = (1/W) Σ_k g_k over B = W b examples the big one:

        |G|², tr(Σ) = two_batch(mean_k |g_k|², |ḡ|², b, W b),

    so no backward pass is added: only scalars per rank (|g_k|², g_k·ḡ) are all-gathered, plus
    the all-reduce of the gradient when ``global_grad`` is not supplied. Under
    ``DistributedDataParallel`` (where ``p.grad`` is already averaged and the local gradient is
    gone) pass the local squared norm recorded by :class:`DDPNoiseHook` as ``local_grad`` and
    the averaged gradient as ``global_grad``. Equal to :func:`gradient_noise` in micro-batch
    mode on the concatenated batch split by rank. Call it on every rank (a collective).

    Args:
        local_grad: g_k, this rank's flat mean gradient (p,) (mean-loss units), or its squared
            norm |g_k|² (a float or 0-d tensor; then ``global_grad`` is required and there is
            no jackknife standard error).
        local_batch: b, examples per rank (must be equal on all ranks).
        global_grad: ḡ, the rank-averaged flat gradient (p,), if already computed.
        group: the ``torch.distributed`` process group (default: the world).

    Returns:
        :class:`GradientNoise` with ``method='distributed'``, ``batch`` = W b (the same on all
        ranks; standard errors need W ≥ 3 and the local gradient vector).
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised (call init_process_group first)")
    world = dist.get_world_size(group)
    if world < 2:
        raise ValueError(f"distributed_gradient_noise needs at least 2 ranks, got {world}")
    if isinstance(local_batch, bool) or not isinstance(local_batch, int) or local_batch < 1:
        raise ValueError(f"local_batch must be a positive integer, got {local_batch!r}")
    norm_only = not (isinstance(local_grad, torch.Tensor) and local_grad.ndim == 1)
    if norm_only:
        if global_grad is None:
            raise ValueError("global_grad is required when local_grad is a squared norm")
        if isinstance(local_grad, torch.Tensor) and local_grad.ndim > 1:
            raise ValueError("local_grad must be a flat 1-D tensor or a squared norm")
        local_sq = float(local_grad)
        if not math.isfinite(local_sq) or local_sq < 0:
            raise ValueError(f"local_grad (a squared norm) must be finite and >= 0, got {local_sq}")
    elif not bool(torch.isfinite(local_grad).all()):
        raise ValueError("local_grad must be finite")
    ref = global_grad if norm_only else local_grad
    if not isinstance(ref, torch.Tensor) or ref.ndim != 1:
        raise ValueError("global_grad must be a flat 1-D tensor of the trainable parameters")
    dev = ref.device
    sizes = [torch.zeros(2, dtype=torch.float64, device=dev) for _ in range(world)]
    mine = torch.tensor([local_batch, ref.numel()], dtype=torch.float64, device=dev)
    dist.all_gather(sizes, mine, group=group)
    sizes = torch.stack(sizes).cpu().numpy()
    if np.any(sizes[:, 0] != local_batch):
        raise ValueError(f"local_batch must be equal on all ranks, got {sizes[:, 0].tolist()}")
    if np.any(sizes[:, 1] != ref.numel()):
        raise ValueError(f"gradients must have the same length on all ranks, got {sizes[:, 1]}")
    if global_grad is None:
        global_grad = local_grad.clone()
        dist.all_reduce(global_grad, op=dist.ReduceOp.SUM, group=group)
        global_grad /= world
    elif not norm_only and global_grad.shape != local_grad.shape:
        raise ValueError(
            f"global_grad shape {tuple(global_grad.shape)} must match local_grad "
            f"{tuple(local_grad.shape)}"
        )
    gg = global_grad.double()
    if norm_only:
        mine = torch.tensor([local_sq, math.nan], dtype=torch.float64, device=dev)
    else:
        lg = local_grad.double()
        mine = torch.stack([lg @ lg, lg @ gg])
    parts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    parts = torch.stack(parts).cpu().numpy()
    total_sq = world**2 * float(gg @ gg)
    from sgdtheory.estimators import two_batch

    point, leave_out = unit_statistics(
        total_sq, world * parts[:, 1], parts[:, 0], parts[:, 0], np.ones(world),
        local_batch, two_batch,
    )
    if norm_only:
        leave_out = None
    return _noise_result(point, leave_out, "distributed", world * local_batch, local_batch)


class DDPNoiseHook:
    """``DistributedDataParallel`` comm hook recording this rank's |g_k|² before the all-reduce.

    It sums the squared norms of the gradient buckets (the local gradient, before averaging)
    and then runs the standard all-reduce (``allreduce_hook``): no extra backward pass, one
    reduction per bucket on the device. Use::

        hook = DDPNoiseHook()
        ddp_model.register_comm_hook(None, hook)   # state None: the default process group
        loss.backward()                             # p.grad now holds the averaged gradient
        est = distributed_gradient_noise(hook.pop(), local_batch, global_grad=flat_grad)

    With ``no_sync()`` gradient accumulation the hook fires on the synchronising backward
    only, so it sees the accumulated local gradient (scale the loss so it is the mean over the
    rank's examples).
    """

    def __init__(self):
        self._sq = None
        self.__name__ = self.__qualname__ = "DDPNoiseHook"  # DDP logs the hook's name

    def __call__(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        buf = bucket.buffer()
        sq = torch.sum(buf.double() ** 2)
        self._sq = sq if self._sq is None else self._sq + sq
        return allreduce_hook(state, bucket)

    def pop(self) -> float:
        """|g_k|² of the last synchronised backward (sum over buckets); resets the record."""
        if self._sq is None:
            raise ValueError("DDPNoiseHook has recorded nothing (no synchronised backward yet)")
        value, self._sq = float(self._sq), None
        return value
