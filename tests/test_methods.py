"""Every method against closed-form solutions: accuracy, shapes, dtypes, directions, tuple states, dense output.

How the error bounds are derived (``ymax`` = max |exact solution| over the outputs, ``eps`` = the dtype's
machine epsilon; all problems span one time unit, see ``tests/problems.py``):

* Rounding, every method: a step forms ``y + h * sum_j b_j k_j`` (and the dense output
  ``y + h * sum_j w_j(theta) k_j``) with weights of moderate size, so each step or output adds a few ulps of
  ``|y|``: we allow ``4 * (n_steps + 1) * eps * ymax``. On ``dy/dt = c`` (``constant``) every consistent
  Runge-Kutta method and its interpolant are exact in exact arithmetic (the solution is linear in ``t``),
  so there the bound is this rounding term alone.

* Adaptive methods: the I-controller accepts a step only when the RMS of the scaled error estimate is
  ``<= 1``, i.e. each step's estimated local error is ``<= atol + rtol |y|`` (up to ``sqrt(3)`` in the max
  norm over 3 components). With local extrapolation the propagated solution is one order above the embedded
  one, so its local error is ``kappa = c |z|`` times the estimate (``z = lambda h``; ``c`` the ratio of the
  two principal error coefficients). Summed over the ``N = T/h`` steps that is ``c * rate * T`` estimates,
  independent of ``N``; earlier errors then grow by ``G <= 3`` relative to ``ymax`` (largest: ``rational``
  backwards, where ``dy(0)/dy(1) = (1 + c)^2 = 9`` while ``ymax/|y(1)| = 3``). So the global error is at most
  ``K = sqrt(3) * G * c * rate * T`` tolerances, with ``rate * T <= 2``:
  ``c <= ~2`` for dopri5, tsit5, bosh3, dopri8 (1/3 for adaptive_heun) gives ``K = 20`` (measured <= 10);
  fehlberg2's embedded 1st-order weights (1/256, 255/256) have the tiny error constant 1/512, so
  ``c = (1/6) / (1/512) ~ 85`` and ``K = 1000`` (measured <= 170).
  Tolerances are picked per method so that low-order methods take at most ~120 steps (runtime), and in
  float32 so that ``rtol`` stays well above ``eps`` (1.2e-7).

* Fixed-grid methods (euler, midpoint, heun2, heun3, rk4 are explicit ``p``-stage methods of order ``p``):
  their local error is ``C h^(p+1)`` times elementary differentials of order ``p + 1``, with principal
  coefficient ``1/(p+1)!`` on linear problems (the stability polynomial is the Taylor polynomial of
  ``e^z``). With every rate of growth below ``rate`` (``Problem.rate``), summing ``T/h`` local errors gives
  ``T * h^p * rate^(p+1) * ymax / p!``, which bounds the measured error with a margin of >= 2 on every
  problem and direction here.

Dense output: many output times (50) inside the steps must meet the same bound as the step ends, since an
interpolant whose error exceeds the method's own is a loss of accuracy the user asked for.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastnode import ADAPTIVE_METHODS, FIXED_METHODS, SOLVERS, last_stats, odeint

from .problems import PROBLEM_NAMES, make_problem, merge_state, split_state, tuple_func

ALL_METHODS = tuple(ADAPTIVE_METHODS) + tuple(FIXED_METHODS)
DTYPES = {"float64": torch.float64, "float32": torch.float32}

# (rtol, atol) per adaptive method and dtype. Low-order methods get looser tolerances so they take a bounded
# number of steps (<= ~120) and the file stays fast; float32 keeps rtol >= 1e-5 (about 80 eps).
ADAPTIVE_TOL = {
    torch.float64: {"dopri5": (1e-7, 1e-9), "tsit5": (1e-7, 1e-9), "dopri8": (1e-7, 1e-9), "bosh3": (1e-6, 1e-8),
                    "fehlberg2": (1e-5, 1e-7), "adaptive_heun": (1e-4, 1e-6)},
    torch.float32: {"dopri5": (1e-5, 1e-7), "tsit5": (1e-5, 1e-7), "dopri8": (1e-5, 1e-7), "bosh3": (1e-5, 1e-7),
                    "fehlberg2": (1e-5, 1e-7), "adaptive_heun": (1e-4, 1e-6)},
}
# Global error <= K * (atol + rtol * ymax); see the module docstring for the derivation.
ADAPTIVE_K = {"dopri5": 20.0, "tsit5": 20.0, "dopri8": 20.0, "bosh3": 20.0, "adaptive_heun": 20.0,
              "fehlberg2": 1000.0}
# Fixed grid: a power of two so grid points are exact in binary and outputs at multiples of 1/4 lie on it.
FIXED_STEP = 1.0 / 32


def _span(direction: str, dtype, n: int) -> torch.Tensor:
    t = torch.linspace(0.0, 1.0, n, dtype=dtype)
    return t if direction == "inc" else t.flip(0)


def _rounding(dtype, n_steps: int, ymax: float) -> float:
    return 4.0 * (n_steps + 1) * torch.finfo(dtype).eps * ymax


def _solve(method, problem, t, dtype, state, options=None):
    """Solve from the exact state at t[0]; return (raw output, merged [T, 3] output, y0 as passed)."""
    y0 = problem.y_at(t[0])
    if state == "tuple":
        y0_in = split_state(y0)
        func = tuple_func(problem.func)
    else:
        y0_in, func = y0, problem.func
    opts = dict(options or {})
    if method in FIXED_METHODS:
        opts.setdefault("step_size", FIXED_STEP)
        ys = odeint(func, y0_in, t, method=method, options=opts)
    else:
        rtol, atol = ADAPTIVE_TOL[dtype][method]
        ys = odeint(func, y0_in, t, rtol=rtol, atol=atol, method=method, options=opts or None)
    merged = merge_state(ys) if state == "tuple" else ys
    return ys, merged, y0_in


def _bound(method, problem, dtype, exact: torch.Tensor) -> float:
    """Allowed max-norm error for a solve just made (reads last_stats for the number of steps)."""
    ymax = float(exact.abs().max())
    if method in FIXED_METHODS:
        p = SOLVERS[method].tableau.order
        n = round(1.0 / FIXED_STEP)
        trunc = FIXED_STEP**p * problem.rate ** (p + 1) * ymax / math.factorial(p)
        return trunc + _rounding(dtype, n, ymax)
    rtol, atol = ADAPTIVE_TOL[dtype][method]
    n = int(last_stats().n_accepted)
    tol_part = 0.0 if problem.rate == 0.0 else ADAPTIVE_K[method] * (atol + rtol * ymax)
    return tol_part + _rounding(dtype, n, ymax)


def _cases():
    """All problems increasing with a tensor state; direction and tuple state on a coupled linear system and
    on a nonlinear non-autonomous one (where a wrong time sign or a wrong tuple split would show)."""
    out = []
    for method in ALL_METHODS:
        for dname in DTYPES:
            for prob in PROBLEM_NAMES:
                out.append(pytest.param(method, dname, prob, "inc", "tensor", id=f"{method}-{dname}-{prob}-inc-tensor"))
            for prob in ("linear", "rational"):
                for direction, state in (("dec", "tensor"), ("inc", "tuple"), ("dec", "tuple")):
                    out.append(pytest.param(method, dname, prob, direction, state,
                                            id=f"{method}-{dname}-{prob}-{direction}-{state}"))
    return out


@pytest.mark.parametrize("method, dname, prob, direction, state", _cases())
def test_matches_exact_solution(method, dname, prob, direction, state):
    dtype = DTYPES[dname]
    problem = make_problem(prob, dtype)
    t = _span(direction, dtype, 5)
    ys, merged, y0_in = _solve(method, problem, t, dtype, state)

    # Form: [len(t), *y0.shape] per tensor, dtype kept, tuple in -> tuple out, y0 returned exactly at t[0].
    if state == "tuple":
        assert isinstance(ys, tuple) and len(ys) == 2
        for out, y0_part in zip(ys, y0_in):
            assert out.shape == (len(t), *y0_part.shape)
            assert out.dtype == dtype
            assert torch.equal(out[0], y0_part)
    else:
        assert isinstance(ys, torch.Tensor)
        assert ys.shape == (len(t), *y0_in.shape)
        assert ys.dtype == dtype
        assert torch.equal(ys[0], y0_in)

    exact = problem.exact(t)
    bound = _bound(method, problem, dtype, exact)
    err = (merged - exact).abs().max().item()
    assert err <= bound, f"{method} {dname} {prob} {direction} {state}: max error {err:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("direction", ["inc", "dec"])
@pytest.mark.parametrize("prob", ["linear", "rational"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_dense_output(method, dname, prob, direction):
    """50 output times: almost all fall strictly inside steps, so this measures the interpolant.

    (dopri8 is the exception by design: its tableau sets ``step_to_outputs`` and steps onto every output time.)
    """
    dtype = DTYPES[dname]
    problem = make_problem(prob, dtype)
    t = _span(direction, dtype, 50)
    _, ys, _ = _solve(method, problem, t, dtype, "tensor")
    n_acc = int(last_stats().n_accepted)
    exact = problem.exact(t)
    bound = _bound(method, problem, dtype, exact)
    err_all = (ys - exact).abs().amax(dim=1)
    worst = int(err_all.argmax())
    assert err_all[worst].item() <= bound, (
        f"{method} {dname} {prob} {direction}: dense output error {err_all[worst].item():.3e} "
        f"at t={t[worst].item():.4f}"
        f" > bound {bound:.3e} (final-time error {err_all[-1].item():.3e}, {n_acc} accepted steps)")


@pytest.mark.parametrize("direction", ["inc", "dec"])
@pytest.mark.parametrize("interp", ["linear", "cubic"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("method", FIXED_METHODS)
def test_fixed_grid_interpolation(method, dname, interp, direction):
    """Outputs between grid points: the method's error plus the interpolation error.

    Linear interpolation errs by at most ``h^2/8 max|y''|``, cubic Hermite by ``h^4/384 max|y''''|``; on the
    linear problem ``|y^(n)| <= rate^n ymax``. Hermite's weights on the end values sum to one and its slope
    terms add at most ``2 * 4/27 * h * rate`` times the end errors, so the method's grid error carries over
    with a factor below 1.1.
    """
    dtype = DTYPES[dname]
    problem = make_problem("linear", dtype)
    t = _span(direction, dtype, 50)
    _, ys, _ = _solve(method, problem, t, dtype, "tensor", options={"interp": interp})
    exact = problem.exact(t)
    ymax = float(exact.abs().max())
    h, r = FIXED_STEP, problem.rate
    interp_err = h**2 / 8 * r**2 * ymax if interp == "linear" else h**4 / 384 * r**4 * ymax
    bound = 1.1 * _bound(method, problem, dtype, exact) + interp_err
    err = (ys - exact).abs().max().item()
    assert err <= bound, f"{method} {dname} interp={interp} {direction}: error {err:.3e} > bound {bound:.3e}"
