"""The adjoint's backward dynamics: the augmented right-hand side and the parameter quadrature.

``AugmentedFunc`` evaluates ``[f, -a^T df/dy]`` on ``Z = [y, a]`` (see ``fastnode._adjoint``). What the backward
solve does besides integrating ``Z`` is a hooks object the loop calls (``solve_adaptive``'s ``hooks``):

* ``BackwardHooks``: the base, and the whole of it when there are no parameters: output times (``land`` adds
  each cotangent and resets the state), the time-gradient dots ``g_i . f(t_i, y_i)`` and a custom adjoint norm.
* ``SharedQuadrature`` (one step size for the batch): each stage's ``autograd.grad`` returns the state and the
  parameter parts together; the step's weighted sums are kept aside and added if the step is accepted.
* ``PerSampleQuadrature`` (per-sample step control): each evaluation's graph is kept (``_Eval``) until the
  per-sample accept decisions fix its weight, then retired by one weighted ``autograd.grad``.

The hooks class's ``vjp`` decides what an evaluation records for its quadrature (``AugmentedFunc.last``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._graph_retention import GraphRetention
from ._problem import FlatFunc, StateSpec


def halve_before_output(t: torch.Tensor, h: torch.Tensor, running: torch.Tensor, next_out: torch.Tensor,
                        t_out: torch.Tensor) -> torch.Tensor:
    """The backward solve's step proposal before an output time (eager and compiled loops alike). [G].

    The backward solve lands exactly on every output time (the cotangent is added there), so a proposal ``h`` that
    falls short of the next output time by less than ``h`` would be followed by a sliver step that lands (a full
    step's evaluations for a fraction of its length, and a small proposal carried past the output time). When the
    distance ``r`` to the next output time lies in ``(h, 2h)`` two steps are needed anyway, so each is taken as
    ``r / 2``: no more steps, each shorter than ``h`` (no more rejections) and with a smaller error. Measured on
    bench/adjoint_precision.py (dopri5, atol = rtol = 1e-2 ... 1e-8, both adjoint norms): at equal gradient error
    never more backward NFE, e.g. MLP t = [0, 1] rtol 1e-6 (mixed norm) 19 -> 13, mlp-10 rtol 1e-7 (seminorm)
    165 -> 135, vdp rtol 1e-4 129 -> 105 (the ODENet's rtol 1e-3: 205 -> 217 at a lower error, on its curve). The
    forward solve interpolates its outputs and never takes this path.

    Args:
        t, h: [G] time reached and the controller's proposal (integration time, increasing); ``running``: [G] bool.
        next_out: [G] index of the next output time in ``t_out`` [G, T].
    """
    with torch.no_grad():
        t = t.detach()
        t_next = t_out.detach().gather(1, next_out.clamp_max(t_out.shape[1] - 1).unsqueeze(1)).squeeze(1)
        r = t_next - t
        # After the first half, the rest is r / 2 up to the rounding of t + r / 2: the proposal (at least r / 2 after
        # an accepted step) then lands, rather than halving a rounding excess again.
        slack = (4 * torch.finfo(t.dtype).eps) * torch.maximum(t.abs(), t_next.abs())
        room = running & (r > h)
        return torch.where(room & (r <= h + slack), r, torch.where(room & (r < 2 * h), 0.5 * r, h))


class _Eval:
    """One evaluation of the augmented dynamics, kept (graph alive) until its parameter weight is final."""

    __slots__ = ("cot", "lazy", "mask", "out", "t", "tainted", "w", "y")

    def __init__(self, out, cot, t, y):
        self.out = out  # [G, N] f(t, y) with its graph to the parameters
        self.cot = cot  # [G, N] the cotangent per unit weight: sign * (-a)
        self.t = t  # user time(s) it was evaluated at (for a re-evaluation on a subset of samples)
        self.y = y  # [G, N] detached input state
        self.w = None  # [G] accumulated weight (integration-time units)
        self.mask = None  # [G] samples whose current first stage is this evaluation
        self.tainted = False  # some sample produced non-finite values in this evaluation's step
        self.lazy = False  # not evaluated with a graph (a compiled step's start, fastnode._compiled_adjoint): re-run


_LAYOUTS: dict = {}


def _layout_constants(sizes: tuple, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seg [P] int64: each parameter element's tensor index, count [n] element counts (at least 1))`` on
    ``device``, built on the host and cached per (sizes, dtype, device): on a GPU a backward then makes no blocking
    host-to-device copy for them (``repeat_interleave`` with device repeats would also sync to size its output)."""
    key = (sizes, dtype, device)
    hit = _LAYOUTS.get(key)
    if hit is None:
        if len(_LAYOUTS) >= 16:
            _LAYOUTS.clear()
        seg = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        count = torch.tensor(sizes, dtype=dtype).clamp_min(1)
        hit = _LAYOUTS[key] = (seg.to(device), count.to(device))
    return hit


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
        self.seg, self.count = _layout_constants(tuple(self.sizes), self.dtype, dev) if params else (None, None)

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

    ``vjp``: the hooks class's ``vjp(aug, fy, y_, cot, t_user, y) -> dL/dy [G, N] or None``; it also records in
    ``aug.last`` what that class's quadrature needs from the evaluation.
    """

    def __init__(self, func: Callable, spec: StateSpec, aug_spec: StateSpec, sign: float, params: tuple,
                 vjp: Callable):
        super().__init__(func, aug_spec, sign)
        self.state_spec = spec
        self.n = sum(spec.sizes)
        self.params = params
        self.layout = ParamLayout(params)
        self.vjp = vjp
        self.last = None
        self.keep = GraphRetention()  # retain_graph for the parameter products (fastnode/_graph_retention.py)
        self.mark = None  # the autograd sequence mark taken before the latest evaluation (while undecided)

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
            self.mark = self.keep.mark() if self.params else None
            fy = self._f(t_user, y_)
            # Not recorded (the initial-step probe): the state's part only.
            vy = (self.vjp if record else BackwardHooks.vjp)(self, fy, y_, cot, t_user, y)
        if vy is None:
            vy = torch.zeros_like(y)
        res = torch.cat([fy.detach(), vy], dim=1)
        return res if self.sign > 0 else -res

    def probe(self, tau, z):
        return self(tau, z, record=False)


class BackwardHooks:
    """What the backward solve does besides integrating ``[y, a]`` (see ``solve_adaptive``'s ``hooks``).

    The base, and the whole story without parameters: adds each output time's cotangent and resets the state
    there (``land``), records ``g_i . f(t_i, y_i)`` for the time gradients, and applies a custom adjoint norm.
    The quadrature subclasses add the parameter adjoint ``A``.

    Args:
        aug: the backward dynamics (built with this class's ``vjp``).
        tableau: the backward method's tableau.
        Y, Gc: ``[T, G, N]`` forward states and output cotangents, in backward order.
        ops: the backend of the backward solve (its ``adjoint_weights`` op).
        time_grads: record the dots for the output times' gradients (``tdots`` ``[T, G]``).
        custom_norm: ``adjoint_options["norm"]`` when it is a callable, else None.
    """

    def __init__(self, aug: AugmentedFunc, tableau, Y: torch.Tensor, Gc: torch.Tensor, ops, time_grads: bool,
                 custom_norm: Callable | None = None):
        self.aug = aug
        self.tab = tableau
        self.Y = Y
        self.Gc = Gc
        self.ops = ops
        G = Y.shape[1]
        self.rows = torch.arange(G, device=Y.device)
        self.custom_norm = custom_norm
        self.j_land = torch.zeros(G, dtype=torch.int64, device=Y.device)
        self.tdots = torch.zeros(Y.shape[0], G, dtype=Y.dtype, device=Y.device) if time_grads else None
        self.h = None
        self.stashed = None

    @staticmethod
    def vjp(aug: AugmentedFunc, fy, y_, cot, t_user, y) -> torch.Tensor | None:
        """``-a^T df/dy`` only (nothing to record without parameters)."""
        if not fy.requires_grad:
            return None
        (vy,) = torch.autograd.grad(fy, (y_,), cot, allow_unused=True, retain_graph=False)
        return vy

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

    def begin_step(self, hy: torch.Tensor) -> None:
        self.h = hy

    def stage_evaluated(self, i: int) -> None:
        pass

    # --- error control -------------------------------------------------------------------------------------
    def stash_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The norm given to the step for a custom adjoint norm: keep the scaled error, decide in step_ratio."""
        self.stashed = x
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def _param_errors(self) -> list[torch.Tensor]:
        """The parameter adjoint's scaled errors, one per parameter tensor (for a custom norm)."""
        return []

    def step_ratio(self, ratio: torch.Tensor) -> torch.Tensor:
        if self.custom_norm is not None:
            n = self.aug.n
            x = self.stashed
            spec = self.aug.state_spec
            errs = self._param_errors()
            v = self.custom_norm((torch.zeros((), dtype=x.dtype, device=x.device), spec.unflatten(x[:, :n]),
                                  spec.unflatten(x[:, n:]), *errs))
            v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
            if v.numel() != 1:
                raise ValueError(f"adjoint_options['norm'] must return a scalar, got {v.numel()} values")
            return v.reshape(1).abs()
        return ratio

    def ratio_floor(self) -> torch.Tensor | None:
        """A lower bound of the step's error ratio from the parameter adjoint (None: not in the error control)."""
        return None

    # --- decisions ------------------------------------------------------------------------------------------
    def end_step(self, accept: torch.Tensor, running_next: torch.Tensor, finite: torch.Tensor) -> None:
        pass

    def packet_flags(self) -> list:
        """Flags that ride on the loop's one host transfer per step; ``after_fetch`` gets their values."""
        return []

    def after_fetch(self, flags) -> None:
        pass

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
        """The parameters' gradients, shaped like them."""
        return []


class _Quadrature(BackwardHooks):
    """The parameter adjoint ``A`` (flat ``[P]``), a quadrature over accepted steps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params = self.aug.params
        self.layout = self.aug.layout
        self.A = self.layout.flat([None] * len(self.params))

    def _add(self, grads) -> None:
        self.A.add_(self.layout.flat(grads))

    def finish(self) -> list[torch.Tensor]:
        return self.layout.split(self.A)


class SharedQuadrature(_Quadrature):
    """One step size for the batch: each stage's parameter vjp comes with the state's; the step's weighted sum
    ``S`` (and error estimate ``E``) is added to ``A`` if the step is accepted.

    Args:
        theta_norm: ``"rms"`` puts the parameter adjoint's error into the step's (``adjoint_options["norm"] =
            "mixed"``, torchdiffeq's default adjoint norm); None leaves it out (the seminorm, the default).
        theta_tol: ``(rtol, atol)`` of the parameter adjoint.
        (the rest as ``BackwardHooks``)
    """

    def __init__(self, *args, theta_norm: str | None = None, theta_tol: tuple[float, float] = (0.0, 0.0),
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.theta_norm = theta_norm
        self.rtol, self.atol = theta_tol
        self.need_err = theta_norm is not None or self.custom_norm is not None
        self.k1 = None
        self.S = self.E = None

    @staticmethod
    def vjp(aug: AugmentedFunc, fy, y_, cot, t_user, y) -> torch.Tensor | None:
        """State and parameter parts in one ``autograd.grad``; the parameter part (flat) goes to ``aug.last``."""
        if not fy.requires_grad:
            aug.last = aug.layout.flat([None] * len(aug.params))
            return None
        # retain_graph: func may use tensors computed outside it from the parameters (torchcde's spline
        # coefficients); their graph is the caller's and serves every evaluation (fastnode/_graph_retention.py).
        aug.keep.observe(fy, aug.mark)
        grads = torch.autograd.grad(fy, (y_, *aug.params), cot, allow_unused=True, retain_graph=aug.keep.retain)
        v = aug.layout.flat(grads[1:])
        aug.last = v if aug.sign > 0 else -v
        return grads[0]

    def k1_evaluated(self, mask: torch.Tensor, k: torch.Tensor, at_output: torch.Tensor | None = None) -> None:
        super().k1_evaluated(mask, k, at_output)
        m = mask.reshape(())
        last = self.aug.last
        self.k1 = last if self.k1 is None else torch.where(m, last, self.k1)

    def begin_step(self, hy: torch.Tensor) -> None:
        super().begin_step(hy)
        h = hy.reshape(())
        b0, e0 = self.tab.b[0], (self.tab.e[0] if self.need_err else 0.0)
        self.S = self.k1 * (h * b0)
        self.E = self.k1 * (h * e0) if self.need_err else None

    def stage_evaluated(self, i: int) -> None:
        h = self.h.reshape(())
        th = self.aug.last
        b, e = self.tab.b[i], (self.tab.e[i] if self.E is not None else 0.0)
        if b:
            self.S.add_(th * (h * b))
        if e and self.E is not None:
            self.E.add_(th * (h * e))

    def _theta_scaled(self) -> torch.Tensor:
        scale = torch.maximum(self.A.abs(), (self.A + self.S).abs()).mul_(self.rtol).add_(self.atol)
        return self.E / scale

    def _param_errors(self) -> list[torch.Tensor]:
        return self.layout.split(self._theta_scaled())

    def ratio_floor(self) -> torch.Tensor | None:
        """The parameter adjoint's error ratio (the mixed norm, torchdiffeq's default), max'ed into the step's."""
        if self.theta_norm and self.custom_norm is None:
            return self.layout.rms_max(self._theta_scaled())
        return None

    def end_step(self, accept: torch.Tensor, running_next: torch.Tensor, finite: torch.Tensor) -> None:
        acc = accept.reshape(())
        # where, not multiply: a rejected step may hold non-finite values.
        self.A = torch.where(acc, self.A + self.S, self.A)
        self.k1 = torch.where(acc, self.aug.last, self.k1)


class PerSampleQuadrature(_Quadrature):
    """Per-sample step control: a parameter is shared by the batch, but each sample accepts or rejects on its own.

    ``vjp`` is linear in its cotangent, so per-sample weights ``h_b * b_j * accepted_b`` are folded into the
    cotangent of one deferred ``autograd.grad`` over the step's stage graphs, once the decisions are known. A
    rejected sample's stages get weight zero. Stage 0 is the previous step's last evaluation (FSAL), whose weight
    depends on the *next* accepted step of each sample: it stays pending (``entries``, graph kept) until every
    sample holding it has moved on.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.entries: list[_Eval] = []  # pending first stages
        self.stage_evals: list[tuple[int, _Eval]] = []  # this step's stages 1..S-1
        self.to_retire: list[_Eval] = []  # weights final once the packet says a sample accepted
        self.step_tainted = None
        self.any_acc = None

    @staticmethod
    def vjp(aug: AugmentedFunc, fy, y_, cot, t_user, y) -> torch.Tensor | None:
        """The state part at once (it steers the solve); the evaluation's graph is kept in ``aug.last``."""
        if not fy.requires_grad:
            aug.last = _Eval(None, cot, t_user, y)
            return None
        aug.keep.observe(fy, aug.mark)
        (vy,) = torch.autograd.grad(fy, (y_,), cot, allow_unused=True, retain_graph=True)
        aug.last = _Eval(fy, cot if aug.sign > 0 else -cot, t_user, y)
        return vy

    def k1_evaluated(self, mask: torch.Tensor, k: torch.Tensor, at_output: torch.Tensor | None = None) -> None:
        super().k1_evaluated(mask, k, at_output)
        e = self.aug.last
        e.mask = mask.clone()
        e.w = torch.zeros(mask.shape, dtype=self.Y.dtype, device=mask.device)
        for old in self.entries:
            old.mask = old.mask & ~mask
        self.entries.append(e)

    def begin_step(self, hy: torch.Tensor) -> None:
        super().begin_step(hy)
        self.stage_evals = []

    def stage_evaluated(self, i: int) -> None:
        self.stage_evals.append((i, self.aug.last))

    def end_step(self, accept: torch.Tensor, running_next: torch.Tensor, finite: torch.Tensor) -> None:
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
        live = [e.mask.any() for e in self.entries]
        return [self.any_acc, self.step_tainted] + live

    def after_fetch(self, flags) -> None:
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
        """Add the evaluations' weighted parameter vjps to ``A`` (one ``autograd.grad`` for the clean ones)."""
        evs = [e for e in evs if (e.out is not None or e.lazy) and e.w is not None]
        if not evs:
            return
        clean = [e for e in evs if not (e.tainted or e.lazy)]
        if clean:
            outs = [e.out for e in clean]
            cots = [e.cot * e.w.to(e.cot.dtype).unsqueeze(1) for e in clean]
            grads = torch.autograd.grad(outs, self.params, cots, allow_unused=True, retain_graph=self.aug.keep.retain)
            self._add(grads)
        for e in evs:
            if e.tainted or e.lazy:
                self._retire_subset(e)

    def _retire_subset(self, e: _Eval) -> None:
        """Re-evaluate a tainted evaluation on the samples with weight only, and add its parameter vjp."""
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

    def finish(self) -> list[torch.Tensor]:
        rest = self.entries + [ev for _, ev in self.stage_evals if ev.w is not None]
        self.entries, self.stage_evals = [], []
        self._retire(rest)
        return super().finish()
