r"""Training in one readable file (airbench style), for any :class:`validate.data.ImageData`.

Provenance: the CIFAR-10 recipe is the public speed-run one — David Page's ResNet-9 for
DAWNBench ("How to train your ResNet", 2018) and Keller Jordan's airbench (2024): a small wide
ResNet (``validate/models.py``), the whole dataset kept on the device with augmentation done
there (random crop with reflect padding, horizontal flips), SGD with Nesterov momentum, label
smoothing, a linear warm-up then linear decay, weight decay, optional flip test-time
augmentation, bf16 autocast and channels-last on GPU. The same loop trains the small CNN on
scikit-learn's digits, an MLP on feature vectors, or a user's ``.npz`` (the model is built from
the data's shape, :func:`validate.models.build_model`); augmentation is optional.

Configuration: a frozen :class:`TrainConfig` (units in its comments) from a named preset in
:data:`PRESETS`, changed by :func:`make_config` — the one place that turns flags into settings.

Units (see README "Units and conventions"):

* the loss is the **mean** cross-entropy over the batch;
* ``lr`` = η multiplies the mean minibatch gradient G_B = (1/B) Σ ∇ℓ_i (PyTorch's convention);
* the **base rate** η̃ = η/B is the step per example (the sum convention of Myrtle, Graphcore and
  airbench). Give either ``lr`` or ``base_lr``; the peak step is then
  η = ``lr`` or η = ``base_lr`` · ``lr_factor`` · B;
* momentum as ``torch.optim.SGD`` (v ← μ v + g, θ ← θ − η v; Nesterov looks ahead), effective
  rate η/(1 − μ); ``weight_decay`` adds λθ to the mean-loss gradient; μ = 0 is plain SGD;
* schedules (:func:`lr_schedule`) are in fractions of the whole run.

**Failure** (a result, not an error): a run fails when its minibatch loss becomes non-finite or
exceeds ``fail_factor`` (10) × its initial loss at any step — training stops there — or when it
ends with a training loss not below the initial one, nor below the *chance loss* (on small
networks a too-large rate often collapses to chance, loss ≈ log K with dead units, rather than
exploding). The chance loss is that of the best constant prediction, the entropy H(q) of the
training labels' distribution q (smoothed as the criterion smooths them): no network that
ignores its input does better, and a freshly initialised one starts slightly above it (on
digits 2.313 against log 10 = 2.303), so a network that collapsed to chance ends *between* the
two — below its initial loss, yet it has learnt nothing. The initial and final training losses
are the training criterion (with its label smoothing) on the whole training subset, without
augmentation, the network in training mode with BatchNorm's running statistics left untouched
(so both ends are measured the same way as the steps in between).

Determinism and resuming: the model is initialised from ``seed``; the shuffle, crops and flips
of epoch e are drawn from a generator seeded by (seed, e), so any step can be reconstructed.
A checkpoint (``torch.save`` of model, optimizer, RNG state, step, running sums and the caller's
``extra`` dict) is written atomically every ``checkpoint_every`` steps and at every epoch end;
``train(..., resume=True)`` continues from it and on CPU reproduces the uninterrupted run exactly.
A checkpoint is untrusted input: it holds only tensors and plain containers, numbers and strings
(the config as a dict, :data:`CHECKPOINT_ENTRIES`) and is read with ``weights_only=True``
(:func:`read_checkpoint`); a damaged one is a one-line ``ValueError`` naming the file.

Timing: ``time_s`` counts the training steps only; callbacks (measurements) are timed apart
(``callback_time_s``) and evaluation and checkpoints not at all. The progress bar starts after
the first callback and stops its clock during the others, so its rate and ETA are those of the
training steps; its postfix shows training examples/s (``ex_s``) and ``callback_s``.

Data parallel: when ``torch.distributed`` is initialised (``torchrun``), each rank takes its
B/world slice of every global batch (same permutation everywhere) and gradients are averaged by
``DistributedDataParallel``; BatchNorm statistics are per rank (ghost batch norm).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._io import resolve_device, save_torch
from .data import CIFAR10_MEAN, CIFAR10_STD, ImageData
from .models import MODELS, build_model, init_whitening

__all__ = [
    "CHECKPOINT_ENTRIES",
    "PRESETS",
    "SCHEDULES",
    "TrainConfig",
    "TrainState",
    "chance_loss",
    "check_config",
    "evaluate",
    "lr_schedule",
    "make_config",
    "peak_lr",
    "read_checkpoint",
    "train",
]

#: Learning-rate schedules of :func:`lr_schedule`.
SCHEDULES = ("linear", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (units in the comments; checked on creation).

    Peak step η = 0.4 on the mean gradient at B = 512 is Page's ResNet-9 setting (0.4 on the
    summed loss divided by B), i.e. a base rate of 0.4/512 = 7.8e-4 per example.
    """

    epochs: int = 10               # passes over the training subset
    batch_size: int = 512          # B: examples per optimiser step (global, summed over ranks)
    lr: float | None = None        # η: peak step on the MEAN minibatch gradient; None → base_lr
    base_lr: float = 0.4 / 512     # η̃ = η/B: peak step per example (sum convention)
    lr_factor: float = 1.0         # multiplies base_lr (the "learning-rate factor" of LR sweeps)
    momentum: float = 0.9          # μ (torch.optim.SGD convention); 0 → plain SGD
    nesterov: bool = True          # Nesterov look-ahead (only with μ > 0)
    weight_decay: float = 5e-4     # λ: adds λθ to the mean-loss gradient (per step)
    label_smoothing: float = 0.2   # probability mass spread uniformly over the classes
    schedule: str = "linear"       # 'linear': warm-up, then linear decay; 'constant': warm-up, flat
    warmup: float = 0.2            # fraction of the run with linear warm-up 0 → η
    final_lr: float = 0.0          # 'linear': step at the end of the run, as a fraction of η
    subset: int | None = None      # training examples used (a seeded random subset); None → all
    model: str = "auto"            # 'auto' (from the data's shape), 'resnet', 'cnn' or 'mlp'
    width: float = 1.0             # resnet: channel multiplier of (64, 128, 256, 512)
    channels: tuple = (8, 16)      # cnn: channels of its two conv layers
    hidden: int = 64               # mlp: hidden units
    whiten: bool = True            # resnet: fixed 2×2 whitening stem from training patches
    bn_momentum: float = 0.1       # BatchNorm running-average momentum (PyTorch convention)
    crop_pad: int = 4              # random-crop padding in pixels (reflect); 0 → no crops
    flip: bool = True              # random horizontal flips (images only)
    tta: bool = True               # test: average logits of the image and its mirror
    eval_batch: int = 1024         # examples per forward pass when evaluating
    checkpoint_every: int = 0      # steps between checkpoints; 0 → epoch ends only
    fail_factor: float = 10.0      # a minibatch loss above fail_factor × initial loss: failed
    record_loss: bool = False      # keep every step's minibatch loss (``train_losses``)
    seed: int = 0                  # model init, subset, shuffles and augmentation

    def __post_init__(self):
        _check_fields(self)

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes`` (checked)."""
        return dataclasses.replace(self, **changes)


def _check_fields(c: TrainConfig) -> None:
    """Raise ``ValueError`` naming the first field that is out of range."""
    def number(name, *, integer=False, positive=True, allow_zero=False):
        v = getattr(c, name)
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
            and math.isfinite(v) and (not integer or int(v) == v)
        if ok and positive:
            ok = v > 0 or (allow_zero and v == 0)
        if not ok:
            kind = "an integer" if integer else "a finite number"
            bound = " ≥ 0" if allow_zero else " > 0" if positive else ""
            raise ValueError(f"{name} must be {kind}{bound}, got {v!r}")

    def flag(name):
        if not isinstance(getattr(c, name), (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {getattr(c, name)!r}")

    for name in ("epochs", "batch_size", "eval_batch", "hidden"):
        number(name, integer=True)
    for name in ("checkpoint_every", "crop_pad"):
        number(name, integer=True, allow_zero=True)
    number("width")
    number("weight_decay", allow_zero=True)
    number("bn_momentum", allow_zero=True)
    if c.lr is not None:
        number("lr")
    else:
        number("base_lr")
        number("lr_factor")
    for name in ("momentum", "warmup", "final_lr", "label_smoothing"):
        number(name, positive=False)
        v = getattr(c, name)
        half_open = name in ("momentum", "warmup")
        if not (0.0 <= v <= 1.0) or (half_open and v == 1.0):
            raise ValueError(f"{name} must lie in [0, 1{')' if half_open else ']'}, got {v!r}")
    if c.crop_pad > 16:
        raise ValueError(f"crop_pad must be an integer in 0..16, got {c.crop_pad!r}")
    number("fail_factor")
    if c.fail_factor <= 1:
        raise ValueError(f"fail_factor must be > 1, got {c.fail_factor!r}")
    for name in ("nesterov", "whiten", "flip", "tta", "record_loss"):
        flag(name)
    if isinstance(c.seed, bool) or not isinstance(c.seed, (int, np.integer)) or c.seed < 0:
        raise ValueError(f"seed must be an integer ≥ 0, got {c.seed!r}")
    if c.subset is not None:
        number("subset", integer=True)
    if c.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {c.schedule!r}")
    if c.model not in ("auto", *MODELS):
        raise ValueError(f"model must be 'auto' or one of {MODELS}, got {c.model!r}")
    try:
        ok = len(c.channels) == 2 and all(int(v) == v and v >= 1 for v in c.channels)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"channels must be two positive integers, got {c.channels!r}")


#: Named starting points (flags override them through :func:`make_config`).
PRESETS = {
    # GPU: the full CIFAR-10 recipe, 10 epochs on 50 000 images.
    "default": TrainConfig(),
    # CPU smoke test / CI on CIFAR-shaped data: a narrow network, a small subset, two epochs.
    "quick": TrainConfig(epochs=2, batch_size=64, base_lr=0.4 / 512, lr_factor=2.0, subset=1024,
                         width=0.125, whiten=False, crop_pad=2, tta=False, eval_batch=500),
    # scikit-learn's digits (CPU): the small CNN, heavy ball, no augmentation or smoothing.
    "digits": TrainConfig(epochs=20, batch_size=32, base_lr=0.1 / 32, momentum=0.9,
                          nesterov=False, weight_decay=0.0, label_smoothing=0.0, warmup=0.2,
                          model="cnn", crop_pad=0, flip=False, tta=False, eval_batch=2048),
}


def make_config(preset: str | TrainConfig = "default", **overrides) -> TrainConfig:
    """The preset (a name in :data:`PRESETS` or a config) with ``overrides`` applied; ``None``
    values are ignored (an unset flag keeps the preset's value).

    >>> make_config("quick", batch_size=32, lr=None).batch_size
    32
    """
    if isinstance(preset, TrainConfig):
        base = preset
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(map(repr, unknown))}; known: "
                         f"{sorted(names)}")
    return base.replace(**{k: v for k, v in overrides.items() if v is not None})


def subset_size(cfg: TrainConfig, n_train: int) -> int:
    """Number of training examples used: ``subset`` (checked ≤ n_train) or all of them."""
    if cfg.subset is None:
        return n_train
    if cfg.subset > n_train:
        raise ValueError(f"subset ({cfg.subset}) exceeds the {n_train} training examples "
                         "available")
    return int(cfg.subset)


def check_config(cfg: TrainConfig, data: ImageData) -> None:
    """Raise ``ValueError`` when ``cfg`` does not fit ``data`` (batch vs subset, augmentation of
    vectors, the ResNet on non-colour images)."""
    n = subset_size(cfg, data.train_images.shape[0])
    if cfg.batch_size > n:
        raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the training subset "
                         f"({n} examples); lower --batch-size or raise --subset")
    if not data.is_image and (cfg.crop_pad or cfg.flip or cfg.tta):
        raise ValueError("crop_pad, flip and tta need images; set them to 0/False for feature "
                         "vectors")
    if cfg.crop_pad and min(data.input_shape[1:]) <= cfg.crop_pad:
        raise ValueError(f"crop_pad ({cfg.crop_pad}) must be smaller than the images "
                         f"({data.input_shape[1]}×{data.input_shape[2]})")


def peak_lr(cfg: TrainConfig) -> float:
    """Peak step η on the mean gradient: ``lr`` if given, else ``base_lr · lr_factor · B``.

    >>> peak_lr(make_config("default"))
    0.4
    >>> peak_lr(make_config("default", lr=0.1))
    0.1
    """
    if cfg.lr is not None:
        return float(cfg.lr)
    return float(cfg.base_lr * cfg.lr_factor * cfg.batch_size)


def lr_schedule(step: int, total_steps: int, peak: float, warmup: float, final: float,
                kind: str = "linear") -> float:
    r"""Step η_t for optimiser step t ∈ {0, …, T−1} of a run of T steps.

    Linear warm-up over the first W = ⌈warmup·T⌉ steps, η_t = η (t+1)/W; then ``'linear'``
    decays linearly from η to ``final``·η at t = T:  η_t = η (final + (1 − final)(T − t)/(T − W)),
    and ``'constant'`` stays at η.

    >>> [round(lr_schedule(t, 10, 1.0, 0.2, 0.0), 2) for t in range(10)]
    [0.5, 1.0, 1.0, 0.88, 0.75, 0.62, 0.5, 0.38, 0.25, 0.12]
    >>> [lr_schedule(t, 4, 1.0, 0.5, 0.0, "constant") for t in range(4)]
    [0.5, 1.0, 1.0, 1.0]
    """
    w = math.ceil(warmup * total_steps)
    if step < w:
        return peak * (step + 1) / w
    if kind == "constant":
        return peak
    return peak * (final + (1.0 - final) * (total_steps - step) / (total_steps - w))


# ---------------------------------------------------------------------------- data on device
def normalize(x: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    """(n, C, h, w) images or (n, F) vectors → float32 (x·s − mean)/std per channel or feature,
    with s = 1/255 for uint8 and 1 for floats."""
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(shape)
    xf = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return (xf - m) / s


def model_inputs(images, data: ImageData, device) -> torch.Tensor:
    """Images or vectors of ``data`` (NumPy or torch) as the normalised float32 tensor the
    network sees (no augmentation), on ``device``."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    return normalize(x.to(device), data.mean, data.std)


@dataclass
class EpochPlan:
    """Everything random about one epoch: order, crop offsets and flips (on the device)."""

    epoch: int
    perm: torch.Tensor   # (n,) example order
    dy: torch.Tensor     # (n,) crop offsets in 0 … 2·pad
    dx: torch.Tensor
    flip: torch.Tensor   # (n,) bool


def epoch_plan(seed: int, epoch: int, n: int, pad: int, flip: bool, device) -> EpochPlan:
    """Draw epoch ``epoch``'s shuffle and augmentation from a generator seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) + 1)
    perm = torch.randperm(n, generator=g)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    fl = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return EpochPlan(epoch, *(t.to(device) for t in (perm, dy, dx, fl)))


def crop_flip(padded: torch.Tensor, dy, dx, flip, size: int = 32) -> torch.Tensor:
    """Crop (n, c, H, W) images at offsets (dy, dx) to size×size, mirroring where ``flip``.

    One gather on the device: out[i, c, r, s] = padded[i, c, dy_i + r, dx_i + s'] with
    s' = size − 1 − s when flipped.
    """
    n, c = padded.shape[:2]
    ar = torch.arange(size, device=padded.device)
    rows = dy[:, None] + ar                                            # (n, size)
    cols = dx[:, None] + torch.where(flip[:, None], size - 1 - ar, ar)  # (n, size)
    i = torch.arange(n, device=padded.device)[:, None, None, None]
    ch = torch.arange(c, device=padded.device)[None, :, None, None]
    return padded[i, ch, rows[:, None, :, None], cols[:, None, None, :]]


class _TrainingSet:
    """The training subset on the device and how batch ``j`` of an epoch plan is formed.

    With augmentation (crops or flips) the raw images are kept reflect-padded and each batch is
    cropped, flipped and normalised on the device; without, the whole subset is normalised once
    and batches are plain index lookups (no per-step overhead).
    """

    def __init__(self, data: ImageData, idx: np.ndarray, cfg: TrainConfig, device):
        self.mean, self.std = data.mean, data.std
        self.pad = int(cfg.crop_pad)
        self.flip = bool(cfg.flip)
        self.augment = data.is_image and (self.pad > 0 or self.flip)
        self.device = device
        raw = data.train_images[idx]
        self.raw = torch.from_numpy(raw).to(device)
        self.labels = torch.from_numpy(data.train_labels[idx]).to(device)
        self.n = int(idx.size)
        self.size = raw.shape[-1] if data.is_image else None
        if self.augment:
            p = self.pad
            self.padded = torch.from_numpy(
                np.pad(raw, ((0, 0), (0, 0), (p, p), (p, p)), mode="reflect")).to(device)
            self.inputs = None
        else:
            self.inputs = normalize(self.raw, self.mean, self.std)

    def batch(self, j, dy=None, dx=None, flip=None) -> torch.Tensor:
        if not self.augment:
            return self.inputs[j]
        x = crop_flip(self.padded[j], dy, dx, flip, self.size)
        return normalize(x, self.mean, self.std)

    def plain(self, sl: slice) -> torch.Tensor:
        """Normalised training examples ``sl`` without augmentation (for evaluation)."""
        if self.inputs is not None:
            return self.inputs[sl]
        return normalize(self.raw[sl], self.mean, self.std)

    def sample(self, count: int, sample_seed: int):
        """``count`` examples drawn with replacement (augmented like training), normalised."""
        g = torch.Generator().manual_seed(int(sample_seed))
        j = torch.randint(0, self.n, (count,), generator=g)
        dy, dx = (torch.randint(0, 2 * self.pad + 1, (count,), generator=g) for _ in range(2))
        fl = (torch.rand(count, generator=g) < 0.5) & self.flip
        j, dy, dx, fl = (t.to(self.device) for t in (j, dy, dx, fl))
        return _memory_format(self.batch(j, dy, dx, fl)), self.labels[j]


def _memory_format(x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cuda" and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


# ---------------------------------------------------------------------------- evaluation
def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def _autocast(device: torch.device):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                          enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, inputs, labels: torch.Tensor, *, batch: int = 1024,
             tta: bool = False, criterion=None, train_mode: bool = False) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on a data set, sharded over ranks and all-reduced.

    Args:
      inputs: a normalised (n, …) tensor, or ``inputs(slice) -> tensor`` giving its rows
        (e.g. uint8 images normalised chunk by chunk).
      labels: (n,) int64 tensor.
      tta: average the logits of each image and its mirror image.
      criterion: loss with ``reduction='sum'``; default plain cross-entropy.
      train_mode: evaluate in training mode (BatchNorm with the statistics of each chunk of
        ``batch`` examples, running statistics restored afterwards) instead of eval mode.
    """
    dist, rank, world = _dist()
    was_training = model.training
    saved = {k: b.clone() for k, b in model.named_buffers()} if train_mode else None
    model.train(train_mode)
    device = labels.device
    rows = inputs if callable(inputs) else (lambda sl: inputs[sl])
    crit = criterion if criterion is not None else nn.CrossEntropyLoss(reduction="sum")
    n = labels.shape[0]
    lo, hi = rank * n // world, (rank + 1) * n // world
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
    for s in range(lo, hi, batch):
        sl = slice(s, min(s + batch, hi))
        x, y = _memory_format(rows(sl)), labels[sl]
        with _autocast(device):
            logits = model(x).float()
            if tta:
                logits = 0.5 * (logits + model(torch.flip(x, dims=(3,))).float())
        sums[0] += crit(logits, y).double()
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += y.numel()
    if dist is not None:
        dist.all_reduce(sums)
    if saved is not None:
        for k, b in model.named_buffers():
            b.copy_(saved[k])
    model.train(was_training)
    return float(sums[0] / sums[2]), float(sums[1] / sums[2])


# ---------------------------------------------------------------------------- training
@dataclass
class TrainState:
    """What a callback sees after each optimiser step (and once before the first).

    ``step`` counts completed steps; ``extra`` is saved in checkpoints, so a callback that stores
    its results there survives an interruption.
    """

    model: nn.Module
    step: int
    total_steps: int
    steps_per_epoch: int
    batch_size: int
    lr: float                      # the step η that the *next* optimiser step uses
    momentum: float
    train_images: torch.Tensor     # raw (uint8 or float) training subset on the device
    train_labels: torch.Tensor
    device: torch.device
    extra: dict = field(default_factory=dict)
    sample: object = None          # sample(n, seed) -> (x, y): n augmented training examples
    #                                drawn with replacement, normalised, on the device
    diverged: bool = False         # a callback sets this when it finds the model non-finite:
    #                                training stops and reports diverged_at_step = step
    plain: object = None           # plain(slice) -> those training examples normalised, without
    #                                augmentation, on the device


def _differences(old, new, prefix: str = "") -> list[str]:
    """``'key (old → new)'`` for each differing entry of two (nested) dicts, sorted by key."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [f"{prefix or 'value'} ({old!r} → {new!r})"]
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({a!r} → {b!r})")
    return out


def _settings(cfg: TrainConfig) -> dict:
    """The config as a plain dict with lists for tuples (as stored in checkpoints)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


def _criterion(cfg: TrainConfig, reduction: str = "mean"):
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction=reduction)


def chance_loss(labels, num_classes: int, label_smoothing: float = 0.0) -> float:
    r"""Loss of the best constant prediction: H(q) = −Σ_k q_k log q_k with q the label
    frequencies smoothed as the criterion does, q = (1 − ε)·freq + ε/K.

    >>> round(chance_loss([0, 1, 2, 3], 4), 6) == round(math.log(4), 6)
    True
    """
    freq = np.bincount(np.asarray(labels), minlength=num_classes) / len(labels)
    q = (1.0 - label_smoothing) * freq + label_smoothing / num_classes
    q = q[q > 0]
    return float(-(q * np.log(q)).sum())


def build(cfg: TrainConfig, data: ImageData, device, train_inputs=None) -> nn.Module:
    """The network of ``cfg`` for ``data``, initialised from ``cfg.seed`` (and, for the whitened
    ResNet, its stem from the first 5,000 normalised training examples ``train_inputs``)."""
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model, data.input_shape, data.num_classes, width=cfg.width,
                        channels=cfg.channels, hidden=cfg.hidden, whiten=cfg.whiten,
                        bn_momentum=cfg.bn_momentum).to(device)
    if getattr(model, "whiten", False):
        init_whitening(model, train_inputs)
    if device.type == "cuda" and len(data.input_shape) == 3:
        model = model.to(memory_format=torch.channels_last)
    return model


class _Clock:
    """Seconds spent training and seconds spent in callbacks, kept apart.

    Training time runs between :meth:`start` and :meth:`stop`; evaluation, checkpoints and
    callbacks happen while it is stopped, and callbacks add their own duration to
    ``callback_s`` (:meth:`callback`). On a GPU each reading synchronises the device first.
    """

    def __init__(self, device, train_s: float = 0.0, callback_s: float = 0.0):
        self.device = device
        self.train_s = float(train_s)
        self.callback_s = float(callback_s)
        self._t0 = None

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self._t0 = self.now()

    def stop(self) -> None:
        """Add the training time since :meth:`start` (nothing when already stopped)."""
        if self._t0 is not None:
            self.train_s += self.now() - self._t0
            self._t0 = None

    def training_s(self) -> float:
        """Training seconds so far, including the running interval."""
        return self.train_s + (self.now() - self._t0 if self._t0 is not None else 0.0)

    def callback(self, fn, *args) -> None:
        """Call ``fn(*args)`` and add its duration to ``callback_s``."""
        t = self.now()
        try:
            fn(*args)
        finally:
            self.callback_s += self.now() - t


class _Progress:
    """The tqdm bar of a run, its clock stopped while training is (so that its rate and ETA
    count training steps only, not evaluation, checkpoints or measurements)."""

    def __init__(self, total: int, start: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, desc="train", unit="step",
                        disable=not enabled, dynamic_ncols=True)
        self.enabled = enabled
        self._paused = None

    def _bar_time(self) -> float:
        return getattr(self.bar, "_time", time.time)()

    def pause(self) -> None:
        if self.enabled and self._paused is None:
            self._paused = self._bar_time()

    def resume(self) -> None:
        """Move the bar's start (and last refresh) forward by the paused time."""
        if self._paused is None:
            return
        shift = self._bar_time() - self._paused
        self._paused = None
        for name in ("start_t", "last_print_t"):
            if hasattr(self.bar, name):
                setattr(self.bar, name, getattr(self.bar, name) + shift)

    def show(self, loss: float, examples_per_s: float, callback_s: float | None) -> None:
        """Postfix: minibatch loss, training examples/s, seconds in callbacks so far."""
        if not self.enabled:
            return
        post = {"loss": f"{loss:.3f}", "ex_s": f"{examples_per_s:.0f}"}
        if callback_s is not None:
            post["callback_s"] = f"{callback_s:.1f}"
        self.bar.set_postfix(post)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.resume()
        self.bar.close()


#: What a checkpoint holds (``torch.save`` of plain containers, numbers, strings and tensors,
#: so it is read back with ``weights_only=True``), with the type each entry must have.
CHECKPOINT_ENTRIES = {
    "model": dict, "optimizer": dict, "torch_rng": torch.Tensor, "step": int,
    "elapsed": (int, float), "extra": dict, "sums": torch.Tensor, "history": list,
    "hyp": dict, "run_info": (dict, type(None)), "initial_train_loss": (int, float),
    "losses": torch.Tensor,
}


def _corrupt(path, why: str) -> ValueError:
    return ValueError(f"checkpoint {path} is corrupt or not a checkpoint of validate.train "
                      f"({why}); delete it or drop --resume")


def read_checkpoint(path, device="cpu") -> dict:
    """The checkpoint at ``path`` (``torch.load(weights_only=True)``), its entries checked
    against :data:`CHECKPOINT_ENTRIES`.

    Raises ``ValueError`` (one line naming the file) when it cannot be read (truncated, not a
    torch file, objects other than tensors and plain containers), lacks the run settings (an
    older version) or has entries of the wrong type.
    """
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    except OSError as e:
        raise ValueError(f"checkpoint {path} cannot be read: {e.strerror or e}") from None
    if not zipped:
        raise _corrupt(path, "not a file written by torch.save")
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise _corrupt(path, "holds objects other than tensors and plain data, refused by "
                       "torch.load(weights_only=True)") from None
    except Exception as e:  # torch raises many kinds of error for a damaged archive
        raise _corrupt(path, f"damaged or truncated torch file: {type(e).__name__}") from None
    if not isinstance(ck, dict):
        raise _corrupt(path, f"holds a {type(ck).__name__}, not a dict")
    if "model" in ck and any(k not in ck for k in ("hyp", "run_info", "initial_train_loss")):
        raise ValueError(f"checkpoint {path} does not record its run settings (written by an "
                         "older version); use another --out or drop --resume")
    for key, kind in CHECKPOINT_ENTRIES.items():
        if key not in ck:
            raise _corrupt(path, f"no entry {key!r}")
        v = ck[key]
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise _corrupt(path, f"entry {key!r} is a {type(v).__name__}")
    if not math.isfinite(ck["elapsed"]) or ck["elapsed"] < 0 or ck["step"] < 0:
        raise _corrupt(path, "negative or non-finite step or time")
    if tuple(ck["sums"].shape) != (3,) or ck["torch_rng"].dtype != torch.uint8:
        raise _corrupt(path, "running sums or RNG state of the wrong shape or type")
    cb = ck.get("callback_time_s", 0.0)  # absent in checkpoints of earlier versions
    if not isinstance(cb, (int, float)) or isinstance(cb, bool) or not cb >= 0:
        raise _corrupt(path, "entry 'callback_time_s' is not a time")
    return ck


class _Run:
    """One training run of :func:`train`: the data, network and optimiser on the device, and
    everything a checkpoint saves (step, times, running sums, history, losses, ``extra``)."""

    def __init__(self, cfg: TrainConfig, data: ImageData, device, checkpoint, run_info):
        self.dist, self.rank, self.world = _dist()
        check_config(cfg, data)
        n_all = data.train_images.shape[0]
        self.B = B = int(cfg.batch_size)
        if B % self.world:
            raise ValueError(f"batch_size ({B}) must be divisible by the number of ranks "
                             f"({self.world})")
        self.b_local = B // self.world
        self.cfg, self.data, self.device, self.run_info = cfg, data, device, run_info
        self.seed = int(cfg.seed)
        self.settings = _settings(cfg)
        # data on the device: a seeded subset
        self.n = n = subset_size(cfg, n_all)
        self.idx = np.sort(np.random.default_rng(self.seed).permutation(n_all)[:n]) \
            if n < n_all else np.arange(n_all)
        self.ts = ts = _TrainingSet(data, self.idx, cfg, device)
        self.test_x = torch.from_numpy(data.test_images).to(device)
        self.test_y = torch.from_numpy(data.test_labels).to(device)
        # model and optimiser
        self.model = build(cfg, data, device, ts.plain(slice(0, 5000)) if cfg.whiten else None)
        self.net = self.model
        if self.dist is not None:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.peak = peak_lr(cfg)
        self.mu = mu = float(cfg.momentum)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=self.peak, momentum=mu,
                                   nesterov=bool(cfg.nesterov) and mu > 0,
                                   weight_decay=cfg.weight_decay)
        self.crit = _criterion(cfg)
        self.crit_sum = _criterion(cfg, "sum")
        self.steps_per_epoch = n // B
        self.total = int(cfg.epochs) * self.steps_per_epoch
        # what a checkpoint saves (resume() restores it)
        self.start, self.clock, self.extra = 0, _Clock(device), {}
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss·n, correct, count
        self.history: list[dict] = []
        self.losses = torch.zeros(self.total if cfg.record_loss else 0, dtype=torch.float32,
                                  device=device)
        self.init_loss = None
        self.ckpt_path = Path(checkpoint) if checkpoint is not None else None
        # failure tracking on the device: the step of the first bad loss, was it not finite?
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        # set by train(): the chance loss, the training time at the start, the callback's view
        self.chance, self.elapsed0, self.state = None, 0.0, None

    def resume(self) -> None:
        """Continue from the checkpoint if there is one (written by the same run)."""
        path = self.ckpt_path
        if path is None or not path.is_file():
            return
        ck = read_checkpoint(path, self.device)
        diff = _differences(ck["hyp"], self.settings)
        if diff:
            raise ValueError(f"checkpoint {path} was written with different hyperparameters: "
                             f"{'; '.join(diff)}; use another --out or drop --resume")
        diff = _differences(ck["run_info"], self.run_info)
        if diff:
            raise ValueError(f"checkpoint {path} was written by a different run: "
                             f"{'; '.join(diff)}; use another --out or drop --resume")
        if ck["step"] > self.total:
            raise _corrupt(path, f"step {ck['step']} beyond the run's {self.total} steps")
        if self.cfg.record_loss and tuple(ck["losses"].shape) != (self.total,):
            raise _corrupt(path, f"{tuple(ck['losses'].shape)} recorded losses for "
                           f"{self.total} steps")
        try:
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
            torch.set_rng_state(ck["torch_rng"].cpu())
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise _corrupt(path, "weights or optimiser state do not fit this network: "
                           f"{type(e).__name__}") from None
        self.start, self.extra = ck["step"], ck["extra"]
        self.clock = _Clock(self.device, ck["elapsed"], ck.get("callback_time_s", 0.0))
        self.sums = ck["sums"].to(self.device)
        self.history = ck["history"]
        self.init_loss = ck["initial_train_loss"]
        if self.cfg.record_loss:
            self.losses = ck["losses"].to(self.device)

    def save(self, step: int) -> None:
        """Checkpoint after ``step`` steps (rank 0; atomic)."""
        if self.ckpt_path is None or self.rank != 0:
            return
        save_torch({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                    "torch_rng": torch.get_rng_state(), "step": step,
                    "elapsed": self.clock.train_s, "callback_time_s": self.clock.callback_s,
                    "extra": self.extra, "sums": self.sums.cpu(), "history": self.history,
                    "hyp": self.settings, "run_info": self.run_info,
                    "initial_train_loss": self.init_loss, "losses": self.losses.cpu()},
                   self.ckpt_path)

    def train_loss(self) -> tuple[float, float]:
        """(loss, accuracy) on the whole training subset, training mode, no augmentation."""
        return evaluate(self.model, self.ts.plain, self.ts.labels, batch=int(self.cfg.eval_batch),
                        criterion=self.crit_sum, train_mode=True)

    def test(self) -> tuple[float, float]:
        """(loss, accuracy) on the test set."""
        def rows(sl):
            return normalize(self.test_x[sl], self.data.mean, self.data.std)

        return evaluate(self.model, rows, self.test_y, batch=int(self.cfg.eval_batch),
                        tta=bool(self.cfg.tta))

    def lr_at(self, step: int) -> float:
        c = self.cfg
        return lr_schedule(step, self.total, self.peak, c.warmup, c.final_lr, c.schedule)

    def step(self, step: int, plan: EpochPlan, batch_hook, threshold: float) -> float:
        """Optimiser step ``step`` (loss checks and running sums on the device); returns its
        step η."""
        B, cfg = self.B, self.cfg
        i = step % self.steps_per_epoch
        sl = slice(i * B + self.rank * self.b_local, i * B + (self.rank + 1) * self.b_local)
        j = plan.perm[sl]
        x = _memory_format(self.ts.batch(j, plan.dy[sl], plan.dx[sl], plan.flip[sl]))
        y = self.ts.labels[j]
        if batch_hook is not None:
            x, y = batch_hook(step, x, y)
        lr = self.lr_at(step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with _autocast(self.device):
            logits = self.net(x)
            loss = self.crit(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            ld = loss.detach()
            finite = torch.isfinite(ld)
            first = (~finite | (ld > threshold)) & (self.first_bad < 0)
            self.first_bad = torch.where(first, step, self.first_bad)
            self.nonfinite = self.nonfinite | (first & ~finite)
            if cfg.record_loss:
                self.losses[step] = ld
            self.sums[0] += ld.double() * y.numel()
            self.sums[1] += (logits.argmax(1) == y).sum()
            self.sums[2] += y.numel()
        return lr

    def end_epoch(self, epoch: int, done: int, lr: float) -> None:
        """Record epoch ``epoch``'s training and test loss and accuracy in the history."""
        if self.dist is not None:
            self.dist.all_reduce(self.sums)
        test_loss, test_acc = self.test()
        elapsed = self.clock.train_s
        self.history.append({"epoch": epoch + 1, "step": done,
                             "train_loss": float(self.sums[0] / self.sums[2]),
                             "train_acc": float(self.sums[1] / self.sums[2]),
                             "test_loss": test_loss, "test_acc": test_acc, "lr": lr,
                             "time_s": elapsed,
                             "examples_per_s": self.B * done / max(elapsed, 1e-9)})
        self.sums.zero_()


def _loop(run: _Run, notify, batch_hook, bar: _Progress, check_every: int, threshold: float,
          with_callback: bool):
    """The optimiser steps from ``run.start``; returns (stopped, failure, failed_at): the steps
    done when training stopped early (else None), the reason and the step it concerns."""
    cfg, clock, spe = run.cfg, run.clock, run.steps_per_epoch
    plan = None
    clock.start()
    for step in range(run.start, run.total):
        epoch = step // spe
        if plan is None or plan.epoch != epoch:
            plan = epoch_plan(run.seed, epoch, run.n, run.ts.pad, run.ts.flip and run.ts.augment,
                              run.device)
        lr = run.step(step, plan, batch_hook, threshold)
        bar.update(1)
        done = step + 1
        end_of_epoch = done % spe == 0
        save_due = end_of_epoch or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
        if end_of_epoch or done % check_every == 0 or done == run.total:  # a host sync on a GPU
            bad_step = int(run.first_bad)
            if bad_step >= 0:
                failure = "non-finite loss" if bool(run.nonfinite) else \
                    f"loss above {cfg.fail_factor:g}× the initial {run.init_loss:.4g}"
                return done, failure, bad_step
            if bar.enabled:  # training examples/s of this call, callback time apart
                bar.show(float(run.sums[0] / run.sums[2]),
                         run.B * (done - run.start) / max(clock.training_s() - run.elapsed0,
                                                          1e-9),
                         clock.callback_s if with_callback else None)
        if not (end_of_epoch or save_due or with_callback):
            continue
        clock.stop()  # evaluation, measurements and checkpoints are not training time
        bar.pause()
        if end_of_epoch:
            run.end_epoch(epoch, done, lr)
        notify(done)
        if run.state.diverged:
            return done, "stopped by the callback", done
        if save_due:
            run.save(done)
        bar.resume()
        clock.start()
    return None, None, None


def _finish(run: _Run, stopped, failure, failed_at) -> dict:
    """The results of a run that took ``stopped`` steps (None: all of them)."""
    nan = float("nan")
    chance = run.chance
    if stopped is not None:
        test_loss = test_acc = final_loss = final_acc = nan
    else:
        final_loss, final_acc = run.train_loss()
        if run.history and run.history[-1]["step"] == run.total:
            test_loss, test_acc = run.history[-1]["test_loss"], run.history[-1]["test_acc"]
        else:
            test_loss, test_acc = run.test()
        if not final_loss < run.init_loss:
            failure, failed_at = "final training loss not below the initial one", run.total
        elif not final_loss < chance:
            failure, failed_at = f"collapsed to chance (final training loss {final_loss:.4g} " \
                f"not below the chance loss {chance:.4g})", run.total
    steps_done = stopped if stopped is not None else run.total
    elapsed = run.clock.train_s
    return {
        "test_acc": test_acc,
        "test_loss": test_loss,
        "initial_train_loss": run.init_loss,
        "chance_loss": chance,
        "final_train_loss": final_loss,
        "final_train_acc": final_acc,
        "failed": failure is not None,
        "failure": failure,
        "failed_at_step": failed_at,
        "history": run.history,
        "train_losses": run.losses[:steps_done].tolist() if run.cfg.record_loss else None,
        "time_s": elapsed,
        "callback_time_s": run.clock.callback_s,
        "examples_per_s": run.B * steps_done / max(elapsed, 1e-9),
        "steps": steps_done,
        "total_steps": run.total,
        "diverged_at_step": stopped,
        "steps_per_epoch": run.steps_per_epoch,
        "train_examples": run.n,
        "params": sum(p.numel() for p in run.model.parameters()),
        "peak_lr": run.peak,
        "base_lr": run.peak / run.B,
        "world_size": run.world,
        "extra": run.extra,
        "model": run.model,
    }


def train(cfg: TrainConfig, data: ImageData, *, device=None,
          checkpoint: str | os.PathLike | None = None, resume: bool = False, callback=None,
          progress: bool = True, run_info: dict | None = None, batch_hook=None) -> dict:
    """Train the network of ``cfg`` on ``data`` (see :class:`TrainConfig` for units).

    Args:
      cfg: a :class:`TrainConfig` (use :func:`make_config`).
      data: the data set.
      device: ``None`` (cuda when available), ``"cpu"``, ``"cuda[:N]"`` or a torch device.
      checkpoint: file to write checkpoints to (None: no checkpoints).
      resume: continue from ``checkpoint`` if it exists; its settings and ``run_info`` must
        equal these (``ValueError`` naming what differs otherwise); a checkpoint that cannot be
        read or has the wrong structure is a one-line ``ValueError`` naming the file.
      callback: ``callback(state: TrainState)`` called before the first step and after every
        step; it may measure the model (it must leave it unchanged) and write to ``state.extra``
        (plain containers, numbers, strings and tensors only: checkpoints are read back with
        ``torch.load(weights_only=True)``). Setting ``state.diverged = True`` stops training
        there (reported as a divergence). Its time is counted in ``callback_time_s``, not in
        the training time.
      progress: show a tqdm bar (rank 0 only), started after the first callback; its rate, ETA
        and ``ex_s`` (training examples/s) count training time only, ``callback_s`` is the
        time spent in the callback so far.
      run_info: JSON-like dict of the other settings that affect the results (the command, the
        measurement settings, the data, …); saved in checkpoints and compared on ``resume``.
      batch_hook: ``batch_hook(step, x, y) -> (x, y)`` may replace the (normalised, on-device)
        batch of optimiser step ``step`` (e.g. to train once on a held-aside batch).

    Failure (see the module docstring): the minibatch loss is compared with ``fail_factor`` ×
    the initial training loss at every step (on the device; read every step on CPU, every 10 on
    a GPU); a non-finite or too-large loss, or a callback setting ``state.diverged``, ends the
    run with ``diverged_at_step`` set, test results nan and no checkpoint of the bad weights.

    Returns:
      dict with ``test_acc``, ``test_loss``, ``initial_train_loss``, ``chance_loss``,
      ``final_train_loss``,
      ``final_train_acc``, ``failed``, ``failure`` (reason or None), ``failed_at_step`` (the
      step whose loss failed, or the last step when the final loss failed), ``diverged_at_step``
      (steps completed when training stopped early, else None), ``history`` (one entry per epoch:
      train loss/acc, test loss/acc, lr, seconds, examples/s), ``train_losses`` (every step's
      minibatch loss, with ``record_loss``), ``time_s`` (seconds of training steps only: no
      evaluation, checkpoints or callbacks), ``callback_time_s`` (seconds in the callback),
      ``examples_per_s`` (examples / ``time_s``), ``steps``, ``params``, ``peak_lr``,
      ``base_lr``, ``extra`` and ``model``.
    """
    run = _Run(cfg, data, resolve_device(device), checkpoint, run_info)
    if resume:
        run.resume()
    if run.init_loss is None:
        run.init_loss = run.train_loss()[0]
    threshold = float(cfg.fail_factor) * run.init_loss
    run.chance = chance_loss(data.train_labels[run.idx], data.num_classes, cfg.label_smoothing)
    run.elapsed0 = run.clock.train_s
    ts = run.ts
    state = run.state = TrainState(run.model, run.start, run.total, run.steps_per_epoch, run.B,
                                   0.0, run.mu, ts.raw, ts.labels, run.device, run.extra,
                                   ts.sample, plain=ts.plain)

    def notify(step: int) -> None:
        if callback is None:
            return
        state.step = step
        state.lr = run.lr_at(min(step, run.total - 1))
        run.clock.callback(callback, state)
        run.model.train()

    run.model.train()
    if run.start == 0:
        notify(0)
    bar = _Progress(run.total, run.start, progress and run.rank == 0)
    if state.diverged:  # the callback rejected the starting point (e.g. non-finite weights)
        stopped, failure, failed_at = run.start, "stopped by the callback", run.start
    else:
        check_every = 10 if run.device.type == "cuda" else 1
        stopped, failure, failed_at = _loop(run, notify, batch_hook, bar, check_every,
                                            threshold, callback is not None)
    run.clock.stop()
    bar.close()
    return _finish(run, stopped, failure, failed_at)
