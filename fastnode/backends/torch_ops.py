"""The reference StepOps backend in plain PyTorch.

Shapes: the solver works on a flattened state ``y: [G, N]`` where ``G`` is the number of independently
controlled groups (1 in shared mode, the batch size ``B`` in per-sample mode). Stages are kept in a stage
store (here a list of ``[G, N]`` tensors, so autograd can track each one); ``h: [G]`` holds the step sizes
in the state dtype (the controller works on them in the time dtype). Everything that only steers the step-size control (error ratio, controller) runs
without autograd: gradients flow through the stages, the solution and the interpolation, never through
the choice of step size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._tableau import ButcherTableau


@dataclass(frozen=True)
class ControllerConfig:
    """Step-size controller settings (torchdiffeq's I-controller by default)."""

    order: int
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    min_step: float = 0.0
    max_step: float = float("inf")
    kind: str = "i"  # "i" or "pi"
    pi_alpha: float = 0.7  # PI exponents, divided by the order
    pi_beta: float = 0.4

    def as_floats(self) -> list[float]:
        """The settings in the order the compiled ``finish_control`` ops take them (``fastnode::`` and
        ``fastnode_triton::``): order, safety, ifactor, dfactor, min_step, max_step, is_pi, pi_alpha, pi_beta."""
        return [float(self.order), self.safety, self.ifactor, self.dfactor, self.min_step, self.max_step,
                1.0 if self.kind == "pi" else 0.0, self.pi_alpha, self.pi_beta]


def rms_norm(x: torch.Tensor, segments: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Per-row RMS of ``x: [G, N]``; with ``segments`` the max over segments of each segment's RMS. Returns [G]."""
    if segments is None or len(segments) == 1:
        return x.square().mean(dim=1).sqrt()
    parts = [x[:, s:e].square().mean(dim=1).sqrt() for s, e in segments if e > s]
    return torch.stack(parts, dim=0).amax(dim=0)


class RMSNorm:
    """The solver's built-in error norm as data, so a fast backend can fuse it into the step's finish.

    ``RMSNorm(segments)(x)`` is ``rms_norm(x, segments)``: per row of ``x: [G, N]``, the max over the column
    segments ``[(start, end), ...]`` of each segment's RMS (``None``: one segment, the whole row). A user's norm
    stays a plain callable; backends then compute the scaled error fused and call it.
    """

    __slots__ = ("segments",)

    def __init__(self, segments: list[tuple[int, int]] | None = None):
        self.segments = None if segments is None or len(segments) <= 1 else [(int(s), int(e)) for s, e in segments]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.segments)

    def bounds(self, n: int) -> list[int]:
        """Flat ``[s0, e0, s1, e1, ...]`` of the non-empty segments of a row of ``n`` columns."""
        segs = self.segments or [(0, n)]
        return [v for s, e in segs if e > s for v in (s, e)]

    def __repr__(self) -> str:
        return f"RMSNorm({self.segments})"


class StepOps:
    """Interface of a backend. ``K`` is the stage store returned by ``new_stages``/``set_stage``."""

    name = "abstract"
    supports_autograd = False  # whether gradients flow through the ops (backpropagation through the solver)
    forced = False  # chosen explicitly by options['backend'] (not by "auto")

    def new_stages(self, tableau: ButcherTableau, y: torch.Tensor):
        raise NotImplementedError

    def set_stage(self, K, i: int, k: torch.Tensor):
        raise NotImplementedError

    def stage(self, K, i: int) -> torch.Tensor:
        raise NotImplementedError

    def stage_input(self, tableau: ButcherTableau, i: int, y, K, h) -> torch.Tensor:
        """``y + h * sum_{j<i} a_ij k_j``: ``y: [G, N]``, ``h: [G]`` (state dtype) -> [G, N]."""
        raise NotImplementedError

    def solution(self, tableau: ButcherTableau, y, K, h) -> torch.Tensor:
        """``y + h * sum_j b_j k_j`` -> [G, N]."""
        raise NotImplementedError

    def step_finish(self, tableau, y, K, h, rtol, atol, norm: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """New solution [G, N] and error ratio [G] = norm(h * sum e_j k_j / (atol + rtol * max(|y|, |y_new|)))."""
        raise NotImplementedError

    def controller(self, cfg: ControllerConfig, h, ratio, prev_ratio, running):
        """Accept mask [G], next step [G], controller memory [G]; ``ratio`` non-finite means reject."""
        raise NotImplementedError

    def interpolate(self, tableau: ButcherTableau, y, K, h, theta) -> torch.Tensor:
        """Dense output at ``t0 + theta * h``: ``theta: [G]`` -> [G, N]."""
        raise NotImplementedError

    @torch.no_grad()
    def step_begin(self, t, h, running, t_out, t_end, to_outputs: bool, c, sign: float, state_dtype, squeeze: bool):
        """A step's set-up for every group (no time gradients, no step_t/jump_t stops).

        Args:
            t, h: [G] time and proposed step (time dtype); ``running``: [G] bool.
            t_out: [G, T] increasing output times; ``t_end``: [G]; ``to_outputs``: steps land on every output time
                (else only on ``t_end``).
            c: the tableau's stage times; ``sign``: +1/-1, user time = sign * integration time.
            squeeze: shared mode (G = 1): stage times come back as func sees them there, ``[S]`` and 0-d.
        Returns:
            ``(h_ctl [G], clipped [G], t_new [G], h_state [G] (state dtype), t_stage [S, G] or [S],
            t_end_stage [G] or 0-d)``: the step clipped to the next stop (0 where not running), whether it
            was clipped, the time it reaches, and every stage's time as func sees it.
        """
        limit = t_end
        if to_outputs:
            nxt = torch.searchsorted(t_out, t.unsqueeze(1), right=True).clamp_max_(t_out.shape[1] - 1)
            limit = t_out.gather(1, nxt).squeeze(1)
        room = limit - t
        clipped = running & (h >= room)
        h_ctl = torch.where(clipped, room, h).mul_(running)
        t_new = torch.where(clipped, limit, t + h_ctl)
        c_col = _const(tuple(c), t.dtype, t.device).unsqueeze(1)
        ts = torch.addcmul(t, c_col, h_ctl).to(state_dtype)
        te = t_new.to(state_dtype)
        if sign < 0:
            ts, te = -ts, -te
        if squeeze:
            ts, te = ts.squeeze(-1), te.squeeze(-1)
        return h_ctl, clipped, t_new, h_ctl.to(state_dtype), ts, te

    @torch.no_grad()
    def step_end(self, accept, h_next, h, clipped, running, t, t_new, t_end, n_att, n_acc, status, last_nonfinite,
                 new_ok, next_idx, t_out, max_num_steps: int, codes):
        """A step's bookkeeping for every group, after the controller decided.

        Args:
            accept, h_next: [G] the controller's decision and proposal; ``h``: [G] the step proposed before it.
            clipped, running: [G] bool; ``t``, ``t_new``, ``t_end``: [G] times; ``n_att``, ``n_acc``: [G] int64
                attempt/accept counters; ``status``: [G] int8; ``last_nonfinite``, ``new_ok``: [G] bool;
                ``next_idx``: [G] int64 index of the next output time; ``t_out``: [G, T].
            codes: the status codes ``(non_finite, step_underflow, time_overflow, max_steps)``.
        Returns:
            ``(h [G], t [G], n_att, n_acc, status, last_nonfinite, stuck [G], crossed [G] int64,
            running_next [G], packet [3] int64)``; ``packet`` = (any running next, any stuck, max crossed),
            the loop's one host transfer.
        """
        # A step shortened to land on a stop is no evidence for a smaller step: keep the proposal.
        h_next = torch.where(clipped & accept, torch.maximum(h_next, h), h_next)
        n_att = n_att + running
        n_acc = n_acc + accept
        t_fut = torch.where(accept, t_new, t)
        # Failures: a rejected step that can no longer move t (underflow: non-finite if the rejections came from
        # NaN/inf, else a genuine underflow), a step grown to inf (events with no end time), the step budget spent
        # with time left.
        t_try = t_fut + h_next
        no_move = ~accept & (t_try <= t_fut)
        inf_try = torch.isinf(t_try)
        stuck = running & (no_move | inf_try | ((n_att >= max_num_steps) & (t_fut < t_end)))
        last_nonfinite = torch.where(running, ~new_ok, last_nonfinite)
        nf, uf, to, ms = _const(tuple(codes), torch.int8, t.device).unbind()
        fail = torch.where(no_move, torch.where(last_nonfinite, nf, uf), torch.where(inf_try, to, ms))
        status = torch.where(stuck, fail, status)
        n_le = torch.searchsorted(t_out, t_new.unsqueeze(1), right=True).squeeze(1)
        crossed = torch.where(accept, n_le - next_idx, 0)
        running_next = running & (t_fut < t_end) & ~stuck
        h_keep = torch.where(running, h_next, h)  # a finished group keeps its last proposal (seeds the adjoint)
        packet = torch.stack([running_next.any().to(torch.int64), stuck.any().to(torch.int64), crossed.max()])
        return h_keep, t_fut, n_att, n_acc, status, last_nonfinite, stuck, crossed, running_next, packet

    @torch.no_grad()
    def adjoint_weights(self, h: torch.Tensor, accept: torch.Tensor, b) -> torch.Tensor:
        """The adjoint's per-sample quadrature weights [S, G]: ``h_g * b_j`` where group g's step was accepted,
        else 0 (folded into the cotangent of the parameter adjoint's vector-Jacobian product)."""
        hb = torch.where(accept, h, 0.0)
        return hb.unsqueeze(0) * _const(tuple(float(v) for v in b), h.dtype, h.device).unsqueeze(1)

    def finish_control(self, tableau, y, K, h, rtol, atol, norm: Callable, cfg: ControllerConfig, h_ctl,
                       prev_ratio, running, ratio_floor=None, adjust: Callable | None = None):
        """A step's whole finish: solution, error ratio, finiteness, accept/reject and the next step size.

        Args:
            y: [G, N] state at the step's start; ``K`` the stage store; ``h``: [G] step (state dtype).
            h_ctl: [G] the same step in the time dtype (0 for groups not running), what the controller scales.
            prev_ratio: [G] controller memory (PI); ``running``: [G] bool.
            ratio_floor: optional [G] lower bound of the error ratio (the adjoint's parameter-error term).
            adjust: optional callable replacing the ratio (a custom adjoint norm); forces the unfused path.
        Returns:
            ``(y_new [G, N], ratio [G] (time dtype, inf where not finite), ok [G], accept [G], h_next [G],
            prev_ratio [G])``; ``ok`` is False where the new state or the last stage is non-finite.

        This composition is the reference; fast backends fuse it into one pass with no host sync.
        """
        y_new, ratio = self.step_finish(tableau, y, K, h, rtol, atol, norm)
        with torch.no_grad():
            # One pass flags a non-finite new state or derivative (the sum is non-finite iff either is,
            # barring overflow of the sum itself, which is as good as non-finite here).
            ok = torch.isfinite(y_new + self.stage(K, tableau.num_stages - 1)).all(dim=1)
            if adjust is not None:
                ratio = adjust(ratio)
            if ratio_floor is not None:
                ratio = torch.maximum(ratio, ratio_floor.to(ratio.dtype))
            ratio = torch.where(ok, ratio.to(h_ctl.dtype), math.inf)
            accept, h_next, prev_ratio = self.controller(cfg, h_ctl, ratio, prev_ratio, running)
        return y_new, ratio, ok, accept, h_next, prev_ratio


def _lincomb(K: list, weights) -> torch.Tensor | None:
    """``sum_j w_j K[j]`` with Python-float weights (zeros skipped); ``None`` if all weights are zero."""
    acc = None
    for w, k in zip(weights, K):
        if w == 0.0:
            continue
        # NOTE: acc is a fresh tensor, so accumulating into it in place is autograd-safe and saves S temporaries.
        acc = k * w if acc is None else acc.add_(k, alpha=w)
    return acc


def _combine(y: torch.Tensor, K: list, h: torch.Tensor, weights) -> torch.Tensor:
    """``y + h[:, None] * sum_j w_j K[j]``; ``h: [G]`` in the state dtype."""
    acc = _lincomb(K, weights)
    return y if acc is None else torch.addcmul(y, h.unsqueeze(1), acc)


class TorchStepOps(StepOps):
    """Pure-PyTorch reference implementation of every StepOps operation."""

    name = "torch"
    supports_autograd = True

    def new_stages(self, tableau, y):
        return []

    def set_stage(self, K, i, k):
        if i == len(K):
            K.append(k)
        else:
            K[i] = k
        return K

    def stage(self, K, i):
        return K[i]

    def stage_input(self, tableau, i, y, K, h):
        return _combine(y, K[:i], h, tableau.a[i])

    def solution(self, tableau, y, K, h):
        return _combine(y, K, h, tableau.b)

    def step_finish(self, tableau, y, K, h, rtol, atol, norm):
        y_new = _combine(y, K, h, tableau.b)
        with torch.no_grad():
            err = _lincomb(K, tableau.e).mul_(h.unsqueeze(1))
            scale = torch.maximum(y.abs(), y_new.abs()).mul_(rtol).add_(atol)
            ratio = norm(err.div_(scale))
        return y_new, ratio

    @torch.no_grad()
    def controller(self, cfg, h, ratio, prev_ratio, running):
        # NaN ratios (non-finite error) count as inf: rejected, and the step shrinks by dfactor.
        r = torch.nan_to_num(ratio.to(h.dtype), nan=math.inf)
        accept = r <= 1.0
        if cfg.min_step > 0:
            accept |= torch.isfinite(r) & (h <= cfg.min_step)
        accept &= running
        k = float(cfg.order)
        factor = r.pow(-1.0 / k).mul_(cfg.safety)  # r == 0 gives inf, capped to ifactor below
        if cfg.kind == "pi":
            # Gustafsson's PI controller on accepted steps; plain I-control (never growing) after a rejection.
            pi = r.pow(-cfg.pi_alpha / k).mul_(prev_ratio.pow(cfg.pi_beta / k)).mul_(cfg.safety)
            factor = torch.where(accept, pi, factor.clamp_max(1.0))
            prev_ratio = torch.where(accept, r.clamp_min(1e-10), prev_ratio)
        # As torchdiffeq: no shrink after an accepted step, growth capped by ifactor, shrink floored by dfactor.
        # NOTE: full_like, not torch.where(r < 1, 1.0, dfactor): two Python scalars make a float32 tensor, which
        # would round dfactor (0.2 -> 0.2000000030) in a float64 controller.
        lower = torch.full_like(factor, cfg.dfactor).masked_fill_(r < 1.0, 1.0)
        factor = torch.maximum(factor, lower).clamp_max_(cfg.ifactor)
        h_next = (h * factor).clamp_(cfg.min_step, cfg.max_step)
        h_next = torch.where(running, h_next, h)
        return accept, h_next, prev_ratio

    def interpolate(self, tableau, y, K, h, theta):
        dense = _dense_tensor(tableau, y.dtype, y.device)  # [S, P]
        P = dense.shape[1]
        th = theta.to(y.dtype).unsqueeze(1)
        powers = torch.cat([th ** (p + 1) for p in range(P)], dim=1)  # [G, P]
        # NOTE: an elementwise product-sum rather than a matmul, so each sample's weights are computed the same
        # way whatever the batch size (BLAS picks different kernels for different shapes): a sample solved in
        # a batch then matches the same sample solved alone bit for bit.
        w = (powers.unsqueeze(1) * dense.unsqueeze(0)).sum(dim=2)  # [G, S]
        acc = None
        for j, k in enumerate(K):
            if not any(tableau.dense[j]):
                continue
            term = w[:, j : j + 1] * k
            acc = term if acc is None else acc + term
        return torch.addcmul(y, h.unsqueeze(1), acc)


_DENSE_CACHE: dict = {}
_CONST_CACHE: dict = {}


def _const(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor, made once per (values, dtype, device)."""
    key = (values, dtype, device)
    hit = _CONST_CACHE.get(key)
    if hit is None:
        hit = _CONST_CACHE[key] = torch.tensor(values, dtype=dtype, device=device)
    return hit


def _dense_tensor(tableau: ButcherTableau, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (id(tableau), dtype, device)
    hit = _DENSE_CACHE.get(key)
    if hit is None or hit[0] is not tableau:
        hit = _DENSE_CACHE[key] = (tableau, torch.tensor(tableau.dense, dtype=dtype, device=device))
    return hit[1]
