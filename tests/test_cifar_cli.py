"""python -m validate.cifar: end to end on a generated CIFAR-10 archive, and one-line errors."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cifar_archive import split_into_batches, write_archive

from validate import cifar, data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """1050 learnable training images (5 × 210) and 200 test images, CIFAR-10 format."""
    root = tmp_path_factory.mktemp("cifar")
    syn = data.synthetic_cifar10(1050, 200, seed=7)
    batches = split_into_batches(syn.train_images, syn.train_labels, syn.test_images,
                                 syn.test_labels, per_batch=210)
    md5 = write_archive(root / "cifar-10-python.tar.gz", batches)
    return root, md5


@pytest.mark.slow
def test_noise_end_to_end_on_generated_archive(archive, tmp_path):
    root, md5 = archive
    out = tmp_path / "noise"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop(data.MD5_ENV, None)
    cmd = [sys.executable, "-m", "validate.cifar", "noise", "--device", "cpu", "--preset",
           "quick", "--data-dir", str(root), "--md5", md5, "--out", str(out), "--seed", "0",
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout
    for name in ("noise.json", "noise.csv", "noise.png", "checkpoint.pt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "noise.json").read_text())
    assert summary["data"].endswith("cifar-10-python.tar.gz")
    assert summary["train_examples"] == 1024 and summary["hyp"]["batch_size"] == 64
    assert 0.0 <= summary["test_acc"] <= 1.0 and math.isfinite(summary["test_loss"])
    recs = summary["measurements"]
    assert [r["step"] for r in recs] == [0, 16, 32]  # 2 epochs × 1024/64 steps, 3 points
    assert all(r["measure_batch"] == 256 and r["micro_batch"] == 16 for r in recs)
    for r in recs:
        for key in ("grad_sq", "tr_sigma", "b_simple", "g_h_g", "tr_h_sigma", "lambda_max",
                    "lr", "effective_lr", "stability_limit"):
            assert r[key] is not None and math.isfinite(r[key]), (r["step"], key)
        assert r["b_simple"] > 0 and r["tr_sigma"] > 0 and r["lambda_max"] > 0
        assert r["b_simple"] == pytest.approx(r["tr_sigma"] / r["grad_sq"], rel=1e-9)
        assert r["effective_lr"] == pytest.approx(r["lr"] / (1 - 0.9))
        if r["g_h_g"] > 0 and r["tr_h_sigma"] >= 0:  # ratios defined: check them by hand
            assert r["eps_max"] == pytest.approx(r["grad_sq"] / r["g_h_g"], rel=1e-9)
            assert r["b_noise"] == pytest.approx(r["tr_h_sigma"] / r["g_h_g"], rel=1e-9)
            assert r["eps_opt"] == pytest.approx(r["eps_max"] / (1 + r["b_noise"] / 64),
                                                 rel=1e-9)
    assert any(r["eps_opt"] is not None for r in recs)  # the prediction is drawn somewhere
    with open(out / "noise.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and float(rows[1]["b_simple"]) == pytest.approx(recs[1]["b_simple"])


def test_train_command_writes_results(tmp_path, capsys):
    out = tmp_path / "train"
    cifar.main(["train", "--device", "cpu", "--preset", "quick", "--data", "synthetic",
                "--epochs", "1", "--subset", "256", "--batch-size", "32", "--base-lr", "2e-3",
                "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert "test accuracy" in text and "base rate" in text
    summary = json.loads((out / "train.json").read_text())
    assert summary["peak_lr"] == pytest.approx(2e-3 * 2.0 * 32)  # base rate × factor × B
    assert summary["hyp"]["lr_factor"] == 2.0 and summary["steps"] == 8
    assert len(summary["history"]) == 1 and (out / "history.csv").is_file()
    # --resume on a finished run returns its results without training again
    cifar.main(["train", "--device", "cpu", "--preset", "quick", "--data", "synthetic",
                "--epochs", "1", "--subset", "256", "--batch-size", "32", "--base-lr", "2e-3",
                "--out", str(out), "--no-progress", "--resume"])
    again = json.loads((out / "train.json").read_text())
    assert again["test_acc"] == summary["test_acc"]


def _one_line_error(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        cifar.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1 and match in lines[0], err
    return err


def test_bad_input_gives_one_line_errors(tmp_path, capsys, monkeypatch, archive):
    root, md5 = archive
    out = tmp_path / "never"
    base = ["train", "--device", "cpu", "--out", str(out), "--no-progress"]
    _one_line_error(capsys, base + ["--preset", "quick", "--data", "synthetic",
                                    "--batch-size", "4096"],
                    "batch_size (4096) is larger than the training subset (1024")
    _one_line_error(capsys, base + ["--preset", "turbo"], "invalid choice: 'turbo'")
    _one_line_error(capsys, base + ["--preset", "quick", "--lr", "0.1", "--base-lr", "0.1"],
                    "not allowed with argument")
    _one_line_error(capsys, base + ["--preset", "quick", "--data-dir", str(root), "--md5",
                                    "0" * 32], "does not match the expected")
    _one_line_error(capsys, base + ["--preset", "quick", "--data-dir", str(tmp_path / "none")],
                    "--download")
    _one_line_error(capsys, ["noise", "--device", "cpu", "--preset", "quick", "--data",
                             "synthetic", "--out", str(out), "--micro-batch", "7"],
                    "--micro-batch (7) must divide --measure-batch (256)")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _one_line_error(capsys, ["train", "--device", "cuda", "--preset", "quick", "--data",
                             "synthetic", "--out", str(out)], "no CUDA GPU")
    assert not out.exists()  # nothing written on bad input


def test_help_explains_units(capsys):
    with pytest.raises(SystemExit):
        cifar.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "MEAN minibatch gradient" in text and "per example" in text
    assert "SGDTHEORY_CIFAR10_MD5" in text and "--download" in text


def test_stability_limit_matches_iteration():
    """Largest stable lr of heavy-ball / Nesterov on a 1-D quadratic, by bisection on iterates."""
    lam = 3.0

    def stable(lr, mu, nesterov):
        theta, v = 1.0, 0.0
        for _ in range(3000):
            g = lam * theta
            v = mu * v + g
            theta -= lr * (g + mu * v if nesterov else v)
        return abs(theta) < 1.0

    for mu, nesterov in ((0.0, False), (0.9, False), (0.5, True), (0.9, True)):
        lo, hi = 0.0, 10.0
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if stable(mid, mu, nesterov) else (lo, mid)
        assert cifar.stability_limit(lam, mu, nesterov) == pytest.approx(lo, rel=2e-3)
    assert math.isnan(cifar.stability_limit(-1.0, 0.9, True))
    assert math.isnan(cifar.predicted_eps_opt(64, float("nan"), 3.0))
    assert cifar.predicted_eps_opt(64, 2.0, 64.0) == pytest.approx(1.0)
