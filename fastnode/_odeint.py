"""``odeint``: the torchdiffeq-compatible entry point."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _stats as st
from ._adaptive import solve_adaptive
from ._callbacks import StepCallbacks, callbacks_of
from ._event_fn import combine_event_fn
from ._fixed import check_grid, solve_fixed, step_size_grid
from ._fixed_events import solve_fixed_event
from ._problem import (
    FlatFunc,
    StateSpec,
    _choice,
    _flag,
    _num,
    check_func,
    check_options,
    check_t,
    check_times_option,
    check_tol,
    check_y0,
    time_dtype_of,
)
from .backends import get_backend
from .backends.torch_ops import ControllerConfig, RMSNorm
from .solvers import get_solver


def _make_norm(options: dict, spec):
    """The error norm on the flat scaled error ``[G, N] -> [G]``.

    Default: RMS over the state; for tuple states the max over tensors of each tensor's RMS (torchdiffeq's
    mixed norm). A user ``norm`` receives the error shaped like the state (a tuple for tuple states; with
    the batch dimension in per-sample mode, where it must return ``[B]``).
    """
    user = options.get("norm")
    segments = spec.segments if spec.is_tuple else None
    if user is None:
        return RMSNorm(segments)
    if not callable(user):
        raise TypeError(f"options['norm'] must be callable (norm(error) -> scalar), got {type(user).__name__}")

    def norm(x):
        v = user(spec.unflatten(x))
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
        if v.numel() != spec.batch:
            raise ValueError(f"options['norm'] returned {v.numel()} values, expected "
                             f"{'one per sample (' + str(spec.batch) + ')' if spec.per_sample else 'a scalar'}")
        return v.reshape(spec.batch).abs()

    return norm


@dataclass
class Prepared:
    """A checked and normalised ``odeint`` call: everything the solver loops need."""

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

    @property
    def per_sample(self) -> bool:
        return self.spec.per_sample


def prepare(func, y0, t, rtol, atol, method, options, event_fn) -> Prepared:
    """Check every argument of an ``odeint`` call (clear errors naming the argument) and normalise it."""
    check_func(func)
    solver = get_solver(method)
    method = method or "dopri5"
    options = check_options(options, solver.adaptive, method, valid=getattr(solver, "valid_options", None))
    per_sample = _flag(options, "per_sample", False)
    if per_sample and not solver.adaptive:
        raise ValueError(f"options['per_sample']=True needs an adaptive method (per-sample step control); "
                         f"{method!r} is a fixed-grid method")
    if event_fn is not None and not callable(event_fn):
        raise TypeError(f"event_fn must be callable as event_fn(t, y), got {type(event_fn).__name__}")
    if event_fn is not None and method == "scipy_solver":
        raise ValueError("event_fn is not supported with method='scipy_solver' (as in torchdiffeq)")
    spec = check_y0(y0, per_sample)
    event_fn = combine_event_fn(event_fn, spec.batch, per_sample)  # vector event_fn: first crossing of any
    tdt = time_dtype_of(options)
    tau, sign = check_t(t, spec, tdt, event=event_fn is not None)
    rtol_v = check_tol("rtol", rtol, spec)
    atol_v = check_tol("atol", atol, spec)
    ops = get_backend(options.get("backend", "auto"), spec.device)
    f = FlatFunc(func, spec, sign)
    f.callbacks = StepCallbacks.find(func, spec, sign, callbacks_of(solver), method)
    stats = st.SolveStats(method=method, per_sample=per_sample)
    return Prepared(func, spec, tau, sign, method, solver, options, rtol_v, atol_v, ops, f, stats, event_fn)


def odeint(func: Callable, y0, t: torch.Tensor, *, rtol=1e-7, atol=1e-9, method: str | None = None,
           options: dict | None = None, event_fn: Callable | None = None):
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0`` and return ``y`` at every time in ``t``.

    Drop-in for ``torchdiffeq.odeint`` (same arguments, options and return shapes); differentiable by
    backpropagation through the solver.

    Args:
        func: ``func(t, y)`` returning ``dy/dt`` shaped like ``y`` (a tuple for tuple states). ``t`` is a 0-d
            tensor in the state's dtype, or ``[B]`` in per-sample mode.
        y0: initial state, a real or complex floating tensor of any shape (0-d included) or a tuple of them.
            Per-sample mode: ``[B, ...]``.
        t: [T] output times, strictly increasing or decreasing; per-sample mode also accepts ``[B, T]``.
        rtol, atol: relative/absolute tolerance: numbers, tensors broadcastable to the state, or tuples
            (one per tensor of a tuple state).
        method: ``dopri5`` (default), ``tsit5``, ``bosh3``, ``dopri8``, ``fehlberg2``, ``adaptive_heun``;
            fixed grid: ``euler``, ``midpoint``, ``heun2``, ``heun3``, ``rk4``, ``explicit_adams``,
            ``implicit_adams`` (alias ``fixed_adams``); ``scipy_solver`` (``scipy.integrate.solve_ivp``, no
            gradients).
        options: torchdiffeq's options (``first_step``, ``safety``, ``ifactor``, ``dfactor``,
            ``max_num_steps``, ``step_t``, ``jump_t``, ``min_step``, ``max_step``, ``norm``, ``dtype``; fixed grid:
            ``step_size``, ``grid_constructor``, ``interp``, ``perturb``; Adams: also ``max_order``, ``max_iters``;
            ``scipy_solver``: ``solver``, ``min_step``, ``max_step``) plus ``per_sample`` (bool),
            ``on_failure`` (``"raise"``/``"return"``), ``controller`` (``"i"``/``"pi"``), ``pi_alpha``,
            ``pi_beta`` and ``backend`` (``"auto"``/``"torch"``). Unknown options raise ``ValueError``.
        event_fn: ``event_fn(t, y)``; the solve stops where it crosses zero (only ``t[0]`` is used). Several
            values (per sample: ``[B, K]``): at the first crossing of any, as torchdiffeq combines them.
            Fixed-grid methods step by ``options["step_size"]`` (required) until the crossing.

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
        return result_to_user(p, run_fixed(p, p.spec.flatten(y0, "y0"), y0, t))
    finally:
        p.stats.nfe = p.f.nfe


@dataclass
class AdaptiveConfig:
    """Parsed adaptive-solver options (everything ``solve_adaptive`` takes besides the problem)."""

    ctrl: ControllerConfig
    first_step: float | None
    max_num_steps: int
    on_failure: str
    step_t: torch.Tensor | None
    jump_t: torch.Tensor | None


def parse_adaptive_options(options: dict, tableau, sign: float, tdt, device) -> AdaptiveConfig:
    min_step = _num(options, "min_step", 0.0, lo=0.0)
    max_step = _num(options, "max_step", float("inf"), lo=0.0, lo_open=True)
    if max_step < min_step:
        raise ValueError(f"options['max_step'] ({max_step}) is smaller than options['min_step'] ({min_step})")
    ctrl = ControllerConfig(
        order=tableau.order,
        safety=_num(options, "safety", 0.9, lo=0.0, hi=1.0, lo_open=True),
        ifactor=_num(options, "ifactor", 10.0, lo=1.0),
        dfactor=_num(options, "dfactor", 0.2, lo=0.0, hi=1.0, lo_open=True),
        min_step=min_step,
        max_step=max_step,
        kind=_choice(options, "controller", "i", ("i", "pi")),
        pi_alpha=_num(options, "pi_alpha", 0.7, lo=0.0),
        pi_beta=_num(options, "pi_beta", 0.4, lo=0.0),
    )
    first_step = options.get("first_step")
    if first_step is not None:
        first_step = _num(options, "first_step", None, lo=0.0, lo_open=True)
    max_num_steps = _num(options, "max_num_steps", 2**31 - 1, lo=1, integer=True)
    on_failure = _choice(options, "on_failure", "raise", ("raise", "return"))
    step_t = check_times_option(options, "step_t", sign, tdt, device)
    jump_t = check_times_option(options, "jump_t", sign, tdt, device)
    if step_t is not None and jump_t is not None and step_t.numel() and jump_t.numel():
        common = set(step_t.tolist()) & set(jump_t.tolist())
        if common:
            raise ValueError(f"options['step_t'] and options['jump_t'] both contain the time(s) "
                             f"{sorted(x * sign for x in common)}; a time may be in only one of them")
    return AdaptiveConfig(ctrl, first_step, max_num_steps, on_failure, step_t, jump_t)


def run_adaptive(p: Prepared, y0_flat: torch.Tensor):
    """Flat result: ``out [T, G, N]``, or with ``event_fn`` ``(event_tau [G] (no grad), out [2, G, N])``."""
    spec, f, event_fn = p.spec, p.f, p.event_fn
    tableau = p.solver.tableau
    cfg = parse_adaptive_options(p.options, tableau, p.sign, p.tau.dtype, spec.device)
    norm = _make_norm(p.options, spec)

    flat_event = None if event_fn is None else _flat_event(p)
    return solve_adaptive(f, spec, y0_flat, p.tau, tableau, p.ops, cfg.ctrl, p.rtol, p.atol, norm,
                          first_step=cfg.first_step, max_num_steps=cfg.max_num_steps, step_t=cfg.step_t,
                          jump_t=cfg.jump_t, on_failure=cfg.on_failure, event_fn=flat_event, stats=p.stats)


def _flat_event(p: Prepared):
    """The event function on the flat state: ``(tau [G], y [G, N]) -> [G]`` in the time dtype."""
    spec, f, event_fn = p.spec, p.f, p.event_fn

    def flat_event(tau_g, y_flat):
        v = event_fn(f.user_time(tau_g), spec.unflatten(y_flat))
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"event_fn must return a tensor, got {type(v).__name__}")
        if v.numel() != spec.batch:
            raise ValueError(f"event_fn returned {v.numel()} values; expected "
                             f"{'one per sample' if spec.per_sample else 'one'}")
        return v.reshape(spec.batch).to(tau_g.dtype)

    return flat_event


def result_to_user(p: Prepared, res):
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


def run_fixed(p: Prepared, y0_flat: torch.Tensor, y0, t) -> torch.Tensor:
    """Flat fixed-grid solve: ``[T, 1, N]``. ``y0``, ``t`` as the user gave them (for ``grid_constructor``)."""
    if p.event_fn is not None:  # (event_tau [1], out [2, 1, N]), steps of options['step_size'] until the event
        return solve_fixed_event(p, y0_flat, _flat_event(p))
    run = getattr(p.solver, "run", None)
    if run is not None:  # a method that is no Butcher tableau (Adams, scipy): its own module solves
        return run(p, y0_flat, y0, t)
    grid, interp, perturb = fixed_grid(p, y0, t)
    return solve_fixed(p.f, y0_flat, p.tau, grid, p.solver.tableau, p.ops, interp, perturb, p.stats)


def fixed_grid(p: Prepared, y0, t) -> tuple[torch.Tensor, str, bool]:
    """The grid (integration time, ``[M]``), ``interp`` and ``perturb`` of a fixed-grid call."""
    options, tau, sign, func = p.options, p.tau, p.sign, p.func
    step_size = options.get("step_size")
    gc = options.get("grid_constructor")
    interp = _choice(options, "interp", "linear", ("linear", "cubic"))
    perturb = _flag(options, "perturb", False)
    if step_size is not None and gc is not None:
        raise ValueError("options['step_size'] and options['grid_constructor'] are mutually exclusive")
    if step_size is not None:
        step_size = _num(options, "step_size", None, lo=0.0, lo_open=True)
        grid = step_size_grid(tau, step_size) if tau.numel() > 1 else tau
    elif gc is not None:
        if not callable(gc):
            raise TypeError(f"options['grid_constructor'] must be callable, got {type(gc).__name__}")
        grid = check_grid(gc(func, y0, t), tau, sign)
    else:
        grid = tau
    return grid, interp, perturb
