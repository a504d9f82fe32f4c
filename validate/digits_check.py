r"""Real-data check of ε_opt(B) = ε_max/(1 + B_noise/B) on scikit-learn's digits (no download).

    python -m validate.digits_check [--preset quick|full] [--out figures/digits_check.json]

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

The difference E[ΔL_b − Q_b] is exactly the higher-order (beyond quadratic) part of the curve;
it is stored per B and printed when measured and predicted ε_opt differ by more than 25%.

Units: ``lr``/ε multiplies the mean minibatch gradient (base rate ε/B per example); |G|² etc.
in (loss/param)²; B, B_noise in examples. Results: a Markdown table on stdout and a JSON file
with the config, the exact and estimated statistics and every curve.
"""

from __future__ import annotations

import argparse
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
from validate._io import write_json
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

    eps_max = lambda m: m[0] / m[2]
    b_noise = lambda m: m[3] / m[2]
    b_simple = lambda m: m[1] / m[0]
    keys = ("grad_sq", "tr_sigma", "g_h_g", "tr_h_sigma")
    out = {k: float(v) for k, v in zip(keys, mean, strict=True)}
    out.update({f"{k}_stderr": float(v) for k, v in zip(keys, se, strict=True)})
    for name, f in (("eps_max", eps_max), ("b_noise", b_noise), ("b_simple", b_simple)):
        out[name] = float(f(mean))
        out[f"{name}_stderr"] = jack(f)
    out["calls"] = cfg.est_reps
    return out


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
        "eps_opt_plain": _argmin(eps, plain),
        "eps_opt_plain_stderr": float(boot[:, 0].std(ddof=1)),
        "n_batches": int(dl.shape[0]),
    }


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
    progress(f"exact: eps_max {exact.eps_max:.4g}, B_noise {exact.b_noise:.4g}, B_simple "
             f"{exact.b_simple:.4g}, lambda_max {evals[-1]:.4g} (Lanczos {lam_lanczos:.4g}) "
             f"({time.perf_counter() - t0:.1f} s)")
    est = estimated_statistics(model, crit, x, y, cfg, gen)
    progress(f"estimated ({cfg.est_reps} x hessian_noise on {cfg.est_batch} examples): "
             f"eps_max {est['eps_max']:.4g} ± {est['eps_max_stderr']:.2g}, B_noise "
             f"{est['b_noise']:.4g} ± {est['b_noise_stderr']:.2g} "
             f"({time.perf_counter() - t0:.1f} s)")
    rows = []
    for b in cfg.batches:
        pred_exact = theory.eps_opt(b, exact.eps_max, exact.b_noise)
        pred_est = theory.eps_opt(b, est["eps_max"], max(est["b_noise"], 0.0))
        ls = line_search(model, crit, x, y, grads, hess, grad, exact, b, pred_exact, cfg, gen)
        ls.update(eps_opt_predicted=pred_est, eps_opt_predicted_exact=pred_exact,
                  ratio=ls["eps_opt_measured"] / pred_est,
                  ratio_exact=ls["eps_opt_measured"] / pred_exact)
        rows.append(ls)
        progress(f"B = {b}: measured {ls['eps_opt_measured']:.4g} ± "
                 f"{ls['eps_opt_measured_stderr']:.2g}, predicted {pred_est:.4g} "
                 f"({time.perf_counter() - t0:.1f} s)")
    return {
        "config": asdict(cfg),
        "n_data": int(x.shape[0]),
        "n_params": int(grads.shape[1]),
        "train_losses": losses,
        "accuracy": acc,
        "loss": losses[-1],
        "exact": {
            "grad_sq": exact.grad_sq, "tr_sigma": exact.tr_sigma, "g_h_g": exact.g_h_g,
            "tr_h_sigma": exact.tr_h_sigma, "eps_max": exact.eps_max, "b_noise": exact.b_noise,
            "b_simple": exact.b_simple, "lambda_max": float(evals[-1]),
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
    for r in res["line_search"]:
        lines.append(
            f"| {r['batch']} | {r['eps_opt_predicted']:.3f} | {r['eps_opt_predicted_exact']:.3f}"
            f" | {r['eps_opt_measured']:.3f} ± {r['eps_opt_measured_stderr']:.3f}"
            f" | {r['ratio']:.2f} | {r['ratio_exact']:.2f}"
            f" | {r['eps_opt_plain']:.3f} ± {r['eps_opt_plain_stderr']:.3f} |"
        )
    return "\n".join(lines)


def higher_order_table(res: dict) -> str:
    """Quadratic-model E[ΔL(ε)] vs the measured curve at ε ≈ ε_opt and 2ε_opt (exact)."""
    lines = [
        "| B | ε / ε_opt | quadratic model E[ΔL] | measured E[ΔL] | higher-order part |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in res["line_search"]:
        eps = np.array(r["eps"])
        for target in (1.0, 2.0):
            k = int(np.argmin(np.abs(eps / r["eps_opt_predicted_exact"] - target)))
            lines.append(
                f"| {r['batch']} | {eps[k] / r['eps_opt_predicted_exact']:.2f} | "
                f"{r['quadratic_model'][k]:.3e} | {r['mean_delta_loss'][k]:.3e} | "
                f"{r['higher_order'][k]:.3e} |"
            )
    return "\n".join(lines)


def _int_at_least(lo: int):
    """argparse type: an integer ≥ lo (argparse names the option in its one-line error)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {lo}, got {v}")
        return v

    return parse


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


def _write_result(ap: argparse.ArgumentParser, out: str, res: dict) -> None:
    """Atomic strict-JSON write (:func:`validate._io.write_json`); a one-line error if it
    fails."""
    try:
        write_json(out, res)
    except OSError as e:
        ap.exit(1, f"{ap.prog}: error: cannot write {out}: {_reason(e)}\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m validate.digits_check",
                                 description="ε_opt(B) on load_digits: prediction vs line search")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                    help="; ".join(f"{k}: {c.line_batches} batches per B in the line search, "
                                   f"{c.est_reps} hessian_noise calls"
                                   for k, c in PRESETS.items()))
    ap.add_argument("--out", default=os.path.join("figures", "digits_check.json"),
                    help="JSON output path (its folder is created); '' to skip saving")
    ap.add_argument("--threads", type=_int_at_least(1), default=None,
                    help="torch threads, integer ≥ 1 (default 1)")
    ap.add_argument("--seed", type=_int_at_least(0), default=None,
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
    print(f"load_digits, N = {res['n_data']}, CNN with {res['n_params']} parameters, after "
          f"{cfg.train_steps} SGD steps (loss {res['loss']:.3f}, accuracy "
          f"{res['accuracy']:.3f}); exact eps_max = {res['exact']['eps_max']:.4g}, "
          f"B_noise = {res['exact']['b_noise']:.4g}; estimated eps_max = "
          f"{res['estimated']['eps_max']:.4g} ± {res['estimated']['eps_max_stderr']:.2g}, "
          f"B_noise = {res['estimated']['b_noise']:.4g} ± "
          f"{res['estimated']['b_noise_stderr']:.2g}")
    print()
    print(markdown_table(res))
    worst = max(abs(r["ratio"] - 1) for r in res["line_search"])
    res["max_relative_error"] = worst
    if worst > 0.25:
        print()
        print("Agreement worse than 25%: the quadratic model vs the measured curve "
              "(higher-order part = measured − quadratic, averaged over batches):")
        print()
        print(higher_order_table(res))
    if args.out:
        _write_result(ap, args.out, res)
        print(f"\nsaved {args.out} ({res['seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
