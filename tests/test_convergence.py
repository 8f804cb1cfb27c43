"""Convergence orders of every Runge-Kutta tableau, measured against exact solutions.

* Fixed-grid methods: through ``odeint`` with ``options={"step_size": h}``, halving ``h``.
* Adaptive tableaus: their coefficients (``fastnode.SOLVERS[m].tableau``: ``c``, ``a``, ``b``, ``e``) run in a
  small fixed-step integrator written here, independent of fastnode's stepping code, for the propagated
  solution (weights ``b``) and the embedded one (weights ``b - e``, one order lower).
* Dense output: one step of each adaptive tableau, its interpolant evaluated inside the step.

The measured order is ``log2(err(h) / err(h/2))`` for the two finest step sizes; it must lie within 0.3
(0.4 for the interpolant) of the nominal order. Step sizes are chosen per method so that the finest pair is
past the pre-asymptotic range and the finest error stays far above rounding: high-order tableaus
(order >= 5, errors down to 1e-15) run in 40-digit mpmath arithmetic, where the only floor left is the
float64 rounding of the stored coefficients (~1e-17 relative, so order conditions hold to ~1e-17).
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from fastnode import ADAPTIVE_METHODS, FIXED_METHODS, SOLVERS, odeint

from .problems import make_problem

ORDER_SLACK = 0.3
DENSE_SLACK = 0.4


def _order(errs: list[float]) -> float:
    """Observed order from the two finest errors (steps halving)."""
    return math.log2(errs[-2] / errs[-1])


# ----------------------------------------------------------------------------------------------------------
# Test problems in plain Python (scalar floats or mpmath numbers), so the reference integrator is independent
# of torch and can run in extended precision.

class _Rational:
    """y' = -2 t y^2, y(0) = 2  ->  y = 2 / (1 + 2 t^2): nonlinear and non-autonomous (tests the c_i)."""

    name = "rational"

    @staticmethod
    def f(t, y, m):
        return [-2 * t * y[0] * y[0]]

    @staticmethod
    def exact(t, m):
        return [2 / (1 + 2 * t * t)]


class _Rotation:
    """(x, y)' = (1 + x^2 + y^2) (-y, x), (x, y)(0) = (1, 0): a coupled nonlinear system.

    The radius stays 1, so the angle grows at the constant rate 2: (x, y) = (cos 2t, sin 2t). Unlike a scalar
    equation it exercises the order conditions of systems (the two components feed each other).
    """

    name = "rotation"

    @staticmethod
    def f(t, y, m):
        s = 1 + y[0] * y[0] + y[1] * y[1]
        return [-s * y[1], s * y[0]]

    @staticmethod
    def exact(t, m):
        return [m.cos(2 * t), m.sin(2 * t)]


PROBLEMS = {"rational": _Rational, "rotation": _Rotation}


def _integrate(tableau, weights, problem, n: int, span: float, precise: bool) -> float:
    """Fixed-step RK with the tableau's (c, a) and the given weights; max error over the n step ends.

    ``precise``: mpmath numbers at the current ``mpmath.mp`` precision (callers use ``workdps(40)``).
    """
    if precise:
        num, m = mpmath.mpf, mpmath
    else:
        num, m = float, math
    c = [num(x) for x in tableau.c]
    a = [[num(x) for x in row] for row in tableau.a]
    w = [num(x) for x in weights]
    h = num(span) / n
    y = problem.exact(num(0), m)
    worst = 0.0
    for s in range(n):
        t = s * h
        K = []
        for i in range(len(c)):
            yi = [yj + h * sum((aij * k[j] for aij, k in zip(a[i], K) if aij), num(0)) for j, yj in enumerate(y)]
            K.append(problem.f(t + c[i] * h, yi, m))
        y = [yj + h * sum((wi * k[j] for wi, k in zip(w, K) if wi), num(0)) for j, yj in enumerate(y)]
        ex = problem.exact((s + 1) * h, m)
        worst = max(worst, max(abs(float(yj - ej)) for yj, ej in zip(y, ex)))
    return worst


# Step counts over the span [0, 2] (the finest pair is measured). Chosen so that the finest pair is
# asymptotic and its errors stay far above the floor; fehlberg2's embedded 1st-order solution has the error
# constant 1/512, so its h^2 terms dominate until h ~ 1e-3: it needs thousands of steps before order 1 shows.
TABLEAU_STEPS = {
    "dopri5": {"propagated": (64, 128, 256), "embedded": (32, 64, 128)},
    "tsit5": {"propagated": (64, 128, 256), "embedded": (32, 64, 128)},
    "bosh3": {"propagated": (64, 128, 256), "embedded": (64, 128, 256)},
    "dopri8": {"propagated": (16, 32, 64), "embedded": (16, 32, 64)},
    "fehlberg2": {"propagated": (64, 128, 256), "embedded": (2048, 4096, 8192)},
    "adaptive_heun": {"propagated": (32, 64, 128), "embedded": (32, 64, 128)},
}
# dopri8 has a floor even in mpmath: its coefficients are stored as float64, so its order conditions hold only
# to ~1e-15, which costs ~1e-15 * T * |f| of global error (~1e-15 on rational, ~5e-16 on rotation). On
# rotation the 8th-order solution reaches it at n = 64, hence the coarser pair there; the 7th-order embedded
# solution is still pre-asymptotic (measured 6.4 -> 6.65) where the floor sets in, so that one case is
# left to test_order_conditions, which checks every tree of order <= 7 exactly.
STEP_OVERRIDES = {("dopri8", "propagated", "rotation"): (8, 16, 32)}
NOT_MEASURABLE = {("dopri8", "embedded", "rotation")}


def _tableau_cases():
    out = []
    for method in ADAPTIVE_METHODS:
        for solution in ("propagated", "embedded"):
            for problem in PROBLEMS:
                if (method, solution, problem) not in NOT_MEASURABLE:
                    out.append(pytest.param(method, solution, problem, id=f"{method}-{solution}-{problem}"))
    return out


def test_every_adaptive_method_has_steps():
    assert set(TABLEAU_STEPS) == set(ADAPTIVE_METHODS)


@pytest.mark.parametrize("method, solution, problem", _tableau_cases())
def test_adaptive_tableau_order(method, solution, problem, record_property):
    tab = SOLVERS[method].tableau
    steps = STEP_OVERRIDES.get((method, solution, problem), TABLEAU_STEPS[method][solution])
    if solution == "propagated":
        weights, nominal = tab.b, tab.order
    else:
        # Embedded solution: b - e; one order below the propagated one for every pair here
        # (dopri5 5(4), tsit5 5(4), bosh3 3(2), dopri8 8(7), fehlberg2 2(1), adaptive_heun 2(1)).
        weights, nominal = [b - e for b, e in zip(tab.b, tab.e)], tab.order - 1
    precise = tab.order >= 5
    with mpmath.workdps(40):
        errs = [_integrate(tab, weights, PROBLEMS[problem], n, 2.0, precise) for n in steps]
    order = _order(errs)
    record_property("measured_order", round(order, 3))
    assert abs(order - nominal) <= ORDER_SLACK, (
        f"{method} {solution} on {problem}: measured order {order:.2f}, nominal {nominal} "
        f"(errors {[f'{e:.2e}' for e in errs]} for n={steps})")


# ----------------------------------------------------------------------------------------------------------
# Order conditions, exactly: every rooted tree t of order <= p must satisfy  w . Phi(t) = 1 / gamma(t)
# (Butcher), for systems as well as scalar equations. This is the definitive check behind the measured orders.

def _rooted_trees(n: int) -> list:
    """All rooted trees with n nodes; a tree is the sorted tuple of its root's subtrees."""
    return _TREES[n]


def _tree_order(t) -> int:
    return 1 + sum(_tree_order(u) for u in t)


def _build_trees(max_n: int) -> dict:
    trees = {1: [()]}
    for n in range(2, max_n + 1):
        found = set()

        def forests(rem, min_key):
            # Multisets of subtrees with rem nodes in total, in non-decreasing canonical order.
            if rem == 0:
                yield ()
                return
            for k in range(1, rem + 1):
                for sub in trees[k]:
                    key = (k, repr(sub))
                    if min_key is not None and key < min_key:
                        continue
                    for rest in forests(rem - k, key):
                        yield (sub,) + rest

        for f in forests(n - 1, None):
            found.add(tuple(sorted(f, key=lambda u: (_tree_order(u), repr(u)))))
        trees[n] = sorted(found, key=repr)
    return trees


_TREES = _build_trees(9)


def _order_residuals(tab, weights, max_order: int) -> dict:
    """max_t |w . Phi(t) - 1/gamma(t)| over the trees of each order 1..max_order (float64)."""
    S = len(tab.c)
    A = torch.zeros(S, S, dtype=torch.float64)
    for i, row in enumerate(tab.a):
        if row:
            A[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)

    def phi(t):
        v = torch.ones(S, dtype=torch.float64)
        for u in t:
            v = v * (A @ phi(u))
        return v

    def gamma(t):
        g = _tree_order(t)
        for u in t:
            g *= gamma(u)
        return g

    return {p: max(abs(float(w @ phi(t)) - 1.0 / gamma(t)) for t in _rooted_trees(p)) for p in range(1, max_order + 1)}


def test_rooted_tree_counts():
    # OEIS A000081: 1, 1, 2, 4, 9, 20, 48, 115, 286.
    assert [len(_rooted_trees(n)) for n in range(1, 10)] == [1, 1, 2, 4, 9, 20, 48, 115, 286]


def _condition_cases():
    out = []
    for method in ADAPTIVE_METHODS + FIXED_METHODS:
        out.append(pytest.param(method, "propagated", id=f"{method}-propagated"))
        if method in ADAPTIVE_METHODS:
            out.append(pytest.param(method, "embedded", id=f"{method}-embedded"))
    return out


@pytest.mark.parametrize("method, solution", _condition_cases())
def test_order_conditions(method, solution):
    """Conditions up to the nominal order hold to rounding; some condition of the next order fails.

    Rounding: the coefficients are float64 (tsit5's are published as 16-digit decimals), and Phi multiplies
    up to 8 of them of size <= ~50, so residuals of exact conditions are <= ~1e-14; 1e-13 leaves room. A
    residual above 1e-6 at order p+1 confirms the method is not of higher order than claimed (the smallest
    such residual here is dopri8's, ~8e-6).
    """
    tab = SOLVERS[method].tableau
    if solution == "propagated":
        weights, p = tab.b, tab.order
    else:
        weights, p = [b - e for b, e in zip(tab.b, tab.e)], tab.order - 1
    res = _order_residuals(tab, weights, p + 1)
    for k in range(1, p + 1):
        assert res[k] <= 1e-13, f"{method} {solution}: order-{k} conditions violated by {res[k]:.2e}"
    assert res[p + 1] > 1e-6, f"{method} {solution}: order-{p + 1} conditions hold too ({res[p + 1]:.2e})"


# ----------------------------------------------------------------------------------------------------------
# Fixed-grid methods through odeint.

FIXED_STEPS = (64, 128, 256)  # over [0, 2]; outputs at multiples of 1/4 lie on every grid


@pytest.mark.parametrize("prob", ["rational", "linear"])
@pytest.mark.parametrize("method", FIXED_METHODS)
def test_fixed_grid_order(method, prob, record_property):
    problem = make_problem(prob, torch.float64)
    t = torch.linspace(0.0, 2.0, 9, dtype=torch.float64)
    exact = problem.exact(t)
    errs = []
    for n in FIXED_STEPS:
        ys = odeint(problem.func, problem.y0, t, method=method, options={"step_size": 2.0 / n})
        errs.append((ys - exact).abs().max().item())
    order = _order(errs)
    nominal = SOLVERS[method].tableau.order
    record_property("measured_order", round(order, 3))
    assert abs(order - nominal) <= ORDER_SLACK, (
        f"{method} on {prob}: measured order {order:.2f}, nominal {nominal} "
        f"(errors {[f'{e:.2e}' for e in errs]} for h=2/{FIXED_STEPS})")


# ----------------------------------------------------------------------------------------------------------
# Dense output of the adaptive tableaus.

def _one_step_interp_error(tab, problem, t0: float, h: float, theta: float) -> float:
    """One step of size h from the exact state at t0; max error of the interpolant at t0 + theta h.

    ``y(t0 + theta h) = y0 + h * sum_j k_j * sum_p dense[j][p] theta^(p+1)`` (the tableau's convention).
    """
    dt = torch.float64
    y0 = problem.y_at(t0)
    t0_ = torch.tensor(t0, dtype=dt)
    K = []
    for i, ci in enumerate(tab.c):
        yi = y0 + h * sum((aij * K[j] for j, aij in enumerate(tab.a[i]) if aij), torch.zeros_like(y0))
        K.append(problem.func(t0_ + ci * h, yi))
    w = [sum(d * theta ** (p + 1) for p, d in enumerate(row)) for row in tab.dense]
    y = y0 + h * sum((wj * k for wj, k in zip(w, K)), torch.zeros_like(y0))
    ex = problem.y_at(t0 + theta * h)
    return (y - ex).abs().max().item()


DENSE_H = (0.2, 0.1, 0.05, 0.025, 0.0125)
# rational from t0 = 1 (at t0 = 0 its symmetry cancels the leading error term); linear anywhere.
DENSE_T0 = {"rational": 1.0, "linear": 0.5}


@pytest.mark.parametrize("theta", [0.3, 0.7])
@pytest.mark.parametrize("prob", ["linear", "rational"])
@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_dense_output_order(method, prob, theta, record_property):
    """Local interpolation error ~ h^(q+1), q = min(dense_order, order).

    ``dense_order`` is the order of the interpolant's interior data (the published continuous extension, or the
    midpoint weights of the fitted quartic); the interpolant also passes through the step's solution ``y1``,
    whose local error is O(h^(order+1)), so it cannot do better than the method's own order (this matters for
    fehlberg2: midpoint weights of order 3, solution of order 2).
    """
    tab = SOLVERS[method].tableau
    problem = make_problem(prob, torch.float64)
    errs = [_one_step_interp_error(tab, problem, DENSE_T0[prob], h, theta) for h in DENSE_H]
    order = _order(errs)
    expected = min(tab.dense_order, tab.order) + 1
    record_property("measured_order", round(order, 3))
    assert abs(order - expected) <= DENSE_SLACK, (
        f"{method} dense output at theta={theta} on {prob}: local order {order:.2f}, expected {expected} "
        f"(dense_order={tab.dense_order}, order={tab.order}; errors {[f'{e:.2e}' for e in errs]})")


@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_dense_output_is_hermite_consistent(method):
    """The interpolant starts at y0 with slope k_0 and ends at the step's solution with slope f(t1, y1).

    Value and slope at both ends are what make the dense output continuous (C^1) across accepted steps.
    With ``D = dense``: slope at theta=0 is ``sum_j k_j D[j][0]``; value at theta=1 is ``sum_j k_j sum_p D[j][p]``
    (must be ``b_j``); slope at theta=1 is ``sum_j k_j sum_p (p+1) D[j][p]`` (must pick the last, FSAL stage).
    """
    tab = SOLVERS[method].tableau
    D = torch.tensor(tab.dense, dtype=torch.float64)
    S, P = D.shape
    assert S == len(tab.c) == len(tab.b)
    e0 = torch.zeros(S, dtype=torch.float64)
    e0[0] = 1
    eS = torch.zeros(S, dtype=torch.float64)
    eS[-1] = 1
    # The last stage is the next step's first one: f(t0 + h, y1) in FSAL form, or (reuse_last_stage) the
    # derivative at t0 + h taken at the embedded/predictor point. Either way the end slope equals the next
    # step's start slope, so the dense output is C^1 across steps.
    assert tab.c[-1] == 1.0
    if not tab.reuse_last_stage:
        assert torch.allclose(torch.tensor(tab.a[-1] + (0.0,)), torch.tensor(tab.b), atol=1e-15)
    powers = torch.arange(1, P + 1, dtype=torch.float64)
    torch.testing.assert_close(D[:, 0], e0, atol=1e-13, rtol=0)
    torch.testing.assert_close(D.sum(dim=1), torch.tensor(tab.b, dtype=torch.float64), atol=1e-13, rtol=0)
    torch.testing.assert_close(D @ powers, eS, atol=1e-12, rtol=0)
