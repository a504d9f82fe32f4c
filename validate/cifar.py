r"""``python -m validate.cifar``: train a fast ResNet on CIFAR-10 and measure its gradient noise.

Subcommands:

* ``train`` — one run; prints and saves test accuracy, losses, time and examples/s.
* ``lr_sweep``, ``memory``, ``critical_batch``, ``stable_range``, ``linear_scaling`` — the
  experiments of :mod:`validate.experiments` with CIFAR-10, the fast ResNet and the ``paper``
  preset as defaults (``python -m validate.cifar lr_sweep --help``).
* ``noise`` — the same run, measuring at evenly spaced steps |G|², tr(Σ), B_simple, GᵀHG,
  tr(HΣ), ε_max, B_noise and λ_max (``validate.measure``), saved as JSON + CSV with a figure
  that overlays the predicted optimal step ε_opt(B) = ε_max/(1 + B_noise/B) for the batch in
  use on the learning rate actually used.

Units: ``--lr`` (η) multiplies the mean minibatch gradient; ``--base-lr`` (η̃ = η/B) is the
step per example, the peak step then being η = base_lr · lr_factor · B. Measurements use the
training loss (mean cross-entropy with the run's label smoothing), BatchNorm in training mode
with micro-batches as the units (``--measure-mode eval`` uses running statistics and
per-example gradients instead, i.e. micro-batches of one example, unless ``--micro-batch`` is
given). If training diverges (non-finite loss or weights), ``noise`` stops measuring there and
still saves what it measured, with ``diverged_at_step``, like ``train``; both exit with status 0
then (a divergence is a result), 2 on bad input.

``--resume`` continues from OUT/checkpoint.pt only if the checkpoint was written by the same
command with the same resolved hyperparameters, measurement settings, data, device type and
number of ranks; otherwise it stops with a one-line error naming what differs.

Under ``torchrun --nproc_per_node W`` training is data parallel (gloo on CPU, nccl on GPU) with
``--batch-size`` the global batch, and ``noise`` also records the data-parallel estimate in
which each rank's local gradient is a small batch and their average the big one.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from sgdtheory import _threads

from . import data as data_mod

HERE_HELP = """\
units:
  --lr η            peak step multiplying the MEAN minibatch gradient (PyTorch convention).
  --base-lr η̃       peak step per example, η̃ = η/B (sum convention of Myrtle/airbench);
                    the peak step is then η = base_lr × lr_factor × B.
  --lr-factor       multiplies --base-lr (learning-rate sweeps); ignored with --lr.
  --momentum μ      torch.optim.SGD form v ← μv + g, θ ← θ − ηv, with Nesterov look-ahead
                    unless --no-nesterov; effective rate η/(1−μ).
  --weight-decay λ  adds λθ to the mean-loss gradient.
  --label-smoothing probability mass spread uniformly over the 10 classes (0: plain cross-entropy).
  schedule          linear warm-up over --warmup (fraction of all steps), then linear decay.

data:
  CIFAR-10 is read from DIR/cifar-10-python.tar.gz (md5-checked, no extraction) or an extracted
  DIR/cifar-10-batches-py/. --download fetches it from the Toronto site. --md5 (or the
  environment variable SGDTHEORY_CIFAR10_MD5) overrides the expected archive md5, for mirrors
  and for the small test archives the test-suite generates. --data synthetic needs no files.

outputs (in --out):
  train: train.json, history.csv, checkpoint.pt      noise: noise.json, noise.csv, noise.png
  A diverged run (non-finite loss or weights) still writes them, with diverged_at_step; exit 0.
  --resume refuses a checkpoint written by another command or with other settings.
"""

# Noise-measurement settings per preset: points along the run, examples whose gradients are
# measured (per rank), micro-batch (the units of the two-batch estimator), examples of the
# independent batch defining Ĥ (for GᵀHG, tr(HΣ) and λ_max), Lanczos HVPs for λ_max.
NOISE_PRESETS = {
    "default": {"points": 11, "measure_batch": 2048, "micro_batch": 64, "hessian_batch": 1024,
                "lanczos_iters": 30},
    "quick": {"points": 3, "measure_batch": 256, "micro_batch": 16, "hessian_batch": 32,
              "lanczos_iters": 30},
}
SYNTHETIC_SIZES = {"default": (50_000, 10_000), "quick": (2048, 512)}


def presets_help() -> str:
    """The epilog table of each preset's values (hyperparameters, noise settings, data sizes)."""
    from . import train as train_mod

    lines = ["presets (the defaults that flags override):"]
    for name in ("quick", "default"):
        h = train_mod.make_config(name)
        peak, b = train_mod.peak_lr(h), h.batch_size
        n = NOISE_PRESETS[name]
        subset = f"a {h.subset}-image subset" if h.subset else "all training images"
        nesterov = " (Nesterov)" if h.nesterov and h.momentum > 0 else ""
        lines += [
            f"  {name:<8} batch size B = {b}, {h.epochs} epochs on {subset}, width "
            f"{h.width:g}, whitening {'on' if h.whiten else 'off'}, "
            f"TTA {'on' if h.tta else 'off'}",
            f"           peak lr η = {peak:.4g} (mean gradient); base rate η/B = "
            f"{peak / b:.3g} (--base-lr {h.base_lr:.3g} × --lr-factor {h.lr_factor:g})",
            f"           momentum {h.momentum:g}{nesterov}, weight decay "
            f"{h.weight_decay:g}, label smoothing {h.label_smoothing:g}, warm-up "
            f"{h.warmup:g}, seed {h.seed}",
            f"           noise: {n['points']} points, measure batch {n['measure_batch']}, "
            f"micro-batch {n['micro_batch']}, Hessian batch {n['hessian_batch']}, "
            f"{n['lanczos_iters']} Lanczos HVPs",
            f"           --data synthetic: {SYNTHETIC_SIZES[name][0]} training / "
            f"{SYNTHETIC_SIZES[name][1]} test images",
        ]
    return "\n".join(lines) + "\n"


class _Parser(argparse.ArgumentParser):
    """Appends the preset table to the epilog when help is shown (it imports torch, so it is not
    built for ordinary runs)."""

    def format_help(self) -> str:
        if self.epilog == HERE_HELP:
            self.epilog = HERE_HELP + "\n" + presets_help()
        return super().format_help()

MEASURE_KEYS = (
    "grad_sq", "grad_sq_stderr", "tr_sigma", "tr_sigma_stderr", "b_simple", "b_simple_stderr",
    "g_h_g", "g_h_g_stderr", "tr_h_sigma", "tr_h_sigma_stderr", "eps_max", "eps_max_stderr",
    "b_noise", "b_noise_stderr", "lambda_max",
)


# ---------------------------------------------------------------------------- argument parsing
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m validate.cifar",
        description="Train a fast ResNet on CIFAR-10 (GPU; --device cpu --preset quick for small "
                    "machines) and measure gradient noise and curvature during training.",
        epilog=HERE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{train,noise,lr_sweep,memory,critical_batch,"
                                        "stable_range,linear_scaling}")
    for name, text in (("train", "one training run; saves accuracy, losses and time"),
                       ("noise", "train and measure |G|², tr(Σ), B_simple, GᵀHG, tr(HΣ), ε_max, "
                                 "B_noise, λ_max at points through training")):
        p = sub.add_parser(name, help=text, description=text, epilog=HERE_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common(p)
        if name == "noise":
            g = p.add_argument_group("noise measurement (defaults from the preset)")
            g.add_argument("--points", type=int, help="measurements, evenly spaced in steps "
                           "from the start to the end of training (≥ 2)")
            g.add_argument("--measure-batch", type=int, help="examples whose gradients are "
                           "measured (per rank)")
            g.add_argument("--micro-batch", type=int, help="examples per unit of the two-batch "
                           "estimator (must divide --measure-batch; default: the preset's with "
                           "--measure-mode train, 1 with eval)")
            g.add_argument("--hessian-batch", type=int, help="examples of the independent "
                           "batch defining Ĥ (GᵀHG, tr(HΣ), λ_max)")
            g.add_argument("--lanczos-iters", type=int, help="Lanczos matvecs (HVPs) for λ_max")
            g.add_argument("--measure-mode", choices=("train", "eval"), default="train",
                           help="train: BatchNorm with batch statistics, gradients of "
                                "micro-batches of --micro-batch examples (default); eval: "
                                "BatchNorm with running statistics, per-example gradients "
                                "(micro-batch 1: one HVP per measured example, so lower "
                                "--measure-batch on big runs) unless --micro-batch is given")
    for name, text in (("lr_sweep", "Myrtle's lr × dataset-size × batch sweep, predicted from a "
                                    "measured reference run (python -m validate.experiments "
                                    "with CIFAR-10, the fast ResNet and preset paper as "
                                    "defaults; --help for its options)"),
                       ("memory", "Myrtle's memory experiment, the same way"),
                       ("critical_batch", "McCandlish's critical batch: steps to target losses "
                                          "vs B, B_crit against B_simple and B_noise"),
                       ("stable_range", "Graphcore's stable learning-rate range over base "
                                        "rate × B, and the final sharpness vs B (Keskar)"),
                       ("linear_scaling", "Goyal's linear scaling rule lr = B·η̃₀ with "
                                          "warm-up: where it breaks vs B_noise")):
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=("quick", "default"), default="default",
                   help="quick: narrow net, 1024 images, 2 epochs (CPU, CI); default: the full "
                        "10-epoch GPU recipe (all values: end of --help)")
    p.add_argument("--data", choices=("cifar", "synthetic"), default="cifar",
                   help="real CIFAR-10 or a synthetic learnable dataset of the same shape")
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"folder holding CIFAR-10 (default ${data_mod.DATA_DIR_ENV} or "
                        "~/.cache/sgdtheory/cifar10)")
    p.add_argument("--download", action="store_true", help="fetch CIFAR-10 if it is missing")
    p.add_argument("--md5", default=None,
                   help=f"expected archive md5 (default ${data_mod.MD5_ENV} or the official "
                        f"{data_mod.CIFAR10_MD5}); for mirrors and test archives")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/cifar-CMD)")
    p.add_argument("--seed", type=_seed_arg, default=None,
                   help="integer ≥ 0: model init, subset, shuffles, measurement batches")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt; refused (one-line error naming what "
                        "differs) unless it was written by the same command with the same "
                        "resolved settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _threads.add_threads_argument(p)
    h = p.add_argument_group("hyperparameters (defaults from the preset; units in the epilog)")
    h.add_argument("--epochs", type=int, help="passes over the training subset (integer ≥ 1)")
    h.add_argument("--batch-size", type=int, help="B, examples per step (global across ranks)")
    lr = h.add_mutually_exclusive_group()
    lr.add_argument("--lr", type=float, help="η, peak step on the MEAN minibatch gradient")
    lr.add_argument("--base-lr", type=float, help="η̃ = η/B, peak step per example")
    h.add_argument("--lr-factor", type=float, help="multiplies --base-lr")
    h.add_argument("--momentum", type=float, help="μ in [0, 1), torch.optim.SGD form "
                   "(v ← μv + g, θ ← θ − ηv); 0 → plain SGD")
    h.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help="Nesterov look-ahead (torch form; on in both presets); --no-nesterov "
                        "for plain heavy ball")
    h.add_argument("--weight-decay", type=float, help="λ, added as λθ to the mean gradient")
    h.add_argument("--label-smoothing", type=float,
                   help="probability mass in [0, 1] spread uniformly over the classes (0: plain "
                        "cross-entropy); the measurements use the same loss")
    h.add_argument("--warmup", type=float, help="fraction of steps with linear warm-up")
    h.add_argument("--subset", type=int, help="training examples used (seeded random subset)")
    h.add_argument("--width", type=float, help="channel multiplier of the ResNet")
    h.add_argument("--whiten", action=argparse.BooleanOptionalAction, default=None,
                   help="fixed whitening stem")
    h.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation")
    h.add_argument("--checkpoint-every", type=int, help="steps between checkpoints "
                   "(0: epoch ends only)")


# ---------------------------------------------------------------------------- helpers
def _seed_arg(text: str) -> int:
    """argparse type of --seed: an integer ≥ 0 (argparse names the option in its error)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 0, got {v}")
    return v


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(rows[0]) if rows else []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})


def stability_limit(lambda_max: float, momentum: float, nesterov: bool) -> float:
    r"""Largest stable ``lr`` of (momentum) gradient descent on the top Hessian mode λ_max:
    :func:`sgdtheory.theory.gd_stability_limit`, nan when λ_max ≤ 0 or is not finite (an
    unresolved estimate early in training).

    >>> stability_limit(4.0, 0.0, False), stability_limit(4.0, 0.5, True)
    (0.5, 0.375)
    """
    from sgdtheory import theory

    if not (math.isfinite(lambda_max) and lambda_max > 0):
        return float("nan")
    return float(theory.gd_stability_limit(lambda_max, momentum, nesterov=nesterov and
                                           momentum > 0))


def predicted_eps_opt(batch: int, eps_max: float, b_noise: float) -> float:
    """ε_opt(B) = ε_max/(1 + B_noise/B) via :func:`sgdtheory.theory.eps_opt`; nan when the
    estimates are out of its domain (ε_max ≤ 0 or B_noise < 0, e.g. noisy early estimates)."""
    from sgdtheory import theory

    try:
        return float(theory.eps_opt(batch, eps_max, b_noise))
    except ValueError:
        return float("nan")


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# ---------------------------------------------------------------------------- noise measurement
def measurement_steps(total_steps: int, points: int) -> list[int]:
    """``points`` steps evenly spaced from 0 to ``total_steps`` (inclusive, de-duplicated).

    >>> measurement_steps(32, 4)
    [0, 11, 21, 32]
    """
    return sorted({int(round(s)) for s in np.linspace(0, total_steps, points)})


def make_noise_callback(cfg: dict, hyp, *, rank: int = 0, world: int = 1, log=print):
    """A :func:`validate.train.train` callback measuring the noise scales at evenly spaced steps.

    At each measurement step it draws two independent batches of augmented training examples
    (with replacement), ``cfg['measure_batch']`` for the gradients and ``cfg['hessian_batch']``
    for Ĥ, then records

    * GᵀHG, tr(HΣ), ε_max, B_noise and |G|², tr(Σ), B_simple from
      :func:`validate.measure.hessian_noise` (micro-batch gradients on the first batch, Ĥ on the
      second; the same gradients give both sides of the two-batch estimates);
    * λ_max from :func:`validate.measure.top_hessian_eigenvalue` (Lanczos, second batch);
    * ε_opt(B) for the run's batch B, the step η used next, η/(1−μ) and the stability limit;
    * under ``torchrun``, the data-parallel |G|², tr(Σ), B_simple with each rank's gradient as
      the small batch (``validate.measure.distributed_gradient_noise``).

    Records go to ``state.extra['noise']`` (saved in checkpoints, so a resumed run keeps them).

    Divergence: before measuring, the weights, BatchNorm statistics and the loss on the
    measurement batch must be finite, and the measurement itself must not fail for non-finite
    values; otherwise the callback stores ``state.extra['noise_diverged'] = {'step', 'reason'}``
    and sets ``state.diverged`` so that training stops there (under ``torchrun`` the ranks agree
    first).
    """
    import torch
    from torch import nn

    from . import measure

    criterion = nn.CrossEntropyLoss(label_smoothing=hyp.label_smoothing)
    seed = int(hyp.seed)

    def loss_on(model, x, y) -> float:
        """Loss of the model as measured (buffers restored: running statistics unchanged)."""
        saved = {k: b.clone() for k, b in model.named_buffers()}
        with torch.no_grad():
            value = float(criterion(model(x).float(), y))
            for k, b in model.named_buffers():
                b.copy_(saved[k])
        return value

    def stop(state, reason: str) -> None:
        state.extra["noise_diverged"] = {"step": state.step, "reason": reason}
        state.diverged = True

    def agree(state, bad: bool) -> bool:
        """Whether any rank found the run non-finite (all ranks take the same branch)."""
        if world == 1:
            return bad
        import torch.distributed as dist

        flag = torch.tensor([float(bad)], device=state.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def callback(state) -> None:
        records = state.extra.setdefault("noise", [])
        if state.step not in measurement_steps(state.total_steps, cfg["points"]):
            return
        if any(r["step"] == state.step for r in records):
            return
        t0 = time.perf_counter()
        model = state.model
        model.train(cfg["measure_mode"] == "train")
        tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        finite = bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
        if agree(state, not finite):
            return stop(state, "weights or BatchNorm statistics not finite")
        x, y = state.sample(cfg["measure_batch"], _seed(seed, state.step, rank, 0))
        xh, yh = state.sample(cfg["hessian_batch"], _seed(seed, state.step, rank, 1))
        b = cfg["micro_batch"]
        loss = loss_on(model, x, y)
        if agree(state, not math.isfinite(loss)):
            return stop(state, "loss on the measurement batch not finite")
        # one pass gives both sides: M micro-batch gradients g_k (|G|², tr(Σ)) and Ĥg_k
        try:
            hn = measure.hessian_noise(model, criterion, x, y, micro_batch=b,
                                       hessian_inputs=xh, hessian_targets=yh)
            failed = None
        except ValueError as e:  # the estimators reject non-finite gradients or HVPs
            if "finite" not in str(e):
                raise
            failed = f"measurement not finite ({e})"
        if agree(state, failed is not None):
            return stop(state, failed or "measurement not finite on another rank")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lam = measure.top_hessian_eigenvalue(model, criterion, xh, yh, tol=1e-3,
                                                 max_iter=cfg["lanczos_iters"],
                                                 seed=_seed(seed, state.step, 2))
        converged = not any("converge" in str(w.message).lower()
                            or "stopped" in str(w.message).lower() for w in caught)
        rec = {
            "step": state.step,
            "epoch": state.step / state.steps_per_epoch,
            "examples": state.step * state.batch_size,
            "batch_size": state.batch_size,
            "lr": state.lr,
            "effective_lr": state.lr / (1.0 - state.momentum),
            "grad_sq": hn.grad_sq, "grad_sq_stderr": hn.grad_sq_stderr,
            "tr_sigma": hn.tr_sigma, "tr_sigma_stderr": hn.tr_sigma_stderr,
            "b_simple": hn.b_simple, "b_simple_stderr": hn.b_simple_stderr,
            "g_h_g": hn.g_h_g, "g_h_g_stderr": hn.g_h_g_stderr,
            "tr_h_sigma": hn.tr_h_sigma, "tr_h_sigma_stderr": hn.tr_h_sigma_stderr,
            "eps_max": hn.eps_max, "eps_max_stderr": hn.eps_max_stderr,
            "b_noise": hn.b_noise, "b_noise_stderr": hn.b_noise_stderr,
            "lambda_max": lam, "lambda_max_converged": converged,
            "eps_opt": predicted_eps_opt(state.batch_size, hn.eps_max, hn.b_noise),
            "stability_limit": stability_limit(lam, state.momentum,
                                               bool(hyp.nesterov)),
            "measure_batch": hn.batch, "micro_batch": hn.micro_batch,
            "method": "per_sample" if hn.micro_batch == 1 else "micro_batch",
            "hessian_batch": hn.hessian_batch,
            "measure_mode": cfg["measure_mode"], "measure_loss": loss,
        }
        if world > 1:
            fn_grad = _flat_grad(model, criterion, x, y)
            dn = measure.distributed_gradient_noise(fn_grad, int(x.shape[0]))
            rec.update({"grad_sq_ranks": dn.grad_sq, "tr_sigma_ranks": dn.tr_sigma,
                        "b_simple_ranks": dn.b_simple, "ranks": world})
        rec["seconds"] = time.perf_counter() - t0
        records.append(rec)
        log(f"step {state.step:6d}: B_simple {rec['b_simple']:.4g}  B_noise {rec['b_noise']:.4g}"
            f"  eps_max {rec['eps_max']:.4g}  eps_opt(B={state.batch_size}) {rec['eps_opt']:.4g}"
            f"  lr {state.lr:.4g}  lambda_max {lam:.4g}  ({rec['seconds']:.1f} s)")

    return callback


def _flat_grad(model, criterion, x, y):
    """This rank's mean-loss gradient on (x, y), flat over trainable parameters, model unchanged."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    loss = criterion(model(x), y)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for k, b in model.named_buffers():
            b.copy_(buffers[k])
    return torch.cat([g.reshape(-1) for g in grads]).detach()


def plot_noise(records: list[dict], batch: int, path: Path) -> None:
    """Figure: noise scales vs B; steps (ε_max, ε_opt(B), η, η/(1−μ), stability); |G|², tr(Σ)/B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = np.array([r["step"] for r in records], dtype=float)

    def col(k):
        return np.array([np.nan if r.get(k) is None else r[k] for r in records], dtype=float)

    def pos(v):
        return np.where(np.isfinite(v) & (v > 0), v, np.nan)

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    a = ax[0]
    a.errorbar(step, pos(col("b_simple")), yerr=col("b_simple_stderr"), marker="o", capsize=3,
               label="B_simple = tr(Σ)/|G|²")
    a.errorbar(step, pos(col("b_noise")), yerr=col("b_noise_stderr"), marker="s", capsize=3,
               label="B_noise = tr(HΣ)/GᵀHG")
    a.axhline(batch, color="k", ls="--", lw=1, label=f"batch in use B = {batch}")
    a.set(xlabel="step", ylabel="examples", yscale="log", title="gradient noise scale")
    a.legend(fontsize=8)
    a = ax[1]
    a.plot(step, pos(col("eps_max")), "o-", label="ε_max = |G|²/GᵀHG")
    a.plot(step, pos(col("eps_opt")), "s-", label=f"predicted ε_opt(B={batch})")
    a.plot(step, pos(col("lr")), "k-", label="η used (mean-gradient lr)")
    a.plot(step, pos(col("effective_lr")), "k:", label="η/(1−μ)")
    a.plot(step, pos(col("stability_limit")), "r--", label="stability limit from λ_max")
    a.set(xlabel="step", ylabel="step size (lr units)", yscale="log",
          title="optimal step vs the step used")
    a.legend(fontsize=8)
    a = ax[2]
    a.plot(step, pos(col("grad_sq")), "o-", label="|G|²")
    a.plot(step, pos(col("tr_sigma") / batch), "s-", label="tr(Σ)/B")
    a.plot(step, pos(col("lambda_max")), "^-", label="λ_max")
    a.set(xlabel="step", yscale="log", title="signal, noise at B, curvature")
    a.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def _noise_cfg(args) -> dict:
    cfg = dict(NOISE_PRESETS[args.preset])
    for k in cfg:
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    cfg["measure_mode"] = args.measure_mode
    if args.measure_mode == "eval" and args.micro_batch is None:
        cfg["micro_batch"] = 1  # running statistics: per-example gradients are well defined
    if cfg["points"] < 2:
        raise ValueError(f"--points must be at least 2, got {cfg['points']}")
    if cfg["measure_batch"] < 4:
        raise ValueError(f"--measure-batch must be at least 4, got {cfg['measure_batch']}")
    if cfg["micro_batch"] < 1 or cfg["measure_batch"] % cfg["micro_batch"] \
            or cfg["measure_batch"] // cfg["micro_batch"] < 2:
        raise ValueError(f"--micro-batch ({cfg['micro_batch']}) must divide --measure-batch "
                         f"({cfg['measure_batch']}) into at least 2 parts")
    if cfg["measure_mode"] == "train" and cfg["micro_batch"] < 2:
        raise ValueError("--micro-batch must be ≥ 2 with --measure-mode train (BatchNorm)")
    if cfg["hessian_batch"] < 2:
        raise ValueError(f"--hessian-batch must be at least 2, got {cfg['hessian_batch']}")
    if cfg["lanczos_iters"] < 2:
        raise ValueError(f"--lanczos-iters must be at least 2, got {cfg['lanczos_iters']}")
    cfg["method"] = "per_sample" if cfg["micro_batch"] == 1 else "micro_batch"
    return cfg


def run(args, log=print) -> dict:
    """Execute one parsed command; returns what it saved. Raises ValueError / FileNotFoundError /
    DatasetError on bad input (before anything is written)."""
    import torch

    from . import train as train_mod
    from ._io import resolve_device, write_json

    device = resolve_device(args.device)
    overrides = {k: getattr(args, k) for k in (
        "epochs", "batch_size", "lr", "base_lr", "lr_factor", "momentum", "weight_decay",
        "label_smoothing", "warmup", "subset", "width", "whiten", "tta", "checkpoint_every",
        "seed", "nesterov")}
    hyp = train_mod.make_config(args.preset, **overrides)
    cfg = _noise_cfg(args) if args.command == "noise" else None

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device(f"cuda:{local}")
        if hyp.batch_size % world:
            raise ValueError(f"--batch-size ({hyp.batch_size}) must be divisible by the "
                             f"number of ranks ({world})")
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    def load(download: bool):
        return data_mod.load_data(args.data, data_dir=args.data_dir, md5=args.md5,
                                  download=download, seed=hyp.seed,
                                  n_synthetic=SYNTHETIC_SIZES[args.preset])

    if world > 1 and args.download:  # rank 0 fetches the archive while the others wait
        import torch.distributed as dist

        data = load(True) if rank == 0 else None
        dist.barrier()
        data = data if data is not None else load(False)
    else:
        data = load(args.download)
    train_mod.check_config(hyp, data)

    out = args.out if args.out is not None else Path("runs") / f"cifar-{args.command}"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    quiet = rank != 0
    say = (lambda *a, **k: None) if quiet else log
    say(f"data: {data.source}  train {data.train_images.shape[0]}  test "
        f"{data.test_images.shape[0]}  device {device}  ranks {world}")
    peak = train_mod.peak_lr(hyp)
    say(f"peak lr η = {peak:.4g} on the mean gradient (base rate η/B = "
        f"{peak / hyp.batch_size:.3g} per example), B = {hyp.batch_size}, "
        f"momentum {hyp.momentum}, {hyp.epochs} epochs")
    callback = make_noise_callback(cfg, hyp, rank=rank, world=world, log=say) \
        if cfg is not None else None
    # everything besides hyp that changes the results: --resume must find the same in the
    # checkpoint (data identified by kind, md5 and sizes, not by where it lies)
    run_info = {
        "command": args.command,
        "data": data.source if args.data == "synthetic"
        else f"cifar10 (archive md5 {(args.md5 or data_mod.default_md5()).strip().lower()})",
        "train_images": int(data.train_images.shape[0]),
        "test_images": int(data.test_images.shape[0]),
        "device_type": device.type,
        "world_size": world,
        "noise_config": cfg,
    }
    result = train_mod.train(hyp, data, device=device, checkpoint=out / "checkpoint.pt",
                             resume=args.resume, callback=callback,
                             progress=not args.no_progress and not quiet, run_info=run_info)
    result.pop("model")
    extra = result.pop("extra")
    meta = {"command": args.command, "argv": sys.argv[1:], "device": str(device),
            "world_size": world,
            "data": data.source, "torch": torch.__version__, "hyp": hyp, "noise_config": cfg,
            "run_info": run_info}
    summary = {**meta, **result}
    if cfg is not None:  # measurement time, apart from the training time time_s
        summary["measure_time_s"] = sum(r["seconds"] for r in extra.get("noise", []))
    diverged = result["diverged_at_step"]
    if diverged is not None:
        why = extra.get("noise_diverged", {}).get("reason", "training loss not finite")
        summary["diverged_reason"] = why
        note = f"diverged at step {diverged} of {result['total_steps']} ({why})"
        if cfg is not None:
            planned = len(measurement_steps(result["total_steps"], cfg["points"]))
            note += (f"; measurements stopped there: {len(extra.get('noise', []))} of "
                     f"{planned} saved")
        say(note + "; no test accuracy")
    else:
        say(f"test accuracy {result['test_acc']:.4f}  test loss {result['test_loss']:.4f}  "
            f"train time {result['time_s']:.1f} s  {result['examples_per_s']:.0f} examples/s  "
            f"({result['steps']} steps)" + (f"  measurement time {summary['measure_time_s']:.1f} s"
                                            if cfg is not None else ""))
    if rank == 0:
        if args.command == "train":
            write_json(out / "train.json", summary, indent=2)
            _write_csv(out / "history.csv", result["history"])
        else:
            records = extra.get("noise", [])
            summary["measurements"] = records
            write_json(out / "noise.json", summary, indent=2)
            _write_csv(out / "noise.csv", records)
            plot_noise(records, hyp.batch_size, out / "noise.png")
        say(f"wrote {out}")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return summary


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from .experiments import EXPERIMENTS

    if argv and argv[0] in EXPERIMENTS:  # the experiments' CLI with CIFAR-10 defaults
        from .experiments.cli import main as experiments_main

        return experiments_main(argv, prog="python -m validate.cifar", default_data="cifar10",
                                default_preset="paper")
    parser = build_parser()
    args = parser.parse_args(argv)
    _threads.limit_threads(args.threads)  # before torch loads: passive OpenMP waits
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:  # includes data.DatasetError
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted; rerun with --resume to continue from the "
                         "last checkpoint\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
