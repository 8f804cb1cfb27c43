"""``odeint``: the torchdiffeq-compatible entry point."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _stats as st
from ._adaptive import AdaptiveProblem, solve_adaptive
from ._fixed import check_grid, solve_fixed, step_size_grid
from ._options import (
    AdaptiveConfig,
    FixedConfig,
    check_options,
    flag,
    make_norm,
    parse_adaptive_options,
    parse_fixed_options,
    time_dtype_of,
)
from ._problem import FlatFunc, StateSpec, check_func, check_t, check_tol, check_y0
from .backends import get_backend
from .solvers import get_solver


@dataclass
class Problem:
    """A checked and normalised ``odeint`` call: everything the solver loops need, options parsed once."""

    func: Callable
    spec: StateSpec
    tau: torch.Tensor  # [T] or [G, T], increasing integration time (time dtype)
    sign: float  # t = sign * tau
    method: str
    solver: type
    options: dict
    rtol: torch.Tensor | float
    atol: torch.Tensor | float
    ops: object
    f: FlatFunc
    stats: st.SolveStats
    event_fn: Callable | None
    config: AdaptiveConfig | FixedConfig
    norm: Callable | None  # the error norm (adaptive methods)

    @property
    def per_sample(self) -> bool:
        return self.spec.per_sample


def prepare(func, y0, t, rtol, atol, method, options, event_fn) -> Problem:
    """Check every argument of an ``odeint`` call (clear errors naming the argument) and normalise it."""
    check_func(func)
    solver = get_solver(method)
    method = method or "dopri5"
    options = check_options(options, solver.adaptive, method)
    per_sample = flag(options, "per_sample", False)
    if per_sample and not solver.adaptive:
        raise ValueError(f"options['per_sample']=True needs an adaptive method (per-sample step control); "
                         f"{method!r} is a fixed-grid method")
    if event_fn is not None and not callable(event_fn):
        raise TypeError(f"event_fn must be callable as event_fn(t, y), got {type(event_fn).__name__}")
    if event_fn is not None and not solver.adaptive:
        raise ValueError(f"event_fn needs an adaptive method; {method!r} is a fixed-grid method")
    spec = check_y0(y0, per_sample)
    tdt = time_dtype_of(options)
    tau, sign = check_t(t, spec, tdt, event=event_fn is not None)
    rtol_v = check_tol("rtol", rtol, spec)
    atol_v = check_tol("atol", atol, spec)
    ops = get_backend(options.get("backend", "auto"), spec.device)
    f = FlatFunc(func, spec, sign)
    stats = st.SolveStats(method=method, per_sample=per_sample)
    if solver.adaptive:
        config = parse_adaptive_options(options, solver.tableau, sign, tau.dtype, spec.device)
        norm = make_norm(options, spec)
    else:
        config, norm = parse_fixed_options(options), None
    return Problem(func, spec, tau, sign, method, solver, options, rtol_v, atol_v, ops, f, stats, event_fn, config,
                   norm)


def odeint(func: Callable, y0, t: torch.Tensor, *, rtol=1e-7, atol=1e-9, method: str | None = None,
           options: dict | None = None, event_fn: Callable | None = None):
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0`` and return ``y`` at every time in ``t``.

    Drop-in for ``torchdiffeq.odeint`` (same arguments, options and return shapes); differentiable by
    backpropagation through the solver.

    Args:
        func: ``func(t, y)`` returning ``dy/dt`` shaped like ``y`` (a tuple for tuple states). ``t`` is a 0-d
            tensor in the state's dtype, or ``[B]`` in per-sample mode.
        y0: initial state, a floating tensor of any shape or a tuple of them. Per-sample mode: ``[B, ...]``.
        t: [T] output times, strictly increasing or decreasing; per-sample mode also accepts ``[B, T]``.
        rtol, atol: relative/absolute tolerance: numbers, tensors broadcastable to the state, or tuples
            (one per tensor of a tuple state).
        method: ``dopri5`` (default), ``tsit5``, ``bosh3``, ``dopri8``, ``fehlberg2``, ``adaptive_heun``;
            fixed grid: ``euler``, ``midpoint``, ``heun2``, ``heun3``, ``rk4``.
        options: torchdiffeq's options (``first_step``, ``safety``, ``ifactor``, ``dfactor``,
            ``max_num_steps``, ``step_t``, ``jump_t``, ``min_step``, ``max_step``, ``norm``, ``dtype``; fixed grid:
            ``step_size``, ``grid_constructor``, ``interp``, ``perturb``) plus ``per_sample`` (bool),
            ``on_failure`` (``"raise"``/``"return"``), ``controller`` (``"i"``/``"pi"``), ``pi_alpha``,
            ``pi_beta`` and ``backend`` (``"auto"``/``"torch"``). Unknown options raise ``ValueError``.
        event_fn: ``event_fn(t, y)``; the solve stops where it crosses zero (only ``t[0]`` is used).

    Returns:
        ``[T, *y0.shape]`` (a tuple of such for tuple states); with ``event_fn``: ``(event_t, solution)`` where
        ``solution`` holds the state at ``t[0]`` and at the event. As in torchdiffeq, ``event_t`` carries no
        gradient here and ``solution[-1]`` is differentiated at a fixed time; ``fastnode.odeint_event`` adds
        the gradients through the event time.

    Example:
        >>> import torch
        >>> from fastnode import odeint
        >>> y = odeint(lambda t, y: -y, torch.tensor([1.0], dtype=torch.float64), torch.linspace(0, 1, 3))
        >>> round(float(y[-1, 0]), 6) == round(float(torch.exp(torch.tensor(-1.0))), 6)
        True
    """
    p = prepare(func, y0, t, rtol, atol, method, options, event_fn)
    st._set_last(p.stats)
    try:
        if p.solver.adaptive:
            res = run_adaptive(p, p.spec.flatten(y0, "y0"))
            return result_to_user(p, res)
        return _to_user(p.spec, run_fixed(p, p.spec.flatten(y0, "y0"), y0, t))
    finally:
        p.stats.nfe = p.f.nfe


def run_adaptive(p: Problem, y0_flat: torch.Tensor):
    """Flat result: ``out [T, G, N]``, or with ``event_fn`` ``(event_tau [G] (no grad), out [2, G, N])``."""
    spec, f, event_fn = p.spec, p.f, p.event_fn

    flat_event = None
    if event_fn is not None:
        def flat_event(tau_g, y_flat):
            v = event_fn(f.user_time(tau_g), spec.unflatten(y_flat))
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"event_fn must return a tensor, got {type(v).__name__}")
            if v.numel() != spec.batch:
                raise ValueError(f"event_fn returned {v.numel()} values; expected "
                                 f"{'one per sample' if spec.per_sample else 'one (combine several events with min/max)'}")
            return v.reshape(spec.batch).to(tau_g.dtype)

    problem = AdaptiveProblem(spec, y0_flat, p.tau, p.solver.tableau, p.config, p.rtol, p.atol, p.norm)
    return solve_adaptive(f, problem, p.ops, event_fn=flat_event, stats=p.stats)


def result_to_user(p: Problem, res):
    if p.event_fn is None:
        return _to_user(p.spec, res)
    ev_tau, sol = res
    ev_t = (ev_tau * p.sign).to(p.spec.dtype)
    if not p.spec.per_sample:
        ev_t = ev_t.reshape(())
    return ev_t, _to_user(p.spec, sol)


def _to_user(spec, out):
    """[T, G, N] -> [T, *shape] (tuple for tuple states)."""
    T = out.shape[0]
    return spec.unflatten(out, lead=(T,)) if spec.per_sample else spec.unflatten(out[:, 0], lead=(T,))


def run_fixed(p: Problem, y0_flat: torch.Tensor, y0, t) -> torch.Tensor:
    """Flat fixed-grid solve: ``[T, 1, N]``. ``y0``, ``t`` as the user gave them (for ``grid_constructor``)."""
    cfg, tau = p.config, p.tau
    if cfg.step_size is not None:
        grid = step_size_grid(tau, cfg.step_size) if tau.numel() > 1 else tau
    elif cfg.grid_constructor is not None:
        grid = check_grid(cfg.grid_constructor(p.func, y0, t), tau, p.sign)
    else:
        grid = tau
    return solve_fixed(p.f, y0_flat, tau, grid, p.solver.tableau, p.ops, cfg.interp, cfg.perturb, p.stats)
