r"""NoiseMonitor: gradient noise and curvature measured inside any PyTorch training loop.

Cheap mode (McCandlish et al. App. A, at no extra backward pass): a training step done by
gradient accumulation over M micro-batches already computes the micro-batch gradients g_k
(b = B/M examples each; the small batches) and their mean ḡ (the big batch of B). After each
micro-batch's ``backward()`` the monitor records |g_k|² from the increment of ``p.grad``; at
:meth:`NoiseMonitor.step` it forms the unbiased two-batch estimates of |G|² and tr(Σ)
(:func:`sgdtheory.estimators.two_batch`) and updates bias-corrected EMAs
(:class:`sgdtheory.estimators.NoiseScaleEMA`; ratios formed after averaging). Steps without
accumulation (M = 1) fall back to :func:`validate.measure.gradient_noise` on the batch passed
to :meth:`step` (an extra pass). On a slower schedule it measures GᵀHG, tr(HΣ)
(:func:`validate.measure.hessian_noise`, :class:`sgdtheory.estimators.CurvatureEMA`) and
λ_max (Lanczos), and reports ε_max, B_noise and the predicted ε_opt(B) = ε_max/(1+B_noise/B)
(:func:`sgdtheory.theory.eps_opt`) next to the learning rate in use.

Usage::

    monitor = NoiseMonitor(model, criterion=criterion, every=10, curvature_every=200,
                           csv_path="noise.csv")
    for x, y in loader:                         # batch of B examples
        opt.zero_grad()
        for xb, yb in zip(x.chunk(M), y.chunk(M)):
            (criterion(model(xb), yb) / M).backward()   # accumulation='mean'
            monitor.after_backward()
        monitor.step(lr=opt.param_groups[0]["lr"], inputs=x, targets=y)
        opt.step()

A loop without gradient accumulation gets the same at no extra pass from
:meth:`NoiseMonitor.backward`, which splits the backward into micro-batches on measured steps
only (otherwise :meth:`step` measures on ``inputs``/``targets`` with an extra pass)::

    for x, y in loader:
        opt.zero_grad()
        monitor.backward(lambda xb, yb: criterion(model(xb), yb), x, y)   # M = 4
        monitor.step(lr=opt.param_groups[0]["lr"], inputs=x, targets=y)
        opt.step()

Under ``DistributedDataParallel`` the increments of ``p.grad`` include the all-reduce: use
:func:`validate.measure.distributed_gradient_noise` with :class:`validate.measure.DDPNoiseHook`
there (each rank's local gradient is the small batch).

Units: ``lr`` multiplies the mean minibatch gradient (torch.optim.SGD's lr); |G|², tr(Σ) in
(loss/param)²; B_simple, B_noise, batch in examples; ε_max, ε_opt in ``lr`` units; λ_max in
loss/param².
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import _hvp, _noise
from ._common import check_count, check_criterion

__all__ = ["CurvaturePoint", "NoiseMonitor", "gd_limit", "measure_curvature", "predictions"]

#: Name of the stability-limit column in every record of this module and of
#: ``python -m validate.cifar noise``: the largest stable ``lr`` of (momentum) gradient descent on
#: the measured top Hessian mode, :func:`gd_limit`.
STABILITY_COLUMN = "gd_limit"

COLUMNS = [
    "step", "lr", "batch", "micro_batches", "grad_sq", "tr_sigma", "grad_sq_ema",
    "tr_sigma_ema", "b_simple_ema", "b_simple_ema_stderr", "g_h_g", "tr_h_sigma",
    "eps_max_ema", "b_noise_ema", "b_noise_ema_stderr", "lambda_max", "eps_opt",
    "lr_over_eps_opt", "gd_limit", "resolved", "reason",
]



# ---------------------------------------------------------------------------- shared core
def gd_limit(lambda_max: float, momentum: float = 0.0, nesterov: bool = False) -> float:
    r"""Largest stable ``lr`` of (momentum) gradient descent on the top Hessian mode λ_max:
    :func:`sgdtheory.theory.gd_stability_limit` (2(1+μ)/λ_max; Nesterov 2(1+μ)/((1+2μ)λ_max)),
    in ``lr`` units; nan when λ_max is not a positive finite number (not measured, or no
    positive curvature found). The one stability-limit rule of the monitor and of
    ``python -m validate.cifar noise`` (column :data:`STABILITY_COLUMN`).

    >>> gd_limit(4.0), gd_limit(4.0, 0.5, True)
    (0.5, 0.375)
    """
    from sgdtheory import theory

    lambda_max = float(lambda_max)
    if not (math.isfinite(lambda_max) and lambda_max > 0):
        return math.nan
    momentum = float(theory._momentum(momentum))
    return float(theory.gd_stability_limit(lambda_max, momentum,
                                           nesterov=bool(nesterov) and momentum > 0))


def predictions(lr: float, batch: int, *, eps_max: float, b_noise: float, lambda_max: float,
                momentum: float = 0.0, nesterov: bool = False, eps_max_stderr: float = math.nan,
                b_noise_stderr: float = math.nan) -> dict:
    r"""What the measured ε_max, B_noise and λ_max predict for the step in use.

    Returns a dict with ``effective_lr`` η/(1−μ), ``eps_opt`` ε_opt(B) = ε_max/(1 + B_noise/B)
    (:func:`sgdtheory.theory.eps_opt`; nan unless ε_max > 0 and B_noise ≥ 0 are finite),
    ``eps_opt_stderr`` (first-order propagation of the two standard errors with their
    correlation bounded by ±1, so an upper bound of the delta-method error: ε_max and B_noise
    share the GᵀHG estimate), ``lr_over_eps_opt`` η/(1−μ)/ε_opt and ``gd_limit``
    (:func:`gd_limit`), and ``eps_opt_reason``: '' or why ε_opt is not defined. All steps in
    ``lr`` units (multiplier of the mean minibatch gradient).

    >>> p = predictions(0.1, 64, eps_max=2.0, b_noise=64.0, lambda_max=4.0)
    >>> p["eps_opt"], p["gd_limit"], p["lr_over_eps_opt"]
    (1.0, 0.5, 0.1)
    """
    from sgdtheory import theory

    eff = float(lr) / (1.0 - float(momentum))
    out = {"effective_lr": eff, "eps_opt": math.nan, "eps_opt_stderr": math.nan,
           "lr_over_eps_opt": math.nan, "gd_limit": gd_limit(lambda_max, momentum, nesterov),
           "eps_opt_reason": ""}
    if 0 < eps_max < math.inf and 0 <= b_noise < math.inf:
        eo = float(theory.eps_opt(batch, eps_max, b_noise))
        d_eps = eo / eps_max                                  # ∂ε_opt/∂ε_max
        d_bn = eo * eo / (eps_max * batch)                    # |∂ε_opt/∂B_noise|
        out.update(eps_opt=eo, lr_over_eps_opt=eff / eo,
                   eps_opt_stderr=d_eps * eps_max_stderr + d_bn * b_noise_stderr)
    else:
        out["eps_opt_reason"] = (f"ε_opt(B={batch}) not defined: needs ε_max > 0 and "
                                 f"B_noise ≥ 0, got ε_max = {eps_max:.3g}, "
                                 f"B_noise = {b_noise:.3g}")
    return out


@dataclass(frozen=True)
class CurvaturePoint:
    """One curvature measurement at the model's current state (:func:`measure_curvature`).

    Attributes:
        noise: the :class:`validate._hvp.HessianNoise` (GᵀHG, tr(HΣ), ε_max, B_noise, |G|²,
            tr(Σ), B_simple with standard errors, ``resolved`` and ``reason``).
        lambda_max: top Hessian eigenvalue (loss/param²) by Lanczos; nan when not measured.
        lambda_max_converged: False when Lanczos stopped at its budget before its tolerance.
        vector: the top eigenvector (flat, for a warm start next time) or None.
    """

    noise: object
    lambda_max: float
    lambda_max_converged: bool
    vector: object = None


def measure_curvature(model: nn.Module, criterion, inputs, targets, *, micro_batch=None,
                      hessian_inputs=None, hessian_targets=None, lanczos_iters: int = 20,
                      tol: float = 1e-6, seed: int = 0, v0=None) -> CurvaturePoint:
    r"""hessian_noise + λ_max at the model's current state: the measurement core shared by
    :class:`NoiseMonitor` and ``python -m validate.cifar noise``.

    :func:`validate.measure.hessian_noise` on (inputs, targets) with Ĥ from
    (hessian_inputs, hessian_targets) (default: the second half of the batch), then λ_max by
    :func:`validate.measure.top_hessian_eigenvalue` on the Hessian batch (default: the whole
    batch) with ``lanczos_iters`` HVPs (0: skip, λ_max nan), tolerance ``tol``, random start
    ``seed`` or the warm start ``v0``. The model is left unchanged. A ``ValueError`` of the
    estimators (e.g. non-finite gradients) propagates.
    """
    from sgdtheory import krylov

    hn = _hvp.hessian_noise(model, criterion, inputs, targets, micro_batch=micro_batch,
                            hessian_inputs=hessian_inputs, hessian_targets=hessian_targets)
    if not lanczos_iters:
        return CurvaturePoint(hn, math.nan, True, None)
    hx, hy = (inputs, targets) if hessian_inputs is None else (hessian_inputs, hessian_targets)
    with warnings.catch_warnings(record=True) as caught:  # a fixed budget on purpose
        warnings.simplefilter("always")
        lam, vec = _hvp.top_hessian_eigenvalue(model, criterion, hx, hy, tol=tol,
                                               max_iter=lanczos_iters, seed=seed, v0=v0,
                                               return_vector=True)
    converged = not any(issubclass(w.category, krylov.KrylovConvergenceWarning)
                        for w in caught)
    return CurvaturePoint(hn, float(lam), converged, vec)


class NoiseMonitor:
    """Measures |G|², tr(Σ), B_simple every ``every`` steps, ε_max, B_noise, λ_max more rarely.

    Args:
        model: the network being trained (its trainable parameters are measured).
        criterion: the mean-reduction loss; needed for the fallback and curvature measurements.
        every: measure the gradient noise every ``every`` optimiser steps (≥ 1).
        curvature_every: measure ε_max, B_noise, λ_max every this many steps (None: never;
            must be a multiple of ``every``); needs ``inputs``/``targets`` at :meth:`step`.
        beta: EMA decay per measurement (:class:`sgdtheory.estimators.NoiseScaleEMA`).
        accumulation: ``'mean'`` if each micro-batch loss is divided by M (so ``p.grad`` is the
            mean gradient of the whole batch, the usual scaling) or ``'sum'`` if not.
        csv_path: append one row per measured step (columns :data:`COLUMNS`).
        tensorboard_dir: also log scalars with ``torch.utils.tensorboard`` (when installed).
        hessian_micro_batch: micro-batch size for :func:`hessian_noise` (default: automatic).
        lanczos_iters: Lanczos iterations for λ_max (0: skip λ_max; else ≥ 3), each started
            from the previous measurement's top eigenvector (a warm start).
        momentum, nesterov: the optimiser's momentum μ (torch form) and Nesterov flag, for the
            stability limit ``gd_limit`` (2(1+μ)/λ_max, Nesterov 2(1+μ)/((1+2μ)λ_max), in
            ``lr`` units) and ``lr_over_eps_opt``, which compares the effective step
            η/(1−μ) with ε_opt(B).
        csv_append: append to an existing ``csv_path`` (e.g. a resumed run) instead of
            starting a new file.

    Attributes:
        records: list of dicts, one per measured step. ``noise_ema``, ``curvature_ema``: the
        estimators' EMAs.

    Unresolved estimates: early in training the averaged |G|² or GᵀHG is often ≤ 0 within its
    error, so B_simple, ε_max, B_noise and ε_opt mean nothing yet. Such a record has
    ``resolved`` False and ``reason`` saying which estimate and its error (e.g. "GᵀHG (EMA) =
    -3 ± 5: not resolved; use more examples"); a ratio whose denominator is ≤ 0 is NaN, never
    ±inf, and the first record unresolved for a reason other than too few measurements raises
    one ``UserWarning``. ``resolved`` is True once every estimate in
    the record is significantly positive (> t₀.₉₇₅·standard error, which needs ≥ 2
    measurements) and ε_opt(B) is defined: a record whose ``eps_opt`` is NaN although GᵀHG is
    resolved (B_noise < 0 from a negative tr(HΣ) estimate) has ``resolved`` False and a
    ``reason`` too, and warns once like the others.

    The curvature step is :func:`measure_curvature` and the derived columns come from
    :func:`predictions` — the same code as ``python -m validate.cifar noise`` — with the
    stability limit in the column ``gd_limit`` (:data:`STABILITY_COLUMN`) in both.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        criterion=None,
        every: int = 10,
        curvature_every: int | None = None,
        beta: float = 0.99,
        accumulation: str = "mean",
        csv_path: str | os.PathLike | None = None,
        tensorboard_dir: str | os.PathLike | None = None,
        hessian_micro_batch: int | None = None,
        lanczos_iters: int = 20,
        momentum: float = 0.0,
        nesterov: bool = False,
        csv_append: bool = False,
    ):
        from sgdtheory import theory
        from sgdtheory.estimators import CurvatureEMA, NoiseScaleEMA

        every, curvature_every = _check_schedule(every, curvature_every, criterion)
        if accumulation not in ("mean", "sum"):
            raise ValueError(f"accumulation must be 'mean' or 'sum', got {accumulation!r}")
        if criterion is not None:
            check_criterion(criterion)
        hessian_micro_batch, lanczos_iters = _check_curvature_sizes(hessian_micro_batch,
                                                                    lanczos_iters)
        self.momentum = float(theory._momentum(momentum))
        self.nesterov = bool(nesterov)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters (requires_grad=True)")
        self.model = model
        self.criterion = criterion
        self.every = every
        self.curvature_every = curvature_every
        self.accumulation = accumulation
        self.hessian_micro_batch = hessian_micro_batch
        self.lanczos_iters = lanczos_iters
        self.noise_ema = NoiseScaleEMA(beta)
        self.curvature_ema = CurvatureEMA(beta)
        self.lambda_max = math.nan
        self.records: list[dict] = []
        self.step_count = 0
        self._warned = False
        self._lanczos_vector = None
        self._prev = None
        self._sq: list[float] = []
        self._csv_path = csv_path
        self._csv_file, self._writer = _open_csv(csv_path, csv_append)
        self._tb = _open_tensorboard(tensorboard_dir)

    # ------------------------------------------------------------------ schedule
    @property
    def measuring(self) -> bool:
        """Whether the current step is a gradient-noise measurement step."""
        return self.step_count % self.every == 0

    def _flat_grad(self) -> torch.Tensor:
        return torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in self.params
        ])

    def after_backward(self) -> None:
        """Call after each micro-batch's ``backward()``; records |Δ p.grad|² on measured steps.

        ``p.grad`` must be zero (or None) before the first micro-batch of the step.
        """
        if not self.measuring:
            return
        with torch.no_grad():
            cur = self._flat_grad()
            d = cur if self._prev is None else cur - self._prev
            self._sq.append(float(torch.dot(d, d)))
            self._prev = cur

    def backward(self, loss_fn, inputs, targets, *, micro_batches: int = 4) -> torch.Tensor:
        r"""The training step's backward pass, split on measured steps so that the noise
        measurement costs no extra pass (for loops without gradient accumulation).

        Other steps: ``loss_fn(inputs, targets).backward()``. Measured steps need the
        gradients g_k of M = ``micro_batches`` consecutive micro-batches of b = B/M examples.
        Where every trainable parameter sits in a Linear, Conv or BatchNorm-eval layer (no
        BatchNorm in training mode) they come from the one backward pass itself, as per-layer
        products of inputs and output gradients (:func:`validate.measure.split_backward`;
        ``p.grad`` as ``backward()`` gives it). Otherwise the batch is cut and
        ``(loss_fn(x_k, y_k) / M).backward()`` is run for each micro-batch, with
        :meth:`after_backward` after each: ``p.grad`` ends as the gradient of the mean loss
        over the batch, ḡ = (1/M) Σ_k g_k, as one backward would give it — except that a
        BatchNorm layer in training mode normalises each micro-batch by its own statistics on
        those steps (and updates its running statistics M times). Call with ``p.grad``
        zeroed, then :meth:`step` as usual. Needs ``accumulation='mean'``.

        Args:
            loss_fn: ``loss_fn(x, y)`` → the *mean* loss of the examples (x, y), e.g.
                ``lambda x, y: criterion(model(x), y)``.
            inputs, targets: the step's batch of B examples (B divisible by M).
            micro_batches: M ≥ 2 on measured steps.

        Returns:
            The batch's mean loss (detached): on measured steps the mean of the M micro-batch
            losses.
        """
        if self.accumulation != "mean":
            raise ValueError("NoiseMonitor.backward needs accumulation='mean'")
        m = check_count(micro_batches, "micro_batches")
        if m < 2:
            raise ValueError(f"micro_batches must be at least 2, got {m}")
        if not self.measuring:
            loss = loss_fn(inputs, targets)
            loss.backward()
            return loss.detach()
        n = int(inputs.shape[0])
        if n % m or int(targets.shape[0]) != n:
            raise ValueError(f"the batch of {n} examples (targets {int(targets.shape[0])}) must "
                             f"split into micro_batches={m} equal parts")
        one_pass = _noise.split_backward(self.model, self.params, loss_fn, inputs, targets, m)
        if one_pass is not None:
            loss, increments = one_pass
            self._sq = [float(v) for v in _noise._row_sq(increments)]
            self._prev = self._flat_grad()
            return loss
        total = 0.0
        for xb, yb in zip(inputs.chunk(m), targets.chunk(m), strict=True):
            loss = loss_fn(xb, yb) / m
            loss.backward()
            self.after_backward()
            total = total + loss.detach()
        return total

    # ------------------------------------------------------------------ step
    def step(self, lr: float, *, batch_size: int | None = None, inputs=None, targets=None,
             grad_scale: float = 1.0):
        """Finish the step (before ``optimizer.step()``/``zero_grad()``); returns the record.

        Args:
            lr: learning rate in use (multiplier of the mean minibatch gradient, > 0).
            batch_size: B, examples in the step (default: ``inputs.shape[0]``).
            inputs, targets: the step's batch, used for curvature measurements and when the
                step had a single micro-batch.
            grad_scale: the factor ``p.grad`` carries, e.g. ``scaler.get_scale()`` under
                ``torch.amp.GradScaler`` (call before ``scaler.unscale_``/``scaler.step``);
                squared norms are divided by its square.

        Returns:
            The dict written to the CSV on measured steps, else None.
        """
        lr = float(lr)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be positive and finite, got {lr!r}")
        if batch_size is None:
            if inputs is None:
                raise ValueError("give batch_size or inputs to NoiseMonitor.step")
            batch_size = int(inputs.shape[0])
        try:
            batch_size = check_count(batch_size, "batch_size")
        except ValueError:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}") from None
        grad_scale = float(grad_scale)
        if not (math.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"grad_scale must be positive and finite, got {grad_scale!r}")
        if grad_scale != 1.0 and self._sq:
            self._sq = [s / grad_scale**2 for s in self._sq]
            self._prev = self._prev / grad_scale
        record = None
        try:
            if self.measuring:
                record = self._measure(lr, batch_size, inputs, targets)
        finally:
            self._prev = None
            self._sq = []
            self.step_count += 1
        return record

    def _measure(self, lr, batch, inputs, targets) -> dict:
        rec = dict.fromkeys(COLUMNS, math.nan)
        rec.update(step=self.step_count, lr=lr, batch=batch, micro_batches=len(self._sq))
        rec.update(self._gradient_noise(batch, inputs, targets))
        if self.curvature_every and self.step_count % self.curvature_every == 0:
            if inputs is None or targets is None:
                raise ValueError("curvature measurement steps need inputs and targets")
            rec.update(self._curvature(inputs, targets))
        reasons = self._predict(rec, lr, batch)
        return self._finish(rec, reasons)

    def _gradient_noise(self, batch, inputs, targets) -> dict:
        """|G|², tr(Σ) of this step (two-batch from the micro-batch increments, or the
        fallback measurement) and the updated noise EMA."""
        from sgdtheory.estimators import two_batch

        m = len(self._sq)
        if m >= 2:
            if batch % m:
                raise ValueError(f"batch_size ({batch}) must be divisible by the {m} micro-batches")
            scale = m * m if self.accumulation == "mean" else 1.0
            small = scale * sum(self._sq) / m
            big = float(torch.dot(self._prev, self._prev))
            big = big if self.accumulation == "mean" else big / (m * m)
            grad_sq, tr_sigma = two_batch(small, big, batch // m, batch)
        elif inputs is not None and targets is not None and self.criterion is not None:
            est = _noise.gradient_noise(self.model, self.criterion, inputs, targets)
            grad_sq, tr_sigma = est.grad_sq, est.tr_sigma
        else:
            raise ValueError(
                "NoiseMonitor needs >= 2 micro-batch gradients on a measured step (call "
                "after_backward() after each micro-batch backward) or inputs, targets and a "
                "criterion for an extra measurement"
            )
        self.noise_ema.update(grad_sq, tr_sigma)
        return dict(grad_sq=grad_sq, tr_sigma=tr_sigma, grad_sq_ema=self.noise_ema.grad_sq,
                    tr_sigma_ema=self.noise_ema.tr_sigma, b_simple_ema=self.noise_ema.b_simple,
                    b_simple_ema_stderr=self.noise_ema.b_simple_stderr)

    def _curvature(self, inputs, targets) -> dict:
        """GᵀHG, tr(HΣ) (into the curvature EMA) and λ_max, warm-started from the last point's
        top eigenvector (:func:`measure_curvature`)."""
        point = measure_curvature(self.model, self.criterion, inputs, targets,
                                  micro_batch=self.hessian_micro_batch,
                                  lanczos_iters=self.lanczos_iters, v0=self._lanczos_vector)
        h = point.noise
        self.curvature_ema.update(h.g_h_g, h.tr_h_sigma, grad_sq=h.grad_sq)
        if self.lanczos_iters > 0:
            self.lambda_max, self._lanczos_vector = point.lambda_max, point.vector
        return dict(g_h_g=h.g_h_g, tr_h_sigma=h.tr_h_sigma)

    def _predict(self, rec: dict, lr, batch) -> list[str]:
        """Fill ε_max, B_noise, ε_opt, lr/ε_opt and gd_limit from the EMAs (:func:`predictions`);
        returns the reasons the record is not resolved."""
        reasons = [_noise.resolution("|G|² (EMA)", self.noise_ema.grad_sq,
                                     self.noise_ema.grad_sq_stderr, self.noise_ema.df,
                                     hint="wait for more measurements")]
        if self.curvature_ema.n_updates:
            est = self.curvature_ema.estimate()
            rec.update(eps_max_ema=est.eps_max, b_noise_ema=est.b_noise,
                       b_noise_ema_stderr=est.b_noise_stderr, lambda_max=self.lambda_max)
            reasons.append(_noise.resolution("GᵀHG (EMA)", est.g_h_g, est.g_h_g_stderr,
                                             self.curvature_ema.df,
                                             hint="wait for more curvature measurements"))
            p = predictions(lr, batch, eps_max=est.eps_max, b_noise=est.b_noise,
                            lambda_max=self.lambda_max, momentum=self.momentum,
                            nesterov=self.nesterov)
            rec.update({k: p[k] for k in ("eps_opt", "lr_over_eps_opt", STABILITY_COLUMN)})
            if p["eps_opt_reason"] and not any(reasons):  # else NaN with no reason given
                reasons.append(p["eps_opt_reason"] + " (from the EMAs)")
        return [r for r in reasons if r]

    def _finish(self, rec: dict, reasons: list[str]) -> dict:
        """Resolution fields, warn once, types; store and write the record."""
        for k in ("b_simple_ema", "b_simple_ema_stderr", "eps_max_ema", "b_noise_ema",
                  "b_noise_ema_stderr", "eps_opt", "lr_over_eps_opt"):
            if not math.isfinite(rec[k]):  # a ratio with a denominator ≤ 0: nan, with reason
                rec[k] = math.nan
        rec["resolved"] = not reasons
        rec["reason"] = "; ".join(reasons)
        if reasons and not self._warned and any("no standard error" not in r for r in reasons):
            self._warned = True
            warnings.warn(f"NoiseMonitor step {self.step_count}: {rec['reason']} (records say "
                          "so in 'resolved' and 'reason' until resolved; warned once)",
                          UserWarning, stacklevel=4)
        rec = {k: (v if k in ("resolved", "reason") else
                   int(v) if k in ("step", "batch", "micro_batches") else float(v))
               for k, v in rec.items()}
        self.records.append(rec)
        self._write(rec)
        return rec

    # ------------------------------------------------------------------ output
    def _write(self, rec: dict) -> None:
        if self._writer is not None:
            self._writer.writerow(rec)
            self._csv_file.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and type(v) is float and math.isfinite(v):
                    self._tb.add_scalar(f"noise/{k}", v, rec["step"])

    def close(self) -> None:
        """Close the CSV file and the TensorBoard writer."""
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = self._writer = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------- constructor checks
def _check_schedule(every, curvature_every, criterion) -> tuple[int, int | None]:
    """``every`` (an integer ≥ 1, NumPy integers accepted, bool refused) and ``curvature_every``
    (None or a positive multiple of ``every``, which needs a criterion)."""
    every = check_count(every, "every")
    if curvature_every is None:
        return every, None
    try:
        curvature_every = check_count(curvature_every, "curvature_every")
    except ValueError:
        curvature_every = 0
    if curvature_every < 1 or curvature_every % every:
        raise ValueError(f"curvature_every must be a positive multiple of every ({every}), "
                         f"got {curvature_every!r}")
    if criterion is None:
        raise ValueError("curvature_every needs a criterion")
    return every, curvature_every


def _check_curvature_sizes(hessian_micro_batch, lanczos_iters) -> tuple[int | None, int]:
    """``hessian_micro_batch`` (None or an integer ≥ 1) and ``lanczos_iters`` (0 or ≥ 3)."""
    if hessian_micro_batch is not None:
        try:
            hessian_micro_batch = check_count(hessian_micro_batch, "hessian_micro_batch")
        except ValueError:
            raise ValueError(f"hessian_micro_batch must be a positive integer or None, got "
                             f"{hessian_micro_batch!r}") from None
    try:
        lanczos_iters = check_count(lanczos_iters, "lanczos_iters", minimum=0)
    except ValueError:
        lanczos_iters = -1
    if lanczos_iters < 0 or 0 < lanczos_iters < 3:
        raise ValueError(f"lanczos_iters must be 0 (skip λ_max) or an integer ≥ 3, got "
                         f"{lanczos_iters!r}")
    return hessian_micro_batch, lanczos_iters


def _open_csv(csv_path, append: bool):
    """(file, DictWriter) for ``csv_path`` (None: (None, None)); opened now so that a bad path
    fails at construction, not mid-training; a new file (or ``append`` to an empty or missing
    one) gets the header."""
    if csv_path is None:
        return None, None
    new = not (append and os.path.exists(csv_path) and os.path.getsize(csv_path))
    try:
        f = open(csv_path, "w" if new else "a", newline="")  # noqa: SIM115
    except OSError as exc:
        raise ValueError(f"cannot write csv_path {os.fspath(csv_path)!r}: {exc}") from exc
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    if new:
        writer.writeheader()
        f.flush()
    return f, writer


def _open_tensorboard(tensorboard_dir):
    """A ``SummaryWriter`` on ``tensorboard_dir``, or None (not asked for, or not installed)."""
    if tensorboard_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: CSV only
        return None
    return SummaryWriter(os.fspath(tensorboard_dir))
