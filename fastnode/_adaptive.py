"""The adaptive Runge-Kutta loop, shared and per-sample, on top of a StepOps backend.

One loop serves both modes: the state is ``[G, N]`` with ``G = 1`` (shared: one step size for everything,
torchdiffeq's semantics) or ``G = B`` (per-sample: every sample has its own time, step size, accept/reject,
controller memory and status). All per-group decisions are tensors combined with ``torch.where``.

Host syncs: the loop makes exactly one device-to-host transfer per iteration (``_sync``): a small packet
holding "is any group still running", "how many output times did the step pass" and "did anything fail or
hit a jump". Output times passed by a step are then filled from the step's dense output with no further
transfer. Set-up (input checks, first step) and the end (statistics) add a constant few.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from . import _stats as st
from ._event_locate import locate_sign_change
from ._problem import FlatFunc, StateSpec
from ._tableau import ButcherTableau
from .backends import for_recording
from .backends.torch_ops import ControllerConfig, StepOps


class _SyncCounter:
    def __init__(self):
        self.n = 0

    def fetch(self, x: torch.Tensor) -> list:
        """The loop's only device-to-host transfer."""
        self.n += 1
        return x.tolist()


@torch.no_grad()
def select_initial_step(f: FlatFunc, t0, y0, k0, order: int, rtol, atol, norm: Callable) -> torch.Tensor:
    """Hairer, Norsett & Wanner (Solving ODEs I, II.4) starting step, per group, with no host sync. [G]."""
    scale = atol + y0.abs() * rtol
    d0 = norm(y0 / scale).to(t0.dtype)
    d1 = norm(k0 / scale).to(t0.dtype)
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
    y1 = y0 + h0.to(y0.dtype).unsqueeze(1) * k0
    k1 = f.probe(t0 + h0, y1)
    d2 = norm((k1 - k0) / scale).to(t0.dtype) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(
        dmax <= 1e-15,
        torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
        (0.01 / dmax.clamp_min(1e-300)) ** (1.0 / order),
    )
    h = torch.minimum(100 * h0, h1)
    # A non-finite estimate (func blew up at the probe point) falls back to a tiny step the controller can grow.
    return torch.where(torch.isfinite(h) & (h > 0), h, torch.full_like(h, 1e-6))


def _failure_message(spec: StateSpec, status: torch.Tensor, t_user: torch.Tensor, n_att: torch.Tensor,
                     max_steps: int, t_end_user: torch.Tensor) -> tuple[str, list, list]:
    bad = (status != st.SUCCESS).nonzero().flatten().tolist()
    codes = status.tolist()
    n_att = n_att.tolist()
    times = t_user.tolist()
    ends = t_end_user.tolist()
    lines = []
    for i in bad[:10]:
        who = f"sample {i}" if spec.per_sample else "the solve"
        what = st.STATUS_NAMES[codes[i]]
        if codes[i] == st.MAX_STEPS:
            what += f" ({max_steps} step attempts; increase options['max_num_steps'])"
        elif codes[i] == st.STEP_UNDERFLOW:
            what += " (the step size became too small to advance; the problem may be stiff or singular there)"
        elif codes[i] == st.NON_FINITE and n_att[i] == 0:
            what = "func returned non-finite values (NaN/inf) at the initial time and state"
        elif codes[i] == st.NON_FINITE:
            what = "func returned non-finite values (NaN/inf) and no smaller step avoided them"
        elif codes[i] == st.TIME_OVERFLOW:
            what += " (no end time: event_fn never crossed zero and the step grew without bound)"
        lines.append(f"{who}: {what} at t={times[i]:.17g} (integrating to t={ends[i]:.17g})")
    more = f" (and {len(bad) - 10} more samples)" if len(bad) > 10 else ""
    msg = "ODE solve failed: " + "; ".join(lines) + more
    return msg, bad, [times[i] for i in bad]


def solve_adaptive(
    f: FlatFunc,
    spec: StateSpec,
    y0: torch.Tensor,
    tau: torch.Tensor,
    tableau: ButcherTableau,
    ops: StepOps,
    ctrl: ControllerConfig,
    rtol,
    atol,
    norm: Callable,
    *,
    first_step: float | None = None,
    max_num_steps: int = 2**31 - 1,
    step_t: torch.Tensor | None = None,
    jump_t: torch.Tensor | None = None,
    on_failure: str = "raise",
    event_fn: Callable | None = None,
    stats: st.SolveStats,
    hooks=None,
):
    """Integrate ``y' = f(tau, y)`` from ``tau[..., 0]``; return outputs ``[T, G, N]`` (or the event pair).

    Args:
        y0: [G, N] flat initial state.
        tau: [T] or [G, T] increasing output times (time dtype).
        event_fn: flat event function ``(tau [G], y [G, N]) -> [G]``; when given, ``tau`` holds only the start.
        hooks: the adjoint's backward solve (``fastnode._adjoint.BackwardHooks``): steps land exactly on every
            output time, where ``hooks.land`` changes the state (cotangents added, state reset) and the
            derivative is re-evaluated; ``hooks`` also sees every evaluation and step decision (parameter
            quadrature) and may add to the error ratio. No outputs are stored.
    Returns:
        ``out: [T, G, N]`` (rows never reached are NaN when ``on_failure="return"``), or with ``event_fn``
        ``(event_tau [G], out [2, G, N])``; with ``hooks`` the final state ``[G, N]``.
    """
    G, N = y0.shape
    sync = _SyncCounter()
    tdt = tau.dtype
    dev = y0.device
    t_out = tau if tau.dim() == 2 else tau.unsqueeze(0).expand(G, -1)
    t_out = t_out.contiguous()
    T = t_out.shape[1]
    if hooks is None:
        out = torch.full((T + 1, G, N), math.nan, dtype=y0.dtype, device=dev)  # row T: scratch for masked writes
        out[0] = y0
    rows = torch.arange(G, device=dev)

    t = t_out[:, 0].contiguous()
    if event_fn is None:
        t_end = t_out[:, -1]
    else:
        t_end = torch.full_like(t, math.inf)
    if event_fn is None and T == 1:
        stats.n_host_syncs += sync.n
        return y0 if hooks is not None else out[:T]

    # Where steps must stop: output end, step_t (grid points to step onto) and jump_t (discontinuities,
    # where the derivative is re-evaluated on the far side).
    stops = [x for x in (step_t, jump_t) if x is not None and x.numel()]
    stop_grid = torch.cat(stops).sort().values if stops else None
    if stop_grid is not None:
        stop_grid = torch.cat([stop_grid, stop_grid.new_full((1,), math.inf)])

    k1 = f(t, y0)
    # Only now is it known whether this solve records an autograd graph (func's parameters may need grad).
    ops = for_recording(ops, torch.is_grad_enabled() and (y0.requires_grad or k1.requires_grad or
                                                          t_out.requires_grad))
    stats.backend = ops.name
    # A non-finite derivative at the start cannot be fixed by any step size: those groups fail at once.
    with torch.no_grad():
        bad0 = ~torch.isfinite(k1).all(dim=1)
    status = torch.where(bad0, st.NON_FINITE, 0).to(torch.int8)
    k1 = torch.where(bad0.unsqueeze(1), torch.zeros_like(k1), k1)
    running = (t < t_end) & (status == 0)
    if hooks is not None:
        hooks.k1_evaluated(torch.ones_like(running), k1)
    if event_fn is not None:
        with torch.no_grad():
            sign0 = torch.sign(event_fn(t, y0))
        fired = sign0 == 0
        running = running & ~fired
        ev_lo = t.clone()
        ev_h = torch.zeros_like(t)
        ev_y = y0
        ev_K = None
    # The set-up's one transfer: a failure at the start (raise before stepping) and whether anything runs.
    any_failed, any_running = sync.fetch(torch.stack([(status != 0).any(), running.any()]))

    h = torch.zeros(G, dtype=tdt, device=dev)
    if any_running and not (any_failed and on_failure == "raise"):
        if isinstance(first_step, torch.Tensor):
            h = first_step.to(dtype=tdt, device=dev).expand(G).clone()
        elif first_step is not None:
            h = torch.full((G,), float(first_step), dtype=tdt, device=dev)
        else:
            h = select_initial_step(f, t.detach(), y0.detach(), k1.detach(), ctrl.order, rtol, atol, norm)
        h = h.clamp(ctrl.min_step, ctrl.max_step)

    y = y0
    n_att = torch.zeros(G, dtype=torch.int64, device=dev)
    n_acc = torch.zeros(G, dtype=torch.int64, device=dev)
    prev_ratio = torch.ones(G, dtype=tdt, device=dev)
    last_nonfinite = torch.zeros(G, dtype=torch.bool, device=dev)
    next_idx = torch.ones(G, dtype=torch.int64, device=dev)

    S = tableau.num_stages
    c_col = torch.tensor(tableau.c, dtype=tdt, device=dev).unsqueeze(1)  # [S, 1]
    ydt = y0.dtype
    zero_i = torch.zeros((), dtype=torch.int64, device=dev)
    code = {k: torch.tensor(k, dtype=torch.int8, device=dev) for k in st.STATUS_NAMES}
    # Gradients w.r.t. the times flow only if some time tensor needs them (the step size itself is detached).
    time_grad = torch.is_grad_enabled() and (t_out.requires_grad)
    step_to_outputs = (tableau.step_to_outputs or hooks is not None) and event_fn is None
    c_is_one = [ci == 1.0 for ci in tableau.c]
    end_perturb = -1 if (jump_t is not None and jump_t.numel()) else 0
    # The plain case (no time gradients, no step_t/jump_t stops, no event) runs each step's set-up and
    # bookkeeping as two backend ops (one call each on the compiled backend instead of ~80 small tensor ops).
    fused = not time_grad and stop_grid is None and event_fn is None
    codes = (st.NON_FINITE, st.STEP_UNDERFLOW, st.TIME_OVERFLOW, st.MAX_STEPS)
    iterations = 0
    cb = f.callbacks  # torchdiffeq's step callbacks of func (fastnode/_callbacks.py), or None
    while any_running and not (any_failed and on_failure == "raise"):
        iterations += 1
        if cb is not None:
            cb.step(t, y, torch.where(running, h, 0.0))
        if fused:
            h_ctl, clipped, t_new, hy, t_stage, t_end_stage = ops.step_begin(
                t, h, running, t_out, t_end, step_to_outputs, tableau.c, f.sign, ydt, not spec.per_sample)
            t_d = t
            h_eff = h_ctl
        else:
            h_ctl, clipped, t_new, h_eff, t_d, t_stage, t_end_stage, hy = _step_begin_general(
                f, t, h, running, t_out, t_end, rows, T, step_to_outputs, stop_grid, time_grad, c_col, end_perturb,
                ydt)

        if hooks is not None:
            hooks.begin_step(hy)
        K = ops.new_stages(tableau, y)
        K = ops.set_stage(K, 0, k1)
        for i in range(1, S):
            yi = ops.stage_input(tableau, i, y, K, hy)
            if c_is_one[i]:
                # Stages at the step's end see t_new exactly; with jump_t they see the left limit, so a step
                # that lands on a discontinuity never mixes in the right-hand value.
                K = ops.set_stage(K, i, f(None, yi, t_user=t_end_stage))
            else:
                K = ops.set_stage(K, i, f(None, yi, t_user=t_stage[i]))
            if hooks is not None:
                hooks.stage_evaluated(i)
        if hooks is None:
            floor = adjust = None
        else:
            floor = hooks.ratio_floor()
            adjust = hooks.step_ratio if hooks.custom_norm is not None else None
        y_new, _ratio, new_ok, accept, h_next, prev_ratio = ops.finish_control(
            tableau, y, K, hy, rtol, atol, norm, ctrl, h_ctl, prev_ratio, running, ratio_floor=floor, adjust=adjust)
        k_last = ops.stage(K, S - 1)
        if cb is not None:
            stats.n_host_syncs += cb.decided(t, y, h_eff, accept, running)

        jumped = None
        base = None
        if fused:
            h_keep, t_fut, n_att, n_acc, status, last_nonfinite, stuck, crossed, running_next, base = ops.step_end(
                accept, h_next, h, clipped, running, t_d, t_new, t_end, n_att, n_acc, status, last_nonfinite,
                new_ok, next_idx, t_out, max_num_steps, codes)
            if hooks is not None:
                hooks.end_step(accept, running_next, new_ok | ~running)
        else:
            with torch.no_grad():
                # A step shortened to land on a stop is no evidence for a smaller step: keep the proposal.
                h_next = torch.where(clipped & accept, torch.maximum(h_next, h), h_next)
                t_new_d = t_new.detach()
                n_att = n_att + running
                n_acc = n_acc + accept
                t_fut = torch.where(accept, t_new_d, t_d)
                # Failures: a rejected step that can no longer move t (underflow: non-finite if the rejections
                # came from NaN/inf, else a genuine underflow), a step grown to inf (events with no end time),
                # the step budget spent with time left.
                t_try = t_fut + h_next
                stuck = running & ((~accept & (t_try <= t_fut)) | torch.isinf(t_try) |
                                   ((n_att >= max_num_steps) & (t_fut < t_end)))
                last_nonfinite = torch.where(running, ~new_ok, last_nonfinite)
                fail = torch.where(~accept & (t_try <= t_fut),
                                   torch.where(last_nonfinite, code[st.NON_FINITE], code[st.STEP_UNDERFLOW]),
                                   torch.where(torch.isinf(t_try), code[st.TIME_OVERFLOW], code[st.MAX_STEPS]))
                status = torch.where(stuck, fail, status)
                if jump_t is not None and jump_t.numel():
                    j_idx = torch.searchsorted(jump_t, t_new_d).clamp_max(jump_t.numel() - 1)
                    jumped = accept & clipped & (jump_t[j_idx] == t_new_d)
                if event_fn is None:
                    n_le = torch.searchsorted(t_out, t_new_d.unsqueeze(1), right=True).squeeze(1)
                    crossed = torch.where(accept, n_le - next_idx, zero_i)
                    running_next = running & (t_fut < t_end) & ~stuck
                    if hooks is not None:
                        hooks.end_step(accept, running_next, new_ok | ~running)
                else:
                    ev = event_fn(t_new_d, y_new.detach())
                    newly = accept & ((torch.sign(ev) != sign0) | (ev == 0))
                    crossed = zero_i
                    running_next = running & ~newly & ~stuck
                # A finished sample keeps its last proposal (seeds the adjoint).
                h_keep = torch.where(running, h_next, h)

        y_old, t_old = y, t
        acc2 = accept.unsqueeze(1)
        y = torch.where(acc2, y_new, y)
        t = torch.where(accept, t_new, t) if time_grad else t_fut
        k1 = torch.where(acc2, k_last, k1)
        h = h_keep

        if event_fn is not None:
            with torch.no_grad():
                fired = fired | newly
            ev_lo = torch.where(newly, t_old, ev_lo)  # keeps t[0]'s graph when times need gradients
            ev_h = torch.where(newly, h_eff.detach(), ev_h)
            ev_y = torch.where(newly.unsqueeze(1), y_old, ev_y)
            ev_K = list(K) if ev_K is None else [torch.where(newly.unsqueeze(1), k, e) for k, e in zip(K, ev_K)]

        # The one transfer: [any running, any stuck, (any jumped), (the adjoint's flags...), max crossed].
        flags = [] if base is not None else [running_next.any(), stuck.any()]
        flags += [jumped.any()] if jumped is not None else []
        n_hook = 0
        if hooks is not None:
            # The adjoint's own questions ride on the same transfer: does any sample that landed on an output
            # time keep running (its derivative must be re-evaluated there), plus the parameter quadrature's.
            extra = [((crossed > 0) & running_next).any()] + hooks.packet_flags()
            n_hook = len(extra)
            flags += extra
        if base is None:
            packet = torch.cat([torch.stack(flags).to(torch.int64), crossed.max().reshape(1)])
        elif flags:
            packet = torch.cat([base[:2], torch.stack(flags).to(torch.int64), base[2:]])
        else:
            packet = base
        n_flags = len(flags) + (2 if base is not None else 0)
        got = sync.fetch(packet)
        any_running, any_failed = got[0], got[1]
        any_jump = got[2] if jumped is not None else 0
        n_cross = got[-1]
        if hooks is not None:
            hook_got = got[n_flags - n_hook : n_flags]
            hooks.after_fetch(hook_got[1:])
            if n_cross:
                # Steps land exactly on output times here (step_to_outputs): change the state there.
                landed = crossed > 0
                y = hooks.land(next_idx, landed, y)
                if hook_got[0]:
                    # The state jumped (cotangent added, state reset to the forward's): fresh derivative there.
                    k_new = f(t, y)
                    mask = landed & running_next
                    k1 = torch.where(mask.unsqueeze(1), k_new, k1)
                    hooks.k1_evaluated(mask, k_new)
        else:
            for m in range(n_cross):
                j = next_idx + m
                valid = m < crossed
                jj = torch.where(valid, j, T)
                tj = t_out[rows, j.clamp_max(T - 1)]
                theta = (tj - t_old) / torch.where(h_eff > 0, h_eff, 1.0)
                val = ops.interpolate(tableau, y_old, K, hy, theta)
                # Exactly at the step's end the solution itself is returned (no interpolation rounding).
                val = torch.where((tj == t_new).unsqueeze(1), y_new, val)
                out.index_put_((jj, rows), val)
        if n_cross:
            next_idx = next_idx + crossed

        if any_jump:
            # Past a discontinuity the derivative is re-evaluated on the far side (one extra evaluation).
            k_far = f(t, y, perturb=1)
            k1 = torch.where(jumped.unsqueeze(1), k_far, k1)
            if hooks is not None:
                hooks.k1_evaluated(jumped, k_far, at_output=torch.zeros_like(jumped))  # not an output time

        running = running_next

    stats.n_iterations = iterations
    stats.h_final = h.detach()
    stats.n_host_syncs += sync.n
    n_rej = n_att - n_acc
    t_user = t.detach() * f.sign
    failed = bool((status != 0).any())
    stats.status = status.to(torch.int64)
    stats.t_reached = t_user
    if spec.per_sample:
        stats.n_accepted, stats.n_rejected, stats.n_steps = n_acc, n_rej, n_att
    else:
        stats.n_accepted, stats.n_rejected, stats.n_steps = int(n_acc[0]), int(n_rej[0]), int(n_att[0])
    if failed:
        t_end_user = (t_out[:, -1] if event_fn is None else t_end) * f.sign
        msg, bad, times = _failure_message(spec, status, t_user, n_att, max_num_steps, t_end_user.detach())
        stats.messages.append(msg)
        if on_failure == "raise":
            raise st.SolverError(msg, status=stats.status, samples=bad, times=times)

    if hooks is not None:
        return y
    if event_fn is None:
        return out[:T]

    event_tau, y_ev = _locate_events(ops, tableau, event_fn, sign0, ev_lo, ev_h, ev_y, ev_K or [k1] * S)
    not_fired = ~fired
    if bool(not_fired.any()):
        stats.n_host_syncs += 1
        idx = not_fired.nonzero().flatten().tolist()
        msg = (f"event_fn never crossed zero for sample(s) {idx[:10]} before the solve stopped at "
               f"t={t_user[idx[0]].item():.17g}")
        stats.messages.append(msg)
        if on_failure == "raise":
            raise st.SolverError(msg, status=stats.status, samples=idx, times=t_user[idx].tolist())
        event_tau = torch.where(fired, event_tau, torch.full_like(event_tau, math.nan))
    sol = torch.stack([y0, y_ev], dim=0)
    return event_tau, sol


def _step_begin_general(f, t, h, running, t_out, t_end, rows, T, step_to_outputs, stop_grid, time_grad, c_col,
                        end_perturb, ydt):
    """A step's set-up in the general case (time gradients, step_t/jump_t stops, events): StepOps.step_begin's
    semantics, with gradients through the output times where they need them."""
    with torch.no_grad():
        t_d = t.detach()
        limit = t_end
        if step_to_outputs:
            nxt_out = torch.searchsorted(t_out, t_d.unsqueeze(1), right=True).squeeze(1).clamp_max(T - 1)
            with torch.enable_grad() if time_grad else contextlib.nullcontext():
                limit = t_out[rows, nxt_out]  # keeps the output times' graph when they need gradients
        if stop_grid is not None:
            limit = torch.minimum(limit, stop_grid[torch.searchsorted(stop_grid, t_d, right=True)])
        room = limit - t_d
        clipped = running & (h >= room)
        h_ctl = torch.where(clipped, room, h).mul_(running)
    if time_grad:
        # Differentiable in the times (through `limit - t`) but not in the controller's choice of h.
        h_eff = torch.where(clipped, limit - t, h_ctl)
        t_new = torch.where(clipped, limit, t + h_eff)
    else:
        h_eff = h_ctl
        with torch.no_grad():
            t_new = torch.where(clipped, limit, t_d + h_ctl)
    # All stage times at once: [S, G]; the last stage of every (FSAL-form) tableau sits at t_new.
    t_stage = f.user_time(torch.addcmul(t, c_col, h_eff))  # as func sees them, converted once
    t_end_stage = f.user_time(t_new, perturb=end_perturb)
    hy = h_eff.to(ydt)
    return h_ctl, clipped, t_new, h_eff, t_d, t_stage, t_end_stage, hy


def _locate_events(ops: StepOps, tableau: ButcherTableau, event_fn: Callable, sign0, lo_t, h, y0, K):
    """Event times and states inside each group's bracketing step, located on the dense output.

    ``lo_t``, ``h``: [G] start and size of the step in which the sign changed (``h == 0``: the event holds at
    the start). Costs event_fn calls only, no func evaluations. Returns ``(event_tau [G], y_event [G, N])``:
    the event time carries no gradient; the state is differentiable at that fixed time (also w.r.t. ``t[0]``,
    through ``lo_t``). ``fastnode.odeint_event`` adds the implicit gradient through the event time.
    """
    ydt = y0.dtype
    hy = h.to(ydt)
    lo_d = lo_t.detach()
    with torch.no_grad():
        at_start = h == 0
        # Anderson-Bjorck bracketing on the dense output to the time dtype's resolution (_event_locate.py).
        theta, _ = locate_sign_change(lambda th: event_fn(lo_d + th * h, ops.interpolate(tableau, y0, K, hy, th)),
                                      sign0, ~at_start, lo_d, h)
        event_tau = lo_d + theta * h
    # theta as a function of the step's start: moving t[0] shifts the step, not the event's fixed time.
    theta_g = torch.where(at_start, 0.0, (event_tau - lo_t) / torch.where(at_start, 1.0, h))
    y_ev = torch.where(at_start.unsqueeze(1), y0, ops.interpolate(tableau, y0, K, hy, theta_g))
    return event_tau, y_ev
