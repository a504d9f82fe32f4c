"""Training throughput of validate.train (examples/s, seconds per epoch) in one run.

    python benchmarks/bench_cifar.py                    # CPU, quick preset, synthetic data
    python benchmarks/bench_cifar.py --device cuda --preset default --epochs 2

Prints examples/s of the timed training (evaluation excluded), the seconds per epoch and, for
the CUDA default preset, the test accuracy on the synthetic data. Real CIFAR-10 accuracy: run
``python -m validate.cifar train`` (needs the archive).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from validate import data, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--preset", choices=sorted(train.PRESETS), default="quick")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_train, n_test = (2048, 512) if args.preset == "quick" else (50_000, 10_000)
    t0 = time.perf_counter()
    d = data.synthetic_cifar10(n_train, n_test, seed=0)
    t_data = time.perf_counter() - t0
    hyp = train.make_config(args.preset, epochs=args.epochs)
    r = train.train(hyp, d, device=args.device, progress=False)
    per_epoch = r["time_s"] / len(r["history"])
    print(f"device {args.device}  preset {args.preset}  threads {torch.get_num_threads()}  "
          f"load {os.getloadavg()[0]:.1f}  params {r['params']}  B {hyp.batch_size}")
    print(f"synthetic data {n_train}+{n_test} images generated in {t_data:.1f} s")
    print(f"{r['examples_per_s']:.0f} examples/s  {per_epoch:.2f} s/epoch  "
          f"({r['steps']} steps, {r['train_examples']} examples/epoch)")
    print(f"test accuracy (synthetic) {r['test_acc']:.4f} after {len(r['history'])} epochs")


if __name__ == "__main__":
    main()
