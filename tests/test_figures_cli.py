"""The ``python -m sgdtheory.figures`` CLI: outputs, resume, --force, --list, bad options.

The smoke test runs the quick preset of every experiment in the registry once (module-scoped
fixture) and checks that each wrote a PNG, a JSON with its checks and provenance, and an NPZ.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sgdtheory import __version__
from sgdtheory.experiments import EXPERIMENTS
from sgdtheory.figures.__main__ import (
    ExperimentResult,
    config_hash,
    load_data,
    main,
    summary_table,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """All experiments, quick preset, NumPy: (out dir, exit status, stdout)."""
    out = tmp_path_factory.mktemp("figs")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["--preset", "quick", "--out", str(out), "--seed", "3"])
    return out, rc, buf.getvalue()


def test_registry_order_and_names():
    assert EXPERIMENTS == (
        "eps_opt_vs_batch", "loss_change_vs_lr", "steps_vs_examples",
        "noise_scale_during_training", "curvature_vs_forgetting", "memory_curve",
        "small_batch_stability", "linear_scaling", "nqm_optimizers")


def _check_outputs(out, stdout, name):
    assert name in stdout  # every experiment appears in the summary table
    png, js, npz = (out / f"{name}.{ext}" for ext in ("png", "json", "npz"))
    assert png.read_bytes()[:8] == PNG_MAGIC
    meta = json.loads(js.read_text())
    assert meta["experiment"] == name
    assert meta["preset"] == "quick" and meta["backend"] == "numpy" and meta["seed"] == 3
    assert meta["version"] == __version__
    assert meta["hash"] == config_hash(name, meta["config"], "quick", "numpy", None, 3,
                                       __version__, meta["code_hash"])
    assert meta["checks"], "every experiment records at least one check"
    for c in meta["checks"]:
        assert {"name", "predicted", "measured", "rel_error", "tolerance", "passed"} <= set(c)
        assert isinstance(c["passed"], bool)
    with np.load(npz) as arrays:
        assert len(arrays.files) > 0
    data = load_data(out, name)  # the figure can be redrawn from the saved data alone
    from sgdtheory.experiments import load

    fig = load(name).plot(data)
    assert len(fig.axes) >= 1


def test_quick_preset_outputs_every_experiment(quick_run):
    """One quick run of all experiments (a single test, so pytest-xdist runs it once)."""
    out, rc, stdout = quick_run
    problems = []
    for name in EXPERIMENTS:
        try:
            _check_outputs(out, stdout, name)
        except (AssertionError, OSError, KeyError, ValueError) as exc:
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
    assert not problems, "\n".join(problems)
    passed = [c["passed"] for n in EXPERIMENTS
              for c in json.loads((out / f"{n}.json").read_text())["checks"]]
    assert rc == (0 if all(passed) else 1)
    assert "predicted" in stdout and "measured" in stdout  # the summary table


def test_rerun_skips_and_force_recomputes(tmp_path, capsys, monkeypatch):
    args = ["--only", "eps_opt_vs_batch", "--preset", "quick", "--out", str(tmp_path)]
    assert main(args) == 0
    js = tmp_path / "eps_opt_vs_batch.json"
    first = json.loads(js.read_text())
    mtime = js.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert js.stat().st_mtime_ns == mtime  # reused: same hash, outputs untouched
    assert "reused" in capsys.readouterr().out
    assert main([*args, "--force"]) == 0
    assert js.stat().st_mtime_ns != mtime
    assert "drawn in" in capsys.readouterr().out
    # a different seed changes the hash, so the experiment is recomputed
    assert main([*args, "--seed", "1"]) == 0
    assert json.loads(js.read_text())["hash"] != first["hash"]
    # an edited experiment (other source fingerprint) is recomputed too
    mtime = js.stat().st_mtime_ns
    monkeypatch.setattr("sgdtheory.figures.__main__.code_fingerprint", lambda m: "edited")
    assert main([*args, "--seed", "1"]) == 0
    assert js.stat().st_mtime_ns != mtime
    assert json.loads(js.read_text())["code_hash"] == "edited"
    monkeypatch.undo()
    # a deleted figure is redrawn even with the same hash (an interrupted run resumes)
    (tmp_path / "eps_opt_vs_batch.png").unlink()
    assert main(args) == 0
    assert (tmp_path / "eps_opt_vs_batch.png").exists()


def test_list(capsys):
    assert main(["--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == list(EXPERIMENTS)


@pytest.mark.parametrize("argv, needle", [
    (["--only", "nope"], "invalid choice: 'nope'"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--backend", "jax"], "invalid choice: 'jax'"),
    (["--seed", "-1"], "argument --seed: must be an integer >= 0"),
    (["--seed", "abc"], "argument --seed: must be an integer >= 0"),
])
def test_bad_options_one_line_error(argv, needle, capsys):
    """One line, exit 2; a bad choice also lists the valid ones."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    if "invalid choice" in needle:
        assert "choose from" in err[0]


def test_unwritable_out_fails_before_any_experiment(tmp_path, capsys, monkeypatch):
    """--out naming a file: one line, exit 2, and no experiment computed first."""
    import sgdtheory.figures.__main__ as cli

    def must_not_run(*args, **kwargs):
        raise AssertionError("an experiment ran before --out was checked")

    monkeypatch.setattr(cli, "run_experiment", must_not_run)
    target = tmp_path / "a_file"
    target.write_text("")
    assert main(["--only", "eps_opt_vs_batch", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write to --out" in err[0]


def test_code_fingerprint_covers_the_package():
    """Editing the simulator (not only the experiment's own module) changes the fingerprint."""
    from pathlib import Path

    import sgdtheory.figures.__main__ as cli

    module = cli.load_experiment("eps_opt_vs_batch")
    before = cli.code_fingerprint(module)
    assert before == cli.code_fingerprint(module) and len(before) == 16
    sim = Path(cli.__file__).resolve().parents[1] / "simulate.py"
    real_read = Path.read_bytes

    def edited(self):
        data = real_read(self)
        return data + b"# edited" if self.resolve() == sim else data

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "read_bytes", edited)
        assert cli.code_fingerprint(module) != before


def test_unavailable_backend_one_line(tmp_path, capsys, monkeypatch):
    """CuPy without a GPU (here: forced failure) gives a one-line error and exit status 2."""
    import sgdtheory.backend as backend_mod

    def broken(name=None, device=None):
        raise RuntimeError("cupy cannot reach a GPU\n(details on a second line)")

    monkeypatch.setattr(backend_mod, "get_backend", broken)
    assert main(["--backend", "cupy", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cupy" in err[0] and "choose from" in err[0]
    assert not any(tmp_path.iterdir())


def test_missing_or_failing_experiment_reported_not_crash(tmp_path, capsys, monkeypatch):
    """An experiment that raises is an error row; the others still run; exit status 1."""
    from sgdtheory.experiments import eps_opt_vs_batch

    def boom(config, backend, seed):
        raise ValueError("synthetic failure")

    monkeypatch.setattr(eps_opt_vs_batch, "compute", boom)
    import sgdtheory.experiments as reg

    real_load = reg.load

    def fake_load(name):
        if name == "steps_vs_examples":
            raise ModuleNotFoundError("No module named 'sgdtheory.experiments.steps_vs_examples'")
        return real_load(name)

    monkeypatch.setattr("sgdtheory.figures.__main__.load_experiment", fake_load)
    rc = main(["--only", "eps_opt_vs_batch", "steps_vs_examples", "loss_change_vs_lr",
               "--preset", "quick", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "synthetic failure" in captured.out and "ModuleNotFoundError" in captured.out
    assert (tmp_path / "loss_change_vs_lr.json").exists()
    assert not (tmp_path / "eps_opt_vs_batch.json").exists()


def test_summary_table_marks_failures():
    res = [ExperimentResult("a", "ran", [dict(name="c1", predicted=1.0, measured=1.5,
                                              rel_error=0.5, tolerance=0.1, passed=False)]),
           ExperimentResult("b", "error", error="ValueError: x")]
    table = summary_table(res)
    assert "FAIL" in table and "ERROR" in table and "ValueError: x" in table


def test_module_entry_point_runs(tmp_path):
    """``python -m sgdtheory.figures --list`` works as a subprocess (the real entry point)."""
    proc = subprocess.run([sys.executable, "-m", "sgdtheory.figures", "--list"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "eps_opt_vs_batch" in proc.stdout


def test_failing_check_gives_exit_status_1_and_is_reported(tmp_path, capsys, monkeypatch):
    from sgdtheory.experiments import _plotting, nqm_optimizers
    from sgdtheory.experiments._common import relative_check

    def fake_compute(config, backend, seed):
        return {"x": np.arange(3.0), "checks": [relative_check("too far", 1.0, 2.0, 0.1)]}

    def fake_plot(data):
        fig, axes = _plotting.subplots()
        axes[0].plot(data["x"])
        return fig

    monkeypatch.setattr(nqm_optimizers, "compute", fake_compute)
    monkeypatch.setattr(nqm_optimizers, "plot", fake_plot)
    rc = main(["--only", "nqm_optimizers", "--preset", "quick", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "FAIL" in captured.out and "nqm_optimizers" in captured.err
    meta = json.loads((tmp_path / "nqm_optimizers.json").read_text())
    assert meta["all_passed"] is False and meta["checks"][0]["rel_error"] == 1.0
