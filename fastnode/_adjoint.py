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
  parameter parts together; the step's weighted sums are kept aside and added if the step is accepted. The
  default norm puts their error estimate into the error control (torchdiffeq's default adjoint norm);
  ``adjoint_options={"norm": "seminorm"}`` leaves it out.
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
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import _stats as st
from ._adaptive import solve_adaptive
from ._callbacks import StepCallbacks, callbacks_of
from ._event_fn import combine_event_fn
from ._fixed import check_grid, solve_fixed, step_size_grid
from ._graph_retention import GraphRetention
from ._odeint import (
    Prepared,
    _make_norm,
    parse_adaptive_options,
    prepare,
    result_to_user,
    run_adaptive,
    run_fixed,
)
from ._problem import FlatFunc, StateSpec, _flag, _num, check_options, check_tol, time_dtype_of
from .backends import get_backend
from .backends.torch_ops import RMSNorm, TorchStepOps
from .solvers import get_solver


class _Eval:
    """One evaluation of the augmented dynamics, kept (graph alive) until its parameter weight is final."""

    __slots__ = ("cot", "mask", "out", "t", "tainted", "w", "y")

    def __init__(self, out, cot, t, y):
        self.out = out  # [G, N] f(t, y) with its graph to the parameters
        self.cot = cot  # [G, N] the cotangent per unit weight: sign * (-a)
        self.t = t  # user time(s) it was evaluated at (for a re-evaluation on a subset of samples)
        self.y = y  # [G, N] detached input state
        self.w = None  # [G] accumulated weight (integration-time units)
        self.mask = None  # [G] samples whose current first stage is this evaluation
        self.tainted = False  # some sample produced non-finite values in this evaluation's step


class ParamLayout:
    """The parameters as one flat vector ``[P]`` (one dtype), so the quadrature costs a few ops per step
    whatever the number of parameter tensors."""

    def __init__(self, params: tuple):
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.dtype = params[0].dtype if params else torch.float32
        for p in params[1:]:
            self.dtype = torch.promote_types(self.dtype, p.dtype)
        dev = params[0].device if params else None
        self.P = sum(self.sizes)
        self.seg = torch.repeat_interleave(torch.arange(len(params), device=dev),
                                           torch.tensor(self.sizes, device=dev)) if params else None
        self.count = torch.tensor(self.sizes, dtype=self.dtype, device=dev).clamp_min(1) if params else None

    def flat(self, grads) -> torch.Tensor:
        parts = [torch.zeros(n, dtype=self.dtype, device=p.device) if g is None else g.reshape(-1).to(self.dtype)
                 for p, g, n in zip(self.params, grads, self.sizes)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=self.dtype)

    def split(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [x.reshape(p.shape).to(p.dtype) for x, p in zip(v.split(self.sizes), self.params)]

    def rms_max(self, x: torch.Tensor) -> torch.Tensor:
        """max over parameter tensors of each tensor's RMS (torchdiffeq's mixed norm), in one pass."""
        sq = torch.zeros(len(self.sizes), dtype=x.dtype, device=x.device).index_add_(0, self.seg, x.square())
        return (sq / self.count).sqrt().amax()


class AugmentedFunc(FlatFunc):
    """The backward solve's right-hand side on ``Z = [y, a]`` (``[G, 2N]``), in integration time.

    ``mode``: ``"eager"`` (parameter vjps returned with the state's, kept in ``last``), ``"deferred"``
    (the evaluation's graph kept in ``last`` for a later weighted ``autograd.grad``) or ``None`` (no
    parameters).
    """

    def __init__(self, func: Callable, spec: StateSpec, aug_spec: StateSpec, sign: float, params: tuple,
                 mode: str | None):
        super().__init__(func, aug_spec, sign)
        self.state_spec = spec
        self.n = sum(spec.sizes)
        self.params = params
        self.layout = ParamLayout(params)
        self.mode = mode
        self.last = None
        self.keep = GraphRetention()  # retain_graph for the parameter products (fastnode/_graph_retention.py)

    def _f(self, t_user, y):
        return self.state_spec.flatten(self.func(t_user, self.state_spec.unflatten(y)), "func")

    def __call__(self, tau, z, perturb: int = 0, t_user=None, record: bool = True):
        self.nfe += 1
        if t_user is None:
            t_user = self.user_time(tau, perturb)
        n = self.n
        y = z[:, :n].detach()
        a = z[:, n:].detach()
        cot = -a
        with torch.enable_grad():
            y_ = y.clone().requires_grad_(True)
            mark = self.keep.mark() if self.mode is not None else None
            fy = self._f(t_user, y_)
            mode = self.mode if record else None
            vy = None
            if fy.requires_grad:
                if mode == "eager":
                    # retain_graph: func may use tensors computed outside it from the parameters (torchcde's
                    # spline coefficients); their graph is the caller's and serves every evaluation.
                    self.keep.observe(fy, mark)
                    grads = torch.autograd.grad(fy, (y_, *self.params), cot, allow_unused=True,
                                                retain_graph=self.keep.retain)
                    vy = grads[0]
                    v = self.layout.flat(grads[1:])
                    self.last = v if self.sign > 0 else -v
                else:
                    # The deferred quadrature differentiates the graph again later; y_ is fresh, so a product with
                    # y_ alone never runs (or frees) nodes outside func.
                    (vy,) = torch.autograd.grad(fy, (y_,), cot, allow_unused=True, retain_graph=mode == "deferred")
                    if mode == "deferred":
                        self.keep.observe(fy, mark)
                    if mode == "deferred":
                        self.last = _Eval(fy, cot if self.sign > 0 else -cot, t_user, y)
            elif mode == "eager":
                self.last = self.layout.flat([None] * len(self.params))
            elif mode == "deferred":
                self.last = _Eval(None, cot, t_user, y)
        if vy is None:
            vy = torch.zeros_like(y)
        res = torch.cat([fy.detach(), vy], dim=1)
        return res if self.sign > 0 else -res

    def probe(self, tau, z):
        return self(tau, z, record=False)


class BackwardHooks:
    """What the backward solve does besides integrating ``[y, a]`` (see ``solve_adaptive``'s ``hooks``).

    Keeps the parameter adjoint ``A`` (quadrature over accepted steps), adds each output time's cotangent
    and resets the state there, and records ``g_i . f(t_i, y_i)`` for the time gradients.
    """

    def __init__(self, aug: AugmentedFunc, tableau, Y: torch.Tensor, Gc: torch.Tensor, time_grads: bool,
                 theta_norm: str | None, theta_rtol: float, theta_atol: float, custom_norm: Callable | None):
        self.aug = aug
        self.tab = tableau
        self.Y = Y  # [T, G, N] forward states, backward order
        self.Gc = Gc  # [T, G, N] cotangents, backward order
        G = Y.shape[1]
        self.rows = torch.arange(G, device=Y.device)
        self.params = aug.params
        self.layout = aug.layout
        self.A = self.layout.flat([None] * len(self.params))
        self.mode = aug.mode
        self.theta_norm = theta_norm  # None: not in the error control; "rms": torchdiffeq's default
        self.rtol, self.atol = theta_rtol, theta_atol
        self.custom_norm = custom_norm
        self.need_err = theta_norm is not None or custom_norm is not None
        self.j_land = torch.zeros(G, dtype=torch.int64, device=Y.device)
        self.tdots = torch.zeros(Y.shape[0], G, dtype=Y.dtype, device=Y.device) if time_grads else None
        # eager (shared step) state
        self.k1 = None
        self.S = self.E = None
        self.h = None
        self.ops = TorchStepOps()  # the backend's adjoint_weights op; set by the backward solve
        # deferred (per-sample) state
        self.entries: list[_Eval] = []
        self.stage_evals: list[tuple[int, _Eval]] = []
        self.to_retire: list[_Eval] = []
        self.step_tainted = None
        self.stashed = None

    # --- evaluations -------------------------------------------------------------------------------------
    def k1_evaluated(self, mask: torch.Tensor, k: torch.Tensor, at_output: torch.Tensor | None = None) -> None:
        """A new first stage for the groups in ``mask`` (start, after an output time, after a jump).

        ``at_output``: groups for which this evaluation sits at the output time last landed on (default: ``mask``);
        its ``f`` gives that time's gradient.
        """
        if self.tdots is not None:
            mask_t = mask if at_output is None else at_output
            n = self.aug.n
            fy = k[:, :n] if self.aug.sign > 0 else -k[:, :n]
            dots = (fy * self.Gc[self.j_land, self.rows]).sum(dim=1)
            cur = self.tdots[self.j_land, self.rows]
            self.tdots.index_put_((self.j_land, self.rows), torch.where(mask_t, dots, cur))
        if self.mode == "eager":
            m = mask.reshape(())
            last = self.aug.last
            self.k1 = last if self.k1 is None else torch.where(m, last, self.k1)
        elif self.mode == "deferred":
            e = self.aug.last
            e.mask = mask.clone()
            e.w = torch.zeros(mask.shape, dtype=self.Y.dtype, device=mask.device)
            for old in self.entries:
                old.mask = old.mask & ~mask
            self.entries.append(e)

    def begin_step(self, hy: torch.Tensor) -> None:
        self.h = hy
        if self.mode == "eager":
            h = hy.reshape(())
            b0, e0 = self.tab.b[0], (self.tab.e[0] if self.need_err else 0.0)
            self.S = self.k1 * (h * b0)
            self.E = self.k1 * (h * e0) if self.need_err else None
        elif self.mode == "deferred":
            self.stage_evals = []

    def stage_evaluated(self, i: int) -> None:
        if self.mode == "eager":
            h = self.h.reshape(())
            th = self.aug.last
            b, e = self.tab.b[i], (self.tab.e[i] if self.E is not None else 0.0)
            if b:
                self.S.add_(th * (h * b))
            if e and self.E is not None:
                self.E.add_(th * (h * e))
        elif self.mode == "deferred":
            self.stage_evals.append((i, self.aug.last))

    # --- error control -------------------------------------------------------------------------------------
    def stash_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The norm given to the step for a custom adjoint norm: keep the scaled error, decide in step_ratio."""
        self.stashed = x
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def _theta_scaled(self) -> torch.Tensor:
        scale = torch.maximum(self.A.abs(), (self.A + self.S).abs()).mul_(self.rtol).add_(self.atol)
        return self.E / scale

    def step_ratio(self, ratio: torch.Tensor) -> torch.Tensor:
        if self.custom_norm is not None:
            n = self.aug.n
            x = self.stashed
            spec = self.aug.state_spec
            errs = self.layout.split(self._theta_scaled()) if self.params else []
            v = self.custom_norm((torch.zeros((), dtype=x.dtype, device=x.device), spec.unflatten(x[:, :n]),
                                  spec.unflatten(x[:, n:]), *errs))
            v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
            if v.numel() != 1:
                raise ValueError(f"adjoint_options['norm'] must return a scalar, got {v.numel()} values")
            return v.reshape(1).abs()
        return ratio

    def ratio_floor(self) -> torch.Tensor | None:
        """The parameter adjoint's error ratio (torchdiffeq's default adjoint norm), max'ed into the step's."""
        if self.theta_norm and self.params and self.custom_norm is None:
            return self.layout.rms_max(self._theta_scaled())
        return None

    # --- decisions ------------------------------------------------------------------------------------------
    def end_step(self, accept: torch.Tensor, running_next: torch.Tensor, finite: torch.Tensor) -> None:
        if self.mode == "eager":
            acc = accept.reshape(())
            # where, not multiply: a rejected step may hold non-finite values.
            self.A = torch.where(acc, self.A + self.S, self.A)
            self.k1 = torch.where(acc, self.aug.last, self.k1)
        elif self.mode == "deferred":
            b = self.tab.b
            S = self.tab.num_stages
            # [S, G]: h_g * b_j where sample g's step was accepted, else 0 (one backend op).
            W = self.ops.adjoint_weights(self.h, accept, b)
            self.step_tainted = (~finite).any()
            self.any_acc = accept.any()
            for e in self.entries:
                if b[0]:
                    e.w = e.w + torch.where(e.mask, W[0], 0.0)
                e.mask = e.mask & ~accept & running_next
            self.to_retire = []
            new = None
            for i, ev in self.stage_evals:
                ev.w = W[i]
                if i == S - 1:
                    new = ev
                elif b[i]:
                    self.to_retire.append(ev)
            self.stage_evals = []
            new.mask = accept & running_next
            self.entries.append(new)

    def packet_flags(self) -> list:
        if self.mode != "deferred":
            return []
        live = [e.mask.any() for e in self.entries]
        return [self.any_acc, self.step_tainted] + live

    def after_fetch(self, flags) -> None:
        if self.mode != "deferred":
            return
        any_acc, tainted, live = flags[0], flags[1], flags[2:]
        retire = self.to_retire if any_acc else []
        if tainted:
            # The step's evaluations (and the one starting the next step) hold non-finite rows: retire them
            # by re-evaluating on the samples with weight (0 * NaN would poison the shared parameter sum).
            for ev in retire:
                ev.tainted = True
            self.entries[-1].tainted = True
        keep = []
        for e, alive in zip(self.entries, live):
            (keep if alive else retire).append(e)
        self.entries = keep
        self.to_retire = []
        self._retire(retire)

    def _retire(self, evs: list[_Eval]) -> None:
        evs = [e for e in evs if e.out is not None and e.w is not None]
        if not evs or not self.params:
            return
        clean = [e for e in evs if not e.tainted]
        if clean:
            outs = [e.out for e in clean]
            cots = [e.cot * e.w.to(e.cot.dtype).unsqueeze(1) for e in clean]
            grads = torch.autograd.grad(outs, self.params, cots, allow_unused=True, retain_graph=self.aug.keep.retain)
            self._add(grads)
        for e in evs:
            if e.tainted:
                self._retire_subset(e)

    def _retire_subset(self, e: _Eval) -> None:
        idx = (e.w != 0).nonzero().flatten()
        if idx.numel() == 0:
            return
        spec = self.aug.state_spec
        sub = StateSpec(spec.is_tuple, [(idx.numel(), *s[1:]) for s in spec.shapes], True, idx.numel(), spec.sizes,
                        spec.dtype, spec.device, spec.cplx)
        self.aug.nfe += 1
        with torch.enable_grad():
            out = sub.flatten(self.aug.func(e.t[idx], sub.unflatten(e.y[idx])), "func")
            if out.requires_grad:
                cot = e.cot[idx] * e.w[idx].to(e.cot.dtype).unsqueeze(1)
                self._add(torch.autograd.grad(out, self.params, cot, allow_unused=True,
                                              retain_graph=self.aug.keep.retain))

    def _add(self, grads) -> None:
        self.A.add_(self.layout.flat(grads))

    # --- output times ---------------------------------------------------------------------------------------
    def land(self, j: torch.Tensor, landed: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """At output time ``j`` (backward order) for the groups in ``landed``: add its cotangent, reset y."""
        n = self.aug.n
        jj = j.clamp_max(self.Y.shape[0] - 1)
        m = landed.unsqueeze(1)
        y = torch.where(m, self.Y[jj, self.rows], z[:, :n])
        a = z[:, n:] + torch.where(m, self.Gc[jj, self.rows], 0.0)
        self.j_land = jj
        return torch.cat([y, a], dim=1)

    def finish(self) -> list[torch.Tensor]:
        if self.mode == "deferred":
            rest = self.entries + [ev for _, ev in self.stage_evals if ev.w is not None]
            self.entries, self.stage_evals = [], []
            self._retire(rest)
        return self.layout.split(self.A)


@dataclass
class _Plan:
    """Everything the adjoint's forward and backward need besides tensors."""

    p: Prepared
    params: tuple
    bwd_method: str
    bwd_options: dict
    bwd_rtol: object
    bwd_atol: object
    norm_mode: object  # "default" | "seminorm" | callable
    t_requires_grad: bool
    y0_user: object = None  # as given (a fixed-grid grid_constructor receives them)
    t_user: object = None


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
    p = plan.p
    spec = p.spec
    G, N = out.shape[1], out.shape[2]
    T = out.shape[0]
    params = plan.params
    stats_f = p.stats
    if T == 1:
        return grad_out[0], [torch.zeros_like(q) for q in params], (
            torch.zeros(G, 1, dtype=out.dtype, device=out.device) if plan.t_requires_grad else None)

    solver = get_solver(plan.bwd_method)
    if getattr(solver, "run", None) is not None:  # Adams, scipy: the augmented system, interval by interval
        from ._adjoint_plain import backward_plain

        return backward_plain(plan, out, grad_out, tau_fwd)
    tableau = solver.tableau
    opts = dict(plan.bwd_options)
    sign_b = -p.sign
    tau_b = (-tau_fwd).flip(-1).contiguous()
    tdt = time_dtype_of(opts) if "dtype" in opts else p.tau.dtype
    tau_b = tau_b.to(tdt)
    cfg = parse_adaptive_options(opts, tableau, sign_b, tdt, spec.device) if solver.adaptive else None
    ops = get_backend(opts.get("backend", "auto"), spec.device)

    aug_spec = StateSpec(False, [(G, 2 * N)], spec.per_sample, G, [2 * N], spec.dtype, spec.device)
    Y = out.flip(0)
    Gc = grad_out.flip(0)
    z0 = torch.cat([Y[0], Gc[0]], dim=1)

    # Tolerances: the state's for y and a; the parameter adjoint gets the smallest entry of a tensor tolerance.
    def tol(v, name):
        v = check_tol(name, v, spec)
        if isinstance(v, float):
            return v, v
        return torch.cat([v, v], dim=1), float(v.min())

    rtol_b, rtol_th = tol(plan.bwd_rtol, "adjoint_rtol")
    atol_b, atol_th = tol(plan.bwd_atol, "adjoint_atol")

    state_norm = _make_norm(p.options, spec)

    mode = None
    if params:
        mode = "deferred" if spec.per_sample else "eager"
    custom = plan.norm_mode if callable(plan.norm_mode) else None
    theta_norm = "rms" if (plan.norm_mode == "default" and mode == "eager" and solver.adaptive) else None
    aug = AugmentedFunc(p.func, spec, aug_spec, sign_b, params, mode)
    hooks = BackwardHooks(aug, tableau, Y, Gc, plan.t_requires_grad, theta_norm, rtol_th, atol_th, custom)
    hooks.ops = ops
    aug.callbacks = StepCallbacks.find(p.func, spec, sign_b, callbacks_of(solver), plan.bwd_method, adjoint=True,
                                       aug_params=lambda: hooks.layout.split(hooks.A))

    if custom is not None:
        norm = hooks.stash_norm
    else:
        # torchdiffeq's adjoint norm on [y, a]: the state's norm of each part, the larger one.
        if isinstance(state_norm, RMSNorm):
            # The built-in norm stays data (a fast backend fuses it): y's segments, then a's.
            segs = state_norm.segments or [(0, N)]
            norm = RMSNorm(segs + [(s + N, e + N) for s, e in segs])
        else:
            def norm(x):
                return torch.maximum(state_norm(x[:, :N]), state_norm(x[:, N:]))

    first = cfg.first_step if cfg is not None else None
    hf = stats_f.h_final
    if cfg is not None and first is None and hf is not None and bool(((hf > 0) & torch.isfinite(hf)).all()):
        # The forward's last proposed step size starts the backward: no probe evaluation, no ramp-up from the
        # (deliberately small) initial-step estimate. Measured A/B against the probe (MLP fields 8-32-8 and 32-64-32
        # and the test field, len(t) 2 and 10, both norms): fewer backward evaluations in 10 of 12 configurations;
        # a step too large for the adjoint costs one rejection.
        first = hf
    bstats = st.SolveStats(method=plan.bwd_method, per_sample=spec.per_sample)
    try:
        if not solver.adaptive:
            z_end = _solve_backward_fixed(aug, hooks, z0, tau_b, tableau, ops, opts, bstats)
        else:
            z_end = solve_adaptive(aug, aug_spec, z0, tau_b, tableau, ops, cfg.ctrl, rtol_b, atol_b, norm,
                                   first_step=first, max_num_steps=cfg.max_num_steps, step_t=cfg.step_t,
                                   jump_t=cfg.jump_t, on_failure="raise", stats=bstats, hooks=hooks)
        grads_theta = hooks.finish()
        f0 = None
        if hooks.tdots is not None:
            # f(t_0, y_0) for dL/dt_0 (below); one more evaluation of func, counted with the backward's.
            t_last = tau_b[..., -1]
            t0_user = aug.user_time(t_last.expand(G) if spec.per_sample else t_last.reshape(1))
            with torch.no_grad():
                aug.nfe += 1
                f0 = aug._f(t0_user, Y[-1])
    except st.SolverError as err:
        raise st.SolverError(f"adjoint (backward) solve failed: {err}", status=err.status, samples=err.samples,
                             times=err.times) from None
    finally:
        bstats.nfe = aug.nfe
        stats_f.backward = bstats
        stats_f.nfe_backward += aug.nfe
        stats_f.n_accepted_backward = _add_counts(stats_f.n_accepted_backward, bstats.n_accepted)
        stats_f.n_rejected_backward = _add_counts(stats_f.n_rejected_backward, bstats.n_rejected)

    adj_y0 = z_end[:, N:]
    t_grad = None
    if f0 is not None:
        # dL/dt_0 = -a(t_0+) . f(t_0, y_0), with a(t_0+) the adjoint before t_0's own cotangent.
        a_plus = adj_y0 - Gc[-1]
        tdots = hooks.tdots.clone()
        tdots[-1] = -(a_plus * f0).sum(dim=1)
        t_grad = tdots.flip(0).transpose(0, 1)  # [G, T] in the forward's order
    return adj_y0, grads_theta, t_grad


def _solve_backward_fixed(aug: AugmentedFunc, hooks: BackwardHooks, z0: torch.Tensor, tau_b: torch.Tensor, tableau,
                          ops, opts: dict, stats: st.SolveStats) -> torch.Tensor:
    """The backward solve with a fixed-grid method: the ``step_size`` grid from ``t[-1]`` (or the output times)
    with every output time added as a grid point; cotangents are added there. Returns the final state."""
    step_size = opts.get("step_size")
    if opts.get("grid_constructor") is not None:
        grid = _backward_grid(aug, hooks, tau_b, opts["grid_constructor"])
    elif step_size is not None:
        step_size = _num(opts, "step_size", None, lo=0.0, lo_open=True)
        grid = torch.cat([step_size_grid(tau_b, step_size), tau_b]).unique(sorted=True)
    else:
        grid = tau_b
    z = solve_fixed(aug, z0, tau_b, grid, tableau, ops, "linear", _flag(opts, "perturb", False), stats, hooks=hooks)
    if not bool(torch.isfinite(z).all()):
        raise st.SolverError("non-finite values (NaN/inf) in the fixed-grid backward solve; use a smaller "
                             "step_size or an adaptive adjoint_method", samples=[0])
    return z


def _backward_grid(aug: AugmentedFunc, hooks: BackwardHooks, tau_b: torch.Tensor, gc: Callable) -> torch.Tensor:
    """The backward grid from ``adjoint_options['grid_constructor']``, called once per output interval as
    torchdiffeq does: ``gc(func, y_i, t_pair)`` with ``y_i`` the forward state at ``t_i`` and ``t_pair`` the user
    times ``[t_i, t_{i-1}]``; the grids are joined (each must start at ``t_i`` and end at ``t_{i-1}``)."""
    spec = aug.state_spec
    parts = []
    for i in range(tau_b.numel() - 1):
        pair = tau_b[i : i + 2]
        t_pair = (pair * aug.sign).to(spec.dtype)
        with torch.no_grad():
            g = gc(aug.func, spec.unflatten(hooks.Y[i]), t_pair)
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
        g_t = None
        if ctx.needs_input_grad[2] and t_grad is not None:
            if plan.p.event_fn is not None:
                # Only t[0] moves the solution; the event time is an output without gradient here.
                g_t = torch.zeros_like(t)
                g0 = t_grad[:, 0]
                if t.dim() == 2:
                    g_t[:, 0] = g0.to(t.dtype)
                else:
                    g_t[0] = g0.sum().to(t.dtype)
            elif t.dim() == 2:
                g_t = t_grad.to(t.dtype)
            else:
                g_t = t_grad.sum(dim=0).to(t.dtype)
        return (None, adj_y0, g_t, *g_params)


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
            ``"seminorm"`` (the parameters' adjoint is left out of the error control) or a callable taking the
            tuple ``(t_err, y_err, adj_y_err, *adj_param_errs)`` (``t_err`` is always zero: no time adjoint is
            integrated). In per-sample mode the error control is per sample on ``(y, adj_y)``: a seminorm.
        adjoint_params: tensors to differentiate (default: ``func.parameters()``); those that do not require grad
            are left out, as in torchdiffeq.

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
    get_solver(method)
    method_name = method or "dopri5"
    bwd_method = method_name if adjoint_method is None else adjoint_method
    bwd_solver = get_solver(bwd_method)
    if bwd_method != method_name and options is not None and adjoint_options is None:
        raise ValueError(f"adjoint_method ({bwd_method!r}) differs from method ({method_name!r}), so adjoint_options "
                         "cannot be inherited from options; pass adjoint_options as well (e.g. adjoint_options={})")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    if adjoint_options is None:
        bwd_options = {k: v for k, v in (options or {}).items() if k != "norm"}
    else:
        bwd_options = check_options(adjoint_options, bwd_solver.adaptive, bwd_method, name="adjoint_options",
                                    extra=frozenset({"norm"}), valid=getattr(bwd_solver, "valid_options", None))

    p = prepare(func, y0, t, rtol, atol, method, options, event_fn)
    norm_mode = bwd_options.pop("norm", "default")
    if isinstance(norm_mode, str):
        if norm_mode not in ("seminorm", "default"):
            raise ValueError(f"adjoint_options['norm'] must be 'seminorm' or a callable, got {norm_mode!r}")
    elif not callable(norm_mode):
        raise TypeError(f"adjoint_options['norm'] must be 'seminorm' or a callable, got {type(norm_mode).__name__}")
    elif p.per_sample:
        raise ValueError("adjoint_options['norm'] as a callable is not supported with options['per_sample']=True: "
                         "per-sample error control uses each sample's own (y, adj_y) error (a seminorm)")
    if not bwd_solver.adaptive:
        gc = bwd_options.get("grid_constructor")
        if gc is not None and not callable(gc):
            raise TypeError(f"adjoint_options['grid_constructor'] must be callable, got {type(gc).__name__}")
        if gc is not None and bwd_options.get("step_size") is not None:
            raise ValueError("adjoint_options['step_size'] and adjoint_options['grid_constructor'] are mutually "
                             "exclusive")
        if callable(norm_mode):
            raise ValueError(f"adjoint_options['norm'] has no effect with the fixed-grid adjoint_method "
                             f"{bwd_method!r} (no error control); leave it out")
    if "per_sample" in bwd_options and _flag(bwd_options, "per_sample", False) != p.per_sample:
        raise ValueError(f"adjoint_options['per_sample'] ({bwd_options['per_sample']}) must match "
                         f"options['per_sample'] ({p.per_sample}): the backward solve uses the forward's step mode")
    if adjoint_options is not None and bwd_options.get("on_failure", "raise") != "raise":
        raise ValueError("adjoint_options['on_failure'] must be 'raise': a backward solve that fails has no "
                         "gradient to return")
    bwd_options.pop("per_sample", None)
    bwd_options.pop("on_failure", None)
    # Check the backward options now, not in the middle of backward().
    if bwd_solver.adaptive:
        parse_adaptive_options(bwd_options, bwd_solver.tableau, -p.sign, p.tau.dtype, p.spec.device)
    else:
        if bwd_options.get("step_size") is not None:
            _num(bwd_options, "step_size", None, lo=0.0, lo_open=True)
        _flag(bwd_options, "perturb", False)
    if "dtype" in bwd_options:
        time_dtype_of(bwd_options)
    bwd_rtol = rtol if adjoint_rtol is None else adjoint_rtol
    bwd_atol = atol if adjoint_atol is None else adjoint_atol
    check_tol("adjoint_rtol", bwd_rtol, p.spec)
    check_tol("adjoint_atol", bwd_atol, p.spec)

    t_req = isinstance(t, torch.Tensor) and t.requires_grad
    plan = _Plan(p, params, bwd_method, bwd_options, bwd_rtol, bwd_atol, norm_mode, t_req, y0, t)
    st._set_last(p.stats)
    y0_flat = p.spec.flatten(y0, "y0")
    try:
        res = OdeintAdjointFunction.apply(plan, y0_flat, t, *params)
    finally:
        p.stats.nfe = p.f.nfe
    res = result_to_user(p, res)
    return _differentiable_event_time(func, p, res) if p.event_fn is not None and torch.is_grad_enabled() else res


def _differentiable_event_time(func, p: Prepared, res):
    """``(event_t, solution)`` with the event time's gradient by the implicit function theorem, through the
    solution's fixed-time gradient (torchdiffeq's event time has a ``grad_fn`` whose gradient is dropped: zero)."""
    ev_t, sol = res
    state = tuple(s[-1] for s in sol) if isinstance(sol, tuple) else sol[-1]
    ev_t, _ = _reroute_event_gradient(func, p.event_fn, ev_t, state, p.per_sample, move_state=False)
    return ev_t, sol


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
    from ._odeint import odeint

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
    if per_sample and t0.numel() > 1:
        if t0.dim() != 1:
            raise ValueError(f"per-sample t0 must be [B], got shape {tuple(t0.shape)}")
        step = -1.0 if reverse_time else 1.0
        t = torch.stack([t0, t0.detach() + step], dim=1)
    else:
        if t0.numel() != 1:
            raise ValueError(f"t0 must hold one time (or [B] with options['per_sample']=True), got shape "
                             f"{tuple(t0.shape)}")
        t0f = t0.reshape(-1)
        t = torch.cat([t0f, t0f.detach() + (-1.0 if reverse_time else 1.0)])
    event_t, solution = odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)

    is_tuple = isinstance(solution, (tuple, list))
    state = tuple(s[-1] for s in solution) if is_tuple else solution[-1]
    event_t, state = _reroute_event_gradient(func, event_fn, event_t, state, per_sample)
    if is_tuple:
        solution = tuple(torch.cat([s[:-1], x.unsqueeze(0)], dim=0) for s, x in zip(solution, state))
    else:
        solution = torch.cat([solution[:-1], state.unsqueeze(0)], dim=0)
    return event_t, solution


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
