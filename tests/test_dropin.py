"""torchdiffeq 0.2.5 behaviour that code switching its import relies on, checked against closed forms.

Scalar (0-d) states, complex states, the Adams and scipy methods, and the adjoint's handling of parameters
(graphs it does not own, tensors that need no gradient, a fixed-grid backward grid from a constructor).
Where torchdiffeq is installed, the Adams methods are also compared with it step for step.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastnode import ADAPTIVE_METHODS, FIXED_METHODS, last_stats, odeint, odeint_adjoint

DT = torch.float64
ADAMS = ("explicit_adams", "implicit_adams", "fixed_adams")
ALL = tuple(ADAPTIVE_METHODS) + tuple(FIXED_METHODS)


def _opts(method: str, h: float = 0.01) -> dict:
    """Grid methods: step ``h``, cubic Hermite outputs between grid points (error about h^4 / 384 times the fourth
    derivative, below the methods' own)."""
    return {"step_size": h, "interp": "cubic"} if method in FIXED_METHODS or method in ADAMS else {}


def _bound(method: str, h: float = 0.01) -> float:
    """Error bound for y' = -y over [0, 1] with y0 = 2 (|y| <= 2, rate 1): fixed grid ``T h^p rate^(p+1) ymax / p!``
    (tests/test_methods.py's derivation), the tolerances' ``20 * (atol + rtol ymax)`` for the adaptive methods."""
    p = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}.get(method)
    if p is not None:
        return 2 * h**p / math.factorial(p)
    if method in ADAMS:
        return 1e-8  # order >= 4 after an RK4 start, h = 0.01: C h^4 with C << 1
    return 20 * (1e-9 + 1e-7 * 2) * (1000 if method == "fehlberg2" else 1)


# --------------------------------------------------------------------------------------------------------------
# Item 1: 0-d states
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ALL)
def test_scalar_state_every_method(method):
    t = torch.linspace(0, 1, 4, dtype=DT)
    opts = _opts(method)
    if method == "explicit_adams":
        opts["max_order"] = 5  # high-order Adams-Bashforth is unstable at this step (as in torchdiffeq)
    y = odeint(lambda tt, y: -y, torch.tensor(2.0, dtype=DT), t, method=method, options=opts)
    assert y.shape == (4,)
    err = float((y - 2 * torch.exp(-t)).abs().max())
    assert err <= _bound(method), err


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_tuple_with_scalar_state(method):
    t = torch.linspace(0, 1, 3, dtype=DT)

    def f(tt, s):
        a, v = s
        return (-a, v * 0 + a)  # a = e^{-t}, v' = a -> v = v0 + 1 - e^{-t}

    a, v = odeint(f, (torch.tensor(1.0, dtype=DT), torch.zeros(2, dtype=DT)), t, method=method, options=_opts(method))
    assert a.shape == (3,) and v.shape == (3, 2)
    tol = 1e-6 if method != "rk4" else 1e-8
    torch.testing.assert_close(a, torch.exp(-t), rtol=0, atol=tol)
    torch.testing.assert_close(v, (1 - torch.exp(-t)).unsqueeze(1).expand(3, 2), rtol=0, atol=tol)


def test_scalar_state_user_norm_sees_scalar():
    seen = []

    def norm(e):
        seen.append(tuple(e.shape) if isinstance(e, torch.Tensor) else tuple(x.shape for x in e))
        return e.abs() if isinstance(e, torch.Tensor) else max(x.abs().max() for x in e)

    t = torch.tensor([0.0, 1.0], dtype=DT)
    y = odeint(lambda tt, y: -y, torch.tensor(1.0, dtype=DT), t, options={"norm": norm})
    assert abs(float(y[-1]) - math.exp(-1)) < 1e-6
    assert seen and all(s == () for s in seen)
    odeint(lambda tt, s: (-s[0], -s[1]), (torch.tensor(1.0, dtype=DT), torch.ones(2, dtype=DT)), t,
           options={"norm": norm})
    assert seen[-1] == ((), (2,))


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_scalar_state_adjoint(method):
    k = torch.tensor(0.7, dtype=DT, requires_grad=True)
    y0 = torch.tensor(2.0, dtype=DT, requires_grad=True)
    T = 1.5
    t = torch.tensor([0.0, 0.5, T], dtype=DT)
    y = odeint_adjoint(lambda tt, y: -k * y, y0, t, adjoint_params=(k,), method=method,
                       options=_opts(method, 0.001))
    y[-1].backward()
    e = math.exp(-0.7 * T)
    tol = 1e-6 if method == "dopri5" else 1e-9
    assert abs(float(k.grad) - (-T * 2 * e)) < tol  # d/dk y0 e^{-kT}
    assert abs(float(y0.grad) - e) < tol


# --------------------------------------------------------------------------------------------------------------
# Items 8 and 9: adjoint parameters
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_adjoint_keeps_graph_outside_func(per_sample):
    """torchcde's pattern: func uses tensors computed outside it from a parameter, passed as adjoint_params."""
    w = torch.tensor([0.3, -0.2], dtype=DT, requires_grad=True)
    c = 3 * w  # computed outside func, passed in adjoint_params (like spline coefficients)
    d = c.exp()  # a further op between func and c: its graph is evaluated again at every step
    y0 = torch.tensor([[1.0, 2.0], [0.5, 1.0]], dtype=DT)
    T = 1.0
    y = odeint_adjoint(lambda tt, y: -d * y, y0, torch.tensor([0.0, T], dtype=DT), adjoint_params=(c,),
                       options={"per_sample": per_sample})
    y[-1].sum().backward()
    dd = torch.exp(3 * w.detach())
    # L = sum_b y0_b e^{-d T}; dL/dw = sum_b y0_b (-T) e^{-dT} d * 3
    expect = (y0 * (-T) * torch.exp(-dd * T) * dd * 3).sum(0)
    torch.testing.assert_close(w.grad, expect, rtol=1e-6, atol=1e-8)


def test_adjoint_params_without_grad_are_skipped():
    w = torch.tensor(0.4, dtype=DT, requires_grad=True)
    plain = torch.linspace(0, 1, 3, dtype=DT)  # torchcde passes such a tensor
    y0 = torch.tensor([1.0], dtype=DT)
    y = odeint_adjoint(lambda tt, y: -w * y, y0, torch.tensor([0.0, 1.0], dtype=DT), adjoint_params=(w, plain))
    y[-1].sum().backward()
    assert abs(float(w.grad) + math.exp(-0.4)) < 1e-7
    assert plain.grad is None
    with pytest.warns(UserWarning, match="do not require grad"):
        odeint_adjoint(lambda tt, y: -w * y, y0, torch.tensor([0.0, 1.0], dtype=DT), adjoint_params=(w, plain),
                       adjoint_options={"norm": lambda x: max(float(v.abs().max()) for v in x)})


# --------------------------------------------------------------------------------------------------------------
# Item 5: adjoint_options["grid_constructor"]
# --------------------------------------------------------------------------------------------------------------

def test_adjoint_grid_constructor():
    calls = []

    def gc(func, y, t_pair):
        calls.append(t_pair.tolist())
        return torch.linspace(float(t_pair[0]), float(t_pair[1]), 41, dtype=t_pair.dtype)

    k = torch.tensor(0.9, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    y = odeint_adjoint(lambda tt, y: -k * y, torch.ones(1, dtype=DT), t, adjoint_params=(k,), method="rk4",
                       options={"step_size": 0.0125}, adjoint_options={"grid_constructor": gc})
    y[1:].sum().backward()
    assert calls == [[1.0, 0.5], [0.5, 0.0]]  # torchdiffeq's calls: one per output interval, backwards
    assert last_stats().backward.n_accepted == 80
    expect = -0.5 * math.exp(-0.45) - 1.0 * math.exp(-0.9)
    assert abs(float(k.grad) - expect) < 1e-9  # rk4 at h = 0.0125: error ~ h^4 / 120


def test_adjoint_grid_constructor_bad_grid():
    k = torch.tensor(0.9, dtype=DT, requires_grad=True)
    y = odeint_adjoint(lambda tt, y: -k * y, torch.ones(1, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT),
                       adjoint_params=(k,), method="rk4",
                       adjoint_options={"grid_constructor": lambda f, y, t: torch.tensor([1.0, 0.2], dtype=DT)})
    with pytest.raises(ValueError, match="grid_constructor"):
        y.sum().backward()
