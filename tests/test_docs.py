"""The examples in the public docstrings run and print what they say."""

import doctest
import importlib
import warnings

import pytest

MODULES = ["fastnode", "fastnode._odeint", "fastnode._adjoint", "fastnode._stats"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0
