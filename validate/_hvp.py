r"""Hessian-vector products and the curvature side of the noise scale of a PyTorch network.

Units: H = ∇²L of the *mean* loss (loss/param²); vectors are flat over the trainable
parameters (``model.parameters()`` order, requires_grad only). GᵀHG and tr(HΣ) are in
loss·(loss/param)²/param² ... i.e. (loss/param)²·(loss/param²); ε_max = |G|²/GᵀHG is in ``lr``
units (the multiplier of the mean minibatch gradient); B_noise = tr(HΣ)/GᵀHG in examples.

The two-batch trick on the quadratic form (this project's estimator; DESIGN §6): with H
estimated on a batch *independent* of the gradients, unit gradients g_k of b examples and the
big-batch mean ḡ of B = M b examples,

    E[g_kᵀ Ĥ g_k] = GᵀHG + tr(HΣ)/b,     E[ḡᵀ Ĥ ḡ] = GᵀHG + tr(HΣ)/B,

so :func:`sgdtheory.estimators.two_batch_curvature` gives unbiased GᵀHG and tr(HΣ). The M
HVPs Ĥg_k also give every ḡᵀĤḡ = (1/M²) Σ_kl g_kᵀĤg_l, hence a jackknife over the units.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import grad, jvp

from . import _noise
from ._common import (
    ModelFunction,
    check_batch,
    check_micro_batch,
    default_micro_batch,
    has_training_batchnorm,
)

__all__ = [
    "HessianNoise",
    "HessianOperator",
    "hessian_noise",
    "hessian_trace",
    "hvp",
    "top_hessian_eigenvalue",
]

_MAX_UNITS = 16  # default number of micro-batches (one HVP each) in hessian_noise


class HessianOperator:
    """v ↦ Hv for the mean loss of ``model`` on one batch (a matvec on flat (p,) tensors).

    ``double_backward`` builds the first-order graph once (∇L with ``create_graph=True``) and
    each product is one more backward pass through it (``retain_graph``): the cheapest for
    many products (Lanczos, Hutchinson) and deterministic even with dropout (the forward pass
    is shared). ``forward_over_reverse`` is ``torch.func.jvp`` of ``torch.func.grad``: a fresh
    forward+backward with dual numbers per product, no graph kept between products.

    Attributes:
        dim: p, the number of trainable scalars. ``like``: a (p,) tensor of their dtype/device.
    """

    def __init__(self, model, criterion, inputs, targets, *, method: str = "double_backward"):
        if method not in ("double_backward", "forward_over_reverse"):
            raise ValueError(
                f"method must be 'double_backward' or 'forward_over_reverse', got {method!r}"
            )
        self.fn = ModelFunction(model, criterion)
        check_batch(inputs, targets)
        self.method = method
        self.inputs, self.targets = inputs, targets
        self.dim = self.fn.numel
        self.like = torch.zeros(0, dtype=self.fn.dtype, device=self.fn.device)
        self.calls = 0
        if method == "double_backward":
            _, self._grads = self.fn.grad(inputs, targets, create_graph=True)
        else:
            params = tuple(p.detach() for p in self.fn.params)
            self._params = params
            self._grad_fn = grad(lambda *ps: self.fn.loss(ps, inputs, targets), argnums=tuple(
                range(len(params))))

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        """Hv for a flat (p,) tensor v (returns a detached flat tensor)."""
        if not isinstance(vector, torch.Tensor):
            vector = torch.as_tensor(vector)
        v = self.fn.unflatten(vector.to(dtype=self.fn.dtype, device=self.fn.device))
        self.calls += 1
        if self.method == "double_backward":
            hv = torch.autograd.grad(self._grads, self.fn.params, grad_outputs=v,
                                     retain_graph=True)
        else:
            with warnings.catch_warnings():  # torch's own jit deprecation on first forward AD
                warnings.simplefilter("ignore", DeprecationWarning)
                _, hv = jvp(self._grad_fn, self._params, v)
        return self.fn.flatten([h.detach() for h in hv])


def hvp(model, criterion, inputs, targets, vector, *, method: str = "double_backward"):
    r"""One Hessian-vector product Hv of the mean loss on (inputs, targets).

    Args:
        vector: v, flat (p,) tensor over the trainable parameters.
        method: ``'double_backward'`` (reverse-over-reverse; measured 2.1-2.4× one gradient on
            a small CNN on CPU, benchmarks/bench_measure.py) or ``'forward_over_reverse'``
            (``jvp`` of ``grad``; similar, 2.3-3.1×, and no graph kept); see
            :class:`HessianOperator`.

    Returns:
        Hv as a flat (p,) tensor (loss/param² × v units).
    """
    return HessianOperator(model, criterion, inputs, targets, method=method)(vector)


@dataclass(frozen=True)
class HessianNoise:
    """GᵀHG, tr(HΣ), ε_max, B_noise (and |G|², tr(Σ), B_simple from the same gradients).

    All unbiased except the ratios (ε_max = |G|²/GᵀHG, B_noise = tr(HΣ)/GᵀHG,
    B_simple = tr(Σ)/|G|²: ratios of unbiased estimates, nan when a denominator estimate is
    not positive). ``*_stderr``: jackknife standard errors over the micro-batches (nan with
    fewer than 3). ``batch``: examples whose gradients were used (B); ``micro_batch``: b;
    ``hessian_batch``: examples of the independent batch that defines Ĥ.
    """

    g_h_g: float
    tr_h_sigma: float
    eps_max: float
    b_noise: float
    grad_sq: float
    tr_sigma: float
    b_simple: float
    g_h_g_stderr: float
    tr_h_sigma_stderr: float
    eps_max_stderr: float
    b_noise_stderr: float
    grad_sq_stderr: float
    tr_sigma_stderr: float
    b_simple_stderr: float
    batch: int
    micro_batch: int
    hessian_batch: int

    def eps_opt(self, batch) -> float:
        """Predicted optimal step ε_opt(B) = ε_max/(1 + B_noise/B) (``lr`` units); ``inf`` when
        the GᵀHG estimate is not positive (no curvature resolved along G: no optimum)."""
        from sgdtheory import theory

        if not self.g_h_g > 0:
            return float("inf")
        return theory.eps_opt(batch, self.eps_max, self.b_noise)


def hessian_noise(
    model: nn.Module,
    criterion,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    micro_batch: int | None = None,
    hessian_inputs: torch.Tensor | None = None,
    hessian_targets: torch.Tensor | None = None,
) -> HessianNoise:
    r"""Unbiased GᵀHG and tr(HΣ), hence ε_max and B_noise, from one or two batches.

    The Hessian Ĥ is that of the mean loss on ``hessian_inputs`` (or, when not given, on the
    second half of ``inputs``; the gradients then use the first half), independent of the
    gradient examples. The gradient examples are split into M micro-batches of b examples;
    one backward pass each gives g_k and one HVP each gives Ĥg_k, so the cost is M gradients
    plus M HVPs (one graph built on the Hessian batch). Then

        GᵀHG, tr(HΣ) = two_batch_curvature(mean_k g_kᵀĤg_k, ḡᵀĤḡ, b, M b),
        |G|², tr(Σ)  = two_batch(mean_k |g_k|², |ḡ|², b, M b).

    Args:
        model, criterion: network and mean-reduction loss.
        inputs, targets: the batch (examples drawn with replacement for exact unbiasedness).
        micro_batch: b (divides the gradient batch into ≥ 2 parts); default: the smallest
            divisor giving at most 16 micro-batches (≥ 2 examples with BatchNorm in training).
        hessian_inputs, hessian_targets: optional independent batch for Ĥ.

    Returns:
        :class:`HessianNoise`.

    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
    >>> h = hessian_noise(model, nn.CrossEntropyLoss(), x, y, micro_batch=4)
    >>> h.batch, h.micro_batch, h.hessian_batch
    (32, 4, 32)
    """
    fn = ModelFunction(model, criterion)
    n = check_batch(inputs, targets)
    if (hessian_inputs is None) != (hessian_targets is None):
        raise ValueError("give both hessian_inputs and hessian_targets, or neither")
    if hessian_inputs is None:
        if n < 4:
            raise ValueError(f"need a batch of at least 4 to split into halves, got {n}")
        half = n // 2
        gx, gy = inputs[:half], targets[:half]
        hx, hy = inputs[half:], targets[half:]
    else:
        check_batch(hessian_inputs, hessian_targets)
        gx, gy, hx, hy = inputs, targets, hessian_inputs, hessian_targets
    n_g = gx.shape[0]
    bn = has_training_batchnorm(model)
    if micro_batch is None:
        micro_batch = default_micro_batch(n_g, max_units=_MAX_UNITS, min_size=2 if bn else 1)
    b = check_micro_batch(micro_batch, n_g, batch_stats=bn)
    units = torch.stack(list(_noise.micro_batch_gradients(fn, gx, gy, b)))  # (M, p)
    op = HessianOperator(model, criterion, hx, hy)
    h_units = torch.stack([op(u) for u in units])
    gram = (units.double() @ units.double().T).cpu().numpy()
    curv = (units.double() @ h_units.double().T).cpu().numpy()
    curv = 0.5 * (curv + curv.T)
    from sgdtheory.estimators import two_batch, two_batch_curvature

    ones = np.ones(units.shape[0])

    def stats(mat, combine):
        return _noise.unit_statistics(
            mat.sum(), mat.sum(1), np.diag(mat).copy(), np.diag(mat).copy(), ones, b, combine
        )

    (grad_sq, tr_sigma), lo_g = stats(gram, two_batch)
    (g_h_g, tr_h_sigma), lo_h = stats(curv, two_batch_curvature)
    ratio = _noise._ratio
    se = _noise._jackknife_se
    values = {
        "g_h_g": g_h_g,
        "tr_h_sigma": tr_h_sigma,
        "eps_max": float(ratio(grad_sq, g_h_g)),
        "b_noise": float(ratio(tr_h_sigma, g_h_g)),
        "grad_sq": grad_sq,
        "tr_sigma": tr_sigma,
        "b_simple": float(ratio(tr_sigma, grad_sq)),
    }
    if lo_g is None or lo_h is None:
        errs = {f"{k}_stderr": float("nan") for k in values}
    else:
        errs = {
            "g_h_g_stderr": se(lo_h[:, 0]),
            "tr_h_sigma_stderr": se(lo_h[:, 1]),
            "eps_max_stderr": se(ratio(lo_g[:, 0], lo_h[:, 0])),
            "b_noise_stderr": se(ratio(lo_h[:, 1], lo_h[:, 0])),
            "grad_sq_stderr": se(lo_g[:, 0]),
            "tr_sigma_stderr": se(lo_g[:, 1]),
            "b_simple_stderr": se(ratio(lo_g[:, 1], lo_g[:, 0])),
        }
    return HessianNoise(**values, **errs, batch=n_g, micro_batch=b,
                        hessian_batch=hx.shape[0])


def top_hessian_eigenvalue(
    model: nn.Module,
    criterion,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    k: int = 1,
    method: str = "lanczos",
    tol: float = 1e-6,
    max_iter: int = 100,
    seed: int = 0,
):
    r"""λ_max of the Hessian of the mean loss on (inputs, targets), by Lanczos on HVPs.

    Uses :func:`sgdtheory.krylov.top_eigenvalues` on torch tensors (one graph, one backward
    pass per product). λ_max sets the gradient-descent stability limit lr < 2(1+μ)/λ_max.

    Args:
        k: number of eigenvalues (largest algebraic first); ``k=1`` returns a float.
        method: ``'lanczos'`` or ``'power'``; tol, max_iter, seed: passed to the solver.

    Returns:
        λ_max as a float (loss/param² units), or a list of the k largest when k > 1.
    """
    from sgdtheory import krylov

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    op = HessianOperator(model, criterion, inputs, targets)
    if k > op.dim:
        raise ValueError(f"k ({k}) must not exceed the number of parameters ({op.dim})")
    vals = krylov.top_eigenvalues(
        op, op.dim, k=k, method=method, tol=tol, max_iter=max_iter, seed=seed, like=op.like
    )
    vals = [float(v) for v in vals]
    return vals[0] if k == 1 else vals


def hessian_trace(
    model: nn.Module,
    criterion,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_samples: int = 100,
    seed: int = 0,
    method: str = "hutchinson",
):
    r"""tr(H) of the mean loss on (inputs, targets) by Hutchinson's estimator E[vᵀHv].

    Uses :func:`sgdtheory.krylov.hutchinson_trace` (Rademacher probes, or Hutch++).

    Returns:
        (estimate, stderr) as floats (loss/param² units).
    """
    from sgdtheory import krylov

    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer ≥ 2, got {n_samples!r}")
    op = HessianOperator(model, criterion, inputs, targets)
    est, err = krylov.hutchinson_trace(
        op, op.dim, n_samples, seed=seed, like=op.like, method=method
    )
    return float(est), float(err)
