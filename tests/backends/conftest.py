"""Whole-solve and packaging tests: the devices the Triton kernels run on here, and poisoned Triton outputs.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py`` before anything
imports triton, unless ``FASTNODE_TEST_CUDA=1``); CUDA cases carry ``@pytest.mark.gpu`` and run the compiled kernels
(``FASTNODE_TEST_CUDA=1 pytest tests/backends tests/ops`` on a GPU machine); they skip without a GPU.
"""

import os

import pytest
import torch

from fastnode import kernels

COMPILED = pytest.mark.skipif(kernels.INTERPRETED, reason="needs the compiled kernels (FASTNODE_TEST_CUDA=1)")


def field(t, y):
    """Rows decay at different rates (per-sample steps differ) and are driven by t ([B] per-sample, 0-d shared)."""
    rate = torch.linspace(0.5, 4.0, y.shape[0], dtype=y.dtype, device=y.device).unsqueeze(1)
    tt = t.reshape(-1, 1).to(y.dtype) if t.dim() else t.to(y.dtype)
    return -rate * y + torch.sin(3.0 * tt + y)


def y0(dtype, device, B=7, N=3):
    """A fixed random initial state [B, N] (drawn in float64, then cast)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, N, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def kernel_devices() -> list:
    """``cpu`` (the interpreter) and ``cuda`` (marked gpu), each skipped where the kernels cannot run."""
    out = []
    for dev, marks in (("cpu", []), ("cuda", [pytest.mark.gpu])):
        why = kernels.unavailable_reason(torch.device(dev)) if dev == "cpu" or torch.cuda.is_available() else "no GPU"
        if dev == "cpu" and why is not None and os.environ.get("FASTNODE_NO_INTERPRETER"):
            why = os.environ["FASTNODE_NO_INTERPRETER"]
        if dev == "cuda" and why is None and kernels.INTERPRETED:
            why = "Triton's interpreter is on: run with FASTNODE_TEST_CUDA=1 to test the compiled kernels"
        if why is not None:
            marks = marks + [pytest.mark.skip(reason=why)]
        out.append(pytest.param(dev, marks=marks, id=dev))
    return out


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer a Triton op allocates starts as NaN (floats) or 2 (flags): an element never written fails."""
    from fastnode.kernels import _launch

    monkeypatch.setattr(_launch, "POISON", True)
