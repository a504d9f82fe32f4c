r"""Gradient noise and curvature of real PyTorch networks (docs/design.md §7).

Public API (units: L is the *mean* per-example loss, ``criterion.reduction == 'mean'``;
G = ∇L, H = ∇²L, Σ the per-example gradient covariance with 1/N normalisation; ``lr``
multiplies the mean minibatch gradient; vectors are flat over the trainable parameters):

* :func:`gradient_noise` — unbiased |G|², tr(Σ), B_simple with standard errors, from
  per-sample gradients or micro-batches (BatchNorm networks), computed in vectorised passes:
  per-layer input × output-gradient products for Linear/Conv/BatchNorm-eval networks (the
  arithmetic of a training step), ``torch.func.vmap(grad)`` over the units otherwise.
* :func:`distributed_gradient_noise` — the same under ``torchrun``: each rank's local
  gradient is the small batch, the all-reduced one the big batch (no extra backward pass);
  :class:`DDPNoiseHook` records the local norm inside ``DistributedDataParallel``.
* :func:`hvp`, :class:`HessianOperator` — Hessian-vector products (double backward or
  forward-over-reverse; :meth:`HessianOperator.matmat` for many vectors in one pass).
* :func:`hessian_noise` — unbiased GᵀHG and tr(HΣ), hence ε_max and B_noise, by the two-batch
  trick on ĝᵀĤĝ with Ĥ on an independent batch.
* :func:`top_hessian_eigenvalue` (Lanczos, warm-started from the previous point's vector
  with ``v0=``/``return_vector=True``) and :func:`hessian_trace` (Hutchinson, probes in
  batches), on torch tensors (:mod:`sgdtheory.krylov` for k > 1 and Hutch++).
* :class:`NoiseMonitor` — all of it on a schedule inside a training loop, written to CSV.

The maths (two-batch solves, EMAs, Krylov methods, closed forms) lives in :mod:`sgdtheory`;
this module is the PyTorch plumbing. Measurements never change the model (parameters,
``.grad`` and BatchNorm running statistics are left as they were). Estimates whose
denominator (|G|², GᵀHG) is not significantly positive carry ``resolved=False`` and a
``reason`` ("GᵀHG = -3 ± 5: not resolved; use more examples"); ``as_dict()`` is strict JSON.
A plain-callable loss is checked once per call to average, not sum, over examples. Cost of
each measurement in example gradients: ``benchmarks/bench_measure.py``.
"""

from ._common import ModelFunction
from ._hvp import (
    HessianNoise,
    HessianOperator,
    hessian_noise,
    hessian_trace,
    hvp,
    top_hessian_eigenvalue,
)
from ._noise import (
    DDPNoiseHook,
    GradientNoise,
    distributed_gradient_noise,
    gradient_noise,
    micro_batch_gradients,
    per_sample_gradients,
    split_backward,
)
from .monitor import NoiseMonitor

__all__ = [
    "DDPNoiseHook",
    "GradientNoise",
    "HessianNoise",
    "HessianOperator",
    "ModelFunction",
    "NoiseMonitor",
    "distributed_gradient_noise",
    "gradient_noise",
    "hessian_noise",
    "hessian_trace",
    "hvp",
    "micro_batch_gradients",
    "per_sample_gradients",
    "split_backward",
    "top_hessian_eigenvalue",
]
