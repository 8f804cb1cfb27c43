"""``odeint``: the torchdiffeq-compatible entry point; ``odeint_event``: gradients through the event time."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _stats as st
from ._adaptive import AdaptiveProblem, solve_adaptive
from ._callbacks import StepCallbacks, callbacks_of
from ._event_fn import combine_event_fn
from ._fixed import check_grid, solve_fixed, step_size_grid
from ._fixed_events import solve_fixed_event
from ._options import (
    AdaptiveConfig,
    FixedConfig,
    check_options,
    flag,
    make_norm,
    parse_adaptive_options,
    parse_fixed_options,
    plain_options_key,
    time_dtype_of,
)
from ._problem import (
    LOW_PRECISION,
    FlatFunc,
    StateSpec,
    check_func,
    check_t,
    check_tol,
    check_tol_pair,
    check_y0,
    check_y0_values,
    tolerance_floor,
)
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


# Checked calls, for the next call with the same arguments but func and y0's values (a training loop's): only those
# are checked again. Keyed by y0's layout, the very same t tensor (its version and storage: an in-place change or a
# new t misses) and plain tolerances, method and options; each entry keeps its t alive, so the key stays its own.
_PREPARED: dict = {}


def _prepared_key(y0, t, rtol, atol, method, options, event_fn, widen: bool):
    """The cache key of a call that can reuse a checked one, else None (tuple or complex states, tensors among the
    tolerances or options, an event function, times that need gradients)."""
    if (type(y0) is not torch.Tensor or y0.is_complex() or event_fn is not None or type(t) is not torch.Tensor
            or t.requires_grad or type(rtol) not in (float, int) or type(atol) not in (float, int)
            or not (method is None or type(method) is str) or not (options is None or type(options) is dict)):
        return None
    opts = plain_options_key(options)
    if opts is None:
        return None
    return (y0.shape, y0.dtype, y0.device, id(t), t._version, t.data_ptr(), t.shape, t.stride(), t.dtype, t.device,
            type(rtol), rtol, type(atol), atol, method, opts, widen)


def prepare(func, y0, t, rtol, atol, method, options, event_fn, widen: bool = True) -> Problem:
    """Check every argument of an ``odeint`` call (clear errors naming the argument) and normalise it; a call that
    repeats a checked one (``_prepared_key``) checks only ``func`` and y0's values again.

    ``widen``: integrate float16/bfloat16 states in float32 (``StateSpec.work_dtype``); ``odeint_adjoint`` does not.
    """
    key = _prepared_key(y0, t, rtol, atol, method, options, event_fn, widen)
    hit = None if key is None else _PREPARED.get(key)
    if hit is not None and hit[0] is t:
        return _renewed(hit[1], hit[2], func, y0)
    p, floor_msg = _prepare(func, y0, t, rtol, atol, method, options, event_fn, widen)
    if key is not None:
        if len(_PREPARED) >= 16:
            _PREPARED.clear()
        # The template keeps no func (nor its module's parameters) alive.
        _PREPARED[key] = (t, dataclasses.replace(p, func=None, f=None, stats=None), floor_msg)
    return p


def _renewed(p: Problem, floor_msg: str | None, func, y0) -> Problem:
    """A checked call's Problem for a new ``func`` and y0 of the same layout: fresh evaluation counter, callbacks and
    statistics; y0's values and ``func`` checked."""
    check_func(func)
    check_y0_values((y0,), False)
    if floor_msg is not None:
        warnings.warn(f"fastnode: {floor_msg}", RuntimeWarning, stacklevel=4)
    f, stats = _per_call(func, p.spec, p.sign, p.solver, p.method, floor_msg)
    return Problem(func, p.spec, p.tau, p.sign, p.method, p.solver, p.options, p.rtol, p.atol, p.ops, f, stats,
                   p.event_fn, p.config, p.norm)


def _per_call(func, spec: StateSpec, sign: float, solver, method: str, floor_msg: str | None):
    """``(f, stats)``, what every call has of its own: func seen by the solver (its evaluation counter and torchdiffeq
    step callbacks) and fresh statistics (with the tolerance floor's message)."""
    f = FlatFunc(func, spec, sign)
    f.callbacks = StepCallbacks.find(func, spec, sign, callbacks_of(solver), method)
    stats = st.SolveStats(method=method, per_sample=spec.per_sample)
    if floor_msg is not None:
        stats.messages.append(floor_msg)
    return f, stats


def _prepare(func, y0, t, rtol, atol, method, options, event_fn, widen: bool) -> tuple[Problem, str | None]:
    """``prepare`` without the cache: ``(problem, the tolerance floor's message or None)``."""
    check_func(func)
    solver = get_solver(method)
    method = method or "dopri5"
    options = check_options(options, solver.adaptive, method, valid=getattr(solver, "valid_options", None))
    per_sample = flag(options, "per_sample", False)
    if per_sample and not solver.adaptive:
        raise ValueError(f"options['per_sample']=True needs an adaptive method (per-sample step control); "
                         f"{method!r} is a fixed-grid method")
    if event_fn is not None and not callable(event_fn):
        raise TypeError(f"event_fn must be callable as event_fn(t, y), got {type(event_fn).__name__}")
    if event_fn is not None and method == "scipy_solver":
        raise ValueError("event_fn is not supported with method='scipy_solver' (as in torchdiffeq)")
    spec = check_y0(y0, per_sample)
    event_fn = combine_event_fn(event_fn, spec.batch, per_sample)  # vector event_fn: first crossing of any
    if widen and spec.dtype in LOW_PRECISION:
        spec.work_dtype = torch.float32
    if event_fn is not None and spec.is_empty:
        raise ValueError("y0 has no elements: an event solve needs a state for event_fn to watch")
    tdt = time_dtype_of(options)
    tau, sign = check_t(t, spec, tdt, event=event_fn is not None)
    rtol_v = check_tol("rtol", rtol, spec)
    atol_v = check_tol("atol", atol, spec)
    floor_msg = None
    if solver.adaptive:
        check_tol_pair(rtol_v, atol_v)
        rtol_v, floor_msg = tolerance_floor(rtol_v, spec.dtype)
        if floor_msg is not None:
            warnings.warn(f"fastnode: {floor_msg}", RuntimeWarning, stacklevel=4)
    ops = get_backend(options.get("backend", "auto"), spec.device)
    f, stats = _per_call(func, spec, sign, solver, method, floor_msg)
    if solver.adaptive:
        config = parse_adaptive_options(options, solver.tableau, sign, tau.dtype, spec.device)
        norm = make_norm(options, spec)
    else:
        config, norm = parse_fixed_options(options), None
    return Problem(func, spec, tau, sign, method, solver, options, rtol_v, atol_v, ops, f, stats, event_fn, config,
                   norm), floor_msg


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
            ``pi_beta``, ``backend`` (``"auto"``/``"torch"``), and for adaptive methods ``compile`` (``True`` or a
            ``torch.compile`` mode: the whole step, ``func`` included, runs as one compiled program; see
            ``fastnode._compiled``) with ``steps_per_sync`` (compiled steps per host transfer; default adaptive).
            Unknown options raise ``ValueError``.
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
    if p.spec.is_empty:
        return empty_solution(p, y0)
    try:
        if p.solver.adaptive:
            res = run_adaptive(p, p.spec.flatten(y0, "y0").to(p.spec.work))
            return result_to_user(p, res)
        return result_to_user(p, run_fixed(p, p.spec.flatten(y0, "y0").to(p.spec.work), y0, t))
    finally:
        p.stats.nfe = p.f.nfe


def empty_solution(p: Problem, y0):
    """A state with no elements has nothing to integrate: its (empty) value at every output time; ``func`` is
    not called."""
    y0_flat = p.spec.flatten(y0, "y0")
    G = y0_flat.shape[0]
    p.stats.status = torch.zeros(G, dtype=torch.int64, device=y0_flat.device)
    p.stats.backend = "none"
    return _to_user(p.spec, y0_flat.unsqueeze(0).expand(p.tau.shape[-1], G, 0).clone())


def run_adaptive(p: Problem, y0_flat: torch.Tensor):
    """Flat result: ``out [T, G, N]``, or with ``event_fn`` ``(event_tau [G] (no grad), out [2, G, N])``."""
    flat_event = None if p.event_fn is None else _flat_event(p)
    problem = AdaptiveProblem(p.spec, y0_flat, p.tau, p.solver.tableau, p.config, p.rtol, p.atol, p.norm)
    return solve_adaptive(p.f, problem, p.ops, event_fn=flat_event, stats=p.stats)


def _flat_event(p: Problem):
    """The event function on the flat state: ``(tau [G], y [G, N]) -> [G]`` in the time dtype."""
    spec, f, event_fn = p.spec, p.f, p.event_fn

    def flat_event(tau_g, y_flat):
        v = event_fn(f.user_time(tau_g), spec.unflatten(y_flat.to(spec.dtype)))
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"event_fn must return a tensor, got {type(v).__name__}")
        if v.numel() != spec.batch:
            raise ValueError(f"event_fn returned {v.numel()} values; expected "
                             f"{'one per sample' if spec.per_sample else 'one'}")
        return v.reshape(spec.batch).to(tau_g.dtype)

    return flat_event


def result_to_user(p: Problem, res):
    if p.event_fn is None:
        return _to_user(p.spec, res)
    ev_tau, sol = res
    ev_t = (ev_tau * p.sign).to(p.spec.dtype)
    if not p.spec.per_sample:
        ev_t = ev_t.reshape(())
    return ev_t, _to_user(p.spec, sol)


def _to_user(spec, out):
    """[T, G, N] -> [T, *shape] (tuple for tuple states), in the state's dtype."""
    T = out.shape[0]
    out = out.to(spec.dtype)
    return spec.unflatten(out, lead=(T,)) if spec.per_sample else spec.unflatten(out[:, 0], lead=(T,))


def run_fixed(p: Problem, y0_flat: torch.Tensor, y0, t) -> torch.Tensor:
    """Flat fixed-grid solve: ``[T, 1, N]``. ``y0``, ``t`` as the user gave them (for ``grid_constructor``).

    With ``event_fn``: ``(event_tau [1], out [2, 1, N])`` (steps of ``options['step_size']`` until the event)."""
    if p.event_fn is not None:
        return solve_fixed_event(p, y0_flat, _flat_event(p))
    run = getattr(p.solver, "run", None)
    if run is not None:  # a method that is no Butcher tableau (Adams, scipy): its own module solves
        return run(p, y0_flat, y0, t)
    cfg = p.config
    return solve_fixed(p.f, y0_flat, p.tau, fixed_grid(p, y0, t), p.solver.tableau, p.ops, cfg.interp, cfg.perturb,
                       p.stats)


def fixed_grid(p: Problem, y0, t) -> torch.Tensor:
    """The grid (integration time, ``[M]``) of a fixed-grid call: ``step_size``, ``grid_constructor`` or ``t``."""
    cfg, tau = p.config, p.tau
    if cfg.step_size is not None:
        return step_size_grid(tau, cfg.step_size) if tau.numel() > 1 else tau
    if cfg.grid_constructor is not None:
        return check_grid(cfg.grid_constructor(p.func, y0, t), tau, p.sign)
    return tau


# ---------------------------------------------------------------------------------------------------------------
# Events with gradients through the event time
# ---------------------------------------------------------------------------------------------------------------

def odeint_event(func: Callable, y0, t0: torch.Tensor, *, event_fn: Callable, reverse_time: bool = False,
                 odeint_interface: Callable | None = None, **kwargs):
    """Solve from ``t0`` until ``event_fn(t, y)`` crosses zero; differentiable through the event time.

    As torchdiffeq's ``odeint_event``: returns ``(event_t, solution)`` with ``solution`` the states at ``t0`` and
    at the event. Gradients of both w.r.t. ``y0``, ``t0``, the parameters of ``func`` and any tensors
    ``event_fn`` uses come from the implicit function theorem: with ``c(t*, y(t*)) = 0``,
    ``dt* = -(dc/dy . dy|_t + dc/dphi . dphi) / (dc/dt + dc/dy . f)``, and ``y(t*)`` moves by ``f(t*, y*) dt*``
    on top of its fixed-time change.

    Args:
        func: ``func(t, y)``.
        y0: initial state (tuple allowed).
        t0: start time, a 0-d (or one-element) tensor; per-sample mode (``options={"per_sample": True}``):
            ``[B]``, one start time per sample.
        event_fn: ``event_fn(t, y)`` returning a scalar (``[B]`` per sample); the event is its zero crossing.
        reverse_time: integrate towards decreasing time.
        odeint_interface: ``fastnode.odeint`` (default, backpropagation) or ``fastnode.odeint_adjoint``.
        **kwargs: passed to ``odeint_interface`` (``rtol``, ``atol``, ``method``, ``options``, adjoint arguments).

    Example:
        >>> import torch
        >>> from fastnode import odeint_event
        >>> y0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
        >>> t_ev, sol = odeint_event(lambda t, y: -y, y0, torch.tensor(0.0, dtype=torch.float64),
        ...                          event_fn=lambda t, y: y[0] - 0.5)
        >>> round(float(t_ev.detach()), 6) == round(float(torch.log(torch.tensor(2.0))), 6)
        True
        >>> t_ev.backward(); round(float(y0.grad), 6)  # d/dy0 log(y0 / 0.5) = 1 / y0
        1.0
    """
    if odeint_interface is None:
        odeint_interface = odeint
    if not callable(event_fn):
        raise TypeError(f"event_fn must be callable as event_fn(t, y), got {type(event_fn).__name__}")
    if not isinstance(t0, torch.Tensor):
        raise TypeError(f"t0 must be a tensor (0-d, or [B] per sample), got {type(t0).__name__}")
    if not isinstance(reverse_time, bool):
        raise TypeError(f"reverse_time must be True or False, got {reverse_time!r}")
    per_sample = bool((kwargs.get("options") or {}).get("per_sample", False))
    first = y0[0] if isinstance(y0, (tuple, list)) and y0 else y0
    if isinstance(first, torch.Tensor):  # else odeint_interface names the bad y0
        event_fn = combine_event_fn(event_fn, first.shape[0] if per_sample and first.dim() else 1, per_sample)
    t = _event_times(t0, reverse_time, per_sample)
    event_t, solution = odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)

    is_tuple = isinstance(solution, (tuple, list))
    state = tuple(s[-1] for s in solution) if is_tuple else solution[-1]
    event_t, state = _reroute_event_gradient(func, event_fn, event_t, state, per_sample)
    if is_tuple:
        solution = tuple(torch.cat([s[:-1], x.unsqueeze(0)], dim=0) for s, x in zip(solution, state))
    else:
        solution = torch.cat([solution[:-1], state.unsqueeze(0)], dim=0)
    return event_t, solution


def _event_times(t0: torch.Tensor, reverse_time: bool, per_sample: bool) -> torch.Tensor:
    """``t`` for the event solve: ``t0`` and a second time in the direction of integration (only ``t[0]`` is used)."""
    if per_sample and t0.numel() > 1:
        if t0.dim() != 1:
            raise ValueError(f"per-sample t0 must be [B], got shape {tuple(t0.shape)}")
        step = -1.0 if reverse_time else 1.0
        return torch.stack([t0, t0.detach() + step], dim=1)
    if t0.numel() != 1:
        raise ValueError(f"t0 must hold one time (or [B] with options['per_sample']=True), got shape "
                         f"{tuple(t0.shape)}")
    t0f = t0.reshape(-1)
    return torch.cat([t0f, t0f.detach() + (-1.0 if reverse_time else 1.0)])


def _reroute_event_gradient(func, event_fn, event_t, state, per_sample: bool, move_state: bool = True):
    """Event time and state whose gradients follow the implicit function theorem (values unchanged).

    ``move_state=False`` leaves the state's gradient at the fixed event time (``odeint_adjoint``'s outputs)."""
    te = event_t.detach()
    is_tuple = isinstance(state, tuple)
    parts = state if is_tuple else (state,)

    def per(x):  # reduce everything but the batch dim (per-sample) or everything (shared)
        return x.reshape(x.shape[0], -1).sum(dim=1) if per_sample else x.sum()

    with torch.no_grad():
        f_val = func(te, tuple(x.detach() for x in parts) if is_tuple else parts[0].detach())
    f_parts = tuple(f_val) if isinstance(f_val, (tuple, list)) else (f_val,)
    # Partial derivatives of the event function at the event: dc/dt and dc/dy (detached).
    with torch.enable_grad():
        te_ = te.clone().requires_grad_(True)
        ys_ = tuple(x.detach().clone().requires_grad_(True) for x in parts)
        c0 = event_fn(te_, ys_ if is_tuple else ys_[0])
        if not isinstance(c0, torch.Tensor):
            raise TypeError(f"event_fn must return a tensor, got {type(c0).__name__}")
        grads = (torch.autograd.grad(c0.sum(), (te_, *ys_), allow_unused=True) if c0.requires_grad
                 else (None,) * (1 + len(ys_)))
    dcdt = torch.zeros_like(te) if grads[0] is None else grads[0]
    for g, fx in zip(grads[1:], f_parts):
        if g is not None:
            dcdt = dcdt + per(g * fx)
    # The live event function: its graph reaches y (fixed-time gradients from the solver) and event_fn's tensors.
    c = event_fn(te, state)
    if not c.requires_grad:
        return event_t, state
    c = c.reshape(dcdt.shape)
    # NOTE: value exactly te (c - c.detach() is 0); gradient -dc / (dc/dt)_total, the implicit function theorem.
    t_out = te - (c - c.detach()) / dcdt
    if not move_state:
        return t_out.to(event_t.dtype), state
    dt = t_out - te
    new = []
    for x, fx in zip(parts, f_parts):
        d = dt.reshape(-1, *([1] * (x.dim() - 1))) if per_sample else dt
        new.append(x + fx.detach() * d)
    return t_out.to(event_t.dtype), (tuple(new) if is_tuple else new[0])
