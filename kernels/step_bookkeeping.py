"""A step's set-up and bookkeeping for every group (``StepOps.step_begin`` / ``StepOps.step_end``), one launch each.

On a GPU the loop's per-step bookkeeping is otherwise dozens of tiny torch launches over ``[G]`` tensors. Both
kernels work on time-dtype (float64) ``[G]`` tensors, one lane per group; the next output time is found by a
binary search over the group's row of ``t_out: [G, T]`` (``torch.searchsorted(..., right=True)``).
``step_end`` also reduces the loop's one host-transfer packet (any running, any stuck, max crossed) with atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._launch import check_rows, empty, launches, register_op


@triton.jit
def _count_le(tout_ptr, rows64, m, x, T, LOGT: tl.constexpr):
    # Per row: how many of t_out[row, :T] (increasing) are <= x (searchsorted right), by binary search.
    lo = tl.zeros_like(rows64)
    hi = tl.zeros_like(rows64) + T
    for _ in tl.static_range(LOGT):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(tout_ptr + rows64 * T + tl.minimum(mid, T - 1), mask=m & active, other=0.0)
        go = active & (v <= x)
        lo = tl.where(go, mid + 1, lo)
        hi = tl.where(active & ~go, mid, hi)
    return lo


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


@triton.jit
def _step_end_kernel(acc_ptr, hnext_ptr, h_ptr, clip_ptr, run_ptr, t_ptr, tnew_ptr, tend_ptr, natt_ptr, nacc_ptr,
                     status_ptr, lnf_ptr, ok_ptr, nidx_ptr, tout_ptr, codes_ptr,
                     hkeep_ptr, tfut_ptr, natt_out, nacc_out, status_out, lnf_out, stuck_ptr, crossed_ptr, rn_ptr,
                     packet_ptr, G, T, max_num_steps, LOGT: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = rows < G
    rows64 = rows.to(tl.int64)
    accept = tl.load(acc_ptr + rows, mask=m, other=0) != 0
    clipped = tl.load(clip_ptr + rows, mask=m, other=0) != 0
    running = tl.load(run_ptr + rows, mask=m, other=0) != 0
    new_ok = tl.load(ok_ptr + rows, mask=m, other=1) != 0
    lnf = tl.load(lnf_ptr + rows, mask=m, other=0) != 0
    h_next = tl.load(hnext_ptr + rows, mask=m, other=0.0)
    h = tl.load(h_ptr + rows, mask=m, other=0.0)
    t = tl.load(t_ptr + rows, mask=m, other=0.0)
    t_new = tl.load(tnew_ptr + rows, mask=m, other=0.0)
    t_end = tl.load(tend_ptr + rows, mask=m, other=0.0)
    n_att = tl.load(natt_ptr + rows, mask=m, other=0) + running.to(tl.int64)
    n_acc = tl.load(nacc_ptr + rows, mask=m, other=0) + accept.to(tl.int64)
    status = tl.load(status_ptr + rows, mask=m, other=0)
    next_idx = tl.load(nidx_ptr + rows, mask=m, other=0)

    # The order of operations of TorchStepOps.step_end.
    h_next = tl.where(clipped & accept, tl.maximum(h_next, h), h_next)
    t_fut = tl.where(accept, t_new, t)
    t_try = t_fut + h_next
    no_move = (~accept) & (t_try <= t_fut)
    inf_try = tl.abs(t_try) == float("inf")
    stuck = running & (no_move | inf_try | ((n_att >= max_num_steps) & (t_fut < t_end)))
    lnf = tl.where(running, ~new_ok, lnf)
    nf = tl.load(codes_ptr + 0)
    uf = tl.load(codes_ptr + 1)
    to = tl.load(codes_ptr + 2)
    ms = tl.load(codes_ptr + 3)
    fail = tl.where(no_move, tl.where(lnf, nf, uf), tl.where(inf_try, to, ms))
    status = tl.where(stuck, fail, status)
    n_le = _count_le(tout_ptr, rows64, m, t_new, T, LOGT)
    crossed = tl.where(accept, n_le - next_idx, 0)
    running_next = running & (t_fut < t_end) & (~stuck)
    h_keep = tl.where(running, h_next, h)

    tl.store(hkeep_ptr + rows, h_keep, mask=m)
    tl.store(tfut_ptr + rows, t_fut, mask=m)
    tl.store(natt_out + rows, n_att, mask=m)
    tl.store(nacc_out + rows, n_acc, mask=m)
    tl.store(status_out + rows, status.to(tl.int8), mask=m)
    tl.store(lnf_out + rows, lnf.to(tl.uint8), mask=m)
    tl.store(stuck_ptr + rows, stuck.to(tl.uint8), mask=m)
    tl.store(crossed_ptr + rows, crossed, mask=m)
    tl.store(rn_ptr + rows, running_next.to(tl.uint8), mask=m)
    # The packet: (any running next, any stuck, max crossed) over all groups (zero-initialised by the launcher).
    tl.atomic_max(packet_ptr + 0, tl.max(tl.where(m, running_next.to(tl.int64), 0), axis=0))
    tl.atomic_max(packet_ptr + 1, tl.max(tl.where(m, stuck.to(tl.int64), 0), axis=0))
    tl.atomic_max(packet_ptr + 2, tl.max(tl.where(m, crossed, -(2**62)), axis=0))


# Groups per program (one lane each); the interpreter takes them all in one program.
_GPU_BLOCK = 1024
_INTERP_BLOCK = 1 << 16


def _block(G: int, device: torch.device) -> int:
    return min(triton.next_power_of_2(max(G, 1)), _GPU_BLOCK if device.type == "cuda" else _INTERP_BLOCK)


def _logt(T: int) -> int:
    return max(1, (max(T, 1)).bit_length())  # enough halvings of [0, T)


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


@register_op("fastnode_triton::step_end")
def step_end(accept: torch.Tensor, h_next: torch.Tensor, h: torch.Tensor, clipped: torch.Tensor,
             running: torch.Tensor, t: torch.Tensor, t_new: torch.Tensor, t_end: torch.Tensor, n_att: torch.Tensor,
             n_acc: torch.Tensor, status: torch.Tensor, last_nonfinite: torch.Tensor, new_ok: torch.Tensor,
             next_idx: torch.Tensor, t_out: torch.Tensor, max_num_steps: int, codes: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``StepOps.step_end`` for float64 time, one launch (the packet reduced with atomics).

    Args: as ``StepOps.step_end``; times float64, counters int64, ``status`` int8, flags bool; ``codes``: [4] int8
        (non-finite, step underflow, time overflow, max steps).
    Returns:
        ``(h, t, n_att, n_acc, status, last_nonfinite, stuck, crossed, running_next, packet [3] int64)``.
    """
    op = "step_end"
    G = t.shape[0] if t.dim() == 1 else -1
    dev = t.device
    for name, x in (("h_next", h_next), ("h", h), ("t", t), ("t_new", t_new), ("t_end", t_end)):
        check_rows(x, G, torch.float64, name, op, dev)
    for name, x in (("accept", accept), ("clipped", clipped), ("running", running),
                    ("last_nonfinite", last_nonfinite), ("new_ok", new_ok)):
        check_rows(x, G, torch.bool, name, op, dev)
    for name, x in (("n_att", n_att), ("n_acc", n_acc), ("next_idx", next_idx)):
        check_rows(x, G, torch.int64, name, op, dev)
    check_rows(status, G, torch.int8, "status", op, dev)
    if t_out.dim() != 2 or t_out.shape[0] != G or t_out.dtype != torch.float64 or not t_out.is_contiguous():
        raise ValueError(f"fastnode_triton.{op}: t_out must be a contiguous float64 [G, T] tensor, G = {G}")
    if codes.shape != (4,) or codes.dtype != torch.int8 or codes.device != dev:
        raise ValueError(f"fastnode_triton.{op}: codes must be an int8 [4] tensor on {dev}")
    T = t_out.shape[1]
    outs = [empty((G,), torch.float64, dev), empty((G,), torch.float64, dev), empty((G,), torch.int64, dev),
            empty((G,), torch.int64, dev), empty((G,), torch.int8, dev), empty((G,), torch.uint8, dev),
            empty((G,), torch.uint8, dev), empty((G,), torch.int64, dev), empty((G,), torch.uint8, dev)]
    packet = torch.zeros(3, dtype=torch.int64, device=dev)
    if G > 0 and launches(t):
        block = _block(G, dev)
        u8 = torch.uint8
        wrap_triton(_step_end_kernel)[(triton.cdiv(G, block),)](
            accept.view(u8), h_next, h, clipped.view(u8), running.view(u8), t, t_new, t_end, n_att, n_acc, status,
            last_nonfinite.view(u8), new_ok.view(u8), next_idx, t_out, codes, *outs, packet, G, T, max_num_steps,
            LOGT=_logt(T), BLOCK=block, num_warps=4)
    h_keep, t_fut, n_att_o, n_acc_o, status_o, lnf, stuck, crossed, running_next = outs
    return (h_keep, t_fut, n_att_o, n_acc_o, status_o, lnf.view(torch.bool), stuck.view(torch.bool), crossed,
            running_next.view(torch.bool), packet)


__all__ = ["step_begin", "step_end"]
