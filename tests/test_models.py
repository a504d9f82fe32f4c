"""validate.models: the fast ResNet (shapes, parameter count by hand, whitening stem)."""

import pytest
import torch

from validate import models


def hand_count(c, classes=10):
    """Parameters of FastResNet without whitening, counted layer by layer."""
    c0, c1, c2, c3 = c
    conv = lambda a, b: a * b * 9
    bn = lambda a: 2 * a
    return (conv(3, c0) + bn(c0)
            + conv(c0, c1) + bn(c1) + 2 * (conv(c1, c1) + bn(c1))
            + conv(c1, c2) + bn(c2)
            + conv(c2, c3) + bn(c3) + 2 * (conv(c3, c3) + bn(c3))
            + c3 * classes)


@pytest.mark.parametrize("width", [0.125, 0.25, 1.0])
def test_shapes_and_parameter_count(width):
    torch.manual_seed(0)
    m = models.FastResNet(width=width)
    c = models.channels(width)
    assert c == tuple(max(8, round(w * width / 8) * 8) for w in (64, 128, 256, 512))
    assert sum(p.numel() for p in m.parameters()) == hand_count(c)
    if width < 1:
        out = m(torch.randn(5, 3, 32, 32))
        assert out.shape == (5, 10) and torch.isfinite(out).all()


def test_whitening_stem_whitens_patches():
    torch.manual_seed(0)
    # correlated colour channels and smooth images: a far-from-white patch covariance
    base = torch.randn(64, 1, 33, 33)
    smooth = (base[..., 1:, 1:] + base[..., :-1, :-1] + base[..., 1:, :-1]) / 3
    x = torch.cat([smooth, 0.8 * smooth + 0.2 * torch.randn(64, 1, 32, 32),
                   torch.randn(64, 1, 32, 32)], dim=1)
    m = models.FastResNet(width=0.125, whiten=True)
    models.init_whitening(m, x, eps=1e-9)
    conv = m.stem[0]
    assert not conv.weight.requires_grad and conv.bias.requires_grad
    with torch.no_grad():
        y = conv(x).double()  # (n, 24, 31, 31), bias 0
    feats = y.permute(0, 2, 3, 1).reshape(-1, 24)
    feats = feats - feats.mean(0)
    cov = feats.T @ feats / feats.shape[0]
    torch.testing.assert_close(cov[:12, :12], torch.eye(12, dtype=torch.float64),
                               atol=2e-3, rtol=0)
    torch.testing.assert_close(y[:, 12:], -y[:, :12])
    assert m(x[:2]).shape == (2, 10)
    with pytest.raises(ValueError, match="whiten=True"):
        models.init_whitening(models.FastResNet(width=0.125), x)


def test_residual_block_adds_its_input():
    torch.manual_seed(0)
    block = models.Residual(8).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x + block.body(x))


@pytest.mark.parametrize("width", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_width(width):
    with pytest.raises(ValueError, match="width"):
        models.FastResNet(width=width)
