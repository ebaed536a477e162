"""Every public name imports, and public classes and functions show their public path."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import torchgradcheck

PUBLIC = [name for name in torchgradcheck.__all__ if name != "__version__"]


def test_all_is_unique():
    assert len(set(torchgradcheck.__all__)) == len(torchgradcheck.__all__)
    assert "verify_module" in PUBLIC


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_imports(name):
    namespace: dict = {}
    exec(f"from torchgradcheck import {name}", namespace)
    assert namespace[name] is getattr(torchgradcheck, name)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_docstring(name):
    assert inspect.getdoc(getattr(torchgradcheck, name))


@pytest.mark.parametrize("name", [n for n in PUBLIC if inspect.isclass(getattr(torchgradcheck, n))])
def test_public_class_module_is_torchgradcheck(name):
    assert getattr(torchgradcheck, name).__module__ == "torchgradcheck"


def test_star_import_gives_exactly_all():
    namespace: dict = {}
    exec("from torchgradcheck import *", namespace)
    assert set(torchgradcheck.__all__) <= set(namespace)


def test_version_is_a_string():
    assert isinstance(torchgradcheck.__version__, str)
    assert torchgradcheck.__version__.count(".") >= 2


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="module 'torchgradcheck' has no attribute 'verify_modul'"):
        torchgradcheck.verify_modul  # noqa: B018


def test_dir_lists_the_public_names():
    assert set(torchgradcheck.__all__) <= set(dir(torchgradcheck))


def test_import_does_not_import_torch():
    """``import torchgradcheck`` stays light (PEP 562 lazy attributes): the pytest plugin loads it in every run."""
    code = "import sys, torchgradcheck; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


def test_error_hierarchy():
    from torchgradcheck import (
        GradcheckWarning,
        GradientMismatchError,
        InvalidArgumentError,
        InvalidArgumentTypeError,
        TorchGradcheckError,
    )

    assert issubclass(InvalidArgumentError, TorchGradcheckError)
    assert issubclass(InvalidArgumentError, ValueError)
    assert issubclass(InvalidArgumentTypeError, TorchGradcheckError)
    assert issubclass(InvalidArgumentTypeError, TypeError)
    assert issubclass(GradientMismatchError, TorchGradcheckError)
    assert issubclass(GradientMismatchError, AssertionError)
    assert issubclass(GradcheckWarning, UserWarning)
