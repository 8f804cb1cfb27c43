"""The examples in the docstrings run and print what they say: every module of the package, found by walking it.

A module with no example passes trivially; the modules named in ``MUST_HAVE_EXAMPLES`` must keep theirs. The examples
of the ``fastnode_triton::`` ops (docstrings on ``torch.library`` op objects, which doctest does not find) run in
``tests/backends/test_triton.py``.
"""

import doctest
import importlib
import pkgutil
import warnings

import pytest


MUST_HAVE_EXAMPLES = ["fastnode", "fastnode._odeint", "fastnode._adjoint", "fastnode._stats"]
# Entry points that run a program when imported.
SKIP = {"fastnode.studies.__main__"}


def _modules() -> list[str]:
    import fastnode.kernels  # installed from the top-level kernels/ (not below fastnode/ on disk): walked apart

    names = ["fastnode", "fastnode.kernels"]
    for pkg in (fastnode, fastnode.kernels):
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
            if info.name not in SKIP:
                names.append(info.name)
    return sorted(set(names))


MODULES = _modules()


def test_the_walk_finds_every_layer():
    assert set(MUST_HAVE_EXAMPLES) <= set(MODULES)
    for name in ("fastnode.backends.torch_ops", "fastnode.kernels.rk_combine", "fastnode.models", "fastnode.studies"):
        assert name in MODULES, name


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert res.failed == 0
    if name in MUST_HAVE_EXAMPLES:
        assert res.attempted > 0
