"""step_end (a step's bookkeeping per group and the loop's one host-transfer packet) vs the reference, exactly
(these are decisions), on every backend; each namespace's opcheck."""

import math

import pytest
import torch

from fastnode import _stats as st

from . import _calls as C
from ._calls import F64
from .test_step_begin import _book_inputs, _groups

OP = "step_end"
CODES = (st.NON_FINITE, st.STEP_UNDERFLOW, st.TIME_OVERFLOW, st.MAX_STEPS)


def _equal(got, exp):
    C.assert_outputs_layout(got, exp)
    for i, (a, b) in enumerate(zip(got, exp)):
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)), (i, a, b)


@pytest.mark.parametrize("be", C.backends(OP, cuda=("triton",)))
@pytest.mark.parametrize("G, block", [(7, None), (1, None), (7, 2)], ids=["G7", "G1", "G7-4-programs"])
def test_step_end(be, G, block, monkeypatch):
    """Accepted, rejected, clipped, not running; stuck by no move (non-finite and underflow), by an infinite step
    and by the step budget; output times crossed. With several Triton programs the packet is reduced by atomics."""
    if block is not None:
        if be.name != "triton":
            pytest.skip("one program per launch: the block size is the Triton op's")
        from fastnode.kernels import _launch

        monkeypatch.setattr(_launch, "_GPU_BLOCK", block)
        monkeypatch.setattr(_launch, "_INTERP_BLOCK", block)
    device = be.device
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
    args = (accept, h_next, h, clipped, running, t, t_new, t_end, n_att, n_acc, status, last_nonfinite, new_ok,
            next_idx, t_out, 10, CODES)
    got = C.step_end(be, *args)
    _equal(got, C.ref_step_end(*args))
    if G > 3:
        assert got[6][1:4].all()  # stuck
        assert got[4][1:4].tolist() == [st.NON_FINITE, st.TIME_OVERFLOW, st.MAX_STEPS]


@pytest.mark.parametrize("be", C.backends(OP, cuda=("triton",)))
@pytest.mark.parametrize("G, T", [(1, 2), (7, 5), (40, 3)], ids=lambda v: str(v))
def test_step_end_random_groups(be, G, T):
    """Random decisions over many groups, a rejected step that cannot move t, arbitrary status codes."""
    device = be.device
    gen = torch.Generator().manual_seed(G + T)
    t_out, t, h, running = _book_inputs(G, T, gen)
    accept = torch.rand(G, generator=gen) > 0.3
    h_next = torch.rand(G, dtype=F64, generator=gen) * 0.5
    h_next[-1] = 0.0  # a rejected step that cannot move t: underflow (or non-finite)
    clipped = torch.rand(G, generator=gen) > 0.5
    t_new = t + torch.rand(G, dtype=F64, generator=gen)
    n_att = torch.randint(0, 10, (G,), generator=gen)
    n_acc = torch.minimum(n_att, torch.randint(0, 10, (G,), generator=gen))
    status = torch.zeros(G, dtype=torch.int8)
    last_nf = torch.rand(G, generator=gen) > 0.5
    new_ok = torch.rand(G, generator=gen) > 0.3
    next_idx = torch.ones(G, dtype=torch.int64)
    ts = [x.to(device) for x in (accept, h_next, h, clipped, running, t, t_new, t_out[:, -1].contiguous(), n_att,
                                 n_acc, status, last_nf, new_ok, next_idx, t_out)]
    args = (*ts, 8, (3, 2, 4, 1))
    _equal(C.step_end(be, *args), C.ref_step_end(*args))


@pytest.mark.parametrize("be", C.backends(OP, cuda=("triton",)))
def test_opcheck(be):
    device = be.device
    t, h, running, t_out, t_end = _groups(5, device)
    G = t.shape[0]
    b = torch.ones(G, dtype=torch.bool, device=device)
    i = torch.ones(G, dtype=torch.int64, device=device)
    z8 = torch.zeros(G, dtype=torch.int8, device=device)
    if be.name == "ext":
        codes = [3, 2, 4, 1]
        cases = [(running, h, h, running, running, t, t + 0.1, t_end, i * 0, i * 0, z8, running, running, i, t_out,
                  100, codes),
                 (b, h, h, ~b, b, t, t + h, t_end, i, i, z8, ~b, b, i, t_out, 100, list(CODES))]
    else:
        codes = torch.tensor(CODES, dtype=torch.int8, device=device)
        cases = [(b, h, h, ~b, b, t, t + h, t_end, i, i, z8, ~b, b, i, t_out, 100, codes)]
    for args in cases:
        torch.library.opcheck(be.ops.step_end.default, args)
