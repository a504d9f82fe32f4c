r"""The networks of ``validate``, in plain PyTorch (no torchvision), sized from the data's shape.

* :class:`FastResNet` — a fast residual network for 32×32 colour images (CIFAR-10);
* :class:`SmallCNN` — two 3×3 conv + ReLU + 2×2 max-pool layers and a linear head, for small
  images such as scikit-learn's 8×8 digits (no BatchNorm: per-example gradients are defined);
* :class:`MLP` — one hidden ReLU layer, for feature vectors;
* :func:`build_model` — picks one from the input shape (``"auto"``) or by name.

The fast residual network:

The architecture follows the public CIFAR-10 speed-run recipes (David Page's ResNet-9 for
DAWNBench, Keller Jordan's airbench): a few wide 3×3 convolutions, each followed by max-pooling,
batch norm and a smooth activation, two residual blocks, a global max-pool and a linear head whose
logits are scaled down by a constant. Widths are (64, 128, 256, 512) × ``width``. With label
smoothing, Nesterov momentum and a warm-up/linear-decay schedule this family reaches about 94 %
test accuracy on CIFAR-10 in roughly ten epochs on one GPU (the exact figure depends on the
training tricks; see ``validate/train.py``).

    stem     conv3×3(3→c₀) · BN · GELU                    (or a fixed 2×2 whitening conv, below)
    layer1   conv3×3(c₀→c₁) · maxpool2 · BN · GELU  + residual(2 × conv·BN·GELU)
    layer2   conv3×3(c₁→c₂) · maxpool2 · BN · GELU
    layer3   conv3×3(c₂→c₃) · maxpool2 · BN · GELU  + residual(2 × conv·BN·GELU)
    head     global max-pool · linear(c₃→classes, no bias) · × logit_scale

Optional whitening (airbench): the stem is a 2×2 convolution whose 24 filters are ±Λ^{-1/2}Vᵀ
from the eigen-decomposition Λ, V of the covariance of 2×2×3 training patches, kept fixed
(only its bias learns); see :func:`init_whitening`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["MLP", "MODELS", "FastResNet", "SmallCNN", "build_model", "channels",
           "count_parameters", "init_whitening"]

BASE_WIDTHS = (64, 128, 256, 512)


def channels(width: float) -> tuple[int, int, int, int]:
    """Channel counts (c₀, c₁, c₂, c₃) = round((64, 128, 256, 512) × width), multiples of 8, ≥ 8.

    >>> channels(1.0), channels(0.125)
    ((64, 128, 256, 512), (8, 16, 32, 64))
    """
    width = _positive_real("width", width)
    return tuple(max(8, int(round(c * width / 8)) * 8) for c in BASE_WIDTHS)


class ConvBN(nn.Sequential):
    """conv3×3 (no bias) → optional 2×2 max-pool → BatchNorm → GELU."""

    def __init__(self, c_in: int, c_out: int, *, pool: bool = False, bn_momentum: float = 0.1):
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        layers += [nn.BatchNorm2d(c_out, momentum=bn_momentum), nn.GELU()]
        super().__init__(*layers)


class Residual(nn.Module):
    """x ↦ x + f(x) with f two :class:`ConvBN` at constant width."""

    def __init__(self, c: int, *, bn_momentum: float = 0.1):
        super().__init__()
        self.body = nn.Sequential(ConvBN(c, c, bn_momentum=bn_momentum),
                                  ConvBN(c, c, bn_momentum=bn_momentum))

    def forward(self, x):
        return x + self.body(x)


class FastResNet(nn.Module):
    """ResNet-9-style network for (n, 3, 32, 32) inputs; returns (n, num_classes) logits.

    Args:
      num_classes: number of output logits.
      width: channel multiplier on (64, 128, 256, 512).
      whiten: use a fixed 2×2 whitening stem (call :func:`init_whitening` on training images
        before training) instead of a learned 3×3 conv stem.
      logit_scale: constant multiplying the logits (0.125 as in ResNet-9).
      bn_momentum: BatchNorm running-average momentum (PyTorch convention).
    """

    def __init__(self, num_classes: int = 10, *, width: float = 1.0, whiten: bool = False,
                 logit_scale: float = 0.125, bn_momentum: float = 0.1):
        super().__init__()
        from sgdtheory import _checks

        (num_classes,) = _positive_ints("num_classes", (num_classes,), 1)
        c0, c1, c2, c3 = channels(width)
        whiten = _checks.flag("whiten", whiten)
        logit_scale = _positive_real("logit_scale", logit_scale)
        bn_momentum = _momentum(bn_momentum)
        self.whiten = whiten
        if whiten:
            conv = nn.Conv2d(3, 24, 2, padding=0, bias=True)
            conv.weight.requires_grad_(False)
            self.stem = nn.Sequential(conv, nn.GELU())
            c0 = 24
        else:
            self.stem = ConvBN(3, c0, bn_momentum=bn_momentum)
        self.layer1 = nn.Sequential(ConvBN(c0, c1, pool=True, bn_momentum=bn_momentum),
                                    Residual(c1, bn_momentum=bn_momentum))
        self.layer2 = ConvBN(c1, c2, pool=True, bn_momentum=bn_momentum)
        self.layer3 = nn.Sequential(ConvBN(c2, c3, pool=True, bn_momentum=bn_momentum),
                                    Residual(c3, bn_momentum=bn_momentum))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(c3, num_classes, bias=False)
        self.logit_scale = float(logit_scale)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(torch.flatten(self.pool(x), 1)) * self.logit_scale


@torch.no_grad()
def init_whitening(model: FastResNet, images: torch.Tensor, eps: float = 5e-4) -> None:
    r"""Set the whitening stem from training images (n, 3, 32, 32), already normalised.

    With patches p ∈ ℝ¹² (2×2×3) of covariance C = V Λ Vᵀ, the filters are the rows of
    Λ^{-1/2} Vᵀ and their negatives (24 filters), so the stem's output has identity covariance
    before the GELU.
    """
    if not isinstance(model, FastResNet) or not model.whiten:
        raise ValueError("model: init_whitening needs a FastResNet built with whiten=True")
    if not (isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3
            and images.shape[0] >= 1 and images.shape[2] >= 2 and images.shape[3] >= 2
            and not images.is_complex()):
        raise ValueError("images must be a real (n, 3, H, W) tensor with H, W ≥ 2, got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images must be finite")
    from sgdtheory import _checks

    eps = _checks.real("eps", eps)
    if not eps > 0:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    conv = model.stem[0]
    patches = torch.nn.functional.unfold(images.float(), kernel_size=2)  # (n, 12, L)
    patches = patches.transpose(1, 2).reshape(-1, 12).double()
    patches = patches - patches.mean(0)
    cov = patches.T @ patches / patches.shape[0]
    lam, vec = torch.linalg.eigh(cov)
    filters = (vec.T / torch.sqrt(lam + eps)[:, None]).reshape(12, 3, 2, 2)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))
    conv.bias.zero_()


class SmallCNN(nn.Module):
    r"""conv3×3(C→c₁) · ReLU · maxpool2 · conv3×3(c₁→c₂) · ReLU · maxpool2 · linear(→classes).

    For (n, C, H, W) images with H, W ≥ 4; the head sees c₂·⌊⌊H/2⌋/2⌋·⌊⌊W/2⌋/2⌋ features. With
    C = 1, (c₁, c₂) = (4, 8) and 8×8 inputs it is the 666-parameter digits CNN of
    ``validate.digits_check``; the experiments' digits default is (8, 16): 1,898 parameters.

    >>> sum(p.numel() for p in SmallCNN((1, 8, 8), 10, channels=(4, 8)).parameters())
    666
    """

    def __init__(self, input_shape, num_classes: int, *, channels=(8, 16)):
        super().__init__()
        c, h, w = _shape(input_shape, 3, "(C, H, W)")
        (num_classes,) = _positive_ints("num_classes", (num_classes,), 1)
        if h < 4 or w < 4:
            raise ValueError(f"SmallCNN needs images of at least 4×4 pixels, got {h}×{w}")
        c1, c2 = _positive_ints("channels", channels, 2)
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(c2 * (h // 2 // 2) * (w // 2 // 2), num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


class MLP(nn.Module):
    """linear(features→hidden) · ReLU · linear(hidden→classes), for (n, features) inputs."""

    def __init__(self, input_shape, num_classes: int, *, hidden: int = 64):
        super().__init__()
        (features,) = _shape(input_shape, 1, "(features,)")
        (num_classes,) = _positive_ints("num_classes", (num_classes,), 1)
        (hidden,) = _positive_ints("hidden", (hidden,), 1)
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


def _positive_ints(name: str, values, n: int) -> tuple[int, ...]:
    """``values`` as n Python ints ≥ 1 (NumPy and 0-d torch integers accepted; no bools,
    floats or strings)."""
    import operator

    try:
        values = tuple(values)
        ok = len(values) == n and not any(
            isinstance(v, (bool, np.bool_)) or getattr(v, "dtype", None) == torch.bool
            for v in values)
        out = tuple(operator.index(v) for v in values) if ok else ()
        ok = ok and all(o >= 1 for o in out)
    except (TypeError, ValueError, RuntimeError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be {n} positive integer(s), got {values!r}")
    return out


def _shape(input_shape, n: int, form: str) -> tuple[int, ...]:
    """``input_shape`` as n positive ints (one example's shape ``form``, no batch axis)."""
    try:
        return _positive_ints("input_shape", input_shape, n)
    except ValueError:
        raise ValueError(f"input_shape must be {form}: {n} positive integer(s), got "
                         f"{input_shape!r}") from None


def _positive_real(name: str, value) -> float:
    """``value`` as a finite float > 0 (no bool, string or complex)."""
    from sgdtheory import _checks

    out = _checks.real(name, value)
    if not out > 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return out


def _momentum(value) -> float:
    """BatchNorm's running-average momentum: a float in (0, 1] (PyTorch convention)."""
    from sgdtheory import _checks

    out = _checks.real("bn_momentum", value)
    if not 0 < out <= 1:
        raise ValueError(f"bn_momentum must be in (0, 1], got {value!r}")
    return out


#: Model names :func:`build_model` accepts (besides ``"auto"``).
MODELS = ("resnet", "cnn", "mlp")


def build_model(name: str, input_shape, num_classes: int, *, width: float = 1.0,
                channels=(8, 16), hidden: int = 64, whiten: bool = False,
                bn_momentum: float = 0.1) -> nn.Module:
    """The network for inputs of ``input_shape`` (one example, no batch axis).

    ``name``: ``"auto"`` (FastResNet for 3×32×32 images, :class:`SmallCNN` for other images,
    :class:`MLP` for vectors), or one of :data:`MODELS`. ``width``/``whiten``/``bn_momentum``
    configure the ResNet, ``channels`` the CNN, ``hidden`` the MLP.

    >>> [type(build_model("auto", s, 10)).__name__ for s in ((3, 32, 32), (1, 8, 8), (5,))]
    ['FastResNet', 'SmallCNN', 'MLP']
    """
    from sgdtheory import _checks

    if not (isinstance(name, str) and name in ("auto", *MODELS)):
        raise ValueError(f"name: model must be 'auto' or one of {MODELS}, got {name!r}")
    try:
        shape = _positive_ints("input_shape", input_shape, len(input_shape))
    except (TypeError, ValueError):
        shape = None
    if not shape:
        raise ValueError(f"input_shape must be one example's shape, (C, H, W) or (features,), "
                         f"got {input_shape!r}")
    # every setting is checked, also those of the other networks (a typo is never ignored)
    (num_classes,) = _positive_ints("num_classes", (num_classes,), 1)
    _positive_real("width", width)
    _positive_ints("channels", channels, 2)
    _positive_ints("hidden", (hidden,), 1)
    _checks.flag("whiten", whiten)
    _momentum(bn_momentum)
    if name == "auto":
        name = "resnet" if shape == (3, 32, 32) else "cnn" if len(shape) == 3 else "mlp"
    if name == "resnet":
        if len(shape) != 3 or shape[0] != 3:
            raise ValueError(f"model 'resnet' needs (3, H, W) colour images, got {shape}")
        return FastResNet(num_classes, width=width, whiten=whiten, bn_momentum=bn_momentum)
    if name == "cnn":
        if len(shape) != 3:
            raise ValueError(f"model 'cnn' needs (C, H, W) images, got input shape {shape}")
        return SmallCNN(shape, num_classes, channels=channels)
    if name == "mlp":
        if len(shape) != 1:
            raise ValueError(f"model 'mlp' needs (features,) vectors, got input shape {shape}")
        return MLP(shape, num_classes, hidden=hidden)
    raise ValueError(f"model must be 'auto' or one of {MODELS}, got {name!r}")


def count_parameters(model: nn.Module, *, trainable: bool = False) -> int:
    """Number of scalars in ``model.parameters()`` (only ``requires_grad`` ones if
    ``trainable``)."""
    from sgdtheory import _checks

    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    trainable = _checks.flag("trainable", trainable)
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)
