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

import torch
from torch import nn

from . import _hvp, _noise
from ._common import check_count, check_criterion

__all__ = ["NoiseMonitor"]

COLUMNS = [
    "step", "lr", "batch", "micro_batches", "grad_sq", "tr_sigma", "grad_sq_ema",
    "tr_sigma_ema", "b_simple_ema", "b_simple_ema_stderr", "g_h_g", "tr_h_sigma",
    "eps_max_ema", "b_noise_ema", "b_noise_ema_stderr", "lambda_max", "eps_opt",
    "lr_over_eps_opt", "gd_limit", "resolved", "reason",
]


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
    measurements).
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

        every = check_count(every, "every")
        if curvature_every is not None:
            try:
                curvature_every = check_count(curvature_every, "curvature_every")
            except ValueError:
                curvature_every = 0
            if curvature_every < 1 or curvature_every % every:
                raise ValueError(
                    f"curvature_every must be a positive multiple of every ({every}), "
                    f"got {curvature_every!r}"
                )
            if criterion is None:
                raise ValueError("curvature_every needs a criterion")
        if accumulation not in ("mean", "sum"):
            raise ValueError(f"accumulation must be 'mean' or 'sum', got {accumulation!r}")
        if criterion is not None:
            check_criterion(criterion)
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
        self._csv_file = None
        self._writer = None
        self._tb = None
        if csv_path is not None:  # open now: a bad path fails here, not mid-training
            new = not (csv_append and os.path.exists(csv_path) and os.path.getsize(csv_path))
            try:
                self._csv_file = open(csv_path, "w" if new else "a", newline="")  # noqa: SIM115
            except OSError as exc:
                raise ValueError(f"cannot write csv_path {os.fspath(csv_path)!r}: {exc}") from exc
            self._writer = csv.DictWriter(self._csv_file, fieldnames=COLUMNS)
            if new:
                self._writer.writeheader()
                self._csv_file.flush()
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: CSV only
                self._tb = None
            else:
                self._tb = SummaryWriter(os.fspath(tensorboard_dir))

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
        from sgdtheory import theory
        from sgdtheory.estimators import two_batch

        m = len(self._sq)
        rec = dict.fromkeys(COLUMNS, math.nan)
        rec.update(step=self.step_count, lr=lr, batch=batch, micro_batches=m)
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
        rec.update(
            grad_sq=grad_sq, tr_sigma=tr_sigma, grad_sq_ema=self.noise_ema.grad_sq,
            tr_sigma_ema=self.noise_ema.tr_sigma, b_simple_ema=self.noise_ema.b_simple,
            b_simple_ema_stderr=self.noise_ema.b_simple_stderr,
        )
        if self.curvature_every and self.step_count % self.curvature_every == 0:
            if inputs is None or targets is None:
                raise ValueError("curvature measurement steps need inputs and targets")
            h = _hvp.hessian_noise(self.model, self.criterion, inputs, targets,
                                   micro_batch=self.hessian_micro_batch)
            self.curvature_ema.update(h.g_h_g, h.tr_h_sigma, grad_sq=h.grad_sq)
            rec.update(g_h_g=h.g_h_g, tr_h_sigma=h.tr_h_sigma)
            if self.lanczos_iters > 0:
                with warnings.catch_warnings():  # a few iterations on purpose: approximate
                    warnings.simplefilter("ignore", UserWarning)
                    self.lambda_max, self._lanczos_vector = _hvp.top_hessian_eigenvalue(
                        self.model, self.criterion, inputs, targets,
                        max_iter=self.lanczos_iters, v0=self._lanczos_vector,
                        return_vector=True)  # warm start: the last point's top eigenvector
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
            if 0 < est.eps_max < math.inf and 0 <= est.b_noise < math.inf:
                rec["eps_opt"] = theory.eps_opt(batch, est.eps_max, est.b_noise)
                rec["lr_over_eps_opt"] = theory.effective_lr(lr, self.momentum) / rec["eps_opt"]
            if self.lambda_max > 0:
                rec["gd_limit"] = theory.gd_stability_limit(self.lambda_max, self.momentum,
                                                            nesterov=self.nesterov)
        reasons = [r for r in reasons if r]
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
                          UserWarning, stacklevel=3)
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
