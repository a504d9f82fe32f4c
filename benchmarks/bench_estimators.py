"""Cost of the noise-scale estimators relative to one pass over the gradient.

Run:  python benchmarks/bench_estimators.py [--p 1000000] [--n 32] [--backend numpy|torch]

For each estimator: wall time per call and its ratio to the time of |g|² = (g*g).sum() on the
same data (one pass over the gradient: p numbers for the streaming estimators, n·p for the
per-sample ones). Also the number of matvecs (Hessian-vector products, the real cost) that
Lanczos, power iteration and Hutchinson need on a test spectrum.
"""

from __future__ import annotations

import argparse
import os
import timeit

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread: stable timings on a shared machine

import numpy as np  # noqa: E402

from sgdtheory import estimators as est  # noqa: E402
from sgdtheory import krylov  # noqa: E402
from sgdtheory.backend import get_backend  # noqa: E402


def best_time(fn, number=5, repeat=10):
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=int, default=1_000_000, help="number of parameters")
    parser.add_argument("--n", type=int, default=32, help="per-example gradients")
    parser.add_argument("--backend", choices=["numpy", "torch"], default="numpy")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    g = rng.normal(size=args.p)
    per = rng.normal(size=(args.n, args.p)) + 0.1
    be = get_backend(args.backend)  # torch reads OMP_NUM_THREADS=1 (set above): one thread
    g, per = be.asarray(g), be.asarray(per)
    g_small, g_big = g, g * 0.5

    one_pass = best_time(lambda: float((g * g).sum()))
    one_pass_n = best_time(lambda: float((per * per).sum()), number=2, repeat=3)
    ema = est.NoiseScaleEMA()
    seq = est.SequentialNoiseScale(8, 64)
    for _ in range(8):
        seq.update(g)
    rows = [
        ("|g|^2 (one pass over p)", one_pass, one_pass),
        ("two_batch + its two squared norms",
         best_time(lambda: est.two_batch(float((g_small * g_small).sum()),
                                         float((g_big * g_big).sum()), 64, 512)), one_pass),
        ("two_batch alone (on two floats)",
         best_time(lambda: est.two_batch(3.0, 1.2, 64, 512), number=2000), one_pass),
        ("NoiseScaleEMA.update (scalars only)",
         best_time(lambda: ema.update(1.0, 20.0), number=2000), one_pass),
        ("SequentialNoiseScale.update (k=8)", best_time(lambda: seq.update(g)), one_pass),
        (f"|g_i|^2 over n={args.n} per-example grads", one_pass_n, one_pass_n),
        ("per_sample", best_time(lambda: est.per_sample(per), number=2, repeat=3), one_pass_n),
        ("per_sample_stats (jackknife)",
         best_time(lambda: est.per_sample_stats(per), number=2, repeat=3), one_pass_n),
    ]
    print(f"backend={args.backend}  p={args.p:,}  n={args.n}  (float64, 1 thread)")
    print(f"{'estimator':42s} {'time':>10s} {'x one pass':>11s}")
    for name, t, base in rows:
        print(f"{name:42s} {t * 1e3:8.3f}ms {t / base:10.2f}x")

    dim = 2000
    lam = np.concatenate([[10.0, 9.0, 7.0], np.linspace(5.0, 0.0, dim - 3)])
    count = {"n": 0}

    def mv(v):
        count["n"] += 1
        return lam * v

    print(f"\nmatvecs to converge (diagonal test matrix, dim={dim}, λ = 10, 9, 7, then ≤ 5):")
    for method in ("lanczos", "power"):
        count["n"] = 0
        vals = krylov.top_eigenvalues(mv, dim, 1, method=method, tol=1e-8, seed=0)
        print(f"  top_eigenvalues(method={method!r:10s}) λ_max={vals[0]:.12f}  "
              f"{count['n']:5d} matvecs")
    d = 500  # traces on rotated (non-diagonal) matrices: Rademacher probes are exact on diagonals
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    for name, spec in (("flat (uniform [0, 1])", rng.uniform(size=d)),
                       ("decaying (100·0.97^i)", 100.0 * 0.97 ** np.arange(d))):
        a = (q * spec) @ q.T
        for method in ("hutchinson", "hutch++"):
            e, s = krylov.hutchinson_trace(lambda v, a=a: a @ v, d, 99, seed=0, method=method)
            print(f"  hutchinson_trace(method={method!r:12s}) {name:22s} {e:8.2f} ± {s:6.2f}"
                  f" (truth {spec.sum():.2f}, dim {d}), 99 matvecs")

if __name__ == "__main__":
    main()
