"""A step's bookkeeping for every group (``StepOps.step_end``) in one launch: counters, status, output times
crossed and the loop's one host-transfer packet.

On a GPU the loop's per-step bookkeeping is otherwise dozens of tiny torch launches over ``[G]`` tensors. The kernel
works on time-dtype (float64) ``[G]`` tensors, one lane per group; the output times crossed are counted by a binary
search over the group's row of ``t_out: [G, T]`` (``_launch._count_le``). The packet (any running, any stuck, max
crossed) is reduced over all groups with atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._launch import _block, _count_le, _logt, check_rows, empty, launches, register_op


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


__all__ = ["step_end"]
