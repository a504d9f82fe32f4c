"""Cost of each validate.measure measurement in example-gradient equivalents, measured in one run.

    python benchmarks/bench_measure.py [--quick] [--device cpu|cuda] [--preset quick|default]
                                       [--models digits resnet] [--threads N] [--json PATH]

Unit of cost: c(n) = time of a plain training step on n examples (forward, backward of the
mean loss, ``optimizer.step``) / n, on the same model and device, measured interleaved with the
measurement (the same machine load on both sides). Each measurement is counted in example
gradients (a gradient on n examples = n; a Hessian-vector product on n examples = 2n; building
the first-order graph for HVPs = n) and its ratio is

    ratio = time / Σ_parts count_part · c(n_part)        (target ≤ 2, issue 15 target 1)

Measurements (gradient batch B in micro-batches of b, M = B/b; Hessian batch h):

* ``noise_micro_batch``: ``gradient_noise(micro_batch=b)`` on B (BatchNorm in training mode
  for the ResNet): count B.
* ``noise_per_sample``: ``gradient_noise(method='per_sample')`` on S = min(B,
  ``--per-sample-batch``) examples (the ResNet in eval mode): count S, priced at c(S).
* ``hessian_half``: the GᵀHG, tr(HΣ) side of ``hessian_noise``, H on h examples applied to the
  M micro-batch gradients: count h + 2hM.
* ``hessian_noise``: both halves: count B at c(B) plus h + 2hM at c(h).
* ``lanczos``: ``top_hessian_eigenvalue`` with exactly ``--lanczos`` HVPs on h: count h + 2h·iters.
* ``hutchinson``: ``hessian_trace`` with ``--probes`` probes on h: count h + 2h·probes.
* ``monitor_cheap`` / ``monitor_split`` / ``monitor_fallback``: 20 training steps with
  ``NoiseMonitor(every=10)`` vs the same loop without it: with gradient accumulation over 4
  micro-batches (cheap mode); with plain one-backward steps where ``monitor.backward`` splits
  the backward into 4 micro-batches on measured steps only (no extra pass; the baseline is the
  plain loop); and with plain steps where each measured step adds a ``gradient_noise`` pass
  (the fallback); overhead target ≤ 10 % (issue 15 target 4).

Models: the digits CNN of ``validate.digits_check`` (8×8 inputs, B = h = 256, b = 16) and the
CIFAR ResNet ``validate.models.FastResNet`` at the ``--preset``'s width with
``validate.cifar``'s measurement settings for that preset (quick: width 0.125, B = 256, b = 16,
h = 32). Prints a table and ``uptime``'s load average; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sgdtheory import _threads  # noqa: E402


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, repeats: int, device, warmup: int = 1) -> dict:
    """Per-repeat wall times of each callable, alternating between them on every repeat."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def setups(args, device):
    """(name, model factory, input shape, B, b, h, training-mode BN) per benchmarked model."""
    from validate.cifar import NOISE_PRESETS
    from validate.digits_check import DigitsCNN
    from validate.models import FastResNet
    from validate.train import make_config

    out = []
    if "digits" in args.models:
        out.append(("digits CNN", DigitsCNN, (1, 8, 8), 256, 16, 256))
    if "resnet" in args.models:
        width = make_config(args.preset).width
        cfg = NOISE_PRESETS[args.preset]
        out.append((f"CIFAR ResNet (width {width:g})", lambda: FastResNet(width=width),
                    (3, 32, 32), cfg.measure_batch, cfg.micro_batch,
                    cfg.hessian_batch))
    return out


def bench_model(name, make, shape, big, small, hb, args, device) -> dict:
    import torch
    from torch import nn

    from validate import measure

    torch.manual_seed(0)
    model = make().to(device)
    crit = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(big, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (big,), generator=g).to(device)
    xh = torch.randn(hb, *shape, generator=g).to(device)
    yh = torch.randint(0, 10, (hb,), generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    n_units = big // small
    iters, probes = args.lanczos, args.probes

    def step(xs, ys):
        def f():
            opt.zero_grad(set_to_none=True)
            crit(model(xs), ys).backward()
            opt.step()
        return f

    def hessian_half():
        units = torch.randn(n_units, sum(p.numel() for p in model.parameters()),
                            generator=g).to(device)
        def half():
            op = measure.HessianOperator(model, crit, xh, yh)
            if hasattr(op, "matmat"):
                return op.matmat(units)
            return torch.stack([op(u) for u in units])  # releases before matmat

        return half

    def lanczos():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            measure.top_hessian_eigenvalue(model, crit, xh, yh, tol=1e-30, max_iter=iters)

    rows = {}
    reps = args.repeats
    # training mode: BatchNorm (ResNet) normalises by batch statistics, micro-batch units
    model.train()
    t = interleaved({
        "step_B": step(x, y), "step_h": step(xh, yh),
        "noise_micro_batch": lambda: measure.gradient_noise(model, crit, x, y,
                                                            micro_batch=small),
        "hessian_half": hessian_half(),
        "hessian_noise": lambda: measure.hessian_noise(model, crit, x, y, micro_batch=small,
                                                       hessian_inputs=xh, hessian_targets=yh),
        "lanczos": lanczos,
        "hutchinson": lambda: measure.hessian_trace(model, crit, xh, yh, n_samples=probes),
    }, reps, device)
    counts = {  # measurement -> [(examples, batch whose per-example step cost prices them)]
        "noise_micro_batch": [(big, "B")],
        "hessian_half": [(hb + 2 * hb * n_units, "h")],
        "hessian_noise": [(big, "B"), (hb + 2 * hb * n_units, "h")],
        "lanczos": [(hb + 2 * hb * iters, "h")],
        "hutchinson": [(hb + 2 * hb * probes, "h")],
    }
    sizes = {"B": big, "h": hb}

    def add(times, names):
        for k in names:
            ratios = []
            for r in range(reps):
                budget = sum(c * times[f"step_{which}"][r] / sizes[which]
                             for c, which in counts[k])
                ratios.append(times[k][r] / budget)
            rows[k] = {"seconds": statistics.median(times[k]),
                       "example_gradients": sum(c for c, _ in counts[k]),
                       "ratio": statistics.median(ratios)}

    add(t, list(counts))
    step_cost = {w: statistics.median(t[f"step_{w}"]) / sizes[w] for w in sizes}
    # eval mode: per-example gradients are defined for every model
    model.eval()
    ns = min(big, args.per_sample_batch)
    xs, ys = x[:ns], y[:ns]
    t = interleaved({
        "step_S": step(xs, ys),
        "noise_per_sample": lambda: measure.gradient_noise(model, crit, xs, ys,
                                                           method="per_sample"),
    }, reps, device)
    counts["noise_per_sample"] = [(ns, "S")]
    sizes["S"] = ns
    add(t, ["noise_per_sample"])
    model.train()
    if not args.no_monitor:
        rows.update(bench_monitor(model, crit, x[: args.monitor_batch], y[: args.monitor_batch],
                                  device, max(5, reps)))
    return {"model": name, "params": sum(p.numel() for p in model.parameters()),
            "B": big, "b": small, "h": hb, "lanczos_iters": iters, "probes": probes,
            "step_seconds_per_example": step_cost, "measurements": rows}


def bench_monitor(model, crit, x, y, device, reps) -> dict:
    """Overhead of NoiseMonitor(every=10) on 20 training steps (cheap and fallback modes)."""
    import torch

    from validate.measure import NoiseMonitor

    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    n, m = x.shape[0], 4

    def run(monitor: bool, accumulate: bool | str):
        def f():
            model.load_state_dict(state)
            mon = NoiseMonitor(model, criterion=crit, every=10) if monitor else None
            for _ in range(20):
                opt.zero_grad(set_to_none=True)
                if accumulate == "split" and mon is not None:  # split on measured steps only
                    mon.backward(lambda xb, yb: crit(model(xb), yb), x, y, micro_batches=m)
                elif accumulate == "split":
                    crit(model(x), y).backward()
                elif accumulate:
                    for xb, yb in zip(x.chunk(m), y.chunk(m), strict=True):
                        (crit(model(xb), yb) / m).backward()
                        if mon is not None:
                            mon.after_backward()
                else:
                    crit(model(x), y).backward()
                if mon is not None:
                    mon.step(lr=1e-3, inputs=x, targets=y, batch_size=n)
                opt.step()
        return f

    out = {}
    for label, acc in (("monitor_cheap", True), ("monitor_split", "split"),
                       ("monitor_fallback", False)):
        t = interleaved({"plain": run(False, acc), "monitored": run(True, acc)}, reps, device)
        over = statistics.median(a / b for a, b in zip(t["monitored"], t["plain"], strict=True))
        out[label] = {"seconds": statistics.median(t["monitored"]),
                      "plain_seconds": statistics.median(t["plain"]),
                      "overhead": over - 1.0, "batch": n,
                      "accumulation": {True: m, False: 1, "split": f"1 ({m} when measured)"
                                       }[acc]}
    model.load_state_dict(state)
    return out


def print_table(res: dict) -> None:
    print(f"\n{res['model']}: {res['params']} parameters; B = {res['B']}, b = {res['b']}, "
          f"h = {res['h']}; step cost {1e6 * res['step_seconds_per_example']['B']:.0f} µs/example "
          f"at B, {1e6 * res['step_seconds_per_example']['h']:.0f} at h")
    print(f"  {'measurement':<20}{'seconds':>10}{'ex-grads':>10}{'ratio':>8}  target")
    for k, r in res["measurements"].items():
        if k.startswith("monitor"):
            print(f"  {k:<20}{r['seconds']:>10.3f}{'':>10}{100 * r['overhead']:>+7.1f}%  "
                  f"≤ +10% ({'ok' if r['overhead'] <= 0.10 else 'MISSED'}; 20 steps, "
                  f"accumulation {r['accumulation']})")
        else:
            ok = "ok" if r["ratio"] <= 2.0 else "MISSED"
            print(f"  {k:<20}{r['seconds']:>10.3f}{r['example_gradients']:>10d}"
                  f"{r['ratio']:>8.2f}  ≤ 2 ({ok})")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (3 instead of 7)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--preset", choices=("quick", "default"), default="quick",
                    help="the ResNet's width and validate.cifar's measurement settings")
    ap.add_argument("--models", nargs="+", choices=("digits", "resnet"),
                    default=["digits", "resnet"])
    ap.add_argument("--lanczos", type=int, default=30, help="Lanczos HVPs (default 30)")
    ap.add_argument("--probes", type=int, default=30, help="Hutchinson probes (default 30)")
    ap.add_argument("--per-sample-batch", type=int, default=256, help="examples of the "
                    "per-sample measurement (at most B; default 256: B × p gradients of a big "
                    "network do not fit)")
    ap.add_argument("--monitor-batch", type=int, default=64, help="training batch of the "
                    "NoiseMonitor runs (default 64)")
    ap.add_argument("--no-monitor", action="store_true", help="skip the NoiseMonitor runs")
    ap.add_argument("--json", default=None, help="write every figure to this JSON file")
    _threads.add_threads_argument(ap)
    args = ap.parse_args(argv)
    threads = _threads.limit_threads(args.threads)
    args.repeats = 3 if args.quick else 7
    import torch

    device = torch.device(args.device)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, device {device}, {threads} threads, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; medians of per-repeat ratios over "
          f"{args.repeats} interleaved repeats")
    results = []
    for spec in setups(args, device):
        res = bench_model(*spec, args, device)
        print_table(res)
        results.append(res)
    out = {"device": str(device), "torch": torch.__version__, "threads": threads,
           "load_before": load, "load_after": os.getloadavg(), "results": results}
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in out['load_after'])}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
