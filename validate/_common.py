"""Shared plumbing for :mod:`validate.measure`: input checks and the functional loss.

Everything here works on the *trainable* parameters of a model (``requires_grad=True``), in
the order of ``model.parameters()``; a "flat" vector is their concatenation (length p).
Measurements never modify the model: buffers (BatchNorm running statistics) are cloned before
each functional forward pass, so a measurement in training mode leaves them untouched.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

__all__ = [
    "ModelFunction",
    "check_batch",
    "check_choice",
    "check_count",
    "check_criterion",
    "check_flag",
    "check_seed",
    "declared_reduction",
    "has_training_batchnorm",
    "micro_batch_for",
]


def declared_reduction(criterion):
    """The reduction a loss declares: ``criterion.reduction`` (torch loss modules), the
    ``reduction`` keyword of a ``functools.partial``, else None (a plain callable: undeclared).
    """
    reduction = getattr(criterion, "reduction", None)
    if reduction is None:
        reduction = (getattr(criterion, "keywords", None) or {}).get("reduction")
    return reduction


def check_criterion(criterion) -> None:
    """Raise ``ValueError`` unless ``criterion`` is a loss with mean reduction.

    A ``torch.nn`` loss module must have ``reduction == 'mean'`` (the per-example gradients
    and the estimators assume L = mean of per-example losses). A plain callable without a
    ``reduction`` attribute must return the mean loss, a 0-d tensor: its shape is checked on
    every call and its reduction once per measurement by :meth:`ModelFunction.check_reduction`.
    """
    if not callable(criterion):
        raise ValueError(f"criterion must be callable (a torch loss), got {criterion!r}")
    reduction = declared_reduction(criterion)
    if reduction not in (None, "mean"):
        raise ValueError(
            f"criterion must use reduction='mean' (L = mean of per-example losses), "
            f"got reduction={reduction!r}"
        )


def check_batch(inputs, targets, names=("inputs", "targets")) -> int:
    """Return the batch size n after checking that inputs and targets are real, finite torch
    tensors with the same leading batch dimension (n ≥ 1); ``names``: the arguments' names in
    the messages."""
    for value, name in zip((inputs, targets), names, strict=True):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch tensor, got {type(value).__name__}")
        if value.is_complex():
            raise ValueError(f"{name} must be real, got {value.dtype}")
        if value.ndim == 0:
            raise ValueError(f"{name} must have a leading batch dimension, got a 0-d tensor")
    n = inputs.shape[0]
    if targets.shape[0] != n:
        raise ValueError(f"{names[0]} and {names[1]} must have the same batch size, got {n} "
                         f"and {targets.shape[0]}")
    if n < 1:
        raise ValueError(f"{names[0]} must hold at least one example")
    for value, name in zip((inputs, targets), names, strict=True):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} must be finite")
    return n


def check_seed(seed) -> int:
    """``seed`` as a Python int ≥ 0 (NumPy integers accepted; no bool, float or string)."""
    return check_count(seed, "seed", minimum=0)


def check_flag(value, name: str) -> bool:
    """``value`` as a bool: True/False or a NumPy bool, nothing else (``"no"`` is truthy)."""
    from sgdtheory import _checks

    return _checks.flag(name, value)


def check_choice(value, name: str, choices) -> str:
    """``value`` if it is one of the strings ``choices``, else ``ValueError`` naming it."""
    if not (isinstance(value, str) and value in choices):
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def check_count(value, name: str, *, minimum: int = 1) -> int:
    """``value`` as a Python int ≥ ``minimum``; accepts any integer type (``np.int64``, a 0-d
    integer tensor via ``__index__``) but not bool or float. Raises ``ValueError`` naming it."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    try:
        out = operator.index(value)
    except (TypeError, RuntimeError):
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}") from None
    if out < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {out}")
    return out


def check_micro_batch(micro_batch, n: int, *, name: str = "micro_batch", min_units: int = 2,
                      batch_stats: bool = False):
    """Check that ``micro_batch`` is a positive integer dividing n into ≥ min_units parts
    (and ≥ 2 examples when ``batch_stats``: BatchNorm normalising by batch statistics)."""
    try:
        micro_batch = check_count(micro_batch, name)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {micro_batch!r}") from None
    if n % micro_batch:
        raise ValueError(f"{name} ({micro_batch}) must divide the batch size ({n})")
    if n // micro_batch < min_units:
        raise ValueError(
            f"{name} ({micro_batch}) must split the batch ({n}) into at least {min_units} parts"
        )
    if micro_batch == 1 and batch_stats:
        raise ValueError(
            f"{name}=1 with BatchNorm normalising by batch statistics: the statistics of one "
            "example are undefined; use micro-batches of at least 2 examples (or model.eval())"
        )
    return micro_batch


def has_training_batchnorm(model: nn.Module) -> bool:
    """True when some BatchNorm layer of ``model`` normalises with batch statistics: in
    training mode, or in eval mode without running statistics (``track_running_stats=False``).
    Per-example gradients of such a model are those of a different function."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and (m.training or m.running_mean is None)
        for m in model.modules()
    )


def default_micro_batch(n: int, *, max_units: int, min_size: int) -> int:
    """Smallest divisor b ≥ min_size of n with n/b ≤ max_units (falls back to n // 2 parts)."""
    for b in range(max(1, min_size), n // 2 + 1):
        if n % b == 0 and n // b <= max_units:
            return b
    for b in range(max(1, min_size), n // 2 + 1):
        if n % b == 0:
            return b
    raise ValueError(
        f"batch size {n} cannot be split into at least 2 micro-batches of at least "
        f"{min_size} examples; pass micro_batch explicitly or use a larger batch"
    )


def micro_batch_for(micro_batch, n: int, model: nn.Module, *, max_units: int) -> int:
    """The micro-batch size b for a batch of n examples: ``micro_batch`` checked (dividing n
    into ≥ 2 parts; ≥ 2 examples with BatchNorm normalising by batch statistics), or by
    default the smallest divisor giving at most ``max_units`` micro-batches."""
    bn = has_training_batchnorm(model)
    if micro_batch is None:
        micro_batch = default_micro_batch(n, max_units=max_units, min_size=2 if bn else 1)
    return check_micro_batch(micro_batch, n, batch_stats=bn)


# models whose batches of a kind passed ModelFunction.check_data's probe: the probe's forward
# pass (~20% of a per-sample measurement on a small CNN) is not repeated for them
_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class ModelFunction:
    """The mean loss L(θ; x, y) of ``model`` as a function of its trainable parameters.

    Attributes:
        params: the trainable parameters (tensors of the model, in ``model.parameters()`` order).
        names: their names in ``model.named_parameters()``.
        numel: p, the number of trainable scalars.
    """

    model: nn.Module
    criterion: object

    def __post_init__(self):
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        check_criterion(self.criterion)
        named = [(k, v) for k, v in self.model.named_parameters() if v.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters (requires_grad=True)")
        finite = torch.stack([torch.isfinite(v.detach()).all() for _, v in named])
        bad = [] if bool(finite.all()) else [k for (k, _), ok in zip(named, finite.tolist(),
                                                                     strict=True) if not ok]
        if bad:
            raise ValueError(f"model parameters are not finite (diverged?): {', '.join(bad[:3])}"
                             + (" …" if len(bad) > 3 else ""))
        self.names = [k for k, _ in named]
        self.params = [v for _, v in named]
        self.frozen = {k: v for k, v in self.model.named_parameters() if not v.requires_grad}
        self.shapes = [v.shape for v in self.params]
        self.sizes = [v.numel() for v in self.params]
        self.numel = sum(self.sizes)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device

    # ------------------------------------------------------------------ functional loss
    def buffers(self) -> dict:
        """Clones of the model's buffers: a functional forward pass may update them (BatchNorm
        running statistics in training mode) without touching the model's own."""
        return {k: b.clone() for k, b in self.model.named_buffers()}

    def loss(self, params, x, y, buffers=None):
        """Mean loss at ``params`` (a tuple of tensors shaped like the trainable ones), with
        ``buffers`` (default: fresh clones of the model's)."""
        if buffers is None:
            buffers = self.buffers()
        out = functional_call(
            self.model, (dict(zip(self.names, params, strict=True)), self.frozen, buffers), (x,)
        )
        loss = self.criterion(out, y)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise ValueError(
                "criterion must return a scalar (reduction='mean'), got "
                f"{getattr(loss, 'shape', type(loss))}"
            )
        return loss

    def example_loss(self, params, x, y):
        """Loss of one example (x, y without batch axis): used under ``vmap``."""
        return self.loss(params, x.unsqueeze(0), y.unsqueeze(0))

    def check_data(self, x, y, names=("inputs", "targets")) -> int:
        """Check a batch against the model and the loss; return its size n.

        :func:`check_batch`, then — the first time this model and loss see inputs and targets
        of this shape, dtype and device (a loss declaring its reduction; a plain callable every
        time; class targets are range-checked on every batch) — one no-grad forward pass of up
        to 8 examples (on clones of the buffers): an error of the model on x (wrong shape,
        dtype or device) or of the
        criterion on its output and y (wrong target dtype, class out of range) becomes a
        ``ValueError`` naming ``names``, as does a non-finite or non-scalar loss. The outputs
        then serve :meth:`check_reduction`.
        """
        n = check_batch(x, y, names)
        key = self._probe_key(x, y)
        probed = _PROBED.get(self.model, {})
        if key is not None and key in probed and self._classes_fit(y, probed[key], names):
            return n  # this model and loss already took batches of this kind
        xs, ys = x[:min(8, n)], y[:min(8, n)]
        with torch.no_grad():
            try:
                out = functional_call(self.model, (dict(zip(self.names, self.params,
                                                            strict=True)),
                                                   self.frozen, self.buffers()), (xs,))
            except (RuntimeError, IndexError, TypeError, ValueError) as exc:
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    raise
                raise ValueError(
                    f"{names[0]} (shape {tuple(x.shape)}, {x.dtype}, {x.device}) do not fit the "
                    f"model (parameters {self.dtype}, {self.device}): {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
            try:
                loss = self.criterion(out, ys)
            except (RuntimeError, IndexError, TypeError, ValueError) as exc:
                raise ValueError(
                    f"criterion(model({names[0]}), {names[1]}) failed on {names[1]} of shape "
                    f"{tuple(y.shape)}, {y.dtype}: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise ValueError("criterion must return a scalar (reduction='mean'), got "
                                 f"{getattr(loss, 'shape', type(loss).__name__)}")
            if not bool(torch.isfinite(loss)):
                raise ValueError(f"criterion returned a non-finite loss ({float(loss)}) on "
                                 f"{names[0]} and {names[1]}")
            self.check_reduction(out, ys)
        if key is not None:
            _PROBED.setdefault(self.model, {})[key] = out.shape[1] if out.ndim >= 2 else None
        return n

    def _classes_fit(self, y, classes, names) -> bool:
        """Integer class targets y within [0, classes) (or the loss's ``ignore_index``): the
        part of the probe that depends on the values, checked on every batch (min and max);
        a target out of range is a ``ValueError`` naming ``names[1]``."""
        if classes is None or y.is_floating_point() or y.is_complex() or y.numel() == 0:
            return True
        ignore = getattr(self.criterion, "ignore_index", None)
        ok = (y >= 0) & (y < classes)
        if ignore is not None:
            ok |= y == ignore
        if not bool(ok.all()):
            bad = y[~ok][0].item()
            raise ValueError(f"{names[1]}: class {bad} is out of range for the model's "
                             f"{classes} outputs (classes 0 … {classes - 1})")
        return True

    def _probe_key(self, x, y):
        """What the probe of :meth:`check_data` depends on, for a criterion that declares its
        reduction (a plain callable is probed every time, for :meth:`check_reduction`): the
        example shape, dtype and device of x and y, the loss's type and settings, and the
        parameters' dtype and device. None when the criterion is not such a loss."""
        red = declared_reduction(self.criterion)
        if red is None or not isinstance(self.criterion, nn.Module):
            return None
        settings = tuple(sorted((k, v) for k, v in vars(self.criterion).items()
                                if isinstance(v, (int, float, str, bool, type(None)))))
        return (tuple(x.shape[1:]), x.dtype, x.device, tuple(y.shape[1:]), y.dtype, y.device,
                type(self.criterion), settings, self.dtype, self.device)

    def check_reduction(self, out, y) -> None:
        """Refuse a plain callable criterion that does not average over examples.

        A criterion that declares its reduction (a torch loss module, a ``functools.partial``
        with ``reduction=``) is trusted. Otherwise, on the model's outputs o (up to 8
        examples, from :meth:`check_data`), targets t, halves 1 and 2 of n₁, n₂ examples, a
        mean satisfies L(o, t) = (n₁ L(o₁, t₁) + n₂ L(o₂, t₂))/n, a sum L(o, t) = L(o₁, t₁) +
        L(o₂, t₂). Summed losses scale |G|², tr(Σ) by b² and are refused, as is a loss
        matching neither (not an average of per-example losses). Ties (all losses 0) pass.
        """
        n = out.shape[0]
        if declared_reduction(self.criterion) is not None or n < 2:
            return
        with torch.no_grad():
            h = n // 2
            parts = [self.criterion(out, y), self.criterion(out[:h], y[:h]),
                     self.criterion(out[h:], y[h:])]
        if any(not isinstance(v, torch.Tensor) or v.ndim != 0 for v in parts):
            raise ValueError("criterion must return a scalar (reduction='mean'), got "
                             f"{getattr(parts[0], 'shape', type(parts[0]))}")
        whole, first, second = (float(v) for v in parts)
        n1, n2 = n // 2, n - n // 2
        mean = (n1 * first + n2 * second) / n
        summed = first + second
        tol = max(float(torch.finfo(self.dtype).eps) ** 0.5, 1e-12) * max(
            abs(whole), abs(mean), abs(summed), 1e-300)
        if abs(whole - mean) <= tol:
            return
        if abs(whole - summed) <= tol:
            raise ValueError(
                "criterion sums the per-example losses (the loss of a batch equals the sum of "
                "the losses of its halves), which would scale |G|² and tr(Σ) by b²; use a mean "
                "reduction (e.g. nn.CrossEntropyLoss(), or divide by the batch size)")
        raise ValueError(
            "criterion is not a mean of per-example losses: on the same outputs the loss of a "
            f"batch ({whole:.6g}) is neither the mean ({mean:.6g}) nor the sum ({summed:.6g}) of "
            "its halves' losses; pass a loss with reduction='mean'")

    # ------------------------------------------------------------------ flat vectors
    def flatten(self, tensors, batch_dims: int = 0) -> torch.Tensor:
        """Concatenate per-parameter tensors into one flat vector (or a (k, p) matrix)."""
        lead = tensors[0].shape[:batch_dims]
        return torch.cat([t.reshape(*lead, -1) for t in tensors], dim=-1)

    def unflatten(self, flat: torch.Tensor):
        """Split a flat (p,) vector into tensors shaped like the trainable parameters."""
        if flat.ndim != 1 or flat.shape[0] != self.numel:
            raise ValueError(
                f"vector must be 1-D with {self.numel} entries (the trainable parameters), "
                f"got shape {tuple(flat.shape)}"
            )
        return tuple(c.view(s) for c, s in zip(flat.split(self.sizes), self.shapes, strict=True))

    def grad(self, x, y, *, create_graph: bool = False):
        """(loss, per-parameter gradients) of the mean loss on (x, y) by reverse mode."""
        params = tuple(self.params)
        loss = self.loss(params, x, y)
        # materialize: a parameter the loss does not use has gradient 0, not an error
        grads = torch.autograd.grad(loss, params, create_graph=create_graph,
                                    allow_unused=True, materialize_grads=True)
        return loss, grads

    def flat_grad(self, x, y) -> torch.Tensor:
        """∇L on (x, y) as a flat (p,) tensor (mean-loss units)."""
        return self.flatten([g.detach() for g in self.grad(x, y)[1]])
