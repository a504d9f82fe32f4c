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

An experiment whose JSON already holds the same hash, and whose PNG and NPZ load, is reused
(not redrawn) unless ``--force``, so an interrupted run resumes where it stopped; the PNG and
NPZ are written first, each to a temporary file renamed into place, and the JSON (the "done"
marker) last, so a crash never leaves a half-written file that looks finished. The JSON is
strict (a non-finite float is written as ``{"nonfinite": "inf"}``; :func:`load_data` restores
it). The run continues past a failing check or an experiment that raises; at the end every
check is listed with its rule (at most 100 characters a line), and the exit status is 1 if any
check failed or any experiment errored, 2 for bad options, 130 when interrupted (Ctrl-C: one
line says what finished; rerunning the same command resumes).

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
import textwrap
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sgdtheory import _threads
from sgdtheory._checks import flag, integer
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
    status: str  # "ran" | "reused" (outputs unchanged: not redrawn) | "error"
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
             "seed": integer("seed", seed, 0), "version": version, "code": code}
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
        if set(node) == {"nonfinite"}:
            return _restore(node)
        return {k: _join(v, arrays) for k, v in node.items()}
    if isinstance(node, list):
        return [_join(v, arrays) for v in node]
    return node


def _npz_refs(node) -> set:
    """The NPZ keys a JSON data tree refers to."""
    if isinstance(node, dict):
        if set(node) == {"__npz__"}:
            return {node["__npz__"]}
        return set().union(*(_npz_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_npz_refs(v) for v in node))
    return set()


def _strict(node):
    """``node`` with every non-finite float replaced by {"nonfinite": "inf" | "-inf" | "nan"}:
    strict JSON (``json.dumps(..., allow_nan=False)``), undone by :func:`_join`."""
    if isinstance(node, dict):
        return {k: _strict(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_strict(v) for v in node]
    if isinstance(node, float) and not math.isfinite(node):
        return {"nonfinite": "nan" if math.isnan(node) else ("inf" if node > 0 else "-inf")}
    return node


def _restore(value):
    """A float from a strict-JSON value (:func:`_strict`)."""
    if isinstance(value, dict) and set(value) == {"nonfinite"}:
        return float(value["nonfinite"])
    return value


def _check_from_dict(d: dict) -> Check:
    return Check(d["name"], _restore(d["predicted"]), _restore(d["measured"]),
                 _restore(d["tolerance"]), bool(d["passed"]), d.get("note", ""),
                 d.get("rule", "custom"))


def load_data(out, name: str) -> dict:
    """Reload the data an experiment wrote into ``out`` (JSON + NPZ), checks as :class:`Check`.

    ``plot(load_data(out, name))`` redraws the figure without recomputing.
    """
    out, name = _out_arg(out), _name_arg(name)
    try:
        meta = json.loads((out / f"{name}.json").read_text())  # strict JSON: nonfinite restored
        with np.load(out / f"{name}.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"name: no readable saved data for {name!r} in out={str(out)!r} "
                         f"({_one_line(exc)}); run python -m sgdtheory.figures --only {name} "
                         f"--out {out} first") from exc
    data = _join(meta["data"], arrays)
    data["checks"] = [_check_from_dict(c) for c in meta["checks"]]
    return data


def _out_arg(out) -> Path:
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise ValueError(f"out must name a directory (a str or path, not empty), got {out!r}")
    return Path(out)


def _name_arg(name) -> str:
    if not isinstance(name, str) or name not in EXPERIMENTS:
        raise ValueError(f"name must be one of {', '.join(EXPERIMENTS)}, got {name!r}")
    return name


def _write_atomic(path: Path, write) -> None:
    """``write(tmp)`` into a temporary file next to ``path``, then rename it onto ``path``
    (atomic on POSIX): ``path`` is either its old content or the whole new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_text(path: Path, text: str) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(text))


def _write_npz(path: Path, arrays: dict) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz" suffix
            np.savez_compressed(f, **arrays)

    _write_atomic(path, write)


# --------------------------------------------------------------------------- running


def _outputs_load(out: Path, name: str, meta: dict) -> bool:
    """Whether the PNG decodes and the NPZ holds every array the JSON refers to."""
    try:
        from PIL import Image

        with Image.open(out / f"{name}.png") as im:
            im.load()
        with np.load(out / f"{name}.npz", allow_pickle=False) as npz:
            for key in npz.files:
                npz[key]  # decompress: a truncated member fails here
            return _npz_refs(meta.get("data", {})) <= set(npz.files)
    except Exception:  # noqa: BLE001 - any unreadable output means: draw it again
        return False


def _existing(out: Path, name: str, digest: str):
    """The stored JSON of ``name`` if its hash is ``digest`` and its PNG and NPZ load."""
    js = out / f"{name}.json"
    if not js.exists():
        return None
    try:
        meta = json.loads(js.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("hash") != digest or not _outputs_load(out, name, meta):
        return None
    return meta


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

    out, name, seed = _out_arg(out), _name_arg(name), integer("seed", seed, 0)
    force = flag("force", force)
    if not isinstance(preset, str) or preset not in PRESET_NAMES:
        raise ValueError(f"preset must be one of {', '.join(PRESET_NAMES)}, got {preset!r}")
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
            checks = [{**c, **{k: _restore(c[k]) for k in
                               ("predicted", "measured", "tolerance", "rel_error") if k in c}}
                      for c in meta.get("checks", [])]
            return ExperimentResult(name, "reused", checks, float(meta.get("elapsed_s", 0.0)))
    try:
        data = module.compute(config, backend, seed)
        checks = [c if isinstance(c, Check) else _check_from_dict(c)
                  for c in data.get("checks", [])]
        data = {**data, "checks": checks}
        fig = module.plot(data)
        elapsed = time.perf_counter() - t0
        out.mkdir(parents=True, exist_ok=True)
        # PNG and NPZ first, each renamed into place whole; the JSON (the hash that marks the
        # experiment done) last
        _write_atomic(out / f"{name}.png", lambda tmp: _plotting.save(fig, tmp))
        arrays: dict = {}
        body = _split({k: v for k, v in data.items() if k != "checks"}, "", arrays)
        _write_npz(out / f"{name}.npz", arrays)
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
        _write_text(out / f"{name}.json",
                    json.dumps(_strict(meta), indent=1, default=str, allow_nan=False))
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
        x = float(_restore(x))
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.4g}"


def _rule(check: dict) -> str:
    """The pass rule of a check in words: rel_err ≤ t, within a factor t, or (custom) its note,
    which states the bound or the comparison."""
    rule, tol = check.get("rule", "custom"), _fmt(check["tolerance"])
    if rule == "relative":
        return f"pass if rel_err <= {tol}"
    if rule == "factor":
        return f"pass if measured/predicted is within a factor {tol}"
    return check.get("note", "") or f"custom, tolerance {tol}"


#: width of the results listing printed at the end of a run
WIDTH = 100


def _wrap(text: str, indent: int) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=" " * indent,
                         subsequent_indent=" " * (indent + 2), break_on_hyphens=False) or [""]


def _status(r: ExperimentResult, out=None) -> str:
    where = f" from {out}/" if out is not None else ""
    if r.status == "reused":
        return (f"reused{where} (unchanged since it was drawn, in {r.elapsed_s:.1f} s; "
                "--force redraws)")
    if r.status == "ran":
        return f"drawn in {r.elapsed_s:.1f} s"
    return "ERROR"


def summary_table(results: list[ExperimentResult], out=None) -> str:
    """Every check (and every error) of a run, lines of at most :data:`WIDTH` characters.

    Per experiment a line with its status, then per check: pass/FAIL and its name, the
    predicted and measured values with the relative error, and the rule it was judged by:
    rel_err ≤ t, measured/predicted within a factor t, or a custom test (a bound or a
    qualitative comparison) spelt out from the check's note."""
    if not isinstance(results, (list, tuple)) or not all(
            isinstance(r, ExperimentResult) for r in results):
        raise ValueError(f"results must be a list of ExperimentResult, got {results!r:.80}")
    lines = []
    for r in results:
        lines += _wrap(f"{r.name}: {_status(r, out)}", 0)
        if r.status == "error":
            lines += _wrap(f"ERROR {r.error}", 2)
            continue
        if not r.checks:
            lines += _wrap("(no checks)", 2)
        for c in r.checks:
            lines += _wrap(f"{'pass' if c['passed'] else 'FAIL'}  {c['name']}", 2)
            lines += _wrap(f"predicted {_fmt(c['predicted'])}, measured {_fmt(c['measured'])}, "
                           f"rel_err {_fmt(c.get('rel_error', float('nan')))}; {_rule(c)}", 8)
    return "\n".join(line.rstrip() for line in lines)


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
An experiment whose outputs exist (and load) for the same config, seed, backend, version
and code is reused, not redrawn, unless --force: an interrupted run (Ctrl-C) resumes. With
the default --out the committed figures/ are rewritten by --force. Learning rates in the
figures multiply the mean minibatch gradient; base rates are lr/B (per example).
exit status: 0 all checks passed, 1 a check failed or an experiment errored, 2 bad options,
130 interrupted.
"""


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if seed < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return seed


def _out_dir(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a directory (an empty path would write "
                                         "into the current directory; use --out . for that)")
    return Path(text)


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
    p.add_argument("--out", default="figures", type=_out_dir,
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
    """Entry point; returns the exit status (0 all passed, 1 failures/errors, 2 bad options,
    130 interrupted)."""
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
    try:
        for name in bar:
            bar.set_postfix_str(name)
            res = run_experiment(name, preset=args.preset, backend=backend, out=args.out,
                                 seed=args.seed, force=args.force, device=args.device)
            results.append(res)
            if res.status == "error":
                tqdm.write(f"{name}: ERROR {res.error}", file=sys.stderr)
    except KeyboardInterrupt:
        bar.close()
        print(_interrupted(results, names, args.out), file=sys.stderr)
        return 130
    bar.close()
    print(f"preset={args.preset} backend={getattr(backend, 'name', args.backend)} "
          f"device={args.device} seed={args.seed} out={args.out}")
    print(summary_table(results, args.out))
    n_fail = sum(1 for r in results for c in r.checks if not c["passed"])
    n_err = sum(1 for r in results if r.status == "error")
    reused = _reused_line(results, args.out)
    if reused:
        print(reused)
    if n_fail or n_err:
        bad = [r.name for r in results if not r.ok]
        print(f"{parser.prog}: {n_fail} check(s) failed and {n_err} experiment(s) errored: "
              f"{', '.join(bad)}", file=sys.stderr)
        return 1
    n_checks = sum(len(r.checks) for r in results)
    print(f"all {n_checks} checks passed in {len(results)} experiment(s); outputs in {args.out}")
    return 0


def _reused_line(results: list[ExperimentResult], out) -> str:
    """What a run that redrew nothing (or only part) did, in plain words, or ""."""
    reused = [r for r in results if r.status == "reused"]
    if not reused:
        return ""
    redraw = sum(r.elapsed_s for r in reused)
    which = "All" if len(reused) == len(results) else f"{len(reused)} of {len(results)}"
    return textwrap.fill(
        f"{which} figures were reused from {out}/, not redrawn: their code, config and seed "
        f"are unchanged since they were drawn (the hash in each JSON matches). Redrawing them "
        f"takes about {redraw:.0f} s (the time recorded when they were drawn); add --force to "
        f"redraw.", WIDTH)


def _interrupted(results: list[ExperimentResult], names: list, out) -> str:
    """One line for Ctrl-C: what finished, and that a rerun resumes."""
    done = [r.name for r in results if r.status != "error"]
    left = len(names) - len(done)
    finished = (f"{len(done)} of {len(names)} experiment(s) finished ({', '.join(done)})"
                if done else f"none of {len(names)} experiment(s) finished")
    return (f"python -m sgdtheory.figures: interrupted: {finished}, their outputs are in "
            f"{out}/; rerun the same command to resume ({left} left; finished ones are reused)")


if __name__ == "__main__":
    sys.exit(main())
