"""``odeint_adjoint``'s backward solve with a method that is not a Butcher tableau (Adams methods, scipy).

These methods have no stages to hang the parameter quadrature on, so the backward solve does what torchdiffeq
does for every method: the augmented state ``[y, a, A]`` (state, state adjoint, parameter adjoint; one flat
vector) is integrated with the backward method from each output time to the previous one, where the output's
cotangent is added to ``a`` and ``y`` is reset to the forward solution. The parameter adjoint is part of the ODE
state here, so it is as accurate as the method makes the whole augmented system.
"""

from __future__ import annotations

import torch

from . import _stats as st
from ._adjoint_dynamics import ParamLayout
from ._graph_retention import GraphRetention


def _scalar_tol(v) -> float:
    """A tolerance for the flat augmented state: a tensor (or tuple) tolerance is replaced by its smallest entry."""
    if isinstance(v, (tuple, list)):
        return min(_scalar_tol(x) for x in v)
    if isinstance(v, torch.Tensor):
        return float(v.detach().min())
    return float(v)


class _Augmented:
    """``[y, a, A]`` -> ``[f, -a^T df/dy, -a^T df/dtheta]`` (flat, user time), counting ``func``'s evaluations."""

    def __init__(self, func, spec, params: tuple, layout: ParamLayout, n: int):
        self.func, self.spec, self.params, self.layout, self.n = func, spec, params, layout, n
        self.nfe = 0
        self.keep = GraphRetention()  # retain func's graph where it reaches the caller's (_graph_retention.py)
        user_cb = getattr(func, "callback_step_adjoint", None)
        if callable(user_cb):
            self.user_cb = user_cb
            self.callback_step = self._on_step  # found by the inner odeint's callback lookup

    def f_state(self, t, y_flat):
        self.nfe += 1
        return self.spec.flatten(self.func(t, self.spec.unflatten(y_flat)), "func")

    def __call__(self, t, z):
        N, dt, layout = self.n, z.dtype, self.layout
        y, a = z[:N].reshape(1, N), z[N : 2 * N].reshape(1, N)
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            mark = self.keep.mark() if self.params else None
            fy = self.f_state(t, y_)
            vy, vp = None, None
            if fy.requires_grad:
                self.keep.observe(fy, mark)
                grads = torch.autograd.grad(fy, (y_, *self.params), -a, allow_unused=True,
                                            retain_graph=self.keep.retain)
                vy, vp = grads[0], layout.flat(grads[1:]).to(dt)
        vy = torch.zeros_like(y) if vy is None else vy
        vp = torch.zeros(layout.P, dtype=dt, device=z.device) if vp is None else vp
        return torch.cat([fy.detach().reshape(-1), vy.reshape(-1), vp])

    def _on_step(self, t, z, dt):
        """``func.callback_step_adjoint`` with torchdiffeq's augmented layout ``(t_adj, y, adj_y, *adj_params)``."""
        N, spec = self.n, self.spec
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        self.user_cb(t, (zero, spec.unflatten(z[:N].reshape(1, N)), spec.unflatten(z[N : 2 * N].reshape(1, N)),
                         *self.layout.split(z[2 * N :])), dt)


def backward_plain(plan, out: torch.Tensor, grad_out: torch.Tensor, tau_fwd: torch.Tensor):
    """The backward solve interval by interval. ``out``, ``grad_out``: [T, 1, N]; ``tau_fwd``: [T].

    Returns ``(dL/dy0 [1, N], dL/dparams, dL/dt as [1, T] in user time or None)`` like ``_adjoint._backward``.
    """
    from ._odeint import odeint

    p = plan.p
    T, _, N = out.shape
    layout = ParamLayout(plan.params)
    dt = p.spec.dtype
    t_user = (tau_fwd * p.sign).to(dt)
    augmented = _Augmented(p.func, p.spec, plan.params, layout, N)
    f_state = augmented.f_state
    cfg = plan.cfg
    prev_last = st.last_stats()
    bstats = st.SolveStats(method=cfg.method)
    rtol, atol = _scalar_tol(cfg.rtol), _scalar_tol(cfg.atol)
    tdots = torch.zeros(T, dtype=dt, device=out.device) if plan.t_requires_grad else None
    a = grad_out[-1, 0]
    A = torch.zeros(layout.P, dtype=dt, device=out.device)
    try:
        for i in range(T - 1, 0, -1):
            if tdots is not None:
                with torch.no_grad():
                    tdots[i] = (f_state(t_user[i], out[i]) * grad_out[i]).sum()
            z = torch.cat([out[i, 0], a, A])
            zs = odeint(augmented, z, torch.stack([t_user[i], t_user[i - 1]]), rtol=rtol, atol=atol,
                        method=cfg.method, options=dict(cfg.options or {}))
            inner = st.last_stats()
            bstats.n_accepted += inner.n_accepted
            bstats.n_rejected += inner.n_rejected
            bstats.n_steps += inner.n_steps
            bstats.n_host_syncs += inner.n_host_syncs
            a, A = zs[1, N : 2 * N], zs[1, 2 * N :]
            if tdots is not None and i == 1:
                with torch.no_grad():
                    tdots[0] = -(a * f_state(t_user[0], out[0])[0]).sum()  # a(t_0+) . f(t_0, y_0)
            a = a + grad_out[i - 1, 0]
    except st.SolverError as err:
        raise st.SolverError(f"adjoint (backward) solve failed: {err}", status=err.status, samples=err.samples,
                             times=err.times) from None
    finally:
        st._set_last(prev_last)
        bstats.nfe = augmented.nfe
        stats_f = p.stats
        stats_f.backward = bstats
        stats_f.nfe_backward += bstats.nfe
        stats_f.n_accepted_backward += bstats.n_accepted
        stats_f.n_rejected_backward += bstats.n_rejected
    t_grad = None if tdots is None else tdots.reshape(1, T)
    return a.reshape(1, N), layout.split(A), t_grad
