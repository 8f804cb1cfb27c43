"""Where inside a step an event function changes sign: Illinois-type bracketing on the step's dense output.

The step ``[t0, t0 + h]`` in which ``event_fn`` changed sign is searched in the fraction ``theta`` of the step.
Bisection needs one evaluation per bit (60 to reach float64's resolution). Regula falsi with the Illinois idea
(the end kept twice in a row has its value scaled down, here by Anderson and Bjorck's factor) keeps a bracket
and converges superlinearly on smooth functions; Dekker's minimum step (never closer than the resolution to an
end) closes the bracket once one end has converged. The same resolution then costs a handful of evaluations
(measured: 3 for a falling ball, 9-12 for quadratic and arctan-shaped crossings). A bisection step is forced
after a step that neither cut ``|f|`` by 10 nor, with the step before, halved the bracket; only multiple roots
(tangential crossings) then cost more than bisection, about twice as much.

The result is the bracket's far end (``theta_hi``): the first point found where the sign differs from the
start's, to the time dtype's resolution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def locate_sign_change(g: Callable[[torch.Tensor], torch.Tensor], sign0: torch.Tensor, active: torch.Tensor,
                       t0: torch.Tensor, h: torch.Tensor, max_iter: int = 200) -> tuple[torch.Tensor, int]:
    """``theta [G]`` in ``[0, 1]`` where ``g`` first differs in sign from ``sign0``, per group.

    Args:
        g: ``g(theta [G]) -> [G]`` the event function on the dense output at ``t0 + theta * h``.
        sign0: [G] the event function's sign at the start of the solve.
        active: [G] groups to search (others return ``theta = 0``).
        t0, h: [G] the bracketing step's start and size (time dtype); they set the resolution at which the
            search stops: a few ulps of ``theta``, or of the time ``t0 + theta * h`` where that is coarser.
        max_iter: iteration cap (the forced bisection reaches any resolution well before it).

    Returns:
        ``(theta [G], n_evals)``: the far end of the final bracket and how many times ``g`` was called.

    Example:
        >>> import torch
        >>> one = torch.ones(1, dtype=torch.float64)
        >>> theta, n = locate_sign_change(lambda th: 0.3 - th, one, one > 0, 0 * one, one)
        >>> abs(float(theta) - 0.3) < 1e-15, n  # bisection: 60 evaluations
        (True, 4)
    """
    tdt = h.dtype
    eps = torch.finfo(tdt).eps
    s = torch.where(sign0 == 0, torch.ones_like(sign0), sign0).to(tdt)
    with torch.no_grad():
        lo = torch.zeros_like(h)
        hi = torch.ones_like(h)
        f_lo = s * g(lo).to(tdt)  # > 0: the start's side
        f_hi = s * g(hi).to(tdt)  # <= 0: crossed
        n = 2
        # A step whose end does not read as crossed on the dense output (rounding): the event is the step's end.
        done = ~active | (f_hi > 0) | (f_lo <= 0)
        hi = torch.where(active & (f_lo <= 0), lo, hi)
        side = torch.zeros_like(h)  # +1: lo moved last, -1: hi moved last
        width_old = torch.full_like(h, 2.0)  # bracket width two iterations ago
        width_prev = torch.ones_like(h)
        force = torch.zeros_like(active)  # bisect next: the last step made poor progress
        # The resolution: a few ulps of theta, or of the time t0 + theta * h where that is coarser.
        tol = eps * (1 + t0.abs() / torch.where(h > 0, h, 1.0).abs())
        for _ in range(max_iter):
            done = done | (hi - lo <= 2 * tol)
            if bool(done.all()):
                break
            width = hi - lo
            secant = hi - f_hi * width / (f_hi - f_lo)
            inside = torch.isfinite(secant) & (secant > lo) & (secant < hi)
            # Never closer than the resolution to an end: a secant sequence converging from one side then steps
            # across the root by the resolution and closes the bracket (Dekker's and Brent's rule).
            theta = torch.where(force | ~inside, 0.5 * (lo + hi), secant).clamp(lo + tol, hi - tol)
            f = s * g(theta).to(tdt)
            n += 1
            keep_lo = f > 0  # the new point is on the start's side
            upd = ~done
            best = torch.minimum(f_lo.abs(), f_hi.abs())
            # Anderson-Bjorck: the end kept twice in a row has its value scaled down (by 1 - f_new / f_moved,
            # or halved as in Illinois when that is not in (0, 1)), so the next secant point moves past it.
            m_hi = 1 - f / f_lo
            m_hi = torch.where((m_hi > 0) & (m_hi < 1), m_hi, 0.5)
            m_lo = 1 - f / f_hi
            m_lo = torch.where((m_lo > 0) & (m_lo < 1), m_lo, 0.5)
            f_hi = torch.where(upd & keep_lo & (side > 0), m_hi * f_hi, f_hi)
            f_lo = torch.where(upd & ~keep_lo & (side < 0), m_lo * f_lo, f_lo)
            lo = torch.where(upd & keep_lo, theta, lo)
            f_lo = torch.where(upd & keep_lo, f, f_lo)
            hi = torch.where(upd & ~keep_lo, theta, hi)
            f_hi = torch.where(upd & ~keep_lo, f, f_hi)
            done = done | (upd & (f == 0))  # an exact zero ends the search there
            side = torch.where(upd, torch.where(keep_lo, 1.0, -1.0).to(tdt), side)
            # Poor progress: |f| did not drop below a tenth of the best end's and the bracket did not halve in
            # two steps. Then bisect, which bounds the cost at about twice bisection's on any function.
            force = ~(f.abs() < 0.1 * best) & (hi - lo > 0.5 * width_old)
            width_old, width_prev = width_prev, width
    return torch.where(active, hi, torch.zeros_like(hi)), n
