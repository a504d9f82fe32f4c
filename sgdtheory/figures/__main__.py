"""``python -m sgdtheory.figures``: draw every theory figure with simulation overlaid and checked.

For each experiment of :data:`sgdtheory.experiments.EXPERIMENTS` (or those named by ``--only``)
the CLI resolves the preset's config, runs ``compute(config, backend, seed)`` and
``plot(data)``, and writes into ``--out`` (default ``./figures``):

* ``<name>.png`` — the figure (theory as lines, simulation as points with error bars);
* ``<name>.npz`` — every array of the data;
* ``<name>.json`` — the checks (predicted, measured, relative error, tolerance, pass), the
  resolved config, preset, backend, device, seed, package version, run time, the non-array
  data, and a hash of (experiment, config, preset, backend, device, seed, version, and a
  fingerprint of the package's source files: editing the simulator invalidates outputs too).

An experiment whose JSON already holds the same hash (and whose PNG and NPZ exist) is skipped
unless ``--force``, so an interrupted run resumes where it stopped. The run continues past a
failing check or an experiment that raises; at the end a table of all checks is printed and
the exit status is 1 if any check failed or any experiment errored (2 for bad options).

Examples::

    python -m sgdtheory.figures                       # all experiments, default preset, NumPy
    python -m sgdtheory.figures --list
    python -m sgdtheory.figures --only eps_opt_vs_batch nqm_optimizers --preset quick
    python -m sgdtheory.figures --backend torch --device cuda --preset paper --out figs
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sgdtheory import _threads
from sgdtheory.experiments import EXPERIMENTS, PRESET_NAMES
from sgdtheory.experiments import load as load_experiment
from sgdtheory.experiments._common import Check

__all__ = [
    "BACKENDS",
    "ExperimentResult",
    "code_fingerprint",
    "config_hash",
    "load_data",
    "main",
    "run_experiment",
]

#: Array backends the CLI accepts (resolved by :func:`sgdtheory.backend.get_backend`).
BACKENDS = ("numpy", "cupy", "torch")


@dataclass
class ExperimentResult:
    """Outcome of one experiment in a CLI run."""

    name: str
    status: str  # "ran" | "skipped" | "error"
    checks: list = field(default_factory=list)  # list of check dicts (Check.to_dict())
    elapsed_s: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "error" and all(c["passed"] for c in self.checks)


# --------------------------------------------------------------------------- data I/O


def _package_version() -> str:
    try:
        from sgdtheory import __version__
    except ImportError:  # pragma: no cover - the package always defines it
        return "unknown"
    return str(__version__)


def _jsonable(x):
    """Plain-JSON form of config values (tuples -> lists, NumPy scalars -> Python)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def config_hash(name: str, config, preset: str, backend: str, device, seed: int,
                version: str, code: str = "") -> str:
    """SHA-256 (first 16 hex digits) of the resolved run identity.

    ``code`` is a fingerprint of the experiment's source (:func:`code_fingerprint`), so that
    editing an experiment also invalidates its stored outputs.

    >>> config_hash("x", {"a": 1}, "quick", "numpy", None, 0, "0.1.0") == config_hash(
    ...     "x", {"a": 1}, "quick", "numpy", None, 0, "0.1.0")
    True
    """
    ident = {"experiment": name, "config": _jsonable(config), "preset": preset,
             "backend": backend, "device": None if device is None else str(device),
             "seed": int(seed), "version": version, "code": code}
    blob = json.dumps(ident, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def code_fingerprint(module) -> str:
    """SHA-256 (first 16 hex digits) of the code behind an experiment's outputs: its module
    and every other source file of the ``sgdtheory`` package except this CLI (so a fix in the
    simulator or the plotting also invalidates stored outputs). "" if the sources are unknown.
    """
    path = getattr(module, "__file__", None)
    if not path:
        return ""
    root = Path(__file__).resolve().parents[1]  # the sgdtheory package
    files = sorted({Path(path).resolve(), *root.rglob("*.py")} - {Path(__file__).resolve()})
    h = hashlib.sha256()
    try:
        for f in files:
            h.update(str(f.relative_to(root) if f.is_relative_to(root) else f.name).encode())
            h.update(f.read_bytes())
    except OSError:
        return ""
    return h.hexdigest()[:16]


def _split(data: dict, prefix: str, arrays: dict):
    """Non-array part of ``data`` for JSON; arrays moved into ``arrays`` under "a/b" keys."""
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out[key] = _split(value, path + "/", arrays)
        elif isinstance(value, np.ndarray) and value.dtype != object:
            arrays[path] = value
            out[key] = {"__npz__": path}
        elif isinstance(value, Check):
            out[key] = value.to_dict()
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Check)
                                                                for v in value):
            out[key] = [v.to_dict() for v in value]
        else:
            out[key] = _jsonable(value)
    return out


def _join(node, arrays):
    if isinstance(node, dict):
        if set(node) == {"__npz__"}:
            return arrays[node["__npz__"]]
        return {k: _join(v, arrays) for k, v in node.items()}
    if isinstance(node, list):
        return [_join(v, arrays) for v in node]
    return node


def _check_from_dict(d: dict) -> Check:
    return Check(d["name"], d["predicted"], d["measured"], d["tolerance"], bool(d["passed"]),
                 d.get("note", ""), d.get("rule", "custom"))


def load_data(out, name: str) -> dict:
    """Reload the data an experiment wrote into ``out`` (JSON + NPZ), checks as :class:`Check`.

    ``plot(load_data(out, name))`` redraws the figure without recomputing.
    """
    out = Path(out)
    meta = json.loads((out / f"{name}.json").read_text())
    with np.load(out / f"{name}.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    data = _join(meta["data"], arrays)
    data["checks"] = [_check_from_dict(c) for c in meta["checks"]]
    return data


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- running


def _existing(out: Path, name: str, digest: str):
    """The stored JSON of ``name`` if its hash is ``digest`` and its PNG and NPZ exist."""
    js = out / f"{name}.json"
    if not (js.exists() and (out / f"{name}.png").exists() and (out / f"{name}.npz").exists()):
        return None
    try:
        meta = json.loads(js.read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("hash") == digest else None


def run_experiment(name: str, *, preset: str, backend, out, seed: int = 0,
                   force: bool = False, device=None) -> ExperimentResult:
    """Run (or skip) one experiment and write ``<out>/<name>.{png,json,npz}``.

    Args:
        name: experiment module name (one of :data:`EXPERIMENTS`).
        preset: "quick" | "default" | "paper".
        backend: a :class:`sgdtheory.backend.Backend` (``.name`` is recorded).
        out: output directory (created).
        seed: integer seed passed to ``compute``.
        force: recompute even if outputs with the same hash exist.
        device: the device string the backend was asked for (recorded, part of the hash).

    Errors inside the experiment are caught and returned as ``status="error"``.
    """
    from sgdtheory.experiments import _plotting

    out = Path(out)
    t0 = time.perf_counter()
    try:
        module = load_experiment(name)
        config = module.PRESETS[preset]
    except Exception as exc:  # noqa: BLE001 - reported per experiment, the run goes on
        return ExperimentResult(name, "error", error=_one_line(exc))
    version = _package_version()
    backend_name = getattr(backend, "name", str(backend))
    code = code_fingerprint(module)
    digest = config_hash(name, config, preset, backend_name, device, seed, version, code)
    if not force:
        meta = _existing(out, name, digest)
        if meta is not None:
            return ExperimentResult(name, "skipped", meta.get("checks", []),
                                    float(meta.get("elapsed_s", 0.0)))
    try:
        data = module.compute(config, backend, seed)
        checks = [c if isinstance(c, Check) else _check_from_dict(c)
                  for c in data.get("checks", [])]
        data = {**data, "checks": checks}
        fig = module.plot(data)
        elapsed = time.perf_counter() - t0
        out.mkdir(parents=True, exist_ok=True)
        _plotting.save(fig, out / f"{name}.png")
        arrays: dict = {}
        body = _split({k: v for k, v in data.items() if k != "checks"}, "", arrays)
        np.savez_compressed(out / f"{name}.npz", **arrays)
        check_dicts = [c.to_dict() for c in checks]
        meta = {
            "experiment": name,
            "title": getattr(module, "TITLE", ""),
            "hash": digest,
            "preset": preset,
            "config_class": f"{module.__name__}.{type(config).__name__}",
            "config": _jsonable(config),
            "backend": backend_name,
            "device": None if device is None else str(device),
            "seed": int(seed),
            "version": version,
            "code_hash": code,
            "elapsed_s": round(elapsed, 3),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "all_passed": all(c["passed"] for c in check_dicts),
            "checks": check_dicts,
            "files": {"png": f"{name}.png", "npz": f"{name}.npz"},
            "data": body,
        }
        _write_atomic(out / f"{name}.json", json.dumps(meta, indent=1, default=str))
    except Exception as exc:  # noqa: BLE001 - reported per experiment, the run goes on
        traceback.print_exc(file=sys.stderr)
        return ExperimentResult(name, "error", elapsed_s=time.perf_counter() - t0,
                                error=_one_line(exc))
    return ExperimentResult(name, "ran", check_dicts, elapsed)


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _fmt(x) -> str:
    if isinstance(x, bool):
        return str(x)
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.4g}"


def _rule(check: dict) -> str:
    """The pass rule of a check in a few characters: rel ≤ t, within ×t, or see its note."""
    rule, tol = check.get("rule", "custom"), _fmt(check["tolerance"])
    if rule == "relative":
        return f"rel_err <= {tol}"
    if rule == "factor":
        return f"within x{tol}"
    return "see note"


def summary_table(results: list[ExperimentResult]) -> str:
    """Plain-text table of every check (and every error) of a run; the ``rule`` column says
    how each passed: rel_err ≤ t, measured/predicted within a factor t, or a custom test
    (a bound or qualitative comparison, described in the check's note in the JSON)."""
    head = ("experiment", "status", "time_s", "check", "predicted", "measured", "rel_err",
            "rule", "result")
    rows = []
    for r in results:
        status_time = (r.status, f"{r.elapsed_s:.1f}")
        if r.status == "error":
            rows.append((r.name, *status_time, r.error, "", "", "", "", "ERROR"))
            continue
        if not r.checks:
            rows.append((r.name, *status_time, "(no checks)", "", "", "", "", ""))
        for i, c in enumerate(r.checks):
            first = (r.name, *status_time) if i == 0 else ("", "", "")
            rows.append((*first, c["name"], _fmt(c["predicted"]), _fmt(c["measured"]),
                         _fmt(c.get("rel_error", float("nan"))), _rule(c),
                         "pass" if c["passed"] else "FAIL"))
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    widths[3] = min(widths[3], 60)
    lines = ["  ".join(str(v)[:w].ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
             for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the message names the valid choices)."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


_EPILOG = """\
presets: quick (a smoke test, seconds in all), default (all checks at their stated
tolerances, about 20 s for all nine on a 2-core CPU), paper (more replicas, minutes).
outputs in --out: <name>.png, <name>.npz (arrays), <name>.json (checks with predicted,
measured, rel_error, tolerance, rule, pass; the resolved config, backend, seed, version).
An experiment whose outputs exist for the same config, seed, backend, version and code is
skipped unless --force (an interrupted run resumes). Learning rates in the figures
multiply the mean minibatch gradient; base rates are lr/B (per example).
exit status: 0 all checks passed, 1 a check failed or an experiment errored, 2 bad options.
"""


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if seed < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return seed


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m sgdtheory.figures",
                description="Draw every theory figure with simulation overlaid and checked "
                            "(PNG + JSON of checks + NPZ of data per experiment).",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=_EPILOG)
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=EXPERIMENTS,
                   help="run only these experiments (choices: %(choices)s)")
    p.add_argument("--preset", choices=PRESET_NAMES, default="default",
                   help="size of every experiment (default: %(default)s)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="array backend of the simulations (default: $SGDTHEORY_BACKEND if set, "
                        "else numpy)")
    p.add_argument("--device", default=None,
                   help="torch: cpu, cuda, cuda:1; cupy: a GPU index or cuda:N "
                        "(default: the backend's, cpu for torch and GPU 0 for cupy)")
    p.add_argument("--out", default="figures", type=Path,
                   help="output directory, relative to the current directory "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="random seed, an integer >= 0 (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="recompute even when outputs for the same config exist")
    _threads.add_threads_argument(p)
    return p


def _list(stream) -> None:
    width = max(len(n) for n in EXPERIMENTS)
    for name in EXPERIMENTS:
        try:
            title = getattr(load_experiment(name), "TITLE", "")
        except Exception as exc:  # noqa: BLE001
            title = f"(not available: {_one_line(exc)})"
        print(f"{name.ljust(width)}  {title}", file=stream)


def main(argv=None) -> int:
    """Entry point; returns the exit status (0 all passed, 1 failures/errors, 2 bad options)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _threads.limit_threads(args.threads)  # before torch/BLAS work: no spinning, no oversubscription
    if args.list:
        _list(sys.stdout)
        return 0
    import matplotlib

    matplotlib.use("Agg")
    try:
        from sgdtheory.backend import get_backend

        backend = get_backend(args.backend, device=args.device)  # None: $SGDTHEORY_BACKEND
    except Exception as exc:  # noqa: BLE001 - e.g. CuPy without a GPU: one line, exit 2
        print(f"{parser.prog}: error: backend {args.backend!r} (device {args.device!r}) is not "
              f"available: {_one_line(exc)} (choose from {', '.join(BACKENDS)})",
              file=sys.stderr)
        return 2
    try:  # before any experiment runs: a bad --out must not cost a whole run
        args.out.mkdir(parents=True, exist_ok=True)
        if not os.access(args.out, os.W_OK):
            raise PermissionError("not writable")
    except OSError as exc:
        print(f"{parser.prog}: error: cannot write to --out {str(args.out)!r}: "
              f"{_one_line(exc)}", file=sys.stderr)
        return 2
    names = list(dict.fromkeys(args.only)) if args.only else list(EXPERIMENTS)
    from tqdm.auto import tqdm

    results: list[ExperimentResult] = []
    bar = tqdm(names, desc="experiments", unit="exp", file=sys.stderr, dynamic_ncols=True)
    for name in bar:
        bar.set_postfix_str(name)
        res = run_experiment(name, preset=args.preset, backend=backend, out=args.out,
                             seed=args.seed, force=args.force, device=args.device)
        results.append(res)
        if res.status == "error":
            tqdm.write(f"{name}: ERROR {res.error}", file=sys.stderr)
    bar.close()
    print(f"preset={args.preset} backend={getattr(backend, 'name', args.backend)} "
          f"device={args.device} seed={args.seed} out={args.out}")
    print(summary_table(results))
    n_fail = sum(1 for r in results for c in r.checks if not c["passed"])
    n_err = sum(1 for r in results if r.status == "error")
    if n_fail or n_err:
        bad = [r.name for r in results if not r.ok]
        print(f"{parser.prog}: {n_fail} check(s) failed and {n_err} experiment(s) errored: "
              f"{', '.join(bad)}", file=sys.stderr)
        return 1
    n_checks = sum(len(r.checks) for r in results)
    print(f"all {n_checks} checks passed in {len(results)} experiment(s); outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
