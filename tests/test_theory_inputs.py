"""Issue 13 regressions for theory.py and memory.py, each against an independent reference.

Exact references: Python's fractions.Fraction arithmetic (no rounding, no overflow), the
dense solve of (I − A) m = (η²/B)σ²λ, and scale invariances of the models.
"""

from __future__ import annotations

import warnings
from fractions import Fraction

import numpy as np
import pytest

from sgdtheory import memory, theory


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: theory.eps_opt(10, np.array([1 + 5j]), 10), "eps_max"),  # was 0.5
        (lambda: theory.eps_opt(np.array([10 + 0j]), 1.0, 10), "batch"),
        (lambda: theory.quadratic_stats([1.0, 2.0], [1.0, 1.0], np.array([1j, 1.0])), "grad"),
        (lambda: memory.memory_gap(np.array([1.0 + 1j]), 0.1, 1, 1, noise_var=1.0),
         "eigenvalues"),
        (lambda: memory.memory_gap([1.0], 0.1, 1, np.array([2 + 0j]), noise_var=1.0), "lags"),
        (lambda: memory.memory_gap([1.0], 0.1, 1, 1, noise_var=1.0, moments=[1j]), "moments"),
        (lambda: memory.forgetting_limit(np.array([100 + 0j]), 0.1), "n_data"),
        (lambda: theory.eps_opt(True, 1.0, 1.0), "batch"),  # bools are not numbers
        (lambda: theory.linreg_stability_limit(np.array([True, False]), 1), "eigenvalues"),
        (lambda: memory.forgetting_horizon(np.bool_(True), 0.5), "base_lr"),
        (lambda: theory.eps_opt("10", 1.0, 1.0), "batch"),  # NumPy parsed the string
        (lambda: memory.memory_gap(["1.0"], 0.1, 1, 1, noise_var=1.0), "eigenvalues"),
        (lambda: theory.gd_stability_limit(1.0, 0.5, nesterov="False"), "nesterov"),  # truthy
        (lambda: theory.gd_stability_limit(1.0, 0.5, nesterov=1), "nesterov"),
        (lambda: theory.linreg_stability_limit([1e308, 1e308], 1), "eigenvalues"),
        (lambda: theory.linreg_stability_limit([1e-310], 1), "eigenvalues"),
        (lambda: theory.eps_opt(10**400, 1.0, 1.0), "batch"),  # was a TypeError
        (lambda: theory.spectrum_from_top_and_trace([1.0], 2.0, 10**400), "dim"),
        (lambda: memory.memory_gap([1.0], 0.1, 10**400, 1, noise_var=1.0), "batch"),
        (lambda: memory.memory_gap([1.0], 0.1, 1, [[1, 2], [3]], noise_var=1.0), "lags"),
        (lambda: theory.scaled_lr(0.1, 1, 2, rule=np.array(["linear"])), "rule"),
        (lambda: theory.QuadraticStats("1", 1.0, 1.0, 1.0), "grad_sq"),
        (lambda: theory.QuadraticStats(1.0, float("nan"), 1.0, 1.0), "g_h_g"),
        (lambda: theory.fit_steps_examples([1e308, 1e308], [1e155, 1e-155]), "steps"),
        (lambda: theory.quadratic_stats([1e200, -1e200], [1e200, 1e200], [1.0, 1.0]),
         "hessian and sigma"),
    ],
)
def test_bad_input_is_refused_by_name(call, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=name):
            call()


def test_torch_complex_and_bool_tensors_are_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="eps_max"):
        theory.eps_opt(10.0, torch.tensor([1 + 5j]), 10.0)
    with pytest.raises(ValueError, match="batch"):
        theory.eps_opt(torch.tensor([True]), 1.0, 10.0)
    out = theory.eps_opt(torch.tensor([10], dtype=torch.int64), 1.0, 10.0)
    assert float(out) == 0.5


def test_flags_accept_numpy_bools():
    for flag in (True, False):
        assert theory.gd_stability_limit(2.0, 0.5, nesterov=np.bool_(flag)) == \
            theory.gd_stability_limit(2.0, 0.5, nesterov=flag)
    assert theory.gd_stability_limit(2.0, 0.5, nesterov=True) == pytest.approx(2 * 1.5 / (2 * 2.0))


def test_numpy_integers_where_ints_are_accepted():
    lam = [1.0, 0.5]
    want = memory.memory_gap(lam, 0.1, 2, [1, 3], noise_var=1.0)
    got = memory.memory_gap(lam, 0.1, np.int64(2), np.array([1, 3], dtype=np.uint8),
                            noise_var=np.float32(1.0))
    np.testing.assert_array_equal(got, want)
    assert theory.spectrum_from_top_and_trace([1.0], 2.0, np.int64(5))[1].tolist() == [1, 4]


def _float(x: Fraction) -> float:
    """An exact rational as the nearest float64, ±inf beyond its range."""
    try:
        return float(x)
    except OverflowError:
        return float("inf") if x > 0 else float("-inf")


def _exact_moment_matrix(lam, lr, batch):
    """A of linreg_moment_matrix in exact rational arithmetic."""
    lam = [Fraction(x) for x in lam]
    lr, b = Fraction(lr), Fraction(batch)
    return [[(1 - 2 * lr * li + lr**2 * li**2 * (1 + 1 / b) if i == j else 0)
             + lr**2 / b * li * lj for j, lj in enumerate(lam)] for i, li in enumerate(lam)]


def test_linreg_moment_matrix_beyond_float_range():
    """Entries beyond float64 are inf (was an OverflowError at lr = 1e300); entries within
    range are exact even when lr·λ over/underflows on the way."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(theory.linreg_moment_matrix([1.0], 1e300, 1), [[np.inf]])
        a = theory.linreg_moment_matrix([1.0, 0.0], 1e155, 1)
        np.testing.assert_array_equal(a, [[np.inf, 0.0], [0.0, 1.0]])
        lam, lr, batch = [1e-300, 1e300], 1e30, 1e155
        a = theory.linreg_moment_matrix(lam, lr, batch)
    exact = _exact_moment_matrix(lam, lr, batch)
    assert a[0, 0] == _float(exact[0][0])
    assert a[0, 1] == pytest.approx(_float(exact[0][1]), rel=1e-12)  # 1e-95: via logs
    assert a[1, 1] == np.inf and _float(exact[1][1]) == np.inf


def test_expected_loss_change_tiny_and_huge_steps_exact():
    """No NaN from ½ε underflowing to 0 while tr(HΣ)/B overflows (and vice versa)."""
    cases = [(5e-324, 5e-324, 1e308, 1.0, 10.0, 100), (1e300, 1e-10, 1.0, -2e10, 1.0, None),
             (1e-200, 1e-200, 0.0, 1.0, 1e300, None)]
    for lr, batch, grad_sq, g_h_g, tr_h_sigma, n_data in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = theory.expected_loss_change(lr, batch, grad_sq, g_h_g, tr_h_sigma,
                                              n_data=n_data)
        f = [Fraction(x) for x in (lr, batch, grad_sq, g_h_g, tr_h_sigma)]
        noise = f[4] / f[1] * ((Fraction(n_data) - f[1]) / (n_data - 1) if n_data else 1)
        exact = -f[0] * f[2] + f[0] ** 2 * (f[3] + noise) / 2
        assert got == pytest.approx(_float(exact), rel=1e-12, abs=1e-320)


def test_quadratic_stats_derived_values_do_not_overflow_to_nan():
    s = theory.QuadraticStats(5e-324, -1.0, 2.0, 4.0)
    assert s.delta_loss_max == np.inf and s.eps_opt(3) == np.inf  # was 0·inf = NaN
    s = theory.QuadraticStats(1e300, 1e-300, 0.0, 1.0)  # ε_max overflows, ε_opt does not
    assert s.eps_max == np.inf
    assert s.eps_opt(1.0) == pytest.approx(float(Fraction(1e300) / (Fraction(1e-300) + 1)))
    # indefinite H: ε_opt = |G|²/(GᵀHG + tr(HΣ)/B) while that is positive, else inf
    s = theory.QuadraticStats(2.0, 1.0, 1.0, -4.0)
    np.testing.assert_allclose(s.eps_opt(np.array([8.0, 2.0])), [2.0 / 0.5, np.inf])


def test_fit_steps_examples_is_scale_free():
    """S_min/S + E_min/E = 1 is homogeneous: scaled data give scaled parameters."""
    s, e = theory.steps_examples(np.array([1.0, 10.0, 100.0]), 50.0, 500.0)
    s_min, e_min = theory.fit_steps_examples(s * 1e300, e * 1e-300)
    assert s_min == pytest.approx(50.0e300, rel=1e-8)
    assert e_min == pytest.approx(500.0e-300, rel=1e-8)


def test_symmetry_and_psd_checks_at_huge_scale():
    g = [1e-300, 0.0]
    s = theory.quadratic_stats(np.eye(2) * 1e-300, np.eye(2) * 1e300, g)
    assert s.tr_sigma == 2e300
    with pytest.raises(ValueError, match="sigma must be positive semi-definite"):
        theory.quadratic_stats(np.eye(2), [[1e300, 2e300], [2e300, 1e300]], g)


def test_linreg_stability_limit_is_scale_free():
    """η_c(cλ) = η_c(λ)/c: huge and tiny spectra work where the result is representable."""
    lam = np.array([1.0, 0.3, 0.01])
    for c in (1e-300, 1e-150, 1e150, 1e300):
        for nesterov in (False, True):
            got = theory.linreg_stability_limit(lam * c, 3, momentum=0.7, nesterov=nesterov)
            want = theory.linreg_stability_limit(lam, 3, momentum=0.7, nesterov=nesterov) / c
            assert got == pytest.approx(want, rel=1e-13)


def test_stationary_moments_closed_form_equals_dense_solve():
    rng = np.random.default_rng(4)
    for batch in (1, 3, 20):
        lam = rng.uniform(0.01, 2.0, size=6)
        lr = 0.8 * theory.linreg_stability_limit(lam, batch)
        a = theory.linreg_moment_matrix(lam, lr, batch)
        want = np.linalg.solve(np.eye(6) - a, lr**2 / batch * 0.7 * lam)
        got = memory.stationary_moments(lam, lr, batch, noise_var=0.7)
        np.testing.assert_allclose(got, want, rtol=1e-11)


def test_stationary_moments_at_tiny_lr():
    """Was 'Singular matrix' (I − A rounds to 0): m* = ησ²/(2B) (1 + O(η)) as η → 0."""
    got = memory.stationary_moments([1.0, 0.3], 1e-300, 4, noise_var=2.0)
    np.testing.assert_allclose(got, 1e-300 * 2.0 / 8, rtol=1e-14)


def test_zero_eigenvalue_direction_does_not_change_the_memory_curve():
    """A λ = 0 direction never moves and enters no loss (was a singular solve)."""
    with_zero = memory.memory_curve([1.0, 0.0, 0.4], 0.2, 2, [1, 4, 30], noise_var=0.5)
    without = memory.memory_curve([1.0, 0.4], 0.2, 2, [1, 4, 30], noise_var=0.5)
    np.testing.assert_allclose(with_zero, without, rtol=1e-12)


def test_memory_gap_is_scale_free():
    """Δ(λ, η, σ², m) = L Δ(λ/L, ηL, σ²/L, m): at L = 1e-300 it no longer overflows."""
    lam, lags = np.array([1.0, 0.25]), [1, 3, 10]
    want = memory.memory_gap(lam, 0.2, 2, lags, noise_var=1.0, moments=[0.3, 0.1])
    got = memory.memory_gap(lam * 1e-300, 0.2e300, 2, lags, noise_var=1e-300,
                            moments=[0.3, 0.1])
    np.testing.assert_allclose(got, want * 1e-300, rtol=1e-10)
    # and linear in (σ², m) jointly, up to 1e300
    big = memory.memory_gap(lam, 0.2, 2, lags, noise_var=1e300, moments=[0.3e300, 0.1e300])
    np.testing.assert_allclose(big, want * 1e300, rtol=1e-12)
