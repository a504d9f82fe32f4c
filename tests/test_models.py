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


@pytest.mark.parametrize(("shape", "channels"), [((1, 8, 8), (4, 8)), ((1, 8, 8), (8, 16)),
                                                 ((3, 16, 12), (5, 7)), ((2, 9, 9), (3, 4))])
def test_small_cnn_parameter_count_by_hand(shape, channels):
    c, h, w = shape
    c1, c2 = channels
    feats = c2 * (h // 4) * (w // 4)
    want = (c * c1 * 9 + c1) + (c1 * c2 * 9 + c2) + (feats * 10 + 10)
    m = models.SmallCNN(shape, 10, channels=channels)
    assert models.count_parameters(m) == want
    assert m(torch.randn(3, *shape)).shape == (3, 10)


def test_small_cnn_is_the_digits_cnn_and_matches_a_hand_forward():
    """(4, 8) channels on 8×8 is the 666-parameter digits CNN; its forward is conv → ReLU →
    pool twice, then the linear head (written out with torch.nn.functional)."""
    from validate import digits_check

    torch.manual_seed(0)
    m = digits_check.DigitsCNN()
    assert isinstance(m, models.SmallCNN) and models.count_parameters(m) == 666
    x = torch.randn(4, 1, 8, 8)
    F = torch.nn.functional
    p = dict(m.named_parameters())
    h = F.max_pool2d(F.relu(F.conv2d(x, p["features.0.weight"], p["features.0.bias"],
                                     padding=1)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, p["features.3.weight"], p["features.3.bias"],
                                     padding=1)), 2)
    want = h.flatten(1) @ p["head.weight"].T + p["head.bias"]
    torch.testing.assert_close(m(x), want)


def test_mlp_and_build_model():
    m = models.build_model("auto", (7,), 3, hidden=5)
    assert isinstance(m, models.MLP) and models.count_parameters(m) == 7 * 5 + 5 + 5 * 3 + 3
    assert isinstance(models.build_model("auto", (3, 32, 32), 10, width=0.125),
                      models.FastResNet)
    assert isinstance(models.build_model("auto", (3, 16, 16), 10), models.SmallCNN)
    assert isinstance(models.build_model("cnn", (3, 32, 32), 10), models.SmallCNN)
    for name, shape, match in (("resnet", (1, 8, 8), "colour images"),
                               ("cnn", (7,), "needs \\(C, H, W\\)"),
                               ("mlp", (1, 8, 8), "needs \\(features,\\)"),
                               ("vgg", (7,), "model must be")):
        with pytest.raises(ValueError, match=match):
            models.build_model(name, shape, 10)
    with pytest.raises(ValueError, match="at least 4×4"):
        models.SmallCNN((1, 3, 3), 2)
    with pytest.raises(ValueError, match="channels"):
        models.SmallCNN((1, 8, 8), 2, channels=(4, 0))
