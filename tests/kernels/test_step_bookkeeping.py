"""step_begin / step_end (a step's set-up and bookkeeping) vs the torch backend, exactly (they are decisions)."""

import math

import pytest
import torch
from fastnode.kernels import TritonStepOps

from fastnode import _stats as st
from fastnode.backends.torch_ops import TorchStepOps

from .conftest import kernel_devices

F64 = torch.float64
CODES = (st.NON_FINITE, st.STEP_UNDERFLOW, st.TIME_OVERFLOW, st.MAX_STEPS)
C = (0.0, 0.2, 0.3, 0.8, 8 / 9, 1.0, 1.0)


def _groups(G, device, seed=0):
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


def _equal(got, exp):
    assert len(got) == len(exp)
    for i, (a, b) in enumerate(zip(got, exp)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        if a.dtype == torch.bool and a.numel():
            assert int(a.view(torch.uint8).max()) <= 1, (i, "a flag was never written")
        # Exact, but for stage times t + c * h, which a fused multiply-add may round once instead of twice.
        assert torch.equal(a, b) or torch.allclose(a, b, rtol=4e-16, atol=0, equal_nan=True), (i, a, b)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("G", [7, 1], ids=["G7", "G1"])
@pytest.mark.parametrize("to_outputs", [True, False], ids=["to-outputs", "to-end"])
@pytest.mark.parametrize("sign, state_dtype", [(1.0, torch.float64), (-1.0, torch.float32)], ids=["fwd-f64", "rev-f32"])
def test_step_begin(device, G, to_outputs, sign, state_dtype):
    t, h, running, t_out, t_end = _groups(G, device)
    squeeze = G == 1
    args = (t, h, running, t_out, t_end, to_outputs, C, sign, state_dtype, squeeze)
    got = TritonStepOps().step_begin(*args)
    exp = TorchStepOps().step_begin(*args)
    _equal(got, exp)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("G, block", [(7, None), (1, None), (7, 2)], ids=["G7", "G1", "G7-4-programs"])
def test_step_end(device, G, block, monkeypatch):
    """Accepted, rejected, clipped, not running; stuck by no move (non-finite and underflow), by an infinite step
    and by the step budget; output times crossed. With several programs the packet is reduced by atomics."""
    if block is not None:
        from fastnode.kernels import _launch

        monkeypatch.setattr(_launch, "_GPU_BLOCK", block)
        monkeypatch.setattr(_launch, "_INTERP_BLOCK", block)
    g = torch.Generator().manual_seed(1)
    t, h, running, t_out, t_end = _groups(G, device, seed=1)
    accept = (torch.rand(G, generator=g) < 0.6).to(device) & running
    clipped = (torch.rand(G, generator=g) < 0.3).to(device)
    t_new = torch.minimum(t + h, t_end)
    h_next = h * (0.5 + torch.rand(G, generator=g, dtype=F64).to(device))
    n_att = torch.randint(0, 5, (G,), generator=g).to(device)
    n_acc = torch.minimum(n_att, torch.randint(0, 5, (G,), generator=g).to(device))
    status = torch.zeros(G, dtype=torch.int8, device=device)
    last_nonfinite = (torch.rand(G, generator=g) < 0.3).to(device)
    new_ok = (torch.rand(G, generator=g) < 0.8).to(device)
    next_idx = torch.searchsorted(t_out, t.unsqueeze(1), right=True).squeeze(1)
    if G > 3:
        accept[1], running[1], h_next[1] = False, True, 0.0  # no move
        new_ok[1] = False  # ... after a non-finite attempt
        accept[2], running[2], h_next[2] = True, True, math.inf  # the step grew without bound
        n_att[3], running[3], accept[3] = 9, True, False  # the budget
    max_num_steps = 10
    args = (accept, h_next, h, clipped, running, t, t_new, t_end, n_att, n_acc, status, last_nonfinite, new_ok,
            next_idx, t_out, max_num_steps, CODES)
    got = TritonStepOps().step_end(*args)
    exp = TorchStepOps().step_end(*args)
    _equal(got, exp)
    if G > 3:
        assert got[6][1:4].all()  # stuck
        assert got[4][1:4].tolist() == [st.NON_FINITE, st.TIME_OVERFLOW, st.MAX_STEPS]


@pytest.mark.parametrize("device", kernel_devices())
def test_opcheck(device):
    t, h, running, t_out, t_end = _groups(5, device)
    c = torch.tensor(C, dtype=F64, device=device)
    torch.library.opcheck(torch.ops.fastnode_triton.step_begin.default,
                          (t, h, running, t_out, t_end, True, c, False, torch.float32))
    G = t.shape[0]
    b = torch.ones(G, dtype=torch.bool, device=device)
    i = torch.ones(G, dtype=torch.int64, device=device)
    codes = torch.tensor(CODES, dtype=torch.int8, device=device)
    torch.library.opcheck(torch.ops.fastnode_triton.step_end.default,
                          (b, h, h, ~b, b, t, t + h, t_end, i, i, torch.zeros(G, dtype=torch.int8, device=device),
                           ~b, b, i, t_out, 100, codes))
