"""The adjoint's backward solve compiled: ``odeint_adjoint`` with ``options={"compile": ...}``.

The backward step (``fastnode._adjoint``) integrates ``Z = [y, a]`` with the augmented dynamics
``[f, -a^T df/dy]`` and, with parameters, the quadrature ``A += h * sum_j b_j (-a_j^T df/dtheta)``. Here one step
is one compiled program as in ``fastnode._compiled``: every stage's evaluation of ``func`` together with its
vector-Jacobian products (``torch.autograd.grad`` traced by dynamo under ``torch._dynamo.config.trace_autograd_ops``),
the parameter quadrature, the finish and controller, and the bookkeeping.

* Shared step size (``SharedQuadrature``): the stage-weighted parameter sums ``S`` (and their error ``E``), the
  parameter adjoint's error ratio that the mixed norm (torchdiffeq's default) puts into the step's (``ratio_floor``),
  and the accepted step's update of ``A`` and of the first stage's parameter product (FSAL): the eager
  operations in the eager order, so float64 solves take the same steps with the same evaluations.
* Per-sample step control (``PerSampleQuadrature``): a stage's parameter weight ``h_b * b_j * accepted_b`` is known
  once the step's decisions are, inside the same program, so all stages' parameter products are one weighted
  ``autograd.grad`` at the step's end. The first stage's is not: eager keeps its evaluation's graph from the step
  before (FSAL) until a later step accepts; a compiled step cannot hand a graph to the next one, so it evaluates
  ``func`` once more at its start (counted in ``nfe``: one evaluation per backward step more than eager). A step
  in which a running sample turned non-finite is dropped and run again eager (``0 * NaN`` in the shared parameter
  sum; the eager step re-evaluates its tainted evaluations on the samples with weight). ``func`` must treat the
  rows independently (as per-sample mode assumes): the re-evaluation sees the other rows at their current times.

The host keeps the landings on output times: after a step that landed, ``fastnode._adaptive._land`` adds the
cotangent, resets ``y`` and re-evaluates ``f`` (and records the time-gradient dot) eagerly, then the compiled steps
go on. So the packet is read after every step of a backward solve (``steps_per_sync`` does not apply: a landing must
happen before the next step starts from that time).

What stays eager (the backward statistics' ``compile_fallback`` says which):

* a callable ``adjoint_options['norm']`` (a Python function of per-tensor errors, called at every step);
* ``func`` using tensors computed outside it from the parameters (torchcde's spline coefficients): their autograd
  graph belongs to the caller and lies outside any compiled program (``fastnode._graph_retention``);
* what ``fastnode._compiled`` runs eager in any solve (func's adjoint callbacks, watched steps, graph breaks).
"""

from __future__ import annotations

import torch

from ._adjoint_dynamics import BackwardHooks, PerSampleQuadrature, SharedQuadrature, _Eval

OUTSIDE_GRAPH = ("func uses tensors computed outside it from the parameters (their autograd graph lies outside any "
                 "compiled step)")


class BackwardTerms:
    """What a compiled backward step adds to the forward's: the augmented evaluation with its vector-Jacobian
    products and the parameter quadrature's state (shared: ``A`` and the first stage's parameter product ``k1``,
    both ``[P]``; per-sample: ``A``).

    Args:
        hooks: the backward solve's ``BackwardHooks`` (the base without parameters, ``SharedQuadrature`` or
            ``PerSampleQuadrature``).
    """

    def __init__(self, hooks: BackwardHooks):
        self.hooks = hooks
        aug = hooks.aug
        self.kind = ("shared" if isinstance(hooks, SharedQuadrature) else
                     "per_sample" if isinstance(hooks, PerSampleQuadrature) else "none")
        self.shared = self.kind == "shared"
        self.theta_norm = self.shared and hooks.theta_norm is not None
        self.key = ("backward", self.kind, aug.n, tuple(map(id, aug.params)), self.theta_norm,
                    hooks.rtol if self.shared else None, hooks.atol if self.shared else None)
        # Per-sample: each compiled step re-evaluates func at its start for its first stage's parameter product
        # (the eager solve keeps that evaluation's graph from the step before); counted in nfe.
        self.extra_evals = 1 if self.kind == "per_sample" else 0

    @staticmethod
    def unsupported(hooks: BackwardHooks) -> str | None:
        """Why this backward solve cannot run compiled (None: it can, once ``ready``)."""
        if hooks.custom_norm is not None:
            return "a callable adjoint_options['norm'] (Python called at every step)"
        if type(hooks) is BackwardHooks:
            return None
        if type(hooks) in (SharedQuadrature, PerSampleQuadrature):
            return OUTSIDE_GRAPH if hooks.aug.keep.decided else None
        return f"{type(hooks).__name__} (not a built-in adjoint quadrature)"

    def ready(self) -> bool:
        """Whether it is known that ``func``'s graph stays inside it (on CUDA that takes two evaluations; until then
        the iterations run eager)."""
        return self.kind == "none" or self.hooks.aug.keep.decided is False

    def state(self) -> tuple:
        if self.kind == "none":
            return ()
        return (self.hooks.A, self.hooks.k1) if self.shared else (self.hooks.A,)

    def enter(self) -> None:
        """Before compiled steps: per-sample, the pending evaluations' parameter products are added now with the
        weights they have (their samples' next accepted step is compiled and re-evaluates its first stage)."""
        if self.kind == "per_sample":
            hooks = self.hooks
            pending, hooks.entries = hooks.entries, []
            hooks._retire(pending)

    def leave(self, x: tuple, s) -> None:
        """After compiled steps: the quadrature's state back into the hooks (``x``: ``state()``'s new values); per
        sample, the current first stages become one pending evaluation re-run if an eager step gives it weight."""
        hooks = self.hooks
        if self.shared:
            hooks.A, hooks.k1 = x
        elif self.kind == "per_sample":
            (hooks.A,) = x
            aug = hooks.aug
            e = _Eval(None, aug.sign * -s.y[:, aug.n :], aug.user_time(s.t), s.y[:, : aug.n])
            e.lazy = True
            e.mask = s.running.clone()
            e.w = torch.zeros(s.running.shape, dtype=hooks.Y.dtype, device=s.y.device)
            hooks.entries.append(e)

    def evaluator(self):
        """``(t_user, z [G, 2N]) -> (k [G, 2N], theta)``: ``AugmentedFunc`` with its vjps, pure. ``theta``: shared,
        the parameter product ``[P]``; per-sample, ``(f, cotangent per unit weight)`` with ``f``'s graph kept for
        the step's one weighted parameter product; None without parameters."""
        aug, kind = self.hooks.aug, self.kind
        func, spec, n, params, layout, sign = aug.func, aug.state_spec, aug.n, aug.params, aug.layout, aug.sign

        def evaluate(t_user, z):
            y = z[:, :n].detach()
            cot = -z[:, n:].detach()
            th = None
            with torch.enable_grad():
                y_ = y.clone().requires_grad_(True)
                fy = spec.flatten(func(t_user, spec.unflatten(y_)), "func")
                if not fy.requires_grad:
                    vy = None
                    th = layout.flat([None] * len(params)) if kind == "shared" else None
                elif kind == "shared":
                    grads = torch.autograd.grad(fy, (y_, *params), cot, allow_unused=True)
                    vy, v = grads[0], layout.flat(grads[1:])
                    th = v if sign > 0 else -v
                else:
                    (vy,) = torch.autograd.grad(fy, (y_,), cot, allow_unused=True, retain_graph=kind != "none")
                    th = (fy, cot if sign > 0 else -cot) if kind == "per_sample" else None
            if vy is None:
                vy = torch.zeros_like(y)
            res = torch.cat([fy.detach(), vy], dim=1)
            return (res if sign > 0 else -res), th

        def first_stage(t_user, z):
            """func at the step's start again, for its parameter product only: ``(f, cotangent per unit weight)``
            (None when ``f`` depends on no parameter)."""
            with torch.enable_grad():
                fy = spec.flatten(func(t_user, spec.unflatten(z[:, :n].detach())), "func")
            if not fy.requires_grad:
                return None
            cot = -z[:, n:].detach()
            return fy, (cot if sign > 0 else -cot)

        return evaluate, first_stage

    def quadrature(self, tab):
        """The shared parameter quadrature as pure functions of a step (None otherwise): ``begin(h, k1) -> (S, E)``,
        ``add(S, E, i, h, theta) -> (S, E)``, ``floor(A, S, E) -> ratio floor or None``."""
        if not self.shared:
            return None
        hooks = self.hooks
        b, e, need_err, layout = tab.b, tab.e, hooks.need_err, hooks.layout
        rtol, atol, theta_norm = hooks.rtol, hooks.atol, self.theta_norm

        def begin(h, k1):
            return k1 * (h * b[0]), (k1 * (h * e[0]) if need_err else None)

        def add(S, E, i, h, th):
            if b[i]:
                S = S + th * (h * b[i])
            if e[i] and need_err:
                E = E + th * (h * e[i])
            return S, E

        def floor(A, S, E):
            if not theta_norm:
                return None
            scale = torch.maximum(A.abs(), (A + S).abs()) * rtol + atol
            return layout.rms_max(E / scale)

        return begin, add, floor

    def per_sample_update(self, tab, ops):
        """Per-sample: ``update(A, evals, h, accept, tainted) -> A`` adds the step's parameter products, each
        evaluation's cotangent weighted by ``h_b * b_j * accepted_b`` (``PerSampleQuadrature.end_step``'s weights),
        in one ``autograd.grad``; a step in which a running sample turned non-finite adds nothing here (``0 * NaN``
        would poison the sum): the host runs it again eager. None otherwise."""
        if self.kind != "per_sample":
            return None
        b, params, layout = tab.b, self.hooks.aug.params, self.hooks.layout

        def update(A, evals, h, accept, tainted):
            W = ops.adjoint_weights(h, accept, b)  # [S, G]
            outs, cots = [], []
            for j, ev in enumerate(evals):
                if b[j] and ev is not None:
                    outs.append(ev[0])
                    cots.append(ev[1] * W[j].to(ev[1].dtype).unsqueeze(1))
            if not outs:
                return A
            grads = torch.autograd.grad(outs, params, cots, allow_unused=True)
            return torch.where(tainted, A, A + layout.flat(grads))

        return update
