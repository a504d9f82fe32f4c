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

Estimates that are not resolved (early in training GᵀHG is often ≤ 0 within its error, so
ε_max, B_noise and ε_opt mean nothing yet) are reported as such: the console says
"unresolved" and why, every measured value is printed as value ± standard error, and
noise.json / noise.csv hold ``null`` (an empty CSV cell) for a value that is not a finite
number, with ``resolved`` and ``reason`` in each record (strict JSON: no NaN/Infinity). The
stability limit of gradient descent on λ_max is the column ``gd_limit``, as in
:class:`validate.monitor.NoiseMonitor`, whose measurement core
(:func:`validate.monitor.measure_curvature`, :func:`validate.monitor.predictions`) this
command uses.

Checked before training (one line, exit status 2): ``--out`` must be a folder that can be
created and written (not a file, nor under one, nor read-only); ``--seed`` must lie in
[0, 2**32) (every seed the run derives, e.g. ``seed·1000003 + epoch`` for the epoch shuffles,
then fits torch's and NumPy's 64-bit seeds); and the run must fit in memory: a lower bound of
the memory the batch, width and measurement sizes need (:func:`memory_needed`) is compared with
the memory available (MemAvailable on CPU, ``torch.cuda.mem_get_info`` on a GPU).

Under ``torchrun --nproc_per_node W`` training is data parallel (gloo on CPU, nccl on GPU) with
``--batch-size`` the global batch, and ``noise`` also records the data-parallel estimate in
which each rank's local gradient is a small batch and their average the big one.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
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
  DIR/cifar-10-batches-py/. --download fetches it from the Toronto site, or from the URL in
  the environment variable SGDTHEORY_CIFAR10_URL (a mirror; file:// works). --md5 (or the
  environment variable SGDTHEORY_CIFAR10_MD5) overrides the expected archive md5, for mirrors
  and for the small test archives the test-suite generates. Members are unpickled by a
  restricted loader (arrays, dicts, bytes, numbers only), md5 or not. --data synthetic needs
  no files.

outputs (in --out):
  train: train.json, history.csv, checkpoint.pt      noise: noise.json, noise.csv, noise.png
  noise.json/noise.csv: a value that is not resolved or not finite is null (empty cell), with
  'resolved' and 'reason' in its record; the stability limit 2(1+μ)/λ_max (Nesterov:
  /(1+2μ)) is the column gd_limit, as in NoiseMonitor.
  A diverged run (non-finite loss or weights) still writes them, with diverged_at_step; exit 0.
  --resume refuses a checkpoint written by another command or with other settings.
"""

# ---------------------------------------------------------------------------- noise settings
def _count(value, name: str, minimum: int) -> int:
    """``value`` as an int ≥ ``minimum`` (NumPy integers accepted, bool and float refused);
    ``ValueError`` naming the flag otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


@dataclass(frozen=True)
class NoiseConfig:
    """Settings of the noise measurement of ``python -m validate.cifar noise`` (checked on
    creation; messages name the flags).

    Attributes:
        points: measurements, evenly spaced in steps from the start to the end (≥ 2).
        measure_batch: examples whose gradients are measured, per rank (≥ 4).
        micro_batch: examples per unit of the two-batch estimator; divides ``measure_batch``
            into ≥ 2 units; ≥ 2 with ``measure_mode='train'`` (BatchNorm batch statistics).
        hessian_batch: examples of the independent batch defining Ĥ (GᵀHG, tr(HΣ), λ_max; ≥ 2).
        lanczos_iters: Lanczos matvecs (HVPs) for λ_max (≥ 2).
        measure_mode: ``'train'`` (BatchNorm batch statistics) or ``'eval'`` (running ones).
        method: derived, ``'per_sample'`` when ``micro_batch`` is 1, else ``'micro_batch'``.
    """

    points: int = 11
    measure_batch: int = 2048
    micro_batch: int = 64
    hessian_batch: int = 1024
    lanczos_iters: int = 30
    measure_mode: str = "train"
    method: str = field(init=False, default="")

    def __post_init__(self):
        for name, low in (("points", 2), ("measure_batch", 4), ("micro_batch", 1),
                          ("hessian_batch", 2), ("lanczos_iters", 2)):
            object.__setattr__(self, name, _count(getattr(self, name),
                                                  "--" + name.replace("_", "-"), low))
        if self.measure_mode not in ("train", "eval"):
            raise ValueError(f"--measure-mode must be 'train' or 'eval', got "
                             f"{self.measure_mode!r}")
        m, n = self.micro_batch, self.measure_batch
        if n % m or n // m < 2:
            raise ValueError(f"--micro-batch ({m}) must divide --measure-batch ({n}) into at "
                             "least 2 parts")
        if self.measure_mode == "train" and m < 2:
            raise ValueError("--micro-batch must be ≥ 2 with --measure-mode train (BatchNorm)")
        object.__setattr__(self, "method", "per_sample" if m == 1 else "micro_batch")

    @property
    def units(self) -> int:
        """M, the number of micro-batch gradients per measurement."""
        return self.measure_batch // self.micro_batch


#: The noise settings of each preset (flags override them through :func:`noise_config`).
NOISE_PRESETS = {
    "default": NoiseConfig(),
    "quick": NoiseConfig(points=3, measure_batch=256, micro_batch=16, hessian_batch=32),
}
SYNTHETIC_SIZES = {"default": (50_000, 10_000), "quick": (2048, 512)}


def noise_config(preset: str, **flags) -> NoiseConfig:
    """The preset's :class:`NoiseConfig` with the flags that were given (None: unset). With
    ``measure_mode='eval'`` and no ``micro_batch`` the units are single examples (running
    statistics make per-example gradients well defined).

    >>> noise_config("quick", measure_mode="eval").micro_batch
    1
    """
    base = NOISE_PRESETS[preset]
    given = {k: v for k, v in flags.items() if v is not None}
    if given.get("measure_mode") == "eval" and "micro_batch" not in given:
        given["micro_batch"] = 1
    return dataclasses.replace(base, **given)


def _fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def _from_args(cls, args) -> dict:
    """The flags of ``args`` named like the init fields of the dataclass ``cls`` (one name for
    a flag's dest and the setting it overrides)."""
    return {k: getattr(args, k) for k in _fields(cls) if hasattr(args, k)}


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
            f"           noise: {n.points} points, measure batch {n.measure_batch}, "
            f"micro-batch {n.micro_batch}, Hessian batch {n.hessian_batch}, "
            f"{n.lanczos_iters} Lanczos HVPs",
            f"           --data synthetic: {SYNTHETIC_SIZES[name][0]} training / "
            f"{SYNTHETIC_SIZES[name][1]} test images",
        ]
    return "\n".join(lines) + "\n"


class _Parser(argparse.ArgumentParser):
    """Appends the preset table to the epilog when help is shown (it imports torch, so it is not
    built for ordinary runs); errors print one short usage line and the error, status 2."""

    def format_help(self) -> str:
        if self.epilog == HERE_HELP:
            self.epilog = HERE_HELP + "\n" + presets_help()
        return super().format_help()

    def error(self, message: str):
        self.exit(2, f"usage: {self.prog} [options]  (--help lists them)\n"
                     f"{self.prog}: error: {message}\n")


#: Columns of noise.json's measurements that come from the HessianNoise estimate.
MEASURE_KEYS = (
    "grad_sq", "grad_sq_stderr", "tr_sigma", "tr_sigma_stderr", "b_simple", "b_simple_stderr",
    "g_h_g", "g_h_g_stderr", "tr_h_sigma", "tr_h_sigma_stderr", "eps_max", "eps_max_stderr",
    "b_noise", "b_noise_stderr",
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
#: --seed must lie in [0, SEED_LIMIT): every seed derived from it (seed·1000003 + epoch for the
#: epoch shuffles, SeedSequence entropy) then fits torch's and NumPy's 64-bit seed range.
SEED_LIMIT = 2**32


def _seed_arg(text: str) -> int:
    """argparse type of --seed: an integer in [0, 2**32) (argparse names the option)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 0, got {v}")
    if v >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be below 2**32 = {SEED_LIMIT} (the seeds derived "
                                         f"from it must fit torch's 64-bit range), got {v}")
    return v


def _write_csv(path: Path, rows: list[dict]) -> None:
    """Rows as CSV (columns of the first row); None and non-finite floats as empty cells."""
    keys = list(rows[0]) if rows else []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if _finite(r.get(k)) is None else r.get(k) for k in keys})


def _finite(v):
    """None for None or a non-finite float (strict JSON, empty CSV cell), else ``v``."""
    if v is None or (isinstance(v, (float, np.floating)) and not math.isfinite(v)):
        return None
    return v


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def measurement_steps(total_steps: int, points: int) -> list[int]:
    """``points`` steps evenly spaced from 0 to ``total_steps`` (inclusive, de-duplicated);
    NumPy integers accepted.

    >>> measurement_steps(32, 4)
    [0, 11, 21, 32]
    """
    total_steps = _count(total_steps, "total_steps", 0)
    points = _count(points, "points", 2)
    return sorted({int(round(s)) for s in np.linspace(0, total_steps, points)})


# ---------------------------------------------------------------------------- up-front checks
def check_out(out: Path) -> Path:
    """``ValueError`` (one line naming --out) unless ``out`` is, or can be created as, a
    writable folder: not a file, not under a file, not in a read-only place. Creates nothing
    (a probe folder is made and removed in the nearest existing ancestor)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    anc = out
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"--out {out} lies under the file {anc}, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sgdtheory-probe-", dir=anc))
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write in {anc} "
                         f"({e.strerror or type(e).__name__})") from None
    return out


def _channels(width: float) -> list[float]:
    """(c₀, c₁, c₂, c₃) of :func:`validate.models.channels` in floats (inf for absurd widths)."""
    out = []
    for base in (64, 128, 256, 512):
        x = base * width / 8
        out.append(max(8.0, 8.0 * (float(np.round(x)) if x < 1e15 else x)))
    return out


def resnet_size(width: float, whiten: bool) -> tuple[float, float]:
    """(activations per example, parameters) of the fast ResNet at ``width``: the number of
    float32 values its conv, max-pool, BatchNorm, GELU and residual-sum outputs hold for one
    32×32 example (what training keeps for the backward pass), and its trainable parameter
    count (convolutions, BatchNorm scales and shifts, head)."""
    c0, c1, c2, c3 = _channels(width)
    if whiten:  # fixed 2×2 conv stem (31×31, 24 channels) + GELU; its weights are frozen
        stem_act, stem_par, c0 = 2 * 24 * 31 * 31, 24, 24
        s1 = 31 * 31
    else:       # ConvBN: conv, BN, GELU at 32×32
        stem_act, stem_par = 3 * c0 * 1024, 27 * c0 + 2 * c0
        s1 = 1024
    q1 = (int(math.isqrt(s1)) // 2) ** 2  # after each 2×2 max-pool
    q2 = (int(math.isqrt(q1)) // 2) ** 2
    q3 = (int(math.isqrt(q2)) // 2) ** 2
    act = (stem_act
           + c1 * (s1 + 3 * q1) + 7 * c1 * q1      # ConvBN(pool) + Residual (2 ConvBN + sum)
           + c2 * (q1 + 3 * q2)                    # ConvBN(pool)
           + c3 * (q2 + 3 * q3) + 7 * c3 * q3      # ConvBN(pool) + Residual
           + c3 + 10)                              # global max-pool, logits
    par = (stem_par + 9 * c0 * c1 + 2 * c1 + 2 * (9 * c1 * c1 + 2 * c1) + 9 * c1 * c2 + 2 * c2
           + 9 * c2 * c3 + 2 * c3 + 2 * (9 * c3 * c3 + 2 * c3) + 10 * c3)
    return float(act), float(par)


def memory_needed(hyp, cfg: NoiseConfig | None = None, world: int = 1) -> list[tuple]:
    """Lower bounds (bytes, float32) of the memory a run needs, as (bytes, what, flags):

    * training: the activations of a local batch (B/ranks examples) kept for the backward pass
      plus weights, gradients and momentum (3 × parameters);
    * measurement (``cfg``): the M = measure_batch/micro_batch micro-batch gradients and their
      Hessian products (2·M × parameters), the activations of the Hessian batch twice (the
      double-backward graph) or of one micro-batch, whichever is larger, and the two sampled
      batches of 3×32×32 inputs.
    """
    act, par = resnet_size(hyp.width, hyp.whiten)
    b_local = hyp.batch_size / world
    out = [(4 * (act * b_local + 3 * par), f"a batch of {b_local:g} examples at width "
            f"{hyp.width:g} ({act:.3g} activations per example, {par:.3g} parameters)",
            "--batch-size / --width")]
    if cfg is not None:
        m = cfg.units
        out.append((4 * (2 * m * par + 3 * par), f"{m} micro-batch gradients and their Hessian "
                    f"products of {par:.3g} parameters each", "--measure-batch / --micro-batch "
                    "/ --width"))
        out.append((4 * (act * max(2 * cfg.hessian_batch, cfg.micro_batch) + 3 * par
                         + 3072 * (cfg.measure_batch + cfg.hessian_batch)),
                    f"the Hessian batch of {cfg.hessian_batch} and micro-batches of "
                    f"{cfg.micro_batch} examples at width {hyp.width:g}",
                    "--hessian-batch / --micro-batch / --width"))
    return out


def memory_available(device) -> float | None:
    """Bytes free for the run: ``torch.cuda.mem_get_info`` on a GPU, MemAvailable of
    /proc/meminfo (else free pages × page size) on CPU; None when unknown."""
    try:
        if device.type == "cuda":
            import torch

            return float(torch.cuda.mem_get_info(device)[0])
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return 1024.0 * float(line.split()[1])
        except OSError:
            pass
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if math.isfinite(n) else "an unbounded amount"


def check_memory(hyp, cfg: NoiseConfig | None, device, world: int = 1,
                 available: float | None = None) -> None:
    """``ValueError`` (one line naming the flags) when a lower bound of the memory the run needs
    (:func:`memory_needed`) exceeds what is available (:func:`memory_available`)."""
    available = memory_available(device) if available is None else available
    if available is None:
        return
    need, what, flags = max(memory_needed(hyp, cfg, world), key=lambda t: t[0])
    if not need <= available:
        where = "GPU memory" if device.type == "cuda" else "RAM"
        raise ValueError(f"{flags}: the run needs at least {_gib(need)} for {what}, but only "
                         f"{_gib(available)} of {where} is available; lower them")


# ---------------------------------------------------------------------------- noise measurement
def _pm(value, stderr, resolved: bool = True) -> str:
    """'v ± se' for the console, '(unresolved)' appended when the estimate is not resolved,
    'unresolved' alone when there is no finite value."""
    if _finite(value) is None:
        return "unresolved"
    text = f"{value:.4g} (no s.e.)" if _finite(stderr) is None else f"{value:.4g} ± {stderr:.2g}"
    return text if resolved else text + " (unresolved)"


def noise_record(point, *, step: int, steps_per_epoch: int, batch: int, lr: float,
                 momentum: float, nesterov: bool, cfg: NoiseConfig, loss: float) -> dict:
    """One row of noise.json from a :class:`validate.monitor.CurvaturePoint`: the estimates of
    :data:`MEASURE_KEYS` with standard errors, λ_max, the predictions of
    :func:`validate.monitor.predictions` (effective_lr, eps_opt ± eps_opt_stderr, gd_limit),
    the measurement settings, ``resolved`` (every estimate significantly positive and ε_opt,
    gd_limit defined), ``reason`` ('' or why not), and per estimate ``b_simple_resolved``
    (|G|² significantly positive) and ``eps_max_resolved`` (GᵀHG and |G|² significantly
    positive: ε_max, B_noise, ε_opt mean something). Values that are not finite are None."""
    from . import _noise
    from .monitor import predictions

    hn = point.noise
    p = predictions(lr, batch, eps_max=hn.eps_max, b_noise=hn.b_noise,
                    lambda_max=point.lambda_max, momentum=momentum, nesterov=nesterov,
                    eps_max_stderr=hn.eps_max_stderr, b_noise_stderr=hn.b_noise_stderr)
    reasons = [hn.reason] if not hn.resolved else [p["eps_opt_reason"]]
    if _finite(p["gd_limit"]) is None:
        reasons.append(f"λ_max = {point.lambda_max:.3g}: no positive curvature, no gd_limit")
    reasons = [r for r in reasons if r]
    units = hn.batch // hn.micro_batch
    rec = {"step": step, "epoch": step / steps_per_epoch, "examples": step * batch,
           "batch_size": batch, "lr": lr, "effective_lr": p["effective_lr"],
           **{k: getattr(hn, k) for k in MEASURE_KEYS},
           "lambda_max": point.lambda_max, "lambda_max_converged": point.lambda_max_converged,
           "eps_opt": p["eps_opt"], "eps_opt_stderr": p["eps_opt_stderr"],
           "gd_limit": p["gd_limit"],
           "measure_batch": hn.batch, "micro_batch": hn.micro_batch,
           "method": "per_sample" if hn.micro_batch == 1 else "micro_batch",
           "hessian_batch": hn.hessian_batch, "measure_mode": cfg.measure_mode,
           "measure_loss": loss, "resolved": not reasons, "reason": "; ".join(reasons),
           # per estimate: B_simple needs |G|² resolved; ε_max and B_noise both GᵀHG and |G|²
           "b_simple_resolved": not _noise.resolution("|G|²", hn.grad_sq, hn.grad_sq_stderr,
                                                      units - 1),
           "eps_max_resolved": bool(hn.resolved)}
    return {k: _finite(v) for k, v in rec.items()}


def noise_line(rec: dict) -> str:
    """The console line of one measurement: every estimate as value ± standard error, or
    'unresolved' with the reason at the end."""
    ok, ok_b = rec["eps_max_resolved"], rec["b_simple_resolved"]
    lam = rec["lambda_max"]
    line = (f"step {rec['step']:6d}: B_simple {_pm(rec['b_simple'], rec['b_simple_stderr'], ok_b)}"
            f"  B_noise {_pm(rec['b_noise'], rec['b_noise_stderr'], ok)}  "
            f"eps_max {_pm(rec['eps_max'], rec['eps_max_stderr'], ok)}  "
            f"eps_opt(B={rec['batch_size']}) {_pm(rec['eps_opt'], rec['eps_opt_stderr'], ok)}  "
            f"lr {rec['lr']:.4g}  lambda_max "
            + ("unresolved" if lam is None else f"{lam:.4g}")
            + ("" if rec["lambda_max_converged"] else " (Lanczos not converged)")
            + f"  ({rec['seconds']:.1f} s)")
    return line if rec["resolved"] else f"{line}  [{rec['reason']}]"


class NoiseCallback:
    """A :func:`validate.train.train` callback measuring the noise scales at evenly spaced steps.

    At each of ``cfg.points`` steps it draws two independent batches of augmented training
    examples (with replacement), ``cfg.measure_batch`` for the gradients and
    ``cfg.hessian_batch`` for Ĥ, and measures them with
    :func:`validate.monitor.measure_curvature` (the core shared with
    :class:`validate.monitor.NoiseMonitor`): GᵀHG, tr(HΣ), ε_max, B_noise and |G|², tr(Σ),
    B_simple from :func:`validate.measure.hessian_noise`, λ_max by Lanczos on the second batch;
    the record (:func:`noise_record`) adds ε_opt(B), η, η/(1−μ) and ``gd_limit``. Under
    ``torchrun`` it also records the data-parallel |G|², tr(Σ), B_simple with each rank's
    gradient as the small batch (``validate.measure.distributed_gradient_noise``).

    Records go to ``state.extra['noise']`` (saved in checkpoints, so a resumed run keeps them).

    Divergence: before measuring, the weights, BatchNorm statistics and the loss on the
    measurement batch must be finite, and the measurement itself must not fail for non-finite
    values; otherwise the callback stores ``state.extra['noise_diverged'] = {'step', 'reason'}``
    and sets ``state.diverged`` so that training stops there (under ``torchrun`` the ranks agree
    first).
    """

    def __init__(self, cfg: NoiseConfig, hyp, *, rank: int = 0, world: int = 1, log=print):
        from torch import nn

        self.cfg, self.hyp, self.rank, self.world, self.log = cfg, hyp, rank, world, log
        self.criterion = nn.CrossEntropyLoss(label_smoothing=hyp.label_smoothing)
        self.seed = int(hyp.seed)

    def __call__(self, state) -> None:
        records = state.extra.setdefault("noise", [])
        if state.step not in measurement_steps(state.total_steps, self.cfg.points) \
                or any(r["step"] == state.step for r in records):
            return
        t0 = time.perf_counter()
        model = state.model
        model.train(self.cfg.measure_mode == "train")
        if self._agree(state, not self._finite_model(model)):
            return self._stop(state, "weights or BatchNorm statistics not finite")
        x, y = state.sample(self.cfg.measure_batch, _seed(self.seed, state.step, self.rank, 0))
        xh, yh = state.sample(self.cfg.hessian_batch, _seed(self.seed, state.step, self.rank, 1))
        loss = self._loss(model, x, y)
        if self._agree(state, not math.isfinite(loss)):
            return self._stop(state, "loss on the measurement batch not finite")
        point, failed = self._measure(model, x, y, xh, yh, state.step)
        if self._agree(state, failed is not None):
            return self._stop(state, failed or "measurement not finite on another rank")
        rec = noise_record(point, step=state.step, steps_per_epoch=state.steps_per_epoch,
                           batch=state.batch_size, lr=state.lr, momentum=state.momentum,
                           nesterov=bool(self.hyp.nesterov), cfg=self.cfg, loss=loss)
        if self.world > 1:
            rec.update(self._ranks(model, x, y))
        rec["seconds"] = time.perf_counter() - t0
        records.append(rec)
        self.log(noise_line(rec))

    def _measure(self, model, x, y, xh, yh, step: int):
        """(CurvaturePoint, None), or (None, reason) when the estimators find non-finite
        gradients or HVPs (a divergence)."""
        from .monitor import measure_curvature

        try:
            point = measure_curvature(model, self.criterion, x, y, micro_batch=self.cfg.micro_batch,
                                      hessian_inputs=xh, hessian_targets=yh,
                                      lanczos_iters=self.cfg.lanczos_iters, tol=1e-3,
                                      seed=_seed(self.seed, step, 2))
        except ValueError as e:
            if "finite" not in str(e):
                raise
            return None, f"measurement not finite ({e})"
        return point, None

    def _ranks(self, model, x, y) -> dict:
        """The data-parallel estimate: each rank's local gradient is a small batch."""
        from . import measure

        dn = measure.distributed_gradient_noise(_flat_grad(model, self.criterion, x, y),
                                                int(x.shape[0]))
        return {k: _finite(v) for k, v in (
            ("grad_sq_ranks", dn.grad_sq), ("tr_sigma_ranks", dn.tr_sigma),
            ("b_simple_ranks", dn.b_simple), ("ranks", self.world),
            ("ranks_resolved", dn.resolved), ("ranks_reason", dn.reason))}

    def _loss(self, model, x, y) -> float:
        """Loss of the model as measured (buffers restored: running statistics unchanged)."""
        import torch

        saved = {k: b.clone() for k, b in model.named_buffers()}
        with torch.no_grad():
            value = float(self.criterion(model(x).float(), y))
            for k, b in model.named_buffers():
                b.copy_(saved[k])
        return value

    @staticmethod
    def _finite_model(model) -> bool:
        import torch

        tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    @staticmethod
    def _stop(state, reason: str) -> None:
        state.extra["noise_diverged"] = {"step": state.step, "reason": reason}
        state.diverged = True

    def _agree(self, state, bad: bool) -> bool:
        """Whether any rank found the run non-finite (all ranks take the same branch)."""
        if self.world == 1:
            return bad
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(bad)], device=state.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def make_noise_callback(cfg: NoiseConfig, hyp, *, rank: int = 0, world: int = 1, log=print):
    """:class:`NoiseCallback` (kept for callers of the older function)."""
    return NoiseCallback(cfg, hyp, rank=rank, world=world, log=log)


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


# ---------------------------------------------------------------------------- figure
def plot_noise(records: list[dict], batch: int, path: Path | None = None, *,
               title: str | None = None):
    """noise.png in the house style of ``python -m sgdtheory.figures``
    (:mod:`sgdtheory.experiments._plotting`), four panels against the training step:

    * noise scales B_simple, B_noise ± 1 s.e. (examples) with the batch in use;
    * steps (``lr`` units): ε_max, ε_opt(B) ± 1 s.e., η used, η/(1−μ) and ``gd_limit``;
    * |G|² and tr(Σ)/B ± 1 s.e. ((loss/param)²);
    * λ_max (loss/param²).

    Filled markers are resolved estimates, hollow ones unresolved (see ``reason`` in
    noise.json); a note lists the steps where a value is missing. Returns the figure (written
    to ``path`` when given)."""
    from sgdtheory.experiments import _plotting as P

    step = np.array([r["step"] for r in records], dtype=float)

    def col(k, positive=True):
        v = np.array([np.nan if r.get(k) is None else r[k] for r in records], dtype=float)
        return np.where(np.isfinite(v) & (v > 0), v, np.nan) if positive else v

    def se(k):
        return col(k + "_stderr", positive=False)

    def flag(k):
        return np.array([bool(r.get(k, r.get("resolved", True))) for r in records], dtype=bool)

    fig, ax = P.subplots(2, 2, panel_size=(5.0, 3.4), title=title)
    _points(P, ax[0], step, col("b_simple"), se("b_simple"), flag("b_simple_resolved"),
            "B_simple = tr(Σ)/|G|²", 0, "o")
    _points(P, ax[0], step, col("b_noise"), se("b_noise"), flag("eps_max_resolved"),
            "B_noise = tr(HΣ)/GᵀHG", 1, "s")
    ax[0].axhline(batch, color="k", ls="--", lw=1, label=f"batch in use B = {batch}")
    ax[0].set(xlabel="step", ylabel="noise scale (examples)", title="gradient noise scale")
    _points(P, ax[1], step, col("eps_max"), se("eps_max"), flag("eps_max_resolved"),
            "ε_max = |G|²/GᵀHG", 0, "o")
    _points(P, ax[1], step, col("eps_opt"), se("eps_opt"), flag("eps_max_resolved"),
            f"ε_opt(B={batch}) = ε_max/(1+B_noise/B), predicted", 1, "s")
    P.theory(ax[1], step, col("lr"), "η used (mean-gradient lr)", c="k")
    P.theory(ax[1], step, col("effective_lr"), "η/(1−μ)", c="k", ls=":")
    P.theory(ax[1], step, col("gd_limit"), "gd_limit 2(1+μ)/λ_max", c=P.color(3), ls="--")
    ax[1].set(xlabel="step", ylabel="step size (lr units, mean gradient)",
              title="optimal step vs the step used")
    ones = np.ones(len(records), dtype=bool)
    _points(P, ax[2], step, col("grad_sq"), se("grad_sq"), flag("b_simple_resolved"),
            "|G|²", 2, "o")
    _points(P, ax[2], step, col("tr_sigma") / batch, se("tr_sigma") / batch, ones,
            f"tr(Σ)/B (noise at B = {batch})", 3, "s")
    ax[2].set(xlabel="step", ylabel="squared gradient norm ((loss/param)²)",
              title="signal and noise at B")
    _points(P, ax[3], step, col("lambda_max"), None, flag("lambda_max_converged"),
            "λ_max (Lanczos)", 4, "^")
    ax[3].set(xlabel="step", ylabel="λ_max (loss/param²)", title="top Hessian eigenvalue")
    for i, a in enumerate(ax):
        if any(np.nanmax(np.asarray(ln.get_ydata(), dtype=float), initial=0) > 0
               for ln in a.get_lines()):
            a.set_yscale("log")
        P.legend(a, key=False, extra=_hollow_key("Lanczos not converged" if i == 3 else
                                                 "not resolved (reason in noise.json)"))
    _missing_note(fig, records)
    if path is not None:
        P.save(fig, path)
    return fig


def _points(P, ax, x, y, err, ok, label, i, marker) -> None:
    """Resolved points filled, unresolved ones hollow, with ±1 s.e. bars."""
    err = None if err is None else np.where(np.isfinite(err), err, np.nan)
    for sel, filled, lab in ((ok, True, label), (~ok, False, None)):
        if not np.any(sel & np.isfinite(y)):
            if filled:  # keep the label in the legend
                P.simulated(ax, [], [], label=label, c=P.color(i), marker=marker, filled=True)
            continue
        P.simulated(ax, x[sel], y[sel], None if err is None else err[sel], lab, c=P.color(i),
                    marker=marker, filled=filled)
    good = np.isfinite(y)
    if good.sum() > 1:
        ax.plot(x[good], y[good], color=P.color(i), lw=0.8, alpha=0.5, zorder=1)


def _hollow_key(meaning: str) -> list:
    from matplotlib.lines import Line2D

    return [(Line2D([], [], color="0.35", marker="o", mfc="white", ls="none", ms=4),
             f"hollow: {meaning}")]


def _missing_note(fig, records) -> None:
    """A footer listing the steps whose ε_max/B_noise/ε_opt are unresolved."""
    bad = [r["step"] for r in records if not r.get("eps_max_resolved", r.get("resolved", True))]
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (" …" if len(bad) > 8 else "")
        fig.supxlabel(f"ε_max, B_noise, ε_opt unresolved (GᵀHG or |G|² not significantly "
                      f"positive) at step(s) {shown}; hollow markers / gaps there",
                      fontsize=7.5, color="0.3", x=0.01, ha="left")


# ---------------------------------------------------------------------------- main
def _silent(*args, **kwargs) -> None:
    return None


def _distributed(device):
    """(world, rank, device): joins the process group under ``torchrun`` (nccl on GPU, gloo on
    CPU; each rank on its local GPU) and limits CPU threads to the cores per rank."""
    import torch

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
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return world, rank, device


def _load_data(args, hyp, world: int, rank: int):
    """The data set; under ``torchrun`` with --download rank 0 fetches while the others wait."""
    def load(download: bool):
        return data_mod.load_data(args.data, data_dir=args.data_dir, md5=args.md5,
                                  download=download, seed=hyp.seed,
                                  n_synthetic=SYNTHETIC_SIZES[args.preset])

    if world > 1 and args.download:
        import torch.distributed as dist

        data = load(True) if rank == 0 else None
        dist.barrier()
        return data if data is not None else load(False)
    return load(args.download)


def _header(data, hyp, device, world: int, peak: float) -> str:
    """Two console lines: the data set and the images actually trained on; the step."""
    from . import train as train_mod

    n_all, used = data.train_images.shape[0], train_mod.subset_size(hyp, data.train_images.shape[0])
    which = "all of them" if used == n_all else f"a seeded {used}-image subset"
    return (f"data: {data.source}: {n_all} training / {data.test_images.shape[0]} test images; "
            f"training on {which}  device {device}  ranks {world}\n"
            f"peak lr η = {peak:.4g} on the mean gradient (base rate η/B = "
            f"{peak / hyp.batch_size:.3g} per example), B = {hyp.batch_size}, "
            f"momentum {hyp.momentum}, {hyp.epochs} epochs")


def _run_info(args, data, device, world: int, cfg: NoiseConfig | None) -> dict:
    """Everything besides the hyperparameters that changes the results: --resume must find the
    same in the checkpoint (data identified by kind, md5 and sizes, not by where it lies)."""
    return {
        "command": args.command,
        "data": data.source if args.data == "synthetic"
        else f"cifar10 (archive md5 {(args.md5 or data_mod.default_md5()).strip().lower()})",
        "train_images": int(data.train_images.shape[0]),
        "test_images": int(data.test_images.shape[0]),
        "device_type": device.type,
        "world_size": world,
        "noise_config": None if cfg is None else dataclasses.asdict(cfg),
    }


def _outcome(summary: dict, extra: dict, cfg: NoiseConfig | None) -> str:
    """The closing console line: the divergence, or test accuracy, losses and times."""
    diverged = summary["diverged_at_step"]
    if diverged is not None:
        why = extra.get("noise_diverged", {}).get("reason", "training loss not finite")
        summary["diverged_reason"] = why
        note = f"diverged at step {diverged} of {summary['total_steps']} ({why})"
        if cfg is not None:
            planned = len(measurement_steps(summary["total_steps"], cfg.points))
            note += (f"; measurements stopped there: {len(extra.get('noise', []))} of "
                     f"{planned} saved")
        return note + "; no test accuracy"
    return (f"test accuracy {summary['test_acc']:.4f}  test loss {summary['test_loss']:.4f}  "
            f"train time {summary['time_s']:.1f} s  {summary['examples_per_s']:.0f} examples/s  "
            f"({summary['steps']} steps)" + (f"  measurement time {summary['measure_time_s']:.1f} s"
                                             if cfg is not None else ""))


def _write_outputs(args, out: Path, summary: dict, records: list[dict], batch: int) -> None:
    from ._io import write_json

    out.mkdir(parents=True, exist_ok=True)
    if args.command == "train":
        write_json(out / "train.json", summary, indent=2)
        _write_csv(out / "history.csv", summary["history"])
        return
    summary["measurements"] = records
    write_json(out / "noise.json", summary, indent=2)
    _write_csv(out / "noise.csv", records)
    title = (f"gradient noise during training: {summary['data']}, B = {batch}, preset "
             f"{args.preset}")
    plot_noise(records, batch, out / "noise.png", title=title)


def run(args, log=print) -> dict:
    """Execute one parsed command; returns what it saved. Raises ValueError / FileNotFoundError /
    DatasetError on bad input (before anything is written). The configuration is checked once:
    TrainConfig and NoiseConfig on creation, the batch against the data and the ranks by
    :func:`validate.train.train` before its first step."""
    import torch

    from . import train as train_mod
    from ._io import resolve_device

    device = resolve_device(args.device)
    hyp = train_mod.make_config(args.preset, **_from_args(train_mod.TrainConfig, args))
    cfg = noise_config(args.preset, **_from_args(NoiseConfig, args)) \
        if args.command == "noise" else None
    out = check_out(args.out if args.out is not None else Path("runs") / f"cifar-{args.command}")
    world, rank, device = _distributed(device)
    check_memory(hyp, cfg, device, world)
    data = _load_data(args, hyp, world, rank)
    say = _silent if rank != 0 else log
    peak = train_mod.peak_lr(hyp)
    say(_header(data, hyp, device, world, peak))
    run_info = _run_info(args, data, device, world, cfg)
    result = train_mod.train(hyp, data, device=device, checkpoint=out / "checkpoint.pt",
                             resume=args.resume,
                             callback=None if cfg is None else NoiseCallback(
                                 cfg, hyp, rank=rank, world=world, log=say),
                             progress=not args.no_progress and rank == 0, run_info=run_info)
    result.pop("model")
    extra = result.pop("extra")
    summary = {"command": args.command, "argv": sys.argv[1:], "device": str(device),
               "world_size": world, "data": data.source, "torch": torch.__version__, "hyp": hyp,
               "noise_config": cfg, "run_info": run_info, **result}
    records = extra.get("noise", [])
    if cfg is not None:  # measurement time, apart from the training time time_s
        summary["measure_time_s"] = sum(r["seconds"] for r in records)
    say(_outcome(summary, extra, cfg))
    if rank == 0:
        _write_outputs(args, out, summary, records, hyp.batch_size)
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
