"""Running ``python -m validate.experiments`` in a fresh process and reading what it wrote, for
tests/test_validate_experiments*.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run_cli(*args, timeout=500):
    """Run the CLI in a subprocess (fresh process: the timing of a real run); returns it."""
    return subprocess.run([sys.executable, "-m", "validate.experiments", *args,
                           "--no-progress"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def strict_json(path):
    """Parse a JSON file refusing NaN/Infinity (strict JSON)."""
    def bad(token):
        raise AssertionError(f"{path}: non-strict JSON value {token}")

    return json.loads(Path(path).read_text(), parse_constant=bad)


def run_results(out):
    """{key: result} of every per-run file in ``out/runs``."""
    return {r["key"]: r["result"] for r in (strict_json(f) for f in (Path(out) / "runs").glob(
        "*.json"))}
