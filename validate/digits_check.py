r"""Real-data check of ε_opt(B) = ε_max/(1 + B_noise/B) on scikit-learn's digits (no download).

    python -m validate.digits_check [--preset quick|full] [--out PATH]

(default ``--out runs/digits_check/digits_check.json``; ``--out figures/digits_check.json``
regenerates the committed result, and a file whose content would not change apart from the
run time is left as it is.)

A small CNN (two 3×3 conv layers, ReLU, max-pool, 666 parameters) is trained part-way on the
1797 bundled 8×8 digits with SGD. At that checkpoint, with the whole set as the data
distribution (L = mean loss over all N examples, Σ with 1/N normalisation, batches drawn with
replacement so Cov(G_B) = Σ/B exactly):

1. **estimated**: ε_max and B_noise from :func:`validate.measure.hessian_noise` on a few random
   batches of 512 (256 for gradients in micro-batches of 16, 256 for the Hessian) — what a user
   would run on a big network;
2. **exact**: |G|², GᵀHG, tr(HΣ) from all per-example gradients and the full Hessian (666 HVPs),
   and λ_max (eigvalsh, checked against :func:`validate.measure.top_hessian_eigenvalue`);
3. **measured**: for each B in 8…512 the one-step optimal learning rate, the minimiser over ε
   of E_batches[L(θ − ε G_B)] on the full-data loss, from R sampled batches per B on a grid of
   ε around the prediction (parabolic interpolation at the minimum; bootstrap standard error).
   The per-batch quadratic model Q_b(ε) = −ε GᵀG_B + ½ε² G_BᵀHG_B, whose expectation is known
   exactly, is used as a control variate: E[ΔL(ε)] = E[ΔL_b(ε) − Q_b(ε)] + E[Q_b(ε)], unbiased
   and far less noisy. The plain Monte Carlo minimiser is reported too.

Resolution: an estimate with standard error s is *resolved* when its mean exceeds
:data:`RESOLVE_K` · s (2 standard errors). A ratio (ε_max = |G|²/GᵀHG, B_noise = tr(HΣ)/GᵀHG,
B_simple = tr(Σ)/|G|²) and a prediction from it are given only when both its parts are resolved;
otherwise the value is ``None`` with ``*_resolved: false`` and a ``*_reason`` (e.g. "GᵀHG =
-3 ± 5: not resolved"); the exact prediction needs GᵀHG + tr(HΣ)/B > 0 (a minimum along G); a
measured minimiser at the edge of the ε grid is a bound (``eps_opt_measured_resolved: false``).
No result is NaN or infinite; the console shows ± standard errors.

The difference E[ΔL_b − Q_b] is exactly the higher-order (beyond quadratic) part of the curve;
it is stored per B and printed when measured and predicted ε_opt differ by more than 25%.

Units: ``lr``/ε multiplies the mean minibatch gradient (base rate ε/B per example); |G|² etc.
in (loss/param)²; B, B_noise in examples. Results: a Markdown table on stdout and a JSON file
with the config, the exact and estimated statistics and every curve.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from sgdtheory import theory
from validate._common import ModelFunction
from validate._io import int_at_least, jsonable, write_json
from validate.measure import (
    HessianOperator,
    hessian_noise,
    per_sample_gradients,
    top_hessian_eigenvalue,
)
from validate.models import SmallCNN


@dataclass(frozen=True)
class Config:
    """Settings (units in comments)."""

    train_steps: int = 150  # SGD steps before the checkpoint
    train_batch: int = 32  # examples per training step
    train_lr: float = 0.2  # multiplies the mean minibatch gradient
    batches: tuple = (8, 16, 32, 64, 128, 256, 512)  # B values of the line search
    line_batches: int = 16  # R, sampled batches per B (the same for every ε)
    grid_ratio: float = 2 ** (1 / 3)  # ε grid: ε_pred(B) · ratio^k, k = -4..4
    grid_half: int = 4
    est_reps: int = 8  # independent hessian_noise calls
    est_batch: int = 512  # examples per call (half gradient, half Hessian)
    est_micro: int = 16  # micro-batch size of the gradient half
    bootstrap: int = 400  # bootstrap resamples for the standard error of the minimiser
    seed: int = 0
    threads: int = 1  # torch threads


PRESETS = {
    "quick": Config(),
    "full": Config(line_batches=64, est_reps=32, bootstrap=1000),
}

#: An estimate is resolved when its mean exceeds RESOLVE_K standard errors.
RESOLVE_K = 2.0

#: Where the result goes by default (``--out figures/digits_check.json``: the committed one).
DEFAULT_OUT = os.path.join("runs", "digits_check", "digits_check.json")

#: Names of the estimated quantities in messages.
_SYMBOL = {"grad_sq": "|G|²", "tr_sigma": "tr(Σ)", "g_h_g": "GᵀHG", "tr_h_sigma": "tr(HΣ)"}


def _pm(value, stderr=None, digits: int = 4) -> str:
    """``value ± stderr`` for the console (``not resolved`` for None)."""
    if value is None:
        return "not resolved"
    text = f"{value:.{digits}g}"
    return text if stderr is None else f"{text} ± {stderr:.2g}"


def unresolved_reason(mean: float, stderr: float, name: str) -> str | None:
    """None when the positive quantity ``name`` = mean ± stderr is resolved (mean > RESOLVE_K ·
    stderr), else the reason, e.g. ``'GᵀHG = -3 ± 5: not resolved (not above 2 standard
    errors)'`` (:func:`_unresolved` joins reasons and adds what to do).

    >>> unresolved_reason(10.0, 1.0, "GᵀHG") is None
    True
    """
    if math.isfinite(mean) and math.isfinite(stderr) and mean > RESOLVE_K * stderr:
        return None
    return (f"{name} = {mean:.3g} ± {stderr:.2g}: not resolved (not above {RESOLVE_K:g} "
            "standard errors)")


def _unresolved(reasons) -> str | None:
    """The distinct reasons joined, with the remedy; None when there are none."""
    reasons = list(dict.fromkeys(r for r in reasons if r))
    return "; ".join(reasons) + "; use more examples (--preset full)" if reasons else None


def DigitsCNN() -> nn.Module:  # noqa: N802 - kept as the name of this model
    """conv3×3(1→4) → ReLU → maxpool2 → conv3×3(4→8) → ReLU → maxpool2 → linear(32→10):
    :class:`validate.models.SmallCNN` with channels (4, 8), 666 parameters."""
    return SmallCNN((1, 8, 8), 10, channels=(4, 8))


def load_digits_tensors(dtype=torch.float32):
    """(X, Y): the 1797 digits as (N, 1, 8, 8) in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=dtype).unsqueeze(1)
    return x, torch.tensor(d.target, dtype=torch.int64)


def train(model, crit, x, y, cfg: Config, gen) -> list[float]:
    """Plain SGD (mean-gradient lr) for cfg.train_steps steps; returns full-data losses."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train_lr)
    losses = []
    for step in range(cfg.train_steps):
        idx = torch.randint(0, x.shape[0], (cfg.train_batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        crit(model(x[idx]), y[idx]).backward()
        opt.step()
        if step % 50 == 0 or step == cfg.train_steps - 1:
            with torch.no_grad():
                losses.append(float(crit(model(x), y)))
    opt.zero_grad(set_to_none=True)
    return losses


def exact_statistics(model, crit, x, y, grads):
    """|G|², tr(Σ), GᵀHG, tr(HΣ), λ_max of the full-data loss (full Hessian by p HVPs)."""
    op = HessianOperator(model, crit, x, y)
    p = op.dim
    eye = torch.eye(p, dtype=grads.dtype)
    hess = torch.stack([op(eye[i]) for i in range(p)]).double()
    hess = 0.5 * (hess + hess.T)
    g = grads.double()
    mean = g.mean(0)
    centred = g - mean
    sigma = centred.T @ centred / g.shape[0]  # 1/N normalisation
    stats = theory.quadratic_stats(hess.numpy(), sigma.numpy(), mean.numpy())
    evals = np.linalg.eigvalsh(hess.numpy())
    return stats, hess, mean, evals


def estimated_statistics(model, crit, x, y, cfg: Config, gen) -> dict:
    """Mean ± standard error of repeated hessian_noise calls, and the ratios of the means."""
    rows = []
    for _ in range(cfg.est_reps):
        idx = torch.randint(0, x.shape[0], (cfg.est_batch,), generator=gen)
        h = hessian_noise(model, crit, x[idx], y[idx], micro_batch=cfg.est_micro)
        rows.append([h.grad_sq, h.tr_sigma, h.g_h_g, h.tr_h_sigma])
    rows = np.array(rows)
    mean = rows.mean(0)
    se = rows.std(0, ddof=1) / math.sqrt(len(rows))

    def jack(f):
        n = len(rows)
        loo = np.array([f(np.delete(rows, i, 0).mean(0)) for i in range(n)])
        return float(np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum()))

    keys = ("grad_sq", "tr_sigma", "g_h_g", "tr_h_sigma")
    out = {k: float(v) for k, v in zip(keys, mean, strict=True)}
    out.update({f"{k}_stderr": float(v) for k, v in zip(keys, se, strict=True)})
    why = {k: unresolved_reason(out[k], out[f"{k}_stderr"], _SYMBOL[k]) for k in keys}
    ratios = (("eps_max", lambda m: m[0] / m[2], ("grad_sq", "g_h_g")),
              ("b_noise", lambda m: m[3] / m[2], ("tr_h_sigma", "g_h_g")),
              ("b_simple", lambda m: m[1] / m[0], ("tr_sigma", "grad_sq")))
    for name, f, parts in ratios:  # a ratio needs both its parts resolved
        reason = _unresolved(why[k] for k in parts)
        out[f"{name}_resolved"] = reason is None
        out[f"{name}_reason"] = reason
        out[name] = float(f(mean)) if reason is None else None
        out[f"{name}_stderr"] = jack(f) if reason is None else None
    # ε_opt(B) = |G|²/(GᵀHG + tr(HΣ)/B) from the same calls (jackknife standard error)
    resolved = out["eps_max_resolved"] and out["b_noise_resolved"]
    out["eps_opt"] = []
    for b in cfg.batches:
        f = lambda m, b=b: m[0] / m[2] / (1.0 + m[3] / m[2] / b)
        value = float(theory.eps_opt(b, out["eps_max"], out["b_noise"])) if resolved else None
        out["eps_opt"].append({"batch": b, "value": value,
                               "stderr": jack(f) if resolved else None})
    out["eps_opt_reason"] = _unresolved(why[k] for k in ("grad_sq", "g_h_g", "tr_h_sigma"))
    out["calls"] = cfg.est_reps
    return out


def exact_prediction(exact, batch: int) -> tuple[float | None, str | None]:
    """(ε_opt(B) of the exact statistics, None) — or (None, reason) when the quadratic model
    has no minimum along G (GᵀHG + tr(HΣ)/B ≤ 0)."""
    if exact.g_h_g <= 0:
        return None, (f"exact GᵀHG = {exact.g_h_g:.3g} ≤ 0: the quadratic model has no "
                      "minimum along G")
    if exact.b_noise >= 0:
        return float(theory.eps_opt(batch, exact.eps_max, exact.b_noise)), None
    value = exact.eps_opt(batch)  # tr(HΣ) < 0: finite only while GᵀHG + tr(HΣ)/B > 0
    if not math.isfinite(value):
        return None, (f"exact GᵀHG + tr(HΣ)/B = {exact.g_h_g + exact.tr_h_sigma / batch:.3g} "
                      "≤ 0: the quadratic model has no minimum along G")
    return float(value), None


def _vertex(xs, ys) -> float:
    """Minimiser of the parabola through three points (x0 < x1 < x2, y1 the smallest)."""
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    return float(x1 - 0.5 * num / den) if den != 0 else float(x1)


def _argmin(eps, curve) -> float:
    """Minimiser of a sampled curve: discrete minimum refined by parabolic interpolation."""
    k = int(np.argmin(curve))
    if k == 0 or k == len(eps) - 1:
        return float(eps[k])
    return _vertex(eps[k - 1:k + 2], curve[k - 1:k + 2])


def _edge_reason(eps, curve) -> str | None:
    """None when the sampled curve's minimum is inside the grid, else why it is a bound."""
    k = int(np.argmin(curve))
    if 0 < k < len(eps) - 1:
        return None
    side = "smallest" if k == 0 else "largest"
    return f"minimum at the {side} ε of the grid ({eps[k]:.3g}): a bound, not resolved"


def line_search(model, crit, x, y, grads, hess, grad, exact, batch, eps_pred, cfg, gen):
    """E[L(θ − ε G_B)] − L(θ) on an ε grid for R sampled batches of size ``batch``."""
    fn = ModelFunction(model, crit)
    theta = torch.cat([p.detach().reshape(-1) for p in fn.params])
    with torch.no_grad():
        base = float(crit(model(x), y))

    def loss_at(vec):
        params = dict(zip(fn.names, fn.unflatten(vec), strict=True))
        with torch.no_grad():
            return float(crit(functional_call(model, params, (x,)), y))

    n = x.shape[0]
    idx = torch.randint(0, n, (cfg.line_batches, batch), generator=gen)
    gb = grads[idx].mean(1)  # (R, p) mean minibatch gradients
    gb64 = gb.double()
    lin = (gb64 @ grad).numpy()  # GᵀG_B per batch
    quad = torch.einsum("rp,pq,rq->r", gb64, hess, gb64).numpy()  # G_BᵀHG_B per batch
    quad_mean = exact.g_h_g + exact.tr_h_sigma / batch  # E[G_BᵀHG_B], with replacement
    factors = [cfg.grid_ratio**k for k in range(-cfg.grid_half, cfg.grid_half + 1)]
    cols: dict[float, np.ndarray] = {}

    def evaluate(f):
        e = f * eps_pred
        cols[f] = np.array([loss_at(theta - e * gb[r]) - base for r in range(gb.shape[0])])

    for f in factors:
        evaluate(f)
    for _ in range(6):  # extend the grid while the minimum of the mean curve is at an edge
        fs = sorted(cols)
        eps = np.array(fs) * eps_pred
        dl = np.stack([cols[f] for f in fs], 1)
        resid = dl - (-eps[None] * lin[:, None] + 0.5 * eps[None] ** 2 * quad[:, None])
        curve = resid.mean(0) + (-eps * exact.grad_sq + 0.5 * eps**2 * quad_mean)
        k = int(np.argmin(curve))
        if 0 < k < len(fs) - 1:
            break
        evaluate(fs[0] / cfg.grid_ratio if k == 0 else fs[-1] * cfg.grid_ratio)
    fs = sorted(cols)
    eps = np.array(fs) * eps_pred
    dl = np.stack([cols[f] for f in fs], 1)  # (R, n_eps) actual ΔL_b(ε)
    q_b = -eps[None] * lin[:, None] + 0.5 * eps[None] ** 2 * quad[:, None]
    q_mean = -eps * exact.grad_sq + 0.5 * eps**2 * quad_mean  # quadratic model E[ΔL]
    resid = dl - q_b  # higher-order terms per batch

    def curves(rows):
        return dl[rows].mean(0), resid[rows].mean(0) + q_mean

    plain, cv = curves(np.arange(dl.shape[0]))
    edge, edge_plain = _edge_reason(eps, cv), _edge_reason(eps, plain)
    rng = np.random.default_rng(cfg.seed + batch)
    boot = np.array([[_argmin(eps, c) for c in curves(rng.integers(0, dl.shape[0], dl.shape[0]))]
                     for _ in range(cfg.bootstrap)])
    return {
        "batch": batch,
        "eps": eps.tolist(),
        "mean_delta_loss": cv.tolist(),
        "mean_delta_loss_plain": plain.tolist(),
        "mean_delta_loss_stderr": (resid.std(0, ddof=1) / math.sqrt(dl.shape[0])).tolist(),
        "quadratic_model": q_mean.tolist(),
        "higher_order": resid.mean(0).tolist(),
        "eps_opt_measured": _argmin(eps, cv),
        "eps_opt_measured_stderr": float(boot[:, 1].std(ddof=1)),
        "eps_opt_measured_resolved": edge is None,
        "eps_opt_measured_reason": edge,
        "eps_opt_plain": _argmin(eps, plain),
        "eps_opt_plain_stderr": float(boot[:, 0].std(ddof=1)),
        "eps_opt_plain_resolved": edge_plain is None,
        "eps_opt_plain_reason": edge_plain,
        "n_batches": int(dl.shape[0]),
    }


def _ratio(a, b):
    return a / b if a is not None and b is not None else None


def _batch_row(model, crit, x, y, grads, hess, grad, exact, est, i, cfg, gen) -> dict:
    """The line search at B = ``cfg.batches[i]`` (on a grid around the exact prediction), both
    predictions and the ratios; a value that is not resolved is None, with its reason."""
    b = cfg.batches[i]
    pred_exact, why = exact_prediction(exact, b)
    if pred_exact is None:  # no grid centre: nothing to measure
        ls = {"batch": b, "skipped": f"no line search: {why}"}
        for k in ("eps_opt_measured", "eps_opt_plain"):
            ls.update({k: None, f"{k}_stderr": None, f"{k}_resolved": False,
                       f"{k}_reason": why})
    else:
        ls = line_search(model, crit, x, y, grads, hess, grad, exact, b, pred_exact, cfg, gen)
    pred = est["eps_opt"][i]
    measured = ls["eps_opt_measured"] if ls["eps_opt_measured_resolved"] else None
    ls.update(eps_opt_predicted=pred["value"], eps_opt_predicted_stderr=pred["stderr"],
              eps_opt_predicted_reason=est["eps_opt_reason"],
              eps_opt_predicted_exact=pred_exact, eps_opt_predicted_exact_reason=why,
              ratio=_ratio(measured, pred["value"]), ratio_exact=_ratio(measured, pred_exact))
    return ls


def run(cfg: Config, *, progress=print) -> dict:
    """The whole check; returns the JSON-able result."""
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    x, y = load_digits_tensors()
    model = DigitsCNN()  # float32: 3-4x faster HVPs than float64 on CPU
    crit = nn.CrossEntropyLoss()
    losses = train(model, crit, x, y, cfg, gen)
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    progress(f"trained {cfg.train_steps} steps: full-data loss {losses[-1]:.4f}, "
             f"accuracy {acc:.3f} ({time.perf_counter() - t0:.1f} s)")
    fn = ModelFunction(model, crit)
    grads = per_sample_gradients(fn, x, y)  # (N, p), all examples
    exact, hess, grad, evals = exact_statistics(model, crit, x, y, grads)
    lam_lanczos = top_hessian_eigenvalue(model, crit, x, y, max_iter=200, tol=1e-6)
    exact_reason = exact_prediction(exact, max(cfg.batches))[1] if exact.g_h_g <= 0 else None
    progress(f"exact: eps_max {_pm(None if exact_reason else exact.eps_max)}, B_noise "
             f"{_pm(None if exact_reason else exact.b_noise)}, B_simple "
             f"{_pm(exact.b_simple if exact.grad_sq > 0 else None)}, lambda_max "
             f"{evals[-1]:.4g} (Lanczos {lam_lanczos:.4g})"
             + (f"; {exact_reason}" if exact_reason else "")
             + f" ({time.perf_counter() - t0:.1f} s)")
    est = estimated_statistics(model, crit, x, y, cfg, gen)
    progress(f"estimated ({cfg.est_reps} x hessian_noise on {cfg.est_batch} examples): "
             + ", ".join(f"{k} {_pm(est[k], est[f'{k}_stderr'])}"
                         for k in ("eps_max", "b_noise", "b_simple"))
             + (f"; {why}" if (why := _unresolved(
                 unresolved_reason(est[k], est[f"{k}_stderr"], _SYMBOL[k]) for k in _SYMBOL))
                else "")
             + f" ({time.perf_counter() - t0:.1f} s)")
    rows = []
    for i in range(len(cfg.batches)):
        r = _batch_row(model, crit, x, y, grads, hess, grad, exact, est, i, cfg, gen)
        rows.append(r)
        progress(f"B = {r['batch']}: measured "
                 f"{_pm(r['eps_opt_measured'], r['eps_opt_measured_stderr'])}, predicted "
                 f"{_pm(r['eps_opt_predicted'], r['eps_opt_predicted_stderr'])}"
                 + "".join(f"; {r[k]}" for k in ("skipped", "eps_opt_measured_reason")
                           if r.get(k)) + f" ({time.perf_counter() - t0:.1f} s)")
    return {
        "config": asdict(cfg),
        "n_data": int(x.shape[0]),
        "n_params": int(grads.shape[1]),
        "train_losses": losses,
        "accuracy": acc,
        "loss": losses[-1],
        "exact": {
            "grad_sq": exact.grad_sq, "tr_sigma": exact.tr_sigma, "g_h_g": exact.g_h_g,
            "tr_h_sigma": exact.tr_h_sigma,
            "eps_max": None if exact_reason else exact.eps_max,
            "b_noise": None if exact_reason else exact.b_noise,
            "no_minimum_reason": exact_reason,
            "b_simple": exact.b_simple if exact.grad_sq > 0 else None,
            "lambda_max": float(evals[-1]),
            "lambda_min": float(evals[0]), "lambda_max_lanczos": lam_lanczos,
        },
        "estimated": est,
        "line_search": rows,
        "seconds": time.perf_counter() - t0,
    }


def markdown_table(res: dict) -> str:
    """B | ε_opt predicted (estimated, exact) | measured ± se | ratios | plain Monte Carlo."""
    lines = [
        "| B | ε_opt predicted (hessian_noise) | ε_opt predicted (exact G, H, Σ) "
        "| ε_opt measured (line search) | measured / predicted | measured / exact "
        "| plain Monte Carlo |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    def cell(r, key, digits=3, se=True):
        v = r[key]
        if v is None:
            return "not resolved"
        text = f"{v:.{digits}f}"
        if se and r.get(f"{key}_stderr") is not None:
            text += f" ± {r[f'{key}_stderr']:.{digits}f}"
        if r.get(f"{key}_resolved") is False:
            text += " (edge of grid)"
        return text

    for r in res["line_search"]:
        lines.append(
            f"| {r['batch']} | {cell(r, 'eps_opt_predicted', se=False)}"
            f" | {cell(r, 'eps_opt_predicted_exact')} | {cell(r, 'eps_opt_measured')}"
            f" | {cell(r, 'ratio', 2)} | {cell(r, 'ratio_exact', 2)}"
            f" | {cell(r, 'eps_opt_plain')} |"
        )
    return "\n".join(lines)


def higher_order_table(res: dict) -> str:
    """Quadratic-model E[ΔL(ε)] vs the measured curve at ε ≈ ε_opt and 2ε_opt (exact)."""
    lines = [
        "| B | ε / ε_opt | quadratic model E[ΔL] | measured E[ΔL] | higher-order part |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in res["line_search"]:
        if r["eps_opt_predicted_exact"] is None or "eps" not in r:
            continue
        eps = np.array(r["eps"])
        for target in (1.0, 2.0):
            k = int(np.argmin(np.abs(eps / r["eps_opt_predicted_exact"] - target)))
            lines.append(
                f"| {r['batch']} | {eps[k] / r['eps_opt_predicted_exact']:.2f} | "
                f"{r['quadratic_model'][k]:.3e} | {r['mean_delta_loss'][k]:.3e} | "
                f"{r['higher_order'][k]:.3e} |"
            )
    return "\n".join(lines)


def _reason(e: OSError) -> str:
    """One-line reason of an OSError, naming the path it concerns when there is one."""
    if e.strerror:
        return f"{e.strerror} ({e.filename})" if e.filename else e.strerror
    return str(e)


def _prepare_out(ap: argparse.ArgumentParser, out: str) -> None:
    """Create the parent folder of ``out`` and check it can be written, before the long run;
    failures end with a one-line error."""
    parent = os.path.dirname(os.path.abspath(out))
    try:
        if os.path.isdir(out):
            raise IsADirectoryError(f"{out} is a folder")
        os.makedirs(parent, exist_ok=True)
        if not os.access(parent, os.W_OK):
            raise PermissionError(f"folder {parent} is not writable")
    except OSError as e:
        ap.error(f"argument --out: cannot write {out}: {_reason(e)}")


#: Result fields that change from run to run without the results changing.
TIMING_KEYS = ("seconds",)


def _same_result(out: str, res: dict) -> bool:
    """Whether ``out`` already holds ``res`` (as strict JSON), apart from :data:`TIMING_KEYS`."""
    try:
        with open(out, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return False
    new = json.loads(json.dumps(jsonable(res), allow_nan=False))
    if not isinstance(old, dict):
        return False
    drop = lambda d: {k: v for k, v in d.items() if k not in TIMING_KEYS}
    return drop(old) == drop(new)


def _write_result(ap: argparse.ArgumentParser, out: str, res: dict) -> bool:
    """Atomic strict-JSON write (:func:`validate._io.write_json`), skipped when the file already
    holds the same result apart from the run time (so a committed file is not rewritten for
    nothing); returns whether it wrote. A failure is a one-line error (exit status 1)."""
    if _same_result(out, res):
        return False
    try:
        write_json(out, res)
    except OSError as e:
        ap.exit(1, f"{ap.prog}: error: cannot write {out}: {_reason(e)}\n")
    return True


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m validate.digits_check",
                                 description="ε_opt(B) on load_digits: prediction vs line search")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                    help="; ".join(f"{k}: {c.line_batches} batches per B in the line search, "
                                   f"{c.est_reps} hessian_noise calls"
                                   for k, c in PRESETS.items()))
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help=f"JSON output path (its folder is created; default {DEFAULT_OUT}); "
                    "--out figures/digits_check.json regenerates the committed result (left "
                    "untouched when only the run time would change); '' to skip saving")
    ap.add_argument("--threads", type=int_at_least(1), default=None,
                    help="torch threads, integer ≥ 1 (default 1)")
    ap.add_argument("--seed", type=int_at_least(0), default=None,
                    help="integer ≥ 0: training batches, estimator batches, line-search batches")
    args = ap.parse_args(argv)
    if args.out:
        _prepare_out(ap, args.out)
    cfg = PRESETS[args.preset]
    if args.threads is not None:
        cfg = replace(cfg, threads=args.threads)
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    res = run(cfg)
    print()
    ex, est = res["exact"], res["estimated"]
    print(f"load_digits, N = {res['n_data']}, CNN with {res['n_params']} parameters, after "
          f"{cfg.train_steps} SGD steps (loss {res['loss']:.3f}, accuracy "
          f"{res['accuracy']:.3f}); exact eps_max = {_pm(ex['eps_max'])}, "
          f"B_noise = {_pm(ex['b_noise'])}; estimated eps_max = "
          f"{_pm(est['eps_max'], est['eps_max_stderr'])}, "
          f"B_noise = {_pm(est['b_noise'], est['b_noise_stderr'])}")
    for why in dict.fromkeys(w for w in (ex["no_minimum_reason"], est["eps_opt_reason"]) if w):
        print(f"  {why}")
    print()
    print(markdown_table(res))
    errors = [abs(r["ratio"] - 1) for r in res["line_search"] if r["ratio"] is not None]
    worst = max(errors) if errors else None
    res["max_relative_error"] = worst
    res["max_relative_error_reason"] = None if errors else \
        "no B with both the measured and the predicted ε_opt resolved"
    if worst is None:
        print()
        print(f"max relative error: not resolved ({res['max_relative_error_reason']})")
    elif worst > 0.25:
        print()
        print("Agreement worse than 25%: the quadratic model vs the measured curve "
              "(higher-order part = measured − quadratic, averaged over batches):")
        print()
        print(higher_order_table(res))
    if args.out:
        wrote = _write_result(ap, args.out, res)
        print(f"\n{'saved' if wrote else 'unchanged apart from the run time, left as it is:'} "
              f"{args.out} ({res['seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
