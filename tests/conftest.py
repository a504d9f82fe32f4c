"""Test-wide settings: one BLAS/torch thread per pytest-xdist worker, a headless matplotlib."""

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")


def pytest_configure(config):
    try:
        import torch
    except ImportError:  # the torch-free parts of the suite still run
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def quick(request):
    """The quick preset of the test module's ``EXPERIMENT`` on NumPy, seed 0 (once per file)."""
    from sgdtheory.backend import get_backend

    mod = request.module.EXPERIMENT
    return mod.compute(mod.PRESETS["quick"], get_backend("numpy"), 0)
