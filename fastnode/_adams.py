"""Adams multistep methods on a fixed grid: ``explicit_adams``, ``implicit_adams`` (alias ``fixed_adams``).

torchdiffeq 0.2.5's semantics, which are those of a fixed-grid solver (grid from ``t``, ``step_size`` or
``grid_constructor``; ``interp`` and ``perturb`` as for the Runge-Kutta grid methods):

* Every step evaluates ``f(t_n, y_n)`` and puts it at the front of a history of at most ``max_order - 1``
  derivatives (newest first).
* While the history holds fewer than 3 derivatives (the first two steps), the step is Kutta's 3/8-rule RK4.
* Then, with ``k = min(len(history), max_order - 1)`` derivatives, the Adams-Bashforth formula of order ``k``
  predicts the step. ``implicit_adams`` corrects it with the Adams-Moulton formula of order ``k + 1`` by
  functional iteration: at most ``max_iters`` evaluations of ``f(t_{n+1}, y_n + dy)``, stopping once two
  successive increments agree to ``atol + rtol * max(|dy_old|, |dy|)`` in the max norm (``rtol``, ``atol``
  are ``odeint``'s). If they never agree, a warning is issued and the oldest derivative is dropped, which holds
  the order at its current value.

The order thus climbs by one per step to ``max_order - 1`` (explicit) or ``max_order`` (implicit), default 12.
The coefficients are computed exactly (rational arithmetic) from their defining integrals.
"""

from __future__ import annotations

import warnings
from collections import deque
from fractions import Fraction
from functools import cache

import torch

from . import _stats as st
from ._problem import FlatFunc

MIN_ORDER = 4  # below it the history is too short for a multistep formula: the step is RK4
MAX_ORDER = 12
MAX_ITERS = 4
ADAMS_OPTIONS = frozenset({"max_order", "max_iters", "implicit"})
# The fixed-grid options (fastnode._options.FIXED_OPTIONS, not imported: _options imports the registry) and Adams'.
ADAMS_VALID = frozenset({"step_size", "grid_constructor", "interp", "perturb", "dtype", "backend", "per_sample"}) | \
    ADAMS_OPTIONS


def _poly_mul(p: list, q: list) -> list:
    out = [Fraction(0)] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            out[i + j] += a * b
    return out


def _integrate01(p: list) -> Fraction:
    return sum((c / (i + 1) for i, c in enumerate(p)), Fraction(0))


@cache
def adams_coefficients(k: int, implicit: bool) -> tuple[float, ...]:
    """Weights of the ``k``-value Adams formula, newest derivative first.

    Explicit (Adams-Bashforth, order ``k``): ``y_{n+1} = y_n + h sum_j beta_j f_{n-j}``, j = 0..k-1, with
    ``beta_j = int_0^1 l_j(u) du`` for the Lagrange basis ``l_j`` on the nodes ``u = -j``. Implicit
    (Adams-Moulton, order ``k``): nodes ``u = 1 - j``, so ``beta_0`` weighs ``f_{n+1}``.

    Example:
        >>> adams_coefficients(2, False)  # y_{n+1} = y_n + h (3/2 f_n - 1/2 f_{n-1})
        (1.5, -0.5)
        >>> adams_coefficients(2, True)  # the trapezoidal rule
        (0.5, 0.5)
    """
    shift = 1 if implicit else 0
    nodes = [Fraction(shift - j) for j in range(k)]
    out = []
    for j, xj in enumerate(nodes):
        p = [Fraction(1)]
        for m, xm in enumerate(nodes):
            if m != j:
                p = _poly_mul(p, [-xm / (xj - xm), 1 / (xj - xm)])
        out.append(float(_integrate01(p)))
    return tuple(out)


def parse_adams_options(options: dict, implicit: bool) -> tuple[bool, int, int]:
    """``(implicit, max_order, max_iters)`` from the options (torchdiffeq's names and defaults)."""
    from ._options import num as _num
    if "implicit" in options:
        if not implicit:
            raise ValueError("options['implicit'] is not an option of 'explicit_adams' (it is always explicit); "
                             "use method='implicit_adams'")
        implicit = options["implicit"]
        if not isinstance(implicit, bool):
            raise TypeError(f"options['implicit'] must be True or False, got {implicit!r}")
    max_order = _num(options, "max_order", MAX_ORDER, lo=1, hi=MAX_ORDER, integer=True)
    max_iters = _num(options, "max_iters", MAX_ITERS, lo=1, integer=True)
    if max_order < MIN_ORDER:
        warnings.warn(f"options['max_order'] ({max_order}) is below {MIN_ORDER}, so the Adams method reduces to rk4",
                      stacklevel=4)
    return implicit, max_order, max_iters


def _rk4_increment(f: FlatFunc, t0, t1, h, hy, y, k1, perturb: bool) -> torch.Tensor:
    """Kutta's 3/8 rule (the ``rk4`` method's tableau) from ``k1 = f(t0, y)``."""
    k2 = f(t0 + h / 3, y + hy * k1 / 3)
    k3 = f(t0 + 2 * h / 3, y + hy * (k2 - k1 / 3))
    k4 = f(t1, y + hy * (k1 - k2 + k3), perturb=-1 if perturb else 0)
    return (k1 + 3 * (k2 + k3) + k4) * (hy / 8)


def _converged(dy_old: torch.Tensor, dy: torch.Tensor, rtol, atol) -> bool:
    """Successive corrector increments agree to the tolerances (max norm); one host sync."""
    scale = atol + rtol * torch.maximum(dy_old.abs(), dy.abs())
    return bool(((dy_old - dy).abs() / scale).amax() < 1)


class AdamsStepper:
    """One solve's Adams state: the derivative history and the formulas' weights per order."""

    def __init__(self, f: FlatFunc, implicit: bool, max_order: int, max_iters: int, rtol, atol, perturb: bool):
        self.f = f
        self.implicit = implicit
        self.max_iters = max_iters
        self.rtol, self.atol = rtol, atol
        self.perturb = perturb
        self.kmax = max_order - 1
        self.history: deque = deque(maxlen=max(self.kmax, 0))
        self.n_unconverged = 0

    def step(self, t0, t1, y):
        """One step ``[t0, t1]`` (``[1]`` integration times) from ``y [1, N]``: ``(y1, f0)``."""
        f = self.f
        h = t1 - t0
        hy = h.to(y.dtype)
        f0 = f(t0, y, perturb=1 if self.perturb else 0)
        if self.history.maxlen:
            self.history.appendleft(f0)
        k = min(len(self.history), self.kmax)
        if k < MIN_ORDER - 1:
            return y + _rk4_increment(f, t0, t1, h, hy, y, f0, self.perturb), f0
        hist = list(self.history)[:k]
        dy = hy * sum(c * fj for c, fj in zip(adams_coefficients(k, False), hist))
        if not self.implicit:
            return y + dy, f0
        am = adams_coefficients(k + 1, True)
        delta = hy * sum(c * fj for c, fj in zip(am[1:], hist))
        ok = False
        for _ in range(self.max_iters):
            dy_old = dy
            f1 = f(t1, y + dy, perturb=-1 if self.perturb else 0)
            dy = (hy * am[0]) * f1 + delta
            ok = _converged(dy_old, dy, self.rtol, self.atol)
            if ok:
                break
        if not ok:
            self.n_unconverged += 1
            warnings.warn("implicit_adams: the corrector's functional iteration did not converge within "
                          f"options['max_iters']={self.max_iters} at t={float(t0 * f.sign):.17g}; the solution may be "
                          "inaccurate (use a smaller step or raise max_iters)", RuntimeWarning, stacklevel=5)
            self.history.pop()
        return y + dy, f0


def solve_adams(f: FlatFunc, y0: torch.Tensor, tau: torch.Tensor, grid: torch.Tensor, options: dict, implicit: bool,
                rtol, atol, interp: str, perturb: bool, stats: st.SolveStats) -> torch.Tensor:
    """Integrate on ``grid`` ([M] increasing, from ``tau[0]`` to ``tau[-1]``); return outputs ``[T, 1, N]``.

    Outputs between grid points are interpolated as in ``solve_fixed`` (linear, or cubic Hermite with one extra
    evaluation at the step's end).
    """
    from ._fixed import outputs_between  # here: the registry imports this module, and _fixed imports the backends

    implicit, max_order, max_iters = parse_adams_options(options, implicit)
    stepper = AdamsStepper(f, implicit, max_order, max_iters, rtol, atol, perturb)
    grid_v = grid.detach().tolist()
    tau_v = tau.detach().tolist()
    stats.n_host_syncs += 2
    T = len(tau_v)
    outs = [y0]
    j = 1
    y = y0
    for s in range(len(grid_v) - 1):
        if j >= T:
            break
        t0, t1 = grid[s : s + 1], grid[s + 1 : s + 2]
        if f.callbacks is not None:
            f.callbacks.step(t0, y, t1 - t0)
        y1, f0 = stepper.step(t0, t1, y)
        stats.n_accepted += 1
        j = outputs_between(f, interp, outs, tau, tau_v, j, grid_v[s + 1], t0, t1, t1 - t0, y, f0, y1)
        y = y1
    stats.n_steps = stats.n_accepted
    stats.backend = "torch"
    if stepper.n_unconverged:
        stats.messages.append(f"implicit_adams: the corrector did not converge in {stepper.n_unconverged} step(s)")
    return torch.stack(outs, dim=0)



def run_adams(p, y0_flat: torch.Tensor, y0, t) -> torch.Tensor:
    """A prepared ``odeint`` call (``fastnode._odeint.Problem``) with an Adams method: ``[T, 1, N]``."""
    from ._odeint import fixed_grid

    cfg = p.config
    return solve_adams(p.f, y0_flat, p.tau, fixed_grid(p, y0, t), p.options, p.solver.implicit, p.rtol, p.atol,
                       cfg.interp, cfg.perturb, p.stats)
