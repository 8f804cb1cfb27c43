"""step_begin (a step's set-up per group: clip to the next stop, stage times) vs the reference, exactly (these are
decisions), on every backend; each namespace's opcheck."""

import math

import pytest
import torch

from . import _calls as C
from ._calls import F32, F64, tableau

OP = "step_begin"
DOPRI5_C = (0.0, 0.2, 0.3, 0.8, 8 / 9, 1.0, 1.0)


def _equal(got, exp):
    C.assert_outputs_layout(got, exp)
    for i, (a, b) in enumerate(zip(got, exp)):
        # Exact, but for stage times t + c * h, which a fused multiply-add may round once instead of twice
        # (1 ulp of a stage time).
        assert torch.equal(a, b) or torch.allclose(a, b, rtol=2 * torch.finfo(a.dtype).eps, atol=0, equal_nan=True), \
            (i, a, b)


def _groups(G, device, seed=0):
    """Output times per group, t exactly on one of them in group 0, some groups not running."""
    g = torch.Generator().manual_seed(seed)
    t_out = torch.sort(torch.rand(G, 6, generator=g, dtype=F64), dim=1).values
    t_out[:, 0] = 0.0
    t_out[:, -1] = 1.0
    t = t_out[:, 0] + torch.rand(G, generator=g, dtype=F64) * 0.9
    t[0] = t_out[0, 2]  # exactly on an output time
    h = 0.3 * torch.rand(G, generator=g, dtype=F64)
    running = torch.rand(G, generator=g) < 0.8
    running[0] = True
    return [x.to(device) for x in (t, h, running, t_out.contiguous(), t_out[:, -1].contiguous())]


def _book_inputs(G, T, gen):
    """Wider times, one output time per group (T = 1), and a step grown without bound."""
    t_out = torch.sort(torch.rand(G, T, dtype=F64, generator=gen) * 3, dim=1).values
    t_out[:, 0] = 0.0
    t = t_out[:, 0] + torch.rand(G, dtype=F64, generator=gen) * t_out[:, -1] * 0.8
    h = torch.rand(G, dtype=F64, generator=gen) * 0.7
    h[0] = math.inf if G > 2 else h[0]
    running = torch.rand(G, generator=gen) > 0.2
    return t_out, t, h, running


@pytest.mark.parametrize("be", C.backends(OP, cuda=("triton",)))
@pytest.mark.parametrize("G", [7, 1], ids=["G7", "G1"])
@pytest.mark.parametrize("to_outputs", [True, False], ids=["to-outputs", "to-end"])
@pytest.mark.parametrize("sign, state_dtype", [(1.0, F64), (-1.0, F32)], ids=["fwd-f64", "rev-f32"])
def test_step_begin(be, G, to_outputs, sign, state_dtype):
    t, h, running, t_out, t_end = _groups(G, be.device)
    args = (t, h, running, t_out, t_end, to_outputs, DOPRI5_C, sign, state_dtype, G == 1)
    _equal(C.step_begin(be, *args), C.ref_step_begin(*args))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 where not running, on purpose
@pytest.mark.parametrize("be", C.backends(OP, cuda=("triton",)))
@pytest.mark.parametrize("G, T", [(1, 2), (1, 9), (7, 5), (33, 1)], ids=lambda v: str(v))
@pytest.mark.parametrize("to_outputs", [False, True])
@pytest.mark.parametrize("sign, sdt", [(1.0, F64), (-1.0, F32)], ids=["fwd-f64", "rev-f32"])
def test_step_begin_times_and_infinite_steps(be, G, T, to_outputs, sign, sdt):
    gen = torch.Generator().manual_seed(G * 10 + T)
    t_out, t, h, running = (x.to(be.device) for x in _book_inputs(G, T, gen))
    c = tableau("dopri5").c
    args = (t, h, running, t_out, t_out[:, -1].contiguous(), to_outputs, c, sign, sdt, G == 1)
    _equal(C.step_begin(be, *args), C.ref_step_begin(*args))


@pytest.mark.parametrize("be", C.backends(OP, cuda=("triton",)))
def test_opcheck(be):
    device = be.device
    t, h, running, t_out, t_end = _groups(5, device)
    c = tableau("tsit5").c
    if be.name == "ext":
        cases = [(t, h, running, t_out, t_end, True, list(c), 1.0, F32, False)]
    else:
        cc = torch.tensor(DOPRI5_C, dtype=F64, device=device)
        cases = [(t, h, running, t_out, t_end, True, cc, False, F32)]
    for args in cases:
        torch.library.opcheck(be.ops.step_begin.default, args)
