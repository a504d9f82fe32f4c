"""sgdtheory.nqm at the edges: diverging runs are inf (never NaN, no warning), bad input is a
ValueError naming the argument (issue 13, items 3, 4, 5 and 12 for nqm)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from sgdtheory import nqm

H = np.array([1.0, 0.3, 1e-4])

OPTIONS = [{}, {"momentum": 0.5}, {"momentum": 0.5, "nesterov": True}, {"ema_decay": 0.5},
           {"momentum": 0.5, "ema_decay": 0.5}, {"precond_power": 0.5}]


def quiet(fn, *args, **kwargs):
    """fn(*args, **kwargs) with every warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("options", OPTIONS[:5])
def test_diverging_schedule_is_inf_not_nan(options):
    loss = quiet(nqm.expected_loss, [1.0], [1.0], np.full(2000, 5.0), 1, **options)
    assert loss[0] == 0.5 and loss[-1] == np.inf
    assert not np.any(np.isnan(loss))
    finite = loss[np.isfinite(loss)]
    assert np.all(np.diff(finite[5:]) > 0)  # it grows until it overflows


def test_diverging_linear_regression_with_a_zero_eigenvalue_is_inf():
    loss = quiet(nqm.linreg_expected_loss, [1.0, 0.0], 3.0, 1, 2000)
    moments = quiet(nqm.linreg_moments, [1.0, 0.0], 3.0, 1, 2000)
    assert loss[-1] == np.inf and not np.any(np.isnan(loss))
    assert not np.any(np.isnan(moments))
    assert moments[-1, 0] == np.inf and np.all(moments[:, 1] == 1.0)  # λ = 0 never moves


@pytest.mark.parametrize("lr", [1e155, 1e200, 1e300])
@pytest.mark.parametrize("options", OPTIONS)
def test_extreme_learning_rates_give_inf_without_warnings(lr, options):
    loss = quiet(nqm.expected_loss, H, H, lr, 1, 50, **options)
    sched = quiet(nqm.expected_loss, H, H, np.full(50, lr), 1, **options)
    for curve in (loss, sched):
        assert curve[0] == 0.5 * H.sum() and np.all(curve[1:] == np.inf)
    assert quiet(nqm.stationary_loss, H, H, lr, 1, **options) == np.inf
    assert quiet(nqm.steps_to_target, H, H, lr, 1, 0.1, **options) == np.inf
    curve = quiet(nqm.optimal_steps_curve, H, H, [1, 4], 0.1, [lr, 0.5], **options)
    assert np.all(curve.grid[:, 0] == np.inf) and not np.any(np.isnan(curve.steps))
    for lam in ([1.0, 0.3], [1.0, 0.0]):
        out = quiet(nqm.linreg_expected_loss, lam, lr, 1, 50)
        assert np.all(out[1:] == np.inf)


@pytest.mark.parametrize("options", OPTIONS[:5])
def test_noise_beyond_float64_is_inf_after_the_first_step(options):
    """η²c/B overflows: E[L_0] is the initial loss, every later E[L_t] is inf."""
    loss = quiet(nqm.expected_loss, [1.0], 1e300, 0.5, 1e-10, 5, **options)
    np.testing.assert_array_equal(loss, [0.5, np.inf, np.inf, np.inf, np.inf, np.inf])
    assert quiet(nqm.steps_to_target, [1.0], 1e300, 0.5, 1e-10, 0.1, **options) == np.inf


def test_initial_loss_beyond_float64_is_refused():
    with pytest.raises(ValueError, match="init_sq"):
        nqm.expected_loss([1e300], 1.0, 0.1, 1, 5, init_sq=1e300)


BAD_NUMBERS = [np.array([0.5 + 1j]), np.complex128(0.5), 0.5 + 0j, np.array([True]), np.True_,
               "0.5", None, [[0.5], [0.5, 0.5]]]


NAMES = ["h", "c", "lr", "batch", "momentum", "init_sq", "precond_power", "ema_decay"]


@pytest.mark.parametrize(("name", "bad"), [
    (n, b) for n in NAMES for b in BAD_NUMBERS if not (n == "ema_decay" and b is None)],
    ids=repr)  # (ema_decay=None means no averaging)
def test_expected_loss_refuses_non_real_input_by_name(name, bad):
    args = {"h": [1.0, 0.5], "c": 1.0, "lr": 0.1, "batch": 4}
    kwargs = {}
    (args if name in args else kwargs)[name] = bad
    with pytest.raises(ValueError, match=name):
        nqm.expected_loss(args["h"], args["c"], args["lr"], args["batch"], 3, **kwargs)


@pytest.mark.parametrize("bad", BAD_NUMBERS, ids=repr)
def test_other_functions_refuse_non_real_input_by_name(bad):
    with pytest.raises(ValueError, match="target"):
        nqm.steps_to_target([1.0], 1.0, 0.1, 1, bad)
    with pytest.raises(ValueError, match="batches"):
        nqm.optimal_steps_curve([1.0], 1.0, bad, 0.1, [0.1])
    with pytest.raises(ValueError, match="lam"):
        nqm.linreg_expected_loss(bad, 0.1, 1, 3)
    with pytest.raises(ValueError, match="noise_var"):
        nqm.linreg_moments([1.0], 0.1, 1, 3, noise_var=bad)


@pytest.mark.parametrize("bad", ["False", 1, 0, None, np.array([True, False])], ids=repr)
def test_nesterov_accepts_bools_only(bad):
    with pytest.raises(ValueError, match="nesterov"):
        nqm.steps_to_target([1.0], 1.0, 0.1, 1, 0.1, momentum=0.5, nesterov=bad)
    assert nqm.expected_loss([1.0], 1.0, 0.5, 1, 3, momentum=0.5, nesterov=np.True_)[-1] == \
        nqm.expected_loss([1.0], 1.0, 0.5, 1, 3, momentum=0.5, nesterov=True)[-1]


def test_numpy_integers_are_accepted():
    a = nqm.expected_loss(H, H, 0.5, np.int64(4), np.int64(30), momentum=0.5)
    np.testing.assert_array_equal(a, nqm.expected_loss(H, H, 0.5, 4, 30, momentum=0.5))
    assert nqm.steps_to_target(H, H, 0.5, np.int32(4), 0.2, max_steps=np.int64(10**6)) == \
        nqm.steps_to_target(H, H, 0.5, 4, 0.2, max_steps=10**6)


@pytest.mark.parametrize(("kwargs", "name"), [({"momentum": [0.1, 0.5]}, "momentum"),
                                              ({"ema_decay": [0.1, 0.5]}, "ema_decay"),
                                              ({"target": [0.1, 0.2]}, "target")])
def test_optimal_steps_curve_scalar_options(kwargs, name):
    args = {"target": 0.1}
    args.update(kwargs)
    target = args.pop("target")
    with pytest.raises(ValueError, match=name):
        nqm.optimal_steps_curve([1.0, 0.1], 1.0, [1, 2, 4], target, [0.1, 0.5], **args)


def test_sizes_beyond_reach_are_refused_by_name():
    with pytest.raises(ValueError, match="steps"):  # the trajectory would not fit in memory
        nqm.expected_loss([1.0], 1.0, 0.1, 1, 10**15)
    with pytest.raises(ValueError, match="steps"):
        nqm.linreg_moments([1.0, 0.5], 0.1, 1, 10**15)
    with pytest.raises(ValueError, match="max_steps"):  # beyond 2**53: not exact as a float
        nqm.steps_to_target([1.0], 1.0, 0.1, 1, 0.1, max_steps=10**400)
    with pytest.raises(ValueError, match="lrs"):
        nqm.optimal_steps_curve([1.0], 1.0, [1, 2], 0.1, [])
