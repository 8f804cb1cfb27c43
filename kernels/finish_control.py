"""A step's whole finish on the device: solution, scaled error norm, finiteness, accept/reject and next step size.

Two launches, no host sync:

1. ``_step_error_kernel`` (one pass over the stages): per tile of ``[G, N]`` it writes
   ``y_new = y + h * sum_j b_j k_j``, forms the error ``h * sum_j e_j k_j`` scaled by
   ``atol + rtol * max(|y|, |y_new|)``, and stores per row and norm segment the tile's sum of squares (float64)
   and whether ``y_new`` and the last stage are finite there.
2. ``_control_kernel`` (one lane per group): adds the tiles' partial sums in a fixed order (deterministic, no
   atomics), takes the RMS of every segment and their max (``fastnode.backends.torch_ops.RMSNorm``), applies the
   ratio floor, sets the ratio to inf where a value is non-finite, and runs the I or PI controller
   (``TorchStepOps.controller``; ``csrc/common.h::control_one``) in float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._launch import (check_indices, check_rows, check_segments, check_stages, check_state, control_tiles, empty,
                      launches, register_op, row_tile, tiles)

# Offsets into the float64 constants tensor ``consts``: the scalar tolerances, then the controller settings (order,
# safety, ifactor, dfactor, min_step, max_step, pi flag, pi_alpha, pi_beta), as the fastnode:: C++ ops take them.
N_CONSTS = 11


@triton.jit
def _step_error_kernel(y_ptr, k_ptr, h_ptr, w_ptr, idx_ptr, rtol_ptr, atol_ptr, consts_ptr, seg_ptr,
                        ynew_ptr, x_ptr, part_ptr, fin_ptr, G, N, stride_s, rtol_rs, atol_rs, last_off,
                        U: tl.constexpr, BMASK: tl.constexpr, EMASK: tl.constexpr, LAST: tl.constexpr,
                        NSEG: tl.constexpr, RTOL_T: tl.constexpr, ATOL_T: tl.constexpr, WRITE_X: tl.constexpr,
                        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    cb, rows, cols, rmask, cmask, mask, offs = row_tile(G, N, BLOCK_G, BLOCK_N)
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    h = tl.load(h_ptr + rows, mask=rmask, other=0.0)[:, None]

    # Each stage with a nonzero solution or error weight is read once (w: U solution weights, then U error
    # weights; bit u of BMASK/EMASK says which are nonzero). Zero weights are skipped and each sum keeps the
    # reference's association (see _rk_combine_kernel).
    sb = tl.zeros_like(y)
    se = tl.zeros_like(y)
    k_last = tl.zeros_like(y)
    for u in tl.static_range(U):
        k = tl.load(k_ptr + tl.load(idx_ptr + u).to(tl.int64) * stride_s + offs, mask=mask, other=0.0)
        if (BMASK >> u) & 1:
            if (BMASK & ((1 << u) - 1)) == 0:
                sb = tl.load(w_ptr + u).to(y.dtype) * k
            else:
                sb = sb + tl.load(w_ptr + u).to(y.dtype) * k
        if (EMASK >> u) & 1:
            if (EMASK & ((1 << u) - 1)) == 0:
                se = tl.load(w_ptr + U + u).to(y.dtype) * k
            else:
                se = se + tl.load(w_ptr + U + u).to(y.dtype) * k
        if u == LAST:
            k_last = k
    if LAST < 0:
        # NOTE: the last stage's offset (S - 1) * G * N comes from the launcher (a 64-bit argument when it needs one):
        # a product of two 32-bit arguments here would wrap past 2**31 elements.
        k_last = tl.load(k_ptr + last_off + offs, mask=mask, other=0.0)
    y_new = y
    if BMASK != 0:
        y_new = y + h * sb
    tl.store(ynew_ptr + offs, y_new, mask=mask)

    if RTOL_T:
        rt = tl.load(rtol_ptr + rows64[:, None] * rtol_rs + cols[None, :], mask=mask, other=0.0)
    else:
        rt = tl.load(consts_ptr).to(y.dtype)
    if ATOL_T:
        at = tl.load(atol_ptr + rows64[:, None] * atol_rs + cols[None, :], mask=mask, other=0.0)
    else:
        at = tl.load(consts_ptr + 1).to(y.dtype)
    scale = tl.maximum(tl.abs(y), tl.abs(y_new)) * rt + at
    x = (se * h) / tl.where(mask, scale, 1.0)  # masked lanes: no 0/0 when atol is 0
    if WRITE_X:
        # A user norm: the scaled error itself goes out (the step_error op); the norm is the user's.
        tl.store(x_ptr + offs, x, mask=mask)
    else:
        # Squares in float64, as the ext backend: the norm of a float32 state loses nothing to the accumulation.
        x = tl.where(mask, x, 0.0).to(tl.float64)
        sq = x * x
        for s in tl.static_range(NSEG):
            lo = tl.load(seg_ptr + 2 * s)
            hi = tl.load(seg_ptr + 2 * s + 1)
            inside = (cols >= lo) & (cols < hi)
            part = tl.sum(tl.where(inside[None, :], sq, 0.0), axis=1)
            tl.store(part_ptr + (cb * G + rows64) * NSEG + s, part, mask=rmask)
        finite = (tl.abs(y_new) < float("inf")) & (tl.abs(k_last) < float("inf"))
        finite = tl.where(mask, finite.to(tl.int32), 1)
        tl.store(fin_ptr + cb * G + rows64, tl.min(finite, axis=1).to(tl.uint8), mask=rmask)


@triton.jit
def _pow(x, p):
    # x ** p for x >= 0 in float64, with pow's special values (0 ** -p = inf, inf ** -p = 0, x ** 0 = 1).
    # NOTE: exp(p * log(x)) rather than libdevice's pow, which Triton's interpreter does not provide; it differs from
    # pow by a few ulp, far below anything the controller resolves. log(0) is kept out of the way (no -inf detour).
    pos = x > 0.0
    v = tl.exp(p * tl.log(tl.where(pos, x, 1.0)))
    v = tl.where(pos, v, tl.where(p < 0.0, float("inf"), 0.0))
    return tl.where(p == 0.0, 1.0, v)


@triton.jit
def _control_kernel(part_ptr, fin_ptr, seg_ptr, consts_ptr, hctl_ptr, prev_ptr, run_ptr, floor_ptr,
                    ratio_ptr, ok_ptr, acc_ptr, hnext_ptr, pout_ptr, G, n_cb,
                    NSEG: tl.constexpr, HAS_FLOOR: tl.constexpr, BLOCK: tl.constexpr, CBLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = rows < G
    # NOTE: 64-bit offsets into the [n_cb, G, NSEG] partials, as the first kernel stores them (n_cb * G * NSEG can
    # pass 2**31 for a large batch of large states).
    rows64 = rows.to(tl.int64)
    inf = float("inf")
    # NOTE: the tiles' partials of a row are added CBLOCK at a time and then tree-summed: a long shared-mode row
    # (G = 1, thousands of column tiles) is reduced in parallel, in a fixed order (deterministic).
    rr = tl.zeros([BLOCK], dtype=tl.float64)
    for s in tl.static_range(NSEG):
        acc = tl.zeros([BLOCK, CBLOCK], dtype=tl.float64)
        for c0 in range(0, n_cb, CBLOCK):
            cs = c0 + tl.arange(0, CBLOCK)
            mm = m[:, None] & (cs < n_cb)[None, :]
            acc += tl.load(part_ptr + (cs[None, :].to(tl.int64) * G + rows64[:, None]) * NSEG + s, mask=mm,
                           other=0.0)
        sq = tl.sum(acc, axis=1)
        length = (tl.load(seg_ptr + 2 * s + 1) - tl.load(seg_ptr + 2 * s)).to(tl.float64)
        v = tl.sqrt(sq / length)
        rr = tl.where((v != v) | (v > rr), v, rr)  # noqa: PLR0124  (NaN test) a max that propagates NaN, as torch.amax
    fin_all = tl.full([BLOCK, CBLOCK], 1, dtype=tl.int32)
    for c0 in range(0, n_cb, CBLOCK):
        cs = c0 + tl.arange(0, CBLOCK)
        mm = m[:, None] & (cs < n_cb)[None, :]
        fin_all = fin_all & tl.load(fin_ptr + cs[None, :].to(tl.int64) * G + rows64[:, None], mask=mm,
                                    other=1).to(tl.int32)
    fin = tl.min(fin_all, axis=1)
    if HAS_FLOOR:
        fl = tl.load(floor_ptr + rows, mask=m, other=0.0)
        rr = tl.where((fl != fl) | (fl > rr), fl, rr)  # noqa: PLR0124  (NaN test)
    ok = fin != 0
    rr = tl.where(ok, rr, inf)
    tl.store(ratio_ptr + rows, rr, mask=m)
    tl.store(ok_ptr + rows, ok.to(tl.uint8), mask=m)

    order = tl.load(consts_ptr + 2)
    safety = tl.load(consts_ptr + 3)
    ifactor = tl.load(consts_ptr + 4)
    dfactor = tl.load(consts_ptr + 5)
    min_step = tl.load(consts_ptr + 6)
    max_step = tl.load(consts_ptr + 7)
    is_pi = tl.load(consts_ptr + 8) != 0.0
    alpha = tl.load(consts_ptr + 9)
    beta = tl.load(consts_ptr + 10)
    h = tl.load(hctl_ptr + rows, mask=m, other=0.0)
    prev = tl.load(prev_ptr + rows, mask=m, other=1.0)
    running = tl.load(run_ptr + rows, mask=m, other=0) != 0

    # The formulas and order of operations of TorchStepOps.controller (csrc/common.h::control_one).
    r = tl.where(rr != rr, inf, rr)  # noqa: PLR0124  (NaN test)
    accept = r <= 1.0
    # NOTE: scalar conditions go through tl.where (Triton's interpreter cannot `&` a scalar bool with a block).
    accept = accept | tl.where(min_step > 0.0, (r < inf) & (h <= min_step), accept)
    accept = accept & running
    factor = _pow(r, -1.0 / order) * safety
    pi = _pow(r, -alpha / order) * _pow(prev, beta / order) * safety
    factor = tl.where(is_pi, tl.where(accept, pi, tl.minimum(factor, 1.0)), factor)
    # NOTE: the PI memory's floor as a float64 constant: a bare 1e-10 literal is a float32 constant in Triton
    # (1.0000000134e-10), not the reference's clamp_min(1e-10).
    prev_out = tl.where(is_pi, tl.where(accept, tl.maximum(r, tl.full([BLOCK], 1e-10, tl.float64)), prev), prev)
    lower = tl.where(r < 1.0, 1.0, dfactor)
    factor = tl.minimum(tl.maximum(factor, lower), ifactor)
    h_next = tl.minimum(tl.maximum(h * factor, min_step), max_step)
    h_next = tl.where(running, h_next, h)
    tl.store(acc_ptr + rows, accept.to(tl.uint8), mask=m)
    tl.store(hnext_ptr + rows, h_next, mask=m)
    tl.store(pout_ptr + rows, prev_out, mask=m)


def _check_tol(t: torch.Tensor | None, y: torch.Tensor, name: str) -> int:
    """Row stride of an optional ``[R, N]`` tolerance (R in {1, G}); 0 when absent or broadcast over rows."""
    if t is None:
        return 0
    G, N = y.shape
    if t.dim() != 2 or t.shape[1] != N or t.shape[0] not in (1, G):
        raise ValueError(f"fastnode_triton.finish_control: {name} must be [1, N] or [G, N] like y {tuple(y.shape)}, "
                         f"got {tuple(t.shape)}")
    if t.dtype != y.dtype or t.device != y.device or not t.is_contiguous():
        raise ValueError(f"fastnode_triton.finish_control: {name} must be contiguous with y's dtype and device")
    return N if t.shape[0] > 1 else 0


def _check_step(op, y, K, h, be_w, be_idx, b_mask, e_mask, last_pos, rtol_t, atol_t, consts) -> tuple[int, int, int]:
    """Checks shared by ``finish_control`` and ``step_error``; returns ``(U, rtol row stride, atol row stride)``."""
    check_state(y, op)
    check_stages(K, y, op)
    G, N = y.shape
    dev = y.device
    S = K.shape[0]
    if S == 0 or N == 0:
        raise ValueError(f"fastnode_triton.{op}: needs at least one stage and one column, got K {tuple(K.shape)}")
    check_rows(h, G, y.dtype, "h", op, dev)
    U = be_idx.shape[0] if be_idx.dim() == 1 else -1
    if (U < 0 or U > S or be_idx.dtype != torch.int32 or be_w.shape != (2 * U,) or be_w.dtype != torch.float64
            or be_w.device != dev or be_idx.device != dev):
        raise ValueError(f"fastnode_triton.{op}: be_w must be float64 [2 * U] and be_idx int32 [U] on {dev}, "
                         f"U <= S = {S}")
    check_indices(be_idx, S, "be_idx", op)
    if not (0 <= b_mask < (1 << U) and 0 <= e_mask < (1 << U)):
        raise ValueError(f"fastnode_triton.{op}: b_mask and e_mask must be bit masks over the U = {U} stages")
    if not -1 <= last_pos < U:
        raise ValueError(f"fastnode_triton.{op}: last_pos must be in [-1, {U}), got {last_pos}")
    rtol_rs = _check_tol(rtol_t, y, "rtol_t")
    atol_rs = _check_tol(atol_t, y, "atol_t")
    if consts.shape != (N_CONSTS,) or consts.dtype != torch.float64 or consts.device != dev:
        raise ValueError(f"fastnode_triton.{op}: consts must be a float64 [{N_CONSTS}] tensor on {dev}")
    return U, rtol_rs, atol_rs


@register_op("fastnode_triton::step_error")
def step_error(y: torch.Tensor, K: torch.Tensor, h: torch.Tensor, be_w: torch.Tensor, be_idx: torch.Tensor,
               b_mask: int, e_mask: int, last_pos: int, rtol_t: torch.Tensor | None, atol_t: torch.Tensor | None,
               consts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solution and scaled error in one pass (``StepOps.step_error``: before the norm), for a user's norm.

    Args: as :func:`finish_control` (``consts[0:2]``: the scalar rtol and atol; the rest is unused).

    Returns:
        ``(y_new [G, N], x [G, N])`` with ``x = h * sum_j e_j k_j / (atol + rtol * max(|y|, |y_new|))``, both in
        ``y``'s dtype.
    """
    U, rtol_rs, atol_rs = _check_step("step_error", y, K, h, be_w, be_idx, b_mask, e_mask, last_pos, rtol_t, atol_t,
                                      consts)
    G, N = y.shape
    y_new = empty(y.shape, y.dtype, y.device)
    x = empty(y.shape, y.dtype, y.device)
    if not launches(y):
        return y_new, x
    bg, bn, nw = tiles(G, N, y.device)
    grid = (triton.cdiv(G, bg) * triton.cdiv(N, bn),)
    wrap_triton(_step_error_kernel)[grid](
        y, K, h, be_w, be_idx, rtol_t if rtol_t is not None else y, atol_t if atol_t is not None else y,
        consts, be_idx, y_new, x, consts, be_idx, G, N, G * N, rtol_rs, atol_rs, (K.shape[0] - 1) * G * N,
        U=U, BMASK=b_mask, EMASK=e_mask, LAST=last_pos, NSEG=0, RTOL_T=rtol_t is not None, ATOL_T=atol_t is not None,
        WRITE_X=True, BLOCK_G=bg, BLOCK_N=bn, num_warps=nw)
    return y_new, x


@register_op("fastnode_triton::finish_control")
def finish_control(y: torch.Tensor, K: torch.Tensor, h: torch.Tensor, be_w: torch.Tensor, be_idx: torch.Tensor,
                   b_mask: int, e_mask: int, last_pos: int, rtol_t: torch.Tensor | None, atol_t: torch.Tensor | None,
                   consts: torch.Tensor, segments: torch.Tensor, h_ctl: torch.Tensor, prev_ratio: torch.Tensor,
                   running: torch.Tensor, ratio_floor: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's finish (``StepOps.finish_control`` with the built-in RMS norm) in two launches and no host sync.

    Args:
        y: [G, N] float32/float64 state at the step's start; ``K``: [S, G, N] stages; ``h``: [G] step (y's dtype).
        be_w: [2 * U] float64: the solution weights, then the error weights, of the ``U`` stages ``be_idx``
            ([U] int32, increasing) that have a nonzero one; bit ``u`` of ``b_mask``/``e_mask`` says whether stage
            ``be_idx[u]``'s solution/error weight is nonzero (zero weights are skipped, as in the reference).
        last_pos: position of the last stage ``S - 1`` in ``be_idx`` (-1 when absent: then it is read separately
            for the finiteness check).
        rtol_t, atol_t: optional [1, N] or [G, N] tolerances in y's dtype (then ``consts[0]``/``consts[1]`` unused).
        consts: [11] float64: rtol, atol, then the controller settings (order, safety, ifactor, dfactor, min_step,
            max_step, pi flag, pi_alpha, pi_beta).
        segments: [2 * NSEG] int64 column bounds ``s0, e0, s1, e1, ...`` of the norm's segments (non-empty).
        h_ctl: [G] float64 step in the time dtype; ``prev_ratio``: [G] float64; ``running``: [G] bool.
        ratio_floor: optional [G] float64 lower bound of the error ratio.

    Returns:
        ``(y_new [G, N], ratio [G] float64 (inf where not finite), ok [G] bool, accept [G] bool, h_next [G] float64,
        prev_ratio [G] float64)``.
    """
    op = "finish_control"
    U, rtol_rs, atol_rs = _check_step(op, y, K, h, be_w, be_idx, b_mask, e_mask, last_pos, rtol_t, atol_t, consts)
    G, N = y.shape
    dev = y.device
    S = K.shape[0]
    check_segments(segments, N, op)
    if segments.device != dev:
        raise ValueError(f"fastnode_triton.{op}: segments must be on {dev}")
    check_rows(h_ctl, G, torch.float64, "h_ctl", op, dev)
    check_rows(prev_ratio, G, torch.float64, "prev_ratio", op, dev)
    check_rows(running, G, torch.bool, "running", op, dev)
    if ratio_floor is not None:
        check_rows(ratio_floor, G, torch.float64, "ratio_floor", op, dev)
    nseg = segments.numel() // 2

    bg, bn, nw = tiles(G, N, dev)
    n_cb = triton.cdiv(N, bn)
    y_new = empty(y.shape, y.dtype, y.device)
    part = empty((n_cb, G, nseg), torch.float64, dev)
    fin = empty((n_cb, G), torch.uint8, dev)
    ratio = empty((G,), torch.float64, dev)
    ok = empty((G,), torch.uint8, dev)
    accept = empty((G,), torch.uint8, dev)
    h_next = empty((G,), torch.float64, dev)
    prev_out = empty((G,), torch.float64, dev)
    if not launches(y):
        return y_new, ratio, ok.view(torch.bool), accept.view(torch.bool), h_next, prev_out
    grid = (triton.cdiv(G, bg) * n_cb,)
    wrap_triton(_step_error_kernel)[grid](
        y, K, h, be_w, be_idx, rtol_t if rtol_t is not None else y, atol_t if atol_t is not None else y,
        consts, segments, y_new, y_new, part, fin, G, N, G * N, rtol_rs, atol_rs, (S - 1) * G * N,
        U=U, BMASK=b_mask, EMASK=e_mask, LAST=last_pos, NSEG=nseg, RTOL_T=rtol_t is not None, ATOL_T=atol_t is not None,
        WRITE_X=False, BLOCK_G=bg, BLOCK_N=bn, num_warps=nw)

    block, cblock = control_tiles(G, n_cb, dev)
    wrap_triton(_control_kernel)[(triton.cdiv(G, block),)](
        part, fin, segments, consts, h_ctl, prev_ratio, running.view(torch.uint8),
        ratio_floor if ratio_floor is not None else h_ctl, ratio, ok, accept, h_next, prev_out, G, n_cb,
        NSEG=nseg, HAS_FLOOR=ratio_floor is not None, BLOCK=block, CBLOCK=cblock, num_warps=4)
    return y_new, ratio, ok.view(torch.bool), accept.view(torch.bool), h_next, prev_out
