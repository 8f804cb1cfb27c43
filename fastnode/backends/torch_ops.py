"""The reference StepOps backend in plain PyTorch.

Shapes: the solver works on a flattened state ``y: [G, N]`` where ``G`` is the number of independently
controlled groups (1 in shared mode, the batch size ``B`` in per-sample mode). Stages are kept in a stage
store (here a list of ``[G, N]`` tensors, so autograd can track each one); ``h: [G]`` holds the step sizes
in the state dtype (the controller works on them in the time dtype). Everything that only steers the step-size
control (error ratio, controller) runs without autograd: gradients flow through the stages, the solution and the
interpolation, never through the choice of step size.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .._options import ControllerConfig, RMSNorm, rms_norm  # noqa: F401  (the reference's norm and controller)
from .._tableau import ButcherTableau
from .base import StepEnd, StepOps, StepPlan, StepResult, as_named


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
    """Pure-PyTorch reference implementation of every StepOps operation (docstrings: ``base.StepOps``)."""

    name = "torch"
    supports_autograd = True

    stages_are_lists = True

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

    def rk_combine(self, y, K, h, weights):
        return _combine(y, K, h, weights)  # zip in _lincomb reads the first len(weights) stages

    def step_error(self, tableau, y, K, h, rtol, atol):
        y_new = _combine(y, K, h, tableau.b)
        with torch.no_grad():
            err = _lincomb(K, tableau.e).mul_(h.unsqueeze(1))
            scale = torch.maximum(y.abs(), y_new.abs()).mul_(rtol).add_(atol)
            x = err.div_(scale)
        return y_new, x

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

    interpolates_many = True  # theta [M] with G = 1: the formulas below broadcast the one row

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

    def finish_control(self, tableau, y, K, h, rtol, atol, norm, cfg, h_ctl, prev_ratio, running,
                       ratio_floor=None, adjust=None):
        # The composition of solution/error, norm and controller that fast backends fuse into one pass.
        y_new, x = self.step_error(tableau, y, K, h, rtol, atol)
        with torch.no_grad():
            ratio = norm(x)
            # One pass flags a non-finite new state or derivative: the half-sum is non-finite iff either is, and
            # cannot overflow (y_new + k_last could, for finite values near the dtype's max).
            ok = torch.isfinite((y_new * 0.5).add_(self.stage(K, tableau.num_stages - 1), alpha=0.5)).all(dim=1)
            if adjust is not None:
                ratio = adjust(ratio)
            if ratio_floor is not None:
                ratio = torch.maximum(ratio, ratio_floor.to(ratio.dtype))
            ratio = torch.where(ok, ratio.to(h_ctl.dtype), math.inf)
            accept, h_next, prev_ratio = self.controller(cfg, h_ctl, ratio, prev_ratio, running)
        return as_named(StepResult, (y_new, ratio, ok, accept, h_next, prev_ratio))

    def step_begin(self, t, h, running, t_out, t_end, to_outputs, c, sign, state_dtype, squeeze, *, stops=None,
                   end_perturb=0, time_grad=False):
        with torch.no_grad():
            t_d = t.detach() if time_grad else t
            limit = t_end
            if to_outputs:
                nxt = torch.searchsorted(t_out, t_d.unsqueeze(1), right=True).clamp_max_(t_out.shape[1] - 1)
                with torch.enable_grad() if time_grad else contextlib.nullcontext():
                    limit = t_out.gather(1, nxt).squeeze(1)  # keeps the output times' graph when they need it
            if stops is not None:
                limit = torch.minimum(limit, stops[torch.searchsorted(stops, t_d, right=True)])
            room = limit - t_d
            clipped = running & (h >= room)
            h_ctl = torch.where(clipped, room, h).mul_(running)
            if not time_grad:
                h_eff = h_ctl
                t_new = torch.where(clipped, limit, t_d + h_ctl)
        if time_grad:
            # Differentiable in the times (through `limit - t`) but not in the controller's choice of h.
            h_eff = torch.where(clipped, limit - t, h_ctl)
            t_new = torch.where(clipped, limit, t + h_eff)
        c_col = _const(tuple(c), t.dtype, t.device).unsqueeze(1)
        ts = torch.addcmul(t, c_col, h_eff).to(state_dtype)
        te = t_new.to(state_dtype)
        if sign < 0:
            ts, te = -ts, -te
        if end_perturb:
            # The stages at the step's end see the left limit there: a step landing on a discontinuity never mixes
            # in the right-hand value (the next representable time towards the step's start, in func's dtype).
            te = torch.nextafter(te, torch.full_like(te, end_perturb * sign * math.inf))
        if squeeze:
            ts, te = ts.squeeze(-1), te.squeeze(-1)
        return as_named(StepPlan, (h_ctl, h_eff, clipped, t_new, h_eff.to(state_dtype), ts, te))

    def step_end(self, accept, h_next, h, clipped, running, t, t_new, t_end, n_att, n_acc, status, last_nonfinite,
                 new_ok, next_idx, t_out, max_num_steps, codes, *, jump_t=None, stop=None, fail=None):
        fail_here = fail
        graph = t.requires_grad or t_new.requires_grad
        with torch.no_grad():
            t_d, t_new_d = (t.detach(), t_new.detach()) if graph else (t, t_new)
            # A step shortened to land on a stop is no evidence for a smaller step: keep the proposal.
            h_next = torch.where(clipped & accept, torch.maximum(h_next, h), h_next)
            n_att = n_att + running
            n_acc = n_acc + accept
            t_fut = torch.where(accept, t_new_d, t_d)
            # Failures: a rejected step that can no longer move t (underflow: non-finite if the rejections came
            # from NaN/inf, else a genuine underflow), a step grown to inf (events with no end time), the step
            # budget spent with time left.
            t_try = t_fut + h_next
            no_move = ~accept & (t_try <= t_fut)
            inf_try = torch.isinf(t_try)
            stuck = running & (no_move | inf_try | ((n_att >= max_num_steps) & (t_fut < t_end)))
            last_nonfinite = torch.where(running, ~new_ok, last_nonfinite)
            nf, uf, to, ms = _const(tuple(codes), torch.int8, t.device).unbind()
            fail = torch.where(no_move, torch.where(last_nonfinite, nf, uf), torch.where(inf_try, to, ms))
            status = torch.where(stuck, fail, status)
            if fail_here is not None:
                # Failures found outside this op (fastnode._health): their code, unless the step failed already.
                extra = running & (fail_here != 0) & ~stuck
                status = torch.where(extra, fail_here.to(status.dtype), status)
                stuck = stuck | extra
            n_le = torch.searchsorted(t_out, t_new_d.unsqueeze(1), right=True).squeeze(1)
            crossed = torch.where(accept, n_le - next_idx, 0)
            running_next = running & (t_fut < t_end) & ~stuck
            if stop is not None:
                running_next &= ~stop
            jumped = None
            if jump_t is not None:
                j_idx = torch.searchsorted(jump_t, t_new_d).clamp_max(jump_t.numel() - 1)
                jumped = accept & clipped & (jump_t[j_idx] == t_new_d)
            h_keep = torch.where(running, h_next, h)  # a finished group keeps its last proposal (seeds the adjoint)
            packet = torch.stack([running_next.any().to(torch.int64), stuck.any().to(torch.int64), crossed.max()])
        if graph and torch.is_grad_enabled():
            t_fut = torch.where(accept, t_new, t)  # the same times, with the output times' graph
        return as_named(StepEnd, (h_keep, t_fut, n_att, n_acc, status, last_nonfinite, stuck, crossed, running_next,
                                  packet, jumped))

    @torch.no_grad()
    def initial_step(self, probe, t0, y0, k0, order, rtol, atol, norm):
        scale = atol + y0.abs() * rtol
        d0 = norm(y0 / scale).to(t0.dtype)
        d1 = norm(k0 / scale).to(t0.dtype)
        small = (d0 < 1e-5) | (d1 < 1e-5)
        h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
        y1 = y0 + h0.to(y0.dtype).unsqueeze(1) * k0
        k1 = probe(t0 + h0, y1)
        d2 = norm((k1 - k0) / scale).to(t0.dtype) / h0
        return _initial_step_end(h0, d1, d2, order)

    @torch.no_grad()
    def adjoint_weights(self, h, accept, b):
        hb = torch.where(accept, h, 0.0)
        return hb.unsqueeze(0) * _const(tuple(float(v) for v in b), h.dtype, h.device).unsqueeze(1)


def _initial_step_end(h0: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, order: int) -> torch.Tensor:
    """The starting step from the probe's estimates (time dtype, [G])."""
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(
        dmax <= 1e-15,
        torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
        (0.01 / dmax.clamp_min(1e-300)) ** (1.0 / order),
    )
    h = torch.minimum(100 * h0, h1)
    # A non-finite estimate (func blew up at the probe point) falls back to a tiny step the controller can grow.
    return torch.where(torch.isfinite(h) & (h > 0), h, torch.full_like(h, 1e-6))


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
