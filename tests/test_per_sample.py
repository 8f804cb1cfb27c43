"""Per-sample step control: each sample behaves exactly as if solved alone."""

import math

import pytest
import torch

from fastnode import ADAPTIVE_METHODS, SOLVERS, last_stats, odeint

F64 = torch.float64


def vdp(mu):
    """Van der Pol with per-sample stiffness ``mu: [B]``; accepts t of shape [B] (per-sample) or 0-d."""

    def f(t, y):
        x, v = y[:, 0], y[:, 1]
        return torch.stack([v, mu * (1 - x * x) * v - x], dim=1)

    return f


@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_each_sample_equals_solo_solve(method):
    mus = torch.tensor([0.5, 1.0, 3.0, 6.0], dtype=F64)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-1.5, 0.5], [0.5, -2.0]], dtype=F64)
    t = torch.linspace(0.0, 3.0, 7, dtype=F64)
    opts = {"per_sample": True}
    # Low-order methods get looser tolerances only to keep their step counts (and the test) small.
    order = SOLVERS[method].tableau.order
    rtol = 1e-6 if order >= 5 else (1e-4 if order >= 3 else 1e-3)
    ys = odeint(vdp(mus), y0, t, rtol=rtol, atol=rtol * 1e-2, method=method, options=opts)
    acc = last_stats().n_accepted.clone()
    for i in range(4):
        yi = odeint(vdp(mus[i : i + 1]), y0[i : i + 1], t, rtol=rtol, atol=rtol * 1e-2, method=method, options=opts)
        # Same arithmetic on the same numbers: equal to rounding (bitwise on CPU in practice).
        torch.testing.assert_close(ys[:, i], yi[:, 0], rtol=0, atol=1e-13)
        assert int(last_stats().n_accepted[0]) == int(acc[i])


def test_func_receives_per_sample_time():
    seen = []

    def f(t, y):
        seen.append(tuple(t.shape))
        return -y * t.unsqueeze(1)

    y0 = torch.ones(5, 3, dtype=F64)
    t = torch.linspace(0.0, 1.0, 3, dtype=F64)
    ys = odeint(f, y0, t, options={"per_sample": True})
    assert set(seen) == {(5,)}
    torch.testing.assert_close(ys[-1], torch.full((5, 3), math.exp(-0.5), dtype=F64), rtol=1e-6, atol=0)


def test_heterogeneous_vdp_batch_has_differing_step_counts():
    mus = torch.tensor([0.5, 1.0, 2.0, 5.0, 10.0], dtype=F64)
    y0 = torch.tensor([[2.0, 0.0]] * 5, dtype=F64)
    t = torch.linspace(0.0, 10.0, 11, dtype=F64)
    odeint(vdp(mus), y0, t, rtol=1e-6, atol=1e-8, options={"per_sample": True})
    st = last_stats()
    steps = st.n_steps.tolist()
    assert len(set(steps)) == 5, steps
    # Stiffer samples need more steps.
    assert steps[0] < steps[-1]
    # In shared mode every sample takes the hardest sample's steps: more evaluations of the whole batch
    # than the easiest sample needs on its own.
    odeint(vdp(mus), y0, t, rtol=1e-6, atol=1e-8)
    shared = last_stats()
    assert shared.n_steps > steps[0]
    assert isinstance(shared.n_steps, int)


def test_per_sample_output_times():
    # dy/dt = -t y  ->  y = y0 exp(-t^2 / 2); each sample has its own, differently long, time grid.
    B, T = 4, 5
    tb = torch.stack([torch.linspace(0.1 * i, 1.0 + i, T, dtype=F64) for i in range(B)])
    y0 = torch.arange(1.0, B + 1.0, dtype=F64).unsqueeze(1)
    ys = odeint(lambda t, y: -t.unsqueeze(1) * y, y0, tb, rtol=1e-10, atol=1e-12, options={"per_sample": True})
    assert ys.shape == (T, B, 1)
    exact = y0[:, 0] * torch.exp(-(tb.T**2 - tb[:, 0] ** 2) / 2)
    torch.testing.assert_close(ys[..., 0], exact, rtol=1e-8, atol=1e-12)
    assert torch.equal(ys[0], y0)


def test_per_sample_decreasing_time_and_tuple_state():
    # x' = v, v' = -w^2 x per sample, integrated backwards from t=2 to t=0.
    w = torch.tensor([1.0, 2.0, 0.5], dtype=F64)

    def f(t, s):
        x, v = s
        return v, -(w**2).view(3, 1, 1) * x

    x0 = torch.ones(3, 1, 2, dtype=F64)
    v0 = torch.zeros(3, 1, 2, dtype=F64)
    t = torch.linspace(2.0, 0.0, 6, dtype=F64)
    xs, vs = odeint(f, (x0, v0), t, rtol=1e-10, atol=1e-12, options={"per_sample": True})
    assert xs.shape == (6, 3, 1, 2) and vs.shape == (6, 3, 1, 2)
    exact_x = torch.cos(w.unsqueeze(0) * (t.unsqueeze(1) - 2.0))
    torch.testing.assert_close(xs[..., 0, 0], exact_x, rtol=0, atol=1e-8)
    exact_v = -w * torch.sin(w.unsqueeze(0) * (t.unsqueeze(1) - 2.0))
    torch.testing.assert_close(vs[..., 0, 1], exact_v, rtol=0, atol=1e-8)


def test_per_sample_matches_shared_for_single_sample():
    f = vdp(torch.tensor([2.0], dtype=F64))
    y0 = torch.tensor([[2.0, 0.0]], dtype=F64)
    t = torch.linspace(0.0, 4.0, 9, dtype=F64)
    a = odeint(f, y0, t, rtol=1e-7, atol=1e-9, options={"per_sample": True})
    na = int(last_stats().n_accepted[0])
    b = odeint(f, y0, t, rtol=1e-7, atol=1e-9)
    nb = last_stats().n_accepted
    torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    assert na == nb
