"""The momentum stability limit of theory.linreg_stability_limit against brute force.

References written here, independent of the secular equation in theory.py:
* the full second-moment map of z = (e, v) on all (2d)² entries, built from the Gaussian
  identity E[x xᵀ M x xᵀ] = 2HMH + tr(HM)H with Kronecker products, its spectral radius by
  numpy.linalg.eigvals, and the lr where it crosses 1 by bisection;
* the plain-SGD secular equation as it was before momentum was added (μ = 0 reference);
* Monte Carlo of sgdtheory.simulate.run (torch heavy ball / Nesterov) on
  problems.LinearRegression at 0.9× and 1.1× the limit, against the exact mean loss of the
  same map iterated as an operator, |mean − exact| ≤ 4 s.e.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize

from sgdtheory import problems, simulate, theory


def _ab(lr, momentum, nesterov):
    """e' = e − a g − b v, v' = μv + g: (a, b) of torch heavy ball and torch Nesterov."""
    return (lr * (1 + momentum), lr * momentum**2) if nesterov else (lr, lr * momentum)


def _blocks(lam, lr, momentum, nesterov):
    d = lam.size
    eye, zero = np.eye(d), np.zeros((d, d))
    a, b = _ab(lr, momentum, nesterov)
    f = np.block([[eye, -b * eye], [zero, momentum * eye]])  # the g-free part of z → z'
    c = np.vstack([-a * eye, eye])  # g enters e' with −a and v' with +1
    pe = np.hstack([eye, zero])  # z → e
    return f, c, pe


def full_moment_matrix(lam, lr, batch, momentum, nesterov):
    """T with vec(E[z'z'ᵀ]) = T vec(E[zzᵀ]) on all (2d)² entries (row-major vec).

    z' = (F + C Ĥ Pe) z with Ĥ = (1/B) Σ x_i x_iᵀ; E[Ĥ ⊗ Ĥ] = (1/B) E[xxᵀ ⊗ xxᵀ]
    + (1 − 1/B) H ⊗ H and E[xxᵀ ⊗ xxᵀ] = 2 H ⊗ H + vec(H) vec(H)ᵀ (the Gaussian identity).
    """
    lam = np.asarray(lam, dtype=float)
    h = np.diag(lam)
    f, c, pe = _blocks(lam, lr, momentum, nesterov)
    lin = c @ h @ pe
    hh = np.kron(h, h)
    e_hh = (2 * hh + np.outer(h.ravel(), h.ravel())) / batch + (1 - 1 / batch) * hh
    return (np.kron(f, f) + np.kron(lin, f) + np.kron(f, lin)
            + np.kron(c, c) @ e_hh @ np.kron(pe, pe))


def radius(lam, lr, batch, momentum, nesterov):
    t = full_moment_matrix(lam, lr, batch, momentum, nesterov)
    return float(np.max(np.abs(np.linalg.eigvals(t))))


def bisected_limit(lam, batch, momentum, nesterov):
    """The lr where ρ of the full matrix crosses 1, by bisection on [0, GD limit]."""
    lo, hi = 0.0, theory.gd_stability_limit(max(lam), momentum, nesterov=nesterov)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if radius(lam, mid, batch, momentum, nesterov) < 1 else (lo, mid)
    return 0.5 * (lo + hi)


def plain_limit_reference(lam, batch):
    """The μ = 0 limit as implemented before momentum: root of (η/B)Σλ/(2 − ηλ(1+1/B)) = 1."""
    lam = np.asarray(lam, dtype=float)

    def margin(lr):
        return lr / batch * np.sum(lam / (2.0 - lr * lam * (1.0 + 1.0 / batch))) - 1.0

    pole = 2.0 * batch / ((batch + 1.0) * lam.max())
    hi = pole * (1.0 - 1e-15)
    while margin(hi) < 0:
        hi = 0.5 * (hi + pole)
    return optimize.brentq(margin, 0.0, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps)


def _random_cases(n, seed):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        d = int(rng.integers(1, 4))
        lam = rng.uniform(0.05, 3.0, size=d)
        batch = float(rng.choice([1, 2, 3, 7, 50]))
        yield lam, batch, float(rng.uniform(0.0, 0.95))


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize(("lam", "batch", "momentum"), list(_random_cases(6, seed=11)))
def test_limit_is_where_the_full_moment_matrix_reaches_radius_one(lam, batch, momentum,
                                                                  nesterov):
    eta_c = theory.linreg_stability_limit(lam, batch, momentum=momentum, nesterov=nesterov)
    assert radius(lam, eta_c * (1 - 1e-6), batch, momentum, nesterov) < 1
    assert radius(lam, eta_c * (1 + 1e-6), batch, momentum, nesterov) > 1
    assert eta_c == pytest.approx(bisected_limit(lam, batch, momentum, nesterov), rel=1e-9)


@pytest.mark.parametrize("nesterov", [False, True])
def test_stable_set_is_the_interval_below_the_limit(nesterov):
    """ρ < 1 exactly for 0 < η < η_c on a grid up to 1.5× the GD limit (no second window)."""
    lam, batch, mu = np.array([1.0, 0.6, 0.15]), 2, 0.8
    eta_c = theory.linreg_stability_limit(lam, batch, momentum=mu, nesterov=nesterov)
    top = 1.5 * theory.gd_stability_limit(lam.max(), mu, nesterov=nesterov)
    for lr in np.linspace(1e-3, top, 120):
        if abs(lr / eta_c - 1) > 1e-6:
            assert (radius(lam, lr, batch, mu, nesterov) < 1) == (lr < eta_c), lr


@pytest.mark.parametrize("nesterov", [False, True])
def test_counts_equal_repeated_eigenvalues(nesterov):
    lam, counts = np.array([2.0, 0.7, 0.3, 0.0]), np.array([1, 3, 6, 2])
    repeated = np.repeat(lam, counts)
    for batch in (1.0, 4.0, 1000.0):
        got = theory.linreg_stability_limit(lam, batch, momentum=0.6, nesterov=nesterov,
                                            counts=counts)
        want = theory.linreg_stability_limit(repeated, batch, momentum=0.6, nesterov=nesterov)
        assert got == pytest.approx(want, rel=1e-12)
    # and against the full matrix of the repeated spectrum (d = 4 here: small)
    small, n_small = np.array([1.5, 0.4]), np.array([1, 3])
    got = theory.linreg_stability_limit(small, 2, momentum=0.5, nesterov=nesterov,
                                        counts=n_small)
    assert got == pytest.approx(bisected_limit(np.repeat(small, n_small), 2, 0.5, nesterov),
                                rel=1e-9)


@pytest.mark.parametrize("nesterov", [False, True])
def test_zero_momentum_is_the_plain_limit(nesterov):
    rng = np.random.default_rng(3)
    for batch in (1, 2, 10, 300, 1e5):
        lam = rng.uniform(0.0, 2.0, size=25)
        got = theory.linreg_stability_limit(lam, batch, momentum=0.0, nesterov=nesterov)
        assert got == pytest.approx(plain_limit_reference(lam, batch), rel=1e-12)
    assert theory.linreg_stability_limit(lam, 3) == pytest.approx(
        plain_limit_reference(lam, 3), rel=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99])
def test_large_and_small_batch_limits(momentum, nesterov):
    lam = np.array([3.0, 1.0, 0.5, 0.01])
    gd = theory.gd_stability_limit(lam.max(), momentum, nesterov=nesterov)
    big = theory.linreg_stability_limit(lam, 1e12, momentum=momentum, nesterov=nesterov)
    assert big == pytest.approx(gd, rel=1e-9)
    assert big < gd
    # B → 0: η_c/(B(1 − μ)) → κ, the root of Σ κλ/(2 − κλ) = 1
    kappa = optimize.brentq(lambda k: np.sum(k * lam / (2 - k * lam)) - 1, 0,
                            1.999 / lam.max())
    tiny = theory.linreg_stability_limit(lam, 1e-9, momentum=momentum, nesterov=nesterov)
    assert tiny / (1e-9 * (1 - momentum)) == pytest.approx(kappa, rel=1e-6)
    # a spectrum with tr H / λ_max = 1000: linear in B over B = 1 … 8
    bulk = np.full(999, 1.0)
    spec = np.append(1.0, bulk)
    eta = np.asarray(theory.linreg_stability_limit(spec, np.array([1.0, 2.0, 4.0, 8.0]),
                                                   momentum=momentum, nesterov=nesterov))
    np.testing.assert_allclose(eta / [1, 2, 4, 8], 2 * (1 - momentum) / spec.sum(), rtol=0.02)


def _exact_mean_loss(lam, lr, batch, momentum, nesterov, steps, every):
    """½ tr(H E[eeᵀ]) from iterating the full (2d × 2d) moment map as an operator."""
    h = np.diag(lam)
    f, c, pe = _blocks(lam, lr, momentum, nesterov)
    lin = c @ h @ pe
    z0 = np.r_[np.ones(lam.size), np.zeros(lam.size)]  # default theta0 = w* + 1, v = 0
    m = np.outer(z0, z0)
    out = []
    for t in range(steps + 1):
        if t % every == 0:
            out.append(0.5 * np.trace(h @ m[:lam.size, :lam.size]))
        x = pe @ m @ pe.T
        e_hxh = ((batch + 1) * h @ x @ h + np.trace(h @ x) * h) / batch
        m = f @ m @ f.T + lin @ m @ f.T + f @ m @ lin.T + c @ e_hxh @ c.T
    return np.array(out), out[-1] / out[-2]


@pytest.mark.slow
@pytest.mark.parametrize(("momentum", "nesterov", "steps"), [(0.9, False, 160), (0.5, True, 48)])
@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_simulated_momentum_sgd_contracts_below_and_grows_above_the_limit(momentum, nesterov,
                                                                         steps, factor):
    """simulate.run at 0.9× / 1.1× η_c: mean loss = the exact moment map within 4 s.e.

    40 directions with tr H / λ_max = 21 ≫ B = 4, so η_c is set by the gradient noise (far
    below the GD limit); many directions keep the loss distribution light-tailed over the
    ~e^{±1.5} change simulated here (a few directions do not: the mean of a product of
    random matrices is then carried by rare replicas).
    """
    lam, batch, replicas, every = np.linspace(1.0, 0.05, 40), 4, 3000, steps // 4
    eta_c = theory.linreg_stability_limit(lam, batch, momentum=momentum, nesterov=nesterov)
    assert eta_c < 0.2 * theory.gd_stability_limit(1.0, momentum, nesterov=nesterov)
    lr = factor * eta_c
    exact, late_rate = _exact_mean_loss(lam, lr, batch, momentum, nesterov, steps, every)
    assert (late_rate < 1) == (factor < 1)
    res = simulate.run(problems.LinearRegression(lam), lr=lr, batch=batch, momentum=momentum,
                       nesterov=nesterov, steps=steps, replicas=replicas, record_every=every,
                       divergence_factor=1e300, seed=0)
    loss = np.asarray(res.train_loss)
    assert not res.diverged.any()
    mean, se = loss.mean(0), loss.std(0, ddof=1) / np.sqrt(replicas)
    assert np.all(np.abs(mean[1:] - exact[1:]) <= 4 * se[1:])
    assert mean[0] == pytest.approx(exact[0], rel=1e-12)
    # the loss has contracted (0.9×) or grown (1.1×) by far more than its error
    if factor < 1:
        assert mean[-1] + 4 * se[-1] < 0.5 * exact[0]
    else:
        assert mean[-1] - 4 * se[-1] > 2 * exact[0]


def test_spectrum_from_top_and_trace_flat_tail_is_exact():
    """A spectrum whose tail is flat is represented exactly: same η_c as all p eigenvalues."""
    top = np.array([4.0, 2.5, 1.0])
    p, tail = 5000, 0.01
    full = np.append(top, np.full(p - 3, tail))
    lam, counts = theory.spectrum_from_top_and_trace(top, full.sum(), p)
    np.testing.assert_allclose(lam, [4.0, 2.5, 1.0, tail], rtol=1e-12)
    np.testing.assert_array_equal(counts, [1, 1, 1, p - 3])
    assert counts @ lam == pytest.approx(full.sum(), rel=1e-14)
    for nesterov in (False, True):
        for batch in (1, 32, 4096):
            got = theory.linreg_stability_limit(lam, batch, momentum=0.9, nesterov=nesterov,
                                                counts=counts)
            want = theory.linreg_stability_limit(full, batch, momentum=0.9, nesterov=nesterov)
            assert got == pytest.approx(want, rel=1e-11)


def test_spectrum_from_top_and_trace_edge_cases():
    # the top eigenvalues hold the whole trace, or p = k: no bulk entry
    lam, counts = theory.spectrum_from_top_and_trace([3.0, 1.0], 4.0, 100)
    assert lam.tolist() == [3.0, 1.0] and counts.tolist() == [1.0, 1.0]
    lam, counts = theory.spectrum_from_top_and_trace([3.0, 1.0], 4.0, 2)
    assert lam.tolist() == [3.0, 1.0]
    # a deficit within 2 standard errors is a Hutchinson fluctuation: bulk = 0
    lam, counts = theory.spectrum_from_top_and_trace([3.0, 1.0], 3.5, 100, trace_se=0.3)
    assert lam.tolist() == [3.0, 1.0]
    with pytest.raises(ValueError, match="trace"):
        theory.spectrum_from_top_and_trace([3.0, 1.0], 3.5, 100, trace_se=0.2)
    with pytest.raises(ValueError, match="trace"):
        theory.spectrum_from_top_and_trace([3.0, 1.0], 3.5, 100)
    with pytest.raises(ValueError, match="trace"):  # p = k but more trace than eigenvalues
        theory.spectrum_from_top_and_trace([3.0, 1.0], 5.0, 2)
    with pytest.raises(ValueError, match="trace"):  # bulk 1.0 per direction > min top 0.5
        theory.spectrum_from_top_and_trace([3.0, 0.5], 13.5, 12)
    with pytest.raises(ValueError, match="dim"):
        theory.spectrum_from_top_and_trace([3.0, 1.0], 5.0, 1)
    with pytest.raises(ValueError, match="top_eigenvalues"):
        theory.spectrum_from_top_and_trace([3.0, -1.0], 5.0, 10)
    with pytest.raises(ValueError, match="trace_se"):
        theory.spectrum_from_top_and_trace([3.0], 5.0, 10, trace_se=-1.0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": [0.1, 0.2]}, "momentum"),
        ({"nesterov": "False"}, "nesterov"),
        ({"nesterov": 1}, "nesterov"),
        ({"counts": [1.0]}, "counts"),
        ({"counts": [1.0, 0.0]}, "counts"),
        ({"counts": [1.0, np.inf]}, "counts"),
        ({"counts": [1e308, 1e308]}, "counts"),
    ],
)
def test_momentum_limit_bad_input_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        theory.linreg_stability_limit([1.0, 1.0], 2, **kwargs)
