"""Backends: selection by name / environment, generators, conversion, errors."""

import numpy as np
import pytest

from sgdtheory import backend as B

HAS_GPU = "cupy" in B.available_backends()
NO_GPU_REASON = "CuPy with a usable CUDA GPU is not available on this machine"


def test_default_is_numpy(monkeypatch):
    monkeypatch.delenv("SGDTHEORY_BACKEND", raising=False)
    be = B.get_backend()
    assert be.name == "numpy" and be.xp is np


def test_environment_variable_picks_backend(monkeypatch):
    monkeypatch.setenv("SGDTHEORY_BACKEND", "torch")
    be = B.get_backend()
    assert be.name == "torch" and be.device == "cpu"
    monkeypatch.setenv("SGDTHEORY_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        B.get_backend()


def test_unknown_backend_lists_available():
    with pytest.raises(ValueError, match=r"available here: numpy"):
        B.get_backend("jax")


@pytest.mark.parametrize(("device", "index"), [(None, 0), (1, 1), ("2", 2), ("cuda", 0),
                                               ("cuda:3", 3), ("CUDA:1", 1)])
def test_cupy_device_spellings(device, index):
    assert B._cupy_index(device) == index


def test_cupy_bad_device_is_rejected():
    with pytest.raises(ValueError, match="GPU index"):
        B._cupy_index("cpu")


def test_cupy_without_gpu_says_so():
    if HAS_GPU:
        assert B.get_backend("cupy").name == "cupy"
        return
    with pytest.raises(ValueError, match=r"cupy.*(GPU|not installed).*Available here: numpy"):
        B.get_backend("cupy")


def test_torch_cuda_without_cuda_is_an_error():
    import torch

    if torch.cuda.is_available():
        assert B.get_backend("torch", device="cuda").device == "cuda"
    else:
        with pytest.raises(ValueError, match="needs CUDA"):
            B.get_backend("torch", device="cuda")
    with pytest.raises(ValueError, match="numpy backend runs on the CPU"):
        B.get_backend("numpy", device="cuda")


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_rng_is_reproducible_and_normal(name):
    be = B.get_backend(name)
    a = be.to_numpy(be.standard_normal(be.rng(3), (50_000,), "float32"))
    b = be.to_numpy(be.standard_normal(be.rng(3), (50_000,), "float32"))
    c = be.to_numpy(be.standard_normal(be.rng(4), (50_000,), "float32"))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32
    se = 1 / np.sqrt(a.size)
    assert abs(a.mean()) < 4 * se and abs(a.var() - 1) < 4 * np.sqrt(2) * se
    out = be.zeros((1000,), "float64")
    res = be.standard_normal(be.rng(0), None, out=out)
    assert res is out and be.to_numpy(out).std() > 0.5


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_permutations_are_uniform_permutations(name):
    be = B.get_backend(name)
    perm = be.to_numpy(be.permutations(be.rng(0), 6000, 4))
    assert perm.shape == (6000, 4)
    assert np.all(np.sort(perm, axis=1) == np.arange(4))
    first = np.bincount(perm[:, 0], minlength=4) / 6000  # each 1/4 ± 3 sd
    assert np.all(np.abs(first - 0.25) < 3 * np.sqrt(0.25 * 0.75 / 6000) + 1e-12)


def test_asarray_and_to_numpy_roundtrip():
    import torch

    be = B.get_backend("torch")
    t = be.asarray([1.0, 2.0], dtype="float32")
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    assert be.asarray(np.arange(3.0)).dtype == torch.float64
    np.testing.assert_array_equal(B.to_numpy(t), [1.0, 2.0])
    assert be.is_array(t) and not be.is_array(np.ones(2))
    with pytest.raises(ValueError, match="dtype must be one of"):
        be.dtype("complex64")
    nb = B.get_backend("numpy")
    assert nb.asarray(t).dtype == np.float32


def test_seed_validation():
    be = B.get_backend("numpy")
    with pytest.raises(ValueError, match="seed"):
        be.rng(-1)
    with pytest.raises(ValueError, match="seed"):
        be.rng(1.5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU_REASON)
def test_cupy_backend_runs_the_simulator():
    from sgdtheory import nqm, simulate
    from sgdtheory.problems import NoisyQuadratic

    be = B.get_backend("cupy")
    h = np.array([1.0, 0.3])
    res = simulate.run(NoisyQuadratic(h, h), lr=0.5, batch=4, steps=20, replicas=4000,
                       seed=0, record_every=5, backend=be, progress=False)
    assert type(res.train_loss).__module__.startswith("cupy")
    ref = nqm.expected_loss(h, h, 0.5, 4, 20)[res.steps]
    z = (res.mean() - ref)[1:] / res.stderr()[1:]
    assert np.all(np.abs(z) <= 3)


@pytest.mark.parametrize("shape", [(400, 500), (401, 3), (7,)])
def test_numpy_float32_box_muller_is_gaussian_and_scaled(shape):
    from scipy import stats

    be = B.get_backend("numpy")
    scale = np.linspace(0.5, 2.0, shape[-1]).astype(np.float32)
    z = be.standard_normal(be.rng(1), shape, "float32", scale=scale)
    assert z.dtype == np.float32 and z.shape == shape and np.all(np.isfinite(z))
    u = (z / scale).ravel().astype(float)
    if u.size > 1000:  # Kolmogorov–Smirnov against N(0, 1), and independence of neighbours
        assert stats.kstest(u, "norm").pvalue > 1e-3
        half = u.size // 2
        assert abs(np.corrcoef(u[:half], u[half:2 * half])[0, 1]) < 4 / np.sqrt(half)


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_array_operations_match_numpy(name):
    """copy, astype, concatenate, all_finite and backend_of against plain NumPy."""
    be = B.get_backend(name)
    a = np.arange(6.0).reshape(2, 3)
    x = be.asarray(a)
    c = be.copy(x)
    c[0, 0] = 99.0
    assert be.to_numpy(x)[0, 0] == 0.0  # a copy, not a view
    i = be.astype(x * 1.5, "int64")
    np.testing.assert_array_equal(be.to_numpy(i), (a * 1.5).astype(np.int64))
    assert be.to_numpy(i).dtype == np.int64
    joined = be.concatenate([x, x + 1], axis=-1)
    np.testing.assert_array_equal(be.to_numpy(joined), np.concatenate([a, a + 1], axis=-1))
    assert be.all_finite(x) and not be.all_finite(x + float("inf"))
    assert B.backend_of(x) == be and B.array_module(x) is be.xp
    assert be.to_numpy(be.asarray(a, dtype="float32"), dtype=float).dtype == np.float64
    assert be.numpy_native == (name == "numpy")


def test_backend_of_reads_the_device_of_a_tensor():
    import torch

    be = B.backend_of(torch.zeros(2))
    assert be.name == "torch" and be.device == "cpu" and be.xp is torch
    assert B.backend_of(3.0) == B.get_backend("numpy")
