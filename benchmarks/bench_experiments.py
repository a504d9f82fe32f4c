"""Costs of python -m validate.experiments, as ratios measured in one run (digits, CPU).

    python benchmarks/bench_experiments.py [--jobs 16] [--points 21]

1. The reference run's measurement cost ÷ its training time: the lr sweep's reference run
   (digits, the small CNN, 20 epochs) measured at ``--points`` steps (hessian_noise, Lanczos
   top-8, Hutch++), measurement seconds ÷ training seconds (both from the run's own timing).
2. Sweep wall time with 2 workers ÷ 1 worker: ``--jobs`` training runs of the lr sweep's grid
   (the first ones of the default grid: B = 32, N = 1,437, every factor and seed) through the
   runner on a spawned process pool of 1 and of 2 workers, each warmed up first (process
   start, torch import and first-use costs, which a long sweep amortises, are reported apart).
   Ideal on 2 idle cores: 0.5. The same ratio for a pure-Python loop is printed beside it: what
   the (shared) machine gives two processes at all.

Prints ``uptime``'s load average beside the ratios (the development machine is shared).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import tempfile
import time

import torch


def _spin(n: int) -> float:
    """A pure-Python loop: the machine's own parallel capacity, without torch."""
    s = 0
    for i in range(n):
        s += i * i
    return float(s > 0)


def _load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    from validate.experiments import cli, lr_sweep, runner, runs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=16, help="training runs in the 1 vs 2 test")
    p.add_argument("--points", type=int, default=21, help="reference measurement points")
    args = p.parse_args()
    torch.set_num_threads(1)
    ns = cli.build_parser().parse_args(["lr_sweep", "--device", "cpu"])
    ctx = cli.make_context(ns, lr_sweep)
    data = runner.load_data_cached(ctx.data, ctx.identity["sha256"])

    # 1. measurement cost of the reference run
    job = lr_sweep.reference_job(ctx)
    settings = {**job.settings, "measure": {**job.settings["measure"], "points": args.points}}
    t0 = time.perf_counter()
    ref = runs.reference_run(settings, data, "cpu")
    wall = time.perf_counter() - t0
    t = ref["timing"]
    print(f"reference run: {ref['steps']} steps in {t['train_s']:.1f} s of training, "
          f"{len(ref['measurements'])} measurements in {t['measure_s']:.1f} s "
          f"({t['measure_s'] / len(ref['measurements']):.2f} s each; wall {wall:.1f} s)")
    print(f"  measurement ÷ training time: {t['measure_s'] / t['train_s']:.2f}   ({_load()})")

    # 2. 2 workers vs 1 worker on the same jobs, each a warmed-up process pool
    jobs = lr_sweep.jobs(ctx)[: args.jobs]
    common = {"spec": ctx.data, "identity": ctx.identity, "device_type": "cpu",
              "progress": False, "force": True}
    warm = lr_sweep.jobs(ctx)[-1]  # a short run (B = 128, N = 179): first-use costs
    walls = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            ctx_mp = mp.get_context("spawn")
            with cf.ProcessPoolExecutor(n, mp_context=ctx_mp, initializer=runner._init_worker,
                                        initargs=(1, [], ctx_mp.Value("i", 0))) as pool:
                t0 = time.perf_counter()
                for f in [pool.submit(runner.execute, warm.fn, warm.settings, ctx.data,
                                      ctx.identity["sha256"], "cpu") for _ in range(2 * n)]:
                    f.result()
                ready = time.perf_counter()
                runner.run_jobs(jobs, executor=pool, out=f"{tmp}/{n}", **common)
                walls[n] = (time.perf_counter() - ready, ready - t0)
        spins = {}
        for n in (1, 2):
            with cf.ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) as pool:
                list(pool.map(_spin, [10**5] * n))
                t0 = time.perf_counter()
                list(pool.map(_spin, [3 * 10**6] * 8))
                spins[n] = time.perf_counter() - t0
    one, two = walls[1][0], walls[2][0]
    print(f"{len(jobs)} training runs on warmed-up pools: 1 worker {one:.1f} s, 2 workers "
          f"{two:.1f} s (start-up and warm-up {walls[1][1]:.1f} s and {walls[2][1]:.1f} s)")
    print(f"  2 workers ÷ 1 worker: {two / one:.2f}; the same for a pure-Python loop (the "
          f"machine's parallel capacity): {spins[2] / spins[1]:.2f}   ({_load()})")


if __name__ == "__main__":
    main()
