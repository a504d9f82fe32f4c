r"""A fast residual network for 32×32 images, in plain PyTorch (no torchvision).

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

import torch
from torch import nn

__all__ = ["FastResNet", "channels", "init_whitening"]

BASE_WIDTHS = (64, 128, 256, 512)


def channels(width: float) -> tuple[int, int, int, int]:
    """Channel counts (c₀, c₁, c₂, c₃) = round((64, 128, 256, 512) × width), multiples of 8, ≥ 8.

    >>> channels(1.0), channels(0.125)
    ((64, 128, 256, 512), (8, 16, 32, 64))
    """
    if not (width > 0) or width != width or width == float("inf"):
        raise ValueError(f"width must be a positive finite multiplier, got {width!r}")
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
        c0, c1, c2, c3 = channels(width)
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
    if not model.whiten:
        raise ValueError("init_whitening needs a model built with whiten=True")
    conv = model.stem[0]
    patches = torch.nn.functional.unfold(images.float(), kernel_size=2)  # (n, 12, L)
    patches = patches.transpose(1, 2).reshape(-1, 12).double()
    patches = patches - patches.mean(0)
    cov = patches.T @ patches / patches.shape[0]
    lam, vec = torch.linalg.eigh(cov)
    filters = (vec.T / torch.sqrt(lam + eps)[:, None]).reshape(12, 3, 2, 2)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))
    conv.bias.zero_()
