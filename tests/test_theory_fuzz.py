"""Fuzz of every public function of sgdtheory.theory and sgdtheory.memory with bad input.

The contract (issue 13): any input either gives a result with no NaN and no RuntimeWarning,
or raises ValueError whose message names the argument. Never TypeError, OverflowError,
ZeroDivisionError, LinAlgError, nor a NumPy/SciPy message. None, strings, bools used as
numbers, complex values, ragged lists and NaN/inf must be refused, not coerced.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from fuzz_values import EXTREME, MUST_REJECT
from hypothesis import given, settings
from hypothesis import strategies as st

from sgdtheory import memory, theory

# good keyword arguments of every public function (all of them by name)
GOOD = {
    theory.eps_max: dict(grad_sq=4.0, g_h_g=2.0),
    theory.b_noise: dict(tr_h_sigma=30.0, g_h_g=3.0),
    theory.b_simple: dict(tr_sigma=100.0, grad_sq=4.0),
    theory.eps_opt: dict(batch=10, eps_max=1.0, b_noise=10.0),
    theory.delta_loss_max: dict(grad_sq=2.0, g_h_g=4.0),
    theory.delta_loss_opt: dict(batch=5, delta_loss_max=3.0, b_noise=10.0),
    theory.effective_batch: dict(batch=10, n_data=19),
    theory.expected_loss_change: dict(lr=0.5, batch=10, grad_sq=1.0, g_h_g=1.0,
                                      tr_h_sigma=10.0, n_data=100),
    theory.QuadraticStats: dict(grad_sq=1.0, g_h_g=2.0, tr_sigma=3.0, tr_h_sigma=4.0),
    theory.quadratic_stats: dict(hessian=[1.0, 2.0], sigma=[3.0, 1.0], grad=[1.0, 1.0]),
    theory.steps_examples: dict(batch=10.0, s_min=100.0, e_min=1000.0),
    theory.critical_batch: dict(s_min=100.0, e_min=3200.0),
    theory.fit_steps_examples: dict(steps=[200.0, 110.0, 101.0],
                                    examples=[2000.0, 11000.0, 101000.0]),
    theory.base_lr: dict(lr=0.4, batch=128),
    theory.lr_from_base: dict(base=0.003, batch=128),
    theory.effective_lr: dict(lr=0.1, momentum=0.9),
    theory.temperature: dict(lr=0.1, batch=10, momentum=0.5),
    theory.smith_le_noise_scale: dict(lr=0.1, batch=100, n_data=50000, momentum=0.0),
    theory.scaled_lr: dict(lr_ref=0.1, batch_ref=128, batch=512, rule="linear"),
    theory.gd_stability_limit: dict(lambda_max=4.0, momentum=0.9, nesterov=False),
    theory.linreg_moment_matrix: dict(eigenvalues=[1.0, 0.5], lr=0.5, batch=1),
    theory.linreg_stability_limit: dict(eigenvalues=[1.0, 0.5], batch=2, momentum=0.5,
                                        nesterov=True, counts=[1.0, 3.0]),
    theory.spectrum_from_top_and_trace: dict(top_eigenvalues=[5.0, 3.0], trace=12.0, dim=10,
                                             trace_se=0.1),
    memory.stationary_moments: dict(eigenvalues=[1.0, 0.5], lr=0.1, batch=2, noise_var=1.0),
    memory.memory_gap: dict(eigenvalues=[1.0, 0.5], lr=0.1, batch=2, lags=[1, 5],
                            noise_var=1.0, moments=[0.1, 0.2]),
    memory.memory_curve: dict(eigenvalues=[1.0, 0.5], lr=0.1, batch=2, lags=[1, 5],
                              noise_var=1.0, moments=[0.1, 0.2]),
    memory.forgetting_horizon: dict(base_lr=0.001, eigenvalue=0.5),
    memory.forgetting_limit: dict(n_data=1000, eigenvalue=0.01),
}
OPTIONAL = {"n_data", "counts", "moments"}  # None is a valid value of these
FLAGS = {"nesterov"}



def _has_nan(x) -> bool:
    if isinstance(x, tuple):
        return any(_has_nan(v) for v in x)
    if dataclasses.is_dataclass(x):
        values = [getattr(x, f.name) for f in dataclasses.fields(x)]
        values += [x.eps_max, x.b_noise, x.b_simple, x.delta_loss_max, x.eps_opt(10)]
        return any(_has_nan(v) for v in values)
    return bool(np.any(np.isnan(np.asarray(x, dtype=float))))


def _outcome(fn, kwargs, names):
    """'rejected' (ValueError naming one of ``names``) or 'accepted' (NaN-free, no warning);
    anything else fails the test with what happened."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            out = fn(**kwargs)
        except ValueError as exc:
            assert any(n in str(exc) for n in names), f"{fn.__name__}{kwargs}: vague {exc}"
            return "rejected"
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{fn.__name__}({kwargs}) raised {type(exc).__name__}: {exc}")
        assert not _has_nan(out), f"{fn.__name__}({kwargs}) returned NaN: {out!r}"
    return "accepted"


def _cases():
    for fn, good in GOOD.items():
        for arg in good:
            yield pytest.param(fn, arg, id=f"{fn.__name__}-{arg}")


@pytest.mark.parametrize(("fn", "arg"), list(_cases()))
def test_one_bad_argument_is_refused_by_name_or_handled(fn, arg):
    good = GOOD[fn]
    assert _outcome(fn, good, list(good)) == "accepted"
    for label, value in {**MUST_REJECT, **EXTREME}.items():
        result = _outcome(fn, {**good, arg: value}, [arg])
        valid_none = label == "None" and arg in OPTIONAL
        valid_flag = label in ("bool", "npbool") and arg in FLAGS
        valid_int = label == "int1" and arg not in FLAGS
        if label in MUST_REJECT and not (valid_none or valid_flag or valid_int):
            assert result == "rejected", f"{fn.__name__}({arg}={value!r}) was accepted"
    if isinstance(good[arg], int) and not isinstance(good[arg], bool):  # NumPy ints too
        want = fn(**good)
        for value in (np.int64(good[arg]), np.uint32(good[arg]), np.array(good[arg])):
            got = fn(**{**good, arg: value})
            assert repr(got) == repr(want), f"{fn.__name__}({arg}={value!r})"


NUMBERS = [0.0, 5e-324, 1e-300, 1e-155, 0.3, 1.0, 7.0, 1e155, 1e300, 1e308, -1.0, -1e308, 2,
           10**30]
ARRAYS = [[1.0, 0.5], [1e308, 1e308], [5e-324, 1.0], [1e-300, 1e300], [0.0, 1.0],
          [1e155, 1e-155], [3.0]]


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(st.data())
@pytest.mark.parametrize("fn", list(GOOD), ids=lambda f: f.__name__)
def test_extreme_values_in_every_argument_together(fn, data):
    """Several arguments extreme at once (overflow, underflow, 0·inf): named refusal or a
    NaN-free result, without RuntimeWarning."""
    kwargs = {}
    for name, good in GOOD[fn].items():
        if isinstance(good, (str, bool)) or not data.draw(st.booleans(), label=name):
            kwargs[name] = good
        elif isinstance(good, list):
            kwargs[name] = good if isinstance(good[0], list) else data.draw(
                st.sampled_from(ARRAYS), label=name)
        else:
            kwargs[name] = data.draw(st.sampled_from(NUMBERS), label=name)
    _outcome(fn, kwargs, list(GOOD[fn]))


@pytest.mark.parametrize("lr", [1e155, 1e200, 1e300])
def test_no_runtime_warning_at_extreme_learning_rates(lr):
    """Every path that takes an lr, at η = 1e155 … 1e300, with warnings as errors."""
    calls = [
        lambda: theory.expected_loss_change(lr, 4, 1.0, 2.0, 3.0, n_data=10),
        lambda: theory.expected_loss_change(lr, 4, 1e300, -1e300, 1e300),
        lambda: theory.linreg_moment_matrix([1.0, 0.0, 1e-300], lr, 3),
        lambda: theory.base_lr(lr, 1e-300),
        lambda: theory.lr_from_base(lr, 1e300),
        lambda: theory.effective_lr(lr, 0.999),
        lambda: theory.temperature(lr, 1e-300, 0.9),
        lambda: theory.smith_le_noise_scale(lr, 1e-300, 1e300, 0.9),
        lambda: theory.scaled_lr(lr, 1e-300, 1e300, rule="sqrt"),
        lambda: theory.eps_opt(1e-300, lr, lr),
        lambda: theory.delta_loss_max(lr, 1e-300),
        lambda: memory.forgetting_horizon(lr, 1e300),
        lambda: memory.forgetting_horizon(1.0 / lr, 1e-300),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for call in calls:
            assert not _has_nan(call())
        for call in (lambda: memory.stationary_moments([1.0], lr, 2, noise_var=1.0),
                     lambda: memory.memory_gap([1.0], lr, 2, [1, 2], noise_var=1.0),
                     lambda: memory.memory_curve([1.0], lr, 2, 3, noise_var=1.0)):
            with pytest.raises(ValueError, match="lr"):
                call()
