"""A step's set-up for every group (``StepOps.step_begin``) in one launch: clip to the next stop, stage times.

On a GPU the loop's per-step set-up is otherwise a dozen tiny torch launches over ``[G]`` tensors. The kernel works
on time-dtype (float64) ``[G]`` tensors, one lane per group; the next output time is found by a binary search over
the group's row of ``t_out: [G, T]`` (``torch.searchsorted(..., right=True)``, ``_launch._count_le``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._launch import _block, _count_le, _logt, check_rows, empty, launches, register_op


@triton.jit
def _step_begin_kernel(t_ptr, h_ptr, run_ptr, tout_ptr, tend_ptr, c_ptr, hctl_ptr, clip_ptr, tnew_ptr, hs_ptr,
                       ts_ptr, te_ptr, G, T, S, TO_OUT: tl.constexpr, NEG: tl.constexpr, LOGT: tl.constexpr,
                       BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = rows < G
    rows64 = rows.to(tl.int64)
    t = tl.load(t_ptr + rows, mask=m, other=0.0)
    h = tl.load(h_ptr + rows, mask=m, other=0.0)
    running = tl.load(run_ptr + rows, mask=m, other=0) != 0
    limit = tl.load(tend_ptr + rows, mask=m, other=0.0)
    if TO_OUT:
        nxt = tl.minimum(_count_le(tout_ptr, rows64, m, t, T, LOGT), T - 1)
        limit = tl.load(tout_ptr + rows64 * T + nxt, mask=m, other=0.0)
    room = limit - t
    clipped = running & (h >= room)
    # As the reference's mul_(running): a group not running gets h * 0 (NaN for an infinite proposal, as there).
    h_ctl = tl.where(clipped, room, h) * running.to(tl.float64)
    t_new = tl.where(clipped, limit, t + h_ctl)
    tl.store(hctl_ptr + rows, h_ctl, mask=m)
    tl.store(clip_ptr + rows, clipped.to(tl.uint8), mask=m)
    tl.store(tnew_ptr + rows, t_new, mask=m)
    tl.store(hs_ptr + rows, h_ctl.to(hs_ptr.dtype.element_ty), mask=m)
    te = t_new.to(te_ptr.dtype.element_ty)
    if NEG:
        te = -te
    tl.store(te_ptr + rows, te, mask=m)
    for s in range(S):
        ts = (t + tl.load(c_ptr + s) * h_ctl).to(ts_ptr.dtype.element_ty)
        if NEG:
            ts = -ts
        tl.store(ts_ptr + s * G + rows64, ts, mask=m)



@register_op("fastnode_triton::step_begin")
def step_begin(t: torch.Tensor, h: torch.Tensor, running: torch.Tensor, t_out: torch.Tensor, t_end: torch.Tensor,
               to_outputs: bool, c: torch.Tensor, negate: bool, state_dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``StepOps.step_begin`` for float64 time: ``(h_ctl, clipped, t_new, h_state, t_stage [S, G], t_end_stage)``.

    Args:
        t, h, t_end: [G] float64; ``running``: [G] bool; ``t_out``: [G, T] float64, increasing per row.
        to_outputs: steps land on every output time (else only on ``t_end``).
        c: [S] float64 stage times; ``negate``: user time is minus integration time; ``state_dtype``: of the
            stage times func sees and of ``h_state``.
    """
    op = "step_begin"
    G = t.shape[0] if t.dim() == 1 else -1
    dev = t.device
    for name, x in (("t", t), ("h", h), ("t_end", t_end)):
        check_rows(x, G, torch.float64, name, op, dev)
    check_rows(running, G, torch.bool, "running", op, dev)
    if t_out.dim() != 2 or t_out.shape[0] != G or t_out.dtype != torch.float64 or not t_out.is_contiguous():
        raise ValueError(f"fastnode_triton.{op}: t_out must be a contiguous float64 [G, T] tensor, G = {G}")
    if c.dim() != 1 or c.dtype != torch.float64 or c.device != dev:
        raise ValueError(f"fastnode_triton.{op}: c must be a float64 [S] tensor on {dev}")
    S, T = c.shape[0], t_out.shape[1]
    h_ctl = empty((G,), torch.float64, dev)
    clipped = empty((G,), torch.uint8, dev)
    t_new = empty((G,), torch.float64, dev)
    h_state = empty((G,), state_dtype, dev)
    ts = empty((S, G), state_dtype, dev)
    te = empty((G,), state_dtype, dev)
    if G > 0 and launches(t):
        block = _block(G, dev)
        wrap_triton(_step_begin_kernel)[(triton.cdiv(G, block),)](
            t, h, running.view(torch.uint8), t_out, t_end, c, h_ctl, clipped, t_new, h_state, ts, te, G, T, S,
            TO_OUT=to_outputs, NEG=negate, LOGT=_logt(T), BLOCK=block, num_warps=4)
    return h_ctl, clipped.view(torch.bool), t_new, h_state, ts, te


__all__ = ["step_begin"]
