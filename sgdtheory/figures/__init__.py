"""Draw every theory figure: ``python -m sgdtheory.figures`` (CLI in ``__main__.py``).

The CLI is importable too: :func:`main` takes the argument list and returns the exit status,
and :func:`load_data` reloads an experiment's saved data so ``plot`` can redraw it.
"""

from __future__ import annotations

__all__ = ["load_data", "main", "run_experiment"]


def main(argv=None) -> int:
    """Run the CLI with ``argv`` (a list of strings); returns the exit status."""
    from sgdtheory.figures.__main__ import main as _main

    return _main(argv)


def run_experiment(name, **kwargs):
    """See :func:`sgdtheory.figures.__main__.run_experiment`."""
    from sgdtheory.figures.__main__ import run_experiment as _run

    return _run(name, **kwargs)


def load_data(out, name):
    """See :func:`sgdtheory.figures.__main__.load_data`."""
    from sgdtheory.figures.__main__ import load_data as _load

    return _load(out, name)
