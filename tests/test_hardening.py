"""Inputs and problems that used to hang, crash or answer wrongly while reporting success (issue: no hangs, no
crashes, no silent wrong answers).

Each test states the truth it checks against: a closed form, a float64 solve, or the argument the error must
name. Everything runs on CPU in a few seconds.
"""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch

import fastnode
from fastnode import SolverError, odeint

F64 = torch.float64
BACKENDS = ["torch", "auto"]


def _t(*v, dtype=F64):
    return torch.tensor(v, dtype=dtype)


# ---- item 5: malformed or degenerate arguments get errors that name them ----


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,per_sample", [((0, 3), False), ((3, 0), False), ((3, 0), True), ((0,), False)])
def test_zero_size_state_returns_empty_solution(shape, per_sample, backend):
    # Truth: a state with no components has nothing to integrate; the solution is empty at every output time.
    y0 = torch.zeros(shape, dtype=F64)
    t = torch.linspace(0, 1, 4, dtype=F64)
    out = odeint(lambda t, y: -y, y0, t, options={"backend": backend, "per_sample": per_sample})
    assert out.shape == (4, *shape)
    assert fastnode.last_stats().success


def test_zero_size_state_with_event_fn_names_y0():
    with pytest.raises(ValueError, match="y0"):
        odeint(lambda t, y: -y, torch.zeros(3, 0, dtype=F64), _t(0.0, 1.0), event_fn=lambda t, y: t - 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_max_num_steps_means_no_limit(backend):
    y = odeint(lambda t, y: -y, torch.ones(3, dtype=F64), _t(0.0, 1.0),
               options={"max_num_steps": 2**70, "backend": backend})
    assert torch.allclose(y[-1], torch.full((3,), math.exp(-1.0), dtype=F64), rtol=1e-6)


def test_func_output_on_another_device_names_func():
    with pytest.raises(ValueError, match=r"func.*device"):
        odeint(lambda t, y: (-y).to("meta"), torch.ones(3, dtype=F64), _t(0.0, 1.0))


def test_func_output_on_another_device_later_names_func():
    calls = []

    def f(t, y):
        calls.append(1)
        return -y if len(calls) < 3 else (-y).to("meta")

    with pytest.raises(ValueError, match=r"func.*device"):
        odeint(f, torch.ones(3, dtype=F64), _t(0.0, 1.0))


@pytest.mark.parametrize("key", ["step_t", "jump_t"])
@pytest.mark.parametrize("value", [["a", "b"], [0.5, None], [0.5, "x"], torch.tensor([True, False])])
def test_non_numeric_times_option_names_the_option(key, value):
    with pytest.raises(TypeError, match=rf"options\['{key}'\]"):
        odeint(lambda t, y: -y, torch.ones(3, dtype=F64), _t(0.0, 1.0), options={key: value})


@pytest.mark.parametrize("rtol,atol", [(0, 0), (0.0, torch.tensor([0.0, 1e-6, 1e-6], dtype=F64)),
                                       (torch.zeros(3, dtype=F64), 0.0)])
def test_zero_tolerances_name_rtol_and_atol(rtol, atol):
    with pytest.raises(ValueError, match=r"rtol.*atol"):
        odeint(lambda t, y: -y, torch.ones(3, dtype=F64), _t(0.0, 1.0), rtol=rtol, atol=atol)


def test_zero_adjoint_tolerances_name_them():
    y0 = torch.ones(3, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match=r"adjoint_rtol.*adjoint_atol"):
        fastnode.odeint_adjoint(lambda t, y: -y, y0, _t(0.0, 1.0), adjoint_rtol=0.0, adjoint_atol=0.0,
                                adjoint_params=())


# ---- item 4: stiff problems and events that never fire end quickly with a clear error ----


def _vdp(mu):
    def f(t, y):
        return torch.stack([y[..., 1], mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], dim=-1)
    return f


def _robertson(t, y):
    y1, y2, y3 = y.unbind(-1)
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 * y2, 3e7 * y2 * y2], dim=-1)


STIFF_PROBLEMS = {
    "vdp_mu1000": (_vdp(1000.0), [2.0, 0.0], 3000.0),
    "robertson": (_robertson, [1.0, 0.0, 0.0], 1e5),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
@pytest.mark.parametrize("name", sorted(STIFF_PROBLEMS))
def test_stiff_problem_raises_stiff_quickly(name, method, backend):
    # Truth: both problems are classic stiff test problems (Hairer & Wanner II, IV.1 and IV.10): an explicit method
    # needs ~1e6+ steps there. The solve must stop early and say why, naming the time it reached.
    f, y0, t1 = STIFF_PROBLEMS[name]
    start = time.perf_counter()
    with pytest.raises(SolverError, match=r"appears stiff.*implicit") as exc:
        odeint(f, torch.tensor(y0, dtype=F64), _t(0.0, t1), rtol=1e-6, atol=1e-9, method=method,
               options={"backend": backend})
    assert time.perf_counter() - start < 30
    st = fastnode.last_stats()
    assert st.status.tolist() == [fastnode.STIFF]
    assert 1024 <= st.n_steps < 4096
    assert 0 < exc.value.times[0] < t1


def test_stiff_per_sample_only_the_stiff_sample_fails():
    mu = torch.tensor([1.0, 1000.0], dtype=F64)

    def f(t, y):
        return torch.stack([y[:, 1], mu * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], dim=1)

    y0 = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=F64)
    out = odeint(f, y0, _t(0.0, 3000.0), rtol=1e-6, atol=1e-9,
                 options={"per_sample": True, "on_failure": "return", "max_num_steps": 200000})
    st = fastnode.last_stats()
    assert st.status.tolist() == [fastnode.SUCCESS, fastnode.STIFF]
    assert torch.isfinite(out[-1, 0]).all() and torch.isnan(out[-1, 1]).all()


def test_stiff_warn_option_warns_once_and_integrates():
    # van der Pol mu = 1000 over a short span (a few thousand steps): 'warn' warns once and integrates exactly as
    # 'ignore' does (the test changes nothing else); 'raise' (the default) stops.
    f, y0 = _vdp(1000.0), torch.tensor([2.0, 0.0], dtype=F64)
    t = _t(0.0, 3.0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        y_warn = odeint(f, y0, t, rtol=1e-6, atol=1e-9, options={"on_stiff": "warn"})
    assert sum("appears stiff" in str(w.message) for w in seen) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y_ignore = odeint(f, y0, t, rtol=1e-6, atol=1e-9, options={"on_stiff": "ignore"})
    assert torch.equal(y_warn, y_ignore)
    # Truth for the value: the slow manifold x' = x / (mu (1 - x^2)) (to O(1/mu^2)) from x = 2 gives
    # ln x - x^2 / 2 = ln 2 - 2 + t / mu.
    x = float(y_ignore[-1, 0])
    assert abs((math.log(x) - x * x / 2) - (math.log(2.0) - 2.0 + 3.0 / 1000.0)) < 1e-5
    with pytest.raises(SolverError, match="appears stiff"):
        odeint(f, y0, t, rtol=1e-6, atol=1e-9)


def test_on_stiff_option_is_checked():
    with pytest.raises(ValueError, match=r"options\['on_stiff'\]"):
        odeint(lambda t, y: -y, torch.ones(1, dtype=F64), _t(0.0, 1.0), options={"on_stiff": "maybe"})


def test_nonstiff_long_solve_is_not_called_stiff():
    # A harmonic oscillator over 2000 periods: thousands of steps, limited by accuracy; truth cos/sin.
    def f(t, y):
        return torch.stack([y[1], -y[0]])

    t1 = 2000 * 2 * math.pi
    y = odeint(f, torch.tensor([1.0, 0.0], dtype=F64), _t(0.0, t1), rtol=1e-8, atol=1e-10)
    assert fastnode.last_stats().n_steps > 2048
    assert abs(float(y[-1, 0]) - 1.0) < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_event_that_never_fires_ends_with_a_clear_error(backend):
    # y' = -y decays to 0 and never reaches -1: the event never fires. The step settles at the stability limit.
    start = time.perf_counter()
    with pytest.raises(SolverError, match=r"event_fn did not cross zero.*stiff"):
        fastnode.odeint_event(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor(0.0, dtype=F64),
                              event_fn=lambda t, y: y[0] + 1.0, options={"backend": backend})
    assert time.perf_counter() - start < 30


# ---- item 1: a non-finite error estimate cannot cycle ----


def test_nonfinite_cycling_ends_with_a_clear_error():
    # The conv ODENet adjoint's pattern, small: at the current state func is finite, but every step large enough
    # to change the float32 state gives NaN, and the smaller steps (whose increments round away) are accepted with
    # a zero error estimate and grow 10x. Before: ~1e8 iterations of this cycle (time advancing ~50 per cycle).
    def f(t, y):
        return torch.where(y == 1.0, torch.full_like(y, 1e-9), torch.full_like(y, math.nan))

    start = time.perf_counter()
    with pytest.raises(SolverError, match=r"non-finite \(NaN/inf\) in \d+ of \d+ consecutive step attempts") as exc:
        odeint(f, torch.ones(3), _t(0.0, 1e9, dtype=torch.float32), rtol=1e-3, atol=1e-6)
    assert time.perf_counter() - start < 20
    st = fastnode.last_stats()
    assert st.status.tolist() == [fastnode.NON_FINITE] and st.n_steps <= 300
    assert 0 < exc.value.times[0] < 1e9


def test_nonfinite_cycling_per_sample_isolated():
    bad = torch.tensor([False, True])

    def f(t, y):
        cliff = torch.where(y == 1.0, torch.full_like(y, 1e-9), torch.full_like(y, math.nan))
        return torch.where(bad.unsqueeze(1), cliff, -y)

    t = torch.tensor([[0.0, 1.0], [0.0, 1e9]])
    out = odeint(f, torch.ones(2, 1), t, rtol=1e-5, atol=1e-7, options={"per_sample": True, "on_failure": "return"})
    st = fastnode.last_stats()
    assert st.status.tolist() == [fastnode.SUCCESS, fastnode.NON_FINITE]
    assert abs(float(out[-1, 0, 0]) - math.exp(-1.0)) < 1e-4


# ---- item 2: low-precision states ----


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_decay_is_right_and_reports_the_tolerance_floor(dtype, backend):
    # Truth: y(1) = exp(-1). Before: bfloat16 answered 0.90 (increments rounded away), reporting success.
    with pytest.warns(RuntimeWarning, match=r"rtol=1e-07 is below the resolution of"):
        y = odeint(lambda t, y: -y, torch.ones(4, dtype=dtype), _t(0.0, 1.0, dtype=dtype),
                   options={"backend": backend})
    assert y.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert torch.allclose(y[-1].double(), torch.full((4,), math.exp(-1.0), dtype=F64), rtol=4 * eps, atol=0)
    assert any("below the resolution" in m for m in fastnode.last_stats().messages)


def test_float16_constant_growth_does_not_freeze():
    # y' = 50000 from 0: y(1) = 50000 (fp16 can hold it). Before: froze at 15528 and "succeeded" after 161k evals.
    y = odeint(lambda t, y: torch.full_like(y, 50000.0), torch.zeros(1, dtype=torch.float16),
               _t(0.0, 1.0, dtype=torch.float16), rtol=1e-3, atol=1e-3)
    assert abs(float(y[-1, 0]) - 50000.0) <= 32  # one fp16 ulp at 50000
    assert fastnode.last_stats().nfe < 100


def test_float16_stage_sums_do_not_overflow():
    # y' = y from 20000 to t = 1: y = 20000 e = 54365.6 < 65504. Before: the stage sums overflowed in float16 and
    # the error blamed func.
    y = odeint(lambda t, y: y, torch.full((2,), 20000.0, dtype=torch.float16), _t(0.0, 1.0, dtype=torch.float16),
               rtol=1e-3, atol=1e-3)
    assert abs(float(y[-1, 0]) - 20000.0 * math.e) <= 2 * 32


def test_low_precision_gradient_flows_through_the_wide_state():
    y0 = torch.ones(2, dtype=torch.bfloat16, requires_grad=True)
    with pytest.warns(RuntimeWarning):
        y = odeint(lambda t, y: -y, y0, _t(0.0, 1.0, dtype=torch.bfloat16))
    y[-1].sum().backward()
    # Truth: d y(1) / d y0 = exp(-1).
    assert torch.allclose(y0.grad.double(), torch.full((2,), math.exp(-1.0), dtype=F64), rtol=0.02)


def test_finiteness_test_does_not_overflow_near_the_dtype_max():
    # y' = 1e38 from 2e38 (float32): y(1) = 3e38 < 3.4e38, finite throughout; y_new + k_last would overflow.
    y = odeint(lambda t, y: torch.full_like(y, 1e38), torch.full((2,), 2e38), torch.tensor([0.0, 1.0]),
               options={"backend": "torch"})
    assert torch.allclose(y[-1], torch.full((2,), 3e38), rtol=1e-6)
