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
import sys
import weakref
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import stdtrit
from torch import nn
from torch.func import grad, vmap

from ._common import (
    ModelFunction,
    check_choice,
    check_count,
    check_micro_batch,
    has_training_batchnorm,
    micro_batch_for,
)

__all__ = [
    "DDPNoiseHook",
    "GradientNoise",
    "distributed_gradient_noise",
    "gradient_noise",
    "unit_statistics",
]

_MAX_UNITS = 64  # default largest number of micro-batches


def _fmt(value: float, stderr: float) -> str:
    """'v ± se' with 3 and 2 significant digits ('v (no error)' when se is not finite)."""
    if not math.isfinite(stderr):
        return f"{value:.3g} (no standard error)"
    return f"{value:.3g} ± {stderr:.2g}"


def resolution(name: str, value: float, stderr: float, df: float, *,
               hint: str = "use at least 3 micro-batches") -> str:
    """'' when the estimate ``value`` of a positive quantity (a denominator: |G|², GᵀHG) is
    resolved, i.e. above t₀.₉₇₅(df)·stderr (significantly positive); else the reason, e.g.
    "GᵀHG = -3 ± 5: not resolved (not above 2.04 s.e., Student's t at df 31); use more
    examples". ``hint``: what to do when there is no
    standard error."""
    if not math.isfinite(stderr):
        state = "" if value > 0 else ", not positive"
        return f"{name} = {value:.3g}: not resolved (no standard error{state}); {hint}"
    z = float(stdtrit(max(df, 1.0), 0.975))  # Student's t quantile (a ufunc: µs)
    if value > z * stderr:
        return ""
    return (f"{name} = {_fmt(value, stderr)}: not resolved (not above {z:.3g} s.e., Student's "
            f"t at df {df:g}); use more examples")


def _json_value(v):
    """None for a non-finite float (strict JSON has no NaN/Infinity), else v."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


class _Report:
    """Shared output of the result dataclasses: a JSON-safe dict and a console line."""

    def as_dict(self) -> dict:
        """The fields as a dict for strict JSON: non-finite floats become None (the reason
        field says why)."""
        return {f.name: _json_value(getattr(self, f.name)) for f in fields(self)}

    def _pair(self, name: str) -> str:
        return _fmt(getattr(self, name), getattr(self, name + "_stderr"))


@dataclass(frozen=True)
class GradientNoise(_Report):
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
        resolved: whether |G|² is significantly positive (> t₀.₉₇₅·stderr), so that B_simple
            means something; ``reason`` says why not (e.g. "|G|² = -3e-05 ± 4e-05: not
            resolved; use more examples"), '' when resolved.
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
    resolved: bool = True
    reason: str = ""

    def summary(self) -> str:
        """One console line with standard errors, or the reason B_simple is not resolved."""
        head = f"B_simple {self._pair('b_simple')}" if self.resolved else self.reason
        return (f"{head} (|G|² {self._pair('grad_sq')}, tr(Σ) {self._pair('tr_sigma')}; "
                f"B = {self.batch}, b = {self.micro_batch})")


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


def unit_statistics(total_sq, cross, self_sq, q, counts, b_small: int, combine, *,
                    squares: bool | None = None):
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
        squares: whether the inner product is a squared norm (default: ``combine`` is
            ``two_batch``): rounding below 0 (|ḡ|² ≈ 0 at a minimum) is then clipped to 0.

    Returns:
        (point, leave_out): point a pair of floats; leave_out an (m, 2) array, or None when a
        left-out estimate would have fewer than 2 units.
    """
    counts = np.asarray(counts, dtype=float)
    q = np.asarray(q, dtype=float)
    n_units = counts.sum()
    from sgdtheory.estimators import two_batch

    if squares is None:
        squares = combine is two_batch
    clip = (lambda v: max(float(v), 0.0)) if squares else float
    small = clip(q.sum() / n_units)
    big = clip(total_sq / n_units**2)
    point = tuple(float(v) for v in combine(small, big, b_small, int(n_units) * b_small))
    rest = n_units - counts
    if counts.shape[0] < 3 or rest.min() < 2:
        return point, None
    small_j = (q.sum() - q) / rest  # leave group j out: all m at once (one combine call)
    big_j = (total_sq - 2.0 * np.asarray(cross, float) + np.asarray(self_sq, float)) / rest**2
    if squares:
        small_j, big_j = np.maximum(small_j, 0.0), np.maximum(big_j, 0.0)
    out = np.stack(combine(small_j, big_j, b_small, (rest * b_small).astype(np.int64)), 1)
    return point, np.asarray(out, dtype=float)


def _gram_statistics(sums: torch.Tensor, q: torch.Tensor, counts):
    """(total, cross, self, q) from group sums (m, p) and per-group Σ|g_k|²."""
    gram = safe_gram(sums)
    q = q.double().cpu().numpy()
    if not (np.all(np.isfinite(q)) and np.all(np.isfinite(gram.sum(1)))):
        raise ValueError("squared gradient norms overflow float64; rescale the loss (e.g. "
                         "divide it by a constant) before measuring")
    return gram.sum(), gram.sum(1), np.diag(gram).copy(), q


def pow2_exponent(amax: float) -> int:
    """e with 2**e · amax in [0.5, 1): the power of two that brings the largest gradient entry
    to order 1 (0 when amax is 0); exact, so scaled gradients round as the originals."""
    if not math.isfinite(amax):
        raise ValueError("gradients are not finite (the loss overflowed?)")
    return -math.frexp(amax)[1] if amax > 0 else 0


# Row norms within [2**-40, 2**40] need no scaling: squares and Gram entries of up to 2**24
# rows stay far inside float32's range, and entries too small to square are ≤ 2**-69 of it.
_SAFE_NORMS = (2.0**-40, 2.0**40)


def scale_exponent(rows: torch.Tensor, norms: torch.Tensor | None = None) -> int:
    """The power of two e for the scaled form of the (k, p) gradient rows: 0 when every row
    norm lies in :data:`_SAFE_NORMS` (one pass, no copy: the usual case), else
    :func:`pow2_exponent` of the largest entry. ``norms``: the row norms, if already known."""
    if rows.numel() == 0:
        return 0
    if norms is None:
        norms = torch.linalg.vector_norm(rows, dim=1)
    lo, hi = float(norms.min()), float(norms.max())
    if _SAFE_NORMS[0] <= lo and hi <= _SAFE_NORMS[1]:
        return 0
    return pow2_exponent(float(rows.abs().max()))


def mul_pow2(t: torch.Tensor, e: int) -> torch.Tensor:
    """t · 2**e in two exact factors (each within float32's range for |e| ≤ 254)."""
    if e == 0:
        return t
    h = e // 2
    return t * math.ldexp(1.0, h) * math.ldexp(1.0, e - h)


def unscale(value: float, e: int, what: str) -> float:
    """value · 2**e as a float, refusing (ValueError naming ``what``) a result beyond float64:
    an overflow, or a non-zero value below its smallest normal number (an underflow)."""
    if not math.isfinite(value) or value == 0 or e == 0:
        return value
    try:
        out = math.ldexp(value, e)
    except OverflowError:
        out = math.inf
    if math.isinf(out):
        raise ValueError(f"{what} overflows float64 (the gradients are too large); rescale the "
                         "loss (e.g. divide it by a constant) before measuring")
    if abs(out) < sys.float_info.min:
        raise ValueError(f"{what} underflows float64 (the gradients are too small); rescale the "
                         "loss (e.g. multiply it by a constant) before measuring")
    return out


def _noise_result(point, leave_out, method, batch, micro_batch, n_units,
                  e: int = 0) -> GradientNoise:
    """The result from scaled statistics: the true |G|², tr(Σ) are 2**e times ``point`` (and
    the jackknife values); B_simple and the resolution test are scale-free."""
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
    n_groups = n_units if leave_out is None else leave_out.shape[0]
    reason = resolution("|G|²", grad_sq, errs[0], n_groups - 1)
    if e:
        grad_sq, tr_sigma = unscale(grad_sq, e, "|G|²"), unscale(tr_sigma, e, "tr(Σ)")
        errs = (unscale(errs[0], e, "the |G|² stderr"), unscale(errs[1], e, "the tr(Σ) stderr"),
                errs[2])
        if reason:
            reason = resolution("|G|²", grad_sq, errs[0], n_groups - 1)
    return GradientNoise(grad_sq, tr_sigma, b_simple, *errs, method, batch, micro_batch,
                         resolved=not reason, reason=reason)


def safe_gram(a: torch.Tensor, b: torch.Tensor | None = None) -> np.ndarray:
    """a bᵀ (b = a by default) as a float64 NumPy array, computed in float64 for small inputs
    and rescaled by max|a|·max|b| when squares would overflow the inputs' dtype (float32
    gradients of 1e20). Raises ``ValueError`` when the products overflow even float64."""
    same = b is None
    b = a if same else b
    small = a.numel() + b.numel() <= 2**25
    if small:  # (one float64 copy when b is a)
        ad = a.double()
        out = ad @ (ad if same else b.double()).T
    else:
        out = (a @ b.T).double()
    if bool(torch.isfinite(out).all()):
        return out.cpu().numpy()
    sa = float(a.abs().max())
    sb = float(b.abs().max())
    if not (math.isfinite(sa) and math.isfinite(sb)):
        raise ValueError("gradients are not finite (the loss overflowed?)")
    scaled = ((a / sa).double() @ (b / sb).double().T).cpu().numpy()
    with np.errstate(over="ignore"):
        out = scaled * sa * sb
    if not np.all(np.isfinite(out)):
        raise ValueError(
            f"squared gradient norms overflow float64 (gradient entries up to {max(sa, sb):.3g})"
            "; rescale the loss (e.g. divide it by a constant) before measuring")
    return out


class _GroupSums:
    """Streams unit gradients (k, p) into m contiguous group sums and Σ|g_k|² per group, in
    scaled form: the gradients times 2**``e`` (set from the first chunk's largest entry, and
    lowered when a later chunk is larger), so that squares neither overflow nor underflow;
    the statistics are 2**(−2e) times those of the sums."""

    def __init__(self, n_units: int, numel: int, dtype, device, n_groups: int):
        self.m = min(n_units, n_groups)
        self.n_units = n_units
        self.sums = torch.zeros(self.m, numel, dtype=dtype, device=device)
        self.q = torch.zeros(self.m, dtype=torch.float64, device=device)
        self.group_of = torch.arange(n_units, device=device) * self.m // n_units
        self.counts = torch.bincount(self.group_of, minlength=self.m).cpu().numpy()
        self.e = None

    def add(self, grads: torch.Tensor, start: int) -> None:
        idx = self.group_of[start : start + grads.shape[0]]
        norms = torch.linalg.vector_norm(grads, dim=1) if grads.numel() else None
        e = scale_exponent(grads, norms) if norms is not None else 0
        if e == 0 and self.e in (None, 0) and bool(torch.isfinite(norms).all()):
            self.e = 0  # the usual case: no scaling, the norms just computed are the |g_k|
            self.sums.index_add_(0, idx, grads)
            self.q.index_add_(0, idx, norms.double() ** 2)
            return
        if self.e is None or (grads.numel() and e < self.e):
            if self.e is not None:  # a larger chunk: bring what is summed to the new scale
                self.sums = mul_pow2(self.sums, e - self.e)
                self.q = mul_pow2(self.q, 2 * (e - self.e))
            self.e = e
        grads = mul_pow2(grads, self.e)
        self.sums.index_add_(0, idx, grads)
        # row norms in the gradients' dtype (float64 only for the k sums, no (k, p) copy)
        self.q.index_add_(0, idx, _row_sq(grads))


def _row_sq(grads: torch.Tensor) -> torch.Tensor:
    """|g_k|² of each row as float64: the row norm in the gradients' dtype (relative error
    ~1e-7, far below the statistical error of any estimate; no float64 copy of the (k, p)
    block), rescaled by the row's largest entry where the squares overflow."""
    norms = torch.linalg.vector_norm(grads, dim=1)
    if not bool(torch.isfinite(norms).all()):
        scale = grads.abs().amax(1).clamp_min(torch.finfo(grads.dtype).tiny)
        if not bool(torch.isfinite(scale).all()):
            raise ValueError("gradients are not finite (the loss overflowed?)")
        norms = torch.linalg.vector_norm(grads / scale[:, None], dim=1).double() * scale.double()
    return norms.double() ** 2


# --------------------------------------------------------------------------- unit gradients
#
# Three ways to get the M mean gradients g_k of consecutive units of b examples, all giving
# the same numbers (tests/test_measure.py compares them with explicit loops):
#
# * hooks: one forward and one backward pass of the whole chunk, with the per-unit weight
#   gradients of Linear / Conv / BatchNorm-with-running-statistics layers formed from each
#   layer's input and output gradient (Σ_{i∈k} δ_i a_iᵀ; convolutions unfolded, or k units
#   per grouped convolution call for large layers): the arithmetic of one training step, no
#   per-example graph. Needs every trainable parameter in such a layer and no BatchNorm
#   normalising by batch statistics. (split_backward: the same from a training step's own
#   backward pass.)
# * vmap: torch.func.vmap of grad over units (BatchNorm in training mode sees each unit as its
#   batch; running statistics go to per-unit copies that are discarded).
# * loop: one backward pass per unit (the reference; used by nothing but tests).

_HOOK_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> hooks verified
# model -> split_backward's check passed (its own: a loss_fn may add terms outside the layers)
_SPLIT_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hook_modules(model: nn.Module):
    """The modules holding trainable parameters when the hook path supports all of them
    (Linear; Conv1d/Conv2d with zero or numeric padding; BatchNorm using running statistics),
    else None."""
    mods = []
    for m in model.modules():
        if not any(p.requires_grad for p in m.parameters(recurse=False)):
            continue
        if isinstance(m, nn.Linear):
            pass
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                return None
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training or m.running_mean is None or not m.affine:
                return None
        else:
            return None
        mods.append(m)
    return mods


def _unit_sum(t: torch.Tensor, n_units: int) -> torch.Tensor:
    """(n, ...) → (M, ...) sums over consecutive units of n/M rows."""
    return t.reshape(n_units, -1, *t.shape[1:]).sum(1)


def _conv_units_per_call(n: int, n_units: int, cols: int, t: int, w_numel: int) -> int:
    """Units per grouped weight-gradient call of a convolution (0: unfold + batched products).

    Small layers (unfolded input ≤ 3·10⁵ numbers) are unfolded. Otherwise k units go into one
    call of the convolution's own weight gradient as a convolution with k times the groups
    (each unit's examples are the batch of its group), k·w_numel ≤ 2**19. Measured on one
    core (CIFAR ResNet and digits CNN layer shapes, 16–256 examples): 0.1–0.7× the time of
    unfolding (which allocates 9× the input) and 0.3–1× that of a call per unit (~40 µs
    each); the best k falls from 256 (3→8 channels) to 4–8 (≥ 64→128), with a cliff beyond
    ~2**22 weights per call."""
    if n * cols * t <= 300_000:
        return 0
    return max(1, min(n_units, 2**19 // w_numel))


def _units_as_groups(v: torch.Tensor, n_units: int, s: int, k: int) -> torch.Tensor:
    """(n, C, H, W) → (b, k·C, H, W): units s … s + k − 1 (b = n/M examples each) side by side
    as channel groups, their examples as the batch."""
    units = v.reshape(n_units, -1, *v.shape[1:])[s:s + k]  # (k, b, C, H, W)
    return units.transpose(0, 1).reshape(units.shape[1], -1, *v.shape[2:])


def _write(dest: dict, p, g: torch.Tensor) -> None:
    """dest[p] = g on the first write (the matrix starts uninitialised), += g after (a
    parameter shared by several layers or calls)."""
    if p in dest["written"]:
        dest[p].add_(g)
    else:
        dest[p].copy_(g)
        dest["written"].add(p)


def _layer_unit_grads(m: nn.Module, a: torch.Tensor, d: torch.Tensor, n_units: int,
                      dest: dict) -> None:
    """Add the per-unit gradients of one call of layer m (input a, output gradient d of
    Σ_k L_k), summed over the examples of each unit, into ``dest[param]``: (M, numel) views
    of the unit-gradient matrix (trainable parameters only; ``dest['written']``: those set)."""

    def put(p, g):
        if p is not None and p in dest:
            _write(dest, p, g.reshape(n_units, -1))

    if isinstance(m, nn.Linear):
        a3 = a.reshape(n_units, -1, a.shape[-1])
        d3 = d.reshape(n_units, -1, d.shape[-1])
        put(m.weight, torch.bmm(d3.transpose(1, 2), a3))
        if m.bias is not None:
            put(m.bias, d3.sum(1))
        return
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        if isinstance(m, nn.Conv1d):  # as a 2-D convolution of height 1
            a, d = a.unsqueeze(2), d.unsqueeze(2)
            kernel, dil, pad, stride = ((1, m.kernel_size[0]), (1, m.dilation[0]),
                                        (0, m.padding[0]), (1, m.stride[0]))
        else:
            kernel, dil, pad, stride = m.kernel_size, m.dilation, m.padding, m.stride
        n, g = a.shape[0], m.groups
        t = d.shape[2] * d.shape[3]
        per = _conv_units_per_call(n, n_units, a.shape[1] * kernel[0] * kernel[1], t,
                                   m.weight.numel()) if m.weight in dest else 0
        if per:  # k units at once: a convolution of k·groups groups, batch = a unit's examples
            rows, first = dest[m.weight], m.weight not in dest["written"]
            for s in range(0, n_units, per):
                k = min(per, n_units - s)
                a_k, d_k = (_units_as_groups(v, n_units, s, k) for v in (a, d))
                w = torch.nn.grad.conv2d_weight(
                    a_k, (k * d.shape[1], a.shape[1] // g, *kernel), d_k, stride=stride,
                    padding=pad, dilation=dil, groups=k * g).reshape(k, -1)
                rows[s:s + k].copy_(w) if first else rows[s:s + k].add_(w)
            dest["written"].add(m.weight)
        elif m.weight in dest:  # unfolded input (n, C k², T) times output gradients, per unit
            cols = F.unfold(a, kernel, dilation=dil, padding=pad, stride=stride)
            cols = cols.reshape(n_units, n // n_units, g, -1, t)
            dd = d.reshape(n_units, n // n_units, g, -1, t)
            put(m.weight, torch.einsum("kbgot,kbgit->kgoi", dd, cols))
        if m.bias is not None:
            put(m.bias, _unit_sum(d.sum(tuple(range(2, d.ndim))), n_units))
        return
    # BatchNorm with running statistics: y = γ x̂ + β, x̂ = (x − μ)/√(σ² + eps)
    shape = (1, -1) + (1,) * (a.ndim - 2)
    dims = tuple(range(2, a.ndim))

    def spatial_sum(t):  # (n, C, ...) → (n, C); sum(()) would sum everything
        return t.sum(dims) if dims else t

    if m.weight is not None and m.weight in dest:
        xhat = (a - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)
        put(m.weight, _unit_sum(spatial_sum(d * xhat), n_units))
    if m.bias is not None:
        put(m.bias, _unit_sum(spatial_sum(d), n_units))


def _hooked_pass(model: nn.Module, mods, loss_of, params, *, keep_buffers: bool):
    """One forward pass ``loss_of()`` (a scalar) with the layers ``mods`` hooked, then one
    backward pass to their outputs and to ``params``: (calls, output grads, param grads).

    ``calls``: (module, input, output) of every hooked call. An output changed in place after
    its hook saw it (ReLU(inplace=True)) makes the forward run again on copies.
    ``keep_buffers`` False: buffers (running statistics) are restored after the backward."""
    calls, copy = [], set()

    def save(module, inputs, output):
        calls.append((module, inputs[0].detach(), output, output._version))
        if module in copy:  # an in-place op downstream edits the copy
            return output.clone()
        return None

    saved = None if keep_buffers else {k: b.detach().clone() for k, b in model.named_buffers()}
    handles = [m.register_forward_hook(save) for m in mods]
    try:
        loss = loss_of()
        edited = {m for m, _, o, v in calls if o._version != v}
        if edited:  # outputs changed in place after the hook saw them: again, on copies
            copy.update(edited)
            calls.clear()
            loss = loss_of()
        for h in handles:
            h.remove()
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise ValueError("the loss must be a scalar (reduction='mean'), got "
                             f"{getattr(loss, 'shape', type(loss))}")
        outputs = [o for _, _, o, _ in calls]
        grads = torch.autograd.grad(loss, outputs + list(params), allow_unused=True)
    finally:  # after the backward pass, which may need the buffers as they were
        for h in handles:
            h.remove()
        if saved is not None:
            with torch.no_grad():
                for k, b in model.named_buffers():
                    if not torch.equal(b, saved[k]):
                        b.copy_(saved[k])
    n = len(calls)
    return [(m, a) for m, a, _, _ in calls], grads[:n], grads[n:]


def _assemble_units(calls, out_grads, params, sizes, n_units: int, dtype, device):
    """(M, p) unit gradients from the hooked calls (:func:`_layer_unit_grads`); parameters no
    hooked call reached get 0."""
    units = torch.empty(n_units, sum(sizes), dtype=dtype, device=device)
    dest, offset = {"written": set()}, 0
    for p, size in zip(params, sizes, strict=True):
        dest[p] = units[:, offset:offset + size]
        offset += size
    with torch.no_grad():
        for (m, a), d in zip(calls, out_grads, strict=True):
            if d is None:  # an output that does not reach the loss: contributes nothing
                continue
            _layer_unit_grads(m, a, d.detach(), n_units, dest)
        for p in params:
            if p not in dest["written"]:
                dest[p].zero_()
    return units


def _sums_match(units: torch.Tensor, ref: torch.Tensor) -> bool:
    """Σ_k units_k equals autograd's gradient (to 1e-3 of its largest entry): the hooks saw
    every use of every parameter."""
    err = float((units.sum(0) - ref).abs().max())
    return err <= 1e-3 * float(ref.abs().max()) + 1e-30


def _hook_unit_grads(fn: ModelFunction, mods, x, y, n_units: int, *, verify: bool):
    """(M, p) unit gradients by the hook path (see above); ``verify`` also checks their sum
    against autograd's gradient and returns None on a mismatch (a parameter used outside its
    module's forward, say)."""

    def loss_of():  # Σ_k L_k: each unit's mean loss, summed
        return fn.criterion(fn.model(x), y) * n_units

    calls, out_grads, p_grads = _hooked_pass(fn.model, mods, loss_of,
                                             fn.params if verify else (), keep_buffers=False)
    units = _assemble_units(calls, out_grads, fn.params, fn.sizes, n_units, fn.dtype, fn.device)
    if verify:
        ref = fn.flatten([g.detach() if g is not None else torch.zeros_like(p)
                          for g, p in zip(p_grads, fn.params, strict=True)])
        if not _sums_match(units, ref):
            return None
    return units


def split_backward(model: nn.Module, params, loss_fn, x, y, n_units: int):
    r"""``loss_fn(x, y).backward()`` in one pass that also yields the M = ``n_units`` gradient
    increments of its consecutive micro-batches, or None where the hook path does not apply.

    With L = (1/M) Σ_k L_k (``loss_fn`` the batch's mean loss, micro-batches of B/M
    examples), the increments are d_k = ∇L_k/M, Σ_k d_k = ∇L: what accumulating
    ``(loss_fn(x_k, y_k)/M).backward()`` over the micro-batches adds to ``p.grad`` step by step,
    from one forward and one backward pass of the whole batch (per-layer products, as in
    :func:`unit_gradients`). Adds ∇L to ``p.grad`` like ``backward()`` and returns
    (loss detached, (M, p) increments), the parameters in ``params`` order. None (nothing
    changed, nothing added) when the model has BatchNorm in training mode or layers the hooks
    do not cover, or when the increments do not sum to autograd's gradient (a parameter used
    outside its layer, or a loss_fn adding a term such as weight decay; remembered per model,
    so that only the first call pays for the attempt).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    n_units = check_count(n_units, "n_units")
    n = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim else 0
    if n == 0 or n % n_units:
        raise ValueError(f"the batch (x of shape {tuple(getattr(x, 'shape', ()))}) must split "
                         f"into n_units={n_units} equal micro-batches")
    mods = None if has_training_batchnorm(model) else _hook_modules(model)
    if mods is None or _SPLIT_OK.get(model) is False:
        return None
    holder = {}

    def loss_of():
        holder["loss"] = loss_fn(x, y)
        return holder["loss"]

    params = list(params)
    calls, out_grads, p_grads = _hooked_pass(model, mods, loss_of, params, keep_buffers=True)
    sizes = [p.numel() for p in params]
    units = _assemble_units(calls, out_grads, params, sizes, n_units, params[0].dtype,
                            params[0].device)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(p_grads, params, strict=True)])
    ok = _sums_match(units, flat)
    _SPLIT_OK[model] = ok
    if not ok:
        return None
    with torch.no_grad():
        for p, g in zip(params, p_grads, strict=True):
            if g is not None:
                p.grad = g.detach() if p.grad is None else p.grad.add_(g)
    return holder["loss"].detach(), units


def _vmap_unit_grads(fn: ModelFunction, x, y, n_units: int, *, randomness="different"):
    """(M, p) unit gradients by ``vmap(grad)`` over units; each unit gets its own copy of the
    buffers (BatchNorm in training mode normalises by the unit and updates the copy)."""
    params = tuple(p.detach() for p in fn.params)
    if n_units == x.shape[0]:  # one example per unit
        g = vmap(grad(fn.example_loss), in_dims=(None, 0, 0), randomness=randomness)(params, x, y)
        return fn.flatten(g, batch_dims=1)
    xs = x.reshape(n_units, -1, *x.shape[1:])
    ys = y.reshape(n_units, -1, *y.shape[1:])
    bufs = {k: b.detach().unsqueeze(0).expand(n_units, *b.shape).clone()
            for k, b in fn.model.named_buffers()}
    g = vmap(grad(fn.loss), in_dims=(None, 0, 0, 0), randomness=randomness)(params, xs, ys, bufs)
    return fn.flatten(g, batch_dims=1)


def unit_gradients(fn: ModelFunction, x, y, micro_batch: int, *, chunk_units: int | None = None,
                   randomness: str = "different"):
    """Yield (first unit index, (k, p) tensor) for the mean gradients of consecutive units of
    ``micro_batch`` examples, k ≤ ``chunk_units`` units at a time (default: keep the (k, p)
    block within 32 MiB on a CPU, 2**28 numbers on a GPU). Fastest available path (hooks, else
    vmap; ``randomness`` other than 'different', e.g. 'same' dropout masks for every unit,
    forces vmap); model left unchanged."""
    n_units = x.shape[0] // micro_batch
    if chunk_units is None:
        # CPU: glibc maps every block over 32 MiB afresh and returns it on free, so each call
        # would pay a page fault per 4 KiB (35 ms per 100 MB, a third of a ResNet's per-sample
        # pass); blocks up to 32 MiB are reused from its heap once one has been freed.
        budget = 2**28 if fn.device.type == "cuda" else 2**25 // fn.dtype.itemsize
        chunk_units = max(1, min(n_units, budget // fn.numel))
    mods = None if (has_training_batchnorm(fn.model) or randomness != "different") \
        else _hook_modules(fn.model)
    for start in range(0, n_units, chunk_units):
        k = min(chunk_units, n_units - start)
        sl = slice(start * micro_batch, (start + k) * micro_batch)
        units = None
        if mods is not None and _HOOK_OK.get(fn.model, True):
            units = _hook_unit_grads(fn, mods, x[sl], y[sl], k,
                                     verify=fn.model not in _HOOK_OK)
            _HOOK_OK[fn.model] = units is not None
        if units is None:
            units = _vmap_unit_grads(fn, x[sl], y[sl], k, randomness=randomness)
        yield start, units


def _check_fn(fn) -> ModelFunction:
    if not isinstance(fn, ModelFunction):
        raise ValueError(f"fn must be a validate.measure.ModelFunction(model, criterion), got "
                         f"{type(fn).__name__}")
    return fn


def per_sample_gradients(fn: ModelFunction, x, y, *, randomness: str = "different"):
    """Per-example gradients ∇ℓ_i as an (n, p) tensor (mean-loss units of one example).

    ``randomness``: ``torch.func.vmap``'s handling of random operations (dropout):
    ``'different'`` (a mask per example, as in training), ``'same'`` or ``'error'``."""
    _check_fn(fn)
    check_choice(randomness, "randomness", ("different", "same", "error"))
    if has_training_batchnorm(fn.model):
        raise ValueError("per-sample gradients need per-example losses, but the model has "
                         "BatchNorm in training mode; use micro_batch_gradients (or model.eval())")
    fn.check_data(x, y, ("x", "y"))
    return torch.cat([g for _, g in unit_gradients(fn, x, y, 1, randomness=randomness)])


def micro_batch_gradients(fn: ModelFunction, x, y, micro_batch: int):
    """An iterator over the mean gradients (flat (p,) tensors) of the consecutive micro-batches
    of ``micro_batch`` examples of (x, y); ``micro_batch`` must divide the batch. The
    arguments are checked at the call, the gradients computed as the iterator is consumed."""
    _check_fn(fn)
    n = fn.check_data(x, y, ("x", "y"))
    b = check_micro_batch(micro_batch, n, min_units=1,
                          batch_stats=has_training_batchnorm(fn.model))

    def gen():
        for _, units in unit_gradients(fn, x, y, b):
            yield from units

    return gen()


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

    ``per_sample``: per-example gradients g_i, then tr(Σ) = Σ|g_i − ḡ|²/(n−1) and
    |G|² = |ḡ|² − tr(Σ)/n (the two-batch formula with b = 1). ``micro_batch``: mean gradients
    g_k of consecutive micro-batches of b examples (as in gradient accumulation) and their mean
    as the big-batch gradient, |G|² = (B|ḡ|² − b·mean_k|g_k|²)/(B − b),
    tr(Σ) = (mean_k|g_k|² − |ḡ|²)/(1/b − 1/B). Either way the unit gradients come from one
    vectorised pass per chunk, not a loop: per-layer products of inputs and output gradients
    for Linear/Conv/BatchNorm-eval networks (the arithmetic of one training step), else
    ``torch.func.vmap(grad)`` over the units (BatchNorm in training mode normalises each
    micro-batch by its own statistics, as gradient accumulation does).
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
        chunk_size: examples per vectorised pass (memory bound: chunk_size/b unit gradients
            of p numbers are held at once); default keeps a chunk under 2**25 numbers.
        n_groups: the units are summed into this many contiguous groups for the delete-a-group
            jackknife (memory: n_groups × p numbers; ≥ 3 for a standard error).

    Returns:
        :class:`GradientNoise` (floats). The statistics are formed from the unit gradients
        times a power of two that brings their largest entry to order 1, so gradients of
        1e-30 or 1e30 (float32) give the same B_simple as the unscaled loss; a |G|² or tr(Σ)
        beyond float64 (gradients near 1e±160) raises ``ValueError`` ("… overflows/underflows
        float64 …; rescale the loss").

    Raises:
        ValueError: naming the argument, for any bad input: a model that is not an
            ``nn.Module``, inputs that do not fit the model (shape, dtype, device), targets the
            criterion cannot take, counts that are not positive integers (NumPy integers are
            accepted, bools and floats are not).

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
    n_groups = check_count(n_groups, "n_groups")
    check_choice(method, "method", ("auto", "per_sample", "micro_batch"))
    n = fn.check_data(inputs, targets)
    bn = has_training_batchnorm(model)
    if method == "auto":
        method = "micro_batch" if (bn or micro_batch is not None) else "per_sample"
    if method == "per_sample":
        if bn:
            raise ValueError(
                "method='per_sample' needs per-example losses, but the model has BatchNorm in "
                "training mode; use method='micro_batch' (or model.eval())"
            )
        if micro_batch is not None and check_count(micro_batch, "micro_batch") != 1:
            raise ValueError(f"micro_batch must be None or 1 for per_sample, got {micro_batch}")
        if n < 2:
            raise ValueError(f"per-sample estimates need a batch of at least 2, got {n}")
        b = 1
    else:
        b = micro_batch_for(micro_batch, n, model, max_units=_MAX_UNITS)
    chunk_units = None
    if chunk_size is not None:
        chunk_units = max(1, check_count(chunk_size, "chunk_size") // b)
    acc = _GroupSums(n // b, fn.numel, fn.dtype, fn.device, n_groups)
    for start, units in unit_gradients(fn, inputs, targets, b, chunk_units=chunk_units):
        acc.add(units, start)
    from sgdtheory.estimators import two_batch

    stats = _gram_statistics(acc.sums, acc.q, acc.counts)
    point, leave_out = unit_statistics(*stats, acc.counts, b, two_batch)
    return _noise_result(point, leave_out, method, n, b, n // b, -2 * acc.e)


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

    local_batch = check_count(local_batch, "local_batch")
    norm_only = not (isinstance(local_grad, torch.Tensor) and local_grad.ndim == 1)
    if isinstance(local_grad, torch.Tensor) and local_grad.is_complex():
        raise ValueError(f"local_grad must be real, got {local_grad.dtype}")
    if norm_only:
        if isinstance(local_grad, torch.Tensor) and local_grad.ndim > 1:
            raise ValueError("local_grad must be a flat 1-D tensor or a squared norm")
        try:
            from sgdtheory import _checks

            local_sq = _checks.real("local_grad (a squared norm)", local_grad)
        except ValueError as exc:
            raise ValueError(f"{exc}; or pass a flat 1-D gradient tensor") from None
        if local_sq < 0:
            raise ValueError(f"local_grad (a squared norm) must be >= 0, got {local_sq}")
        if global_grad is None:
            raise ValueError("global_grad is required when local_grad is a squared norm")
    elif not bool(torch.isfinite(local_grad).all()):
        raise ValueError("local_grad must be finite")
    if global_grad is not None:
        if not isinstance(global_grad, torch.Tensor) or global_grad.ndim != 1 \
                or global_grad.is_complex():
            raise ValueError("global_grad must be a flat, real 1-D tensor of the trainable "
                             "parameters")
        if not norm_only and global_grad.shape != local_grad.shape:
            raise ValueError(
                f"global_grad shape {tuple(global_grad.shape)} must match local_grad "
                f"{tuple(local_grad.shape)}")
        if not bool(torch.isfinite(global_grad).all()):
            raise ValueError("global_grad must be finite")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised (call init_process_group first)")
    world = dist.get_world_size(group)
    if world < 2:
        raise ValueError(f"distributed_gradient_noise needs at least 2 ranks, got {world}")
    ref = global_grad if norm_only else local_grad
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
    if not (math.isfinite(total_sq) and np.all(np.isfinite(parts[:, : 1 if norm_only else 2]))):
        raise ValueError("squared gradient norms overflow float64; rescale the loss (e.g. "
                         "divide it by a constant) before measuring")
    from sgdtheory.estimators import two_batch

    point, leave_out = unit_statistics(
        total_sq, world * parts[:, 1], parts[:, 0], parts[:, 0], np.ones(world),
        local_batch, two_batch,
    )
    if norm_only:
        leave_out = None
    return _noise_result(point, leave_out, "distributed", world * local_batch, local_batch, world)


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
