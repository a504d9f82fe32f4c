"""Hypothesis properties of the closed forms of sgdtheory.theory."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import ortho_group

from sgdtheory import theory

pos = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)
settings.register_profile("sgdtheory", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("sgdtheory")


@given(pos, pos, pos, pos)
def test_eps_opt_increases_with_batch_and_tends_to_eps_max(b1, b2, e_max, bn):
    lo, hi = sorted((b1, b2))
    assert theory.eps_opt(lo, e_max, bn) <= theory.eps_opt(hi, e_max, bn)
    assert theory.eps_opt(hi, e_max, bn) < e_max
    assert abs(theory.eps_opt(1e12 * bn, e_max, bn) - e_max) <= 1e-9 * e_max


@given(pos, pos, pos, pos, pos)
def test_loss_change_zero_at_twice_eps_opt_and_minimal_at_eps_opt(batch, grad_sq, g_h_g, trhs,
                                                                  _):
    e_max, bn = theory.eps_max(grad_sq, g_h_g), theory.b_noise(trhs, g_h_g)
    e_opt = theory.eps_opt(batch, e_max, bn)
    scale = grad_sq * e_opt
    at_two = theory.expected_loss_change(2 * e_opt, batch, grad_sq, g_h_g, trhs)
    assert abs(at_two) <= 1e-9 * scale
    at_opt = theory.expected_loss_change(e_opt, batch, grad_sq, g_h_g, trhs)
    dl_opt = theory.delta_loss_opt(batch, theory.delta_loss_max(grad_sq, g_h_g), bn)
    assert abs(at_opt + dl_opt) <= 1e-9 * scale
    for f in (0.5, 0.9, 1.1, 1.9):
        assert theory.expected_loss_change(f * e_opt, batch, grad_sq, g_h_g, trhs) > at_opt
    assert theory.expected_loss_change(2.1 * e_opt, batch, grad_sq, g_h_g, trhs) > 0


@st.composite
def quadratic_point(draw):
    p = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(2, p, p))
    return a @ a.T + 0.1 * np.eye(p), b @ b.T, rng.normal(size=p), seed


@given(quadratic_point())
def test_quadratic_stats_invariant_under_rotation(point):
    h, sigma, g, seed = point
    p = len(g)
    q = ortho_group.rvs(p, random_state=seed) if p > 1 else np.array([[-1.0]])
    s0 = theory.quadratic_stats(h, sigma, g)
    s1 = theory.quadratic_stats(q @ h @ q.T, q @ sigma @ q.T, q @ g)
    for name in ("grad_sq", "g_h_g", "tr_sigma", "tr_h_sigma", "eps_max", "b_noise", "b_simple"):
        np.testing.assert_allclose(getattr(s1, name), getattr(s0, name), rtol=1e-9)


@given(quadratic_point(), pos)
def test_b_simple_equals_b_noise_when_h_is_isotropic(point, c):
    _, sigma, g, _ = point
    s = theory.quadratic_stats(c * np.eye(len(g)), sigma, g)
    np.testing.assert_allclose(s.b_noise, s.b_simple, rtol=1e-12)


@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=8), pos, pos)
def test_steps_examples_hyperbola(batch_over_bcrit, s_min, e_min):
    batches = np.array(batch_over_bcrit) * e_min / s_min
    s, e = theory.steps_examples(batches, s_min, e_min)
    np.testing.assert_allclose((s / s_min - 1) * (e / e_min - 1), 1.0, rtol=1e-9)
    np.testing.assert_allclose(e, s * batches, rtol=1e-12)


@given(st.floats(1.0, 1e4), st.floats(1.0, 1e3), st.integers(0, 10**6))
def test_fit_steps_examples_recovers_parameters(s_min, b_crit, seed):
    batches = b_crit * np.logspace(-2, 2, 9)
    s, e = theory.steps_examples(batches, s_min, s_min * b_crit)
    fit_s, fit_e = theory.fit_steps_examples(s, e)
    np.testing.assert_allclose([fit_s, fit_e], [s_min, s_min * b_crit], rtol=1e-8)
    # 1% multiplicative noise on the steps: parameters within a few percent
    noise = np.exp(0.01 * np.random.default_rng(seed).standard_normal(len(s)))
    fit_s, fit_e = theory.fit_steps_examples(s * noise, e * noise)
    np.testing.assert_allclose([fit_s, fit_e], [s_min, s_min * b_crit], rtol=0.05)
