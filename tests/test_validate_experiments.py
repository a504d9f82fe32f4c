"""python -m validate.experiments: smoke runs end to end, per-run resume after a kill, the Dask
path against the local pool, .npz data, and the predictions against brute force."""

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from dense_hessian import dense_hessian
from experiment_cli import ENV, ROOT, run_cli, run_results, strict_json  # noqa: F401

from validate import data, train
from validate.experiments import base, cli, lr_sweep, memory, predict, recipes, runner, runs

_strict, _results = strict_json, run_results


_cli = run_cli


def _numbers(x):
    """Every number in a nested structure."""
    if isinstance(x, dict):
        return [v for y in x.values() for v in _numbers(y)]
    if isinstance(x, list):
        return [v for y in x for v in _numbers(y)]
    return [x] if isinstance(x, (int, float)) and not isinstance(x, bool) else []


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    """One uninterrupted smoke lr_sweep on digits (one worker: this is the reference result
    the resume and Dask tests compare with)."""
    out = tmp_path_factory.mktemp("sweep")
    t0 = time.perf_counter()
    proc = _cli("lr_sweep", "--preset", "smoke", "--device", "cpu", "--out", str(out),
                "--workers", "1")
    seconds = time.perf_counter() - t0
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return out, proc, seconds


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smoke_lr_sweep_end_to_end(smoke_sweep):
    out, proc, seconds = smoke_sweep
    assert seconds < 120  # 19-25 s measured on the idle 2-core machine; headroom for a loaded box
    rep = _strict(out / "lr_sweep.json")
    assert (out / "lr_sweep.png").stat().st_size > 10_000
    for key in ("config", "recipe", "data", "model", "torch", "device", "seed", "reference",
                "predictions", "runs", "checks", "findings", "analysis", "all_passed"):
        assert key in rep, key
    assert rep["data"]["source"] == "digits" and rep["data"]["train_examples"] == 1437
    assert rep["model"] == {"name": "SmallCNN", "parameters": 1898}
    assert rep["torch"] == torch.__version__ and rep["device"] == "cpu"
    cfg = lr_sweep.PRESETS["smoke"]
    assert len(rep["runs"]) == len(cfg.factors) * cfg.n_sizes * 2 * cfg.seeds
    assert len(list((out / "runs").glob("*.json"))) == len(rep["runs"]) + 1  # + the reference
    for c in rep["checks"]:
        assert set(c) >= {"name", "predicted", "measured", "rule", "pass"}
        assert isinstance(c["pass"], bool)
    assert (proc.returncode == 0) == rep["all_passed"]
    meas = rep["reference"]["result"]["measurements"]
    assert len(meas) == rep["recipe"]["measure"]["points"] == 3
    for m in meas:
        for k in ("lambda_max", "trace_h", "grad_sq", "tr_sigma", "g_h_g", "tr_h_sigma"):
            assert m[k] is not None and math.isfinite(m[k]), k
        assert m["lambda_max"] > 0 and m["tr_sigma"] > 0 and m["hessian_whole_subset"]
    p = rep["predictions"]
    lam = max(m["lambda_max"] for m in meas)
    assert p["curvature_limit"]["lr"] == pytest.approx(2.0 / lam, rel=1e-12)  # μ = 0 on digits
    for b in rep["recipe"]["batches"]:
        assert 0 < p["noise_limit"][str(b)]["lr"] <= p["curvature_limit"]["lr"] * (1 + 1e-9)
    assert all(math.isfinite(v) for v in _numbers(p))
    assert "curvature limit" in proc.stdout and "failure factor the same" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rerun_uses_stored_runs_and_force_recomputes(smoke_sweep, tmp_path):
    out, _, _ = smoke_sweep
    before = _results(out)
    first = _strict(out / "lr_sweep.json")
    proc = _cli("lr_sweep", "--preset", "smoke", "--device", "cpu", "--out", str(out),
                "--workers", "1")
    assert proc.returncode in (0, 1)
    rep = _strict(out / "lr_sweep.json")
    assert rep["timing"]["runs_computed"] == 0
    assert rep["timing"]["runs_cached"] == len(before)
    assert rep["runs"] == first["runs"] and rep["checks"] == first["checks"]
    assert _results(out) == before
    # force: the stored run is computed again (same numbers), not read back
    args = cli.build_parser().parse_args(["lr_sweep", "--preset", "smoke", "--device", "cpu"])
    ctx = cli.make_context(args, lr_sweep)
    job = lr_sweep.jobs(ctx)[-1]
    common = {"spec": ctx.data, "identity": ctx.identity, "device_type": "cpu", "out": out,
              "progress": False}
    (cached,) = runner.run_jobs([job], **common)
    (again,) = runner.run_jobs([job], force=True, **common)
    assert cached["cached"] and not again["cached"]
    assert again["result"] == cached["result"] == before[cached["key"]]


@pytest.mark.slow
@pytest.mark.timeout(900)  # two CLI runs; minutes when the machine is loaded
def test_resume_after_kill_gives_the_uninterrupted_results(smoke_sweep, tmp_path):
    """Kill the sweep (SIGKILL) once k runs are stored, rerun: the same per-run results and the
    same report as the uninterrupted sweep, and the k runs are not computed again."""
    ref_out, _, _ = smoke_sweep
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "validate.experiments", "lr_sweep", "--preset", "smoke",
           "--device", "cpu", "--out", str(out), "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    k = 2  # the reference run and the first run of the sweep (a smoke run takes ~0.1-0.3 s)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "runs").glob("*.json"))) >= k:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    stored = len(list((out / "runs").glob("*.json")))
    assert k <= stored < 17, "the sweep was not interrupted mid-way"
    assert not (out / "lr_sweep.json").exists()
    again = _cli("lr_sweep", "--preset", "smoke", "--device", "cpu", "--out", str(out),
                 "--workers", "1")
    assert again.returncode in (0, 1), again.stderr[-2000:]
    rep, want = _strict(out / "lr_sweep.json"), _strict(ref_out / "lr_sweep.json")
    assert rep["timing"]["runs_cached"] == stored
    assert _results(out) == _results(ref_out)
    assert rep["runs"] == want["runs"] and rep["checks"] == want["checks"]
    assert rep["predictions"] == want["predictions"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dask_local_cluster_equals_local_pool(tmp_path):
    """Jobs of the smoke sweep (the reference run, a training run that works and one that
    fails) on a Dask LocalCluster with two worker processes, through ``--executor
    dask://HOST:PORT``'s executor, give results bit-identical to the local process pool's."""
    distributed = pytest.importorskip("dask.distributed")
    args = cli.build_parser().parse_args(["lr_sweep", "--preset", "smoke", "--device", "cpu"])
    ctx = cli.make_context(args, lr_sweep)
    sweep = lr_sweep.jobs(ctx)
    jobs = [lr_sweep.reference_job(ctx), sweep[0], sweep[len(sweep) // 2 - 1]]
    common = {"spec": ctx.data, "identity": ctx.identity, "device_type": "cpu",
              "progress": False}
    with runner.make_executor("local", 2) as (pool, where):
        assert where == "local pool of 2 processes"
        a = runner.run_jobs(jobs, executor=pool, out=tmp_path / "pool", **common)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        spec = "dask://" + cluster.scheduler_address.removeprefix("tcp://")
        with runner.make_executor(spec) as (ex, where):
            assert where.startswith("dask tcp://") and "(2 workers)" in where
            b = runner.run_jobs(jobs, executor=ex, out=tmp_path / "dask", **common)
    assert [r["key"] for r in a] == [r["key"] for r in b]
    assert [r["result"] for r in a] == [r["result"] for r in b]  # floats: bit for bit
    assert a[2]["result"]["failed"] and not a[1]["result"]["failed"]
    pids = {r["timing"]["pid"] for r in a + b}
    assert os.getpid() not in pids and len(pids) >= 2  # computed in worker processes
    assert _results(tmp_path / "dask") == _results(tmp_path / "pool")


@pytest.mark.slow
def test_smoke_memory_end_to_end(tmp_path):
    out = tmp_path / "mem"
    t0 = time.perf_counter()
    proc = _cli("memory", "--preset", "smoke", "--device", "cpu", "--out", str(out),
                "--workers", "1")
    assert time.perf_counter() - t0 < 120
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    rep = _strict(out / "memory.json")
    assert (out / "memory.png").stat().st_size > 10_000
    a = rep["analysis"]
    cfg = memory.PRESETS["smoke"]
    for name in ("high", "low"):
        c = a["curves"][name]
        assert c["probes"] == cfg.probes * cfg.seeds
        assert len(c["mean"]) == a["plan"]["track"]
        assert all(v is not None and math.isfinite(v) for v in c["mean"])
    assert [c["name"] for c in rep["checks"]][:2] == [
        "high rate: gap below 10% of its first value within one epoch",
        "memory time scales with 1/lr (low/high rate)"]
    r = rep["predictions"]["rates"]
    assert r["low"]["memory_time_steps"] == pytest.approx(8 * r["high"]["memory_time_steps"])


# ---------------------------------------------------------------------------- .npz data
def _digits_npz(path, *, n_train=600):
    d = data.load_digits_data()
    np.savez(path, x_train=(d.train_images[:n_train, 0] * 255).astype(np.uint8),
             y_train=d.train_labels[:n_train], x_test=(d.test_images[:, 0] * 255).astype(
                 np.uint8), y_test=d.test_labels)
    return path


@pytest.mark.slow
def test_npz_data_round_trip_through_the_cli(tmp_path):
    path = _digits_npz(tmp_path / "mine.npz")
    out = tmp_path / "npz"
    proc = _cli("lr_sweep", "--data", str(path), "--preset", "smoke", "--device", "cpu",
                "--out", str(out), "--workers", "1")
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    rep = _strict(out / "lr_sweep.json")
    want = data.data_identity(data.load_npz(path))
    assert {k: rep["data"][k] for k in want} == want
    assert rep["data"]["train_examples"] == 600 and rep["data"]["input_shape"] == [1, 8, 8]
    assert rep["model"]["name"] == "SmallCNN" and rep["recipe"]["name"] == "npz"
    assert rep["analysis"]["sizes"] == [600, 300]
    # the default output folder is named after the file
    assert cli._data_name(str(path)) == "mine"


@pytest.mark.parametrize(("argv", "match"), [
    (["lr_sweep", "--workers", "0"], "argument --workers: must be an integer ≥ 1, got 0"),
    (["lr_sweep", "--seed", "-2"], "argument --seed: must be an integer ≥ 0, got -2"),
    (["lr_sweep", "--executor", "dask://nohost"], "argument --executor: must be 'local' or"),
    (["lr_sweep", "--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["nothing"], "invalid choice: 'nothing'"),
    ([], "the experiment is required"),
    (["lr_sweep", "--data", "mnist"], "data must be one of digits, synthetic, cifar10"),
    (["lr_sweep", "--device", "tpu"], "device must be cpu, cuda or cuda:N"),
])
def test_bad_usage_is_one_line_and_status_2(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--out", str(tmp_path / "never")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and match in lines[-1], err
    assert len([ln for ln in lines if "error" in ln]) == 1
    assert not (tmp_path / "never").exists()


def test_malformed_npz_through_the_cli(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((4, 8, 8)), y_train=np.array([0, 1, 2]),
             x_test=np.zeros((2, 8, 8)), y_test=np.array([0, 1]))
    with pytest.raises(SystemExit) as e:
        cli.main(["lr_sweep", "--data", str(path), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "y_train has 3 labels but x_train has 4 examples" in err


def test_list_and_help(capsys):
    assert cli.main(["--list"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("lr_sweep") and "memory" in text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for s in ("MEAN minibatch gradient", "per example", "η = f·η̃₀·B", "dask://HOST:PORT",
              "exit status: 0 all checks pass, 1", "smoke: factors=(0.25, 1, 4, 16)",
              "runs/<hash>.json"):
        assert s in text, s


def test_cifar_cli_forwards_the_experiments(capsys):
    assert cli.main  # the same main, with CIFAR-10 defaults
    from validate import cifar

    with pytest.raises(SystemExit):
        cifar.main(["lr_sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "usage: python -m validate.cifar" in text and "default: cifar10" in text
    assert "default: paper" in text


# ---------------------------------------------------------------------------- brute force
def _tiny_data(seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, 5)) * 1.5
    y = np.arange(96) % 3
    x = (centres[y] + rng.standard_normal((96, 5))).astype(np.float32)
    yt = np.arange(30) % 3
    xt = (centres[yt] + rng.standard_normal((30, 5))).astype(np.float32)
    return data.ImageData(x, y.astype(np.int64), xt, yt.astype(np.int64), ("a", "b", "c"),
                          "tiny", tuple(x.mean(0)), tuple(x.std(0)))


def _exact_hessian(model, x, y):
    return dense_hessian(model, x, y, float64=True).numpy()


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.5, True)])
def test_predicted_curvature_limit_equals_exact_hessian(momentum, nesterov):
    """The reference run's λ_max (Lanczos on HVPs of the whole training subset) and the
    predicted curvature limit 2(1+μ)/λ_max [/(1+2μ) with Nesterov] equal those of the exact
    full Hessian (torch.autograd.functional.hessian, float64) of the same tiny MLP at the
    measured points; tr(H) agrees within the Hutch++ standard error."""
    d = _tiny_data()
    cfg = train.make_config("digits", model="mlp", hidden=4, batch_size=16, epochs=2, lr=0.3,
                            momentum=momentum, nesterov=nesterov, warmup=0.0,
                            schedule="constant", eval_batch=128)
    measure = dict(vars(recipes.MeasureConfig(points=2, measure_batch=32, micro_batch=4,
                                              top_k=4, lanczos_iters=200, hutchinson=40)))
    settings = {"train": {k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in vars(cfg).items()}, "measure": measure}
    ref = runs.reference_run(settings, d, "cpu")
    assert [m["step"] for m in ref["measurements"]] == [0, 12]
    # the models at those steps: rebuilt from the seed, and trained again (deterministic)
    x = train.model_inputs(d.train_images, d, "cpu")
    y = torch.from_numpy(d.train_labels)
    torch.manual_seed(0)
    init = train.build(cfg, d, torch.device("cpu"))
    final = train.train(cfg, d, device="cpu", progress=False)["model"]
    exact = []
    for m, model in zip(ref["measurements"], (init, final), strict=True):
        ev = np.linalg.eigvalsh(_exact_hessian(model, x, y))
        exact.append(ev[-1])
        assert m["lambda_top"] == pytest.approx(ev[::-1][:4], rel=2e-4, abs=1e-6)
        assert abs(m["trace_h"] - ev.sum()) <= 4 * m["trace_h_stderr"] + 1e-5 * abs(ev.sum())
        assert m["lambda_max_stderr"] == 0.0 and m["hessian_whole_subset"]
    lam = max(exact)
    want = 2 * (1 + momentum) / lam / ((1 + 2 * momentum) if nesterov else 1.0)
    got, _ = predict.curvature_limit(predict.largest_lambda(ref["measurements"])["lambda_max"],
                                     momentum, nesterov)
    assert got == pytest.approx(want, rel=2e-4)


def test_spectrum_and_noise_limit_match_the_expanded_spectrum():
    """The noise-aware limit on (top eigenvalues, trace spread over the rest) equals the
    theory's limit on the explicit p-entry spectrum; its error propagates λ_max and tr(H)."""
    from sgdtheory import theory

    top, trace, dim = [9.0, 4.0, 2.5], 20.0, 40
    eigs, counts, note = predict.spectrum(top, trace, dim)
    assert note is None
    assert eigs.tolist() == pytest.approx([9.0, 4.0, 2.5, 4.5 / 37]) and counts.tolist() == [
        1, 1, 1, 37]
    full = np.repeat(eigs, counts.astype(int))
    assert full.sum() == pytest.approx(trace) and full.size == dim
    for mu, nest in ((0.0, False), (0.9, False), (0.9, True)):
        for b in (1, 8, 512):
            got, se, _ = predict.noise_limit(top, trace, dim, b, mu, nest, top_stderr=0.1,
                                             trace_stderr=1.0)
            want = float(theory.linreg_stability_limit(full, b, momentum=mu, nesterov=nest))
            assert got == pytest.approx(want, rel=1e-9)
            # the standard error: central differences of the same limit
            d_top = (float(theory.linreg_stability_limit(
                np.repeat([9.05, 4.0, 2.5, 4.45 / 37], counts.astype(int)), b, momentum=mu,
                nesterov=nest)) - float(theory.linreg_stability_limit(
                    np.repeat([8.95, 4.0, 2.5, 4.55 / 37], counts.astype(int)), b,
                    momentum=mu, nesterov=nest))) / 0.1
            d_tr = (float(theory.linreg_stability_limit(
                np.repeat([9.0, 4.0, 2.5, 5.0 / 37], counts.astype(int)), b, momentum=mu,
                nesterov=nest)) - float(theory.linreg_stability_limit(
                    np.repeat([9.0, 4.0, 2.5, 4.0 / 37], counts.astype(int)), b,
                    momentum=mu, nesterov=nest))) / 1.0
            assert se == pytest.approx(math.hypot(0.1 * d_top, 1.0 * d_tr), rel=1e-6)
    # a trace below the top eigenvalues' sum (negative eigenvalues): the top alone, said so
    eigs, counts, note = predict.spectrum(top, 10.0, dim, trace_se=0.5)
    assert eigs.tolist() == top and "negative eigenvalues" in note
    with pytest.raises(ValueError, match="no positive"):
        predict.spectrum([-1.0], 1.0, 3)


def test_lambda_sigma_memory_time_and_forgetting_limit():
    pts = [{"step": s, "tr_h_sigma": a, "tr_sigma": b, "tr_h_sigma_stderr": 0.1,
            "tr_sigma_stderr": 0.2} for s, a, b in ((0, 50.0, 1.0), (10, 6.0, 2.0),
                                                    (20, 10.0, 4.0))]
    lam, se = predict.lambda_sigma(pts)
    assert lam == pytest.approx(16.0 / 6.0)  # the second half: steps 10 and 20
    assert se == pytest.approx(lam * math.hypot(math.sqrt(0.02) / 2 / 8, math.sqrt(0.08) / 2 / 3))
    # memory time (1−μ)/(ηλ) steps and the forgetting limit (1−μ)/(Nλ): at that base rate the
    # memory time is one epoch of N examples (N/B steps) for any B
    for mu in (0.0, 0.9):
        base = predict.forgetting_limit(1000, lam, mu)
        for b in (8, 32):
            assert predict.memory_time(base * b, lam, mu) == pytest.approx(1000 / b)


def test_memory_run_gaps_by_hand():
    """The gap after the probe step equals the loss changes computed by hand from snapshots of
    the same (deterministic) training run with the probe batch in place."""
    d = _tiny_data(1)
    cfg = train.make_config("digits", model="mlp", hidden=6, batch_size=8, epochs=2, lr=0.5,
                            momentum=0.0, warmup=0.0, schedule="constant", eval_batch=128)
    tr = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}
    settings = {"train": tr, "memory": {"probes": 2, "start": 3, "every": 2, "track": 3,
                                        "unseen": None}}
    res = runs.memory_run(settings, d, "cpu")
    plan = runs.memory_plan(settings, 96)
    assert plan["probe_steps"] == [3, 5] and plan["hold"].size == 16
    assert np.intersect1d(plan["hold"], plan["rest"]).size == 0
    assert np.union1d(plan["hold"], plan["rest"]).size == 96
    # replay: the same training with the same hook, snapshotting the model at every step
    import dataclasses

    rest = dataclasses.replace(d, train_images=d.train_images[plan["rest"]],
                               train_labels=d.train_labels[plan["rest"]])
    hx = train.model_inputs(d.train_images[plan["hold"]], d, "cpu")
    hy = torch.from_numpy(d.train_labels[plan["hold"]])
    ux = train.model_inputs(d.test_images, d, "cpu")
    uy = torch.from_numpy(d.test_labels)
    seen_probe = []

    def hook(step, x, y):
        j = {3: 0, 5: 1}.get(step)
        if j is None:
            return x, y
        seen_probe.append(step)
        return hx[8 * j:8 * j + 8], hy[8 * j:8 * j + 8]

    snaps = {}

    def cb(state):
        with torch.no_grad():
            m = state.model
            snaps[state.step] = [float(torch.nn.functional.cross_entropy(m(hx[8 * j:8 * j + 8]),
                                                                          hy[8 * j:8 * j + 8]))
                                 for j in range(2)] + [
                float(torch.nn.functional.cross_entropy(m(ux), uy))]

    train.train(cfg, rest, device="cpu", progress=False, callback=cb, batch_hook=hook)
    assert seen_probe == [3, 5]  # each probe trained on exactly once
    for j, s in enumerate((3, 5)):
        for k in (1, 2, 3):
            want = -((snaps[s + k][j] - snaps[s][j]) - (snaps[s + k][2] - snaps[s][2]))
            assert res["gaps"][j][k - 1] == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_crossing_and_failure_factor():
    assert memory.crossing([1.0, 0.5, 0.2], 0.35) == pytest.approx(2.5)
    assert memory.crossing([1.0, 0.5], 0.1) != memory.crossing([1.0, 0.5], 0.1)  # nan
    f = np.array([0.25, 0.5, 1, 2, 4])
    # under-training at the bottom of the grid does not count: the first failure above the
    # best working factor does
    frac = np.array([1.0, 0.0, 0.0, 1.0, 1.0])
    loss = np.array([np.nan, 0.5, 0.3, np.nan, np.nan])
    assert lr_sweep.failure_factor(f, frac, loss) == 2
    assert lr_sweep.failure_factor(f, np.ones(5), loss) is None
    assert lr_sweep.failure_factor(f, np.zeros(5), np.arange(5.0)) == math.inf
    # best factor: a parabola in (log f, log loss) through the minimum and its neighbours
    loss = np.exp((np.log(f) - np.log(0.7)) ** 2)
    assert lr_sweep.best_factor(f, loss) == pytest.approx(0.7, rel=1e-9)


def test_claim_records_are_strict():
    c = base.claim("x", float("nan"), 2.0, True, "rule")
    assert c["predicted"] is None and c["pass"] is False and "not resolved" in c["note"]
    c = base.claim("x", None, 2.0, True, "rule", uses_prediction=False)
    assert c["pass"] is True
    c = base.factor_claim("y", 2.0, 3.9, 2.0)
    assert c["pass"] and c["rule"] == "measured/predicted within ×2" and c["tolerance"] == 2.0
    assert not base.factor_claim("y", 2.0, 4.1, 2.0)["pass"]
    assert not base.factor_claim("y", 2.0, math.inf, 2.0)["pass"]


def test_job_keys_depend_on_settings_data_and_code():
    ident = {"sha256": "a" * 16, "train_examples": 10, "test_examples": 5}
    j = runner.Job("validate.experiments.runs:train_run", {"train": {"seed": 0}})
    k = runner.job_key(j, ident, "cpu")
    assert k == runner.job_key(runner.Job(j.fn, {"train": {"seed": 0}}, "other label"), ident,
                               "cpu")
    assert k != runner.job_key(runner.Job(j.fn, {"train": {"seed": 1}}), ident, "cpu")
    assert k != runner.job_key(j, {**ident, "sha256": "b" * 16}, "cpu")
    assert k != runner.job_key(j, ident, "cuda")
    assert k != runner.job_key(runner.Job("validate.experiments.runs:memory_run",
                                          j.settings), ident, "cpu")


def test_reference_run_on_the_fast_resnet_with_batchnorm_and_augmentation():
    """The CIFAR path on a tiny scale: FastResNet (BatchNorm in training mode, so micro-batches
    as units), crops and flips, Ĥ on sampled batches (λ_max's standard error from their
    spread); the run's numbers are finite and the Hessian batches are independent draws."""
    d = data.synthetic_cifar10(96, 32, seed=0)
    cfg = train.make_config("quick", epochs=1, batch_size=16, subset=64, eval_batch=64)
    measure = dict(vars(recipes.MeasureConfig(points=2, measure_batch=16, micro_batch=4,
                                              hessian_batch=16, hessian_reps=2, top_k=2,
                                              lanczos_iters=12, hutchinson=6)))
    settings = {"train": {k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in vars(cfg).items()}, "measure": measure}
    ref = runs.reference_run(settings, d, "cpu")
    assert ref["model"] == "FastResNet" and [m["step"] for m in ref["measurements"]] == [0, 4]
    for m in ref["measurements"]:
        assert m["hessian_reps"] == 2 and not m["hessian_whole_subset"]
        assert m["micro_batch"] == 4 and m["hessian_batch"] == 16
        assert math.isfinite(m["lambda_max"]) and m["lambda_max_stderr"] > 0
        assert math.isfinite(m["grad_sq"]) and m["tr_sigma"] > 0
    # the same settings give the same numbers (the measurement batches come from seeds)
    again = runs.reference_run(settings, d, "cpu")
    from validate._io import jsonable

    assert jsonable(again["measurements"]) == jsonable(ref["measurements"])  # nan → None
