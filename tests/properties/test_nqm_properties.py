"""Hypothesis properties of the exact NQM (sgdtheory.nqm)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sgdtheory import nqm

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)

curv = st.lists(st.floats(1e-3, 1.0), min_size=1, max_size=6).map(np.array)
frac = st.floats(0.01, 0.99)
batch = st.floats(1.0, 1000.0)
mom = st.sampled_from([0.0, 0.5, 0.9])


@SETTINGS
@given(curv, frac, batch, st.floats(0.0, 3.0))
def test_sgd_loss_decreases_from_above_stationarity(h, f, b, extra):
    lr = f * 2.0 / h.max()
    c = h.copy()
    s_star = lr * c / (b * h * (2 - lr * h))
    loss = nqm.expected_loss(h, c, lr, b, 60, init_sq=s_star * (1.0 + extra) + 1e-3)
    assert np.all(np.diff(loss) <= 1e-13 * loss[:-1])
    assert loss[-1] >= nqm.stationary_loss(h, c, lr, b) * (1 - 1e-12)


@SETTINGS
@given(curv, frac, batch, batch, mom, st.floats(0.02, 0.5))
def test_steps_to_target_not_increasing_in_batch(h, f, b1, b2, mu, frac_target):
    lo, hi = sorted((b1, b2))
    lr = f * 2.0 * (1 + mu) / h.max()
    target = frac_target * 0.5 * h.sum()
    s_lo, s_hi = nqm.steps_to_target(h, h, lr, [lo, hi], target, momentum=mu, max_steps=500)
    assert s_hi <= s_lo


@SETTINGS
@given(curv, frac, batch, mom, st.floats(0.02, 0.9))
def test_steps_to_target_is_first_crossing_of_expected_loss(h, f, b, mu, frac_target):
    lr = f * 2.0 * (1 + mu) / h.max()
    target = frac_target * 0.5 * h.sum()
    n = nqm.steps_to_target(h, h, lr, b, target, momentum=mu, max_steps=300)
    loss = nqm.expected_loss(h, h, lr, b, 300, momentum=mu)
    tol = 1e-9 * target
    if np.isinf(n):
        assert np.all(loss > target - tol)
    else:
        n = int(n)
        assert loss[n] <= target + tol and np.all(loss[:n] > target - tol)


@SETTINGS
@given(curv, frac, batch, mom, st.floats(0.0, 1.0))
def test_closed_form_equals_constant_schedule(h, f, b, mu, p):
    lr = f * 2.0 * (1 + mu) / h.max()
    const = nqm.expected_loss(h, 0.5 * h, lr, b, 40, momentum=mu, precond_power=p)
    sched = nqm.expected_loss(h, 0.5 * h, np.full(40, lr), b, momentum=mu, precond_power=p)
    np.testing.assert_allclose(const, sched, rtol=1e-11)


@SETTINGS
@given(curv, frac, st.floats(1.0, 10.0), st.lists(st.floats(0.0, 30.0), min_size=6, max_size=6),
       st.floats(0.05, 3.0))
def test_first_crossing_when_some_dimensions_start_below_stationarity(h, f, b, init, target):
    # per-dimension initial moments around s*: the loss need not be monotone
    lr = f * 2.0 / h.max()
    c = 3.0 * h
    x0 = np.array(init[: h.size]) * lr * c / (b * h * (2 - lr * h))
    n = nqm.steps_to_target(h, c, lr, b, target, init_sq=x0, max_steps=400)
    loss = nqm.expected_loss(h, c, lr, b, 400, init_sq=x0)
    tol = 1e-9 * target
    if np.isinf(n):
        assert np.all(loss > target - tol)
    else:
        n = int(n)
        assert loss[n] <= target + tol and np.all(loss[:n] > target - tol)
