"""Statistics (NFE, accepted/rejected) and the one-host-sync-per-step property."""

import pytest
import torch

import fastnode
from fastnode import last_stats, odeint
from fastnode.testing import count_host_transfers

F64 = torch.float64


class Counting(torch.nn.Module):
    def __init__(self, per_sample=False):
        super().__init__()
        self.calls = 0
        self.lin = torch.nn.Linear(3, 3).double()

    def forward(self, t, y):
        self.calls += 1
        return torch.tanh(self.lin(y)) - 0.5 * y


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("method", ["dopri5", "bosh3", "dopri8", "adaptive_heun", "rk4"])
def test_nfe_counts_every_call(method, per_sample):
    if per_sample and method == "rk4":
        pytest.skip("per-sample control is for adaptive methods")
    torch.manual_seed(0)
    f = Counting()
    y0 = torch.randn(4, 3, dtype=F64)
    opts = {"per_sample": per_sample} if method != "rk4" else {"step_size": 0.1}
    odeint(f, y0, torch.linspace(0, 2, 5, dtype=F64), method=method, rtol=1e-6, atol=1e-8, options=opts)
    st = last_stats()
    assert st.nfe == f.calls
    assert st.method == method
    if per_sample:
        assert st.n_accepted.shape == (4,) and st.n_rejected.shape == (4,)
        torch.testing.assert_close(st.n_steps, st.n_accepted + st.n_rejected)
        assert st.success and (st.status == fastnode.SUCCESS).all()
    else:
        assert isinstance(st.n_accepted, int) and st.n_steps == st.n_accepted + st.n_rejected
        assert st.n_accepted > 0


def test_nfe_per_step_accounting_dopri5():
    # FSAL: one evaluation at the start, one for the initial step selection, 6 per step attempt.
    f = Counting()
    odeint(f, torch.ones(2, 3, dtype=F64), torch.tensor([0.0, 3.0], dtype=F64), rtol=1e-9, atol=1e-9)
    st = last_stats()
    assert st.nfe == 2 + 6 * st.n_steps


def test_rejections_are_counted():
    # A first step far too large must be rejected at least once.
    odeint(lambda t, y: -50 * y, torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-8,
           atol=1e-10, options={"first_step": 0.9})
    assert last_stats().n_rejected >= 1


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("n_out", [2, 40], ids=["T2", "T40"])
def test_at_most_one_host_sync_per_step(per_sample, n_out):
    """Transfers = (a constant for set-up and checks) + exactly one per loop iteration.

    Two solves with very different step counts must show the same constant.
    """
    mus = torch.tensor([1.0, 4.0], dtype=F64)

    def f(t, y):
        return torch.stack([y[:, 1], mus * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], dim=1)

    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=F64)
    t = torch.linspace(0.0, 6.0, n_out, dtype=F64)
    consts = []
    for rtol in (1e-3, 1e-8):
        with count_host_transfers() as c:
            odeint(f, y0, t, rtol=rtol, atol=rtol, options={"per_sample": per_sample})
        st = last_stats()
        assert st.n_iterations > 5
        consts.append(c["n"] - st.n_iterations)
    assert consts[0] == consts[1], consts
    # And the constant is small: input checks plus the set-up transfer and a couple at the end.
    assert 0 <= consts[0] <= 20, consts


def test_last_stats_is_per_call():
    odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="rk4",
           options={"step_size": 0.25})
    assert last_stats().method == "rk4" and last_stats().n_accepted == 4 and last_stats().nfe == 16
    odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    assert last_stats().method == "dopri5"
