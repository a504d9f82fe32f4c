"""Speed of the Monte Carlo simulator; every ratio is measured within this one run.

1. Noisy quadratic model, float32, R replicas × p dimensions (default 1,000 × 1,000):
   throughput of :func:`sgdtheory.simulate.run` in replica·dimension updates per second,
   against (a) the same backend's Gaussian fill rate (``Generator.standard_normal(out=...,
   dtype=float32)`` / ``torch.randn(out=...)``) — target ≥ 0.8 — and (b) a straightforward
   float64 NumPy loop — target ≥ 2. On a GPU (CuPy / torch-CUDA, when present) also the
   throughput against the device memory bandwidth (bytes moved by a device-to-device copy).
2. Finite-data linear regression, the "curvature vs forgetting" sweep of Myrtle size:
   9 lr factors × 5 dataset sizes (2,048 … 32,768) × 2 batch sizes × 3 seeds, d = 200,
   20 epochs, float32 — target < 30 s on the 2-core CPU.

Run: ``python benchmarks/bench_simulate.py [--quick]``. BLAS and torch are limited to one
thread (the per-step products are small, where threads only contend; as in the test suite).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from sgdtheory import problems, simulate, theory  # noqa: E402
from sgdtheory.backend import available_backends, get_backend  # noqa: E402


def _interleaved(fns, repeat=5):
    """Fastest of ``repeat`` timings of each fn, taken in turn (robust to a busy machine)."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _rounds(fns, rounds):
    """Time every fn once per round, rotating the order; {name: [seconds per round]}.

    Interleaving exposes every fn to the same spells of load from other processes; the
    fastest repeat of each is then compared (as ``timeit`` recommends).
    """
    for fn in fns.values():
        fn()  # warm-up
    names = list(fns)
    times = {k: [] for k in names}
    for i in range(rounds):
        for k in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def nqm_rates(be, prob, replicas, steps, naive_steps, rounds=9):
    """Rates (updates/s) of simulate.run, of the Gaussian fill and of the naive loop (each the
    fastest of ``rounds`` interleaved repeats), and the ratios sim/fill and sim/naive.

    simulate.run: float32 plain SGD, constant lr, records at steps 0 and T only. Fill:
    ``steps`` calls of the backend's standard-normal fill into a preallocated (R, p) float32
    buffer (:meth:`sgdtheory.backend.Backend.standard_normal`). Naive: a straightforward
    float64 NumPy loop θ ← θ − η(hθ + √(c/B)·ξ) for ``naive_steps`` steps.
    """
    gen = be.rng(0)
    buf = be.empty((replicas, prob.dim), "float32")
    h = prob.h
    rng = np.random.default_rng(0)

    def fill():
        for _ in range(steps):
            be.standard_normal(gen, None, out=buf)
        be.synchronize()

    def sim():
        simulate.run(prob, lr=0.1, batch=8, steps=steps, replicas=replicas, seed=0,
                     record_steps=[0, steps], dtype="float32", backend=be, progress=False)
        be.synchronize()

    def naive(lr=0.1, batch=8):
        theta = np.ones((replicas, h.size))
        for _ in range(naive_steps):
            noise = np.sqrt(prob.c / batch) * rng.standard_normal((replicas, h.size))
            theta = theta - lr * (h * theta + noise)
        return theta

    t = _rounds({"sim": sim, "fill": fill, "naive": naive}, rounds)
    n = replicas * prob.dim
    # the fastest of the interleaved repeats: what each achieves when the machine is quiet
    rate = {k: n * (naive_steps if k == "naive" else steps) / min(v) for k, v in t.items()}
    return rate, rate["sim"] / rate["fill"], rate["sim"] / rate["naive"]


def numpy_ziggurat_rate(replicas, dim, steps):
    """Reference: ``np.random.Generator.standard_normal(out=buf, dtype=np.float32)`` rate."""
    gen = np.random.default_rng(0)
    buf = np.empty((replicas, dim), np.float32)

    def fill():
        for _ in range(steps):
            gen.standard_normal(out=buf, dtype=np.float32)

    return replicas * dim * steps / _interleaved([fill], 3)[0]


def bandwidth(be, n=1 << 27):
    """Device memory bandwidth (bytes/s) from a float32 device-to-device copy (read+write)."""
    a = be.zeros((n,), "float32")
    b = be.empty((n,), "float32")

    def go():
        for _ in range(10):
            b[...] = a  # an in-place device-to-device copy on every backend
        be.synchronize()

    return 10 * 2 * 4 * n / _interleaved([go], 3)[0]


def myrtle_sweep(n_sizes=(2048, 4096, 8192, 16384, 32768), batches=(32, 128), epochs=20,
                 d=200, seeds=3, backend="numpy"):
    """The Myrtle-sized sweep; returns (seconds, number of simulated runs)."""
    lam = 1.0 / np.arange(1, d + 1)
    b = np.asarray(batches)
    eta_c = np.asarray(theory.linreg_stability_limit(lam, b))
    lr = eta_c[:, None] * np.geomspace(0.02, 1.0, 9)  # 9 lr factors of the curvature limit
    t0 = time.perf_counter()
    runs = 0
    for n in n_sizes:
        prob = problems.LinearRegressionData(lam, n_data=n, noise_std=0.5, seed=n)
        res = simulate.run(prob, lr=lr, batch=b[:, None], epochs=epochs, replicas=seeds,
                           seed=0, dtype="float32", backend=backend, progress=False)
        runs += res.train_loss.shape[0] * res.train_loss.shape[1] * seeds
    return time.perf_counter() - t0, runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.replicas, args.dim, args.steps = 200, 200, 50
    r, p, steps = args.replicas, args.dim, args.steps
    h = np.geomspace(1.0, 1e-3, p)
    prob = problems.NoisyQuadratic(h, h)
    ok = True
    print(f"[1] noisy quadratic, float32, {r} replicas x {p} dims, {steps} steps "
          f"(updates/s = replica·dimension updates per second)")
    zig = numpy_ziggurat_rate(r, p, max(10, steps // 4))
    print(f"    reference: NumPy Generator.standard_normal float32 fill {zig:10.3e}/s (the numpy"
          f" backend fills float32 by Box-Muller: see Backend.standard_normal)")
    names = [n for n in available_backends() if n in ("numpy", "torch")]
    for name in names:
        be = get_backend(name)  # torch reads OMP_NUM_THREADS=1 (set above): one thread
        rate, ratio_fill, ratio_naive = nqm_rates(be, prob, r, steps, max(10, steps // 4))
        ok &= ratio_fill >= 0.8 and ratio_naive >= 2
        print(f"    {name:6s} CPU: simulate.run {rate['sim']:10.3e} updates/s | Gaussian fill "
              f"{rate['fill']:10.3e}/s | float64 NumPy loop {rate['naive']:10.3e} updates/s")
        print(f"           ratio simulate/fill {ratio_fill:5.2f} (target >= 0.80) | ratio "
              f"simulate/naive loop {ratio_naive:5.2f} (target >= 2)")
    gpu = []
    if "cupy" in available_backends():
        gpu.append(get_backend("cupy"))
    if "torch" in available_backends():
        import torch

        if torch.cuda.is_available():
            gpu.append(get_backend("torch", device="cuda"))
    for be in gpu:
        rr = max(r, 100_000)  # a GPU needs more replicas to be busy
        rate, ratio, _ = nqm_rates(be, prob, rr, steps, 2, rounds=3)
        sim = rate["sim"]
        bw = bandwidth(be)
        # bytes per update: ≈ 5 float32 accesses (noise write+read, θ read+write twice)
        print(f"    {be.name}-{be.device} GPU ({rr} replicas): simulate.run {sim:10.3e} "
              f"updates/s | fill {rate['fill']:10.3e}/s | ratio to fill {ratio:5.2f} | "
              f"memory bandwidth {bw / 1e9:7.1f} GB/s = {bw / 20:10.3e} updates/s at "
              f"20 B/update | ratio to bandwidth {sim / (bw / 20):5.2f}")
    if not gpu:
        print("    (no GPU here: CuPy / torch-CUDA throughput vs memory bandwidth not measured)")

    print("[2] finite-data linear regression sweep: 9 lr x 5 N (2,048..32,768) x 2 B x 3 seeds,"
          " d=200, 20 epochs, float32")
    if args.quick:
        secs, runs = myrtle_sweep(n_sizes=(512, 1024), epochs=2)
        print(f"    (quick) {runs} runs in {secs:.2f} s")
    else:
        secs, runs = myrtle_sweep()
        ok &= secs < 30
        print(f"    numpy: {runs} runs in {secs:.2f} s (target < 30 s)")
    print("ALL TARGETS MET" if ok else "SOME TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
