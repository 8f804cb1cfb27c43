"""``event_fn`` with a fixed-grid method (Runge-Kutta grid methods and Adams), torchdiffeq's semantics.

The solve steps from ``t[0]`` by ``options["step_size"]`` (required, as in torchdiffeq) with no end time. After
each step the event function is evaluated at the step's end; in the first step where its sign differs from the
start's, the event is located on the step's interpolant (``interp``: linear, or cubic Hermite with one more
evaluation of ``func`` at the step's end) to the time dtype's resolution (``fastnode._event_locate``). As with
the adaptive methods, the event time carries no gradient and the state at the event is differentiable at that
fixed time; ``odeint_event`` adds the gradient through the event time.
"""

from __future__ import annotations

import torch

from . import _stats as st
from ._event_locate import locate_sign_change
from ._fixed import _hermite
from .backends.torch_ops import TorchStepOps

MAX_STEPS = 20000  # torchdiffeq's limit on the number of steps looking for the event


def _rk_stepper(p, perturb: bool):
    """``step(t0, t1, y) -> (y1, f(t0, y))`` with the method's tableau on the reference backend."""
    f, tab, ops = p.f, p.solver.tableau, TorchStepOps()

    def step(t0, t1, y):
        h = t1 - t0
        hy = h.to(y.dtype)
        k0 = f(t0, y, perturb=1 if perturb else 0)
        K = ops.set_stage(ops.new_stages(tab, y), 0, k0)
        for i in range(1, len(tab.c)):
            at_end = tab.c[i] == 1.0
            ti = t1 if at_end else t0 + tab.c[i] * h
            yi = ops.rk_combine(y, K, hy, tab.a[i])
            K = ops.set_stage(K, i, f(ti, yi, perturb=-1 if (perturb and at_end) else 0))
        return ops.rk_combine(y, K, hy, tab.b), k0

    return step


def solve_fixed_event(p, y0: torch.Tensor, flat_event) -> tuple[torch.Tensor, torch.Tensor]:
    """``(event_tau [1], out [2, 1, N])``: the state at ``t[0]`` and at the event.

    Args:
        p: the prepared call (``fastnode._odeint.Problem``) with a fixed-grid or Adams method.
        y0: [1, N] flat initial state.
        flat_event: ``(tau [1], y [1, N]) -> [1]`` the event function on the flat state.
    """
    opts, cfg = p.options, p.config
    if cfg.grid_constructor is not None:
        raise ValueError("options['grid_constructor'] cannot be used with event_fn; give options['step_size']")
    if cfg.step_size is None:
        raise ValueError(f"event_fn with the fixed-grid method {p.method!r} needs options['step_size'] (the solve "
                         "has no end time to build a grid from), as in torchdiffeq")
    h = torch.as_tensor(cfg.step_size, dtype=p.tau.dtype, device=y0.device)
    interp, perturb = cfg.interp, cfg.perturb
    if getattr(p.solver, "run", None) is not None:  # Adams
        from ._adams import AdamsStepper, parse_adams_options

        implicit, max_order, max_iters = parse_adams_options(opts, p.solver.implicit)
        step = AdamsStepper(p.f, implicit, max_order, max_iters, p.rtol, p.atol, perturb).step
    else:
        step = _rk_stepper(p, perturb)
    stats = p.stats
    stats.backend = "torch"
    tau0 = p.tau.reshape(-1)[:1]
    with torch.no_grad():
        sign0 = torch.sign(flat_event(tau0.detach(), y0.detach()))
    stats.n_host_syncs += 1
    if bool(sign0 == 0):
        return tau0.detach(), torch.stack([y0, y0], dim=0)
    y, t0 = y0, tau0
    for k in range(1, MAX_STEPS + 1):
        t1 = tau0 + k * h
        if p.f.callbacks is not None:
            p.f.callbacks.step(t0, y, t1 - t0)
        y1, f0 = step(t0, t1, y)
        stats.n_accepted = stats.n_steps = k
        with torch.no_grad():
            crossed = bool(torch.sign(flat_event(t1.detach(), y1.detach())) != sign0)
        stats.n_host_syncs += 1
        if crossed:
            event_tau, y_ev = _locate(p, flat_event, sign0, t0, t1, y, y1, f0, interp)
            return event_tau, torch.stack([y0, y_ev], dim=0)
        y, t0 = y1, t1
    stats.status = torch.tensor([st.MAX_STEPS])
    msg = (f"ODE solve failed: event_fn did not cross zero within {MAX_STEPS} steps of options['step_size'] "
           f"(up to t={float(t0.detach()) * p.sign:.17g})")
    stats.messages.append(msg)
    raise st.SolverError(msg, status=stats.status, samples=[0], times=[float(t0.detach()) * p.sign])


def _locate(p, flat_event, sign0, t0, t1, y, y1, f0, interp: str):
    """The event inside the step ``[t0, t1]`` from ``y`` to ``y1``: ``(event_tau [1], y_event [1, N])``."""
    h = (t1 - t0).detach()
    hy = h.to(y.dtype)
    f1 = p.f(t1, y1) if interp == "cubic" else None

    def dense(theta):
        th = theta.to(y.dtype).reshape(-1, 1)
        return y + th * (y1 - y) if f1 is None else _hermite(y, f0, y1, f1, hy, th)

    with torch.no_grad():
        theta, n = locate_sign_change(lambda th: flat_event(t0.detach() + th * h, dense(th)), sign0,
                                      torch.ones_like(sign0, dtype=torch.bool), t0.detach(), h)
    p.stats.n_host_syncs += n
    return t0.detach() + theta * h, dense(theta)
