"""initial_step (the Hairer-Norsett-Wanner starting step around one probe evaluation): the fused pair
``initial_step_probe`` / ``initial_step_finish`` vs the reference ``TorchStepOps.initial_step``, every branch of the
formula (a tiny state or derivative, a probe that does not change the derivative, a probe that blows up), tensor
tolerances, norm segments (tuple states), float32, and the ops' checks and opcheck."""

import math

import pytest
import torch

from fastnode.backends.ext_ops import ExtStepOps

from . import _calls as C
from ._calls import F32, F64, state

OP = "initial_step_probe"
# The fused ops sum the norm's squares in float64 and the reference in the state dtype: the steps agree to the
# rounding of a few RMS norms, raised to 1/order (float32: a 63-term float32 sum, about 10 ulps of 1.2e-7).
RTOL = {F32: 2e-5, F64: 1e-13}


def _probe(t, y):
    return -y * (1.0 + t.to(y.dtype).unsqueeze(1)) + torch.sin(y)


def _both(be, probe, t0, y0, k0, order, rtol, atol, norm):
    ref = C.REF.initial_step(probe, t0, y0, k0, order, rtol, atol, norm)
    got = ExtStepOps().initial_step(probe, t0, y0, k0, order, rtol, atol, norm)
    return got, ref


@pytest.mark.parametrize("be", C.backends(OP, names=("ext",), cuda=()))
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(7, 63), (1, 5), (3, 1)], ids=["G7-N63", "G1-N5", "G3-N1"])
@pytest.mark.parametrize("order", [2, 5])
def test_matches_the_reference(be, dtype, shape, order):
    G, N = shape
    y0 = state(G, N, dtype, be.device)
    k0 = _probe(torch.zeros(G, dtype=F64), y0)
    t0 = torch.linspace(0.0, 0.5, G, dtype=F64)
    got, ref = _both(be, _probe, t0, y0, k0, order, 1e-6, 1e-8, C.RMSNorm())
    assert got.dtype == F64 and got.shape == (G,)
    torch.testing.assert_close(got, ref, rtol=RTOL[dtype], atol=0)


@pytest.mark.parametrize("be", C.backends(OP, names=("ext",), cuda=()))
def test_tensor_tolerances_and_segments(be):
    """[1, N] and [G, N] tolerances; a tuple state's segments (max of per-tensor RMS); strided y0."""
    G, N = 4, 9
    y0 = state(G, N, F64, be.device, contiguous=False)
    k0 = _probe(torch.zeros(G, dtype=F64), y0)
    t0 = torch.zeros(G, dtype=F64)
    rt = torch.linspace(1e-7, 1e-5, N, dtype=F64).unsqueeze(0)
    at = torch.rand(G, N, dtype=F64, generator=torch.Generator().manual_seed(3)) * 1e-6 + 1e-9
    for norm in (C.RMSNorm(), C.RMSNorm([(0, 2), (2, 7), (7, 9)])):
        got, ref = _both(be, _probe, t0, y0, k0, 5, rt, at, norm)
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)


@pytest.mark.parametrize("be", C.backends(OP, names=("ext",), cuda=()))
def test_every_branch(be):
    """Row 0: y0 = 0 (d0 < 1e-5: h0 = 1e-6); row 1: a probe equal to k0 with k0 = 0 (dmax <= 1e-15); row 2: the
    probe is NaN (the step falls back to 1e-6); row 3: ordinary."""
    G, N = 4, 3
    y0 = state(G, N, F64, be.device)
    y0[0] = 0.0
    y0[1] = 1.0
    k0 = _probe(torch.zeros(G, dtype=F64), y0)
    k0[1] = 0.0

    def probe(t, y):
        k = _probe(t, y)
        k[1] = 0.0
        k[2, 1] = math.nan
        return k

    got, ref = _both(be, probe, torch.zeros(G, dtype=F64), y0, k0, 4, 1e-6, 1e-8, C.RMSNorm())
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)
    assert got[2] == 1e-6 and got[0] > 0 and got[1] > 0


@pytest.mark.parametrize("be", C.backends(OP, names=("ext",), cuda=()))
def test_checks_and_opcheck(be):
    y0 = state(3, 4, F64, be.device)
    k0 = state(3, 4, F64, be.device, seed=5)
    ops = be.ops
    with pytest.raises(RuntimeError, match="bad segment"):
        ops.initial_step_probe(y0, k0, None, 1e-6, None, 1e-8, [0, 5])
    with pytest.raises(RuntimeError, match="rtol_t must be"):
        ops.initial_step_probe(y0, k0, torch.ones(2, 4, dtype=F64), 0.0, None, 1e-8, [0, 4])
    h0, y1, d1 = ops.initial_step_probe(y0, k0, None, 1e-6, None, 1e-8, [0, 4])
    with pytest.raises(RuntimeError, match="h0 must be"):
        ops.initial_step_finish(y0, k0, k0, h0.float(), d1, None, 1e-6, None, 1e-8, [0, 4], 5.0)
    with pytest.raises(RuntimeError, match="order must be positive"):
        ops.initial_step_finish(y0, k0, k0, h0, d1, None, 1e-6, None, 1e-8, [0, 4], 0.0)
    torch.library.opcheck(ops.initial_step_probe.default, (y0, k0, None, 1e-6, None, 1e-8, [0, 4]))
    torch.library.opcheck(ops.initial_step_finish.default, (y0, k0, y1, h0, d1, None, 1e-6, None, 1e-8, [0, 4], 5.0))
