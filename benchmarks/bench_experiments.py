"""Costs of python -m validate.experiments, as ratios measured in one run (digits, CPU).

    python benchmarks/bench_experiments.py [--jobs 16] [--points 21]

1. The reference run's measurement cost ÷ its training time: the lr sweep's reference run
   (digits, the small CNN, 20 epochs) measured at ``--points`` steps (hessian_noise, Lanczos
   top-8, Hutch++), measurement seconds ÷ training seconds (both from the run's own timing).
2. Sweep wall time with 2 workers ÷ 1 worker: ``--jobs`` training runs of the lr sweep's grid
   (the first ones of the default grid: B = 32, N = 1,437, every factor and seed) through the
   runner, once in this process (1 worker) and once on a local pool of 2 processes — with and
   without the pool's start-up (spawning workers and importing torch), which a long sweep
   amortises. Ideal on 2 idle cores: 0.5.

Prints ``uptime``'s load average beside the ratios (the development machine is shared).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


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

    # 2. 2 workers vs 1 worker on the same jobs
    jobs = lr_sweep.jobs(ctx)[: args.jobs]
    common = {"spec": ctx.data, "identity": ctx.identity, "device_type": "cpu",
              "progress": False, "force": True}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with runner.make_executor("local", 1) as (ex, _):
            runner.run_jobs(jobs, executor=ex, out=f"{tmp}/one", **common)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        with runner.make_executor("local", 2) as (ex, _):
            started = time.perf_counter()
            warm = [ex.submit(runner.load_data_cached, ctx.data, ctx.identity["sha256"])
                    for _ in range(2)]
            for f in warm:
                f.result()
            ready = time.perf_counter()
            runner.run_jobs(jobs, executor=ex, out=f"{tmp}/two", **common)
            done = time.perf_counter()
        two = time.perf_counter() - t0
    print(f"{len(jobs)} training runs: 1 worker {one:.1f} s; 2 workers {two:.1f} s "
          f"(of which pool start-up and data loading {ready - started:.1f} s)")
    print(f"  2 workers ÷ 1 worker: {two / one:.2f} with start-up, "
          f"{(done - ready) / one:.2f} without   ({_load()})")


if __name__ == "__main__":
    main()
