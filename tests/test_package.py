"""Package-level rules: sgdtheory never imports torch/cupy at import, nor validate."""

import pathlib
import re
import subprocess
import sys

import pytest

import sgdtheory

ROOT = pathlib.Path(sgdtheory.__file__).parent


def test_importing_sgdtheory_loads_neither_torch_nor_cupy():
    modules = sorted(
        "sgdtheory." + ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in ROOT.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = [m for m in ('torch', 'cupy', 'validate') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_only_backend_imports_cupy_and_nothing_imports_validate():
    pattern_cupy = re.compile(r"^\s*(import cupy|from cupy)", re.MULTILINE)
    pattern_validate = re.compile(r"^\s*(import validate|from validate)", re.MULTILINE)
    for path in ROOT.rglob("*.py"):
        text = path.read_text()
        if path.name != "backend.py":
            assert not pattern_cupy.search(text), f"{path} imports cupy"
        assert not pattern_validate.search(text), f"{path} imports validate"


def test_version_matches_pyproject():
    pyproject = (ROOT.parent / "pyproject.toml").read_text()
    assert f'version = "{sgdtheory.__version__}"' in pyproject


def test_only_backend_branches_on_the_backend_name():
    """Backend differences live in backend.py; other modules call its methods."""
    pattern = re.compile(r"""\.name\s*[!=]=\s*["'](numpy|cupy|torch)["']""")
    for path in list(ROOT.rglob("*.py")) + list((ROOT.parent / "benchmarks").glob("*.py")):
        if path.name != "backend.py":
            assert not pattern.search(path.read_text()), f"{path} branches on a backend name"


def test_every_module_declares_its_public_names():
    for path in ROOT.rglob("*.py"):
        if path.name != "__main__.py":
            assert re.search(r"^__all__ = \[", path.read_text(), re.MULTILINE), path


def test_top_level_names_are_the_modules_objects_and_load_lazily():
    """``import sgdtheory`` imports no submodule (no SciPy); every name in __all__ resolves to
    the object of its module."""
    code = ("import sys, sgdtheory\n"
            "assert not [m for m in sys.modules if m.startswith('sgdtheory.')], sys.modules\n"
            "assert 'scipy' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    import importlib

    for name in sgdtheory.__all__:
        value = getattr(sgdtheory, name)
        if name in sgdtheory._MODULES:
            assert value is importlib.import_module(f"sgdtheory.{name}")
        elif name != "__version__":
            module = importlib.import_module(f"sgdtheory.{sgdtheory._NAMES[name]}")
            assert value is getattr(module, name) and name in module.__all__
    assert set(sgdtheory.__all__) <= set(dir(sgdtheory))
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        sgdtheory.nonsense  # noqa: B018
