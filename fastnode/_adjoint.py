"""``odeint_adjoint``: gradients by solving the adjoint ODE backwards in time, memory constant in the steps.

The forward solve runs without autograd and keeps only the states at the output times. The backward solve
integrates the augmented state ``Z = [y, a]`` (flat ``[G, 2N]``) from ``t[-1]`` to ``t[0]`` in user time

    dy/dt = f(t, y),        da/dt = -a^T df/dy(t, y),        dA/dt = -a^T df/dtheta(t, y)

with ``a(t[-1]) = dL/dy(t[-1])``; ``A(t[0]) = dL/dtheta``. It is **one** continuous solve: steps land exactly
on every output time, where the output's cotangent is added to ``a``, ``y`` is reset to the forward solve's
value (as torchdiffeq does) and the derivative is re-evaluated; the step size carries across. torchdiffeq
instead restarts a solve (and its initial-step selection) on every output interval.

The parameter adjoint ``A`` is never part of the ODE state: nothing depends on it, so it is a quadrature
with the method's own weights, ``A += h * sum_j b_j * (-a_j^T df/dtheta at stage j)``, added only for
accepted steps. Two ways to get those vector-Jacobian products:

* shared step (one step size for the batch): each stage's ``torch.autograd.grad`` returns the state and the
  parameter parts together; the step's weighted sums are kept aside and added if the step is accepted. By
  default (the seminorm) their error estimate stays out of the error control: nothing feeds back from ``A``, and
  its integrand is made of ``y`` and ``a``, whose error is controlled. ``adjoint_options={"norm": "mixed"}``
  puts it in (torchdiffeq's default adjoint norm: max over parameter tensors of each scaled error's RMS).
  Measured with bench/adjoint_precision.py (gradient error against backward NFE, dopri5, rtol 1e-2 ... 1e-8; MLP,
  mlp-10, van der Pol, the ODENet block): at equal gradient error the seminorm takes 0.51-1.03x the mixed norm's
  backward evaluations (above 1 only van der Pol at rtol 1e-6: 1.03), e.g. on the MLP at rtol 1e-7 13 at error
  8.3e-8 where the mixed norm takes 31 at 1.7e-8 and torchdiffeq 32 at 1.6e-7: the parameter quadrature's
  elementwise relative error estimate dominates the mixed norm's step control there (at rtol 1e-5 one step over
  [0, 1] scores 1.5 for the parameters, 0.09 for [y, a]) while the gradient's actual error is 4.8e-6.
* per-sample step control: a parameter is shared by the batch, but each sample accepts or rejects on its
  own, after all stages were evaluated. ``vjp`` is linear in its cotangent, so per-sample weights
  ``h_b * b_j * accepted_b`` are folded into the cotangent of one deferred ``autograd.grad`` over the step's
  stage graphs, once the decisions are known. A rejected sample's stages get weight zero: they never reach
  ``A``. Stage 0 is the previous step's last evaluation (FSAL), whose weight depends on the *next* accepted
  step of each sample: it stays pending (graph kept) until every sample holding it has moved on. The state
  part of each stage is differentiated at once (it steers the solve). Error control is then per sample on
  ``[y, a]`` (a seminorm: the shared parameter adjoint has no per-sample error).

Time gradients need no time adjoint: moving an output time ``t_i`` (i > 0) only moves that output, so
``dL/dt_i = g_i . f(t_i, y_i)`` (the re-evaluation at the landing gives ``f``), and
``dL/dt_0 = -a(t_0) . f(t_0, y_0)`` with ``a`` the adjoint just after ``t_0``.

The dynamics and the two quadratures are in ``fastnode._adjoint_dynamics``; the options are checked once by
``fastnode._options.parse_adjoint_options``. This module runs the forward solve and orchestrates the backward one.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import _stats as st
from ._adaptive import AdaptiveProblem, solve_adaptive
from ._adjoint_dynamics import AugmentedFunc, BackwardHooks, PerSampleQuadrature, SharedQuadrature
from ._callbacks import StepCallbacks, callbacks_of
from ._fixed import check_grid, solve_fixed, step_size_grid
from ._odeint import Problem, _reroute_event_gradient, empty_solution, prepare, result_to_user, run_adaptive, run_fixed
from ._options import AdjointConfig, RMSNorm, make_norm, parse_adjoint_options
from ._problem import StateSpec
from .backends import get_backend


@dataclass
class _Plan:
    """Everything the adjoint's forward and backward need besides tensors."""

    p: Problem
    params: tuple
    cfg: AdjointConfig  # the backward solve's options, checked once by odeint_adjoint
    t_requires_grad: bool
    y0_user: object = None  # as given (a fixed-grid grid_constructor receives them)
    t_user: object = None


@dataclass
class _BackwardSolve:
    """One backward solve, set up: the augmented dynamics, its hooks and what the loop takes."""

    aug: AugmentedFunc
    hooks: BackwardHooks
    aug_spec: StateSpec
    z0: torch.Tensor  # [G, 2N] [y, a] at t[-1]
    tau_b: torch.Tensor  # [T] or [G, T] backward integration time, increasing
    ops: object
    rtol: torch.Tensor | float  # for [y, a]
    atol: torch.Tensor | float
    norm: Callable
    first_step: object  # None, a float or the forward's last step sizes [G]


def _forward(plan: _Plan, y0_flat: torch.Tensor):
    p = plan.p
    with torch.no_grad():
        if p.solver.adaptive:
            return run_adaptive(p, y0_flat)
        return run_fixed(p, y0_flat, plan.y0_user, plan.t_user)


def _backward(plan: _Plan, out: torch.Tensor, grad_out: torch.Tensor, tau_fwd: torch.Tensor):
    """One backward solve. ``out``, ``grad_out``: [T, G, N]; ``tau_fwd``: [T] or [G, T] (integration time).

    Returns ``(dL/dy0 [G, N], dL/dparams, dL/dt as [G, T] in user time or None)``.
    """
    T, G, N = out.shape
    if T == 1:
        return grad_out[0], [torch.zeros_like(q) for q in plan.params], (
            torch.zeros(G, 1, dtype=out.dtype, device=out.device) if plan.t_requires_grad else None)
    if getattr(plan.cfg.solver, "run", None) is not None:  # Adams, scipy: the augmented system, interval by interval
        from ._adjoint_plain import backward_plain

        return backward_plain(plan, out, grad_out, tau_fwd)
    bw = _backward_config(plan, out, grad_out, tau_fwd)
    z_end, grads_theta, f0 = _solve_backward(plan, bw)
    adj_y0 = z_end[:, N:]
    return adj_y0, grads_theta, _time_gradients(bw.hooks, f0, adj_y0)


def _backward_config(plan: _Plan, out: torch.Tensor, grad_out: torch.Tensor, tau_fwd: torch.Tensor) -> _BackwardSolve:
    """The backward solve's set-up from the forward's outputs ``out`` and their cotangents ``grad_out`` [T, G, N]."""
    p, cfg, spec = plan.p, plan.cfg, plan.p.spec
    G, N = out.shape[1], out.shape[2]
    tau_b = (-tau_fwd).flip(-1).contiguous()
    tau_b = tau_b.to(cfg.time_dtype)
    ops = get_backend(cfg.backend, spec.device, role="adjoint")
    aug_spec = StateSpec(False, [(G, 2 * N)], spec.per_sample, G, [2 * N], spec.dtype, spec.device)
    Y = out.flip(0)
    Gc = grad_out.flip(0)
    z0 = torch.cat([Y[0], Gc[0]], dim=1)
    # Tolerances: the state's for y and a; the parameter adjoint gets the smallest entry of a tensor tolerance.
    rtol_b, rtol_th = _tol_pair(cfg.rtol)
    atol_b, atol_th = _tol_pair(cfg.atol)
    aug, hooks = _dynamics(plan, aug_spec, Y, Gc, ops, (rtol_th, atol_th))
    norm = hooks.stash_norm if hooks.custom_norm is not None else _pair_norm(make_norm(p.options, spec), N)
    return _BackwardSolve(aug, hooks, aug_spec, z0, tau_b, ops, rtol_b, atol_b, norm, _first_step(cfg, p.stats))


def _tol_pair(v):
    """A state tolerance -> ``(tolerance of [y, a], the parameter adjoint's scalar tolerance)``."""
    if isinstance(v, float):
        return v, v
    return torch.cat([v, v], dim=1), float(v.min())


def _dynamics(plan: _Plan, aug_spec: StateSpec, Y: torch.Tensor, Gc: torch.Tensor, ops, theta_tol: tuple):
    """The augmented dynamics and its hooks: no parameters, shared steps or per-sample steps."""
    p, cfg = plan.p, plan.cfg
    kwargs = {"custom_norm": cfg.norm if callable(cfg.norm) else None}
    if not plan.params:
        kind = BackwardHooks
    elif p.spec.per_sample:
        kind = PerSampleQuadrature
    else:
        kind = SharedQuadrature
        kwargs["theta_norm"] = "rms" if (cfg.norm == "mixed" and cfg.solver.adaptive) else None
        kwargs["theta_tol"] = theta_tol
    aug = AugmentedFunc(p.func, p.spec, aug_spec, -p.sign, plan.params, kind.vjp)
    hooks = kind(aug, cfg.solver.tableau, Y, Gc, ops, plan.t_requires_grad, **kwargs)
    aug.callbacks = StepCallbacks.find(p.func, p.spec, -p.sign, callbacks_of(cfg.solver), cfg.method, adjoint=True,
                                       aug_params=lambda: aug.layout.split(hooks.A) if hasattr(hooks, "A") else [])
    return aug, hooks


def _pair_norm(state_norm, N: int):
    """torchdiffeq's adjoint norm on [y, a]: the state's norm of each part, the larger one."""
    if isinstance(state_norm, RMSNorm):
        # The built-in norm stays data (a fast backend fuses it): y's segments, then a's.
        segs = state_norm.segments or [(0, N)]
        return RMSNorm(segs + [(s + N, e + N) for s, e in segs])

    def norm(x):
        return torch.maximum(state_norm(x[:, :N]), state_norm(x[:, N:]))

    return norm


def _first_step(cfg: AdjointConfig, stats_f: st.SolveStats):
    """The backward's first step: ``first_step`` if given, else the forward's last proposal (adaptive only)."""
    if cfg.adaptive is None:
        return None
    first = cfg.adaptive.first_step
    hf = stats_f.h_final
    if first is None and hf is not None and bool(((hf > 0) & torch.isfinite(hf)).all()):
        # The forward's last proposed step size starts the backward: no probe evaluation, no ramp-up from the
        # (deliberately small) initial-step estimate. Measured A/B against the probe (MLP fields 8-32-8 and 32-64-32
        # and the test field, len(t) 2 and 10, both norms): fewer backward evaluations in 10 of 12 configurations;
        # a step too large for the adjoint costs one rejection.
        first = hf
    return first


def _solve_backward(plan: _Plan, bw: _BackwardSolve):
    """Run the backward solve; returns ``(z at t[0] [G, 2N], dL/dparams, f(t_0, y_0) or None)``."""
    cfg, spec, stats_f = plan.cfg, plan.p.spec, plan.p.stats
    bstats = st.SolveStats(method=cfg.method, per_sample=spec.per_sample)
    try:
        if cfg.adaptive is None:
            z_end = _solve_backward_fixed(bw, cfg, bstats)
        else:
            a = dataclasses.replace(cfg.adaptive, first_step=bw.first_step, on_failure="raise")
            problem = AdaptiveProblem(bw.aug_spec, bw.z0, bw.tau_b, cfg.solver.tableau, a, bw.rtol, bw.atol, bw.norm)
            z_end = solve_adaptive(bw.aug, problem, bw.ops, hooks=bw.hooks, stats=bstats)
        grads_theta = bw.hooks.finish()
        f0 = _f_at_t0(bw, spec.per_sample) if bw.hooks.tdots is not None else None
    except st.SolverError as err:
        raise st.SolverError(f"adjoint (backward) solve failed: {err}", status=err.status, samples=err.samples,
                             times=err.times) from None
    finally:
        bstats.nfe = bw.aug.nfe
        stats_f.backward = bstats
        stats_f.nfe_backward += bw.aug.nfe
        stats_f.n_accepted_backward = _add_counts(stats_f.n_accepted_backward, bstats.n_accepted)
        stats_f.n_rejected_backward = _add_counts(stats_f.n_rejected_backward, bstats.n_rejected)
    return z_end, grads_theta, f0


def _f_at_t0(bw: _BackwardSolve, per_sample: bool) -> torch.Tensor:
    """f(t_0, y_0) for dL/dt_0; one more evaluation of func, counted with the backward's."""
    aug = bw.aug
    t_last = bw.tau_b[..., -1]
    t0_user = aug.user_time(t_last.expand(bw.z0.shape[0]) if per_sample else t_last.reshape(1))
    with torch.no_grad():
        aug.nfe += 1
        return aug._f(t0_user, bw.hooks.Y[-1])


def _time_gradients(hooks: BackwardHooks, f0: torch.Tensor | None, adj_y0: torch.Tensor) -> torch.Tensor | None:
    """dL/dt as [G, T] in the forward's order (None when no time needs a gradient)."""
    if f0 is None:
        return None
    # dL/dt_0 = -a(t_0+) . f(t_0, y_0), with a(t_0+) the adjoint before t_0's own cotangent.
    a_plus = adj_y0 - hooks.Gc[-1]
    tdots = hooks.tdots.clone()
    tdots[-1] = -(a_plus * f0).sum(dim=1)
    return tdots.flip(0).transpose(0, 1)


def _solve_backward_fixed(bw: _BackwardSolve, cfg: AdjointConfig, stats: st.SolveStats) -> torch.Tensor:
    """The backward solve with a fixed-grid method: the ``step_size`` grid from ``t[-1]`` (or the output times)
    with every output time added as a grid point; cotangents are added there. Returns the final state."""
    tau_b = bw.tau_b
    if cfg.grid_constructor is not None:
        grid = _backward_grid(bw, cfg.grid_constructor)
    elif cfg.step_size is not None:
        grid = torch.cat([step_size_grid(tau_b, cfg.step_size), tau_b]).unique(sorted=True)
    else:
        grid = tau_b
    z = solve_fixed(bw.aug, bw.z0, tau_b, grid, cfg.solver.tableau, bw.ops, "linear", cfg.perturb, stats,
                    hooks=bw.hooks)
    if not bool(torch.isfinite(z).all()):
        raise st.SolverError("non-finite values (NaN/inf) in the fixed-grid backward solve; use a smaller "
                             "step_size or an adaptive adjoint_method", samples=[0])
    return z


def _backward_grid(bw: _BackwardSolve, gc: Callable) -> torch.Tensor:
    """The backward grid from ``adjoint_options['grid_constructor']``, called once per output interval as
    torchdiffeq does: ``gc(func, y_i, t_pair)`` with ``y_i`` the forward state at ``t_i`` and ``t_pair`` the user
    times ``[t_i, t_{i-1}]``; the grids are joined (each must start at ``t_i`` and end at ``t_{i-1}``)."""
    aug, spec, tau_b = bw.aug, bw.aug.state_spec, bw.tau_b
    parts = []
    for i in range(tau_b.numel() - 1):
        pair = tau_b[i : i + 2]
        with torch.no_grad():
            g = gc(aug.func, spec.unflatten(bw.hooks.Y[i]), (pair * aug.sign).to(spec.dtype))
        g = check_grid(g, pair, aug.sign)
        parts.append(g if i == 0 else g[1:])
    return torch.cat(parts)


def _add_counts(acc, new):
    return new if isinstance(acc, int) and acc == 0 else acc + new


class OdeintAdjointFunction(torch.autograd.Function):
    """Forward: a solve without autograd. Backward: one adjoint solve (see the module docstring)."""

    @staticmethod
    def forward(ctx, plan: _Plan, y0_flat, t, *params):
        res = _forward(plan, y0_flat)
        ctx.plan = plan
        if plan.p.event_fn is None:
            ctx.save_for_backward(res, t, *params)
            ctx.tau_fwd = plan.p.tau
            return res
        ev_tau, sol = res
        ctx.mark_non_differentiable(ev_tau)
        ctx.save_for_backward(sol, t, *params)
        tau0 = plan.p.tau[..., 0]
        tau0 = tau0.expand(ev_tau.shape[0]) if tau0.dim() == 0 else tau0
        ctx.tau_fwd = torch.stack([tau0, ev_tau], dim=1)  # [G, 2]
        if not plan.p.spec.per_sample:
            ctx.tau_fwd = ctx.tau_fwd[0]
        return ev_tau, sol

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        plan = ctx.plan
        out, t, *_params = ctx.saved_tensors  # params saved so in-place changes before backward are caught
        grad_out = grads[-1]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if not bool(torch.isfinite(out).all()):
            bad = (~torch.isfinite(out)).any(dim=0).any(dim=1).nonzero().flatten().tolist()
            raise st.SolverError(f"odeint_adjoint: the forward solve did not finish for sample(s) {bad[:10]} (its "
                                 "outputs hold NaN/inf), so there is no backward solve for them; use odeint, or "
                                 "drop the failed samples before the loss", samples=bad)
        adj_y0, g_params, t_grad = _backward(plan, out, grad_out, ctx.tau_fwd)
        g_t = _grad_t(plan, t, t_grad) if ctx.needs_input_grad[2] and t_grad is not None else None
        return (None, adj_y0, g_t, *g_params)


def _grad_t(plan: _Plan, t: torch.Tensor, t_grad: torch.Tensor) -> torch.Tensor:
    """``dL/dt`` shaped like ``t`` from ``t_grad`` [G, T] (user time)."""
    if plan.p.event_fn is not None:
        # Only t[0] moves the solution; the event time is an output without gradient here.
        g_t = torch.zeros_like(t)
        g0 = t_grad[:, 0]
        if t.dim() == 2:
            g_t[:, 0] = g0.to(t.dtype)
        else:
            g_t[0] = g0.sum().to(t.dtype)
        return g_t
    if t.dim() == 2:
        return t_grad.to(t.dtype)
    return t_grad.sum(dim=0).to(t.dtype)


def _check_params(func, adjoint_params, adjoint_options) -> tuple:
    if adjoint_params is None:
        if not isinstance(func, nn.Module):
            raise ValueError("func must be an nn.Module so that its parameters can be found; otherwise pass them "
                             "as adjoint_params=(...) (adjoint_params=() if there are none)")
        # As torchdiffeq: frozen parameters (requires_grad=False) are left out.
        return tuple(q for q in func.parameters() if q.requires_grad)
    if isinstance(adjoint_params, torch.Tensor):
        raise TypeError("adjoint_params must be a sequence of tensors (e.g. tuple(model.parameters())), got a "
                        "single tensor; wrap it as (tensor,)")
    try:
        params = tuple(adjoint_params)
    except TypeError:
        raise TypeError(f"adjoint_params must be a sequence of tensors, got {type(adjoint_params).__name__}") from None
    seen, out, skipped = set(), [], 0
    for i, q in enumerate(params):
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"adjoint_params[{i}] must be a torch.Tensor, got {type(q).__name__}")
        if not q.requires_grad:
            skipped += 1  # as torchdiffeq: a tensor that needs no gradient is left out of the adjoint
            continue
        if not q.is_floating_point():
            raise TypeError(f"adjoint_params[{i}] must be a floating tensor, got {q.dtype}")
        if id(q) not in seen:  # the same tensor twice would get its gradient twice
            seen.add(id(q))
            out.append(q)
    if skipped and isinstance(adjoint_options, dict) and callable(adjoint_options.get("norm")):
        warnings.warn(f"{skipped} of adjoint_params do not require grad: they are left out of the adjoint and do "
                      "not appear in the tuple adjoint_options['norm'] receives", stacklevel=3)
    return tuple(out)


def odeint_adjoint(func: Callable, y0, t: torch.Tensor, *, rtol=1e-7, atol=1e-9, method: str | None = None,
                   options: dict | None = None, event_fn: Callable | None = None, adjoint_rtol=None,
                   adjoint_atol=None, adjoint_method: str | None = None, adjoint_options: dict | None = None,
                   adjoint_params=None):
    """``odeint`` whose gradients come from solving the adjoint ODE backwards: memory constant in the steps.

    Same arguments and results as ``odeint`` (torchdiffeq 0.2.5's ``odeint_adjoint`` semantics). Only the
    outputs are kept from the forward solve; the backward is one continuous solve over all output times.

    Args:
        func: ``func(t, y)``. If it is not an ``nn.Module``, pass the tensors it depends on as ``adjoint_params``.
        y0, t, rtol, atol, method, options, event_fn: as ``odeint``.
        adjoint_rtol, adjoint_atol: tolerances of the backward solve (default: ``rtol``, ``atol``).
        adjoint_method: method of the backward solve (default: ``method``). With a fixed-grid method the backward
            grid is ``adjoint_options["step_size"]`` from ``t[-1]`` (default: the output times), with every output
            time added as a grid point, or ``adjoint_options["grid_constructor"]``'s, called per output interval
            as ``gc(func, y_i, [t_i, t_{i-1}])``. Adams methods and ``scipy_solver`` solve the augmented system
            ``[y, a, theta]`` from each output time to the previous one.
        adjoint_options: options of the backward solve. Default: ``options`` without ``norm``; required when
            ``adjoint_method`` differs from ``method`` and ``options`` were given. ``norm`` may be
            ``"seminorm"`` (the default: the parameters' adjoint is left out of the error control), ``"mixed"``
            (torchdiffeq's default: it is included) or a callable taking the tuple
            ``(t_err, y_err, adj_y_err, *adj_param_errs)`` (``t_err`` is always zero: no time adjoint is
            integrated). In per-sample mode the error control is per sample on ``(y, adj_y)``: a seminorm.
        adjoint_params: tensors to differentiate (default: ``func.parameters()``); those that do not require grad
            are left out, as in torchdiffeq.

    ``options={"compile": True}`` (adaptive methods) compiles the forward solve's step and, through the default
    ``adjoint_options``, the backward's: each backward step with its vector-Jacobian products and the parameter
    quadrature is one ``torch.compile`` program (``fastnode._compiled_adjoint`` says what stays eager).

    Returns:
        As ``odeint``; with ``event_fn`` the event time is differentiable (implicit function theorem, as
        ``odeint_event``) while the solution keeps its fixed-time gradient. ``func``'s ``callback_*_adjoint``
        methods are called during the backward solve. ``fastnode.last_stats()`` (taken after the forward) gets
        ``nfe_backward``,
        ``n_accepted_backward``, ``n_rejected_backward`` and ``backward`` (the backward solve's statistics)
        once the backward has run.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from fastnode import odeint_adjoint
        >>> f = nn.Linear(2, 2).double()
        >>> y0 = torch.ones(4, 2, dtype=torch.float64, requires_grad=True)
        >>> ys = odeint_adjoint(lambda t, y: f(y), y0, torch.linspace(0, 1, 3), adjoint_params=tuple(f.parameters()))
        >>> ys[-1].sum().backward()
        >>> f.weight.grad.shape
        torch.Size([2, 2])
    """
    params = _check_params(func, adjoint_params, adjoint_options)
    p = prepare(func, y0, t, rtol, atol, method, options, event_fn, widen=False)
    cfg = parse_adjoint_options(p, options, adjoint_method, adjoint_options, adjoint_rtol, adjoint_atol)
    if p.spec.is_empty:
        st._set_last(p.stats)
        return empty_solution(p, y0)
    t_req = isinstance(t, torch.Tensor) and t.requires_grad
    plan = _Plan(p, params, cfg, t_req, y0, t)
    st._set_last(p.stats)
    y0_flat = p.spec.flatten(y0, "y0")
    try:
        res = OdeintAdjointFunction.apply(plan, y0_flat, t, *params)
    finally:
        p.stats.nfe = p.f.nfe
    res = result_to_user(p, res)
    return _differentiable_event_time(func, p, res) if p.event_fn is not None and torch.is_grad_enabled() else res


def _differentiable_event_time(func, p: Problem, res):
    """``(event_t, solution)`` with the event time's gradient by the implicit function theorem, through the
    solution's fixed-time gradient (torchdiffeq's event time has a ``grad_fn`` whose gradient is dropped: zero)."""
    ev_t, sol = res
    state = tuple(s[-1] for s in sol) if isinstance(sol, tuple) else sol[-1]
    ev_t, _ = _reroute_event_gradient(func, p.event_fn, ev_t, state, p.per_sample, move_state=False)
    return ev_t, sol
