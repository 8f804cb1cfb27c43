"""Failures in the middle of a solve: non-finite func values, max_num_steps, step-size underflow, min_step.

``fastnode.SolverError`` (a ``ValueError``) carries ``.samples``, ``.times`` and ``.status``; with
``options={"on_failure": "return"}`` nothing is raised, ``fastnode.last_stats().status`` holds a status per
sample and the outputs a failed sample never reached are NaN. Everything here runs in float64.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import fastnode
from fastnode import MAX_STEPS, NON_FINITE, STEP_UNDERFLOW, SUCCESS, SolverError, odeint

F64 = torch.float64
NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def _first_time_in(msg: str) -> float:
    """The first ``t=<number>`` (or ``t = <number>``) in an error message."""
    m = re.search(rf"\bt\s*=\s*({NUM})", msg)
    assert m, f"no time 't=<number>' in the message: {msg!r}"
    return float(m.group(1))


def _samples_named(msg: str) -> set[int]:
    """Sample indices an error message names ("sample 3", "samples 1, 3", "sample(s) [1, 3]")."""
    out = set()
    for m in re.finditer(r"\bsamples?(?:\(s\))?\s*\[?\s*(\d+(?:\s*,\s*\d+)*)", msg):
        out.update(int(x) for x in re.split(r"\s*,\s*", m.group(1)))
    return out


def _status_list() -> list[int]:
    st = fastnode.last_stats()
    assert st is not None and st.status is not None
    return [int(s) for s in st.status.flatten().tolist()]


def test_solver_error_is_a_value_error():
    assert issubclass(SolverError, ValueError)


# ---------------------------------------------------------------------------------------------------------
# Non-finite func values (shared mode)
# ---------------------------------------------------------------------------------------------------------

def _nan_after(t_bad: float):
    def f(t, y):
        return torch.where(t > t_bad, torch.full_like(y, math.nan), -y)
    return f


@pytest.mark.parametrize("method", fastnode.ADAPTIVE_METHODS)
def test_shared_nan_mid_solve_names_time_and_cause(method):
    y0 = torch.ones(3, dtype=F64)
    t = torch.linspace(0.0, 1.0, 5, dtype=F64)
    with pytest.raises(SolverError) as info:
        odeint(_nan_after(0.5), y0, t, rtol=1e-5, atol=1e-7, method=method)
    e = info.value
    msg = str(e)
    assert 0.4 <= _first_time_in(msg) <= 0.6, msg
    assert "non-finite" in msg.lower(), msg
    assert "underflow" not in msg.lower(), msg
    assert e.samples == [0]
    assert len(e.times) == 1 and 0.4 <= e.times[0] <= 0.6
    assert e.status is not None and [int(s) for s in e.status.flatten().tolist()] == [NON_FINITE]
    assert _status_list() == [NON_FINITE]


def test_shared_nan_backward_in_time():
    """Integrating from 1 down to 0, func is NaN for t < 0.5: the message still names a time near 0.5."""
    def f(t, y):
        return torch.where(t < 0.5, torch.full_like(y, math.nan), -y)

    with pytest.raises(SolverError) as info:
        odeint(f, torch.ones(2, dtype=F64), torch.linspace(1.0, 0.0, 5, dtype=F64))
    msg = str(info.value)
    assert 0.4 <= _first_time_in(msg) <= 0.6, msg
    assert "non-finite" in msg.lower() and "underflow" not in msg.lower(), msg
    assert 0.4 <= info.value.times[0] <= 0.6


def test_shared_nan_on_failure_return():
    y0 = torch.ones(3, dtype=F64)
    t = torch.linspace(0.0, 1.0, 11, dtype=F64)
    ys = odeint(_nan_after(0.5), y0, t, options={"on_failure": "return"})
    st = fastnode.last_stats()
    assert _status_list() == [NON_FINITE]
    assert not st.success
    t_reached = float(st.t_reached.flatten()[0])
    assert 0.4 <= t_reached <= 0.5 + 1e-12
    before = t <= t_reached
    assert torch.isfinite(ys[before]).all()
    assert torch.isnan(ys[~before]).all()
    torch.testing.assert_close(ys[before], torch.exp(-t[before]).unsqueeze(1).expand(-1, 3), rtol=1e-6, atol=1e-8)
    assert st.messages and "non-finite" in st.messages[-1].lower()


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_shared_nonfinite_at_initial_time(bad):
    value = math.nan if bad == "nan" else math.inf

    def f(t, y):
        return torch.full_like(y, value)

    with pytest.raises(SolverError) as info:
        odeint(f, torch.ones(3, dtype=F64), torch.linspace(0.0, 1.0, 5, dtype=F64))
    msg = str(info.value)
    assert "non-finite" in msg.lower(), msg
    assert "initial" in msg.lower(), msg
    assert _first_time_in(msg) == 0.0, msg
    assert info.value.samples == [0]


def test_shared_nan_at_initial_time_error_attributes_and_stats():
    """SolverError documents ``times`` (time reached per failing sample) and ``status`` ([G] codes);
    ``last_stats()`` must not report success after a failed solve."""
    with pytest.raises(SolverError) as info:
        odeint(lambda t, y: y * math.nan, torch.ones(3, dtype=F64), torch.linspace(0.5, 1.0, 5, dtype=F64))
    e = info.value
    assert e.times == [0.5]
    assert e.status is not None and [int(s) for s in e.status.flatten().tolist()] == [NON_FINITE]
    st = fastnode.last_stats()
    assert not st.success
    assert _status_list() == [NON_FINITE]


# ---------------------------------------------------------------------------------------------------------
# Non-finite func values (per-sample mode): one bad sample of eight
# ---------------------------------------------------------------------------------------------------------

B = 8
BAD = 3
T_BAD = 0.3


def _rates(n=B):
    return torch.linspace(0.5, 4.0, n, dtype=F64).unsqueeze(1)


def _batch_y0(n=B):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, generator=g, dtype=F64) + 0.5


def _forced_decay(rates, bad_mask, t_bad=T_BAD):
    """dy/dt = -k y + cos(t), NaN for the samples in ``bad_mask`` once t > t_bad. t: [B]."""
    def f(t, y):
        dy = -rates * y + torch.cos(t).unsqueeze(1)
        bad = bad_mask & (t > t_bad)
        return torch.where(bad.unsqueeze(1), torch.full_like(dy, math.nan), dy)
    return f


def _bad_mask(n=B, bad=BAD):
    m = torch.zeros(n, dtype=torch.bool)
    m[bad] = True
    return m


T11 = torch.linspace(0.0, 1.0, 11, dtype=F64)


def test_per_sample_nan_raise_names_sample():
    with pytest.raises(SolverError) as info:
        odeint(_forced_decay(_rates(), _bad_mask()), _batch_y0(), T11, options={"per_sample": True})
    e = info.value
    msg = str(e)
    assert _samples_named(msg) == {BAD}, msg
    assert "non-finite" in msg.lower() and "underflow" not in msg.lower(), msg
    assert 0.2 <= _first_time_in(msg) <= 0.4, msg
    assert e.samples == [BAD]
    assert len(e.times) == 1 and abs(e.times[0] - T_BAD) < 0.05
    assert [int(s) for s in e.status.tolist()][BAD] == NON_FINITE


def test_per_sample_nan_on_failure_return_isolates_bad_sample():
    y0 = _batch_y0()
    ys = odeint(_forced_decay(_rates(), _bad_mask()), y0, T11, rtol=1e-9, atol=1e-11,
                options={"per_sample": True, "on_failure": "return"})
    st = fastnode.last_stats()
    expected = [SUCCESS] * B
    expected[BAD] = NON_FINITE
    assert _status_list() == expected
    assert not st.success
    t_reached = st.t_reached.flatten().tolist()
    assert abs(t_reached[BAD] - T_BAD) < 0.05 and t_reached[BAD] <= T_BAD + 1e-12
    for i in set(range(B)) - {BAD}:
        assert t_reached[i] == 1.0

    # The good samples: exactly what a batch without the bad sample gives (samples are independent).
    keep = [i for i in range(B) if i != BAD]
    ref = odeint(_forced_decay(_rates()[keep], torch.zeros(B - 1, dtype=torch.bool)), y0[keep], T11, rtol=1e-9,
                 atol=1e-11, options={"per_sample": True})
    assert fastnode.last_stats().success
    torch.testing.assert_close(ys[:, keep], ref, rtol=0.0, atol=1e-12)

    # The bad sample: finite up to where it failed, NaN afterwards.
    before = T11 <= t_reached[BAD]
    assert before.sum() >= 2
    assert torch.isfinite(ys[before, BAD]).all()
    assert torch.isnan(ys[~before, BAD]).all()
    # ... and its finite part is the correct solution.
    good_bad = odeint(_forced_decay(_rates()[BAD:BAD + 1], torch.zeros(1, dtype=torch.bool)), y0[BAD:BAD + 1],
                      T11, rtol=1e-9, atol=1e-11, options={"per_sample": True})
    torch.testing.assert_close(ys[before, BAD], good_bad[before, 0], rtol=1e-7, atol=1e-9)


def test_per_sample_nan_at_initial_time_raise_names_sample():
    def f(t, y):
        dy = -y
        return torch.where(_bad_mask(4, 1).unsqueeze(1), torch.full_like(dy, math.nan), dy)

    with pytest.raises(SolverError) as info:
        odeint(f, torch.ones(4, 2, dtype=F64), T11, options={"per_sample": True})
    msg = str(info.value)
    assert _samples_named(msg) == {1}, msg
    assert "non-finite" in msg.lower(), msg
    assert info.value.samples == [1]


def test_per_sample_nan_at_initial_time_on_failure_return():
    """on_failure="return" must keep the other samples going even when one fails at its very first call."""
    def f(t, y):
        dy = -y
        return torch.where(_bad_mask(4, 1).unsqueeze(1), torch.full_like(dy, math.nan), dy)

    ys = odeint(f, torch.ones(4, 2, dtype=F64), T11, options={"per_sample": True, "on_failure": "return"})
    assert _status_list() == [SUCCESS, NON_FINITE, SUCCESS, SUCCESS]
    assert torch.isnan(ys[1:, 1]).all()
    good = [0, 2, 3]
    torch.testing.assert_close(ys[:, good], torch.exp(-T11).view(-1, 1, 1).expand(-1, 3, 2), rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------
# max_num_steps
# ---------------------------------------------------------------------------------------------------------

def test_shared_max_num_steps_message():
    n = 5
    with pytest.raises(SolverError) as info:
        odeint(lambda t, y: -y, torch.ones(3, dtype=F64), torch.linspace(0.0, 100.0, 5, dtype=F64),
               options={"max_num_steps": n})
    e = info.value
    msg = str(e)
    assert "max_num_steps" in msg, msg
    assert re.search(rf"\b{n}\b[^.]*\bstep", msg), f"number of steps ({n}) not in message: {msg!r}"
    t_msg = _first_time_in(msg)
    st = fastnode.last_stats()
    t_reached = float(st.t_reached.flatten()[0])
    assert 0.0 < t_reached < 100.0
    assert t_msg == pytest.approx(t_reached, rel=1e-12, abs=1e-15), msg
    assert e.times == [pytest.approx(t_reached, rel=1e-15)]
    assert "underflow" not in msg.lower() and "non-finite" not in msg.lower(), msg
    assert st.n_steps == n
    assert _status_list() == [MAX_STEPS]


MUS = torch.tensor([1.0, 1000.0, 0.5, 2.0], dtype=F64)
STIFF = 1


def _van_der_pol(mu):
    def f(t, y):
        x, v = y[:, 0], y[:, 1]
        return torch.stack([v, mu * (1 - x * x) * v - x], dim=1)
    return f


def _vdp_y0(n):
    return torch.tensor([[2.0, 0.0]], dtype=F64).repeat(n, 1)


def test_per_sample_max_num_steps_raise_names_sample_time_and_steps():
    with pytest.raises(SolverError) as info:
        odeint(_van_der_pol(MUS), _vdp_y0(4), torch.linspace(0.0, 1.0, 5, dtype=F64), rtol=1e-6, atol=1e-8,
               options={"per_sample": True, "max_num_steps": 50})
    e = info.value
    msg = str(e)
    assert _samples_named(msg) == {STIFF}, msg
    assert "max_num_steps" in msg and re.search(r"\b50\b", msg), msg
    assert 0.0 < _first_time_in(msg) < 1.0, msg
    assert e.samples == [STIFF]
    assert 0.0 < e.times[0] < 1.0


def test_per_sample_max_num_steps_return_stiff_fails_easy_succeed():
    t = torch.linspace(0.0, 1.0, 5, dtype=F64)
    opts = {"per_sample": True, "max_num_steps": 50}
    ys = odeint(_van_der_pol(MUS), _vdp_y0(4), t, rtol=1e-6, atol=1e-8, options={**opts, "on_failure": "return"})
    st = fastnode.last_stats()
    assert _status_list() == [SUCCESS, MAX_STEPS, SUCCESS, SUCCESS]
    assert int(st.n_steps[STIFF]) == 50
    assert all(int(st.n_steps[i]) < 50 for i in (0, 2, 3))
    t_stiff = float(st.t_reached[STIFF])
    assert 0.0 < t_stiff < 1.0
    assert st.messages and _samples_named(st.messages[-1]) == {STIFF}

    easy = [0, 2, 3]
    ref = odeint(_van_der_pol(MUS[easy]), _vdp_y0(3), t, rtol=1e-6, atol=1e-8, options=opts)
    torch.testing.assert_close(ys[:, easy], ref, rtol=0.0, atol=1e-12)
    reached = t <= t_stiff
    assert torch.isfinite(ys[reached, STIFF]).all()
    assert torch.isnan(ys[~reached, STIFF]).all()


# ---------------------------------------------------------------------------------------------------------
# Blow-up: dy/dt = y^2, y(0) = y0 has y = y0 / (1 - y0 t), singular at t = 1 / y0
# ---------------------------------------------------------------------------------------------------------

def _square(t, y):
    return y * y


def test_blowup_ends_near_singularity_shared():
    with pytest.raises(SolverError) as info:
        odeint(_square, torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64),
               options={"max_num_steps": 10_000})
    e = info.value
    msg = str(e)
    status = _status_list()
    assert status[0] in (NON_FINITE, STEP_UNDERFLOW), (status, msg)
    assert "max_num_steps" not in msg, msg
    assert 0.9 <= _first_time_in(msg) <= 1.0001, msg
    assert 0.9 <= e.times[0] <= 1.0001
    assert fastnode.last_stats().n_steps < 10_000


def test_blowup_per_sample_only_singular_sample_fails():
    y0 = torch.tensor([[1.0], [0.25], [-1.0]], dtype=F64)  # singular at t = 1, 4, never
    t = torch.linspace(0.0, 2.0, 9, dtype=F64)
    ys = odeint(_square, y0, t, options={"per_sample": True, "on_failure": "return", "max_num_steps": 10_000})
    st = fastnode.last_stats()
    status = _status_list()
    assert status[0] in (NON_FINITE, STEP_UNDERFLOW), status
    assert status[1:] == [SUCCESS, SUCCESS]
    assert 0.9 <= float(st.t_reached[0]) <= 1.0001
    exact = y0[1:, 0] / (1 - y0[1:, 0] * t.unsqueeze(1))  # [T, 2]
    torch.testing.assert_close(ys[:, 1:, 0], exact, rtol=1e-6, atol=1e-9)
    reached = t <= float(st.t_reached[0])
    assert torch.isfinite(ys[reached, 0]).all() and torch.isnan(ys[~reached, 0]).all()


# ---------------------------------------------------------------------------------------------------------
# min_step forces acceptance (torchdiffeq: a step of size <= min_step is accepted whatever its error)
# ---------------------------------------------------------------------------------------------------------

def test_min_step_forces_acceptance_shared():
    y0 = torch.ones(1, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ys = odeint(lambda t, y: -y, y0, t, rtol=1e-12, atol=1e-12, options={"min_step": 0.25})
    st = fastnode.last_stats()
    assert st.n_rejected == 0
    assert st.n_accepted == 4
    assert _status_list() == [SUCCESS]
    err = abs(float(ys[-1, 0]) - math.exp(-1.0))
    assert err > 1e-10  # far looser than asked: the steps were accepted because of min_step
    assert err < 1e-5  # ... but still four proper dopri5 steps of 0.25
    # Without min_step the same tolerances need many more steps.
    odeint(lambda t, y: -y, y0, t, rtol=1e-12, atol=1e-12)
    assert fastnode.last_stats().n_accepted > 10


def test_min_step_forces_acceptance_per_sample():
    y0 = torch.ones(3, 1, dtype=F64)
    rates = torch.tensor([[1.0], [5.0], [20.0]], dtype=F64)
    odeint(lambda t, y: -rates * y, y0, torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-12, atol=1e-12,
           options={"per_sample": True, "min_step": 0.125})
    st = fastnode.last_stats()
    assert st.n_rejected.tolist() == [0, 0, 0]
    assert st.n_accepted.tolist() == [8, 8, 8]
    assert _status_list() == [SUCCESS] * 3


# ---------------------------------------------------------------------------------------------------------
# Success: every status is SUCCESS
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["shared", "per_sample"])
@pytest.mark.parametrize("method", fastnode.ADAPTIVE_METHODS)
def test_success_status(method, mode):
    per_sample = mode == "per_sample"
    y0 = torch.ones(5, 2, dtype=F64)
    t = torch.linspace(0.0, 1.0, 4, dtype=F64)
    ys = odeint(lambda t, y: -y, y0, t, rtol=1e-5, atol=1e-7, method=method, options={"per_sample": per_sample})
    st = fastnode.last_stats()
    assert st.success
    status = _status_list()
    assert len(status) == (5 if per_sample else 1)
    assert set(status) == {SUCCESS}
    assert st.t_reached.flatten().tolist() == [1.0] * len(status)
    assert not st.messages
    assert torch.isfinite(ys).all()


@pytest.mark.parametrize("method", fastnode.FIXED_METHODS)
def test_success_fixed_grid(method):
    odeint(lambda t, y: -y, torch.ones(3, dtype=F64), torch.linspace(0.0, 1.0, 4, dtype=F64), method=method)
    st = fastnode.last_stats()
    assert st.success
    if st.status is not None:
        assert {int(s) for s in st.status.flatten().tolist()} == {SUCCESS}
