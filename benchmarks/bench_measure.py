"""Speed of validate.measure relative to plain training work, each ratio measured in one run.

    python benchmarks/bench_measure.py [--quick]

Model: a small CIFAR-shaped CNN (3×32×32 inputs, two conv layers, ~25k parameters, float32,
CPU). Every time is the median over repeats of interleaved measurements (after warm-up), so the
two sides of each ratio see the same machine load. What is compared:

1. micro-batch noise measurement: one training step done by gradient accumulation over M
   micro-batches (forward, backward of loss/M, optimizer.step) WITH NoiseMonitor recording the
   micro-batch gradients on every step (after_backward + step), vs the same step WITHOUT the
   monitor. Target ≤ 1.1. (Also shown: the standalone ``gradient_noise(micro_batch=...)`` call
   vs the accumulation step; it does the same backward passes.)
2. per-sample mode: ``gradient_noise(method='per_sample')`` vs an explicit loop of one
   backward pass per example (collecting the flat gradients). Target: speed-up ≥ 5.
3. one HVP (``hvp``, double backward — the default — and forward-over-reverse, each from
   scratch including the forward pass) vs one gradient (forward + backward) on the same
   batch. Target ≤ 2.5.
4. training runs of 20 steps (accumulation over M micro-batches) with NoiseMonitor measuring
   every 10 steps (cheap mode) vs without. Target: overhead ≤ 10%.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from validate.measure import NoiseMonitor, gradient_noise, hvp


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )


def batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median wall time of each callable, alternating between them on every repeat.

    Also the median over repeats of each time divided by the first callable's time in the same
    repeat (key ``"<name>/<first>"``): robust to load that changes between repeats.
    """
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    out = {k: statistics.median(v) for k, v in times.items()}
    first = next(iter(fns))
    for k in fns:
        pairs = zip(times[k], times[first], strict=True)
        out[f"{k}/{first}"] = statistics.median(a / b for a, b in pairs)
    return out


def make_digits_cnn(seed=0):
    """The 8×8 digits CNN of validate.digits_check (~2k parameters)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 10),
    )


def per_sample_vs_loop(model, crit, xs, ys, repeats):
    def loop():
        out = []
        for i in range(xs.shape[0]):
            model.zero_grad(set_to_none=True)
            crit(model(xs[i:i + 1]), ys[i:i + 1]).backward()
            out.append(torch.cat([q.grad.reshape(-1) for q in model.parameters()]))
        g = torch.stack(out)
        mean = g.mean(0)
        return ((g - mean) ** 2).sum() / (g.shape[0] - 1)

    def batch_grad():
        model.zero_grad(set_to_none=True)
        crit(model(xs), ys).backward()

    t = interleaved({
        "batch_grad": batch_grad,
        "per_sample": lambda: gradient_noise(model, crit, xs, ys, method="per_sample"),
        "loop": loop,
    }, repeats)
    t["speedup"] = t["loop/batch_grad"] / t["per_sample/batch_grad"]
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--batch", type=int, default=64, help="B, examples per step")
    ap.add_argument("--micro", type=int, default=4, help="M, micro-batches per step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = 7 if args.quick else 21
    crit = nn.CrossEntropyLoss()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch(args.batch)
    m = args.micro
    p = sum(q.numel() for q in model.parameters())
    print(f"model: CIFAR-shaped CNN, {p} parameters, float32, torch threads "
          f"{torch.get_num_threads()}; B = {args.batch}, M = {m} micro-batches of "
          f"{args.batch // m}; times are medians of per-repeat ratios over {reps} interleaved "
          "repeats")
    mon = NoiseMonitor(model, criterion=crit, every=1)

    def step(monitor=None):
        opt.zero_grad(set_to_none=True)
        for xb, yb in zip(x.chunk(m), y.chunk(m), strict=True):
            (crit(model(xb), yb) / m).backward()
            if monitor is not None:
                monitor.after_backward()
        if monitor is not None:
            monitor.step(lr=0.01, batch_size=args.batch)
        opt.step()

    t = interleaved({
        "plain": step,
        "monitored": lambda: step(mon),
        "gradient_noise": lambda: gradient_noise(model, crit, x, y, micro_batch=args.batch // m),
    }, reps)
    r1 = t["monitored/plain"]
    print(f"1. accumulation step WITH micro-batch noise measurement / WITHOUT: {r1:.3f} "
          f"(target <= 1.1; plain step {1e3 * t['plain']:.1f} ms)")
    print(f"   standalone gradient_noise(micro_batch={args.batch // m}) / accumulation step: "
          f"{t['gradient_noise/plain']:.3f}")

    t = per_sample_vs_loop(make_digits_cnn(), crit, torch.randn(256, 1, 8, 8),
                           torch.randint(0, 10, (256,)), max(3, reps // 3))
    r2 = t["speedup"]
    print(f"2. per-sample mode speed-up over an explicit per-example loop: digits CNN "
          f"(2k params, 256 examples) {r2:.1f}x (target >= 5)")
    t = per_sample_vs_loop(model, crit, x, y, max(3, reps // 3))
    print(f"   CIFAR-shaped CNN ({args.batch} examples): {t['speedup']:.1f}x; "
          f"on this CPU the loop costs only {t['loop/batch_grad']:.1f}x one batched gradient "
          f"and per-sample mode {t['per_sample/batch_grad']:.1f}x (compute-bound: no vectorised "
          "method can beat the loop by more than the first number)")

    v = torch.randn(p)

    def gradient():
        model.zero_grad(set_to_none=True)
        crit(model(x), y).backward()

    t = interleaved({
        "grad": gradient,
        "double": lambda: hvp(model, crit, x, y, v, method="double_backward"),
        "fwd_rev": lambda: hvp(model, crit, x, y, v, method="forward_over_reverse"),
    }, reps)
    r3 = t["double/grad"]
    print(f"3. one HVP / one gradient (B = {args.batch}, each from scratch with its forward "
          f"pass): double backward (the default) {r3:.2f}, forward-over-reverse "
          f"{t['fwd_rev/grad']:.2f} (target <= 2.5)")

    n_steps = 20

    def run(every):
        model.load_state_dict(make_model().state_dict())
        mon10 = NoiseMonitor(model, criterion=crit, every=every) if every else None
        for _ in range(n_steps):
            step(mon10)

    t = interleaved({"plain": lambda: run(0), "monitored": lambda: run(10)},
                    5 if args.quick else 15, warmup=1)
    r4 = t["monitored/plain"] - 1
    print(f"4. training runs of {n_steps} accumulation steps, NoiseMonitor every 10 steps: "
          f"overhead {100 * r4:+.1f}% (target <= 10%)")
    return {"step_ratio": r1, "per_sample_speedup": r2, "hvp_ratio": r3, "monitor_overhead": r4}


if __name__ == "__main__":
    main()
