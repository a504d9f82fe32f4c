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

from validate import cifar, data, digits_check, monitor, train

ROOT = Path(__file__).resolve().parents[1]
# an 8-step run (256 images, B = 32, 1 epoch) and the cheapest valid noise settings
TINY = ["--device", "cpu", "--preset", "quick", "--data", "synthetic", "--epochs", "1",
        "--subset", "256", "--batch-size", "32", "--no-progress"]
TINY_NOISE = ["--measure-batch", "8", "--micro-batch", "4", "--hessian-batch", "4",
              "--lanczos-iters", "2"]


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
                    "lr", "effective_lr", "gd_limit"):
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
    _one_line_error(capsys, base + ["--preset", "quick", "--data", "synthetic", "--seed", "-1"],
                    "argument --seed: must be an integer ≥ 0, got -1")
    unrelated = tmp_path / "passwd"  # --data-dir pointing at a file that is not CIFAR-10
    unrelated.write_text("root:x:0:0:root:/root:/bin/bash\n")
    err = _one_line_error(capsys, base + ["--preset", "quick", "--data-dir", str(unrelated)],
                          "is not a cifar-10-python.tar.gz archive")
    assert "delete" not in err and unrelated.read_text().startswith("root:")
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


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["noise", "--help"]])
def test_help_shows_presets_and_every_option(capsys, argv):
    with pytest.raises(SystemExit):
        cifar.main(argv)
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for name in ("quick", "default"):  # each preset's values, from the presets themselves
        h = train.make_config(name)
        peak = train.peak_lr(h)
        assert f"{name} batch size B = {h.batch_size}, {h.epochs} epochs" in text
        assert f"peak lr η = {peak:.4g} (mean gradient); base rate η/B = " \
               f"{peak / h.batch_size:.3g}" in text
        n = cifar.NOISE_PRESETS[name]
        assert f"noise: {n.points} points, measure batch {n.measure_batch}" in text
    if argv != ["--help"]:
        assert "--epochs EPOCHS passes over the training subset (integer ≥ 1)" in text
        assert "--label-smoothing LABEL_SMOOTHING probability mass in [0, 1]" in text
        assert "--nesterov, --no-nesterov" in text and "unless --no-nesterov" in text
    if argv[0] == "noise":
        assert "eval: BatchNorm with running statistics, per-example gradients" in text


def _noise_json(out):
    return json.loads((out / "noise.json").read_text())


def test_noise_divergence_saves_what_was_measured(tmp_path, capsys):
    """A diverging noise run stops measuring, saves the measurements so far with
    diverged_at_step, notes it in one line and exits like a diverging train run (status 0)."""
    fast = ["--lr", "1e6", "--warmup", "0"]
    out = tmp_path / "noise"
    assert cifar.main(["noise", *TINY, *fast, *TINY_NOISE, "--points", "9", "--out",
                       str(out)]) == 0  # points at every one of the 8 steps and step 0
    text = capsys.readouterr().out
    s = _noise_json(out)
    d = s["diverged_at_step"]
    assert d is not None and 1 <= d < 8 and s["steps"] == d and s["test_acc"] is None
    assert s["diverged_reason"]
    assert [r["step"] for r in s["measurements"]] == list(range(d))  # all steps before it
    for r in s["measurements"]:
        assert r["grad_sq"] is not None and r["grad_sq"] > 0
    notes = [ln for ln in text.splitlines() if "diverged" in ln]
    assert len(notes) == 1 and notes[0].startswith(f"diverged at step {d} of 8")
    assert f"measurements stopped there: {d} of 9 saved" in notes[0]
    with open(out / "noise.csv") as f:
        assert len(list(csv.DictReader(f))) == d
    assert (out / "noise.png").stat().st_size > 0
    # train reports the same divergence the same way: results written, status 0
    assert cifar.main(["train", *TINY, *fast, "--out", str(tmp_path / "train")]) == 0
    assert json.loads((tmp_path / "train" / "train.json").read_text())["diverged_at_step"]


def test_measure_mode_eval_uses_per_example_gradients(tmp_path):
    parser = cifar.build_parser()

    def cfg(*extra):
        args = parser.parse_args(["noise", *extra])
        return cifar.noise_config(args.preset, **cifar._from_args(cifar.NoiseConfig, args))

    default = cifar.NOISE_PRESETS["default"].micro_batch
    assert (cfg().micro_batch, cfg().method) == (default, "micro_batch")
    c = cfg("--measure-mode", "eval")
    assert (c.micro_batch, c.method) == (1, "per_sample")
    c = cfg("--measure-mode", "eval", "--micro-batch", "4", "--preset", "quick")
    assert (c.micro_batch, c.method) == (4, "micro_batch")
    out = tmp_path / "eval"
    cifar.main(["noise", *TINY, "--points", "2", "--measure-batch", "8", "--hessian-batch", "4",
                "--lanczos-iters", "2", "--measure-mode", "eval", "--out", str(out)])
    s = _noise_json(out)
    assert s["noise_config"]["micro_batch"] == 1 and s["noise_config"]["method"] == "per_sample"
    assert len(s["measurements"]) == 2
    for r in s["measurements"]:
        assert (r["micro_batch"], r["method"], r["measure_mode"]) == (1, "per_sample", "eval")
        assert r["measure_batch"] == 8 and math.isfinite(r["measure_loss"])
        assert r["tr_sigma"] is not None and r["tr_sigma"] > 0


def test_resume_refuses_checkpoints_of_other_runs(tmp_path, capsys):
    """--resume only continues a checkpoint written by the same command with the same resolved
    settings; otherwise a one-line error names what differs."""
    out = tmp_path / "run"
    cifar.main(["train", *TINY, "--no-nesterov", "--out", str(out)])
    assert json.loads((out / "train.json").read_text())["hyp"]["nesterov"] is False
    capsys.readouterr()
    resume = ["--out", str(out), "--resume"]
    _one_line_error(capsys, ["noise", *TINY, "--no-nesterov", *TINY_NOISE, "--points", "2",
                             *resume], "command ('train' → 'noise')")
    _one_line_error(capsys, ["train", *TINY, *resume], "nesterov (False → True)")
    out = tmp_path / "noise"
    resume = ["--out", str(out), "--resume"]
    cifar.main(["noise", *TINY, *TINY_NOISE, "--points", "2", "--out", str(out)])
    first = _noise_json(out)["measurements"]
    _one_line_error(capsys, ["noise", *TINY, *TINY_NOISE, "--points", "3", *resume],
                    "noise_config.points (2 → 3)")
    _one_line_error(capsys, ["noise", *TINY, *TINY_NOISE, "--points", "2", "--measure-mode",
                             "eval", *resume], "noise_config.measure_mode ('train' → 'eval')")
    _one_line_error(capsys, ["noise", *TINY, *TINY_NOISE, "--points", "2", "--hessian-batch",
                             "8", *resume], "noise_config.hessian_batch (4 → 8)")
    _one_line_error(capsys, ["train", *TINY, *resume], "command ('noise' → 'train')")
    # the same settings resume (the run is finished: the saved measurements come back)
    cifar.main(["noise", *TINY, *TINY_NOISE, "--points", "2", *resume])
    assert _noise_json(out)["measurements"] == first


# ---------------------------------------------------------------------------- digits_check CLI
def test_digits_check_rejects_bad_arguments_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(digits_check, "run", lambda cfg, **k: pytest.fail("ran on bad input"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    for argv, match in ((["--threads", "0"], "argument --threads: must be an integer ≥ 1"),
                        (["--threads", "x"], "argument --threads"),
                        (["--seed", "-1"], "argument --seed: must be an integer ≥ 0"),
                        (["--out", str(blocker / "d.json")], "argument --out: cannot write"),
                        (["--out", str(tmp_path)], "is a folder")):
        with pytest.raises(SystemExit) as e:
            digits_check.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if "error" in ln]
        assert "Traceback" not in err and len(lines) == 1 and match in lines[0], err

    class Ran(Exception):
        pass

    def fake_run(cfg, **k):
        raise Ran(cfg)

    monkeypatch.setattr(digits_check, "run", fake_run)
    new = tmp_path / "new" / "sub" / "d.json"
    with pytest.raises(Ran) as e:  # a missing parent folder is created before the run
        digits_check.main(["--out", str(new), "--threads", "2"])
    assert new.parent.is_dir() and e.value.args[0].threads == 2
    # a failure writing the result at the end: one line, status 1, no temporary file left
    ap = digits_check.argparse.ArgumentParser(prog="digits_check")
    monkeypatch.setattr(digits_check.os, "replace",
                        lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied",
                                                                         str(new))))
    with pytest.raises(SystemExit) as e:
        digits_check._write_result(ap, str(new), {"a": 1})
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err and "Permission denied" in err
    assert list(new.parent.iterdir()) == []


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
        assert monitor.gd_limit(lam, mu, nesterov) == pytest.approx(lo, rel=2e-3)
    assert math.isnan(monitor.gd_limit(-1.0, 0.9, True))

    def eps_opt(batch, eps_max, b_noise):
        return monitor.predictions(0.1, batch, eps_max=eps_max, b_noise=b_noise,
                                   lambda_max=1.0)["eps_opt"]

    assert math.isnan(eps_opt(64, float("nan"), 3.0))
    assert eps_opt(64, 2.0, 64.0) == pytest.approx(1.0)
