"""Hypothesis properties of sgdtheory.estimators: scale and permutation invariance, exact
unbiasedness on enumerated finite datasets, positivity, consistency as n grows, and equality
with sgdtheory.theory on quadratic problems."""

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sgdtheory import estimators as est
from sgdtheory import theory

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
seeds = st.integers(0, 2**31 - 1)
scales = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)


@st.composite
def gradient_samples(draw, n_min=3, n_max=12):
    n = draw(st.integers(n_min, n_max))
    p = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(seeds))
    offset = draw(st.floats(0.2, 3.0))
    return rng.normal(size=(n, p)) + offset * rng.normal(size=p)


def close(a, b, rel=1e-9):
    """Relative closeness; equal infinities (a clamped ratio with |G|² ≤ 0) count as close."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    same_inf = np.isinf(a) & (a == b)
    a, b = np.where(same_inf, 0.0, a), np.where(same_inf, 0.0, b)
    return np.allclose(a, b, rtol=rel, atol=1e-12 * max(np.abs(b).max(), 1.0))


@SETTINGS
@given(gradient_samples(), scales)
def test_b_simple_unchanged_when_gradients_are_scaled(grads, c):
    ref = est.per_sample_stats(grads)
    scaled = est.per_sample_stats(c * grads)
    assert close(scaled.b_simple, ref.b_simple)
    assert close(scaled.b_simple_stderr, ref.b_simple_stderr, rel=1e-7)
    assert close(scaled.grad_sq, c * c * ref.grad_sq) and close(scaled.tr_sigma,
                                                                c * c * ref.tr_sigma)
    # two batch sizes and the streaming average: squared norms scale by c²
    sq = (grads**2).sum(1)
    small, big = sq[: len(sq) // 2 + 1], sq[len(sq) // 2:]
    m = min(len(small), len(big))
    r1 = est.two_batch_stats(small[:m], big[:m] / 3.0, 2, 6)
    r2 = est.two_batch_stats(c * c * small[:m], c * c * big[:m] / 3.0, 2, 6)
    assert close(r1.b_simple, r2.b_simple)
    e1, e2 = est.NoiseScaleEMA(0.8), est.NoiseScaleEMA(0.8)
    for a, b in zip(sq, sq[::-1], strict=True):
        e1.update(a - b / 2, b)
        e2.update(c * c * (a - b / 2), c * c * b)
    assert close(e1.b_simple, e2.b_simple)
    assert e1.reliable == e2.reliable


@SETTINGS
@given(gradient_samples(), seeds)
def test_estimators_invariant_to_sample_order(grads, seed):
    perm = np.random.default_rng(seed).permutation(len(grads))
    assert close(est.per_sample(grads[perm]), est.per_sample(grads))
    a, b = est.per_sample_stats(grads[perm]), est.per_sample_stats(grads)
    assert close([a.grad_sq_stderr, a.tr_sigma_stderr, a.cov],
                 [b.grad_sq_stderr, b.tr_sigma_stderr, b.cov], rel=1e-7)
    sq = (grads**2).sum(1)
    r1 = est.two_batch_stats(sq, sq / 4, 1, 8)
    r2 = est.two_batch_stats(sq[perm], sq[perm] / 4, 1, 8)
    assert close([r1.grad_sq, r1.tr_sigma, r1.grad_sq_stderr],
                 [r2.grad_sq, r2.tr_sigma, r2.grad_sq_stderr], rel=1e-7)


@SETTINGS
@given(gradient_samples(n_min=2, n_max=5), st.booleans())
def test_exactly_unbiased_on_enumerated_finite_datasets(grads, replace):
    """Averaging two_batch / per_sample over *every* batch gives the population |G|² and tr(Σ),
    so tr(Σ) ≥ 0 in expectation (individual two-batch estimates may be negative)."""
    n = len(grads)
    g = grads.mean(0)
    tr = np.sum((grads - g) ** 2) / n  # 1/N normalisation
    b_small, b_big = (1, 3) if replace else (1, n)

    def mean_sq(b):
        combos = (itertools.product(range(n), repeat=b) if replace
                  else itertools.combinations(range(n), b))
        return np.mean([np.sum(grads[list(c)].mean(0) ** 2) for c in combos])

    kw = {} if replace else {"n_data": n}
    gs, ts = est.two_batch(mean_sq(b_small), mean_sq(b_big), b_small, b_big, **kw)
    assert close([gs, ts], [g @ g, tr], rel=1e-9)
    assert ts >= -1e-12 * max(tr, 1.0)
    if not replace:
        k = 2
        vals = np.mean([est.per_sample(grads[list(c)], n_data=n)
                        for c in itertools.combinations(range(n), k)], axis=0)
        assert close(vals, [g @ g, tr], rel=1e-9)
    assert est.per_sample(grads)[1] >= 0.0


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seeds, st.integers(1, 8), st.floats(0.3, 3.0))
def test_per_sample_converges_as_n_grows(seed, p, g_scale):
    """RMS error over 100 replicates falls like 1/√n (×0.1 from n = 100 to 10,000)."""
    rng = np.random.default_rng(seed)
    g = g_scale * rng.normal(size=p) + 0.5
    chol = rng.normal(size=(p, p)) / np.sqrt(p)
    truth = np.array([g @ g, np.trace(chol @ chol.T)])
    rms, covered = [], None
    for n in (100, 10_000):
        r = est.per_sample_stats(g + rng.normal(size=(100, n, p)) @ chol.T)
        err = np.stack([r.grad_sq, r.tr_sigma], axis=-1) - truth
        rms.append(np.sqrt(np.mean(err**2, axis=0)))
        se = np.stack([r.grad_sq_stderr, r.tr_sigma_stderr], axis=-1)
        covered = np.mean(np.abs(err) <= 4 * se, axis=0)
    assert np.all(rms[1] < 0.15 * rms[0])  # 0.1 expected; RMS of 100 draws is good to ~10%
    assert np.all(covered >= 0.95)


@SETTINGS
@given(seeds, st.integers(1, 5), st.integers(4, 9))
def test_equal_to_theory_on_finite_quadratics(seed, p, n):
    """ℓ_i = ½(θ − c_i)ᵀH(θ − c_i): exact expectations of the estimators are quadratic_stats."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(p, p))
    h = a @ a.T / p + 0.2 * np.eye(p)
    grads = (rng.normal(size=p) - rng.normal(size=(n, p))) @ h
    g = grads.mean(0)
    sigma = (grads - g).T @ (grads - g) / n
    qs = theory.quadratic_stats(h, sigma, g)
    # the whole dataset as a sample without replacement: exact
    gs, ts = est.per_sample(grads, n_data=n)
    assert close([gs, ts], [qs.grad_sq, qs.tr_sigma], rel=1e-8)
    # E[ĝᵀHĝ] over all batches of size 1 and 2 (without replacement)
    def mean_ghg(b):
        return np.mean([grads[list(c)].mean(0) @ h @ grads[list(c)].mean(0)
                        for c in itertools.combinations(range(n), b)])

    ghg, ths = est.two_batch_curvature(mean_ghg(1), mean_ghg(2), 1, 2, n_data=n)
    assert close([ghg, ths], [qs.g_h_g, qs.tr_h_sigma], rel=1e-8)
    e_max, b_noise = est.curvature_scales(gs, ghg, ths)
    assert close([e_max, b_noise], [qs.eps_max, qs.b_noise], rel=1e-8)
    adv = est.advise_batch_size(max(b_noise, 1e-3), e_max, 1)
    assert close(adv.eps_opt_rec, theory.eps_opt(adv.recommended_batch, e_max,
                                                 max(b_noise, 1e-3)))
