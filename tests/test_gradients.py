"""Backpropagation through the solver: ``gradcheck`` in float64 and gradients against closed forms.

``gradcheck`` compares autograd's Jacobian of ``odeint``'s output with central finite differences
(``eps = 1e-6``) w.r.t. the initial state, the time tensor and the parameters of a small ``nn.Module`` field
(passed explicitly through ``torch.func.functional_call``). Gradients never flow through the controller's
choice of step size, so the finite differences only agree if that choice barely moves the solution:

* dopri5, tsit5, dopri8 run genuinely adaptive at ``rtol=1e-10, atol=1e-12``: the solution then depends on
  the step sizes at the ~1e-10 level, far below gradcheck's ``atol=1e-5, rtol=1e-3``.
* bosh3, fehlberg2, adaptive_heun would need 10^3 - 10^5 steps at that tolerance (orders 3 and 2), so they
  run with ``max_step=0.05`` and a tolerance loose enough that every step is accepted at exactly
  ``max_step`` (asserted): the step sequence is then a smooth function of ``t[0]`` and ``t[-1]`` alone.
* Fixed-grid methods use ``step_size=0.05``. Interior output times (0.37) lie strictly between grid points
  and stay there under the finite-difference perturbations, so the interpolation is differentiated
  consistently; ``0.71 - 0`` is not near a multiple of 0.05, so no perturbation changes the number of steps.

Sizes are tiny (state dim 2, 3 output times) to keep the file fast.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

from fastnode import ADAPTIVE_METHODS, FIXED_METHODS, last_stats, odeint

DT = torch.float64
T_INC = (0.0, 0.37, 0.71)
STEP = 0.05

TIGHT = {"dopri5", "tsit5", "dopri8"}
PINNED = {"bosh3", "fehlberg2", "adaptive_heun"}
assert TIGHT | PINNED == set(ADAPTIVE_METHODS)


class Field(nn.Module):
    """dy/dt = tanh(W y + b + 0.5 sin t): nonlinear, non-autonomous (time gradients pass through stage times)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2).to(DT)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[0.5, -0.8], [0.6, 0.3]]))
            self.lin.bias.copy_(torch.tensor([0.1, -0.2]))

    def forward(self, t, y):
        # t: 0-d (shared) or [B] (per-sample, y: [B, 2]).
        tt = t if t.dim() == 0 else t.unsqueeze(-1)
        return torch.tanh(self.lin(y) + 0.5 * torch.sin(tt))


FIELD = Field()


def _params():
    return tuple(p.detach().clone().requires_grad_() for p in (FIELD.lin.weight, FIELD.lin.bias))


def _func(W, b):
    def f(t, y):
        return torch.func.functional_call(FIELD, {"lin.weight": W, "lin.bias": b}, (t, y))

    return f


def _solver_kwargs(method: str) -> dict:
    if method in FIXED_METHODS:
        return {"method": method, "options": {"step_size": STEP}}
    if method in TIGHT:
        return {"method": method, "rtol": 1e-10, "atol": 1e-12}
    # Every step accepted at max_step: the estimated local errors (<= ~h^2 |y''| ~ 1e-3) stay below
    # atol + rtol |y| = 1e-2 + 1e-2 |y|, and the controller's proposal (>= h) is capped at max_step.
    return {"method": method, "rtol": 1e-2, "atol": 1e-2, "options": {"max_step": STEP}}


def _check_pinned(method: str, t: torch.Tensor) -> None:
    """For the pinned methods, assert the precondition: uniform steps of max_step, none rejected."""
    if method not in PINNED:
        return
    st = last_stats()
    span = abs(float((t[-1] - t[0]).detach()))
    expected = int(span // STEP) + (1 if span % STEP > 1e-12 else 0)
    assert int(st.n_rejected) == 0 and int(st.n_accepted) == expected, (
        f"{method}: expected {expected} accepted steps of max_step and no rejections, got "
        f"{int(st.n_accepted)} accepted / {int(st.n_rejected)} rejected; the gradcheck set-up no longer pins steps")


def _inputs(times, batch=None):
    shape = (2,) if batch is None else (batch, 2)
    y0 = (torch.tensor([0.3, -0.4], dtype=DT) if batch is None
          else torch.tensor([[0.3, -0.4], [-0.5, 0.2], [0.1, 0.6]][:batch], dtype=DT)).reshape(shape)
    t = torch.tensor(times, dtype=DT)
    return y0.requires_grad_(), t.requires_grad_()


@pytest.mark.parametrize("method", list(ADAPTIVE_METHODS) + list(FIXED_METHODS))
def test_gradcheck_every_method(method):
    y0, t = _inputs(T_INC)
    W, b = _params()
    kw = _solver_kwargs(method)

    def fn(y0, t, W, b):
        return odeint(_func(W, b), y0, t, **kw)

    fn(y0, t, W, b)
    _check_pinned(method, t)
    assert gradcheck(fn, (y0, t, W, b))


@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
def test_gradcheck_per_sample(method):
    """Per-sample mode: [B, 2] states, each sample with its own steps; func sees t: [B]."""
    y0, t = _inputs(T_INC, batch=2)
    W, b = _params()

    def fn(y0, t, W, b):
        return odeint(_func(W, b), y0, t, rtol=1e-10, atol=1e-12, method=method, options={"per_sample": True})

    out = fn(y0, t, W, b)
    assert out.shape == (3, 2, 2)
    assert gradcheck(fn, (y0, t, W, b))


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_gradcheck_decreasing_time(method):
    y0, t = _inputs(tuple(reversed(T_INC)))
    W, b = _params()
    kw = _solver_kwargs(method)

    def fn(y0, t, W, b):
        return odeint(_func(W, b), y0, t, **kw)

    assert gradcheck(fn, (y0, t, W, b))


def test_gradcheck_tuple_state():
    """A tuple state (two tensors of different shapes) in and out, gradients w.r.t. both parts."""
    a0 = torch.tensor([0.3], dtype=DT, requires_grad=True)
    b0 = torch.tensor([[-0.4]], dtype=DT, requires_grad=True)
    t = torch.tensor(T_INC, dtype=DT, requires_grad=True)
    W, b = _params()

    def fn(a0, b0, t, W, b):
        f = _func(W, b)

        def tuple_f(tt, state):
            y = torch.cat([state[0], state[1].reshape(1)])
            dy = f(tt, y)
            return dy[:1], dy[1:].reshape(1, 1)

        return odeint(tuple_f, (a0, b0), t, rtol=1e-10, atol=1e-12, method="dopri5")

    out = fn(a0, b0, t, W, b)
    assert isinstance(out, tuple) and out[0].shape == (3, 1) and out[1].shape == (3, 1, 1)
    assert gradcheck(fn, (a0, b0, t, W, b))


def test_gradcheck_through_rejected_steps():
    """A first step far too large is rejected; the accepted/rejected selection must stay differentiable."""
    y0, t = _inputs(T_INC)
    W, b = _params()

    def fn(y0, t, W, b):
        return odeint(_func(W, b), y0, t, rtol=1e-10, atol=1e-12, method="dopri5", options={"first_step": 0.5})

    fn(y0, t, W, b)
    assert int(last_stats().n_rejected) >= 1, "set-up: the 0.5 first step should have been rejected"
    assert gradcheck(fn, (y0, t, W, b))


# ----------------------------------------------------------------------------------------------------------
# Gradients against closed forms: y' = A y, y(t) = expm(A (t - t0)) y0, so
#   dy(T)/dy0 = expm(A (T - t0)),  dy(T)/dT = A y(T),  dy(T)/dt0 = -expm(A (T - t0)) A y0.
# The discrete solution's Jacobian w.r.t. y0 is the same method applied to the variational equation (here the
# same linear ODE), so it carries the method's own error: for the adaptive methods K * (atol + rtol |y|) with
# K = 20 as in test_methods (entries ~1): 2e-9; for rk4 with h = 0.05 over T = 0.71, T * h^4 * rate^5 / 4!
# with rate = 1.6 >= |eigenvalues| = 1.503, doubled because the time derivatives differentiate the last step
# in h, which adds another O(h^p) term.

A_LIN = torch.tensor([[-0.1, -1.5], [1.5, -0.1]], dtype=DT)
CLOSED_FORM_BOUND = {"dopri5": 2e-9, "tsit5": 2e-9, "dopri8": 2e-9, "rk4": 2 * 0.71 * STEP**4 * 1.6**5 / 24}


@pytest.mark.parametrize("method", list(CLOSED_FORM_BOUND))
def test_gradients_match_closed_form(method):
    y0 = torch.tensor([1.0, 0.5], dtype=DT, requires_grad=True)
    t = torch.tensor([0.1, 0.81], dtype=DT, requires_grad=True)
    kw = _solver_kwargs(method)
    yT = odeint(lambda tt, y: y @ A_LIN.T, y0, t, **kw)[-1]
    rows = [torch.autograd.grad(yT[i], (y0, t), retain_graph=True) for i in range(2)]
    J_y0 = torch.stack([r[0] for r in rows])
    J_t = torch.stack([r[1] for r in rows])  # [2, 2]: d yT_i / d t_k
    E = torch.linalg.matrix_exp(A_LIN * (t[1] - t[0]).detach())
    y_exact = E @ y0.detach()
    bound = CLOSED_FORM_BOUND[method]
    torch.testing.assert_close(J_y0, E, atol=bound, rtol=0)
    torch.testing.assert_close(J_t[:, 1], A_LIN @ y_exact, atol=bound, rtol=0)
    torch.testing.assert_close(J_t[:, 0], -(E @ A_LIN @ y0.detach()), atol=bound, rtol=0)
