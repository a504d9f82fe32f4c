"""python -m validate.experiments, part 2 (critical_batch, stable_range, linear_scaling): the
hyperbola fit against noisy data drawn from the hyperbola, the good-range outline on a hand-made
grid, the jobs' loss curve / early stop / final sharpness against brute force, staged sweeps,
smoke runs end to end, per-run resume after a kill, and the Dask path against the local pool."""

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from experiment_cli import ENV, ROOT, run_cli, run_results, strict_json  # noqa: F401

from validate import data, train
from validate.experiments import (
    EXPERIMENTS,
    base,
    batch_runs,
    cli,
    critical_batch,
    linear_scaling,
    load,
    runner,
    stable_range,
)

_strict, _results = strict_json, run_results


def _cli(*args, timeout=280):
    return run_cli(*args, timeout=timeout)


# ---------------------------------------------------------------------------- the hyperbola
def _hyperbola_data(rng, s_min, b_crit, batches, seeds, sigma):
    """S = S_min(1 + B_crit/B) times independent log-normal noise per (seed, B)."""
    b = np.asarray(batches, dtype=float)
    return s_min * (1 + b_crit / b) * np.exp(sigma * rng.standard_normal((seeds, b.size)))


def test_fit_hyperbola_recovers_s_min_and_b_crit_within_its_uncertainty():
    """On data drawn from the hyperbola with 10% log-normal noise per seed, the fit's jackknife
    standard errors cover the truth. With 6 seeds the error is itself estimated (≈ 5 degrees of
    freedom), so (fit − truth)/s.e. is compared with Student's t₅: over 60 data sets the share
    within its 95% quantile (2.571) is ≥ 0.85 and within its 99% quantile (4.032) ≥ 0.95 (each
    3 binomial standard deviations below the nominal 0.95 and 0.99); and the errors are the size
    the noise implies (their median within a factor 2 of the spread of the estimates)."""
    rng = np.random.default_rng(12)
    batches = [8, 16, 32, 64, 128, 256, 512, 1024]
    s_min, b_crit = 300.0, 90.0
    z_s, z_b, est = [], [], []
    for _ in range(60):
        steps = _hyperbola_data(rng, s_min, b_crit, batches, seeds=6, sigma=0.1)
        fit = critical_batch.fit_hyperbola(batches, steps)
        assert fit["e_min"] == pytest.approx(fit["s_min"] * fit["b_crit"], rel=1e-12)
        z_s.append((math.log(fit["s_min"]) - math.log(s_min)) / fit["log_s_min_stderr"])
        z_b.append((math.log(fit["b_crit"]) - math.log(b_crit)) / fit["log_b_crit_stderr"])
        est.append((math.log(fit["b_crit"]), fit["log_b_crit_stderr"]))
        # the reported misfit is the worst relative gap to the geometric means
        g = np.exp(np.log(steps).mean(axis=0))
        want = np.max(np.abs(fit["s_min"] * (1 + fit["b_crit"] / np.asarray(batches)) / g - 1))
        assert fit["misfit"] == pytest.approx(want, rel=1e-9)
    for z in (np.abs(z_s), np.abs(z_b)):
        assert np.mean(z < 2.571) >= 0.85 and np.mean(z < 4.032) >= 0.95
    est = np.array(est)
    spread = est[:, 0].std(ddof=1)
    assert spread / 2 < np.median(est[:, 1]) < 2 * spread


def test_fit_hyperbola_exact_and_bad_input():
    b = np.array([4.0, 16.0, 64.0, 256.0])
    fit = critical_batch.fit_hyperbola(b, np.tile(50.0 * (1 + 20.0 / b), (3, 1)))
    assert fit["s_min"] == pytest.approx(50.0, rel=1e-8)
    assert fit["b_crit"] == pytest.approx(20.0, rel=1e-8)
    assert fit["b_crit_stderr"] == pytest.approx(0.0, abs=1e-6)  # identical seeds: no spread
    assert critical_batch.fit_hyperbola(b, 50.0 * (1 + 20.0 / b))["b_crit_stderr"] is None
    with pytest.raises(ValueError, match="at least three batch sizes"):
        critical_batch.fit_hyperbola(b[:2], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one seed at each batch size"):
        critical_batch.fit_hyperbola(b, [1.0, np.nan, 2.0, 3.0])
    with pytest.raises(ValueError, match="positive and finite"):
        critical_batch.fit_hyperbola(b, [1.0, -1.0, 2.0, 3.0])
    # a seed that did not reach the target is left out of that batch size's mean only
    steps = np.tile(50.0 * (1 + 20.0 / b), (3, 1)) * np.exp([[0.1], [-0.1], [0.0]])
    holed = steps.copy()
    holed[0, 1] = np.nan
    fit = critical_batch.fit_hyperbola(b, holed)
    want = np.exp(np.log(steps).mean(axis=0))
    want[1] = np.exp(np.log(steps[1:, 1]).mean())
    assert fit["steps"] == pytest.approx(want.tolist(), rel=1e-12)
    assert fit["b_crit_stderr"] is not None
    holed[1, 1] = np.nan  # leaving seed 2 out would empty B = 16: no jackknife
    assert critical_batch.fit_hyperbola(b, holed)["b_crit_stderr"] is None
    with pytest.raises(ValueError, match="steps must be"):
        critical_batch.fit_hyperbola(b, np.ones((2, 3)))


def test_best_rates_and_pooled_ratio_by_hand():
    k, s = critical_batch.best_rates([1, 2, 4], [[10, 40], [18, 20], [np.nan, 5]])
    assert k == 1 and s.tolist() == [18, 20]  # [nan, 5]: half the seeds only, not eligible
    k, s = critical_batch.best_rates([1, 2], [[10, 40, 30], [np.nan, 12, 15]])
    assert k == 1 and np.isnan(s[0]) and s[1:].tolist() == [12, 15]  # 2 of 3 reached
    assert critical_batch.best_rates([1], [[np.nan]])[0] is None
    pts = [{"a": 3.0, "a_stderr": 0.3, "b": 1.0, "b_stderr": 0.1},
           {"a": 5.0, "a_stderr": 0.4, "b": 3.0, "b_stderr": 0.2}]
    r, se = critical_batch.pooled_ratio(pts, "a", "b")
    assert r == pytest.approx(2.0)
    assert se == pytest.approx(2.0 * math.hypot(0.5 / 2 / 4, math.sqrt(0.05) / 2 / 2))
    assert [p["step"] for p in critical_batch.window_points(
        [{"step": s} for s in (0, 10, 20, 30, 40)], 19, 1)] == [10, 20, 30]


def _fake_records(ctx, pred, table):
    """Records of critical_batch runs: table {(B, k): (steps per target or None, failed)}."""
    out = []
    for (b, k), (steps, failed) in table.items():
        for r in range(ctx.config.seeds):
            job = critical_batch._job(ctx, pred, b, k, ctx.seed + r)
            out.append({"settings": job.settings, "result": {
                "failed": failed, "targets": [{"step": s, "reached": s is not None}
                                              for s in (steps or [None] * 2)]}})
    return out


def test_critical_batch_grid_extension():
    """A B whose best rate is the top (bottom) of the rates tried gets the next rate above
    (below); one where no rate reaches a target goes up unless the top rate's runs fail; no
    more than ``extend`` rates beyond each end of the initial grid."""
    import dataclasses

    args = cli.build_parser().parse_args(["critical_batch", "--preset", "smoke"])
    ctx = cli.make_context(args, critical_batch)
    ctx = dataclasses.replace(ctx, config=dataclasses.replace(
        ctx.config, batches=(8, 16, 32, 64), lr_exponents=(0, 1), extend=1))
    pred = {"eps_opt": {str(b): {"lr": 0.01 * b} for b in ctx.config.batches},
            "targets": [{"loss": 1.0}, {"loss": 0.5}]}
    table = {(8, 0): ([50, 90], False), (8, 1): ([40, 80], False),     # best at the top
             (16, 0): ([30, 60], False), (16, 1): ([35, 70], False),   # best at the bottom
             (32, 0): (None, False), (32, 1): (None, False),           # too slow: go up
             (64, 0): (None, False), (64, 1): (None, True)}            # top fails: go down
    jobs = critical_batch.follow_up(ctx, pred, _fake_records(ctx, pred, table))
    got = sorted({(j.settings["train"]["batch_size"],
                   critical_batch.exponent(pred, j.settings["train"]["batch_size"],
                                           j.settings["train"]["lr"])) for j in jobs})
    assert got == [(8, 2.0), (16, -1.0), (32, 2.0), (64, -1.0)]
    assert len(jobs) == 4 * ctx.config.seeds
    # still at the edge after one extension each side: extend = 1 stops there
    table.update({(8, 2): ([30, 70], False), (16, -1): ([20, 50], False),
                  (32, 2): (None, False), (64, -1): (None, True)})
    assert critical_batch.follow_up(ctx, pred, _fake_records(ctx, pred, table)) == []


# ---------------------------------------------------------------------------- the heat map
def test_good_range_outline_on_a_hand_made_grid():
    """An L-shaped good range on a 4 (B) × 5 (rate) grid: the mask (within 1 point of the best
    non-failing cell) and its outline, edge by edge."""
    acc = np.array([[0.50, 0.960, 0.970, 0.955, 0.10],
                    [0.50, 0.800, 0.965, 0.500, 0.10],
                    [0.40, 0.700, 0.962, 0.990, 0.10],   # 0.99 fails: not the best
                    [0.30, 0.400, 0.500, 0.300, 0.10]])
    failed = np.zeros_like(acc, dtype=bool)
    failed[2, 3] = True
    failed[:, 4] = True
    mask = stable_range.good_mask(acc, failed)
    want = np.zeros_like(failed)
    want[0, 1:4] = True          # 0.96, 0.97, 0.955 ≥ 0.97 − 0.01 (0.955 is not)
    want[0, 3] = False
    want[1, 2] = want[2, 2] = True
    assert mask.tolist() == want.tolist()
    segs = stable_range.outline_segments(mask)
    h = 0.5
    expected = sorted([
        # cell (0, 1): top, bottom, left
        ((0 - h, 1 - h), (0 - h, 1 + h)), ((0 + h, 1 - h), (0 + h, 1 + h)),
        ((0 - h, 1 - h), (0 + h, 1 - h)),
        # cell (0, 2): top, right (bottom borders (1, 2), left borders (0, 1))
        ((0 - h, 2 - h), (0 - h, 2 + h)), ((0 - h, 2 + h), (0 + h, 2 + h)),
        # cell (1, 2): left, right
        ((1 - h, 2 - h), (1 + h, 2 - h)), ((1 - h, 2 + h), (1 + h, 2 + h)),
        # cell (2, 2): bottom, left, right
        ((2 + h, 2 - h), (2 + h, 2 + h)), ((2 - h, 2 - h), (2 + h, 2 - h)),
        ((2 - h, 2 + h), (2 + h, 2 + h)),
    ])
    assert segs == expected
    # brute force: the outline's length is the mask's perimeter, 4·cells − 2·shared edges
    shared = np.sum(mask[1:] & mask[:-1]) + np.sum(mask[:, 1:] & mask[:, :-1])
    assert len(segs) == 4 * mask.sum() - 2 * shared
    assert stable_range.outline_segments(np.zeros((2, 2), dtype=bool)) == []
    assert not stable_range.good_mask(acc, np.ones_like(failed)).any()


def test_largest_working_and_rates():
    assert stable_range.largest_working([0, 0, 1, 1], [0.8, 0.9, 0.1, 0.1]) == (1, 1)
    assert stable_range.largest_working([0, 0, 0], [0.8, 0.9, 0.85]) == (1, None)
    assert stable_range.largest_working([1, 1], [0.1, 0.1]) == (None, None)
    cfg = stable_range.Config(base_rates=(2.0**-8, 2.0**-6, 2.0**-4))
    assert stable_range.rates(cfg, 0.0) == list(cfg.base_rates)
    assert stable_range.rates(cfg, 0.9) == [2.0**-11, 2.0**-9, 2.0**-7]  # 2^round(log2 0.1)
    with pytest.raises(ValueError, match="momenta"):
        stable_range.Config(momenta=(1.0,))


def test_break_point():
    bp = linear_scaling.break_point
    assert bp([8, 16, 32], [0.9, 0.895, 0.5], 0.9) == (16, 2, [])
    assert bp([8, 16, 32], [0.9, 0.9, 0.9], 0.9) == (32, None, [])       # no drop in the grid
    assert bp([8, 16, 32], [0.8, 0.9, 0.9], 0.9) == (None, 0, [16, 32])  # drops at once
    assert bp([8, 16, 32, 64], [0.9, 0.7, 0.9, 0.2], 0.9) == (8, 1, [32])


# ---------------------------------------------------------------------------- the jobs
def test_evaluation_steps_and_crossing_by_brute_force():
    steps = batch_runs.evaluation_steps(1000, ratio=1.05, dense=10, at=(333,))
    assert steps[:11] == list(range(11)) and steps[-1] == 1000 and 333 in steps
    gaps = np.array(steps[11:]) / np.array(steps[10:-1])
    assert np.all(np.diff(steps) > 0)
    assert np.all((gaps >= 1.05 - 1e-12) | np.isin(steps[11:], [333, 1000]) |
                  np.isin(steps[10:-1], [333]))
    # on a power law L = s^-1 sampled on the grid, the log-linear crossing is exact
    s = np.array(steps[1:], dtype=float)
    for target in (0.5, 0.0123, 0.002):
        assert batch_runs.crossing_step(s, 1 / s, target) == pytest.approx(1 / target, rel=1e-9)
    assert math.isnan(batch_runs.crossing_step(s, 1 / s, 1e-4))


def _tiny_data(seed=0, n=96):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, 5)) * 1.5
    y = np.arange(n) % 3
    x = (centres[y] + rng.standard_normal((n, 5))).astype(np.float32)
    yt = np.arange(30) % 3
    xt = (centres[yt] + rng.standard_normal((30, 5))).astype(np.float32)
    return data.ImageData(x, y.astype(np.int64), xt, yt.astype(np.int64), ("a", "b", "c"),
                          "tiny", tuple(x.mean(0)), tuple(x.std(0)))


def _settings(cfg, **extra):
    return {"train": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
            **extra}


def test_batch_run_curve_targets_and_early_stop_by_replay():
    """The recorded training losses equal the whole-set loss of the model at those steps
    (replayed with an independent callback), the steps to each target are the crossings of
    that curve, and ``stop`` ends the run right where the lowest target is reached, as a
    success, with the same curve up to there."""
    d = _tiny_data()
    cfg = train.make_config("digits", model="mlp", hidden=8, batch_size=8, epochs=6, lr=0.2,
                            momentum=0.0, warmup=0.0, schedule="constant", eval_batch=128)
    curve = {"ratio": 1.2, "dense": 4, "at": [17]}
    full = batch_runs.batch_run(_settings(cfg, curve=curve), d, "cpu")
    assert not full["failed"] and full["stopped_at_target"] is None
    x = train.model_inputs(d.train_images, d, "cpu")
    y = torch.from_numpy(d.train_labels)
    seen = {}

    def cb(state):
        with torch.no_grad():
            seen[state.step] = float(torch.nn.functional.cross_entropy(state.model(x), y))

    train.train(cfg, d, device="cpu", progress=False, callback=cb)
    steps = full["curve"]["steps"]
    assert steps == batch_runs.evaluation_steps(full["total_steps"], ratio=1.2, dense=4, at=[17])
    assert full["curve"]["losses"] == pytest.approx([seen[s] for s in steps], rel=1e-5)
    assert full["curve"]["losses"][0] == pytest.approx(full["initial_train_loss"], rel=1e-6)
    losses = np.array(full["curve"]["losses"])
    targets = [float(losses[3] * 0.9), float(losses[len(losses) // 2])]
    stopped = batch_runs.batch_run(_settings(cfg, curve={**curve, "targets": targets,
                                                         "stop": True}), d, "cpu")
    assert not stopped["failed"] and stopped["failure"] is None
    last = stopped["stopped_at_target"]
    first_below = next(s for s, v in zip(steps, losses, strict=True) if v <= min(targets))
    assert last == first_below == stopped["steps"] < full["total_steps"]
    assert stopped["curve"]["losses"] == full["curve"]["losses"][:len(stopped["curve"]["steps"])]
    for t, rec in zip(sorted(targets, reverse=True), stopped["targets"], strict=True):
        assert rec["target"] == t and rec["reached"]
        assert rec["step"] == pytest.approx(batch_runs.crossing_step(steps, losses, t))
        assert rec["examples"] == pytest.approx(rec["step"] * 8)


def _exact_hessian_eigs(model, x, y):
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params]).double()

    def loss(v):
        out, i = {}, 0
        for n, p in zip(names, params, strict=True):
            out[n] = v[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
        return torch.nn.functional.cross_entropy(
            torch.func.functional_call(model.double(), out, (x.double(),)), y)

    h = torch.autograd.functional.hessian(loss, flat)
    model.float()
    return np.linalg.eigvalsh(h.numpy())


def test_final_sharpness_equals_the_exact_hessian():
    """λ_max and tr(H) of the final model, measured by the job, against the eigenvalues of the
    exact full Hessian (float64) of the same trained model; λ_max to Lanczos precision, tr(H)
    within 4 of its reported standard errors."""
    d = _tiny_data(3)
    cfg = train.make_config("digits", model="mlp", hidden=4, batch_size=16, epochs=3, lr=0.3,
                            momentum=0.9, warmup=0.1, eval_batch=128)
    spec = {"hessian_batch": None, "hessian_reps": 1, "lanczos_iters": 60, "hutchinson": 30}
    res = batch_runs.batch_run(_settings(cfg, sharpness=spec), d, "cpu")
    sh = res["sharpness"]
    assert sh["step"] == res["total_steps"] and sh["hessian_whole_subset"]
    model = train.train(cfg, d, device="cpu", progress=False)["model"]
    ev = _exact_hessian_eigs(model, train.model_inputs(d.train_images, d, "cpu"),
                             torch.from_numpy(d.train_labels))
    assert sh["lambda_max"] == pytest.approx(ev[-1], rel=1e-4)
    assert sh["lambda_max_stderr"] == 0.0
    assert abs(sh["trace_h"] - ev.sum()) <= 4 * sh["trace_h_stderr"] + 1e-6 * abs(ev.sum())
    assert res["dim"] == ev.size


# ---------------------------------------------------------------------------- the runner
def test_sweep_jobs_and_follow_up_stages(tmp_path):
    """run_experiment passes the predictions to a ``jobs(ctx, predictions)`` and runs the
    stages ``follow_up`` returns until it returns none; the CLI's grid check calls ``jobs``
    with no predictions."""
    import types

    calls = []

    def jobs(ctx, predictions=None):
        calls.append(("jobs", predictions))
        if predictions is None:
            return []
        return [runner.Job("math:fsum", {}, "never")][:0]

    mod = types.SimpleNamespace(jobs=jobs)
    assert base.sweep_jobs(mod, None, {"x": 1}) == [] and calls[-1] == ("jobs", {"x": 1})
    assert base.sweep_jobs(types.SimpleNamespace(jobs=lambda ctx: ["old"]), None, {}) == ["old"]
    args = cli.build_parser().parse_args(["linear_scaling", "--preset", "smoke"])
    ctx = cli.make_context(args, linear_scaling)
    first = linear_scaling.jobs(ctx)
    cfg = ctx.config
    assert len(first) == len(cfg.base_rates) * cfg.seeds
    fake = [{"settings": j.settings, "result": {"failed": False, "test_acc": 0.5 + 0.1 * i,
                                                "test_loss": 1.0}}
            for i, j in enumerate(first)]
    stage2 = linear_scaling.follow_up(ctx, {}, fake)
    eta0 = cfg.base_rates[-1]  # the most accurate in the fake scan
    assert len(stage2) == len(cfg.batches) * 2 * cfg.seeds
    assert [j.settings["train"]["lr"] / j.settings["train"]["batch_size"] for j in stage2] == \
        pytest.approx([eta0] * len(stage2))
    assert {j.settings["train"]["warmup"] for j in stage2} == {cfg.warmup, 0.0}
    # the B₀ runs with warm-up are stage 1's (same settings, so the same stored result)
    assert [j.settings for j in stage2 if j.settings["train"]["batch_size"] == cfg.batches[0]
            and j.settings["train"]["warmup"] == cfg.warmup] == [first[-1].settings]
    assert linear_scaling.follow_up(ctx, {}, fake + [{}]) == []


@pytest.mark.parametrize("name", ["critical_batch", "stable_range", "linear_scaling"])
def test_presets_and_cifar_forwarding(name, capsys):
    mod = load(name)
    assert name in EXPERIMENTS and mod.NAME == name
    assert set(mod.PRESETS) == {"smoke", "quick", "default", "paper"}
    from validate import cifar

    with pytest.raises(SystemExit):
        cifar.main([name, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "usage: python -m validate.cifar" in text and "default: cifar10" in text


@pytest.mark.parametrize(("name", "config"), [
    ("critical_batch", {"batches": (8, 8, 16)}),
    ("critical_batch", {"fractions": (0.5, 1.5)}),
    ("critical_batch", {"seeds": 0}),
    ("stable_range", {"base_rates": (1.0,)}),
    ("stable_range", {"seeds": 1.5}),
    ("linear_scaling", {"warmup": 0.0}),
    ("linear_scaling", {"batches": (8, 16)}),
])
def test_bad_configs_are_refused(name, config):
    with pytest.raises(ValueError, match=next(iter(config))):
        load(name).Config(**config)


@pytest.mark.parametrize("name", ["critical_batch", "stable_range", "linear_scaling"])
def test_batches_beyond_the_training_set_are_one_line_and_status_2(name, tmp_path, capsys):
    """A grid with batch sizes larger than the training split (50 examples here) is refused
    before any run: exit status 2, one line naming the experiment and exactly those sizes."""
    d = data.load_digits_data()
    path = tmp_path / "small.npz"
    np.savez(path, x_train=(d.train_images[:50, 0] * 255).astype(np.uint8),
             y_train=d.train_labels[:50], x_test=(d.test_images[:40, 0] * 255).astype(np.uint8),
             y_test=d.test_labels[:40])
    big = [b for b in load(name).PRESETS["smoke"].batches if b > 50]
    assert big  # the smoke grids reach past 50 examples
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--data", str(path), "--preset", "smoke", "--device", "cpu",
                  "--out", str(tmp_path / "never")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert f"{name}: batch sizes {big} exceed the 50 training examples" in lines[0]
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run of each experiment on digits (one worker)."""
    out = {}
    for name in ("critical_batch", "stable_range", "linear_scaling"):
        path = tmp_path_factory.mktemp(name)
        t0 = time.perf_counter()
        proc = _cli(name, "--preset", "smoke", "--device", "cpu", "--out", str(path),
                    "--workers", "1")
        out[name] = (path, proc, time.perf_counter() - t0)
    return out


def _common(rep, proc, name):
    assert (proc.returncode == 0) == rep["all_passed"]
    assert rep["experiment"] == name and rep["data"]["source"] == "digits"
    assert rep["model"] == {"name": "SmallCNN", "parameters": 1898}
    for c in rep["checks"]:
        assert set(c) >= {"name", "predicted", "measured", "rule", "pass"}
        assert isinstance(c["pass"], bool)


@pytest.mark.slow
def test_smoke_critical_batch_end_to_end(smoke):
    out, proc, seconds = smoke["critical_batch"]
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert seconds < 150  # ≤ 30 s of compute on an idle 2-core machine; headroom for load
    rep = _strict(out / "critical_batch.json")
    _common(rep, proc, "critical_batch")
    assert (out / "critical_batch.png").stat().st_size > 10_000
    cfg = critical_batch.PRESETS["smoke"]
    p = rep["predictions"]
    ref = rep["reference"]["result"]
    grid = rep["analysis"]["grid"]
    assert len(rep["runs"]) == sum(len(grid[str(b)]["exponents"]) for b in cfg.batches) * \
        cfg.seeds
    for b in cfg.batches:  # the initial grid, extended by at most ``extend`` each side
        ks = grid[str(b)]["exponents"]
        assert set(cfg.lr_exponents) <= set(ks) and ks == sorted(ks)
        assert min(cfg.lr_exponents) - cfg.extend <= ks[0] and \
            ks[-1] <= max(cfg.lr_exponents) + cfg.extend
    # the targets are the reference run's training loss at the fractions of its budget
    loss_at = dict(zip(ref["curve"]["steps"], ref["curve"]["losses"], strict=True))
    for q, t in zip(cfg.fractions, p["targets"], strict=True):
        assert t["step"] == round(q * ref["total_steps"]) and t["loss"] == loss_at[t["step"]]
        assert t["b_simple"] > 0 and t["b_simple_stderr"] >= 0 and t["b_noise"] is not None
    for b in cfg.batches:  # the lr grid is ε_opt(B)·2^k
        lr = p["eps_opt"][str(b)]["lr"]
        assert p["lr_grid"][str(b)] == pytest.approx([lr * 2.0**k for k in cfg.lr_exponents])
    names = [c["name"] for c in rep["checks"]]
    assert sum(n.startswith("data on the hyperbola") for n in names) == len(cfg.fractions)
    assert "B_crit grows as the target loss falls" in names
    assert sum(n.startswith("B_crit vs B_simple") for n in names) == len(cfg.fractions)
    fits = [f["fit"] for f in rep["analysis"]["fits"]]
    assert all(f and f["b_crit"] > 0 and f["s_min"] > 0 for f in fits)
    # the runs that reached a target stopped there and record the steps to each target
    for r in rep["runs"]:
        if r["stopped_at_target"] is not None:
            assert not r["failed"] and all(s is not None for s in r["steps_to_target"])
    assert any("tracks the fitted B_crit better" in f for f in rep["findings"])


@pytest.mark.slow
def test_smoke_stable_range_end_to_end(smoke):
    out, proc, seconds = smoke["stable_range"]
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert seconds < 150
    rep = _strict(out / "stable_range.json")
    _common(rep, proc, "stable_range")
    cfg = stable_range.PRESETS["smoke"]
    assert len(rep["runs"]) == len(cfg.batches) * len(cfg.base_rates) * len(cfg.momenta) * \
        cfg.seeds
    for m in cfg.momenta:
        panel = rep["analysis"]["panels"][f"{m:g}"]
        acc = np.asarray(panel["acc"], dtype=float)
        assert acc.shape == (len(cfg.batches), len(cfg.base_rates))
        assert np.all((acc >= 0) & (acc <= 1))
        good = np.asarray(panel["good"])
        assert good.any()
        assert [tuple(map(tuple, s)) for s in panel["outline"]] == \
            stable_range.outline_segments(good)
        for i, j in enumerate(panel["best_index"]):
            if j is not None:
                assert panel["best_rate"][i] == pytest.approx(panel["rates"][j])
        pred = rep["predictions"]["momenta"][f"{m:g}"]["batches"]
        assert all(pred[str(b)]["base_rate"] > 0 for b in cfg.batches)
    # every run that reached the end carries its final sharpness
    for r in rep["runs"]:
        if not r["failed"]:
            assert r["lambda_max"] > 0 and math.isfinite(r["trace_h"])
    assert sum("large batches end sharper" in c["name"] for c in rep["checks"]) == 2
    assert any("equal base rate" in f and "equal lr" in f for f in rep["findings"])


@pytest.mark.slow
def test_smoke_linear_scaling_end_to_end(smoke):
    out, proc, seconds = smoke["linear_scaling"]
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert seconds < 150
    rep = _strict(out / "linear_scaling.json")
    _common(rep, proc, "linear_scaling")
    cfg = linear_scaling.PRESETS["smoke"]
    a = rep["analysis"]
    n1 = len(cfg.base_rates) * cfg.seeds
    n2 = len(cfg.batches) * 2 * cfg.seeds
    assert len(rep["runs"]) == n1 + n2
    # stage 2 scales the base rate stage 1 found best at the smallest batch
    scan = {float(e): v for e, v in a["scan"].items()}
    assert a["base_rate"] == max(scan, key=lambda e: (scan[e][0], -scan[e][1]))
    for r in rep["runs"][n1:]:
        assert r["lr"] == pytest.approx(a["base_rate"] * r["batch_size"])
    assert rep["timing"]["runs_cached"] >= cfg.seeds  # B₀ with warm-up reused from stage 1
    assert a["binds"] in ("B_noise", "curvature limit")
    assert a["b_curv"] == pytest.approx(rep["predictions"]["curvature_limit"]["lr"] /
                                        a["base_rate"])


@pytest.mark.slow
def test_resume_after_kill_gives_the_uninterrupted_results(smoke, tmp_path):
    """Kill critical_batch's smoke run (SIGKILL) once the reference and a few sweep runs are
    stored, rerun the same command: the per-run results, the predictions and the checks equal
    the uninterrupted run's (made by one worker in its own process: the pool's results are
    the same bit for bit), and the stored runs are not recomputed. Two workers: with one, the
    runner computes a stage's runs inside ``submit`` and writes them only once all are done."""
    ref_out = smoke["critical_batch"][0]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "validate.experiments", "critical_batch", "--preset", "smoke",
           "--device", "cpu", "--out", str(out), "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    k = 3
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "runs").glob("*.json"))) >= k:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    stored = len(list((out / "runs").glob("*.json")))
    total = len(_results(ref_out))
    assert k <= stored < total, "the run was not interrupted mid-way"
    assert not (out / "critical_batch.json").exists()
    again = _cli("critical_batch", "--preset", "smoke", "--device", "cpu", "--out", str(out),
                 "--workers", "2")
    assert again.returncode in (0, 1), again.stderr[-2000:]
    rep, want = _strict(out / "critical_batch.json"), _strict(ref_out / "critical_batch.json")
    assert rep["timing"]["runs_cached"] == stored
    assert _results(out) == _results(ref_out)
    assert rep["predictions"] == want["predictions"]
    assert rep["runs"] == want["runs"] and rep["checks"] == want["checks"]


@pytest.mark.slow
def test_dask_local_cluster_equals_local_pool(tmp_path):
    """Jobs of the three experiments (a run to target losses that stops early, one with the
    final sharpness, a scan run) on a Dask LocalCluster with two worker processes give results
    bit-identical to the local process pool's."""
    distributed = pytest.importorskip("dask.distributed")
    args = cli.build_parser().parse_args(["stable_range", "--preset", "smoke", "--device",
                                          "cpu"])
    ctx = cli.make_context(args, stable_range)
    sharp = stable_range.jobs(ctx)[1]
    args = cli.build_parser().parse_args(["linear_scaling", "--preset", "smoke", "--device",
                                          "cpu"])
    lctx = cli.make_context(args, linear_scaling)
    scan = linear_scaling.jobs(lctx)[0]
    target = runner.Job(batch_runs.JOB, batch_runs.job_settings(
        train=ctx.train_settings(lr=0.25, batch_size=64, seed=0, schedule="constant",
                                 warmup=0.0, epochs=6),
        curve={"ratio": 1.1, "dense": 5, "targets": [1.0, 0.5], "stop": True}), "target")
    jobs = [target, sharp, scan]
    common = {"spec": ctx.data, "identity": ctx.identity, "device_type": "cpu",
              "progress": False}
    with runner.make_executor("local", 2) as (pool, _):
        a = runner.run_jobs(jobs, executor=pool, out=tmp_path / "pool", **common)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        spec = "dask://" + cluster.scheduler_address.removeprefix("tcp://")
        with runner.make_executor(spec) as (ex, where):
            assert "(2 workers)" in where
            b = runner.run_jobs(jobs, executor=ex, out=tmp_path / "dask", **common)
    assert [r["result"] for r in a] == [r["result"] for r in b]  # floats: bit for bit
    assert a[0]["result"]["stopped_at_target"] is not None
    assert a[1]["result"]["sharpness"]["lambda_max"] > 0
    pids = {r["timing"]["pid"] for r in a + b}
    assert os.getpid() not in pids and len(pids) >= 2
