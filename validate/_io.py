r"""Small shared plumbing of ``validate``: one device resolver, one strict-JSON form, one atomic
writer, one settings hash.

* :func:`resolve_device` — ``None`` → ``cuda`` when a GPU is visible, else ``cpu``; a CUDA device
  that does not exist is a ``ValueError`` naming it (the CLIs turn it into one line, status 2).
* :func:`jsonable` — plain-JSON form of results: dataclasses and dicts → dicts, tuples → lists,
  NumPy/torch scalars → Python numbers, paths → strings, and every NaN/±inf → ``None`` (strict
  JSON has no NaN; a caller that needs to say *why* a value is missing stores a reason beside it).
* :func:`write_atomic`, :func:`write_json`, :func:`save_torch` — write a temporary file in the
  target folder, then ``os.replace`` it into place, so a reader (or a resumed run) never sees a
  half-written file.
* :func:`settings_hash` — SHA-256 (16 hex digits) of the canonical JSON of some settings: the key
  of a run's stored result.
* :func:`int_at_least` — an ``argparse`` type for integer flags with a lower bound (argparse
  names the flag in its one-line error, exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = [
    "int_at_least",
    "jsonable",
    "resolve_device",
    "save_torch",
    "settings_hash",
    "write_atomic",
    "write_json",
]


def resolve_device(device=None):
    """A ``torch.device`` from ``None``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a device.

    ``None`` picks ``cuda`` when a GPU is available, else ``cpu``. Raises ``ValueError`` (naming
    the device) for a CUDA device that is not there or a string torch does not parse.

    >>> str(resolve_device("cpu"))
    'cpu'
    """
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but no CUDA GPU is available; use "
                             "--device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    return dev


def jsonable(obj):
    """Strict-JSON form of ``obj`` (NaN and ±inf become ``None``; unknown objects ``str``).

    >>> jsonable({"a": (1, float("nan")), "b": np.float32(0.5), 3: np.array([1, 2])})
    {'a': [1, None], 'b': 0.5, '3': [1, 2]}
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if hasattr(obj, "item") and callable(obj.item):  # torch scalars
        try:
            return jsonable(obj.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def _file_mode() -> int:
    """0o666 less the process umask: what ``open`` would give a new file (``mkstemp`` gives
    0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def _replacing(path):
    """Yield a temporary path in ``path``'s folder (parents created); on success it gets the
    usual permissions and replaces ``path`` (``os.replace``, atomic); on any error it is removed
    and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then
    ``os.replace``); parents are created; the file gets the usual permissions. Returns the
    path."""
    with _replacing(path) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json(path, obj, *, indent: int | None = 1) -> Path:
    """Write ``jsonable(obj)`` as strict JSON (``allow_nan=False``), atomically."""
    text = json.dumps(jsonable(obj), indent=indent, allow_nan=False)
    return write_atomic(path, text + "\n")


def save_torch(obj, path) -> Path:
    """``torch.save`` to ``path`` atomically (checkpoints)."""
    import torch

    with _replacing(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def settings_hash(settings) -> str:
    """SHA-256 (first 16 hex digits) of the canonical JSON of ``settings`` (keys sorted).

    >>> settings_hash({"b": 1, "a": (2.0,)}) == settings_hash({"a": [2.0], "b": 1})
    True
    """
    blob = json.dumps(jsonable(settings), sort_keys=True, allow_nan=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def int_at_least(lo: int):
    """``argparse`` type: an integer ≥ ``lo``; anything else is an ``ArgumentTypeError`` that
    argparse reports in one line naming the option (exit status 2).

    >>> int_at_least(1)("3")
    3
    """
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {lo}, got {v}")
        return v

    return parse
