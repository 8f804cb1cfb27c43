"""Compiled steps: the whole adaptive step, ``func`` included, as one ``torch.compile``'d function of the loop state.

With ``options={"compile": True}`` (or a ``torch.compile`` mode string) ``solve_adaptive`` hands its iterations to
``CompiledLoop.run``. One step (``step_begin``, every stage with the user's ``func``, ``finish_control``,
``step_end``, the dense outputs it passes and the advance) is a pure function of the ``LoopState`` tensors, the
output buffer and the solve's constant tensors, built from the reference ops (``backends.torch_ops``), so Inductor
sees plain aten ops it can fuse with ``func``'s elementwise work. It is compiled with ``fullgraph=True`` and
``dynamic=False``: shapes are static, and a group that has finished is a no-op on the device (its step size is 0
and every update is masked with ``torch.where``), so no Python control flow depends on data.

The host runs the compiled step ``k`` times back to back and only then reads one packet (any running, any failed,
iterations in which something ran, the slowest group's progress): one host transfer per ``k`` steps instead of
one per step. ``k`` is ``options['steps_per_sync']``; by default 1 on CPU (the read is a plain copy there, and an
overshooting round would waste whole steps) and adaptive on CUDA: the remaining iterations are estimated from the
progress so far and a round takes about half of them (at most ``MAX_STEPS_PER_SYNC``), so the steps a round runs
after every group has finished (``stats.n_idle_steps``, work that is wasted) stay few while the transfers grow
only like the logarithm of the iterations.

What runs eager instead (``stats.compile_fallback`` says why): steps that ``fastnode._health`` watches (a few
windows from iteration 256 on), events, ``jump_t``, ``func``'s step callbacks, gradients with respect to ``t``, a
callable ``options['norm']``, the parts of the adjoint's backward solve that ``fastnode._compiled_adjoint`` names
(a callable adjoint norm, parameters reached through tensors made outside ``func``), and any ``func`` that dynamo
cannot capture (a graph break, data-dependent Python control flow, ``.item()``): then one warning names dynamo's
reason and the solve runs eager, with the same results. The adjoint's backward solve otherwise runs compiled (its
vector-Jacobian products and the parameter quadrature inside the step), one step per host transfer, with the
landings on output times on the host.

Programs are cached per (func, tableau, shapes, dtypes, device, options), so a training loop compiles once; each
cache entry gets its own copy of the step's code object, so dynamo's per-code recompile limit never mixes entries.
"""

from __future__ import annotations

import time
import types
import warnings
from collections import OrderedDict

import torch

from . import _stats as st
from ._adjoint_dynamics import halve_before_output
from ._compiled_adjoint import BackwardTerms
from ._options import RMSNorm
from .backends.torch_ops import TorchStepOps, _const, _dense_tensor

_CODES = (st.NON_FINITE, st.STEP_UNDERFLOW, st.TIME_OVERFLOW, st.MAX_STEPS)
MAX_STEPS_PER_SYNC = 16  # adaptive k's cap: an overshoot wastes at most this many steps minus one
FIRST_ROUND = 1  # adaptive k's first round, before any progress is known
ADAPTIVE_ON_CPU = False  # the adaptive k on CPU too (tests set it; by default CPU solves read the packet every step)
# Graphs per grad mode before a program counts as uncapturable: a first step whose inputs differ in requires_grad
# from the later ones legitimately needs two; a func whose Python state changes every call (a counter attribute)
# makes dynamo recompile at every step, and is better run eager at once than after dynamo's limit of 8 compiles.
MAX_GRAPHS_PER_MODE = 2
CACHE_SIZE = 32  # compiled programs kept (least recently used dropped); each holds its func alive
_programs: OrderedDict = OrderedDict()
_warned: set = set()
# torch.compile's backend. Tests that check the solver's semantics through the captured graph set "aot_eager" (the
# same dynamo graph, functionalised by AOTAutograd, run without Inductor's minutes of C++ compiling on a CI core).
BACKEND = "inductor"
compiles = 0  # programs compiled (or recompiled by dynamo) in this process: the cache tests read it


class _Program:
    """One cached compiled step; ``failed`` holds dynamo's reason once capture failed (then the key runs eager)."""

    __slots__ = ("compiled", "fn", "func", "failed")

    def __init__(self, fn, func):
        self.fn, self.func, self.failed = fn, func, None
        self.compiled = {}  # grad mode -> graphs dynamo compiled for it


def unsupported_reason(f, problem, grid, hooks, events) -> str | None:
    """Why this solve cannot run compiled (None: it can)."""
    if hooks is not None:
        reason = BackwardTerms.unsupported(hooks)
        if reason is not None:
            return reason
    if events is not None:
        return "event_fn (event location is host-driven)"
    if f.callbacks is not None:
        return "func's step callbacks (Python code run at every step)"
    if problem.config.has_jumps:
        return "options['jump_t'] (a restart past each discontinuity)"
    if grid.time_grad:
        return "gradients with respect to t"
    if not isinstance(problem.norm, RMSNorm):
        return "a callable options['norm']"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python"
    return None


def compiled_loop(f, problem, grid, hooks, events, stats: st.SolveStats, land=None):
    """A ``CompiledLoop`` for this solve, or None (eager) with ``stats.compile_fallback`` set and one warning per
    reason and process. ``hooks``, ``land``: the adjoint's backward solve (``land(s, crossed, running,
    landed_running)`` does the landing on output times on the host)."""
    reason = unsupported_reason(f, problem, grid, hooks, events)
    if reason is None:
        return CompiledLoop(f, problem, grid, stats, None if hooks is None else BackwardTerms(hooks), land)
    stats.compile_fallback = reason
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fastnode: options['compile'] cannot compile this solve: {reason}; it runs eager",
                      RuntimeWarning, stacklevel=4)
    return None


def _tol_key(v):
    return ("tensor", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else float(v)


def _program_for(f, problem, grid, terms: BackwardTerms | None) -> _Program:
    """The cached program of this solve's key, built (not yet compiled: dynamo compiles at the first call)."""
    cfg, spec, y0 = problem.config, problem.spec, problem.y0
    stops = grid.stops
    key = (id(f.func), id(problem.tableau), tuple(map(tuple, spec.shapes)), spec.is_tuple, spec.per_sample,
           spec.dtype, tuple(y0.shape), y0.dtype, str(y0.device), tuple(grid.t_out.shape), grid.t_out.dtype,
           grid.to_outputs, grid.squeeze, f.sign, None if stops is None else stops.shape[0], cfg.ctrl,
           cfg.max_num_steps, cfg.compile, BACKEND, _tol_key(problem.rtol), _tol_key(problem.atol),
           None if problem.norm.segments is None else tuple(problem.norm.segments),
           None if terms is None else terms.key)
    prog = _programs.get(key)
    if prog is not None and prog.func is f.func:
        _programs.move_to_end(key)
        return prog
    step = _build_step(f, problem, grid) if terms is None else _build_backward_step(f, problem, grid, terms)
    # A fresh code object per entry: dynamo keeps its cache (and its recompile limit) per code object.
    step = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, step.__defaults__,
                              step.__closure__)
    mode = None if cfg.compile == "default" or BACKEND != "inductor" else cfg.compile
    prog = _programs[key] = _Program(torch.compile(step, fullgraph=True, dynamic=False, mode=mode, backend=BACKEND),
                                     f.func)
    while len(_programs) > CACHE_SIZE:
        _programs.popitem(last=False)
    return prog


def _pure_call(f):
    """``func`` on the flat state as ``FlatFunc`` calls it, without its counter (a Python side effect that dynamo
    would guard on): ``(t_user, y [G, N]) -> [G, N]``."""
    func, spec, sign = f.func, f.spec, f.sign
    wide = spec.work if spec.work != spec.dtype else None

    def call(t_user, y):
        if wide is not None:
            y = y.to(spec.dtype)
        flat = spec.flatten(func(t_user, spec.unflatten(y)), "func")
        if wide is not None:
            flat = flat.to(wide)
        return flat if sign > 0 else -flat

    return call


def _build_step(f, problem, grid):
    """The step as a pure function: loop-state tensors, output buffer, counter and the solve's constant tensors in;
    the next ones and the packet out (see ``CompiledLoop.run`` for the order)."""
    tab, cfg = problem.tableau, problem.config
    ops = TorchStepOps()
    c, sign, squeeze, to_outputs = tab.c, f.sign, grid.squeeze, grid.to_outputs
    ctrl, max_steps, norm = cfg.ctrl, cfg.max_num_steps, problem.norm
    rows = [(i, tab.a[i], c[i] == 1.0) for i in range(1, tab.num_stages)]
    call = _pure_call(f)
    dense = _dense_tensor(tab, problem.y0.dtype, problem.y0.device)  # [S, P]
    # NOTE: the reference ops read small constants from a global cache; dynamo guards on whether a key is in it, so
    # the keys the step reads are made before tracing (else the first eager use of one would force a recompile).
    _const(tuple(c), grid.t_out.dtype, grid.t_out.device)
    _const(tuple(_CODES), torch.int8, grid.t_out.device)
    used = [j for j in range(tab.num_stages) if any(tab.dense[j])]

    def step(t, h, y, k0, running, status, n_att, n_acc, prev_ratio, last_nf, next_out, out, busy,
             t_out, t_end, t0, stops, rtol, atol):
        plan = ops.step_begin(t, h, running, t_out, t_end, to_outputs, c, sign, y.dtype, squeeze, stops=stops)
        hy = plan.h_state
        K = [k0]
        for i, a_i, at_end in rows:
            K.append(call(plan.t_end_stage if at_end else plan.t_stage[i], ops.rk_combine(y, K, hy, a_i)))
        fin = ops.finish_control(tab, y, K, hy, rtol, atol, norm, ctrl, plan.h_ctl, prev_ratio, running)
        end = ops.step_end(fin.accept, fin.h_next, h, plan.clipped, running, t, plan.t_new, t_end, n_att, n_acc,
                           status, last_nf, fin.ok, next_out, t_out, max_steps, _CODES)
        out = _write_outputs(dense, used, y, K, plan, fin, t, next_out, end.crossed, t_out, out)
        acc = fin.accept.unsqueeze(1)
        busy = busy + running.any().to(busy.dtype)
        packet = _packet(end.running, end.status, busy, end.t, t0, t_end)
        return (end.t, end.h, torch.where(acc, fin.y_new, y), torch.where(acc, K[-1], k0), end.running, end.status,
                end.n_attempted, end.n_accepted, fin.prev_ratio, end.last_nonfinite, next_out + end.crossed, out,
                busy, packet)

    return step


def _build_backward_step(f, problem, grid, terms: BackwardTerms):
    """The adjoint's backward step as a pure function (``fastnode._compiled_adjoint``): the loop-state tensors,
    the counter, the quadrature's state (``terms.state()``) and the constant tensors in; the next ones, the output
    times each group landed on (``crossed`` [G]; ``next_out`` is advanced by the host's landing) and the packet
    out. The packet adds to the forward's the most output times crossed, whether a group that landed runs on and
    whether a running group turned non-finite (then a per-sample quadrature's step is run again eager)."""
    tab, cfg = problem.tableau, problem.config
    ops = TorchStepOps()
    c, sign, squeeze, to_outputs = tab.c, f.sign, grid.squeeze, grid.to_outputs
    ctrl, max_steps, norm = cfg.ctrl, cfg.max_num_steps, problem.norm
    rows = [(i, tab.a[i], c[i] == 1.0) for i in range(1, tab.num_stages)]
    (evaluate, first_stage), quad = terms.evaluator(), terms.quadrature(tab)
    update = terms.per_sample_update(tab, ops)
    n_extra = len(terms.state())
    _const(tuple(c), grid.t_out.dtype, grid.t_out.device)  # see _build_step
    _const(tuple(_CODES), torch.int8, grid.t_out.device)

    def step(*x):
        t, h, z, k0, running, status, n_att, n_acc, prev_ratio, last_nf, next_out, busy = x[:12]
        extra, (t_out, t_end, t0, stops, rtol, atol) = x[12 : 12 + n_extra], x[12 + n_extra :]
        h = halve_before_output(t, h, running, next_out, t_out)  # as the eager backward step
        plan = ops.step_begin(t, h, running, t_out, t_end, to_outputs, c, sign, z.dtype, squeeze, stops=stops)
        hz = plan.h_state
        if quad is not None:
            A, k1 = extra
            hs = hz.reshape(())
            S, E = quad[0](hs, k1)
        if update is not None:
            evals = [first_stage(plan.t_stage[0], z)]
        K, th = [k0], None
        for i, a_i, at_end in rows:
            k, th = evaluate(plan.t_end_stage if at_end else plan.t_stage[i], ops.rk_combine(z, K, hz, a_i))
            K.append(k)
            if quad is not None:
                S, E = quad[1](S, E, i, hs, th)
            if update is not None:
                evals.append(th)
        floor = None if quad is None else quad[2](A, S, E)
        fin = ops.finish_control(tab, z, K, hz, rtol, atol, norm, ctrl, plan.h_ctl, prev_ratio, running,
                                 ratio_floor=floor)
        end = ops.step_end(fin.accept, fin.h_next, h, plan.clipped, running, t, plan.t_new, t_end, n_att, n_acc,
                           status, last_nf, fin.ok, next_out, t_out, max_steps, _CODES)
        if quad is not None:  # SharedQuadrature.end_step: an accepted step adds its sum; its last stage is FSAL
            acc0 = fin.accept.reshape(())
            extra = (torch.where(acc0, A + S, A), torch.where(acc0, th, k1))
        tainted = (running & ~fin.ok).any()
        if update is not None:
            extra = (update(extra[0], evals, hz, fin.accept, tainted),)
        acc = fin.accept.unsqueeze(1)
        busy = busy + running.any().to(busy.dtype)
        landed = torch.stack([end.crossed.max().double(), ((end.crossed > 0) & end.running).any().double(),
                              tainted.double()])
        packet = torch.cat([_packet(end.running, end.status, busy, end.t, t0, t_end), landed])
        return (end.t, end.h, torch.where(acc, fin.y_new, z), torch.where(acc, K[-1], k0), end.running, end.status,
                end.n_attempted, end.n_accepted, fin.prev_ratio, end.last_nonfinite, next_out, busy, *extra,
                end.crossed, packet)

    return step


def _write_outputs(dense, used, y, K, plan, fin, t, next_out, crossed, t_out, out):
    """``out [T + 1, G, N]`` with the outputs this step passed (``next_out <= j < next_out + crossed`` per group)
    set to the step's dense output there, by a masked write over every output time (no host loop, no gather with
    data-dependent size); row ``T`` is scratch, as in ``_adaptive.DenseOutput``."""
    T = t_out.shape[1]
    j = torch.arange(T, device=t.device).unsqueeze(1)  # [T, 1]
    hit = (j >= next_out) & (j < next_out + crossed)  # [T, G]
    tj = t_out.t()  # [T, G]
    theta = ((tj - t) / torch.where(plan.h > 0, plan.h, 1.0)).to(y.dtype)
    powers = torch.stack([theta ** (p + 1) for p in range(dense.shape[1])], dim=-1)  # [T, G, P]
    w = (powers.unsqueeze(2) * dense).sum(dim=3)  # [T, G, S]: the reference's elementwise product-sum
    acc = None
    for s in used:
        term = w[:, :, s : s + 1] * K[s]
        acc = term if acc is None else acc + term
    val = torch.addcmul(y, plan.h_state.unsqueeze(1), acc)  # [T, G, N]
    # Exactly at the step's end the solution itself is returned (no interpolation rounding), as in eager.
    val = torch.where((tj == plan.t_new).unsqueeze(2), fin.y_new, val)
    return torch.cat([torch.where(hit.unsqueeze(2), val, out[:T]), out[T:]])


def _packet(running, status, busy, t, t0, t_end):
    """[4] float64: any running, any failed, iterations in which something ran, the slowest running group's
    fraction of its interval done (1 when none runs)."""
    frac = torch.where(running, (t - t0) / (t_end - t0), 1.0).min()
    return torch.stack([running.any().double(), (status != 0).any().double(), busy.double(), frac.double()])


def _dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process (its own counter; it grows at every compile or recompile)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class CompiledLoop:
    """Runs a solve's unwatched iterations compiled, ``k`` steps per host transfer (``run``)."""

    def __init__(self, f, problem, grid, stats: st.SolveStats, terms: BackwardTerms | None = None, land=None):
        self.prog = _program_for(f, problem, grid, terms)
        self.f, self.stats, self.terms, self.land = f, stats, terms, land
        # func calls per step (FSAL), and the per-sample adjoint's re-evaluation of the first stage
        self.evals = problem.tableau.num_stages - 1 + (0 if terms is None else terms.extra_evals)
        self.eager_next = False  # the next iteration runs eager (a compiled step was discarded)
        # NOTE: on CPU reading the packet is a copy, no device sync, while an overshooting round wastes whole
        # steps: one step per read there unless steps_per_sync says otherwise. On CUDA the read waits for the
        # queue to drain, so rounds grow with the estimated remaining iterations (unverified here: no GPU ran it).
        self.k = problem.config.steps_per_sync
        if terms is not None or (self.k is None and problem.y0.device.type == "cpu" and not ADAPTIVE_ON_CPU):
            self.k = 1  # the backward solve: a landing on an output time must happen before the next step
        # Dynamo traces the backward step's torch.autograd.grad only with this setting (read while tracing).
        self.config = torch._dynamo.config.patch(trace_autograd_ops=True) if terms is not None else None
        self.raise_on_failure = problem.config.on_failure == "raise"
        self.consts = (grid.t_out, grid.t_end, grid.t_out[:, 0], grid.stops, problem.rtol, problem.atol)
        if self.prog.failed is not None:
            stats.compile_fallback = self.prog.failed

    def run(self, s, out, packet, health, iterations: int):
        """Advance ``s`` (a ``LoopState``) compiled through the iterations after ``iterations`` that ``health``
        does not watch, filling ``out`` (``DenseOutput``; None in the backward solve, which lands on the output
        times instead, on the host) on the device, until nothing runs, something failed (with
        ``on_failure="raise"``) or, backward, a step landed. Sets ``packet``'s fields and transfer count, ``f.nfe``
        and the statistics.

        Returns:
            ``(state, iterations, ran)``; ``ran`` is False (and ``s`` unchanged) when the next iteration is watched
            or the step could not be compiled: the caller runs that iteration eager.
        """
        budget = health.unwatched(iterations)
        if budget <= 0 or self.prog.failed is not None or (self.terms is not None and not self.terms.ready()):
            return s, iterations, False
        if self.eager_next:
            self.eager_next = False
            return s, iterations, False
        # NOTE: s.t may be a strided view of t_out at the start (shared mode); a contiguous copy keeps dynamo from
        # compiling a second graph for that aliasing and stride.
        t = s.t.clone(memory_format=torch.contiguous_format)
        busy0 = torch.zeros((), dtype=torch.int64, device=t.device)
        x = (t, s.h, s.y, s.f, s.running, s.status, s.n_attempted, s.n_accepted, s.prev_ratio, s.last_nonfinite,
             s.next_out)
        x = x + ((out.out, busy0) if self.terms is None else (busy0, *self.terms.state()))
        if self.terms is not None:
            self.terms.enter()
        executed, pk, got, got_prev, prev, broken, crossed = 0, None, None, None, x, False, None
        while budget > 0 and not broken:
            k = min(self._round(iterations, got), budget)
            for _ in range(k):
                res = self._call(x)
                if res is None:
                    broken = True
                    break
                prev, (*x, pk) = x, res
                if self.terms is not None:
                    *x, crossed = x
                executed += 1
            budget -= k
            if pk is None:  # capture failed at the first step: nothing changed
                return self._abandon(s, x, iterations)
            got_prev, got = got, pk.tolist()  # the round's one host transfer
            packet.n += 1
            if self.terms is not None and got[6] and self.terms.kind == "per_sample":
                # A sample turned non-finite: this step's parameter products are the eager step's (it re-runs the
                # tainted evaluations on the samples with weight), so the step is dropped and run again eager.
                self.f.nfe += self.evals
                self.eager_next, x, got, executed = True, prev, got_prev, executed - 1
                if got is None:  # nothing kept: the caller runs this iteration eager now
                    self.eager_next = False
                    return self._abandon(s, x, iterations)
                break
            if not got[0] or (got[1] and self.raise_on_failure) or (self.terms is not None and got[4]):
                break
        return self._finish(s, x, out, packet, got, crossed, executed, iterations)

    def _abandon(self, s, x, iterations: int):
        """``run``'s end when no compiled step is kept: ``s`` unchanged, the quadrature's state handed back."""
        if self.terms is not None:
            self.terms.leave(tuple(x[12:]), s)
        return s, iterations, False

    def _finish(self, s, x, out, packet, got, crossed, executed: int, iterations: int):
        """``run``'s end: statistics, the new state, and (backward) the quadrature's state and the landing."""
        busy = int(got[2])
        packet.running, packet.failed, packet.max_crossed = int(got[0]), int(got[1]), 0
        self.f.nfe += self.evals * busy
        self.stats.n_idle_steps += executed - busy
        self.stats.compiled = True
        state = type(s)(*x[:11])
        if self.terms is None:
            out.out = x[11]
        else:
            self.terms.leave(tuple(x[12:]), state)
            if got[4]:  # landed on output times: cotangents, reset and re-evaluation on the host (eager)
                self.land(state, crossed, state.running, int(got[5]))
                state.next_out = state.next_out + crossed
        return state, iterations + busy, True

    def _round(self, iterations: int, got) -> int:
        """Steps in the next round: ``steps_per_sync``, or half the estimated remaining iterations (``got``: the
        last packet; the remaining iterations are extrapolated from the slowest group's progress)."""
        if self.k is not None:
            return self.k
        if got is None or got[3] <= 0.0:
            return FIRST_ROUND
        done = iterations + got[2]
        remaining = done * (1.0 - got[3]) / got[3]
        return max(1, min(MAX_STEPS_PER_SYNC, int(remaining / 2)))

    def _call(self, x):
        """One compiled step; None when dynamo or Inductor failed (then this key runs eager from now on)."""
        global compiles
        if self.prog.failed is not None:
            return None
        before = _dynamo_graphs()
        t0 = time.perf_counter()
        try:
            if self.config is None:
                res = self.prog.fn(*x, *self.consts)
            else:
                with self.config:
                    res = self.prog.fn(*x, *self.consts)
        except Exception as exc:  # noqa: BLE001  (any capture/compile failure: eager gives the same answer)
            self._fail(exc)
            return None
        if _dynamo_graphs() != before:  # this call compiled (first use, or a recompile: e.g. grad mode changed)
            compiles += 1
            self.stats.compile_seconds += time.perf_counter() - t0
            mode = torch.is_grad_enabled()
            n = self.prog.compiled[mode] = self.prog.compiled.get(mode, 0) + 1
            if n > MAX_GRAPHS_PER_MODE:  # this result is right; the next steps run eager
                self._fail(RuntimeError("dynamo recompiles at every step (func's Python state changes between "
                                        "calls, e.g. a counter attribute)"))
        return res

    def _fail(self, exc: Exception) -> None:
        msg = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")
        self.prog.failed = f"torch.compile could not capture the step ({reason})"
        self.stats.compile_fallback = self.prog.failed
        warnings.warn(f"fastnode: options['compile']: torch.compile could not capture the step with this func "
                      f"({reason}); the solve runs eager", RuntimeWarning, stacklevel=5)
