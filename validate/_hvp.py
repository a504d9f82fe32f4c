r"""Hessian-vector products and the curvature side of the noise scale of a PyTorch network.

Units: H = ∇²L of the *mean* loss (loss/param²); vectors are flat over the trainable
parameters (``model.parameters()`` order, requires_grad only). GᵀHG and tr(HΣ) are in
loss·(loss/param)²/param² ... i.e. (loss/param)²·(loss/param²); ε_max = |G|²/GᵀHG is in ``lr``
units (the multiplier of the mean minibatch gradient); B_noise = tr(HΣ)/GᵀHG in examples.

The two-batch trick on the quadratic form (this project's estimator; docs/design.md §6): with H
estimated on a batch *independent* of the gradients, unit gradients g_k of b examples and the
big-batch mean ḡ of B = M b examples,

    E[g_kᵀ Ĥ g_k] = GᵀHG + tr(HΣ)/b,     E[ḡᵀ Ĥ ḡ] = GᵀHG + tr(HΣ)/B,

so :func:`sgdtheory.estimators.two_batch_curvature` gives unbiased GᵀHG and tr(HΣ). The M
HVPs Ĥg_k also give every ḡᵀĤḡ = (1/M²) Σ_kl g_kᵀĤg_l, hence a jackknife over the units.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import grad, jvp

from . import _noise
from ._common import (
    ModelFunction,
    check_choice,
    check_count,
    check_flag,
    check_seed,
    micro_batch_for,
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
    is shared); :meth:`matmat` applies H to k vectors in one vectorised backward pass.
    ``forward_over_reverse`` is ``torch.func.jvp`` of ``torch.func.grad``: a fresh
    forward+backward with dual numbers per product, no graph kept between products.

    A parameter in which the loss is linear (or that it does not use) has a zero row and column
    of H: its gradient is constant, and its Hessian-vector entries are 0.

    The batch is checked against the model and loss first (:meth:`ModelFunction.check_data`;
    ``names``: the two arguments named in its errors, ``("inputs", "targets")`` by default).

    Attributes:
        dim: p, the number of trainable scalars. ``like``: a (p,) tensor of their dtype/device.
        calls: Hessian-vector products made so far (a k-column :meth:`matmat` counts k).
    """

    def __init__(self, model, criterion, inputs, targets, *, method: str = "double_backward",
                 names=("inputs", "targets")):
        check_choice(method, "method", ("double_backward", "forward_over_reverse"))
        self.fn = ModelFunction(model, criterion)
        self.fn.check_data(inputs, targets, names)
        self.method = method
        self.inputs, self.targets = inputs, targets
        self.dim = self.fn.numel
        self.like = torch.zeros(0, dtype=self.fn.dtype, device=self.fn.device)
        self.calls = 0
        if method == "double_backward":
            _, grads = self.fn.grad(inputs, targets, create_graph=True)
            # gradients that are constant (loss linear in the parameter) have no graph
            self._live = [i for i, g in enumerate(grads) if g.requires_grad]
            self._grads = [grads[i] for i in self._live]
            self._batched_ok = True
        else:
            params = tuple(p.detach() for p in self.fn.params)
            self._params = params
            self._grad_fn = grad(lambda *ps: self.fn.loss(ps, inputs, targets), argnums=tuple(
                range(len(params))))

    def _vector(self, vector, name: str = "vector", ndim: int = 1) -> torch.Tensor:
        """``vector`` (a tensor, NumPy array or list of reals) as a finite tensor of the
        parameters' dtype and device with ``ndim`` axes, the last of p entries."""
        if not isinstance(vector, torch.Tensor):
            try:
                vector = torch.as_tensor(np.asarray(vector, dtype=float))
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"{name} must be a tensor of real numbers, got "
                                 f"{type(vector).__name__}") from None
        if vector.is_complex() or vector.dtype == torch.bool:
            raise ValueError(f"{name} must be real, got {vector.dtype}")
        want = f"(k, {self.dim})" if ndim == 2 else f"({self.dim},)"
        if vector.ndim != ndim or vector.shape[-1] != self.dim:
            raise ValueError(f"{name} must be a {want} tensor over the trainable parameters, "
                             f"got shape {tuple(vector.shape)}")
        if not bool(torch.isfinite(vector).all()):
            raise ValueError(f"{name} must be finite")
        return vector.to(dtype=self.fn.dtype, device=self.fn.device)

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        """Hv for a flat (p,) tensor v (returns a detached flat tensor)."""
        return self._product(self._vector(vector))

    def _product(self, vector: torch.Tensor) -> torch.Tensor:
        v = self.fn.unflatten(vector)
        self.calls += 1
        if self.method == "forward_over_reverse":
            with warnings.catch_warnings():  # torch's own jit deprecation on first forward AD
                warnings.simplefilter("ignore", DeprecationWarning)
                _, hv = jvp(self._grad_fn, self._params, v)
            return self.fn.flatten([h.detach() for h in hv])
        if not self._grads:
            return torch.zeros(self.dim, dtype=self.fn.dtype, device=self.fn.device)
        hv = torch.autograd.grad(self._grads, self.fn.params,
                                 grad_outputs=[v[i] for i in self._live], retain_graph=True,
                                 allow_unused=True, materialize_grads=True)
        return self.fn.flatten([h.detach() for h in hv])

    def matmat(self, vectors: torch.Tensor, *, chunk: int = 16) -> torch.Tensor:
        """H V for a (k, p) tensor of k vectors (rows), as a (k, p) tensor.

        Double backward: ``chunk`` rows per vectorised backward pass (``is_grads_batched``,
        one pass instead of k Python-level ones; halved while the GPU runs out of memory);
        row by row where vmap cannot batch a layer.
        """
        vectors = self._vector(vectors, "vectors", ndim=2)
        chunk = check_count(chunk, "chunk")
        if self.method != "double_backward" or not self._grads or vectors.shape[0] == 1:
            return torch.stack([self._product(v) for v in vectors]) if vectors.shape[0] \
                else vectors
        out, start = [], 0
        while start < vectors.shape[0]:
            block = vectors[start:start + chunk]
            k = block.shape[0]
            if self._batched_ok:
                try:
                    cols = block.split(self.fn.sizes, 1)
                    outs = [cols[i].reshape(k, *self.fn.shapes[i]) for i in self._live]
                    hv = torch.autograd.grad(self._grads, self.fn.params, grad_outputs=outs,
                                             retain_graph=True, is_grads_batched=True,
                                             allow_unused=True)
                    # a parameter the gradient does not depend on: zero rows (materialize_grads
                    # would give one unbatched zero tensor)
                    out.append(torch.cat([
                        h.detach().reshape(k, -1) if h is not None
                        else block.new_zeros(k, size) for h, size in zip(hv, self.fn.sizes,
                                                                         strict=True)], 1))
                    self.calls += k
                    start += k
                    continue
                except torch.cuda.OutOfMemoryError:  # k copies of the backward pass: fewer
                    if k == 1:
                        raise
                    torch.cuda.empty_cache()
                    chunk = max(1, k // 2)
                    continue
                except RuntimeError:  # an op without a vmap rule: one product at a time
                    self._batched_ok = False
            out.append(torch.stack([self._product(v) for v in block]))
            start += k
        return torch.cat(out)


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
class HessianNoise(_noise._Report):
    """GᵀHG, tr(HΣ), ε_max, B_noise (and |G|², tr(Σ), B_simple from the same gradients).

    All unbiased except the ratios (ε_max = |G|²/GᵀHG, B_noise = tr(HΣ)/GᵀHG,
    B_simple = tr(Σ)/|G|²: ratios of unbiased estimates, nan when a denominator estimate is
    not positive). ``*_stderr``: jackknife standard errors over the micro-batches (nan with
    fewer than 3). ``batch``: examples whose gradients were used (B); ``micro_batch``: b;
    ``hessian_batch``: examples of the independent batch that defines Ĥ.

    ``resolved``: whether GᵀHG and |G|² are both significantly positive (> t₀.₉₇₅·stderr), so
    that ε_max and B_noise mean something; early in training GᵀHG is often ≤ 0 within its
    error. ``reason`` says why not (e.g. "GᵀHG = -3 ± 5: not resolved; use more examples"),
    '' when resolved. :meth:`as_dict` gives strict-JSON values (None for nan/inf).
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
    resolved: bool = True
    reason: str = ""

    def eps_opt(self, batch) -> float:
        """Predicted optimal step ε_opt(B) = ε_max/(1 + B_noise/B) (``lr`` units); ``inf`` when
        the GᵀHG estimate is not positive (no curvature resolved along G: no optimum; see
        ``reason``)."""
        from sgdtheory import theory

        if not self.g_h_g > 0:
            return float("inf")
        return theory.eps_opt(batch, self.eps_max, max(self.b_noise, 0.0)
                              if math.isfinite(self.b_noise) else 0.0)

    def summary(self) -> str:
        """One console line with standard errors, or the reason the ratios are not resolved."""
        head = (f"B_noise {self._pair('b_noise')}, eps_max {self._pair('eps_max')}"
                if self.resolved else self.reason)
        return (f"{head} (GᵀHG {self._pair('g_h_g')}, tr(HΣ) {self._pair('tr_h_sigma')}, "
                f"B_simple {self._pair('b_simple')}; B = {self.batch}, b = {self.micro_batch}, "
                f"Hessian batch {self.hessian_batch})")


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
    their gradients g_k come from one vectorised pass (as :func:`gradient_noise`) and the M
    products Ĥg_k from vectorised backward passes through one graph built on the Hessian
    batch, so the cost is about that of M b example gradients plus M HVPs on the Hessian
    batch (2 × its size in example gradients each). Then

        GᵀHG, tr(HΣ) = two_batch_curvature(mean_k g_kᵀĤg_k, ḡᵀĤḡ, b, M b),
        |G|², tr(Σ)  = two_batch(mean_k |g_k|², |ḡ|², b, M b).

    Args:
        model, criterion: network and mean-reduction loss.
        inputs, targets: the batch (examples drawn with replacement for exact unbiasedness).
        micro_batch: b (divides the gradient batch into ≥ 2 parts); default: the smallest
            divisor giving at most 16 micro-batches (≥ 2 examples with BatchNorm in training).
        hessian_inputs, hessian_targets: optional independent batch for Ĥ.

    Returns:
        :class:`HessianNoise` (with ``resolved`` and ``reason``; never raises for estimates
        that happen to be negative). Computed from the unit gradients times a power of two
        (largest entry of order 1): the ratios ε_max, B_noise, B_simple do not depend on the
        loss's scale; a GᵀHG, tr(HΣ), |G|² or tr(Σ) beyond float64 raises ``ValueError``
        ("… overflows/underflows float64 …; rescale the loss"). Bad arguments raise
        ``ValueError`` naming them (``hessian_inputs`` for the Hessian batch).

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
    n = fn.check_data(inputs, targets)
    gx, gy, hx, hy = _gradient_and_hessian_batches(inputs, targets, hessian_inputs,
                                                   hessian_targets, n)
    n_g = gx.shape[0]
    b = micro_batch_for(micro_batch, n_g, model, max_units=_MAX_UNITS)
    op = HessianOperator(model, criterion, hx, hy, names=(
        ("inputs", "targets") if hessian_inputs is None else ("hessian_inputs", "hessian_targets")))
    units = torch.cat([g for _, g in _noise.unit_gradients(fn, gx, gy, b)])  # (M, p)
    # scaled form: 2**e g_k with the largest entry of order 1 (squares neither overflow nor
    # underflow); GᵀHG, tr(HΣ), |G|², tr(Σ) are 2**(−2e) times the scaled statistics
    e = _noise.scale_exponent(units)
    units = _noise.mul_pow2(units, e)
    h_units = op.matmat(units)
    gram = _noise.safe_gram(units)
    curv = _noise.safe_gram(units, h_units)
    curv = 0.5 * (curv + curv.T)
    if not np.all(np.isfinite(curv.sum(1))):
        raise ValueError("gᵀHg overflows float64; rescale the loss before measuring")
    values, errs, reasons = _curvature_statistics(gram, curv, b, e)
    return HessianNoise(**values, **errs, batch=n_g, micro_batch=b,
                        hessian_batch=hx.shape[0], resolved=not reasons,
                        reason="; ".join(reasons))


def _gradient_and_hessian_batches(inputs, targets, hessian_inputs, hessian_targets, n: int):
    """(gx, gy, hx, hy): the gradient batch and the independent batch defining Ĥ — the two
    halves of (inputs, targets) when no Hessian batch is given (n ≥ 4)."""
    if (hessian_inputs is None) != (hessian_targets is None):
        raise ValueError("give both hessian_inputs and hessian_targets, or neither")
    if hessian_inputs is not None:
        return inputs, targets, hessian_inputs, hessian_targets
    if n < 4:
        raise ValueError(f"need a batch of at least 4 to split into halves, got {n}")
    half = n // 2
    return inputs[:half], targets[:half], inputs[half:], targets[half:]


def _curvature_statistics(gram: np.ndarray, curv: np.ndarray, b: int, e: int):
    """(values, stderrs, reasons) of :func:`hessian_noise` from the Gram matrices of the M
    scaled unit gradients, G_kl = g_kᵀg_l and C_kl = g_kᵀĤg_l (symmetrised), b examples per
    unit: the two-batch estimates of |G|², tr(Σ) (from G) and GᵀHG, tr(HΣ) (from C), their
    ratios ε_max = |G|²/GᵀHG, B_noise = tr(HΣ)/GᵀHG, B_simple = tr(Σ)/|G|², delete-a-unit
    jackknife standard errors, unscaled by 2**(−2e); resolved when GᵀHG and |G|² are
    significantly positive."""
    from sgdtheory.estimators import two_batch, two_batch_curvature

    ones = np.ones(gram.shape[0])

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
    m = gram.shape[0]
    resolved = not any(_noise.resolution(*a, m - 1) for a in (
        ("GᵀHG", g_h_g, errs["g_h_g_stderr"]), ("|G|²", grad_sq, errs["grad_sq_stderr"])))
    magnitudes = {"g_h_g": "GᵀHG", "tr_h_sigma": "tr(HΣ)", "grad_sq": "|G|²",
                  "tr_sigma": "tr(Σ)"}  # the rest are scale-free ratios
    for k, what in magnitudes.items():
        values[k] = _noise.unscale(values[k], -2 * e, what)
        errs[k + "_stderr"] = _noise.unscale(errs[k + "_stderr"], -2 * e, f"the {what} stderr")
    reasons = [] if resolved else [r for r in (
        _noise.resolution("GᵀHG", values["g_h_g"], errs["g_h_g_stderr"], m - 1),
        _noise.resolution("|G|²", values["grad_sq"], errs["grad_sq_stderr"], m - 1)) if r]
    return values, errs, reasons


# --------------------------------------------------------------------------- λ_max


def lanczos_top(matvec, dim: int, *, v0: torch.Tensor, tol: float, max_iter: int,
                basis_size: int = 30, criterion: str = "residual"):
    r"""Largest (algebraic) eigenpair (θ, u) of a symmetric operator by Lanczos from ``v0``.

    Full reorthogonalisation; when the basis holds ``basis_size`` vectors the iteration
    restarts from the current Ritz vector (explicit restart: memory basis_size × dim). After
    every product the Ritz pair of the tridiagonal T is updated (NumPy, at most 30 × 30) and
    the iteration stops when ``criterion`` is met:

    * ``'residual'``: ‖Au − θu‖ = β_j |s_j| ≤ tol·|θ| (as :func:`sgdtheory.krylov.
      top_eigenvalues`; the eigenvalue error is then ≲ tol²·θ²/gap);
    * ``'change'``: |θ_j − θ_{j−1}| ≤ tol·|θ_j| between consecutive products (PyHessian's
      power-iteration criterion; Lanczos Ritz values increase monotonically to λ_max).

    Returns (θ, u, matvecs, converged) with u of unit norm.
    """
    u = v0 / torch.linalg.vector_norm(v0)
    n_mv, scale, previous = 0, 0.0, math.nan
    while True:
        m = max(1, min(basis_size, dim, max_iter - n_mv))
        basis = torch.zeros(m + 1, dim, dtype=u.dtype, device=u.device)
        basis[0] = u
        alpha, beta = np.zeros(m), np.zeros(m)
        done = False
        for j in range(m):
            w = matvec(basis[j])
            n_mv += 1
            v = basis[: j + 1]
            h = v @ w
            w = w - h @ v
            h2 = v @ w  # classical Gram–Schmidt twice: full reorthogonalisation
            w = w - h2 @ v
            alpha[j] = float(h[j] + h2[j])
            beta[j] = float(torch.linalg.vector_norm(w))
            scale = max(scale, abs(alpha[j]), beta[j])
            off = beta[:j]
            vals, vecs = np.linalg.eigh(np.diag(alpha[: j + 1]) + np.diag(off, 1)
                                        + np.diag(off, -1))
            theta, s = float(vals[-1]), vecs[:, -1]
            exact = beta[j] <= 1e-12 * scale or j + 1 == dim  # invariant subspace
            if criterion == "change":
                done = abs(theta - previous) <= tol * abs(theta)
            else:
                done = abs(beta[j] * s[-1]) <= tol * max(abs(theta), 1e-300)
            previous = theta
            if done or exact or n_mv >= max_iter or j + 1 == m:
                done = done or exact
                break
            basis[j + 1] = w / beta[j]
        u = torch.as_tensor(s, dtype=u.dtype, device=u.device) @ basis[: j + 1]
        u = u / torch.linalg.vector_norm(u)
        if done or n_mv >= max_iter:
            return theta, u, n_mv, bool(done)


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
    v0: torch.Tensor | None = None,
    return_vector: bool = False,
    stop: str = "residual",
):
    r"""λ_max of the Hessian of the mean loss on (inputs, targets), by Lanczos on HVPs.

    k = 1 with Lanczos: :func:`lanczos_top` on torch tensors (one graph, one backward pass per
    product), started from ``v0`` when given — the top eigenvector of the previous measurement
    point (``return_vector=True`` returns it) is a warm start: when the top direction moves
    little between points, the residual tolerance is met in fewer products, or a fixed budget
    gives a closer λ_max. Otherwise :func:`sgdtheory.krylov.top_eigenvalues`. λ_max sets the
    gradient-descent stability limit lr < 2(1+μ)/λ_max.

    Args:
        k: number of eigenvalues (largest algebraic first); ``k=1`` returns a float.
        method: ``'lanczos'`` or ``'power'``; tol, max_iter (HVPs), seed (of the random start
            vector): passed to the solver. A :class:`sgdtheory.krylov.KrylovConvergenceWarning`
            says when ``max_iter`` stopped it before ``tol``.
        v0: start vector, flat (p,) over the trainable parameters (k = 1, Lanczos only).
        return_vector: also return the unit top eigenvector (flat (p,) tensor; k = 1 only).
        stop: when ``tol`` is met (k = 1, Lanczos): ``'residual'`` ‖Hu − λu‖ ≤ tol·λ
            (default; eigenvalue error ≲ tol²λ²/gap) or ``'change'``, a relative change of λ
            below tol between products (PyHessian's criterion); see :func:`lanczos_top`.

    Returns:
        λ_max as a float (loss/param² units), a list of the k largest when k > 1, or
        (λ_max, vector) with ``return_vector``.
    """
    from sgdtheory import _checks, krylov

    k = check_count(k, "k")
    max_iter = check_count(max_iter, "max_iter")
    seed = check_seed(seed)
    return_vector = check_flag(return_vector, "return_vector")
    tol = _checks.real("tol", tol)
    if not tol > 0:
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    check_choice(method, "method", ("lanczos", "power"))
    check_choice(stop, "stop", ("residual", "change"))
    if (v0 is not None or return_vector or stop != "residual") and (
            k != 1 or method != "lanczos"):
        raise ValueError("v0, return_vector and stop='change' need k=1 and method='lanczos'")
    op = HessianOperator(model, criterion, inputs, targets)
    if k > op.dim:
        raise ValueError(f"k ({k}) must not exceed the number of parameters ({op.dim})")
    if k > 1 or method != "lanczos":
        vals = krylov.top_eigenvalues(
            op, op.dim, k=k, method=method, tol=tol, max_iter=max_iter, seed=seed, like=op.like
        )
        vals = [float(v) for v in vals]
        return vals[0] if k == 1 else vals
    if v0 is None:
        start = torch.as_tensor(np.random.default_rng(seed).standard_normal(op.dim))
    else:
        start = op._vector(v0, "v0")
        if not float(torch.linalg.vector_norm(start)):
            raise ValueError("v0 must be a finite, non-zero vector")
    start = start.to(dtype=op.fn.dtype, device=op.fn.device)
    lam, vec, n_mv, converged = lanczos_top(op, op.dim, v0=start, tol=tol, max_iter=max_iter,
                                            criterion=stop)
    if not converged:
        warnings.warn(f"Lanczos stopped after {n_mv} matvecs before the residual reached "
                      f"tol·|θ| (tol={tol:g})", krylov.KrylovConvergenceWarning, stacklevel=2)
    return (lam, vec) if return_vector else lam


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

    ``'hutchinson'``: Rademacher probes z_i (drawn as :func:`sgdtheory.krylov.hutchinson_trace`
    draws them from ``seed``), their products Hz_i in vectorised batches
    (:meth:`HessianOperator.matmat`); estimate mean_i z_iᵀHz_i with standard error
    std/√n. ``'hutch++'``: :func:`sgdtheory.krylov.hutchinson_trace` (one product at a time).

    Returns:
        (estimate, stderr) as floats (loss/param² units).
    """
    from sgdtheory import krylov

    n_samples = check_count(n_samples, "n_samples", minimum=2)
    seed = check_seed(seed)
    check_choice(method, "method", ("hutchinson", "hutch++"))
    op = HessianOperator(model, criterion, inputs, targets)
    if method == "hutch++":
        est, err = krylov.hutchinson_trace(
            op, op.dim, n_samples, seed=seed, like=op.like, method=method
        )
        return float(est), float(err)
    rng = np.random.default_rng(seed)
    vals = []
    for start in range(0, n_samples, 16):
        count = min(16, n_samples - start)
        z = np.stack([rng.integers(0, 2, size=op.dim).astype(float) * 2.0 - 1.0
                      for _ in range(count)])
        z = torch.as_tensor(z, dtype=op.fn.dtype, device=op.fn.device)
        vals.append((z * op.matmat(z)).sum(1).double().cpu())
    vals = torch.cat(vals).numpy()
    if not np.all(np.isfinite(vals)):
        raise ValueError("Hessian-vector products overflow float64; rescale the loss (e.g. "
                         "divide it by a constant) before measuring")
    scale = float(np.abs(vals).max()) or 1.0  # mean and spread of vals/scale: no overflow
    unit = vals / scale
    return (float(unit.mean() * scale),
            float(unit.std(ddof=1) * scale / math.sqrt(n_samples)))
