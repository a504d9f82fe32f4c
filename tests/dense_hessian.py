"""The dense Hessian of a small model's mean cross-entropy over all its parameters, by
brute force (torch.autograd.functional.hessian on the flat parameter vector): the reference
for the curvature measurements (tests/test_cifar_hardening.py,
tests/test_validate_experiments.py)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def dense_hessian(model: nn.Module, x, y, *, float64: bool = False) -> torch.Tensor:
    """(p, p) Hessian in ``model.parameters()`` order; ``float64``: computed on a float64
    copy of the parameters and inputs (the model is returned to float32 after)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    if float64:
        model.double()
        x = x.double()
    try:
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

        def loss(v):
            parts, i = {}, 0
            for n, s in zip(names, shapes, strict=True):
                k = int(np.prod(s))
                parts[n] = v[i:i + k].reshape(s)
                i += k
            logits = torch.func.functional_call(model, parts, (x,))
            return nn.functional.cross_entropy(logits, y)

        return torch.autograd.functional.hessian(loss, flat)
    finally:
        if float64:
            model.float()
