"""The adaptive Runge-Kutta loop, shared and per-sample, on top of a StepOps backend.

One loop serves both modes: the state is ``[G, N]`` with ``G = 1`` (shared: one step size for everything,
torchdiffeq's semantics) or ``G = B`` (per-sample: every sample has its own time, step size, accept/reject,
controller memory and status). All per-group decisions are tensors combined with ``torch.where``.

The loop owns only the order of events; the backend owns the semantics of each op (``backends.base``). One
iteration is the step made by ``_stepper`` (state -> next state, no host transfer: set-up, stages, finish,
events, bookkeeping), then the host part: the one packet fetch (``HostPacket``), dense output at the output times
the step passed (``DenseOutput``), the adjoint's landing on output times (``hooks``) and the restart past a jump.

Host syncs: exactly one device-to-host transfer per iteration, a small packet holding "is any group still
running", "did anything fail", "how many output times did the step pass" (and the jump's and the adjoint's
flags). Set-up (input checks, first step) and the end (statistics) add a constant few.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import _stats as st
from ._adjoint_dynamics import halve_before_output
from ._compiled import compiled_loop
from ._events import EventTracker
from ._health import HealthCheck
from ._options import AdaptiveConfig, RMSNorm
from ._problem import FlatFunc, StateSpec
from ._tableau import ButcherTableau
from .backends import for_recording
from .backends.base import StepEnd, StepOps, StepPlan, StepResult

_CODES = (st.NON_FINITE, st.STEP_UNDERFLOW, st.TIME_OVERFLOW, st.MAX_STEPS)


class AdaptiveProblem(NamedTuple):
    """A checked adaptive solve in the loop's flat form."""

    spec: StateSpec
    y0: torch.Tensor  # [G, N]
    tau: torch.Tensor  # [T] or [G, T] increasing output times (time dtype)
    tableau: ButcherTableau
    config: AdaptiveConfig
    rtol: torch.Tensor | float
    atol: torch.Tensor | float
    norm: Callable  # [G, N] -> [G]


@dataclass(slots=True)
class LoopState:
    """What one iteration hands the next, per group ([G] unless noted), in integration time."""

    t: torch.Tensor  # time reached (keeps the output times' graph when they need gradients)
    h: torch.Tensor  # the controller's proposal for the next step
    y: torch.Tensor  # [G, N] state at t
    f: torch.Tensor  # [G, N] f(t, y): the next step's first stage (FSAL)
    running: torch.Tensor  # bool
    status: torch.Tensor  # int8, fastnode.STATUS_NAMES
    n_attempted: torch.Tensor  # int64
    n_accepted: torch.Tensor  # int64
    prev_ratio: torch.Tensor  # PI memory
    last_nonfinite: torch.Tensor  # bool: the latest rejection came from NaN/inf
    next_out: torch.Tensor  # int64 index of the next output time


class _Grid:
    """Where steps stop, fixed for the solve: output times [G, T], end [G], step_t/jump_t stops."""

    __slots__ = (
        "T",
        "_rows",
        "end_perturb",
        "jump_t",
        "squeeze",
        "stops",
        "t_end",
        "t_out",
        "time_grad",
        "to_outputs",
    )

    def __init__(self, problem: AdaptiveProblem, event: bool, landing: bool):
        G = problem.y0.shape[0]
        tau, cfg = problem.tau, problem.config
        self.t_out = (tau if tau.dim() == 2 else tau.unsqueeze(0).expand(G, -1)).contiguous()
        self.T = self.t_out.shape[1]
        self.t_end = torch.full_like(self.t_out[:, 0], math.inf) if event else self.t_out[:, -1]
        self._rows = None
        self.to_outputs = (problem.tableau.step_to_outputs or landing) and not event
        self.stops = cfg.stop_grid()
        self.jump_t = cfg.jump_t if cfg.has_jumps else None
        self.end_perturb = -1 if cfg.has_jumps else 0
        # Gradients w.r.t. the times flow only if some time tensor needs them (the step size itself is detached).
        self.time_grad = torch.is_grad_enabled() and self.t_out.requires_grad
        self.squeeze = not problem.spec.per_sample

    @property
    def rows(self) -> torch.Tensor:
        """[G] the group indices (the masked output writes), made at first use."""
        if self._rows is None:
            self._rows = torch.arange(self.t_out.shape[0], device=self.t_out.device)
        return self._rows


class HostPacket:
    """The loop's one device-to-host transfer per iteration, read into named fields."""

    __slots__ = ("accepted", "failed", "jumped", "landed_running", "max_crossed", "n", "running", "times")

    def __init__(self):
        self.n = 0
        self.running = self.failed = self.max_crossed = self.jumped = self.landed_running = 0
        self.accepted = 1
        self.times = None

    def fetch_start(self, status: torch.Tensor, running: torch.Tensor) -> None:
        """The set-up's transfer: a failure at the start (raise before stepping) and whether anything runs."""
        self.n += 1
        self.failed, self.running = torch.stack([(status != 0).any(), running.any()]).tolist()

    def fetch(self, end: StepEnd, hooks, health_flags: list | None = None, accept: torch.Tensor | None = None,
              times: tuple | None = None) -> list:
        """``end.packet`` plus the jump's flag, the adjoint's questions, ``health_flags`` (0-d tensors, a watched
        step's) and ``accept`` ([1] bool, the one group's decision, in ``solve_adaptive``'s lean mode) with
        ``times`` (its step's start, step and end: [1] float64 each, read bit for bit into ``self.times``); sets the
        fields and returns the health flags' values."""
        self.n += 1
        if end.jumped is None and hooks is None and not health_flags:
            if accept is None:
                self.running, self.failed, self.max_crossed = end.packet.tolist()
            elif times is None:
                self.running, self.failed, self.max_crossed, self.accepted = torch.cat([end.packet, accept]).tolist()
            else:
                got = torch.cat([end.packet, accept, *(x.view(torch.int64) for x in times)]).tolist()
                self.running, self.failed, self.max_crossed, self.accepted = got[:4]
                self.times = _BITS.unpack(_WORDS.pack(*got[4:]))
            return []
        health_flags = health_flags or []
        extra = list(health_flags) + ([] if end.jumped is None else [end.jumped.any()])
        extra += [] if accept is None else [accept.reshape(())]
        if hooks is not None:
            # Does any group that landed on an output time keep running (its derivative must be re-evaluated
            # there), plus the parameter quadrature's flags.
            extra += [((end.crossed > 0) & end.running).any()] + hooks.packet_flags()
        words = [] if times is None else [x.view(torch.int64) for x in times]
        got = torch.cat([end.packet, torch.stack(extra).to(torch.int64), *words]).tolist()
        if times is not None:
            self.times, got = _BITS.unpack(_WORDS.pack(*got[-3:])), got[:-3]
        self.running, self.failed, self.max_crossed = got[0], got[1], got[2]
        nh = len(health_flags)
        health, rest = got[3 : 3 + nh], got[3 + nh :]
        if end.jumped is not None:
            self.jumped, rest = rest[0], rest[1:]
        if accept is not None:
            self.accepted, rest = rest[0], rest[1:]
        if hooks is not None:
            self.landed_running = rest[0]
            hooks.after_fetch(rest[1:])
        return health

    def must_stop(self, on_failure: str) -> bool:
        """Nothing runs, or something failed and failures raise."""
        return not self.running or (self.failed and on_failure == "raise")


_WORDS, _BITS = struct.Struct("<3q"), struct.Struct("<3d")  # three int64 words of the packet <-> three float64


class DenseOutput:
    """The outputs ``[T, G, N]``, filled from each step's dense output at the output times it passed.

    ``rows`` (shared mode, ``solve_adaptive``'s lean loop): the outputs are kept as a list of ``[m, N]`` blocks (one
    per step that passed output times) and concatenated once at the end (``write_rows``), instead of written into a
    buffer one masked write per output (``write``; under backprop an in-place write records a node whose backward
    copies the whole buffer's gradient). With ``shape`` (the state kept in func's shape) the blocks are
    ``[m, *shape]``.
    """

    def __init__(self, grid: _Grid, y0: torch.Tensor, rows: bool = False, shape: torch.Size | None = None):
        G, N = y0.shape
        self.grid = grid
        self.rows = self.out = None
        self.shape = shape  # rows mode with the state in func's shape: the blocks are [m, *shape]
        if rows:
            self.use_rows(y0)
        else:
            # Row T: scratch for masked writes. Rows never reached stay NaN.
            self.out = torch.full((grid.T + 1, G, N), math.nan, dtype=y0.dtype, device=y0.device)
            self.out[0] = y0

    def use_rows(self, y0: torch.Tensor) -> None:
        """Switch to ``rows`` mode (the outputs so far: ``y0`` alone)."""
        self.rows = [y0 if self.shape is None else y0.view(1, *self.shape)]
        self.n_rows = 1
        self.t_host = None

    def write_rows(self, ops: StepOps, tableau, s: LoopState, plan: StepPlan, fin: StepResult, K, n_cross: int,
                   times: tuple | None = None):
        """``write`` in ``rows`` mode: the one group passed outputs ``n_rows ... + n_cross - 1`` (in order), all
        interpolated in one call where the backend takes several thetas (one graph node per step, not per output).

        ``times``: the step's start, step and end as host floats (float64 time; ``HostPacket.times``). Then theta
        is formed on the host, in the same float64 arithmetic as ``_dense_at``, and the output that is the step's
        end exactly (only the last one passed can be) is ``fin.y_new`` itself, with no interpolation."""
        k0 = self.n_rows
        self.n_rows += n_cross
        if times is None:
            tj = self.grid.t_out[0, k0 : k0 + n_cross]  # [m]
            if ops.interpolates_many:
                self.rows.append(_dense_at(ops, tableau, s, plan, fin, K, tj))  # [m, N]
            else:
                self.rows.append(torch.cat([_dense_at(ops, tableau, s, plan, fin, K, tj[m : m + 1])
                                            for m in range(n_cross)]))
            return
        if self.t_host is None:
            self.t_host = self.grid.t_out[0].tolist()
        t0, h, t_new = times
        tj = self.t_host[k0 : k0 + n_cross]
        at_end = tj[-1] == t_new
        if at_end:
            tj.pop()
        if tj:
            hd = h if h > 0 else 1.0
            theta = torch.tensor([(x - t0) / hd for x in tj], dtype=torch.float64, device=s.y.device)
            if ops.interpolates_many:
                self.rows.append(ops.interpolate(tableau, s.y, K, plan.h_state, theta))  # [m, N]
            else:
                self.rows.extend(ops.interpolate(tableau, s.y, K, plan.h_state, theta[m : m + 1])
                                 for m in range(len(tj)))
        if at_end:
            self.rows.append(fin.y_new if self.shape is None else fin.y_new.unsqueeze(0))

    def write(self, ops: StepOps, tableau, s: LoopState, plan: StepPlan, fin: StepResult, K, crossed, n_cross: int):
        """Outputs ``s.next_out + m`` for ``m < crossed`` (per group) of the step from ``s`` described by ``plan``."""
        g = self.grid
        for m in range(n_cross):
            j = s.next_out + m
            jj = torch.where(m < crossed, j, g.T)
            tj = g.t_out[g.rows, j.clamp_max(g.T - 1)]
            self.out.index_put_((jj, g.rows), _dense_at(ops, tableau, s, plan, fin, K, tj))

    def result(self) -> torch.Tensor:
        if self.rows is not None:  # rows never reached (a failed solve that returns) are NaN
            left = self.grid.T - self.n_rows
            missing = [self.rows[0].new_full((left, *self.rows[0].shape[1:]), math.nan)] if left else []
            return torch.cat(self.rows + missing).view(self.grid.T, 1, -1)
        return self.out[: self.grid.T]


def _dense_at(ops: StepOps, tableau, s: LoopState, plan: StepPlan, fin: StepResult, K, tj: torch.Tensor):
    """The dense output of the step from ``s`` (``plan``, ``fin``) at the times ``tj`` ([G], or [M] of the one group
    where the backend ``interpolates_many``); exactly at the step's end the solution itself (no interpolation
    rounding)."""
    theta = (tj - s.t) / torch.where(plan.h > 0, plan.h, 1.0)
    val = ops.interpolate(tableau, s.y, K, plan.h_state, theta)
    return torch.where((tj == plan.t_new).unsqueeze(1), fin.y_new, val)


def solve_adaptive(f: FlatFunc, problem: AdaptiveProblem, ops: StepOps, *, hooks=None, event_fn=None,
                   stats: st.SolveStats):
    """Integrate ``y' = f(tau, y)`` from ``tau[..., 0]``; return outputs ``[T, G, N]`` (or the event pair).

    Args:
        problem: the flat problem (``y0: [G, N]``, ``tau: [T]`` or ``[G, T]``, tableau, config, tolerances, norm).
        event_fn: flat event function ``(tau [G], y [G, N]) -> [G]``; when given, ``tau`` holds only the start.
        hooks: the adjoint's backward solve (``fastnode._adjoint.BackwardHooks``): steps land exactly on every
            output time, where ``hooks.land`` changes the state (cotangents added, state reset) and the
            derivative is re-evaluated; ``hooks`` also sees every evaluation and step decision (parameter
            quadrature) and may add to the error ratio. No outputs are stored.
    Returns:
        ``out: [T, G, N]`` (rows never reached are NaN when ``on_failure="return"``), or with ``event_fn``
        ``(event_tau [G], out [2, G, N])``; with ``hooks`` the final state ``[G, N]``.
    """
    grid = _Grid(problem, event_fn is not None, hooks is not None)
    if event_fn is None and grid.T == 1:
        return problem.y0 if hooks is not None else DenseOutput(grid, problem.y0).result()
    lean, out = _outputs(f, problem, ops, grid, hooks, event_fn)
    events = None if event_fn is None else EventTracker(event_fn, problem.tableau)
    packet = HostPacket()
    s, ops = _start(f, problem, ops, grid, hooks, events, packet, stats)
    health = HealthCheck(problem.tableau, problem.config.on_stiff, s.t.shape[0], s.t.device, s.t.dtype,
                         event_fn is not None)
    raise_on_failure = problem.config.on_failure == "raise"
    iterations = 0
    fast = None
    if problem.config.compile is not None:
        fast = compiled_loop(f, problem, grid, hooks, events, stats,
                             land=lambda s, crossed, running, lr: _land(f, hooks, s, crossed, running, lr))
    lean = lean and fast is None
    if lean and out.rows is None:  # options['compile'] fell back to eager
        out.use_rows(problem.y0)
    step = _stepper(f, ops, problem, grid, hooks, events, health, lean)
    # The lean loop on CPU reads its step's times with the packet (float64 bits), so dense output forms theta on the
    # host (on a GPU the thetas would be one more copy to the device per output step: they stay there).
    host_times = lean and grid.t_out.dtype == torch.float64 and grid.t_out.is_cpu
    while packet.running and not (packet.failed and raise_on_failure):
        if fast is not None:  # options['compile']: unwatched iterations run compiled, k per host transfer
            s, iterations, ran = fast.run(s, out, packet, health, iterations)
            if ran:
                continue
        iterations += 1
        watch = health.watching(iterations)
        s_old = s
        s, plan, K, fin, end = step(s, watch)
        health.after_fetch(packet.fetch(end, hooks, health.packet_flags() if watch else None,
                                        fin.accept if lean else None,
                                        (s_old.t, plan.h, plan.t_new) if host_times else None))
        if lean and not packet.accepted:  # the step advanced unconditionally (see _stepper): undo a rejection
            s.y, s.f = s_old.y, s_old.f
        n_cross = packet.max_crossed
        if n_cross:
            if lean:
                out.write_rows(ops, problem.tableau, s_old, plan, fin, K, n_cross, packet.times)
            elif out is not None:
                out.write(ops, problem.tableau, s_old, plan, fin, K, end.crossed, n_cross)
            else:
                _land(f, hooks, s, end.crossed, end.running, packet.landed_running)
            s.next_out = s.next_out + end.crossed
        if packet.jumped:
            _restart_after_jump(f, s, end.jumped, hooks)
    f.shaped = False
    stats.n_host_syncs += packet.n + (f.callbacks.take_syncs() if f.callbacks is not None else 0)
    stats.n_iterations = iterations
    _finish(f, problem, grid, s, stats, health)
    if hooks is not None:
        return s.y
    if events is None:
        return out.result()
    return events.finish(ops, s.f, problem.y0, s.t.detach() * f.sign, stats, problem.config.on_failure)


def _outputs(f: FlatFunc, problem: AdaptiveProblem, ops: StepOps, grid: _Grid, hooks, event_fn):
    """``(lean, out)``: whether the solve runs the lean loop, and its DenseOutput (None with ``hooks``); sets
    ``f.shaped``.

    Lean loop (one group, shared mode): the packet also carries the group's decision, so the state advances without a
    where per step, and the outputs are rows stacked once, all those a step passed interpolated in one call (the masks
    are needed only with several groups). Under backprop each of those ops would also be a graph node whose backward
    runs; without a graph they are still several small ops per output time. A compiled solve writes the buffer,
    unless options['compile'] falls back to eager (known only later). The lean loop may also keep a single-tensor state
    in the shape func takes (no view of each stage input and output, nor their graph nodes), where every op it runs
    takes that shape (``_keeps_shape``).
    """
    lean = hooks is None and event_fn is None and grid.squeeze and not grid.time_grad
    eager = problem.config.compile is None
    f.shaped = lean and eager and _keeps_shape(f, problem, ops, grid)
    out = None if hooks is not None else DenseOutput(grid, problem.y0, rows=lean and eager,
                                                     shape=f.shape if f.shaped else None)
    return lean, out


def _start(f: FlatFunc, problem: AdaptiveProblem, ops: StepOps, grid: _Grid, hooks, events, packet: HostPacket,
           stats: st.SolveStats) -> tuple[LoopState, StepOps]:
    """``f(t0, y0)``, failures at ``t0``, the backend once it is known whether the solve records a graph, the set-up
    transfer and the first step."""
    y0 = problem.y0.view(f.shape) if f.shaped else problem.y0
    t = grid.t_out[:, 0].contiguous()
    k1 = f(t, y0)
    G = t.shape[0]
    # Only now is it known whether this solve records an autograd graph (func's parameters may need grad).
    ops = for_recording(ops, torch.is_grad_enabled() and (y0.requires_grad or k1.requires_grad or
                                                          grid.t_out.requires_grad))
    stats.backend = ops.name
    k1, status, running = _start_checks(k1, t, y0, grid, events, packet)
    if hooks is not None:
        hooks.k1_evaluated(torch.ones_like(running), k1)
    h = _first_step(f, problem, ops, t, k1, packet)
    dev = y0.device
    s = LoopState(t=t, h=h, y=y0, f=k1, running=running, status=status,
                  n_attempted=torch.zeros(G, dtype=torch.int64, device=dev),
                  n_accepted=torch.zeros(G, dtype=torch.int64, device=dev),
                  prev_ratio=torch.ones(G, dtype=t.dtype, device=dev),
                  last_nonfinite=torch.zeros(G, dtype=torch.bool, device=dev),
                  next_out=torch.ones(G, dtype=torch.int64, device=dev))
    return s, ops


def _keeps_shape(f: FlatFunc, problem: AdaptiveProblem, ops: StepOps, grid: _Grid) -> bool:
    """Whether the lean loop keeps the state in func's shape: one plain tensor (``FlatFunc.shape``) and a backend
    whose ops take it (``takes_state_shape``) on the path this solve takes (CPU, float32/64 state, float64 time, the
    built-in norm)."""
    y0 = problem.y0
    return (ops.takes_state_shape and f.shape is not None and y0.is_cpu and y0.dtype in (torch.float32, torch.float64)
            and grid.t_out.dtype == torch.float64 and isinstance(problem.norm, RMSNorm)
            and problem.tableau.e is not None)


def _start_checks(k1: torch.Tensor, t: torch.Tensor, y0: torch.Tensor, grid: _Grid, events,
                  packet: HostPacket) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Failures at t0 and the set-up transfer: ``(k1, status, running)``, a failed group's stage zeroed. A
    non-finite derivative at the start cannot be fixed by any step size: those groups fail at once."""
    G, dev = t.shape[0], t.device
    if events is None and G == 1:
        # One group (t0 < t_end: t is strictly monotone): the transfer is whether k1 is finite. A finite sum proves
        # it with one reduction; only a non-finite sum (a bad value, or finite values that overflow) is checked value
        # by value (a second transfer).
        with torch.no_grad():
            ok = math.isfinite(k1.sum().item())
            if not ok:
                packet.n += 1
                ok = bool(torch.isfinite(k1).all())
        packet.n += 1
        packet.failed, packet.running = int(not ok), int(ok)
        status = torch.full((1,), 0 if ok else st.NON_FINITE, dtype=torch.int8, device=dev)
        return (k1 if ok else torch.zeros_like(k1)), status, torch.full((1,), ok, dtype=torch.bool, device=dev)
    with torch.no_grad():
        bad0 = ~torch.isfinite(k1.reshape(G, -1)).all(dim=1)
    status, running = torch.where(bad0, st.NON_FINITE, 0).to(torch.int8), (t < grid.t_end) & ~bad0
    k1 = torch.where(_per_group(bad0, k1), torch.zeros_like(k1), k1)
    if events is not None:
        running = events.start(t, y0, running)
    packet.fetch_start(status, running)
    return k1, status, running


def _first_step(f: FlatFunc, problem: AdaptiveProblem, ops: StepOps, t: torch.Tensor, k1: torch.Tensor,
                packet: HostPacket) -> torch.Tensor:
    """[G] the first proposal: ``first_step`` or the Hairer-Norsett-Wanner estimate (0 when nothing runs)."""
    cfg, y0 = problem.config, problem.y0
    G, dev, tdt = y0.shape[0], y0.device, t.dtype
    if packet.must_stop(cfg.on_failure):
        return torch.zeros(G, dtype=tdt, device=dev)
    first = cfg.first_step
    if isinstance(first, torch.Tensor):
        h = first.to(dtype=tdt, device=dev).expand(G).clone()
    elif first is not None:
        h = torch.full((G,), float(first), dtype=tdt, device=dev)
    else:
        h = ops.initial_step(f.probe, t.detach(), y0.detach(), k1.detach().reshape(y0.shape), cfg.ctrl.order,
                             problem.rtol, problem.atol, problem.norm)
    return h.clamp(cfg.ctrl.min_step, cfg.ctrl.max_step)


def _stepper(f: FlatFunc, ops: StepOps, problem: AdaptiveProblem, grid: _Grid, hooks, events, health: HealthCheck,
             lean: bool = False):
    """The step as a function of the state, with the solve's constants bound once (the loop's per-step Python time
    is the CPU goal): ``step(s, watch) -> (next state, plan, K, fin, end)``, one attempt for every group from ``s``
    (set-up, stages, finish, events, bookkeeping, advance), with no host transfer. ``watch``: ``health`` observes
    this step (its stage inputs, decision) and may end groups (``step_end``'s ``fail``).

    ``lean`` (one group, no time gradients): the state and FSAL stage advance unconditionally, and the loop restores
    them once the packet says the step was rejected; no ``torch.where`` per step (nor its node in a recorded graph)."""
    tab, cfg = problem.tableau, problem.config
    c, sign, squeeze, to_outputs = tab.c, f.sign, grid.squeeze, grid.to_outputs
    t_out, t_end, stops, jump_t = grid.t_out, grid.t_end, grid.stops, grid.jump_t
    end_perturb, time_grad = grid.end_perturb, grid.time_grad
    rtol, atol, norm, ctrl, max_steps = problem.rtol, problem.atol, problem.norm, cfg.ctrl, cfg.max_num_steps
    # Stages 1..S-1: their row of a, and whether they sit at the step's end (c = 1), where they see t_new exactly
    # (with jump_t the left limit there, so a step that lands on a discontinuity never mixes in the right side).
    rows = [(i, tab.a[i], c[i] == 1.0) for i in range(1, tab.num_stages)]
    step_begin, finish_control, step_end = ops.step_begin, ops.finish_control, ops.step_end
    new_stages, set_stage, stage = ops.new_stages, ops.set_stage, ops.stage
    rk_combine, lists = ops.combiner(problem.y0.dtype), ops.stages_are_lists
    last = tab.num_stages - 1
    cb = f.callbacks  # torchdiffeq's step callbacks of func (fastnode/_callbacks.py), or None

    keep = () if health.pair is None else health.pair
    shaped = f.shaped  # the state is kept in func's shape (solve_adaptive's _keeps_shape)
    halve = hooks is not None  # the adjoint's backward solve: see halve_before_output

    def step(s: LoopState, watch: bool = False):
        y = s.y
        h_try = halve_before_output(s.t, s.h, s.running, s.next_out, t_out) if halve else s.h
        if cb is not None:
            cb.step(s.t, y, torch.where(s.running, h_try, 0.0))
        inputs = {0: y} if watch else None
        plan = step_begin(s.t, h_try, s.running, t_out, t_end, to_outputs, c, sign, y.dtype, squeeze, stops=stops,
                          end_perturb=end_perturb, time_grad=time_grad)
        hy = plan.h_state
        t_stage = plan.t_stage.unbind(0)  # every stage's time as func sees it (one op for all of them)
        if hooks is not None:
            hooks.begin_step(hy)
        K = [s.f] if lists else set_stage(new_stages(tab, y), 0, s.f)  # stage 0: the last one of the step before
        for i, a_i, at_end in rows:
            yi = rk_combine(y, K, hy, a_i)
            if watch and i in keep:
                inputs[i] = yi
            k = f(None, yi, 0, plan.t_end_stage if at_end else t_stage[i])
            if lists:
                K.append(k)
            else:
                K = set_stage(K, i, k)
            if hooks is not None:
                hooks.stage_evaluated(i)
        floor, adjust = (None, None) if hooks is None else _hooks_ratio(hooks)
        fin = finish_control(tab, y, K, hy, rtol, atol, norm, ctrl, plan.h_ctl, s.prev_ratio, s.running,
                             ratio_floor=floor, adjust=adjust)
        if cb is not None:
            cb.decided(s.t, y, plan.h_ctl, fin.accept, s.running)
        stop = None if events is None else events.after_step(s, plan, fin, K)  # event crossings end groups
        fail = health.observe(s, plan, fin, *_rows_of(K, inputs, shaped), ops, t_end) if watch else None
        end = step_end(fin.accept, fin.h_next, h_try, plan.clipped, s.running, s.t, plan.t_new, t_end, s.n_attempted,
                       s.n_accepted, s.status, s.last_nonfinite, fin.ok, s.next_out, t_out, max_steps, _CODES,
                       jump_t=jump_t, stop=stop, fail=fail)
        if hooks is not None:
            hooks.end_step(fin.accept, end.running, fin.ok | ~s.running)
        # Advance: accepted groups move to the step's end (before the loop's host transfer, so on a GPU these
        # launches queue up ahead of it); next_out moves in the host part, once the packet says how many output
        # times the step passed. Positional, in LoopState's field order.
        if lean:
            y_next, f_next = fin.y_new, stage(K, last)
        else:
            acc = fin.accept.unsqueeze(1)
            y_next, f_next = torch.where(acc, fin.y_new, y), torch.where(acc, stage(K, last), s.f)
        s_next = LoopState(end.t, end.h, y_next, f_next, end.running, end.status, end.n_attempted, end.n_accepted,
                           fin.prev_ratio, end.last_nonfinite, s.next_out)
        return s_next, plan, K, fin, end

    return step


def _rows_of(K, inputs: dict, shaped: bool) -> tuple:
    """The stages and stage inputs as the health check reads them: [G, N] rows (with no graph, from func's shape when
    the state is kept so: one group)."""
    if not shaped:
        return K, inputs
    with torch.no_grad():
        return [k.reshape(1, -1) for k in K], {i: v.reshape(1, -1) for i, v in inputs.items()}


def _hooks_ratio(hooks) -> tuple:
    """The adjoint's ``(ratio_floor, adjust)`` for ``finish_control``: the quadrature's floor of the error ratio, and
    its step ratio where a custom adjoint norm scores the step."""
    return hooks.ratio_floor(), (hooks.step_ratio if hooks.custom_norm is not None else None)


def _land(f: FlatFunc, hooks, s: LoopState, crossed: torch.Tensor, running: torch.Tensor, landed_running: int) -> None:
    """The adjoint at the output times this step landed on (``crossed`` [G] > 0): the state changes there
    (``hooks.land``), and a group that keeps running (``running`` [G]) gets a fresh derivative."""
    landed = crossed > 0
    s.y = hooks.land(s.next_out, landed, s.y)
    if landed_running:
        k_new = f(s.t, s.y)
        mask = landed & running
        s.f = torch.where(mask.unsqueeze(1), k_new, s.f)
        hooks.k1_evaluated(mask, k_new)


def _per_group(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [G] mask shaped to broadcast over the state ``x`` ([G, N], or func's shape with G = 1)."""
    return mask.reshape(mask.shape[0], *([1] * (x.dim() - 1)))


def _restart_after_jump(f: FlatFunc, s: LoopState, jumped: torch.Tensor, hooks) -> None:
    """Past a discontinuity the derivative is re-evaluated on the far side (one extra evaluation)."""
    k_far = f(s.t, s.y, perturb=1)
    s.f = torch.where(_per_group(jumped, k_far), k_far, s.f)
    if hooks is not None:
        hooks.k1_evaluated(jumped, k_far, at_output=torch.zeros_like(jumped))  # not an output time


def _finish(f: FlatFunc, problem: AdaptiveProblem, grid: _Grid, s: LoopState, stats: st.SolveStats,
            health: HealthCheck) -> None:
    """Statistics, and the failure report (raised with ``on_failure="raise"``)."""
    stats.h_final = s.h.detach()
    t_user = s.t.detach() if f.sign > 0 else -s.t.detach()
    stats.status = s.status.to(torch.int64)
    stats.t_reached = t_user
    if problem.spec.per_sample:
        stats.n_accepted, stats.n_rejected, stats.n_steps = s.n_accepted, s.n_attempted - s.n_accepted, s.n_attempted
        failed = bool((s.status != 0).any())
    else:  # one group: its counts and status in one transfer
        n_acc, n_att, code = torch.cat([s.n_accepted, s.n_attempted, stats.status]).tolist()
        stats.n_accepted, stats.n_rejected, stats.n_steps = n_acc, n_att - n_acc, n_att
        failed = code != 0
    if failed:
        t_end_user = grid.t_end * f.sign
        cfg = problem.config
        msg, bad, times = _failure_message(problem.spec, s.status, t_user, s.n_attempted, cfg.max_num_steps,
                                           t_end_user.detach(), health)
        stats.messages.append(msg)
        if cfg.on_failure == "raise":
            raise st.SolverError(msg, status=stats.status, samples=bad, times=times)


def _failure_message(spec: StateSpec, status: torch.Tensor, t_user: torch.Tensor, n_att: torch.Tensor,
                     max_steps: int, t_end_user: torch.Tensor, health: HealthCheck) -> tuple[str, list, list]:
    bad = (status != st.SUCCESS).nonzero().flatten().tolist()
    codes = status.tolist()
    n_att = n_att.tolist()
    times = t_user.tolist()
    ends = t_end_user.tolist()
    lines = []
    facts = health.details()
    for i in bad[:10]:
        who = f"sample {i}" if spec.per_sample else "the solve"
        what = st.STATUS_NAMES[codes[i]]
        why = health.explain(codes[i], i, facts)
        if why is not None:
            what = why
        elif codes[i] == st.MAX_STEPS:
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
