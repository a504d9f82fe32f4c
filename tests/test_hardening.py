"""Issue 13 (hardening), the sgdtheory library part: one test per item, each failing before
its fix (complex/bool input, string flags, aggregates over diverged replicas, overflow in the
streaming estimators, vague errors and TypeErrors, warnings at extreme learning rates)."""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import pytest

from sgdtheory import _checks, estimators, krylov, problems, simulate

NQM = problems.NoisyQuadratic([1.0, 0.5], [1.0, 1.0])


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    """ComplexWarning and RuntimeWarning would be the silent failures these items are about."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --------------------------------------------------------------- item 4: complex and bool


@pytest.mark.parametrize(("make", "name"), [
    (lambda: problems.NoisyQuadratic(np.array([1 + 5j, 1.0]), [1.0, 1.0]), "h"),
    (lambda: problems.NoisyQuadratic([1.0, 1.0], np.array([1 + 0j, 1.0])), "c"),
    (lambda: problems.NoisyQuadratic([1.0, 1.0], [1.0, 1.0], theta0=np.array([2j, 1])),
     "theta0"),
    (lambda: problems.LinearRegression(np.array([1.0, 2j])), "lam"),
    (lambda: problems.LinearRegression([True, False]), "lam"),
    (lambda: problems.FiniteSumQuadratic([1.0], np.array([[1j], [2.0]])), "centers"),
    (lambda: problems.LogisticRegression(np.array([[1.0 + 1j], [2.0]]), [1, -1]), "x"),
    (lambda: problems.LogisticRegression([[1.0], [2.0]], [True, False]), "y"),
    (lambda: NQM.loss(np.array([1 + 1j, 0.0])), "theta"),
    (lambda: NQM.sample_grad(np.array([1.0, 1j]), 2, 0), "theta"),
    (lambda: simulate.run(NQM, lr=np.array([0.1 + 1j]), steps=2, progress=False), "lr"),
    (lambda: simulate.run(NQM, lr=0.1, momentum=np.array([0.5 + 0j]), steps=2,
                          progress=False), "momentum"),
    (lambda: simulate.run(NQM, lr=0.1, batch=np.array([4 + 0j]), steps=2, progress=False),
     "batch"),
    (lambda: simulate.run(NQM, lr=0.1, steps=2, init=np.array([1 + 1j, 1.0]),
                          progress=False), "init"),
    (lambda: simulate.run(NQM, lr=True, steps=2, progress=False), "lr"),
    (lambda: simulate.run(NQM, lr=0.1, batch=True, steps=2, progress=False), "batch"),
    (lambda: simulate.run(NQM, lr=0.1, steps=True, progress=False), "steps"),
    (lambda: simulate.run(NQM, lr=0.1, steps=4, record_steps=[0, 2j], progress=False),
     "record_steps"),
    (lambda: simulate.piecewise_linear([0.0, 1.0], np.array([1.0, 0.5j])), "values"),
    (lambda: simulate.run(NQM, lr=0.1, steps=3, schedule=lambda f: f + 0j, progress=False),
     "schedule"),
])
def test_complex_arrays_and_bools_are_refused_by_name(make, name):
    """Item 4: NumPy used to drop the imaginary part with only a ComplexWarning."""
    with pytest.raises(ValueError, match=name):
        make()


# --------------------------------------------------------------- item 5: flags


@pytest.mark.parametrize("flag", ["nesterov", "replace", "record_stats"])
@pytest.mark.parametrize("value", ["False", "no", 0, 1, 0.0, None, np.array([False])])
def test_flags_accept_bools_only(flag, value):
    """Item 5: nesterov="False" is truthy and used to turn Nesterov on."""
    kwargs = dict(lr=0.1, steps=3, momentum=0.5, progress=False)
    with pytest.raises(ValueError, match=flag):
        simulate.run(NQM, **{**kwargs, flag: value})


def test_numpy_bools_are_flags_and_nesterov_false_is_heavy_ball():
    common = dict(lr=0.2, steps=30, momentum=0.8, replicas=2, seed=1, progress=False)
    heavy = simulate.run(NQM, nesterov=False, **common).train_loss
    np.testing.assert_array_equal(simulate.run(NQM, nesterov=np.False_, **common).train_loss,
                                  heavy)
    nesterov = simulate.run(NQM, nesterov=np.True_, **common).train_loss
    assert not np.array_equal(nesterov, heavy)
    with pytest.raises(ValueError, match="replace"):
        problems.FiniteSumQuadratic([1.0], [[0.0], [1.0]]).sample_grad([0.5], 1, 0,
                                                                       replace="False")


# --------------------------------------------------------------- item 6: diverged replicas


@pytest.fixture(scope="module")
def mixed():
    """Replicas near the stability edge with a low divergence factor: in some configurations
    a few replicas diverge and the others do not."""
    return simulate.run(problems.NoisyQuadratic([1.0, 0.5], [4.0, 4.0]), lr=[0.5, 1.9],
                        batch=1, steps=60, replicas=12, seed=3, record_every=10,
                        divergence_factor=3.0, check_every=1, record_stats=True,
                        progress=False)


def test_aggregates_over_diverged_replicas_are_defined(mixed):
    """Item 6: stderr was NaN (inf − inf), b_noise and eps_max NaN (inf/inf)."""
    res = mixed
    x = res.train_loss  # (2, R, K)
    fin = np.isfinite(x)
    partly = fin.any(axis=1) & ~fin.all(axis=1)
    assert partly.any(), "the fixture must have records where only some replicas diverged"
    # all replicas: inf where any diverged, the usual statistics elsewhere (brute force)
    mean, se = res.mean(), res.stderr()
    assert not np.isnan(mean).any() and not np.isnan(se).any()
    for c, k in np.ndindex(mean.shape):
        col = x[c, :, k]
        if np.isfinite(col).all():
            assert mean[c, k] == pytest.approx(col.mean(), rel=1e-12)
            assert se[c, k] == pytest.approx(col.std(ddof=1) / math.sqrt(col.size), rel=1e-12)
        else:
            assert mean[c, k] == np.inf and se[c, k] == np.inf
    # survivors: over the finite replicas, with their count; inf below two
    n = res.count()
    m_s, se_s = res.mean(survivors=True), res.stderr(survivors=True)
    assert not np.isnan(m_s).any() and not np.isnan(se_s).any()
    for c, k in np.ndindex(n.shape):
        col = x[c, :, k][np.isfinite(x[c, :, k])]
        assert n[c, k] == col.size
        if col.size >= 2:
            assert m_s[c, k] == pytest.approx(col.mean(), rel=1e-12)
            assert se_s[c, k] == pytest.approx(col.std(ddof=1) / math.sqrt(col.size), rel=1e-12)
        else:
            assert se_s[c, k] == np.inf


def test_noise_scales_of_diverged_replicas_are_inf(mixed):
    res = mixed
    for name, num, den in (("b_noise", "tr_h_sigma", "g_h_g"), ("eps_max", "grad_sq", "g_h_g"),
                           ("b_simple", "tr_sigma", "grad_sq")):
        got = getattr(res, name)
        n, d = getattr(res, num), getattr(res, den)
        assert not np.isnan(got).any(), name
        alive = np.isfinite(n) & np.isfinite(d) & (d > 0)
        np.testing.assert_allclose(got[alive], n[alive] / d[alive], rtol=1e-12)
        assert np.all(got[~alive] == np.inf)
    assert (~np.isfinite(res.g_h_g)).any()


# --------------------------------------------------------------- item 9: overflow in estimators


@pytest.mark.parametrize("big", [1e300, 1e308, -1e308])
def test_noise_scale_ema_survives_one_huge_update(big):
    """Item 9: one update of 1e300 used to leave a NaN standard error forever."""
    rng = np.random.default_rng(0)
    ema = estimators.NoiseScaleEMA(beta=0.9)
    ema.update(abs(big), abs(big)).update(-big, abs(big))
    for value in (ema.b_simple, ema.b_simple_stderr, *ema.b_simple_ci()):
        assert not math.isnan(value)
    est = ema.estimate()
    assert not any(math.isnan(v) for v in (est.grad_sq_stderr, est.tr_sigma_stderr, est.cov))
    # the huge draw decays away (weight 0.9^t): the truth B_simple = 20/1 comes back
    for _ in range(20_000):
        ema.update(1.0 + 0.1 * rng.standard_normal(), 20.0 + rng.standard_normal())
    assert ema.b_simple == pytest.approx(20.0, rel=0.1)
    assert 0 < ema.b_simple_stderr < 2.0


def test_per_sample_stats_is_scale_invariant_at_the_edges_of_float64():
    """Item 9: gradients of 1e200 used to give B_simple 0.0 (|g|² overflowed)."""
    g = np.random.default_rng(1).normal(size=(40, 6)) + 0.5
    ref = estimators.per_sample_stats(g)
    for scale in (1e200, 1e-200, 2.0**1000):
        est = estimators.per_sample_stats(g * scale)
        assert est.b_simple == pytest.approx(ref.b_simple, rel=1e-12)
        assert est.b_simple_stderr == pytest.approx(ref.b_simple_stderr, rel=1e-9)
        gs, tr = estimators.per_sample(g * scale)
        assert not (math.isnan(gs) or math.isnan(tr))
    # |G|² of gradients near 1e200 is beyond float64: inf, not NaN and not 0
    assert estimators.per_sample_stats(g * 1e200).grad_sq == np.inf
    two = estimators.two_batch_stats([1e300, 2e299, 5e299], [1e299, 3e298, 4e298], 10, 100)
    assert not any(np.isnan(getattr(two, f)) for f in ("grad_sq", "tr_sigma", "b_simple",
                                                        "b_simple_stderr"))
    with pytest.raises(ValueError, match="grad_sq_small"):  # tr Σ beyond float64: refused
        estimators.two_batch_stats([1e308, 2e307, 5e307], [1e307, 3e306, 4e306], 10, 100)


# --------------------------------------------------------------- item 12: errors by name


@pytest.mark.parametrize(("call", "name"), [
    (lambda: simulate.run(NQM, lr=0.1, steps=3, ema="x", progress=False), "ema"),
    (lambda: simulate.run(NQM, lr=0.1, steps=3, divergence_factor=None, progress=False),
     "divergence_factor"),
    (lambda: simulate.warmup(None), "fraction"),
    (lambda: simulate.step_decay([0.5], "a"), "factor"),
    (lambda: simulate.step_decay("a"), "boundaries"),
    (lambda: krylov.top_eigenvalues(lambda v: v, 4, tol=None), "tol"),
    (lambda: krylov.top_eigenvalues(lambda v: v, 4, method=["lanczos"]), "method"),
    (lambda: _checks.integer("steps", 10**400), "steps"),
    (lambda: _checks.real("lr", 10**400), "lr"),
    (lambda: simulate.run(NQM, lr=0.1, steps=10**400, progress=False), "steps"),
    (lambda: simulate.run(NQM, lr=0.1, steps=3, replicas=2**70, progress=False), "replicas"),
    (lambda: simulate.run(NQM, lr=0.1, steps=3, record_every="2", progress=False),
     "record_every"),
    (lambda: simulate.run(NQM, lr=0.1, steps=3, dtype=None, progress=False), "dtype"),
    (lambda: simulate.run(NQM, lr=0.1, steps=3, progress="yes"), "progress"),
    (lambda: simulate.run("not a problem", lr=0.1, steps=3), "problem"),
    (lambda: estimators.advise_batch_size(100.0, 1.0, 10, momentum=[]), "momentum"),
    (lambda: estimators.two_batch_stats([1.0, 2.0], [0.5, 0.6], 1, 2, axis=None), "axis"),
])
def test_bad_input_gives_a_value_error_naming_the_argument(call, name):
    """Item 12: these raised TypeError, OverflowError or NumPy's wording."""
    with pytest.raises(ValueError, match=name):
        call()


def test_a_misspelt_setting_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown keyword 'stpes'") as exc:
        simulate.run(NQM, lr=0.1, stpes=3)
    assert "steps" in str(exc.value) and "record_every" in str(exc.value)
    settings = list(inspect.signature(simulate.plan).parameters)[1:]
    assert sorted(simulate._PLAN_SETTINGS) == sorted(settings)


def test_numpy_integers_are_accepted_wherever_ints_are():
    common = dict(lr=0.3, momentum=0.5, progress=False)
    want = simulate.run(NQM, batch=4, steps=12, replicas=3, seed=5, record_every=4,
                        check_every=2, **common)
    got = simulate.run(NQM, batch=np.int64(4), steps=np.int64(12), replicas=np.int32(3),
                       seed=np.uint8(5), record_every=np.int64(4), check_every=np.array(2),
                       **common)
    np.testing.assert_array_equal(got.train_loss, want.train_loss)
    assert _checks.integer("k", np.float16(2.0)) == 2
    assert krylov.top_eigenvalues(lambda v: 2.0 * v, np.int64(3), k=np.int64(1),
                                  seed=np.int64(0))[0] == pytest.approx(2.0)


# --------------------------------------------------------------- extreme learning rates


@pytest.mark.parametrize("lr", [1e155, 1e200, 1e300])
@pytest.mark.parametrize("problem", [
    NQM, problems.LinearRegression([1.0, 0.5], noise_std=0.5),
    problems.FiniteSumQuadratic.random([1.0, 0.5], 8, seed=0),
    problems.LinearRegressionData([1.0, 0.5], 8, n_test=4, noise_std=0.5),
    problems.LogisticRegression.gaussian_mixture(8, 2, n_test=4, seed=0),
], ids=["nqm", "linreg", "finite_quad", "linreg_data", "logistic"])
def test_no_runtime_warning_at_extreme_learning_rates(problem, lr):
    """The simulator and estimator paths at η = 1e155 … 1e300 (warnings are errors here):
    every replica diverges and every aggregate is inf, never NaN."""
    for kw in (dict(), dict(momentum=0.9, nesterov=True), dict(ema=0.9, dtype="float32")):
        res = simulate.run(problem, lr=[0.1, lr], batch=2, steps=20, replicas=3,
                           record_every=5, record_stats=True, progress=False, **kw)
        assert res.diverged[1].all() and not res.diverged[0].any()
        for name in ("train_loss", "g_h_g"):
            for agg in (res.mean(name), res.stderr(name), res.stderr(name, survivors=True)):
                assert not np.isnan(agg).any() and np.all(agg[1, 1:] == np.inf)
        for ratio in (res.b_noise, res.b_simple, res.eps_max):
            assert not np.isnan(ratio).any()
    adv = estimators.advise_batch_size(1e300, lr, 1, lr=lr, momentum=0.9)
    assert not any(math.isnan(v) for v in (adv.eps_opt_now, adv.lr_opt_rec, adv.step_speedup))
    ema = estimators.CurvatureEMA(0.9)
    for _ in range(3):
        ema.update(lr, lr * 1e5, grad_sq=lr)
    est = ema.estimate()
    assert not any(math.isnan(v) for v in (est.b_noise, est.b_noise_stderr, est.eps_max_stderr))
