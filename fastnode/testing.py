"""Test utilities shared by the tests and the benchmarks (not part of the solver)."""

from __future__ import annotations

import contextlib

import torch

# Every way a tensor's value reaches Python; on a GPU each is a blocking device-to-host sync.
_CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_host_transfers():
    """Count tensor-to-Python conversions made inside the block (patches ``torch.Tensor`` while active).

    Example:
        >>> import torch
        >>> with count_host_transfers() as c:
        ...     _ = bool(torch.ones(1))
        >>> c["n"]
        1
    """
    saved = {n: getattr(torch.Tensor, n) for n in _CONVERSIONS}
    counter = {"n": 0}

    def wrap(fn):
        def inner(self, *a, **k):
            counter["n"] += 1
            return fn(self, *a, **k)

        return inner

    for n, fn in saved.items():
        setattr(torch.Tensor, n, wrap(fn))
    try:
        yield counter
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)
