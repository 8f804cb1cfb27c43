"""torchdiffeq 0.2.5 behaviour that code switching its import relies on, checked against closed forms.

Scalar (0-d) states, complex states, the Adams and scipy methods, and the adjoint's handling of parameters
(graphs it does not own, tensors that need no gradient, a fixed-grid backward grid from a constructor).
Where torchdiffeq is installed, the Adams methods are also compared with it step for step.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import fastnode
from fastnode import ADAPTIVE_METHODS, FIXED_METHODS, last_stats, odeint, odeint_adjoint
from fastnode._adams import adams_coefficients

DT = torch.float64
ADAMS = ("explicit_adams", "implicit_adams", "fixed_adams")
ALL = tuple(ADAPTIVE_METHODS) + tuple(FIXED_METHODS) + ADAMS + ("scipy_solver",)


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


@pytest.mark.parametrize("method", ["dopri5", "rk4", "implicit_adams", "scipy_solver"])
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


# --------------------------------------------------------------------------------------------------------------
# Item 6: Adams methods
# --------------------------------------------------------------------------------------------------------------

def test_adams_coefficients_published_values():
    # Adams-Bashforth 4 and Adams-Moulton 5 (Hairer, Norsett & Wanner I, III.1), newest derivative first.
    torch.testing.assert_close(torch.tensor(adams_coefficients(4, False), dtype=DT),
                               torch.tensor([55.0, -59.0, 37.0, -9.0], dtype=DT) / 24)
    torch.testing.assert_close(torch.tensor(adams_coefficients(5, True), dtype=DT),
                               torch.tensor([251.0, 646.0, -264.0, 106.0, -19.0], dtype=DT) / 720)
    for k in range(1, 13):  # consistency: the weights of every formula sum to 1
        assert abs(sum(adams_coefficients(k, False)) - 1) < 1e-12
        assert abs(sum(adams_coefficients(k, True)) - 1) < 1e-12


def _osc(tt, y):
    return torch.stack([y[1], -y[0]])


@pytest.mark.parametrize("method, max_order, order", [
    ("explicit_adams", 5, 4),  # AB up to order 4 after the RK4 start
    ("implicit_adams", 5, 5),  # AM up to order 5, corrector converged
    ("implicit_adams", 12, 5),  # the AM4 step after the start limits the global order to 5
])
def test_adams_convergence_order(method, max_order, order):
    """Global error on y'' = -y over [0, 2] shrinks like h^order (closed form cos/sin)."""
    y0 = torch.tensor([1.0, 0.0], dtype=DT)
    t = torch.tensor([0.0, 2.0], dtype=DT)
    exact = torch.tensor([math.cos(2.0), -math.sin(2.0)], dtype=DT)
    errs = []
    for h in (0.04, 0.02):
        y = odeint(_osc, y0, t, method=method, rtol=1e-13, atol=1e-15,
                   options={"step_size": h, "max_order": max_order, "max_iters": 20})
        errs.append(float((y[-1] - exact).abs().max()))
    observed = math.log2(errs[0] / errs[1])
    assert observed > order - 0.5, (errs, observed)


@pytest.mark.parametrize("method", ADAMS)
@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_adams_matches_torchdiffeq(method, interp):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    y0 = torch.tensor([1.0, 0.0], dtype=DT)
    t = torch.linspace(0, 2, 7, dtype=DT)
    opts = {"step_size": 0.05, "interp": interp, "max_order": 6}
    counts = []

    def counted(tt, y):
        counts[-1] += 1
        return _osc(tt, y)

    counts.append(0)
    ours = odeint(counted, y0, t, method=method, options=opts)
    counts.append(0)
    ref = torchdiffeq.odeint(counted, y0, t, method=method, options=opts)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-13)
    if interp == "linear":
        assert counts[0] == counts[1]  # the same evaluations (steps, corrector iterations)
    else:  # torchdiffeq evaluates f at the step's end once per output inside the step, fastnode once per step
        assert counts[0] < counts[1]


def test_adams_max_order_below_four_is_rk4():
    y0 = torch.tensor([1.0, 0.0], dtype=DT)
    t = torch.linspace(0, 1, 3, dtype=DT)
    with pytest.warns(UserWarning, match="reduces to rk4"):
        ya = odeint(_osc, y0, t, method="implicit_adams", options={"step_size": 0.1, "max_order": 3})
    yr = odeint(_osc, y0, t, method="rk4", options={"step_size": 0.1})
    torch.testing.assert_close(ya, yr, rtol=0, atol=1e-15)


def test_implicit_adams_nonconvergence_warns():
    # Stiff decay with h * lambda = -5: the functional iteration diverges (contraction factor > 1).
    with pytest.warns(RuntimeWarning, match="did not converge"):
        odeint(lambda tt, y: -50 * y, torch.ones(1, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT),
               method="implicit_adams", options={"step_size": 0.1})
    assert any("did not converge" in m for m in last_stats().messages)


def test_adams_options_checked():
    y0, t = torch.ones(1, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT)
    with pytest.raises(ValueError, match="max_order"):
        odeint(lambda tt, y: -y, y0, t, method="implicit_adams", options={"max_order": 13})
    with pytest.raises(ValueError, match="max_iters"):
        odeint(lambda tt, y: -y, y0, t, method="implicit_adams", options={"max_iters": 0})
    with pytest.raises(ValueError, match="implicit"):
        odeint(lambda tt, y: -y, y0, t, method="explicit_adams", options={"implicit": True})
    with pytest.raises(ValueError, match="unknown option 'first_step'"):
        odeint(lambda tt, y: -y, y0, t, method="implicit_adams", options={"first_step": 0.1})
    with pytest.raises(ValueError, match="per_sample"):
        odeint(lambda tt, y: -y, y0, t, method="implicit_adams", options={"per_sample": True})


def test_implicit_false_is_explicit():
    y0, t = torch.tensor([1.0, 0.0], dtype=DT), torch.linspace(0, 1, 3, dtype=DT)
    a = odeint(_osc, y0, t, method="implicit_adams", options={"implicit": False, "step_size": 0.05})
    b = odeint(_osc, y0, t, method="explicit_adams", options={"step_size": 0.05})
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["implicit_adams", "explicit_adams"])
@pytest.mark.parametrize("adjoint", [False, True], ids=["backprop", "adjoint"])
def test_adams_gradients(method, adjoint):
    """Backpropagation through the solve and odeint_adjoint (Adams forward and backward) vs the closed form."""
    T = 1.0
    expect = -T * 2 * math.exp(-0.8 * T)
    opts = {"step_size": 0.01, "max_order": 5}
    k = torch.tensor(0.8, dtype=DT, requires_grad=True)
    y0 = torch.tensor([2.0], dtype=DT)
    t = torch.tensor([0.0, T], dtype=DT)
    if adjoint:
        y = odeint_adjoint(lambda tt, y: -k * y, y0, t, method=method, options=opts, adjoint_params=(k,))
        assert last_stats().method == method
    else:
        y = odeint(lambda tt, y: -k * y, y0, t, method=method, options=opts)
    y[-1].sum().backward()
    assert abs(float(k.grad) - expect) < 1e-8, (float(k.grad), expect)
    if adjoint:
        assert last_stats().method == method and last_stats().nfe_backward > 0


def test_adams_adjoint_time_gradients():
    k = torch.tensor(0.8, dtype=DT, requires_grad=True)
    t = torch.tensor([0.2, 0.7, 1.1], dtype=DT, requires_grad=True)
    y = odeint_adjoint(lambda tt, y: -k * y, torch.tensor([2.0], dtype=DT), t, method="implicit_adams",
                       options={"step_size": 0.01}, adjoint_params=(k,))
    y[1:].sum().backward()
    # y(t_i) = 2 exp(-k (t_i - t_0)): dL/dt_0 = k (y_1 + y_2), dL/dt_i = -k y_i
    y1, y2 = 2 * math.exp(-0.8 * 0.5), 2 * math.exp(-0.8 * 0.9)
    torch.testing.assert_close(t.grad, torch.tensor([0.8 * (y1 + y2), -0.8 * y1, -0.8 * y2], dtype=DT),
                               rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------------------------------------------
# Item 6: scipy_solver
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["LSODA", "RK45", "DOP853", "Radau", "BDF"])
def test_scipy_solver_closed_form(solver):
    t = torch.linspace(1, 0, 5, dtype=DT)  # decreasing times too
    y = odeint(_osc, torch.tensor([1.0, 0.0], dtype=DT), t, method="scipy_solver", rtol=1e-9, atol=1e-11,
               options={"solver": solver})
    exact = torch.stack([torch.cos(t - 1), -torch.sin(t - 1)], dim=1)
    assert float((y - exact).abs().max()) < 1e-6
    assert last_stats().nfe > 0


def test_scipy_solver_tuple_float32_and_single_time():
    y = odeint(lambda tt, s: (-s[0], s[0].sum()), (torch.ones(2), torch.zeros(())), torch.tensor([0.0, 1.0]),
               method="scipy_solver")
    assert y[0].dtype == torch.float32 and y[1].shape == (2,)
    assert abs(float(y[1][-1]) - 2 * (1 - math.exp(-1))) < 1e-5
    one = odeint(lambda tt, y: -y, torch.ones(3), torch.tensor([0.5]), method="scipy_solver")
    assert one.shape == (1, 3) and bool((one == 1).all())


def test_scipy_solver_no_gradient_error():
    y0 = torch.ones(2, dtype=DT, requires_grad=True)
    y = odeint(lambda tt, y: -y, y0, torch.tensor([0.0, 1.0], dtype=DT), method="scipy_solver")
    with pytest.raises(RuntimeError, match="scipy_solver' gives no gradients"):
        y.sum().backward()
    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2).double()

        def forward(self, tt, y):
            return self.lin(y)

    y = odeint(Field(), torch.ones(2, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT), method="scipy_solver")
    with pytest.raises(RuntimeError, match="no gradients"):
        y.sum().backward()
    with torch.no_grad():
        y = odeint(lambda tt, y: -y, y0, torch.tensor([0.0, 1.0], dtype=DT), method="scipy_solver")
    assert not y.requires_grad


def test_scipy_solver_options_and_failure():
    y0, t = torch.ones(1, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT)
    with pytest.raises(ValueError, match="options\\['solver'\\]"):
        odeint(lambda tt, y: -y, y0, t, method="scipy_solver", options={"solver": "euler"})
    with pytest.raises(ValueError, match="unknown option 'step_size'"):
        odeint(lambda tt, y: -y, y0, t, method="scipy_solver", options={"step_size": 0.1})
    with pytest.raises(fastnode.SolverError, match="solve_ivp"):
        odeint(lambda tt, y: y * y, y0, torch.tensor([0.0, 2.0], dtype=DT), method="scipy_solver",
               options={"solver": "RK45"})  # blows up at t = 1


def test_scipy_solver_adjoint():
    k = torch.tensor(0.8, dtype=DT, requires_grad=True)
    y0 = torch.tensor([2.0], dtype=DT, requires_grad=True)
    y = odeint_adjoint(lambda tt, y: -k * y, y0, torch.tensor([0.0, 1.0], dtype=DT), method="scipy_solver",
                       rtol=1e-10, atol=1e-12, adjoint_params=(k,), options={"solver": "DOP853"})
    y[-1].sum().backward()
    assert abs(float(k.grad) + 2 * math.exp(-0.8)) < 1e-8
    assert abs(float(y0.grad) - math.exp(-0.8)) < 1e-8


# --------------------------------------------------------------------------------------------------------------
# Complex states
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dopri5", "tsit5", "rk4", "implicit_adams", "scipy_solver"])
def test_complex_state_closed_form(method):
    w = 2.0 + 0.5j
    t = torch.linspace(0, 1, 5, dtype=DT)
    y0 = torch.tensor([1.0 + 1.0j, -0.5j], dtype=torch.complex128)
    y = odeint(lambda tt, y: -1j * w * y, y0, t, method=method, options=_opts(method, 0.005))
    assert y.dtype == torch.complex128 and y.shape == (5, 2)
    exact = y0 * torch.exp(-1j * w * t.to(torch.complex128)).unsqueeze(1)
    assert float((y - exact).abs().max()) < 1e-6


def test_complex_tuple_and_per_sample():
    t = torch.linspace(0, 1, 3, dtype=DT)
    z0 = torch.ones(4, 2, dtype=torch.complex128)
    r0 = torch.ones(4, dtype=DT)
    z, r = odeint(lambda tt, s: (1j * s[0], -s[1]), (z0, r0), t, options={"per_sample": True})
    assert z.shape == (3, 4, 2) and z.dtype == torch.complex128 and r.dtype == DT
    torch.testing.assert_close(z[-1], torch.full((4, 2), complex(math.cos(1), math.sin(1)), dtype=torch.complex128),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(r[-1], torch.full((4,), math.exp(-1), dtype=DT), rtol=0, atol=1e-6)


@pytest.mark.parametrize("adjoint", [False, True], ids=["backprop", "adjoint"])
def test_complex_gradients(adjoint):
    """L = |y(T)|^2 for y' = -(a + i b) y: L = |y0|^2 e^{-2aT}, so dL/da = -2T L and dL/db = 0."""
    a = torch.tensor(0.3, dtype=DT, requires_grad=True)
    b = torch.tensor(1.7, dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0 - 2.0j], dtype=torch.complex128, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=DT)

    def f(tt, y):
        return -torch.complex(a, b) * y

    solve = (lambda: odeint_adjoint(f, y0, t, adjoint_params=(a, b))) if adjoint else (lambda: odeint(f, y0, t))
    y = solve()
    loss = (y[-1].abs() ** 2).sum()
    loss.backward()
    L = 5 * math.exp(-0.6)
    assert abs(float(a.grad) - (-2 * L)) < 1e-6
    assert abs(float(b.grad)) < 1e-6
    # dL/dy0 in torch's convention for a real loss: 2 * dL/dconj(y0) = 2 * y0 e^{-2aT}
    torch.testing.assert_close(y0.grad, 2 * y0.detach() * math.exp(-0.6), rtol=1e-6, atol=1e-8)


def test_complex_user_norm_receives_complex():
    seen = []

    def norm(e):
        seen.append(e.dtype)
        return e.abs().max()

    odeint(lambda tt, y: 1j * y, torch.ones(2, dtype=torch.complex64), torch.tensor([0.0, 1.0]),
           options={"norm": norm})
    assert seen and set(seen) == {torch.complex64}


def test_complex_tolerance_tensor():
    t = torch.tensor([0.0, 1.0], dtype=DT)
    y = odeint(lambda tt, y: 1j * y, torch.ones(2, dtype=torch.complex128), t,
               atol=torch.tensor([1e-9, 1e-6], dtype=DT), rtol=1e-8)
    assert float((y[-1] - complex(math.cos(1), math.sin(1))).abs().max()) < 1e-5


def test_no_warning_for_plain_solves():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        odeint(lambda tt, y: -y, torch.tensor(1.0, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT),
               method="implicit_adams", options={"step_size": 0.1})


def test_complex_half_rejected():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that complex32 is experimental
        y0 = torch.ones(3, dtype=torch.complex32)
    with pytest.raises(TypeError, match="y0 must have a floating dtype"):
        odeint(lambda tt, y: y, y0, torch.tensor([0.0, 1.0]))


# --------------------------------------------------------------------------------------------------------------
# Vector event functions (torchdiffeq combines them: the first component to cross ends the solve)
# --------------------------------------------------------------------------------------------------------------

def test_vector_event_fn_first_crossing():
    thr = torch.tensor(0.7, dtype=DT, requires_grad=True)

    def ev(tt, y):
        return torch.stack([y[0] - 2.0, thr - y[0], y[1] + 5.0])  # crossings at t = 2, 0.7 / 1.5, never

    y0 = torch.tensor([0.0, 0.0], dtype=DT)
    t_ev, sol = odeint(lambda tt, y: torch.stack([1.5 * torch.ones_like(y[0]), -y[1]]), y0,
                       torch.tensor([0.0, 5.0], dtype=DT), event_fn=ev)
    assert abs(float(t_ev) - 0.7 / 1.5) < 1e-12
    assert abs(float(sol[-1, 0]) - 0.7) < 1e-12
    t_ev, _ = fastnode.odeint_event(lambda tt, y: torch.stack([1.5 * torch.ones_like(y[0]), -y[1]]), y0,
                                      torch.tensor(0.0, dtype=DT), event_fn=ev)
    t_ev.backward()
    assert abs(float(thr.grad) - 1 / 1.5) < 1e-9  # t* = thr / 1.5


def test_vector_event_fn_per_sample():
    rates = torch.tensor([1.0, 2.0, 4.0], dtype=DT)
    y0 = torch.zeros(3, 1, dtype=DT)
    t_ev, _ = odeint(lambda tt, y: rates.unsqueeze(1).expand_as(y), y0, torch.tensor([0.0, 5.0], dtype=DT),
                     event_fn=lambda tt, y: torch.cat([y - 1.0, y - 3.0], dim=1), options={"per_sample": True})
    torch.testing.assert_close(t_ev, 1.0 / rates, rtol=0, atol=1e-12)


def test_graph_retention_decides_at_the_first_evaluation():
    from fastnode._graph_retention import GraphRetention

    w = torch.ones(2, requires_grad=True)
    ext = w.exp()  # made before the evaluation: the caller's graph
    keep = GraphRetention()
    mark = keep.mark()
    keep.observe(ext * torch.ones(2, requires_grad=True), mark)
    assert keep.decided is True
    keep = GraphRetention()
    mark = keep.mark()
    keep.observe((w * torch.ones(2, requires_grad=True)).sin(), mark)  # only nodes made now, and leaves
    assert keep.decided is False
    # Off CPU (the engine's own thread) the first two evaluations' graphs are compared as well.
    wm = torch.ones(2, device="meta", requires_grad=True)
    keep = GraphRetention()
    for _ in range(2):
        assert keep.retain
        mark = keep.mark()
        keep.observe((wm * torch.ones(2, device="meta", requires_grad=True)).sin(), mark)
    assert keep.decided is False


# --------------------------------------------------------------------------------------------------------------
# Step callbacks (torchdiffeq's func.callback_step / callback_accept_step / callback_reject_step, and *_adjoint)
# --------------------------------------------------------------------------------------------------------------

class CountingField(nn.Module):
    """y' = -k y with every callback counting its calls and recording its arguments."""

    def __init__(self, adjoint_too: bool = True, decisions: bool = True):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(1.3, dtype=DT))
        self.calls = {}
        names = ["callback_step"] + (["callback_accept_step", "callback_reject_step"] if decisions else [])
        for name in names + ([n + "_adjoint" for n in names] if adjoint_too else []):
            setattr(self, name, self._recorder(name))

    def _recorder(self, name):
        def record(t0, y0, dt):
            self.calls.setdefault(name, []).append((t0.clone(), y0, dt.clone()))
        return record

    def forward(self, t, y):
        return -self.k * y

    def n(self, name):
        return len(self.calls.get(name, []))


def test_callbacks_adaptive_counts_forward_and_backward():
    f = CountingField()
    t = torch.linspace(0, 2, 4, dtype=DT)
    y = odeint_adjoint(f, torch.ones(2, dtype=DT), t, options={"first_step": 1.0})  # too large: rejections
    st = last_stats()
    assert st.n_rejected > 0
    assert f.n("callback_step") == st.n_steps
    assert f.n("callback_accept_step") == st.n_accepted
    assert f.n("callback_reject_step") == st.n_rejected
    assert f.n("callback_step_adjoint") == 0
    t_acc = [float(c[0]) for c in f.calls["callback_accept_step"]]
    assert t_acc == sorted(t_acc) and t_acc[0] == 0.0  # accepted steps start where the last one ended
    assert all(float(c[2]) > 0 for c in f.calls["callback_step"]) and f.calls["callback_step"][0][1].shape == (2,)
    y.sum().backward()
    b = st.backward
    assert f.n("callback_step_adjoint") == b.n_steps > 0
    assert f.n("callback_accept_step_adjoint") == b.n_accepted
    assert f.n("callback_reject_step_adjoint") == b.n_rejected
    t_b, aug, dt_b = f.calls["callback_step_adjoint"][0]
    assert float(t_b) == 2.0 and float(dt_b) > 0  # the backward starts at t[-1], dt positive as in torchdiffeq
    assert len(aug) == 4 and aug[1].shape == (2,) and aug[2].shape == (2,) and aug[3].shape == ()  # (t, y, a, k)


def test_callbacks_decreasing_time_and_tuple_state():
    f = CountingField(adjoint_too=False)
    odeint(lambda tt, s: (f(tt, s[0]), -s[1]), (torch.ones(2, dtype=DT), torch.tensor(1.0, dtype=DT)),
           torch.tensor([1.0, 0.0], dtype=DT))
    assert f.n("callback_step") == 0  # callbacks are looked up on func itself
    g = CountingField(adjoint_too=False)
    odeint(g, torch.ones(2, dtype=DT), torch.tensor([1.0, 0.0], dtype=DT))
    ts = [float(c[0]) for c in g.calls["callback_accept_step"]]
    assert ts[0] == 1.0 and ts == sorted(ts, reverse=True)  # user time, decreasing
    assert g.n("callback_step") == last_stats().n_steps


def test_callbacks_per_sample():
    f = CountingField(adjoint_too=True)
    y0 = torch.tensor([[1.0], [5.0], [0.1]], dtype=DT)
    k = torch.tensor([[0.5], [3.0], [8.0]], dtype=DT)

    class PerSample(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = f
            for name in f.calls.keys() | {n for n in dir(f) if n.startswith("callback_")}:
                setattr(self, name, getattr(f, name))

        def forward(self, t, y):
            return -k * f.k * y

    y = odeint_adjoint(PerSample(), y0, torch.tensor([0.0, 1.0], dtype=DT), options={"per_sample": True})
    st = last_stats()
    for name, count in (("callback_step", st.n_steps), ("callback_accept_step", st.n_accepted),
                        ("callback_reject_step", st.n_rejected)):
        per = sum((c[2] != 0).to(torch.int64) for c in f.calls[name])
        torch.testing.assert_close(per, count)  # dt [B] is zero where the call does not concern the sample
        assert f.calls[name][0][0].shape == (3,)
    y.sum().backward()
    b = st.backward
    per = sum((c[2] != 0).to(torch.int64) for c in f.calls["callback_accept_step_adjoint"])
    torch.testing.assert_close(per, b.n_accepted)


@pytest.mark.parametrize("method, options", [("rk4", {}), ("implicit_adams", {"max_iters": 20})])
def test_callbacks_fixed_grid(method, options):
    f = CountingField(adjoint_too=True)
    with pytest.warns(UserWarning, match="does not call the callbacks"):
        y = odeint_adjoint(f, torch.ones(1, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT), method=method,
                           options={"step_size": 0.1, **options})
    assert f.n("callback_step") == last_stats().n_steps == 10
    assert f.n("callback_accept_step") == 0
    y.sum().backward()
    assert f.n("callback_step_adjoint") == 10


# --------------------------------------------------------------------------------------------------------------
# event_fn with fixed-grid methods
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, interp, order", [
    ("euler", "linear", 1), ("midpoint", "linear", 2), ("heun3", "cubic", 3), ("rk4", "cubic", 4),
    ("implicit_adams", "cubic", 3),
])
def test_fixed_grid_event_time_order(method, interp, order):
    """y' = -y from 1 until y = 0.3: t* = ln(1/0.3); the event time's error shrinks like h^order."""
    exact = math.log(1 / 0.3)
    errs = []
    for h in (0.02, 0.01):
        t_ev, sol = odeint(lambda tt, y: -y, torch.ones(1, dtype=DT), torch.tensor([0.0], dtype=DT), method=method,
                           event_fn=lambda tt, y: y[0] - 0.3, options={"step_size": h, "interp": interp})
        errs.append(abs(float(t_ev) - exact))
        assert abs(float(sol[-1, 0]) - 0.3) < 1e-14  # the state on the interpolant at the located time
    assert math.log2(errs[0] / errs[1]) > order - 0.3, errs


def test_fixed_grid_event_checks_and_gradient():
    def f(tt, y):
        return -y

    with pytest.raises(ValueError, match="step_size"):
        odeint(f, torch.ones(1, dtype=DT), torch.tensor([0.0], dtype=DT), method="rk4", event_fn=lambda t, y: y[0])
    with pytest.raises(ValueError, match="scipy_solver"):
        odeint(f, torch.ones(1, dtype=DT), torch.tensor([0.0], dtype=DT), method="scipy_solver",
               event_fn=lambda t, y: y[0])
    with pytest.raises(fastnode.SolverError, match="did not cross zero"):
        odeint(f, torch.ones(1, dtype=DT), torch.tensor([0.0], dtype=DT), method="euler",
               event_fn=lambda t, y: y[0] + 1.0, options={"step_size": 1.0})
    # The event time's gradient through odeint_event on a fixed grid: t* = ln(y0 / 0.3), dt*/dy0 = 1 / y0.
    y0 = torch.tensor([2.0], dtype=DT, requires_grad=True)
    t_ev, _ = fastnode.odeint_event(f, y0, torch.tensor(0.0, dtype=DT), event_fn=lambda t, y: y[0] - 0.3,
                                    method="rk4", options={"step_size": 0.001, "interp": "cubic"})
    t_ev.backward()
    assert abs(float(t_ev.detach()) - math.log(2 / 0.3)) < 1e-12
    assert abs(float(y0.grad) - 0.5) < 1e-9


# --------------------------------------------------------------------------------------------------------------
# odeint_adjoint: the event time's gradient
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_adjoint_event_time_gradient(method):
    class Decay(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.tensor(0.8, dtype=DT))

        def forward(self, t, y):
            return -self.k * y

    def solve(k, thr, y0):
        f = Decay()
        with torch.no_grad():
            f.k.copy_(k)
        opts = {"step_size": 0.001, "interp": "cubic"} if method == "rk4" else {}
        t_ev, _ = odeint_adjoint(f, y0, torch.tensor([0.0], dtype=DT), event_fn=lambda t, y: y[0] - thr,
                                 method=method, options=opts, rtol=1e-10, atol=1e-12,
                                 adjoint_params=(*f.parameters(), thr))
        return t_ev, f

    thr = torch.tensor(0.3, dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0], dtype=DT, requires_grad=True)
    t_ev, f = solve(0.8, thr, y0)
    assert t_ev.grad_fn is not None
    t_ev.backward()
    eps = 1e-5
    fd_k = (float(solve(0.8 + eps, thr.detach(), y0.detach())[0].detach()) -
            float(solve(0.8 - eps, thr.detach(), y0.detach())[0].detach())) / (2 * eps)
    assert abs(float(f.k.grad) - fd_k) < 1e-6  # also = -t*/k in closed form
    assert abs(float(f.k.grad) + math.log(1 / 0.3) / 0.64) < 1e-6
    assert abs(float(thr.grad) + 1 / (0.8 * 0.3)) < 1e-7
    assert abs(float(y0.grad) - 1 / 0.8) < 1e-7


# --------------------------------------------------------------------------------------------------------------
# Event location cost
# --------------------------------------------------------------------------------------------------------------

def test_event_location_evaluations_and_accuracy():
    """A falling ball (x' = v, v' = -g): dopri5 is exact on the quadratic, so the event time's error is the
    locator's alone. It must reach the time dtype's resolution with a handful of event_fn calls (bisection
    needed 60 per event)."""
    calls = []

    def ground(t, s):
        calls.append(float(t))
        return s[0]

    g, x0, v0 = 9.8, 10.0, 2.0
    t_ev, _ = odeint(lambda t, s: (s[1], torch.full_like(s[1], -g)),
                     (torch.tensor(x0, dtype=DT), torch.tensor(v0, dtype=DT)), torch.tensor([0.0], dtype=DT),
                     event_fn=ground)
    exact = (v0 + math.sqrt(v0 * v0 + 2 * g * x0)) / g
    assert abs(float(t_ev) - exact) <= 4 * math.ulp(exact)
    n_steps = last_stats().n_steps
    assert len(calls) - 1 - n_steps <= 12, (len(calls), n_steps)  # start + one per step + the location
