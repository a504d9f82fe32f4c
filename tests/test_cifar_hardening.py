"""python -m validate.cifar and NoiseMonitor hardening (issues #13 items 8, 10, 16, 17; #14.4)."""

import csv
import json
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from dense_hessian import dense_hessian
from torch import nn

from validate import _hvp, cifar, monitor, train
from validate.models import FastResNet, count_parameters

TINY = ["--device", "cpu", "--preset", "quick", "--data", "synthetic", "--epochs", "1",
        "--subset", "256", "--batch-size", "32", "--no-progress"]


def _strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def _refused(capsys, argv, match):
    """main(argv) exits 2 with one short error line naming ``match`` and no traceback."""
    with pytest.raises(SystemExit) as e:
        cifar.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert len(errors) == 1 and match in errors[0], err
    return err


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if training starts (the checks must come before it)."""
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("training started"))


# ---------------------------------------------------------------------------- item 8
def test_unresolved_estimates_are_reported_not_nan(tmp_path, capsys):
    """Every estimate is printed as value ± s.e. or marked unresolved with the reason; the JSON is
    strict and each record says whether it is resolved and why not; the CSV has no nan/inf."""
    out = tmp_path / "noise"
    cifar.main(["noise", *TINY, "--points", "3", "--measure-batch", "16", "--micro-batch", "4",
                "--hessian-batch", "8", "--lanczos-iters", "3", "--out", str(out)])
    text = capsys.readouterr().out
    steps = [ln for ln in text.splitlines() if ln.startswith("step ")]
    assert len(steps) == 3
    assert not re.search(r"\b(nan|inf)\b", text, re.IGNORECASE), text
    recs = _strict_json(out / "noise.json")["measurements"]
    for line, r in zip(steps, recs, strict=True):
        assert isinstance(r["resolved"], bool) and isinstance(r["reason"], str)
        assert r["resolved"] == (r["reason"] == "")
        assert "±" in line  # 4 micro-batches: standard errors exist
        if not r["resolved"]:
            assert r["reason"] in line and "unresolved" in line
        # the estimates against their own definitions, where defined
        if r["b_simple"] is not None:
            assert r["b_simple"] == pytest.approx(r["tr_sigma"] / r["grad_sq"], rel=1e-9)
        if r["eps_max"] is None:
            assert not r["eps_max_resolved"] and r["eps_opt"] is None and r["reason"]
    body = (out / "noise.csv").read_text().lower()
    assert "nan" not in body and "inf" not in body
    with open(out / "noise.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["resolved"] for r in rows] == [str(r["resolved"]) for r in recs]


def test_single_pair_of_micro_batches_says_no_standard_error(tmp_path, capsys):
    out = tmp_path / "noise"
    cifar.main(["noise", *TINY, "--points", "2", "--measure-batch", "8", "--micro-batch", "4",
                "--hessian-batch", "4", "--lanczos-iters", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert "nan" not in text.lower()
    for r in _strict_json(out / "noise.json")["measurements"]:
        assert r["resolved"] is False and "no standard error" in r["reason"]
        assert r["grad_sq_stderr"] is None


def _fake_hessian_noise(g_h_g, tr_h_sigma, grad_sq):
    def fake(model, criterion, inputs, targets, **kw):
        nan = float("nan")
        return _hvp.HessianNoise(
            g_h_g=g_h_g, tr_h_sigma=tr_h_sigma, eps_max=nan, b_noise=nan, grad_sq=grad_sq,
            tr_sigma=0.0, b_simple=0.0, g_h_g_stderr=0.0, tr_h_sigma_stderr=0.0,
            eps_max_stderr=nan, b_noise_stderr=nan, grad_sq_stderr=0.0, tr_sigma_stderr=0.0,
            b_simple_stderr=0.0, batch=inputs.shape[0], micro_batch=2,
            hessian_batch=inputs.shape[0])
    return fake


def test_monitor_flags_undefined_eps_opt(monkeypatch):
    """The monitor's |G|² (from the micro-batches) and GᵀHG resolved, but the |G|² measured with
    the curvature ≤ 0, so ε_max = 0 and ε_opt is undefined. The record must say so (resolved
    False, reason naming ε_opt) and warn once, not carry a silent NaN."""
    monkeypatch.setattr(_hvp, "hessian_noise", _fake_hessian_noise(2.0, 5.0, -1.0))
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.ones(8, 3, dtype=torch.float64)  # identical examples: tr(Σ) = 0 exactly
    y = torch.zeros(8, dtype=torch.long)
    crit = nn.CrossEntropyLoss()
    mon = monitor.NoiseMonitor(model, criterion=crit, every=1, curvature_every=1,
                               lanczos_iters=0)
    recs = []
    with pytest.warns(UserWarning, match="ε_opt") as caught:
        for _ in range(4):
            model.zero_grad()
            for xb, yb in zip(x.chunk(4), y.chunk(4), strict=True):
                (crit(model(xb), yb) / 4).backward()
                mon.after_backward()
            recs.append(mon.step(lr=0.1, inputs=x, targets=y))
    assert sum("ε_opt" in str(w.message) for w in caught) == 1  # once
    last = recs[-1]
    assert last["eps_max_ema"] == 0 and math.isnan(last["eps_opt"])
    assert last["resolved"] is False and "ε_opt" in last["reason"]


# ---------------------------------------------------------------------------- item 10
def test_out_must_be_a_writable_folder(tmp_path, capsys, no_training):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _refused(capsys, ["train", *TINY, "--out", str(blocker)], "is a file, not a folder")
    _refused(capsys, ["train", *TINY, "--out", str(blocker / "sub")], "lies under the file")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root ignores modes: a read-only kernel folder instead
            ro = Path("/sys")
            try:
                os.rmdir(tempfile.mkdtemp(dir=ro))
                pytest.skip("no read-only folder available")
            except OSError:
                pass
        _refused(capsys, ["train", *TINY, "--out", str(ro / "run")], "cannot write in")
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert blocker.read_text() == "x"


def test_seed_range_and_short_argparse_errors(capsys, no_training):
    err = _refused(capsys, ["train", *TINY, "--seed", str(2**70)], "argument --seed")
    assert "2**32" in err and len(err.strip().splitlines()) == 2
    err = _refused(capsys, ["train", "--preset", "turbo"], "invalid choice: 'turbo'")
    assert len(err.strip().splitlines()) == 2 and err.startswith("usage:")
    err = _refused(capsys, ["nosuchcommand"], "invalid choice")
    assert len(err.strip().splitlines()) == 2
    assert cifar._seed_arg(str(2**32 - 1)) == 2**32 - 1


@pytest.mark.parametrize("flags,match", [
    (["--measure-batch", str(10**9)], "--measure-batch"),
    (["--measure-batch", str(2 * 10**9), "--micro-batch", str(10**9)], "--micro-batch"),
    (["--hessian-batch", str(10**9)], "--hessian-batch"),
    (["--width", "1e4"], "--width"),
    (["--width", "1e308"], "--width"),
    (["--batch-size", str(10**9)], "--batch-size"),
])
def test_sizes_that_cannot_fit_are_refused_up_front(tmp_path, capsys, no_training, flags, match):
    out = tmp_path / "never"
    err = _refused(capsys, ["noise", *TINY, *flags, "--out", str(out)], match)
    assert "GiB" in err and "needs at least" in err
    assert not out.exists()


def _hooked_activations(model, x) -> int:
    """Brute force: values in the outputs of every conv, pool, BN, GELU, residual sum, head."""
    from validate.models import Residual

    total = []
    kinds = (nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.GELU, nn.AdaptiveMaxPool2d, nn.Linear,
             Residual)
    hooks = [m.register_forward_hook(lambda m, i, o: total.append(o[0].numel()))
             for m in model.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sum(total)


@pytest.mark.parametrize("width,whiten", [(0.125, False), (0.5, False), (0.25, True), (1.0, True)])
def test_resnet_size_matches_the_network(width, whiten):
    model = FastResNet(width=width, whiten=whiten).eval()
    act, par = cifar.resnet_size(width, whiten)
    assert act == _hooked_activations(model, torch.zeros(1, 3, 32, 32))
    assert par == count_parameters(model, trainable=True)


def test_memory_check_passes_the_presets():
    gib = 2.0**30
    for preset in ("quick", "default"):
        hyp = train.make_config(preset)
        cfg = cifar.NOISE_PRESETS[preset]
        cifar.check_memory(hyp, cfg, torch.device("cuda"), available=60 * gib)
        need = max(n for n, _, _ in cifar.memory_needed(hyp, cfg))
        with pytest.raises(ValueError, match="needs at least"):
            cifar.check_memory(hyp, cfg, torch.device("cpu"), available=0.5 * need)


# ---------------------------------------------------------------------------- item 16
def test_header_gives_the_images_trained_on_and_the_data_set_size(tmp_path, capsys):
    cifar.main(["train", *TINY, "--out", str(tmp_path / "t")])
    first = capsys.readouterr().out.splitlines()[0]
    assert "2048 training / 512 test images" in first and "256-image subset" in first


# ---------------------------------------------------------------------------- item 17
def _records():
    recs = []
    for i, step in enumerate((0, 10, 20)):
        ok = i > 0
        recs.append({
            "step": step, "lr": 0.1, "effective_lr": 1.0, "grad_sq": 0.2, "grad_sq_stderr": 0.05,
            "tr_sigma": 60.0, "tr_sigma_stderr": 3.0, "b_simple": 300.0, "b_simple_stderr": 40.0,
            "eps_max": 0.4 if ok else None, "eps_max_stderr": 0.1 if ok else None,
            "b_noise": 90.0 if ok else None, "b_noise_stderr": 30.0 if ok else None,
            "eps_opt": 0.17 if ok else None, "eps_opt_stderr": 0.05 if ok else None,
            "lambda_max": 12.0, "lambda_max_converged": i != 2, "gd_limit": 0.3,
            "resolved": ok, "reason": "" if ok else "GᵀHG = -1 ± 2: not resolved",
            "b_simple_resolved": True, "eps_max_resolved": ok})
    return recs


def test_noise_figure_house_style(tmp_path):
    from matplotlib.container import ErrorbarContainer

    path = tmp_path / "noise.png"
    fig = cifar.plot_noise(_records(), 64, path, title="gradient noise: synthetic, B = 64, "
                                                       "preset quick")
    assert path.stat().st_size > 0
    assert "B = 64" in fig._suptitle.get_text() and "quick" in fig._suptitle.get_text()
    axes = fig.axes
    assert len(axes) >= 4 and all(a.get_ylabel() for a in axes)

    def labels(a):
        return [t.get_text() for t in a.get_legend().get_texts()]

    def panel(start):
        found = [i for i, a in enumerate(axes) if any(t.startswith(start) for t in labels(a))]
        assert len(found) == 1, (start, [labels(a) for a in axes])
        return found[0]

    # quantities in different units on different axes
    assert len({panel("|G|²"), panel("λ_max"), panel("ε_max"), panel("B_noise")}) == 4
    assert panel("ε_opt") == panel("ε_max") == panel("η used") == panel("gd_limit")
    eps_ax = axes[panel("ε_max")]
    bars = [c for c in eps_ax.containers if isinstance(c, ErrorbarContainer) and c.has_yerr]
    assert len(bars) >= 2  # ε_max and ε_opt with ±1 s.e.
    hollow = [ln for a in axes for ln in a.get_lines() if ln.get_markerfacecolor() == "white"
              and len(ln.get_xdata())]
    assert hollow  # the λ_max that did not converge (and unresolved points) are hollow
    assert "unresolved" in fig._supxlabel.get_text() and "0" in fig._supxlabel.get_text()


# ---------------------------------------------------------------------------- NumPy integers
def test_numpy_integers_accepted_and_bool_refused():
    model = nn.Linear(3, 2)
    assert monitor.NoiseMonitor(model, every=np.int64(10)).every == 10
    with pytest.raises(ValueError, match="every"):
        monitor.NoiseMonitor(model, every=True)
    cfg = cifar.NoiseConfig(points=np.int64(3), measure_batch=np.int32(16),
                            micro_batch=np.int64(4), hessian_batch=np.uint8(8))
    assert (cfg.points, cfg.units) == (3, 4) and type(cfg.points) is int
    with pytest.raises(ValueError, match="--points"):
        cifar.NoiseConfig(points=True)
    with pytest.raises(ValueError, match="--hessian-batch"):
        cifar.NoiseConfig(hessian_batch=8.0)
    assert cifar.measurement_steps(np.int64(32), np.int64(4)) == [0, 11, 21, 32]
    with pytest.raises(ValueError, match="points"):
        cifar.measurement_steps(32, True)


# ---------------------------------------------------------------------------- #14.4
def test_one_stability_column_and_one_core():
    """The cifar record and NoiseMonitor share gd_limit (one rule) and the measurement core."""
    assert monitor.STABILITY_COLUMN == "gd_limit" and "gd_limit" in monitor.COLUMNS
    assert not hasattr(cifar, "stability_limit")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    point = monitor.measure_curvature(model, nn.CrossEntropyLoss(), x, y, micro_batch=2,
                                      lanczos_iters=10)
    lam_ref = float(torch.linalg.eigvalsh(_full_hessian(model, x, y))[-1])
    assert point.lambda_max == pytest.approx(lam_ref, rel=1e-6)
    rec = cifar.noise_record(point, step=0, steps_per_epoch=4, batch=16, lr=0.1, momentum=0.9,
                             nesterov=True, cfg=cifar.NoiseConfig(measure_batch=8,
                                                                  micro_batch=2), loss=1.0)
    assert rec["gd_limit"] == pytest.approx(2 * 1.9 / (2.8 * lam_ref), rel=1e-6)
    assert "stability_limit" not in rec


def _full_hessian(model, x, y):
    """Dense Hessian of the mean loss over all parameters (brute force, tiny model)."""
    return dense_hessian(model, x, y)


def test_flags_named_once_and_checks_run_once(tmp_path, monkeypatch):
    """Hyperparameter flags map onto TrainConfig fields by name; check_config runs once."""
    parser = cifar.build_parser()
    args = parser.parse_args(["noise", "--epochs", "3", "--batch-size", "16", "--lr", "0.2",
                              "--momentum", "0.5", "--no-nesterov", "--weight-decay", "0",
                              "--label-smoothing", "0.1", "--warmup", "0.3", "--subset", "64",
                              "--width", "0.25", "--no-whiten", "--no-tta",
                              "--checkpoint-every", "5", "--seed", "7", "--points", "4"])
    over = cifar._from_args(train.TrainConfig, args)
    hyp = train.make_config("quick", **over)
    assert (hyp.epochs, hyp.batch_size, hyp.lr, hyp.momentum, hyp.nesterov, hyp.weight_decay,
            hyp.label_smoothing, hyp.warmup, hyp.subset, hyp.width, hyp.whiten, hyp.tta,
            hyp.checkpoint_every, hyp.seed) == (3, 16, 0.2, 0.5, False, 0.0, 0.1, 0.3, 64,
                                                0.25, False, False, 5, 7)
    assert cifar.noise_config("quick", **cifar._from_args(cifar.NoiseConfig, args)).points == 4
    calls = []
    real = train.check_config
    monkeypatch.setattr(train, "check_config", lambda *a: calls.append(1) or real(*a))
    cifar.main(["train", *TINY, "--out", str(tmp_path / "t")])
    assert len(calls) == 1
