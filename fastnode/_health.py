"""Checks that end solves which would otherwise run practically forever, at no cost to the ordinary step.

The adaptive loop watches a few short windows of consecutive iterations (``HealthCheck.watching``): from
iteration 256 on, at 256, 512 and then every 1024. A hopeless solve stays hopeless, so a window is enough to
catch it, and between windows the step costs nothing extra (the compiled ``step_end`` ops keep their contract:
a watched step runs the reference ``step_end`` with ``fail=``). In a window, per group:

- **Non-finite cycling**: the error estimate was non-finite (NaN/inf) in ``NF_LIMIT`` of the window's attempts:
  every step above some size gives NaN/inf and the accepted smaller ones barely advance (e.g. an adjoint growing
  to the edge of its dtype's range). Fails with ``NON_FINITE``.
- **Step floor relative to |t|** (Hairer's DOPRI5 rule): ``0.1 |h| <= eps |t|`` in the time dtype, a step that
  cannot change ``t`` meaningfully. Fails with ``STEP_UNDERFLOW``.
- **Stiffness** (Hairer & Wanner, Solving ODEs II, IV.2; the test of DOPRI5): from iteration 1024 on, each
  accepted step estimates ``|h lambda| = |h| ||k_j - k_i|| / ||y_j - y_i||`` from the last two stages at the same
  time (``c_i = c_j``), compared with ``0.98`` of the method's stability boundary on the negative real axis
  (``3.24`` for dopri5, where DOPRI5 uses ``3.25``). Fifteen stiff steps with no six non-stiff ones in between
  mean the step is limited by stability, not accuracy: fails with ``STIFF`` (``options['on_stiff']='raise'``,
  the default), warns once (``'warn'``) or is not tested (``'ignore'``). The window stays open while a group
  has a stiff count (as DOPRI5 keeps testing while ``IASTI > 0``). Methods with no two stages at the same time
  (bosh3, fehlberg2, adaptive_heun) have no stiffness test.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from . import _stats as st

WINDOW = 16  # iterations watched per window
NF_LIMIT = 5  # non-finite error estimates in one window that mean the solve cycles
STIFF_COUNT, NONSTIFF_RESET = 15, 6  # DOPRI5's IASTI and NONSTI limits
FIRST_STIFF = 1024  # no stiffness test before this iteration (DOPRI5: NSTIFF = 1000 accepted steps)


def window_start(it: int) -> bool:
    """Whether iteration ``it`` (1-based) opens a window: 256, 512, then every multiple of 1024."""
    return it in (256, 512) or (it >= 1024 and it % 1024 == 0)


@functools.lru_cache(maxsize=None)
def real_stability_boundary(a: tuple, b: tuple) -> float:
    """The largest ``x`` with ``|R(-s)| <= 1`` for all ``0 <= s <= x``, ``R(z) = 1 + sum_k z^k b^T A^(k-1) 1`` the
    stability polynomial of an explicit Runge-Kutta method (``a``: rows of A, ``b``: weights)."""
    S = len(b)
    A = np.zeros((S, S))
    for i, row in enumerate(a):
        A[i, : len(row)] = row
    coef = [1.0]
    v = np.ones(S)
    for _ in range(S):
        coef.append(float(np.dot(b, v)))
        v = A @ v
    xs = np.arange(1, 200001) * 1e-4  # up to 20
    r = np.polynomial.polynomial.polyval(-xs, coef)
    out = np.nonzero(np.abs(r) > 1.0 + 1e-12)[0]
    return float(xs[out[0] - 1]) if out.size else float(xs[-1])


def stiffness_pair(tableau) -> tuple[int, int] | None:
    """The last two stages evaluated at the same time (``c_i == c_j``, ``i < j``), or None."""
    c = [float(x) for x in tableau.c]
    for j in range(len(c) - 1, 0, -1):
        for i in range(j - 1, -1, -1):
            if c[i] == c[j]:
                return i, j
    return None


_STIFFNESS: dict = {}


def _stiffness_of(tableau) -> tuple[tuple[int, int] | None, float]:
    """``(stiffness_pair, 0.98 * real_stability_boundary)`` of ``tableau``, once per tableau."""
    hit = _STIFFNESS.get(id(tableau))
    if hit is None or hit[0] is not tableau:
        pair = stiffness_pair(tableau)
        bound = 0.0
        if pair is not None:
            bound = 0.98 * real_stability_boundary(tuple(tuple(float(x) for x in r) for r in tableau.a),
                                                   tuple(float(x) for x in tableau.b))
        if len(_STIFFNESS) >= 64:
            _STIFFNESS.clear()
        hit = _STIFFNESS[id(tableau)] = (tableau, pair, bound)
    return hit[1], hit[2]


class HealthCheck:
    """The windows' state for one solve: per-group counters on the device, the host's window schedule."""

    def __init__(self, tableau, on_stiff: str, G: int, device, time_dtype, has_events: bool):
        self.pair, self.bound = _stiffness_of(tableau) if on_stiff != "ignore" else (None, 0.0)
        self.on_stiff = on_stiff
        self.eps = torch.finfo(time_dtype).eps
        self.has_events = has_events
        # The per-group counters live on the device from the first window on (iteration 256): most solves are
        # shorter and never allocate them.
        self.G, self.device, self.time_dtype = G, device, time_dtype
        self.nf = None  # non-finite error estimates in the current window
        self.iasti = self.nonsti = None  # DOPRI5's stiff and non-stiff counts
        self.cycled = self.floored = self.stiff = None  # bool
        self.hlamb = None
        self.left = 0  # iterations left in the current window
        self.stiff_open = False  # some group has a stiff count (from the last fetch)
        self.warned = False
        self.it = 0

    def _allocate(self) -> None:
        G, dev = self.G, self.device
        z = torch.zeros(G, dtype=torch.int64, device=dev)
        self.nf = self.iasti = self.nonsti = z
        self.cycled = torch.zeros(G, dtype=torch.bool, device=dev)
        self.floored = torch.zeros(G, dtype=torch.bool, device=dev)
        self.stiff = torch.zeros(G, dtype=torch.bool, device=dev)
        self.hlamb = torch.zeros(G, dtype=self.time_dtype, device=dev)

    def watching(self, it: int) -> bool:
        """Whether iteration ``it`` is watched (host only: no transfer)."""
        self.it = it
        if window_start(it):
            self.left = WINDOW
            if self.nf is None:
                self._allocate()
            else:
                self.nf = torch.zeros_like(self.nf)
        watched = self.left > 0 or (self.stiff_open and self.pair is not None)
        self.left = max(self.left - 1, 0)
        return watched

    def unwatched(self, it: int) -> int:
        """How many iterations after iteration ``it`` (the last one run) ``watching`` would not watch (host only):
        a compiled loop may run them without this check (``fastnode._compiled``)."""
        if self.left > 0 or (self.stiff_open and self.pair is not None):
            return 0
        nxt = 256 if it < 256 else 512 if it < 512 else (it // 1024 + 1) * 1024
        return nxt - it - 1

    def observe(self, s, plan, fin, K, stage_inputs: dict, ops, t_end: torch.Tensor) -> torch.Tensor:
        """[G] int8 failure codes for this watched step (0: none), from the step's stages and decision."""
        running = s.running
        self.nf = self.nf + (running & ~torch.isfinite(fin.ratio))
        cycling = self.nf >= NF_LIMIT
        self.cycled = self.cycled | cycling
        t_new = torch.where(fin.accept, plan.t_new, s.t).detach()
        floor = running & (t_new < t_end) & (fin.h_next.abs() * 0.1 <= self.eps * t_new.abs())
        self.floored = self.floored | (floor & ~cycling)
        fail = torch.where(cycling, st.NON_FINITE, torch.where(floor, st.STEP_UNDERFLOW, 0))
        if self.pair is not None and self.it >= FIRST_STIFF:
            stiff = self._stiffness(s, plan, fin, K, stage_inputs, ops)
            if self.on_stiff == "raise":
                fail = torch.where(stiff & (fail == 0), st.STIFF, fail)
        return (fail * running).to(torch.int8)

    def _stiffness(self, s, plan, fin, K, stage_inputs: dict, ops) -> torch.Tensor:
        """DOPRI5's counters updated on the accepted steps; [G] bool: stiff now."""
        i, j = self.pair
        with torch.no_grad():
            num = (ops.stage(K, j) - ops.stage(K, i)).square().sum(dim=1)
            den = (stage_inputs[j] - stage_inputs[i]).square().sum(dim=1)
            hl = plan.h_ctl.detach().abs() * (num / den).to(plan.h_ctl.dtype).sqrt()
            hl = torch.where(den > 0, hl, 0.0)
            acc = fin.accept & s.running
            big = acc & (hl > self.bound)
            small = acc & ~big
            self.nonsti = torch.where(big, 0, self.nonsti + small)
            self.iasti = torch.where(big, self.iasti + 1, torch.where(self.nonsti >= NONSTIFF_RESET, 0, self.iasti))
            self.nonsti = torch.where(self.nonsti >= NONSTIFF_RESET, 0, self.nonsti)
            self.hlamb = torch.where(big, hl, self.hlamb)
            stiff = self.iasti >= STIFF_COUNT
            self.stiff = self.stiff | stiff
            if self.on_stiff != "raise":
                self.iasti = torch.where(stiff, 0, self.iasti)
        return stiff

    def packet_flags(self) -> list:
        """0-d tensors fetched with the step's packet: a stiff count is open, a group just turned stiff."""
        if self.pair is None or self.it < FIRST_STIFF:
            return []
        return [(self.iasti > 0).any(), self.stiff.any()]

    def after_fetch(self, flags) -> None:
        if not flags:
            return
        self.stiff_open = bool(flags[0])
        if flags[1] and self.on_stiff == "warn" and not self.warned:
            self.warned = True
            warnings.warn("fastnode: the problem appears stiff (the step size is limited by stability, not accuracy); "
                          "an implicit solver would take far fewer steps", RuntimeWarning, stacklevel=4)

    def explain(self, code: int, g: int, facts: tuple) -> str | None:
        """The failure text for group ``g`` when a window caused it (None otherwise); ``facts``: ``details()``."""
        cycled, floored, hlamb = facts
        if code == st.NON_FINITE and cycled[g]:
            return (f"the error estimate was non-finite (NaN/inf) in {NF_LIMIT} of {WINDOW} consecutive step "
                    "attempts: every step above some size gives NaN/inf and the smaller accepted ones barely advance "
                    "(the solution may be leaving the range of its dtype, or func is singular there)")
        if code == st.STEP_UNDERFLOW and floored[g]:
            return ("step size underflow (the step fell below 10 * eps * |t| of the time dtype and can no longer "
                    "advance t meaningfully; the problem may be stiff or singular there)")
        if code == st.STIFF:
            what = ("no event: event_fn did not cross zero and the solution appears to have settled, the step "
                    "size being limited by stability, not accuracy, so the event may never fire; "
                    if self.has_events else "")
            return (f"{what}the problem appears stiff (|h*lambda| ~ {hlamb[g]:.3g} > {self.bound:.3g}, the stability "
                    f"limit of the method, in {STIFF_COUNT} accepted steps): use an implicit solver, or pass "
                    "options['on_stiff']='warn' or 'ignore' to keep integrating with explicit steps")
        return None

    def details(self) -> tuple[list, list, list]:
        """Host copies of the per-group facts the messages need (called once, on failure)."""
        if self.nf is None:  # no window opened
            return [False] * self.G, [False] * self.G, [0.0] * self.G
        return self.cycled.tolist(), self.floored.tolist(), self.hlamb.tolist()


__all__ = ["HealthCheck", "real_stability_boundary", "stiffness_pair", "window_start"]
