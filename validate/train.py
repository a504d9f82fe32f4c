r"""Fast CIFAR-10 training in one readable file (airbench style).

Provenance: the recipe is the public CIFAR-10 speed-run one — David Page's ResNet-9 for DAWNBench
("How to train your ResNet", 2018) and Keller Jordan's airbench (2024): a small wide ResNet
(``validate/models.py``), the whole dataset kept on the device with augmentation done there
(random crop with reflect padding, horizontal flips), SGD with Nesterov momentum, label
smoothing, a linear warm-up then linear decay, weight decay, optional flip test-time augmentation,
bf16 autocast and channels-last on GPU.

Units (see README "Units and conventions"):

* the loss is the **mean** cross-entropy over the batch;
* ``lr`` = η multiplies the mean minibatch gradient G_B = (1/B) Σ ∇ℓ_i (PyTorch's convention);
* the **base rate** η̃ = η/B is the step per example (the sum convention of Myrtle, Graphcore and
  airbench). Give either ``lr`` or ``base_lr``; the peak step is then
  η = ``lr`` or η = ``base_lr`` · ``lr_factor`` · B;
* momentum as ``torch.optim.SGD`` (v ← μ v + g, θ ← θ − η v; Nesterov looks ahead), effective
  rate η/(1 − μ); ``weight_decay`` adds λθ to the mean-loss gradient;
* schedules are in fractions of the whole run.

Determinism and resuming: the model is initialised from ``seed``; the shuffle, crops and flips
of epoch e are drawn from a generator seeded by (seed, e), so any step can be reconstructed.
A checkpoint (``torch.save`` of model, optimizer, RNG state, step, running sums and the caller's
``extra`` dict) is written atomically every ``checkpoint_every`` steps and at every epoch end;
``train(..., resume=True)`` continues from it and on CPU reproduces the uninterrupted run exactly.

Data parallel: when ``torch.distributed`` is initialised (``torchrun``), each rank takes its
B/world slice of every global batch (same permutation everywhere) and gradients are averaged by
``DistributedDataParallel``; BatchNorm statistics are per rank (ghost batch norm).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageData
from .models import FastResNet, init_whitening

__all__ = [
    "HYP",
    "PRESETS",
    "TrainState",
    "evaluate",
    "hyperparameters",
    "lr_schedule",
    "peak_lr",
    "train",
]

# Peak step η = 0.4 on the mean gradient at B = 512 is Page's ResNet-9 setting (0.4 on the summed
# loss divided by B), i.e. a base rate of 0.4/512 = 7.8e-4 per example.
HYP = {
    "epochs": 10,              # passes over the training subset
    "batch_size": 512,         # B: examples per optimiser step (global, summed over ranks)
    "lr": None,                # η: peak step on the MEAN minibatch gradient; None → from base_lr
    "base_lr": 0.4 / 512,      # η̃ = η/B: peak step per example (sum convention)
    "lr_factor": 1.0,          # multiplies base_lr (the "learning-rate factor" of LR sweeps)
    "momentum": 0.9,           # μ (torch.optim.SGD convention); 0 → plain SGD
    "nesterov": True,          # Nesterov look-ahead (needs μ > 0)
    "weight_decay": 5e-4,      # λ: adds λθ to the mean-loss gradient (per step, not per example)
    "label_smoothing": 0.2,    # probability mass spread uniformly over the classes
    "warmup": 0.2,             # fraction of the run with linear warm-up 0 → η
    "final_lr": 0.0,           # step at the end of the run, as a fraction of η (linear decay)
    "subset": None,            # training examples used (a seeded random subset); None → all
    "width": 1.0,              # channel multiplier of FastResNet (64, 128, 256, 512)
    "whiten": True,            # fixed 2×2 whitening stem initialised from training patches
    "bn_momentum": 0.1,        # BatchNorm running-average momentum (PyTorch convention)
    "crop_pad": 4,             # random-crop padding in pixels (reflect); 0 → no crops
    "flip": True,              # random horizontal flips
    "tta": True,               # test: average logits of the image and its mirror
    "eval_batch": 1024,        # examples per forward pass at test time
    "checkpoint_every": 0,     # steps between checkpoints; 0 → epoch ends only
    "seed": 0,                 # model init, subset, shuffles and augmentation
}

PRESETS = {
    # GPU: the full recipe, 10 epochs on 50 000 images.
    "default": {},
    # CPU smoke test / CI: a narrow network, a small subset, two short epochs.
    "quick": {
        "epochs": 2,
        "batch_size": 64,
        "base_lr": 0.4 / 512,
        "lr_factor": 2.0,
        "subset": 1024,
        "width": 0.125,
        "whiten": False,
        "crop_pad": 2,
        "tta": False,
        "eval_batch": 500,
    },
}

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel mean of the training images (RGB, [0, 1])
CIFAR_STD = (0.2470, 0.2435, 0.2616)   # per-channel std


def hyperparameters(preset: str = "default", **overrides) -> dict:
    """HYP updated by a named preset and then by ``overrides`` (``None`` values are ignored,
    except ``lr`` and ``subset`` which may be set to ``None`` explicitly only via the preset)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    hyp = {**HYP, **PRESETS[preset]}
    for k, v in overrides.items():
        if k not in HYP:
            raise ValueError(f"unknown hyperparameter {k!r}; known: {sorted(HYP)}")
        if v is not None:
            hyp[k] = v
    return hyp


def check_hyperparameters(hyp: dict, n_train: int) -> None:
    """Raise ``ValueError`` naming the first hyperparameter that is out of range."""
    def positive(name, integer=False):
        v = hyp[name]
        if v is None or not math.isfinite(v) or v <= 0 or (integer and int(v) != v):
            kind = "a positive integer" if integer else "positive and finite"
            raise ValueError(f"{name} must be {kind}, got {v!r}")

    positive("epochs", True)
    positive("batch_size", True)
    positive("eval_batch", True)
    positive("width")
    if hyp["lr"] is not None:
        positive("lr")
    else:
        positive("base_lr")
        positive("lr_factor")
    for name in ("momentum", "warmup", "final_lr", "label_smoothing"):
        v = hyp[name]
        half_open = name in ("momentum", "warmup")
        if not (0.0 <= v <= 1.0) or (half_open and v == 1.0):
            raise ValueError(f"{name} must lie in [0, 1{')' if half_open else ']'}, got {v!r}")
    if hyp["weight_decay"] < 0 or not math.isfinite(hyp["weight_decay"]):
        raise ValueError(f"weight_decay must be finite and ≥ 0, got {hyp['weight_decay']!r}")
    if hyp["crop_pad"] < 0 or int(hyp["crop_pad"]) != hyp["crop_pad"] or hyp["crop_pad"] > 16:
        raise ValueError(f"crop_pad must be an integer in 0..16, got {hyp['crop_pad']!r}")
    seed = hyp["seed"]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer ≥ 0, got {seed!r}")
    if not isinstance(hyp["nesterov"], (bool, np.bool_)):
        raise ValueError(f"nesterov must be True or False, got {hyp['nesterov']!r}")
    if int(hyp["checkpoint_every"]) != hyp["checkpoint_every"] or hyp["checkpoint_every"] < 0:
        raise ValueError(f"checkpoint_every must be an integer ≥ 0, got "
                         f"{hyp['checkpoint_every']!r}")
    n = subset_size(hyp, n_train)
    if hyp["batch_size"] > n:
        raise ValueError(f"batch_size ({hyp['batch_size']}) is larger than the training subset "
                         f"({n} examples); lower --batch-size or raise --subset")


def subset_size(hyp: dict, n_train: int) -> int:
    """Number of training examples used: ``subset`` (checked ≤ n_train) or all of them."""
    s = hyp["subset"]
    if s is None:
        return n_train
    if int(s) != s or s < 1:
        raise ValueError(f"subset must be a positive integer, got {s!r}")
    if s > n_train:
        raise ValueError(f"subset ({s}) exceeds the {n_train} training examples available")
    return int(s)


def peak_lr(hyp: dict) -> float:
    """Peak step η on the mean gradient: ``lr`` if given, else ``base_lr · lr_factor · B``.

    >>> peak_lr({"lr": None, "base_lr": 0.4 / 512, "lr_factor": 1.0, "batch_size": 512})
    0.4
    >>> peak_lr({"lr": 0.1, "base_lr": 1.0, "lr_factor": 1.0, "batch_size": 512})
    0.1
    """
    if hyp["lr"] is not None:
        return float(hyp["lr"])
    return float(hyp["base_lr"] * hyp["lr_factor"] * hyp["batch_size"])


def lr_schedule(step: int, total_steps: int, peak: float, warmup: float, final: float) -> float:
    r"""Step η_t for optimiser step t ∈ {0, …, T−1} of a run of T steps.

    Linear warm-up over the first W = ⌈warmup·T⌉ steps, η_t = η (t+1)/W, then linear decay
    from η to ``final``·η at t = T:  η_t = η (final + (1 − final)(T − t)/(T − W)).

    >>> [round(lr_schedule(t, 10, 1.0, 0.2, 0.0), 2) for t in range(10)]
    [0.5, 1.0, 1.0, 0.88, 0.75, 0.62, 0.5, 0.38, 0.25, 0.12]
    """
    w = math.ceil(warmup * total_steps)
    if step < w:
        return peak * (step + 1) / w
    return peak * (final + (1.0 - final) * (total_steps - step) / (total_steps - w))


# ---------------------------------------------------------------------------- data on device
def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, h, w) → float32, per-channel (x/255 − mean)/std."""
    mean = torch.tensor(CIFAR_MEAN, device=x_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=x_uint8.device).view(1, 3, 1, 1)
    return (x_uint8.float() / 255.0 - mean) / std


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
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch: int = 1024,
             tta: bool = False) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on uint8 ``images`` (n, 3, 32, 32) in eval mode.

    With ``tta`` the logits of each image and its mirror image are averaged. Under
    ``torch.distributed`` each rank scores a shard and the sums are all-reduced.
    """
    dist, rank, world = _dist()
    was_training = model.training
    model.eval()
    device = images.device
    n = images.shape[0]
    lo, hi = rank * n // world, (rank + 1) * n // world
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
    for s in range(lo, hi, batch):
        x = normalize(images[s:min(s + batch, hi)])
        y = labels[s:min(s + batch, hi)]
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            logits = model(x).float()
            if tta:
                logits = 0.5 * (logits + model(torch.flip(x, dims=(3,))).float())
        sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += y.numel()
    if dist is not None:
        dist.all_reduce(sums)
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
    train_images: torch.Tensor     # uint8 (n, 3, 32, 32) training subset on the device
    train_labels: torch.Tensor
    device: torch.device
    extra: dict = field(default_factory=dict)
    sample: object = None          # sample(n, seed) -> (x, y): n augmented training examples
    #                                drawn with replacement, normalised, on the device
    diverged: bool = False         # a callback sets this when it finds the model non-finite:
    #                                training stops and reports diverged_at_step = step


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _resolve_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    return device


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


def train(hyp: dict, data: ImageData, *, device="cpu", checkpoint: str | os.PathLike | None = None,
          resume: bool = False, callback=None, progress: bool = True,
          run_info: dict | None = None) -> dict:
    """Train FastResNet on ``data`` with hyperparameters ``hyp`` (see :data:`HYP` for units).

    Args:
      hyp: a full hyperparameter dict (use :func:`hyperparameters`).
      data: the dataset (uint8 images).
      device: ``"cpu"``, ``"cuda"`` or a torch device.
      checkpoint: file to write checkpoints to (None: no checkpoints).
      resume: continue from ``checkpoint`` if it exists; its hyperparameters and ``run_info``
        must equal these (``ValueError`` naming what differs otherwise).
      callback: ``callback(state: TrainState)`` called before the first step and after every
        step; it may measure the model (it must leave it unchanged) and write to ``state.extra``.
        Setting ``state.diverged = True`` stops training there (reported as a divergence).
      progress: show a tqdm bar (rank 0 only).
      run_info: JSON-like dict of the other settings that affect the results (the command, the
        measurement settings, the data, …); saved in checkpoints and compared on ``resume``.

    Divergence: the training loss is checked every 10 steps and at epoch ends (each check is a
    host synchronisation, so not every step); a callback that measures must check the model
    itself (as ``validate.cifar``'s does). A non-finite loss, or a callback setting
    ``state.diverged``, ends the run with ``diverged_at_step`` set, ``test_acc``/``test_loss``
    nan and no checkpoint of the non-finite weights.

    Returns:
      dict with ``test_acc``, ``test_loss``, ``history`` (one entry per epoch: train loss/acc,
      test loss/acc, lr, seconds, examples/s), ``time_s`` (training only), ``examples_per_s``,
      ``steps``, ``params``, ``peak_lr``, ``base_lr``, ``extra`` and ``model``.
    """
    from tqdm.auto import tqdm

    device = _resolve_device(device)
    dist, rank, world = _dist()
    n_all = data.train_images.shape[0]
    check_hyperparameters(hyp, n_all)
    B = int(hyp["batch_size"])
    if B % world:
        raise ValueError(f"batch_size ({B}) must be divisible by the number of ranks ({world})")
    b_local = B // world
    seed = int(hyp["seed"])

    # --- data on the device: a seeded subset, reflect-padded once (uint8)
    n = subset_size(hyp, n_all)
    idx = np.sort(np.random.default_rng(seed).permutation(n_all)[:n]) if n < n_all \
        else np.arange(n_all)
    pad = int(hyp["crop_pad"])
    train_u8 = data.train_images[idx]
    padded_np = np.pad(train_u8, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    padded = torch.from_numpy(padded_np).to(device)
    train_x = torch.from_numpy(train_u8).to(device)
    train_y = torch.from_numpy(data.train_labels[idx]).to(device)
    test_x = torch.from_numpy(data.test_images).to(device)
    test_y = torch.from_numpy(data.test_labels).to(device)

    # --- model and optimiser
    torch.manual_seed(seed)
    model = FastResNet(data.num_classes, width=hyp["width"], whiten=hyp["whiten"],
                       bn_momentum=hyp["bn_momentum"]).to(device)
    if hyp["whiten"]:
        init_whitening(model, normalize(train_x[:5000]))
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    net = model
    if dist is not None:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None)
    peak = peak_lr(hyp)
    mu = float(hyp["momentum"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=peak, momentum=mu, nesterov=bool(hyp["nesterov"]) and mu > 0,
                          weight_decay=hyp["weight_decay"])
    steps_per_epoch = n // B
    total = int(hyp["epochs"]) * steps_per_epoch

    # --- resume
    start, elapsed, extra = 0, 0.0, {}
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # epoch loss·n, correct, count
    history: list[dict] = []
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if resume and ckpt_path is not None and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        if "hyp" not in ck or "run_info" not in ck:
            raise ValueError(f"checkpoint {ckpt_path} does not record its run settings (written "
                             "by an older version); use another --out or drop --resume")
        diff = _differences(ck["hyp"], hyp)
        if diff:
            raise ValueError(f"checkpoint {ckpt_path} was written with different hyperparameters: "
                             f"{'; '.join(diff)}; use another --out or drop --resume")
        diff = _differences(ck["run_info"], run_info)
        if diff:
            raise ValueError(f"checkpoint {ckpt_path} was written by a different run: "
                             f"{'; '.join(diff)}; use another --out or drop --resume")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["torch_rng"].cpu())
        start, elapsed, extra = ck["step"], ck["elapsed"], ck["extra"]
        sums = ck["sums"].to(device)
        history = ck["history"]

    def save(step: int) -> None:
        if ckpt_path is None or rank != 0:
            return
        _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                      "torch_rng": torch.get_rng_state(), "step": step, "elapsed": elapsed,
                      "extra": extra, "sums": sums.cpu(), "history": history, "hyp": hyp,
                      "run_info": run_info},
                     ckpt_path)

    def sample(count: int, sample_seed: int):
        g = torch.Generator().manual_seed(int(sample_seed))
        j = torch.randint(0, n, (count,), generator=g)
        dy, dx = (torch.randint(0, 2 * pad + 1, (count,), generator=g) for _ in range(2))
        fl = (torch.rand(count, generator=g) < 0.5) & bool(hyp["flip"])
        j, dy, dx, fl = (t.to(device) for t in (j, dy, dx, fl))
        x = normalize(crop_flip(padded[j], dy, dx, fl))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x, train_y[j]

    state = TrainState(model, start, total, steps_per_epoch, B, 0.0, mu, train_x, train_y,
                       device, extra, sample)

    def notify(step: int) -> None:
        if callback is None:
            return
        state.step = step
        state.lr = lr_schedule(min(step, total - 1), total, peak, hyp["warmup"], hyp["final_lr"])
        callback(state)
        model.train()

    bar = tqdm(total=total, initial=start, desc="train", unit="step",
               disable=not progress or rank != 0, dynamic_ncols=True)

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    plan, diverged = None, None
    model.train()
    if start == 0:
        notify(0)
    if state.diverged:  # the callback rejected the starting point (e.g. non-finite weights)
        diverged = start
    t0 = clock()
    for step in range(start, total if diverged is None else start):
        epoch, i = divmod(step, steps_per_epoch)
        if plan is None or plan.epoch != epoch:
            plan = epoch_plan(seed, epoch, n, pad, bool(hyp["flip"]), device)
        sl = slice(i * B + rank * b_local, i * B + (rank + 1) * b_local)
        j = plan.perm[sl]
        x = normalize(crop_flip(padded[j], plan.dy[sl], plan.dx[sl], plan.flip[sl]))
        y = train_y[j]
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        lr = lr_schedule(step, total, peak, hyp["warmup"], hyp["final_lr"])
        for group in opt.param_groups:
            group["lr"] = lr
        with _autocast(device):
            logits = net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=hyp["label_smoothing"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            sums[0] += loss.detach().double() * y.numel()
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += y.numel()
        bar.update(1)
        done = step + 1
        end_of_epoch = done % steps_per_epoch == 0
        save_due = end_of_epoch or (hyp["checkpoint_every"] and done % hyp["checkpoint_every"] == 0)
        if end_of_epoch or done % 10 == 0:  # a host sync: not every step on a GPU
            loss_v, acc_v = float(sums[0] / sums[2]), float(sums[1] / sums[2])
            now = elapsed + clock() - t0
            bar.set_postfix(loss=f"{loss_v:.3f}", acc=f"{acc_v:.3f}",
                            ex_s=f"{B * (done - start) / max(now - elapsed, 1e-9):.0f}")
            if not math.isfinite(loss_v):
                diverged = done
                break
        if not (end_of_epoch or save_due or callback is not None):
            continue
        elapsed += clock() - t0  # evaluation, measurements and checkpoints are not timed
        if end_of_epoch:
            if dist is not None:
                dist.all_reduce(sums)
            test_loss, test_acc = evaluate(model, test_x, test_y, batch=int(hyp["eval_batch"]),
                                           tta=bool(hyp["tta"]))
            history.append({"epoch": epoch + 1, "step": done,
                            "train_loss": float(sums[0] / sums[2]),
                            "train_acc": float(sums[1] / sums[2]),
                            "test_loss": test_loss, "test_acc": test_acc, "lr": lr,
                            "time_s": elapsed, "examples_per_s": B * done / max(elapsed, 1e-9)})
            sums.zero_()
        notify(done)
        if state.diverged:
            diverged, t0 = done, clock()  # time up to here is already counted
            break
        if save_due:
            save(done)
        t0 = clock()
    bar.close()
    if diverged is not None:
        elapsed += clock() - t0
        test_loss, test_acc = float("nan"), float("nan")
    elif history:
        test_loss, test_acc = history[-1]["test_loss"], history[-1]["test_acc"]
    else:
        test_loss, test_acc = evaluate(model, test_x, test_y, batch=int(hyp["eval_batch"]),
                                       tta=bool(hyp["tta"]))
    steps_done = diverged if diverged is not None else total
    return {
        "test_acc": test_acc,
        "test_loss": test_loss,
        "history": history,
        "time_s": elapsed,
        "examples_per_s": B * steps_done / max(elapsed, 1e-9),
        "steps": steps_done,
        "total_steps": total,
        "diverged_at_step": diverged,
        "steps_per_epoch": steps_per_epoch,
        "train_examples": n,
        "params": sum(p.numel() for p in model.parameters()),
        "peak_lr": peak,
        "base_lr": peak / B,
        "world_size": world,
        "extra": extra,
        "model": model,
    }
