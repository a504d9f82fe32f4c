"""validate.digits_check: unresolved estimates are results (no crash, no NaN), the default output
is not the committed file, and an unchanged result leaves the file alone."""

import argparse
import contextlib
import io
import json
import math

import pytest
import torch

from sgdtheory import theory
from validate import _io, digits_check

# 200 examples, tiny estimator batches: with seed 37 the estimated GᵀHG comes out negative
# (and |G|² positive, so the old ε_max = |G|²/GᵀHG was negative and eps_opt raised)
FEW = 200
TINY = digits_check.Config(batches=(8, 32), line_batches=4, est_reps=3, est_batch=16,
                           est_micro=4, bootstrap=20, seed=37)


def _strict(text: str):
    def refuse(token):
        raise AssertionError(f"non-strict JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def _walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


@pytest.fixture(scope="module")
def few_examples_run(tmp_path_factory):
    """main() on the first 200 digits with TINY settings: (result, stdout, saved JSON)."""
    mp = pytest.MonkeyPatch()
    full = digits_check.load_digits_tensors
    mp.setattr(digits_check, "load_digits_tensors",
               lambda dtype=torch.float32: tuple(t[:FEW] for t in full(dtype)))
    mp.setattr(digits_check, "PRESETS", {"quick": TINY})
    out = tmp_path_factory.mktemp("dc") / "r.json"
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            res = digits_check.main(["--out", str(out)])
    finally:
        mp.undo()
    return res, buf.getvalue(), _strict(out.read_text())


def test_negative_ghg_estimate_is_reported_not_a_crash(few_examples_run):
    res, stdout, saved = few_examples_run
    est = saved["estimated"]
    assert est["g_h_g"] < 0 < est["grad_sq"]  # the issue: ε_max = |G|²/GᵀHG < 0, a crash
    assert est["eps_max"] is None and est["eps_max_resolved"] is False
    assert est["eps_max_stderr"] is None
    assert f"GᵀHG = {est['g_h_g']:.3g} ± {est['g_h_g_stderr']:.2g}: not resolved" in \
        est["eps_max_reason"]
    assert est["eps_max_reason"].endswith("; use more examples (--preset full)")
    assert est["b_noise"] is None and not est["b_noise_resolved"]
    assert est["eps_opt_reason"] and all(p["value"] is None for p in est["eps_opt"])
    for row in saved["line_search"]:
        assert row["eps_opt_predicted"] is None and row["ratio"] is None
        assert row["eps_opt_predicted_reason"] == est["eps_opt_reason"]
        # the exact side is resolved at this point and the line search ran
        assert row["eps_opt_predicted_exact"] > 0 and row["eps_opt_measured"] > 0
    assert saved["max_relative_error"] is None and saved["max_relative_error_reason"]
    # nothing NaN or infinite anywhere (strict JSON parsed; the returned dict too)
    assert all(not (isinstance(v, float) and not math.isfinite(v)) for v in _walk(res))
    assert "not resolved" in stdout and "GᵀHG = -" in stdout
    low = stdout.lower()
    assert "nan" not in low.replace("nano", "") and " inf" not in low
    assert "eps_max not resolved" in stdout


def test_console_shows_standard_errors(few_examples_run):
    _, stdout, saved = few_examples_run
    lines = [ln for ln in stdout.splitlines() if ln.startswith("B = ")]
    assert len(lines) == len(TINY.batches)
    for ln, row in zip(lines, saved["line_search"], strict=True):
        assert f"measured {row['eps_opt_measured']:.4g} ± " in ln
        assert "predicted not resolved" in ln
    est_line = next(ln for ln in stdout.splitlines() if ln.startswith("estimated"))
    est = saved["estimated"]
    for k in ("eps_max", "b_noise", "b_simple"):
        want = f"{k} not resolved" if est[k] is None else f"{k} {est[k]:.4g} ± "
        assert want in est_line, k
    assert f"GᵀHG = {est['g_h_g']:.3g} ± {est['g_h_g_stderr']:.2g}" in est_line


def test_unresolved_reason():
    assert digits_check.unresolved_reason(10.0, 1.0, "GᵀHG") is None
    msg = digits_check.unresolved_reason(-3.0, 5.0, "GᵀHG")
    assert msg.startswith("GᵀHG = -3 ± 5: not resolved")
    assert digits_check.unresolved_reason(1.0, 0.6, "x") is not None  # 1 < 2 × 0.6
    assert digits_check.unresolved_reason(float("nan"), 1.0, "x") is not None


def test_exact_prediction_without_a_minimum():
    def stats(g_h_g, tr_h_sigma):
        return theory.QuadraticStats(grad_sq=2.0, g_h_g=g_h_g, tr_sigma=5.0,
                                     tr_h_sigma=tr_h_sigma)

    value, why = digits_check.exact_prediction(stats(4.0, 8.0), 8)
    assert why is None and value == pytest.approx(2.0 / (4.0 + 8.0 / 8))
    value, why = digits_check.exact_prediction(stats(-1.0, 8.0), 8)
    assert value is None and "GᵀHG = -1 ≤ 0" in why
    # tr(HΣ) < 0: a minimum while GᵀHG + tr(HΣ)/B > 0 only
    value, why = digits_check.exact_prediction(stats(4.0, -8.0), 8)
    assert why is None and value == pytest.approx(2.0 / (4.0 - 1.0))
    value, why = digits_check.exact_prediction(stats(4.0, -8.0), 1)
    assert value is None and "≤ 0" in why
    # a batch without an exact prediction is reported, not line-searched (no model needed)
    est = {"eps_opt": [{"batch": 1, "value": 0.1, "stderr": 0.01}], "eps_opt_reason": None}
    cfg = digits_check.Config(batches=(1,))
    row = digits_check._batch_row(None, None, None, None, None, None, None, stats(4.0, -8.0),
                                  est, 0, cfg, None)
    assert row["skipped"].startswith("no line search") and row["eps_opt_measured"] is None
    assert row["ratio"] is None and row["ratio_exact"] is None
    assert row["eps_opt_predicted"] == 0.1
    assert "not resolved" in digits_check.markdown_table({"line_search": [row]})


# ---------------------------------------------------------------------------- output file
def _fake_result(seconds=1.0, acc=0.5):
    row = {"batch": 8, "eps_opt_predicted": 0.04, "eps_opt_predicted_stderr": 0.002,
           "eps_opt_predicted_exact": 0.041, "eps_opt_measured": 0.039,
           "eps_opt_measured_stderr": 0.001, "eps_opt_measured_resolved": True,
           "eps_opt_plain": 0.043, "eps_opt_plain_stderr": 0.003,
           "eps_opt_plain_resolved": True, "ratio": 0.975, "ratio_exact": 0.95}
    return {"n_data": 10, "n_params": 666, "loss": 0.6, "accuracy": acc,
            "exact": {"eps_max": 0.15, "b_noise": 23.0, "no_minimum_reason": None},
            "estimated": {"eps_max": 0.16, "eps_max_stderr": 0.006, "b_noise": 23.5,
                          "b_noise_stderr": 2.5, "eps_opt_reason": None},
            "line_search": [row], "seconds": seconds}


def test_default_output_is_not_the_committed_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(digits_check, "run", lambda cfg, **k: _fake_result())
    digits_check.main([])
    assert (tmp_path / "runs" / "digits_check" / "digits_check.json").is_file()
    assert not (tmp_path / "figures").exists()
    with pytest.raises(SystemExit):
        digits_check.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "runs/digits_check/digits_check.json" in text
    assert "--out figures/digits_check.json regenerates the committed" in text


def test_unchanged_result_is_not_rewritten(tmp_path, monkeypatch, capsys):
    out = tmp_path / "figures" / "digits_check.json"
    results = iter([_fake_result(1.0), _fake_result(2.0), _fake_result(3.0, acc=0.6)])
    monkeypatch.setattr(digits_check, "run", lambda cfg, **k: next(results))
    digits_check.main(["--out", str(out)])
    first = out.read_text()
    stamp = (out.stat().st_ino, out.stat().st_mtime_ns)
    assert _strict(first)["seconds"] == 1.0
    digits_check.main(["--out", str(out)])  # only the run time differs: left as it is
    assert out.read_text() == first and (out.stat().st_ino, out.stat().st_mtime_ns) == stamp
    assert "unchanged" in capsys.readouterr().out
    digits_check.main(["--out", str(out)])  # a different result is written
    assert _strict(out.read_text())["accuracy"] == 0.6


def test_int_at_least():
    parse = _io.int_at_least(2)
    assert parse("2") == 2
    for bad in ("1", "x", "2.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be an integer ≥ 2"):
            parse(bad)
