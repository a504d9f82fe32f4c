r"""The command line of :mod:`validate.experiments` (and of ``python -m validate.cifar
{lr_sweep,memory}``, which changes only the defaults: CIFAR-10, the fast ResNet, preset paper).

    python -m validate.experiments {lr_sweep,memory} [--data digits|synthetic|cifar10|PATH.npz]
        [--data-dir DIR] [--preset smoke|quick|default|paper] [--device cpu|cuda[:N]]
        [--out DIR] [--seed N] [--workers N] [--executor local|dask://HOST:PORT] [--force]
        [--list]

Exit status: 0 when every check passes, 1 when any fails (the figure and JSON are still
written) or a run raised, 2 for bad usage (one line naming the problem), 130 when interrupted
(rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .._io import int_at_least
from . import EXPERIMENTS, PRESET_NAMES, load

__all__ = ["build_parser", "main"]

EPILOG = """\
units:
  lr (η) multiplies the MEAN minibatch gradient (PyTorch); the base rate η̃ = η/B is the step per
  example; a learning-rate factor f multiplies the data set's standard base rate η̃₀, so
  η = f·η̃₀·B. Momentum μ as torch.optim.SGD (v ← μv + g, θ ← θ − ηv), effective rate η/(1−μ).
  Losses are mean cross-entropies; |G|², tr(Σ), GᵀHG, tr(HΣ), λ_max, tr(H) are those of the
  mean training loss; B_simple, B_noise in examples; memory times in optimiser steps.

data (--data):
  digits     scikit-learn's 8×8 digits (bundled, no download): 1,437 training / 360 test images
             (fixed stratified split), a small CNN, plain SGD, B = 32 and 128; CPU.
  synthetic  learnable 16×16 synthetic images (pipeline tests).
  cifar10    CIFAR-10 from --data-dir (md5-checked; --download fetches it) and the fast ResNet
             (airbench-style recipe, Nesterov), B = 128 and 512; meant for a GPU.
  PATH.npz   your data: x_train, y_train, x_test, y_test (x uint8 or float, (N, H, W),
             (N, C, H, W) or (N, features); y integer labels 0…K−1); a CNN for images, an MLP
             for vectors. A malformed file is refused with one line naming the problem.

presets: smoke (end to end in ≤ 30 s on 2 CPU cores: CI), quick (≤ 5 min on digits with 2
  cores), default (the digits run README reports), paper (CIFAR-10 on a GPU; time per run not
  measured). Values: end of this help.

outputs (in --out, default runs/<experiment>-<data>/):
  <experiment>.json   strict JSON: config, data identity and sizes, model and parameter count,
                      torch version, device, seed, the reference run's measurements, the
                      predictions with standard errors, every run's result, and checks:
                      [{name, predicted, measured, rule, pass}, ...]
  <experiment>.png    the figure;  runs/<hash>.json  one file per finished run (resume: a
                      killed sweep continues where it stopped; --force reruns everything).

scale out: --workers N local processes (default: one per CPU core, one per GPU); each job uses
  one torch thread. --executor dask://HOST:PORT sends the runs to a Dask cluster (pip install
  'sgdtheory[dask]'; the repository must be importable on the workers and the data readable).

exit status: 0 all checks pass, 1 a check failed or a run raised, 2 bad usage, 130 interrupted.
"""


class _Parser(argparse.ArgumentParser):
    """One-line errors, exit status 2; the preset table appended to --help."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")

    def format_help(self) -> str:
        return super().format_help() + "\n" + presets_help()


def presets_help() -> str:
    """Each experiment's presets: the default preset in full, the others as differences."""
    lines = ["preset values (fields not shown as in default):"]
    for name in EXPERIMENTS:
        mod = load(name)
        default = mod.PRESETS["default"]
        full = ", ".join(f"{f.name}={_short(getattr(default, f.name))}"
                         for f in dataclasses.fields(default))
        lines.append(f"  {name}  default: {full}")
        for p in PRESET_NAMES:
            if p == "default":
                continue
            cfg = mod.PRESETS[p]
            diff = ", ".join(f"{f.name}={_short(getattr(cfg, f.name))}"
                             for f in dataclasses.fields(cfg)
                             if getattr(cfg, f.name) != getattr(default, f.name))
            lines.append(f"  {' ' * len(name)}  {p}: {diff or 'as default'}")
    return "\n".join(lines) + "\n"


def _short(v) -> str:
    if isinstance(v, tuple) and v and all(isinstance(x, float) for x in v):
        return "(" + ", ".join(f"{x:g}" for x in v) + ")"
    return str(v)


def _executor(text: str) -> str:
    if text == "local":
        return text
    if text.startswith("dask://"):
        host, _, port = text[len("dask://"):].rpartition(":")
        if host and port.isdigit():
            return text
    raise argparse.ArgumentTypeError(f"must be 'local' or dask://HOST:PORT, got {text!r}")


def build_parser(prog: str = "python -m validate.experiments", default_data: str = "digits",
                 default_preset: str = "default") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="The seeds' experiments on a real network: measure a reference run "
                            "(λ_max, tr(H), |G|², tr(Σ), GᵀHG, tr(HΣ)), predict from it, run the "
                            "sweep, check the claims; JSON + figure.", epilog=EPILOG)
    p.add_argument("experiment", nargs="?", choices=EXPERIMENTS, metavar="{" +
                   ",".join(EXPERIMENTS) + "}", help="the experiment to run")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--data", default=default_data,
                   help=f"digits, synthetic, cifar10 or a PATH.npz (default: {default_data})")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder holding CIFAR-10 (default $SGDTHEORY_DATA or "
                        "~/.cache/sgdtheory/cifar10)")
    p.add_argument("--md5", default=None, help="expected CIFAR-10 archive md5 (mirrors, tests)")
    p.add_argument("--download", action="store_true", help="fetch CIFAR-10 if it is missing")
    p.add_argument("--preset", choices=PRESET_NAMES, default=default_preset,
                   help=f"size of the study (default: {default_preset}; values at the end)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: runs/<experiment>-<data>)")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="integer ≥ 0: run r of a grid point uses seed + r (model init, subset, "
                        "shuffles, measurement batches); default 0")
    p.add_argument("--workers", type=int_at_least(1), default=None,
                   help="parallel runs, integer ≥ 1 (default: one per CPU core, one per GPU)")
    p.add_argument("--executor", type=_executor, default="local",
                   help="local (a process pool) or dask://HOST:PORT (a Dask cluster)")
    p.add_argument("--force", action="store_true",
                   help="rerun every run even when its stored result exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _list(stream) -> None:
    width = max(map(len, EXPERIMENTS))
    for name in EXPERIMENTS:
        print(f"{name:<{width}}  {load(name).TITLE}", file=stream)


def _data_name(kind: str) -> str:
    if kind in ("digits", "synthetic", "cifar10", "cifar"):
        return "cifar10" if kind == "cifar" else kind
    return Path(kind).stem


def make_context(args, module):
    """Resolve device, recipe and data (loaded here once, for its identity and sizes)."""
    from validate._io import resolve_device
    from validate.data import data_identity

    from .base import Context
    from .recipes import recipe_for
    from .runner import DataSpec, prime_data

    device = resolve_device(args.device)
    recipe = recipe_for(args.data)
    kind = "cifar10" if args.data == "cifar" else args.data
    spec = DataSpec(kind, None if args.data_dir is None else str(args.data_dir), args.md5,
                    (*recipe.synthetic, int(args.seed)))
    data = spec.load(download=args.download)
    identity = data_identity(data)
    prime_data(spec, identity["sha256"], data)
    config = module.PRESETS[args.preset]
    return Context(module.NAME, args.preset, config, recipe, spec, identity, data.input_shape,
                   data.num_classes, int(data.train_images.shape[0]), device.type,
                   int(args.seed))


def main(argv=None, *, prog: str = "python -m validate.experiments",
         default_data: str = "digits", default_preset: str = "default") -> int:
    parser = build_parser(prog, default_data, default_preset)
    args = parser.parse_args(argv)
    if args.list:
        _list(sys.stdout)
        return 0
    if args.experiment is None:
        parser.error("the experiment is required (or --list)")
    from sgdtheory import _threads

    _threads.limit_threads(1)  # one thread per run (before torch loads: passive OpenMP waits)
    from .base import run_experiment
    from .runner import JobError, default_workers

    module = load(args.experiment)
    try:
        ctx = make_context(args, module)
        module.jobs(ctx)  # the grid is checked (e.g. batch vs subset sizes) before any run
    except (ValueError, FileNotFoundError) as e:  # includes data.DatasetError
        parser.exit(2, f"{parser.prog} {args.experiment}: error: {' '.join(str(e).split())}\n")
    out = args.out if args.out is not None else \
        Path("runs") / f"{args.experiment}-{_data_name(ctx.data.kind)}"
    workers = args.workers or default_workers(ctx.device)
    try:
        _, status = run_experiment(module, ctx, out=out, executor=args.executor,
                                   workers=workers, force=args.force,
                                   progress=not args.no_progress)
    except ValueError as e:  # e.g. an unreachable Dask scheduler
        parser.exit(2, f"{parser.prog} {args.experiment}: error: {' '.join(str(e).split())}\n")
    except JobError as e:
        parser.exit(1, f"{parser.prog} {args.experiment}: error: {e}; the finished runs are "
                       f"saved in {out / 'runs'}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted; the finished runs are saved in "
                         f"{out / 'runs'}: rerun the same command to resume\n")
    return status
