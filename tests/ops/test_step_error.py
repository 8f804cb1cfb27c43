"""step_error (the solution and the scaled error before the norm, for a user's norm) vs the reference's
composition. Only the ``fastnode_triton::`` namespace has this op (the C++ backend runs a user norm on the
reference)."""

import pytest
import torch

from . import _calls as C
from ._calls import DTYPES, F64, ControllerConfig, assert_rounding_close, combo_bound, tableau
from .test_finish_control import _inputs

OP = "step_error"


@pytest.mark.parametrize("be", C.backends(OP, names=("triton",)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", C.SHAPES, ids=C.SHAPE_IDS)
def test_step_error_for_a_user_norm(be, dtype, shape):
    """The scaled error the op writes is the one the reference hands a user norm; the solution is the reference's."""
    device = be.device
    tab = tableau("tsit5")
    G, N = shape
    y, K, h_ctl = _inputs(tab, G, N, dtype, device, contiguous=False, seed=3)
    seen = {}

    def norm(x):
        seen.setdefault("x", []).append(x.clone())
        return x.abs().amax(dim=1)

    cfg = ControllerConfig(order=tab.order)
    prev = torch.ones(G, dtype=F64, device=device)
    running = torch.ones(G, dtype=torch.bool, device=device)
    atol = torch.full((1, N), 1e-4, dtype=dtype, device=device)
    hy = h_ctl.to(dtype)
    ref = C.ref_finish_control(tab, y, K, hy, 1e-3, atol, norm, cfg, h_ctl, prev, running)
    y_new, x = C.step_error(be, tab, y, K, hy, 1e-3, atol)
    (x_ref,) = seen["x"]
    scale = torch.maximum(y.abs(), ref[0].abs()) * 1e-3 + 1e-4
    assert_rounding_close(x, x_ref, combo_bound(torch.zeros_like(y), K, hy, tab.e) / scale)
    assert_rounding_close(y_new, ref[0], combo_bound(y, K, hy, tab.b))


@pytest.mark.parametrize("be", C.backends(OP, names=("triton",)))
def test_opcheck(be):
    tab = tableau("dopri5")
    G, N = 3, 5
    y, K, h_ctl = _inputs(tab, G, N, F64, be.device)
    args = (y, K.contiguous(), h_ctl.to(y.dtype), *C.finish_args(tab, y), None, None,
            C.consts(1e-3, 1e-4, None, be.device))
    torch.library.opcheck(be.ops.step_error.default, args)
