"""Options beyond the basics: events, step_t/jump_t, PI controller, step bounds, norms, fixed-grid options."""

import math

import pytest
import torch

from fastnode import SolverError, last_stats, odeint

F64 = torch.float64
G = 9.81


def fall(t, s):
    return torch.stack([s[..., 1], torch.full_like(s[..., 1], -G)], dim=-1)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8"])
def test_event_time_closed_form(method):
    h0 = 10.0
    et, sol = odeint(fall, torch.tensor([h0, 0.0], dtype=F64), torch.tensor([0.0], dtype=F64), method=method,
                     event_fn=lambda t, s: s[0])
    assert et.shape == () and sol.shape == (2, 2)
    assert abs(et.item() - math.sqrt(2 * h0 / G)) < 1e-9
    assert abs(sol[1, 0].item()) < 1e-8
    assert sol[0, 0].item() == h0


def test_event_per_sample():
    h0 = torch.tensor([1.0, 5.0, 10.0, 20.0], dtype=F64)
    y0 = torch.stack([h0, torch.zeros_like(h0)], dim=1)
    et, sol = odeint(fall, y0, torch.tensor([0.0], dtype=F64), event_fn=lambda t, s: s[:, 0],
                     options={"per_sample": True})
    torch.testing.assert_close(et, torch.sqrt(2 * h0 / G), rtol=0, atol=1e-9)
    assert sol.shape == (2, 4, 2)
    torch.testing.assert_close(sol[1, :, 1], -G * torch.sqrt(2 * h0 / G), rtol=1e-9, atol=1e-9)
    # Samples that hit the ground earlier stopped earlier.
    acc = last_stats().n_accepted
    assert acc[0] <= acc[-1]


def test_event_reversed_time():
    # y' = 1 backwards from y(0) = 0: y(t) = t reaches -1.5 at t = -1.5.
    et, sol = odeint(lambda t, y: torch.ones_like(y), torch.zeros(1, dtype=F64), torch.tensor([0.0, -1.0], dtype=F64),
                     event_fn=lambda t, y: y[0] + 1.5)
    assert abs(et.item() + 1.5) < 1e-12 and abs(sol[1, 0].item() + 1.5) < 1e-12


def test_event_never_crossing_is_reported():
    with pytest.raises(SolverError, match="t="):
        odeint(lambda t, y: torch.ones_like(y), torch.zeros(1, dtype=F64), torch.tensor([0.0], dtype=F64),
               event_fn=lambda t, y: y[0] + 1.0)


def _step_rhs(t, y):
    # Discontinuous forcing: 0 before t=1, 1 after. Exact: y(t) = y0 + max(t - 1, 0).
    return torch.where(t >= 1.0, torch.ones_like(y), torch.zeros_like(y))


def test_jump_t_handles_discontinuity():
    t = torch.tensor([0.0, 0.5, 2.0, 3.0], dtype=F64)
    y0 = torch.zeros(1, dtype=F64)
    exact = torch.clamp(t - 1.0, min=0.0).unsqueeze(1)
    y_plain = odeint(_step_rhs, y0, t, rtol=1e-9, atol=1e-9)
    rej_plain = last_stats().n_rejected
    y_jump = odeint(_step_rhs, y0, t, rtol=1e-9, atol=1e-9, options={"jump_t": torch.tensor([1.0], dtype=F64)})
    st = last_stats()
    # Stepping onto the jump and re-evaluating past it makes the solve exact (the ODE is piecewise constant).
    torch.testing.assert_close(y_jump, exact, rtol=0, atol=1e-12)
    assert st.n_rejected < rej_plain
    assert (y_plain - exact).abs().max() < 1e-6


def test_step_t_lands_on_grid_points():
    seen = []

    def f(t, y):
        seen.append(float(t))
        return -y

    step_t = [0.3, 0.7]
    odeint(f, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-4, atol=1e-6,
           options={"step_t": step_t})
    for s in step_t:
        assert any(abs(x - s) < 1e-15 for x in seen), s


def test_pi_controller_accuracy_and_cost():
    def vdp(t, y):
        return torch.stack([y[1], 5.0 * (1 - y[0] ** 2) * y[1] - y[0]])

    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.linspace(0, 10, 11, dtype=F64)
    ref = odeint(vdp, y0, t, rtol=1e-12, atol=1e-12, method="dopri8")
    y_i = odeint(vdp, y0, t, rtol=1e-7, atol=1e-9)
    st_i = last_stats()
    y_pi = odeint(vdp, y0, t, rtol=1e-7, atol=1e-9, options={"controller": "pi"})
    st_pi = last_stats()
    err_i = (y_i - ref).abs().max().item()
    err_pi = (y_pi - ref).abs().max().item()
    assert err_pi < 1e-5 and err_i < 1e-5
    # The PI controller damps step-size oscillation: fewer rejections.
    assert st_pi.n_rejected <= st_i.n_rejected


def test_max_step_and_first_step():
    odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
           options={"max_step": 0.01})
    assert last_stats().n_accepted >= 100
    seen = []

    def f(t, y):
        seen.append(float(t))
        return -y

    odeint(f, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), options={"first_step": 0.125})
    # The first step's last stage sits at t0 + first_step.
    assert 0.125 in seen


def test_custom_norm_shared_and_per_sample():
    y0 = torch.ones(3, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y = odeint(lambda t, y: -y, y0, t, rtol=1e-8, atol=1e-10, options={"norm": lambda e: e.abs().max()})
    torch.testing.assert_close(y[-1], y0 * math.exp(-1), rtol=1e-7, atol=0)
    y = odeint(lambda t, y: -y, y0, t, rtol=1e-8, atol=1e-10,
               options={"per_sample": True, "norm": lambda e: e.abs().amax(dim=1)})
    torch.testing.assert_close(y[-1], y0 * math.exp(-1), rtol=1e-7, atol=0)


def test_tuple_state_uses_mixed_norm():
    # A tiny second component must not be drowned by a large first one: the max of per-tensor RMS controls.
    def f(t, s):
        return -s[0], -10 * s[1]

    s0 = (torch.full((100,), 1e3, dtype=F64), torch.ones(1, dtype=F64))
    t = torch.tensor([0.0, 1.0], dtype=F64)
    _, b = odeint(f, s0, t, rtol=1e-8, atol=1e-10)
    assert abs(b[-1].item() - math.exp(-10)) < 1e-10


def test_backend_auto_matches_torch():
    # auto picks the compiled extension on CPU when it is built: the same steps, results equal to rounding.
    from fastnode import last_stats
    from fastnode.backends import ext_ops

    y0 = torch.randn(4, 3, dtype=F64)
    t = torch.linspace(0, 1, 4, dtype=F64)
    a = odeint(lambda t, y: torch.sin(y), y0, t, options={"backend": "auto"})
    sa = last_stats()
    b = odeint(lambda t, y: torch.sin(y), y0, t, options={"backend": "torch"})
    sb = last_stats()
    assert sa.backend == ("ext" if ext_ops.available() else "torch") and sb.backend == "torch"
    assert (sa.nfe, sa.n_accepted, sa.n_rejected) == (sb.nfe, sb.n_accepted, sb.n_rejected)
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


def test_float32_state_float64_time():
    seen = []

    def f(t, y):
        seen.append(t.dtype)
        return -y

    y = odeint(f, torch.ones(2), torch.linspace(0, 1, 3))
    assert y.dtype == torch.float32 and set(seen) == {torch.float32}
    assert abs(y[-1, 0].item() - math.exp(-1)) < 1e-6


def test_fixed_grid_perturb_sees_one_sided_times():
    seen = []

    def f(t, y):
        seen.append(float(t))
        return torch.ones_like(y)

    odeint(f, torch.zeros(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="euler",
           options={"step_size": 0.5, "perturb": True})
    assert seen[0] > 0.0 and seen[0] == math.nextafter(0.0, 1.0)
    assert seen[1] == math.nextafter(0.5, 1.0)


def test_fixed_grid_constructor_and_step_size_grid():
    calls = []

    def gc(func, y0, t):
        calls.append(1)
        return torch.linspace(float(t[0]), float(t[-1]), 11, dtype=F64)

    y = odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="euler",
               options={"grid_constructor": gc})
    assert calls and last_stats().n_accepted == 10
    assert abs(y[-1].item() - 0.9**10) < 1e-14
    # step_size that does not divide the span: the last step is shortened to land on t[-1].
    y = odeint(lambda t, y: torch.ones_like(y), torch.zeros(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
               method="euler", options={"step_size": 0.3})
    assert last_stats().n_accepted == 4 and abs(y[-1].item() - 1.0) < 1e-14
