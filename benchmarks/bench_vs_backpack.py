"""validate.measure against BackPACK (per-sample gradients) and PyHessian (λ_max), one run.

    python benchmarks/bench_vs_backpack.py [--setup] [--venv DIR] [--quick] [--json PATH]

BackPACK and PyHessian are not dependencies of this project (BackPACK pulls torchvision and
a newer torch). This benchmark runs in its own virtual environment: ``--setup`` creates it
(default ``$SGDTHEORY_BENCH_VENV`` or ~/.cache/sgdtheory/venv-bench) with

    pip install torch torchvision backpack-for-pytorch pyhessian numpy scipy

and the script re-runs itself there whenever BackPACK or PyHessian is missing from the
interpreter that started it. With neither the packages nor the environment it prints
"skipped: ..." and exits 0.

Same model, same batch, same process, times interleaved (medians over repeats):

1. per-sample gradients of the mean loss on B examples: :func:`validate.measure.
   per_sample_gradients` (n × p matrix of ∇ℓ_i) vs BackPACK's ``BatchGrad`` (forward, backward
   with the extension; ``grad_batch`` = ∇ℓ_i/B, checked equal to ours/B). Target ratio ≤ 1.0.
2. λ_max of the Hessian of the mean loss on h examples at equal tolerance: the same criterion,
   a relative change of λ below 1e-3 between consecutive products, at most 100 HVPs:
   :func:`validate.measure.top_hessian_eigenvalue` (Lanczos, ``stop='change'``) vs PyHessian's
   ``hessian(...).eigenvalues()`` (power iteration); both errors against a tight Lanczos
   reference (residual 1e-10) are printed. Target ratio ≤ 1.0.

Models: a CIFAR-shaped CNN (3×32×32: conv 3→16, conv 16→32, linear 2048→10; ~25k
parameters; B = 128, h = 128) and the digits CNN of ``validate.digits_check`` written as an
``nn.Sequential`` (BackPACK needs one; same layers, 666 parameters; B = h = 256). CPU, float32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VENV = os.environ.get("SGDTHEORY_BENCH_VENV",
                              os.path.expanduser("~/.cache/sgdtheory/venv-bench"))
PACKAGES = ["torch", "torchvision", "backpack-for-pytorch", "pyhessian", "numpy", "scipy"]


def _have_tools() -> bool:
    try:
        import backpack  # noqa: F401
        import pyhessian  # noqa: F401
    except ImportError:
        return False
    return True


def _venv_python(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


def _setup(venv: str) -> None:
    print(f"creating {venv} with {' '.join(PACKAGES)}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([_venv_python(venv), "-m", "pip", "install", "--quiet", *PACKAGES],
                   check=True)


def _reexec(venv: str, argv: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "SGDTHEORY_BENCH_CHILD": "1"}
    return subprocess.run([_venv_python(venv), os.path.abspath(__file__), *argv],
                          env=env).returncode


def digits_cnn():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32, 10))


def cifar_cnn():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10))


def interleaved(fns: dict, repeats: int) -> dict:
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def ratio(times: dict, num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def compare(name, make, shape, batch, hbatch, repeats) -> dict:
    import torch
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad
    from pyhessian import hessian as pyhessian_hessian
    from torch import nn

    from validate import measure
    from validate._common import ModelFunction

    torch.manual_seed(0)
    model = extend(make())
    crit = extend(nn.CrossEntropyLoss())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    xh, yh = x[:hbatch], y[:hbatch]
    params = list(model.parameters())
    p = sum(q.numel() for q in params)

    def ours_grads():
        return measure.per_sample_gradients(ModelFunction(model, crit), x, y)

    def backpack_grads():
        model.zero_grad(set_to_none=True)
        loss = crit(model(x), y)
        with backpack(BatchGrad()):
            loss.backward()
        return torch.cat([q.grad_batch.reshape(batch, -1) for q in params], 1)

    a, b = ours_grads(), backpack_grads()
    grad_err = float((a / batch - b).abs().max() / b.abs().max())
    t_grad = interleaved({"ours": ours_grads, "backpack": backpack_grads}, repeats)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = measure.top_hessian_eigenvalue(model, crit, xh, yh, tol=1e-10, max_iter=500)
    found = {}

    def ours_lambda():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found["ours"] = measure.top_hessian_eigenvalue(model, crit, xh, yh, tol=1e-3,
                                                           max_iter=100, stop="change")

    def pyhessian_lambda():
        model.zero_grad(set_to_none=True)  # PyHessian accumulates its graph into .grad
        torch.manual_seed(2)
        h = pyhessian_hessian(model, crit, data=(xh, yh), cuda=False)
        found["pyhessian"] = h.eigenvalues(maxIter=100, tol=1e-3)[0][0]
        model.zero_grad(set_to_none=True)

    t_lam = interleaved({"ours": ours_lambda, "pyhessian": pyhessian_lambda}, repeats)
    out = {
        "model": name, "params": p, "batch": batch, "hessian_batch": hbatch,
        "per_sample": {"ours_s": statistics.median(t_grad["ours"]),
                       "backpack_s": statistics.median(t_grad["backpack"]),
                       "ratio": ratio(t_grad, "ours", "backpack"),
                       "max_rel_difference": grad_err},
        "lambda_max": {"ours_s": statistics.median(t_lam["ours"]),
                       "pyhessian_s": statistics.median(t_lam["pyhessian"]),
                       "ratio": ratio(t_lam, "ours", "pyhessian"), "reference": ref,
                       "ours_rel_error": abs(found["ours"] - ref) / abs(ref),
                       "pyhessian_rel_error": abs(found["pyhessian"] - ref) / abs(ref)},
    }
    ps, lm = out["per_sample"], out["lambda_max"]
    print(f"\n{name}: {p} parameters")
    print(f"  per-sample gradients, B = {batch}: ours {1e3 * ps['ours_s']:.1f} ms, BackPACK "
          f"BatchGrad {1e3 * ps['backpack_s']:.1f} ms, ratio {ps['ratio']:.2f} (target ≤ 1.0; "
          f"{'ok' if ps['ratio'] <= 1.0 else 'MISSED'}); max relative difference {grad_err:.1e}")
    print(f"  λ_max, h = {hbatch}, tol 1e-3: ours {1e3 * lm['ours_s']:.1f} ms (error "
          f"{lm['ours_rel_error']:.1e}), PyHessian {1e3 * lm['pyhessian_s']:.1f} ms (error "
          f"{lm['pyhessian_rel_error']:.1e}), ratio {lm['ratio']:.2f} (target ≤ 1.0; "
          f"{'ok' if lm['ratio'] <= 1.0 else 'MISSED'}); λ_max = {ref:.5g}")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setup", action="store_true",
                    help="create the benchmark's virtual environment first if it is missing")
    ap.add_argument("--venv", default=DEFAULT_VENV, help="its folder (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="5 repeats instead of 11")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    if not _have_tools():
        if os.environ.get("SGDTHEORY_BENCH_CHILD"):
            print("skipped: BackPACK or PyHessian does not import in "
                  f"{sys.executable}")
            return 0
        if not os.path.exists(_venv_python(args.venv)):
            if not args.setup:
                print(f"skipped: BackPACK and PyHessian are not installed here and {args.venv} "
                      "does not exist; rerun with --setup to create it "
                      f"(pip install {' '.join(PACKAGES)})")
                return 0
            _setup(args.venv)
        return _reexec(args.venv, [a for a in argv if a != "--setup"])
    sys.path.insert(0, ROOT)
    from sgdtheory import _threads

    _threads.limit_threads(args.threads)
    import torch

    load = os.getloadavg()
    print(f"torch {torch.__version__} (in {sys.prefix}), {torch.get_num_threads()} thread(s), "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    reps = 5 if args.quick else 11
    res = [compare("CIFAR-shaped CNN", cifar_cnn, (3, 32, 32), 128, 128, reps),
           compare("digits CNN", digits_cnn, (1, 8, 8), 256, 256, reps)]
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "load_before": load,
           "load_after": os.getloadavg(), "results": res}
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in out['load_after'])}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
