"""Event handling for the adaptive loop: the sign of ``event_fn`` at the start, a crossing per step, the bracketing
step of each group, and the event time on that step's dense output (``fastnode._event_locate``).

``EventTracker.after_step`` returns the groups whose event fired in the step; the loop hands that mask to
``StepOps.step_end`` as ``stop``, so those groups end there. The tracker keeps each group's bracketing step
(start, size, state, stages) to locate the event once the loop has finished.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import _stats as st
from ._event_locate import locate_sign_change
from ._tableau import ButcherTableau


class EventTracker:
    """The event bookkeeping of one solve. ``event_fn``: flat ``(tau [G], y [G, N]) -> [G]``."""

    def __init__(self, event_fn: Callable, tableau: ButcherTableau):
        self.event_fn = event_fn
        self.tableau = tableau
        self.sign0 = self.fired = self.lo = self.h = self.y = None
        self.K = None

    def start(self, t: torch.Tensor, y0: torch.Tensor, running: torch.Tensor) -> torch.Tensor:
        """The sign at the start; a group whose ``event_fn`` is 0 there has its event at ``t0`` and does not run."""
        with torch.no_grad():
            self.sign0 = torch.sign(self.event_fn(t, y0))
        self.fired = self.sign0 == 0
        self.lo = t.clone()
        self.h = torch.zeros_like(t)
        self.y = y0
        return running & ~self.fired

    def after_step(self, s, plan, fin, K) -> torch.Tensor:
        """[G] bool: groups whose accepted step crossed (or touched) zero; their bracketing step is kept."""
        with torch.no_grad():
            ev = self.event_fn(plan.t_new.detach(), fin.y_new.detach())
            newly = fin.accept & ((torch.sign(ev) != self.sign0) | (ev == 0))
            self.fired = self.fired | newly
        self.lo = torch.where(newly, s.t, self.lo)  # keeps t[0]'s graph when times need gradients
        self.h = torch.where(newly, plan.h.detach(), self.h)
        col = newly.unsqueeze(1)
        self.y = torch.where(col, s.y, self.y)
        self.K = list(K) if self.K is None else [torch.where(col, k, e) for k, e in zip(K, self.K)]
        return newly

    def finish(self, ops, f_last: torch.Tensor, y0: torch.Tensor, t_user: torch.Tensor, stats: st.SolveStats,
               on_failure: str):
        """``(event_tau [G], out [2, G, N])``: the event times (NaN where none fired, with ``on_failure="return"``)
        and the states at the start and at the event, located on ``ops``' dense output. ``f_last``: the final
        derivative (the bracket when no step was recorded)."""
        K = self.K or [f_last] * self.tableau.num_stages
        event_tau, y_ev = locate_events(ops, self.tableau, self.event_fn, self.sign0, self.lo, self.h, self.y, K)
        not_fired = ~self.fired
        if bool(not_fired.any()):
            stats.n_host_syncs += 1
            idx = not_fired.nonzero().flatten().tolist()
            msg = (f"event_fn never crossed zero for sample(s) {idx[:10]} before the solve stopped at "
                   f"t={t_user[idx[0]].item():.17g}")
            stats.messages.append(msg)
            if on_failure == "raise":
                raise st.SolverError(msg, status=stats.status, samples=idx, times=t_user[idx].tolist())
            event_tau = torch.where(self.fired, event_tau, torch.full_like(event_tau, math.nan))
        return event_tau, torch.stack([y0, y_ev], dim=0)


def locate_events(ops, tableau: ButcherTableau, event_fn: Callable, sign0, lo_t, h, y0, K):
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
        # Illinois-type bracketing on the dense output to the time dtype's resolution (_event_locate.py).
        theta, _ = locate_sign_change(lambda th: event_fn(lo_d + th * h, ops.interpolate(tableau, y0, K, hy, th)),
                                      sign0, ~at_start, lo_d, h)
        event_tau = lo_d + theta * h
    # theta as a function of the step's start: moving t[0] shifts the step, not the event's fixed time.
    theta_g = torch.where(at_start, 0.0, (event_tau - lo_t) / torch.where(at_start, 1.0, h))
    y_ev = torch.where(at_start.unsqueeze(1), y0, ops.interpolate(tableau, y0, K, hy, theta_g))
    return event_tau, y_ev
