"""adjoint_weights (the parameter adjoint's per-sample quadrature weights) vs the reference and a closed form.

Only the ``fastnode::`` namespace has this op (the Triton backend runs the reference's one torch expression)."""

import pytest
import torch

from . import _calls as C
from ._calls import DTYPES, F64, tableau

OP = "adjoint_weights"


@pytest.mark.parametrize("be", C.backends(OP, names=("ext",)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_adjoint_weights(be, dtype):
    h = torch.tensor([0.5, 0.25, 1e-3, 2.0], dtype=dtype, device=be.device)
    accept = torch.tensor([True, False, True, False], device=be.device)
    b = tableau("dopri5").b
    w = C.adjoint_weights(be, h, accept, b)
    expect = torch.tensor(b, dtype=dtype, device=be.device).unsqueeze(1) * torch.where(accept, h, 0.0).unsqueeze(0)
    assert w.shape == (len(b), 4) and torch.equal(w, expect)
    assert torch.equal(w, C.ref_adjoint_weights(h, accept, b))


@pytest.mark.parametrize("be", C.backends(OP, names=("ext",)))
def test_opcheck(be):
    h = torch.rand(3, dtype=F64).to(be.device)
    torch.library.opcheck(be.ops.adjoint_weights.default,
                          (h, torch.tensor([True, True, False], device=be.device), list(tableau("dopri5").b)))
