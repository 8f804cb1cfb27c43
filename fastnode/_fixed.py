"""Fixed-grid Runge-Kutta solvers (euler, midpoint, heun2, heun3, rk4) on the StepOps backend.

The grid is known before the loop starts (``t``, a ``step_size`` grid or a ``grid_constructor``), so the loop
makes no host syncs at all; outputs between grid points use linear or cubic Hermite interpolation.
"""

from __future__ import annotations

import math

import torch

from . import _stats as st
from ._problem import FlatFunc
from ._tableau import ButcherTableau
from .backends import for_recording
from .backends.base import StepOps


def step_size_grid(tau: torch.Tensor, step_size: float) -> torch.Tensor:
    """Grid ``tau0, tau0 + s, ...`` whose last point is replaced by ``tau[-1]`` (torchdiffeq's convention)."""
    start, end = tau[0], tau[-1]
    n = math.ceil((float(end.detach()) - float(start.detach())) / step_size + 1)
    n = max(n, 2)
    grid = torch.arange(n, dtype=tau.dtype, device=tau.device) * step_size + start
    return torch.cat([grid[:-1], tau[-1:]])


def solve_fixed(f: FlatFunc, y0: torch.Tensor, tau: torch.Tensor, grid: torch.Tensor, tableau: ButcherTableau,
                ops: StepOps, interp: str, perturb: bool, stats: st.SolveStats, hooks=None) -> torch.Tensor:
    """Integrate on ``grid`` (increasing, [M], from tau[0] to tau[-1]); return outputs [T, 1, N].

    ``hooks``: the adjoint's backward solve (``fastnode._adjoint.BackwardHooks``): ``grid`` then contains every
    output time, where ``hooks.land`` changes the state; the final state ``[1, N]`` is returned.
    """
    grid_v = grid.detach().tolist()
    tau_v = tau.detach().tolist()
    stats.n_host_syncs += 2
    T = len(tau_v)
    outs = [y0]
    j = 1
    y = y0
    one = torch.ones(1, dtype=torch.bool, device=y0.device)
    at_output = one  # the first step starts at an output time (the adjoint's hooks need to know)
    for s in range(len(grid_v) - 1):
        if j >= T:
            break
        t0, t1 = grid[s : s + 1], grid[s + 1 : s + 2]
        h = t1 - t0
        if f.callbacks is not None:
            f.callbacks.step(t0, y, h)
        k0 = f(t0, y, perturb=1 if perturb else 0)
        if s == 0:
            # Only now is it known whether this solve records an autograd graph (func's parameters may need grad).
            ops = for_recording(ops, torch.is_grad_enabled() and (y0.requires_grad or k0.requires_grad or
                                                                  grid.requires_grad or tau.requires_grad))
            stats.backend = ops.name
        K, y1 = _step(f, ops, tableau, y, k0, t0, t1, h, perturb, hooks, one, at_output)
        stats.n_accepted += 1
        if hooks is not None:
            at_output = torch.full_like(one, tau_v[j] == grid_v[s + 1])
            if tau_v[j] == grid_v[s + 1]:
                y1 = hooks.land(torch.full((1,), j, dtype=torch.int64, device=y.device), one, y1)
                j += 1
        else:
            j = outputs_between(f, interp, outs, tau, tau_v, j, grid_v[s + 1], t0, t1, h, y, ops.stage(K, 0), y1)
        y = y1
    stats.n_steps = stats.n_accepted
    if hooks is not None:
        return y
    return torch.stack(outs, dim=0)


def _step(f: FlatFunc, ops: StepOps, tableau: ButcherTableau, y, k0, t0, t1, h, perturb: bool, hooks, one,
          at_output):
    """One grid step from ``(t0, y)`` with first stage ``k0``: ``(K, y1)``. With ``perturb``, the first stage sees
    the right limit at ``t0`` (evaluated by the caller) and the stages at ``t1`` the left limit there."""
    hy = h.to(y.dtype)
    K = ops.set_stage(ops.new_stages(tableau, y), 0, k0)
    if hooks is not None:
        hooks.k1_evaluated(one, ops.stage(K, 0), at_output=at_output)
        hooks.begin_step(hy)
    for i in range(1, len(tableau.c)):
        yi = ops.rk_combine(y, K, hy, tableau.a[i])
        at_end = tableau.c[i] == 1.0
        ti = t1 if at_end else t0 + tableau.c[i] * h
        K = ops.set_stage(K, i, f(ti, yi, perturb=-1 if (perturb and at_end) else 0))
        if hooks is not None:
            hooks.stage_evaluated(i)
    y1 = ops.rk_combine(y, K, hy, tableau.b)
    if hooks is not None:
        hooks.end_step(one, one, one)
    return K, y1


def outputs_between(f: FlatFunc, interp: str, outs: list, tau, tau_v: list, j: int, t1_v: float, t0, t1, h, y, f0,
                    y1) -> int:
    """Append the outputs at ``tau[j:]`` up to ``t1`` (linear, or cubic Hermite through ``(y, f0)`` and ``(y1,
    f(t1, y1))``, evaluated once, between grid points); the next ``j``. Shared by the Runge-Kutta and Adams grids."""
    T = len(tau_v)
    f1 = None
    while j < T and tau_v[j] <= t1_v:
        if tau_v[j] == t1_v:
            outs.append(y1)
        else:
            theta = ((tau[j] - t0) / h).to(y.dtype)
            if interp == "linear":
                outs.append(y + theta * (y1 - y))
            else:
                if f1 is None:
                    f1 = f(t1, y1)
                outs.append(_hermite(y, f0, y1, f1, h.to(y.dtype), theta))
        j += 1
    return j


def _hermite(y0, f0, y1, f1, h, th):
    """Cubic Hermite interpolant through (y0, f0) and (y1, f1) at fraction ``th`` of the step ``h``."""
    th2, th3 = th * th, th * th * th
    h00 = 2 * th3 - 3 * th2 + 1
    h10 = th3 - 2 * th2 + th
    h01 = -2 * th3 + 3 * th2
    h11 = th3 - th2
    return h00 * y0 + (h10 * h) * f0 + h01 * y1 + (h11 * h) * f1


def check_grid(grid, tau: torch.Tensor, sign: float) -> torch.Tensor:
    """Validate a grid returned by ``grid_constructor`` (user time) and return it in integration time."""
    if not isinstance(grid, torch.Tensor) or grid.dim() != 1 or grid.numel() < 2:
        raise ValueError("options['grid_constructor'] must return a 1-D tensor of at least 2 times")
    if not grid.is_floating_point():
        raise TypeError(f"options['grid_constructor'] returned dtype {grid.dtype}; expected a floating tensor")
    g = grid.to(device=tau.device, dtype=tau.dtype) * sign
    if not bool((g[1:] > g[:-1]).all()):
        raise ValueError("options['grid_constructor'] must return times that move strictly in the direction of t")
    if float(g[0]) != float(tau[0]) or float(g[-1]) != float(tau[-1]):
        raise ValueError(f"options['grid_constructor'] must return a grid starting at t[0]={float(tau[0]) * sign} and "
                         f"ending at t[-1]={float(tau[-1]) * sign}; got [{float(g[0]) * sign}, {float(g[-1]) * sign}]")
    return g
