"""Issue 13 (hardening), the figures part: one test per item, each failing before its fix —
no NaN in the committed figure data (item 6), Ctrl-C and ``--out ""`` (11), atomic outputs
checked before reuse (13), a plain "reused" message (14), and the figure fixes of item 17."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from experiment_contract import nan_paths

from sgdtheory import theory
from sgdtheory.experiments import EXPERIMENTS, _common, linear_scaling, memory_curve
from sgdtheory.experiments import noise_scale_during_training as noise_scale
from sgdtheory.figures import __main__ as cli

FIGURES = Path(__file__).resolve().parents[1] / "figures"
QUICK = ["--only", "eps_opt_vs_batch", "--preset", "quick"]


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


# --------------------------------------------------------------- item 6: saved outputs


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_committed_figure_data_has_no_nan_and_strict_json(name):
    """Item 6: train_se/test_se, excess_se, z held NaN where a replica diverged."""
    with np.load(FIGURES / f"{name}.npz", allow_pickle=False) as npz:
        bad = [k for k in npz.files if npz[k].dtype.kind == "f" and np.isnan(npz[k]).any()]
    assert not bad, f"{name}.npz: NaN in {bad}"
    meta = _strict((FIGURES / f"{name}.json").read_text())
    assert meta["all_passed"]
    data = cli.load_data(FIGURES, name)
    assert not nan_paths(data)


def test_checks_refuse_nan_and_json_round_trips_infinities(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="measured"):
        _common.relative_check("c", 1.0, float("nan"), 0.1)
    from sgdtheory.experiments import _plotting, nqm_optimizers

    def fake_compute(config, backend, seed):
        return {"x": np.array([1.0, np.inf]), "edge": np.inf,
                "checks": [_common.factor_check("diverged", 1.0, np.inf, 2.0)]}

    def fake_plot(data):
        fig, axes = _plotting.subplots()
        axes[0].plot([0, 1])
        return fig

    monkeypatch.setattr(nqm_optimizers, "compute", fake_compute)
    monkeypatch.setattr(nqm_optimizers, "plot", fake_plot)
    assert cli.main(["--only", "nqm_optimizers", "--preset", "quick", "--out",
                     str(tmp_path)]) == 1
    meta = _strict((tmp_path / "nqm_optimizers.json").read_text())
    assert meta["data"]["edge"] == {"nonfinite": "inf"}
    data = cli.load_data(tmp_path, "nqm_optimizers")
    assert data["edge"] == np.inf and data["checks"][0].measured == np.inf


# --------------------------------------------------------------- item 11: Ctrl-C, --out ""


def test_empty_out_is_refused_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--out", ""])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "current directory" in err[0]
    assert not any(tmp_path.iterdir())


def test_ctrl_c_prints_one_line_saying_what_finished(tmp_path, capsys, monkeypatch):
    real = cli.run_experiment

    def interrupt_second(name, **kwargs):
        if name == "loss_change_vs_lr":
            raise KeyboardInterrupt
        return real(name, **kwargs)

    monkeypatch.setattr(cli, "run_experiment", interrupt_second)
    rc = cli.main(["--only", "eps_opt_vs_batch", "loss_change_vs_lr", "steps_vs_examples",
                   "--preset", "quick", "--out", str(tmp_path)])
    assert rc == 130
    err = [ln for ln in capsys.readouterr().err.splitlines() if "interrupted" in ln]
    assert len(err) == 1
    assert "1 of 3" in err[0] and "eps_opt_vs_batch" in err[0] and "rerun" in err[0]
    assert (tmp_path / "eps_opt_vs_batch.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------------------------- items 13 and 14: reuse


@pytest.fixture()
def drawn(tmp_path, capsys):
    assert cli.main([*QUICK, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    return tmp_path


@pytest.mark.parametrize("damage", ["truncate_npz", "truncate_png", "drop_array"])
def test_outputs_that_do_not_load_are_redrawn(drawn, capsys, damage):
    """Item 13: "done" was decided from the JSON hash alone."""
    npz, png = drawn / "eps_opt_vs_batch.npz", drawn / "eps_opt_vs_batch.png"
    if damage == "truncate_npz":
        npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    elif damage == "truncate_png":
        png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    else:
        with np.load(npz) as z:
            arrays = {k: z[k] for k in z.files[1:]}
        np.savez_compressed(npz, **arrays)
    assert cli.main([*QUICK, "--out", str(drawn)]) == 0
    assert "drawn in" in capsys.readouterr().out
    assert cli._outputs_load(drawn, "eps_opt_vs_batch",
                             json.loads((drawn / "eps_opt_vs_batch.json").read_text()))


def test_a_failed_write_leaves_the_old_file_whole(drawn, monkeypatch):
    npz = drawn / "eps_opt_vs_batch.npz"
    before = npz.read_bytes()

    def broken(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(cli.np, "savez_compressed", broken)
    res = cli.run_experiment("eps_opt_vs_batch", preset="quick", backend=_numpy(), out=drawn,
                             force=True)
    assert res.status == "error" and "disk full" in res.error
    assert npz.read_bytes() == before
    assert not list(drawn.glob(".*.tmp"))


def test_reuse_is_said_plainly_with_the_redraw_time(drawn, capsys):
    """Item 14: a fresh clone printed "skipped" nine times and nothing else."""
    assert cli.main([*QUICK, "--out", str(drawn)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "skipped" not in out
    assert f"reused from {drawn}/" in out and "code, config and seed are unchanged" in out
    assert "--force" in out and "Redrawing them takes about" in out


def test_results_fit_in_100_columns_and_print_every_rule():
    """Item 17: the table was 162 characters wide and said "see note" for custom rules."""
    checks = [c.to_dict() for c in (
        _common.relative_check("a relative check with a rather long name " * 2, 1.0, 1.05,
                               0.1),
        _common.factor_check("a factor check", 2.0, 3.0, 2.0),
        _common.Check("a custom check", 1.0, 0.5, 1.0, True,
                      "best(N_min)/best(N_max) >= 3 and least-squares slope of log best vs log "
                      "N <= -0.4 (measured -0.93; -1 where forgetting-limited)"))]
    table = cli.summary_table([cli.ExperimentResult("curvature_vs_forgetting", "ran", checks,
                                                    12.3)])
    assert max(len(line) for line in table.splitlines()) <= 100
    flat = " ".join(table.split())
    assert "pass if rel_err <= 0.1" in flat and "within a factor 2" in flat
    assert "least-squares slope of log best vs log N <= -0.4" in flat
    assert "see note" not in flat


def _numpy():
    from sgdtheory.backend import get_backend

    return get_backend("numpy")


# --------------------------------------------------------------- item 17: the figures


def test_linear_scaling_break_is_not_interpolated_across_a_divergence():
    b = np.array([64.0, 128.0, 256.0, 512.0, 1024.0])
    jump = np.array([1.0, 1.02, 0.95, 2.8e6, np.inf])
    assert linear_scaling._break_point(b, jump, 2.0) == 512.0  # was 256.00007
    gradual = np.array([1.0, 1.5, 3.0, 8.0, 20.0])
    got = linear_scaling._break_point(b, gradual, 2.0)
    assert got == pytest.approx(np.exp(np.log(128) + (2 - 1.5) / 1.5 * np.log(2)))


def test_linear_scaling_curvature_batch_is_where_the_peak_lr_meets_eta_c():
    lam = np.geomspace(1.0, 0.1, 32)
    base = 0.009190973990028498  # the default preset's tuned base rate
    b_curv = linear_scaling.curvature_batch(lam, base)
    eta_c = float(theory.linreg_stability_limit(lam, b_curv))
    assert base * b_curv == pytest.approx(eta_c, rel=1e-3)
    for b in (0.9 * b_curv, 1.1 * b_curv):  # below: stable peak rate; above: not
        assert (base * b < float(theory.linreg_stability_limit(lam, b))) == (b < b_curv)
    data = cli.load_data(FIGURES, "linear_scaling")
    assert data["binding"] == "curvature"
    assert data["curvature_batch"] < data["b_noise_run"] < 2 * data["b_noise_run"]
    assert data["break_batch"] == 512.0
    fig = linear_scaling.plot(data)
    texts = [t.get_text() for t in fig.legends[0].get_texts()] + [
        fig.legends[0].get_title().get_text()]
    assert any("curvature limit" in t for t in texts) and any("binds" in t for t in texts)


def test_nqm_optimizers_right_legend_is_framed():
    from sgdtheory.experiments import nqm_optimizers

    fig = nqm_optimizers.plot(cli.load_data(FIGURES, "nqm_optimizers"))
    assert fig.axes[1].get_legend().get_frame_on()


def test_memory_curve_annotations_are_in_words():
    fig = memory_curve.plot(cli.load_data(FIGURES, "memory_curve"))
    texts = [t.get_text() for ax in fig.axes for t in ax.texts] + [
        ax.get_title() for ax in fig.axes]
    assert not any("check" in t or "'closed'" in t or "'persists'" in t for t in texts)
    assert any("epoch" in t for t in texts)


def test_noise_scale_figure_says_where_the_estimator_fails():
    data = cli.load_data(FIGURES, "noise_scale_during_training")
    z = np.asarray(data["z"])
    assert not np.isnan(z).any() and (~np.asarray(data["resolved"])).any()
    fig = noise_scale.plot(data)
    note = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "fails at t ≥" in note and "unresolved" in note and "|z| up to" in note
    assert "below" in note  # and why: |G|² below the noise of its estimate
