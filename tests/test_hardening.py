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
