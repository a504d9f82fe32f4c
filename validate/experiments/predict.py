r"""Predictions from the reference run's measurements (nothing fitted to the sweep).

All rates are ``lr`` η (multiplier of the mean minibatch gradient) unless named ``base``
(η̃ = η/B per example); momentum μ in torch's heavy-ball form, Nesterov as torch.

* :func:`largest_lambda` — the largest λ_max seen along the reference run, with its standard
  error: the sharpness grows during training (several-fold in the first epoch on digits), and
  the largest value is the one that limits a run.
* :func:`curvature_limit` — η_c = 2(1+μ)/λ_max (heavy ball), 2(1+μ)/((1+2μ)λ_max) (Nesterov):
  :func:`sgdtheory.theory.gd_stability_limit`.
* :func:`spectrum` and :func:`noise_limit` — the noise-aware stability limit η_c(B) of SGD with
  multiplicative gradient noise (:func:`sgdtheory.theory.linreg_stability_limit`, the exact
  limit of SGD — heavy ball or Nesterov in torch's form — on linear regression with Gaussian
  features: ≈ 2B(1−μ)/Σλ at small B, → the curvature limit at large B) evaluated on a spectrum
  made of measured parts (:func:`sgdtheory.theory.spectrum_from_top_and_trace`): the top-k
  eigenvalues from Lanczos, and the rest of the Hutch++ trace, tr(H) − Σ_top λ, spread evenly
  over the remaining p − k directions (a negative remainder beyond its error — the trace counts
  the negative eigenvalues of a non-convex loss — leaves the top eigenvalues alone). Only the
  total of the bulk matters at small B and only λ_max at large B, so spreading the rest evenly
  changes the limit little in between.
* :func:`eps_opt_lr` — 2·ε_opt(B) = 2ε_max/(1 + B_noise/B) in effective-rate units, i.e. the
  ``lr`` with η/(1−μ) = 2ε_opt(B): beyond it one step raises the loss in expectation
  (McCandlish et al.); reported for reference, not a limit that is checked.
* :func:`lambda_sigma` — the curvature a memorised batch sees, λ_Σ = tr(HΣ)/tr(Σ): the mean
  eigenvalue of H weighted by the per-example gradient variance along it. Why this curvature:
  what training on a batch leaves in the weights beyond what any batch would is its gradient
  *noise* g_P − G, distributed over the eigen-directions of H like Σ; along direction j it
  decays like (1 − ηλ_j)^k (plain SGD), so the memory gap decays initially at the rate
  η·Σ_j Σ_jj λ_j/Σ_j Σ_jj = η tr(HΣ)/tr(Σ). In the linear-regression model of
  :mod:`sgdtheory.memory` (Σ = σ²H) this is the λ-weighted mean eigenvalue Σλ²/Σλ that
  weights the dominant (memorised label noise) term of its exact memory gap. It is pooled over
  the second half of the reference run (the memory is measured late in training).
* :func:`memory_time` — the memory time 1/(η̃ λ_Σ) examples = (1−μ)/(η λ_Σ) steps
  (:func:`sgdtheory.memory.forgetting_horizon`, with the effective rate η/(1−μ)).
* :func:`forgetting_limit` — the base rate at which the memory time equals one epoch of N
  examples, η̃_f = 1/(N λ_Σ) (:func:`sgdtheory.memory.forgetting_limit`, effective rate): below
  it a batch is not forgotten within an epoch.
"""

from __future__ import annotations

import math

import numpy as np

from sgdtheory import memory, theory

__all__ = [
    "curvature_limit",
    "eps_opt_lr",
    "forgetting_limit",
    "lambda_sigma",
    "largest_lambda",
    "memory_time",
    "noise_limit",
    "spectrum",
    "valid_points",
]


def _f(x) -> float:
    """A float from a stored value (``None`` — strict JSON's nan — becomes nan)."""
    return float("nan") if x is None else float(x)


def valid_points(measurements: list[dict]) -> list[dict]:
    """The measurement records that hold numbers (not an ``error``)."""
    return [m for m in measurements if "error" not in m]


def largest_lambda(measurements: list[dict]) -> dict:
    """The point with the largest λ_max: ``{'lambda_max', 'stderr', 'step', 'point'}``."""
    pts = valid_points(measurements)
    if not pts:
        raise ValueError("the reference run has no valid measurement")
    i = int(np.argmax([m["lambda_max"] for m in pts]))
    m = pts[i]
    return {"lambda_max": m["lambda_max"], "stderr": _f(m["lambda_max_stderr"]),
            "step": m["step"], "point": m}


def curvature_limit(lambda_max: float, momentum: float = 0.0, nesterov: bool = False,
                    stderr: float = 0.0) -> tuple[float, float]:
    """(η_c, its standard error) = 2(1+μ)/λ_max, or 2(1+μ)/((1+2μ)λ_max) with Nesterov.

    >>> curvature_limit(4.0, 0.9)
    (0.95, 0.0)
    """
    lim = float(theory.gd_stability_limit(lambda_max, momentum, nesterov=nesterov and
                                          momentum > 0))
    return lim, lim * float(stderr) / float(lambda_max)


def spectrum(top, trace: float, dim: int, trace_se: float = 0.0):
    """(eigenvalues, counts, note): :func:`sgdtheory.theory.spectrum_from_top_and_trace` on the
    positive measured top eigenvalues (the rest of the trace spread evenly over the other
    ``dim − k`` directions). A trace below the top eigenvalues' sum by more than 2 standard
    errors — possible on a non-convex loss, whose Hessian has negative eigenvalues that the
    trace counts — leaves nothing for the rest: the spectrum is the top eigenvalues alone, and
    ``note`` says so (``None`` otherwise).

    >>> e, c, note = spectrum([5.0, 2.0], 10.0, 5)
    >>> e.tolist(), c.tolist(), note
    ([5.0, 2.0, 1.0], [1.0, 1.0, 3.0], None)
    """
    top = np.asarray([v for v in top if v is not None and v > 0], dtype=float)
    if top.size == 0:
        raise ValueError("no positive top eigenvalue was measured")
    try:
        eigs, counts = theory.spectrum_from_top_and_trace(top, trace, dim, trace_se=trace_se)
        return eigs, counts, None
    except ValueError as e:
        if "is below the sum of" not in str(e):
            raise
        return top, np.ones_like(top), (
            f"tr(H) = {trace:.4g} ± {trace_se:.2g} is below the top eigenvalues' sum "
            f"{top.sum():.4g} (negative eigenvalues): the rest of the spectrum taken as 0")


def noise_limit(top, trace: float, dim: int, batch: int, momentum: float = 0.0,
                nesterov: bool = False, *, top_stderr: float = 0.0,
                trace_stderr: float = 0.0) -> tuple[float, float, str | None]:
    """(η_c(B), standard error, note): :func:`sgdtheory.theory.linreg_stability_limit` with
    ``momentum``/``nesterov`` on :func:`spectrum`; the error propagates λ_max's and tr(H)'s
    (taken as independent; central differences)."""
    def limit(t, tr):
        eigs, counts, _ = spectrum(t, tr, dim, trace_stderr)
        return float(theory.linreg_stability_limit(eigs, batch, momentum=momentum,
                                                   nesterov=nesterov, counts=counts))

    top = [float(v) for v in top]
    note = spectrum(top, trace, dim, trace_stderr)[2]
    value = limit(top, trace)
    var = 0.0
    if top_stderr and math.isfinite(top_stderr) and top_stderr > 0:
        h = 0.5 * top_stderr
        d = (limit([top[0] + h, *top[1:]], trace)
             - limit([max(top[0] - h, 1e-12), *top[1:]], trace)) / (2 * h)
        var += (d * top_stderr) ** 2
    if trace_stderr and math.isfinite(trace_stderr) and trace_stderr > 0:
        h = 0.5 * trace_stderr
        d = (limit(top, trace + h) - limit(top, trace - h)) / (2 * h)
        var += (d * trace_stderr) ** 2
    return value, math.sqrt(var), note


def eps_opt_lr(batch: int, eps_max: float, b_noise: float, momentum: float = 0.0) -> float:
    """The ``lr`` at which η/(1−μ) = 2ε_opt(B) = 2ε_max/(1 + B_noise/B); nan when ε_max or
    B_noise is not resolved (not positive).

    >>> eps_opt_lr(64, 0.2, 64.0)
    0.2
    """
    eps_max, b_noise = _f(eps_max), _f(b_noise)
    if not (eps_max > 0 and b_noise >= 0 and math.isfinite(eps_max) and math.isfinite(b_noise)):
        return float("nan")
    return 2.0 * float(theory.eps_opt(batch, eps_max, b_noise)) * (1.0 - momentum)


def lambda_sigma(measurements: list[dict], *, from_fraction: float = 0.5) -> tuple[float, float]:
    """(λ_Σ, standard error) = mean tr(HΣ)/mean tr(Σ) over the valid points at or after
    ``from_fraction`` of the run (the delta method on the two means, taken as independent —
    they are positively correlated, so the error is an overestimate)."""
    pts = valid_points(measurements)
    if not pts:
        raise ValueError("the reference run has no valid measurement")
    last = max(m["step"] for m in pts)
    late = [m for m in pts if m["step"] >= from_fraction * last] or pts[-1:]
    a = np.array([_f(m["tr_h_sigma"]) for m in late])
    b = np.array([_f(m["tr_sigma"]) for m in late])
    sa = np.array([_f(m["tr_h_sigma_stderr"]) for m in late])
    sb = np.array([_f(m["tr_sigma_stderr"]) for m in late])
    ma, mb = np.nanmean(a), np.nanmean(b)
    if not (ma > 0 and mb > 0):
        return float("nan"), float("nan")
    se_a = math.sqrt(np.nansum(sa**2)) / a.size
    se_b = math.sqrt(np.nansum(sb**2)) / b.size
    r = ma / mb
    return float(r), float(r * math.hypot(se_a / ma, se_b / mb))


def memory_time(lr: float, lam_sigma: float, momentum: float = 0.0) -> float:
    """Memory time in steps, (1−μ)/(η λ_Σ): :func:`sgdtheory.memory.forgetting_horizon` of the
    effective base rate, divided by B (any B: it cancels).

    >>> memory_time(0.5, 4.0)
    0.5
    """
    return float(memory.forgetting_horizon(lr / (1.0 - momentum), lam_sigma))


def forgetting_limit(n_data: int, lam_sigma: float, momentum: float = 0.0) -> float:
    """Base rate η̃_f (η/B per example) at which the memory time is one epoch of ``n_data``:
    (1−μ)/(N λ_Σ) (:func:`sgdtheory.memory.forgetting_limit` of the effective rate).

    >>> forgetting_limit(1000, 0.01)
    0.1
    """
    return float(memory.forgetting_limit(n_data, lam_sigma)) * (1.0 - momentum)
