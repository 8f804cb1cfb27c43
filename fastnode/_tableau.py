"""Butcher tableaus as data, plus the derived quantities every solver needs.

A tableau is stored exactly as published (``c``, ``a``, ``b``, embedded error weights ``e``). On construction
it is made *first-same-as-last* (FSAL): if the last stage is not already ``f(t + h, y_new)`` one such stage is
appended (``a`` row = ``b``, zero solution and error weight). Then every step ends with the derivative at the
new state, which is the next step's first stage, so an accepted step costs ``S - 1`` new evaluations and the
dense output can use ``f`` at both ends of the step.

Dense output is one matrix ``dense`` of shape ``[S, P]``: inside a step of size ``h`` starting at ``y0``,

    y(t0 + theta * h) = y0 + h * sum_j k_j * sum_p dense[j, p] * theta ** (p + 1).

Methods with a published continuous extension pass it directly (dopri5). For the others it is the quartic
through ``y0``, ``y1``, ``f0``, ``f1`` and a midpoint value ``y(t0 + h/2)`` whose stage weights are solved from
the Runge-Kutta order conditions at ``theta = 1/2`` (as high an order as the stages allow, up to 4), so the
interpolant's error is of the order of the method's local error for every method here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np


def _as_float(x) -> float:
    return float(Fraction(x)) if isinstance(x, (str, Fraction)) else float(x)


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method.

    Args:
        name: registry name.
        order: order of the propagated solution (the step-size controller uses ``1/order`` as exponent).
        c: [S] stage times as fractions of the step.
        a: lower-triangular rows, ``a[i]`` has ``i`` entries (row 0 is empty).
        b: [S] solution weights.
        e: [S] error weights (solution minus embedded solution), or ``None`` for fixed-step methods.
        dense: optional published dense-output matrix ``[S, P]`` (see module docstring).
        step_to_outputs: step exactly onto every output time instead of interpolating, for methods whose
            dense output is far less accurate than their steps.
        reuse_last_stage: take the last stage (evaluated at ``t + h`` but not at ``y_new``) as the next step's
            first stage instead of appending ``f(t + h, y_new)``. The reused derivative is ``O(h^2)`` off, which
            adds ``O(h^3)`` per step: harmless for 2nd-order methods, and it saves one evaluation per step.
    """

    name: str
    order: int
    c: Sequence[float]
    a: Sequence[Sequence[float]]
    b: Sequence[float]
    e: Sequence[float] | None = None
    dense: Sequence[Sequence[float]] | None = None
    step_to_outputs: bool = False
    reuse_last_stage: bool = False
    # Derived in __post_init__ (FSAL form).
    dense_order: int = field(default=0, init=False)

    def __post_init__(self):
        c = [_as_float(x) for x in self.c]
        a = [[_as_float(x) for x in row] for row in self.a]
        b = [_as_float(x) for x in self.b]
        e = None if self.e is None else [_as_float(x) for x in self.e]
        S = len(c)
        if len(a) != S or any(len(row) != i for i, row in enumerate(a)) or len(b) != S:
            raise ValueError(f"tableau {self.name!r}: inconsistent stage counts")
        if e is not None and len(e) != S:
            raise ValueError(f"tableau {self.name!r}: error weights have {len(e)} entries, expected {S}")
        if e is None:
            # Fixed-grid methods evaluate their stages as published; they have no dense output of their own
            # (outputs between grid points use linear or cubic Hermite interpolation).
            object.__setattr__(self, "c", tuple(c))
            object.__setattr__(self, "a", tuple(tuple(r) for r in a))
            object.__setattr__(self, "b", tuple(b))
            return
        is_fsal = c[-1] == 1.0 and np.allclose(a[-1] + [0.0], b, rtol=0, atol=1e-15) and b[-1] == 0.0
        dense = None if self.dense is None else [[_as_float(x) for x in row] for row in self.dense]
        if not is_fsal and self.reuse_last_stage and c[-1] != 1.0:
            raise ValueError(f"tableau {self.name!r}: reuse_last_stage needs a last stage at c=1")
        if not is_fsal and not self.reuse_last_stage:
            c.append(1.0)
            a.append(list(b))
            b.append(0.0)
            e.append(0.0)
            if dense is not None:
                dense.append([0.0] * len(dense[0]))
        object.__setattr__(self, "c", tuple(c))
        object.__setattr__(self, "a", tuple(tuple(r) for r in a))
        object.__setattr__(self, "b", tuple(b))
        object.__setattr__(self, "e", tuple(e))
        if dense is None:
            dense, dorder = _quartic_dense(np.array(c), _full_a(a), np.array(b))
        else:
            dorder = 4
        object.__setattr__(self, "dense", tuple(tuple(float(x) for x in row) for row in dense))
        object.__setattr__(self, "dense_order", dorder)

    @property
    def num_stages(self) -> int:
        """Stages per step in FSAL form (the last one is ``f(t + h, y_new)``)."""
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.e is not None


def _full_a(a_rows) -> np.ndarray:
    S = len(a_rows)
    A = np.zeros((S, S))
    for i, row in enumerate(a_rows):
        A[i, : len(row)] = row
    return A


def _order_conditions(c: np.ndarray, A: np.ndarray, theta: float, order: int):
    """Rows ``Phi`` and right-hand sides for ``sum_j w_j Phi_j(tree) = theta^rho / gamma`` up to ``order``."""
    one = np.ones_like(c)
    Ac = A @ c
    rows, rhs = [], []

    def add(phi, rho, gamma):
        rows.append(phi)
        rhs.append(theta**rho / gamma)

    if order >= 1:
        add(one, 1, 1)
    if order >= 2:
        add(c, 2, 2)
    if order >= 3:
        add(c**2, 3, 3)
        add(Ac, 3, 6)
    if order >= 4:
        add(c**3, 4, 4)
        add(c * Ac, 4, 8)
        add(A @ c**2, 4, 12)
        add(A @ Ac, 4, 24)
    return np.array(rows), np.array(rhs)


def _quartic_dense(c: np.ndarray, A: np.ndarray, b: np.ndarray):
    """Dense matrix of the quartic through y0, y1, f0, f1 and an order-condition midpoint.

    Returns the ``[S, 4]`` matrix and the order reached by the midpoint weights.
    """
    S = len(c)
    mid, reached = None, 0
    for order in (4, 3, 2, 1):
        M, r = _order_conditions(c, A, 0.5, order)
        w, *_ = np.linalg.lstsq(M, r, rcond=None)
        # NOTE: exact and well conditioned: weights with a large 1-norm (near-duplicate stages, e.g. two
        # stages at c=1) would cancel catastrophically and lose digits to rounding; a lower order is better.
        if np.max(np.abs(M @ w - r)) < 1e-13 and np.abs(w).sum() <= 4.0:
            mid, reached = w, order
            break
    e0 = np.zeros(S)
    e0[0] = 1.0
    eS = np.zeros(S)
    eS[-1] = 1.0
    # Polynomial p(theta) = y0 + a1 th + a2 th^2 + a3 th^3 + a4 th^4 with (everything over h * k):
    #   a1 = f0, D = y1 - y0 - a1, E = h(f1 - f0), M = y_mid - y0 - a1/2; solving the five conditions gives
    #   a2 = E - 5D + 16M, a3 = -3E + 14D - 32M, a4 = 2E - 8D + 16M.
    D, E, Mv = b - e0, eS - e0, mid - 0.5 * e0
    cols = [e0, E - 5 * D + 16 * Mv, -3 * E + 14 * D - 32 * Mv, 2 * E - 8 * D + 16 * Mv]
    return np.stack(cols, axis=1).tolist(), min(4, reached)
