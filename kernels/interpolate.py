"""Dense output inside a step: ``y(t0 + theta * h) = y + h * sum_j k_j * sum_p dense[j, p] * theta ** (p + 1)``.

``dense`` is the tableau's ``[S, P]`` continuous extension (dopri5's published one; the quartic Hermite-type
interpolant ``fastnode._tableau`` builds for the other methods), so one kernel serves every adaptive method. Each
row has its own ``theta`` (per-sample output times); the per-row stage weights are formed in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._launch import check_indices, check_rows, check_stages, check_state, empty, launches, register_op, row_tile, tiles


@triton.jit
def dense_weight(d_ptr, u, th, P: tl.constexpr):
    """Row weights ``w_u(theta) = sum_p dense[u, p] * theta^(p+1)`` of stage slot ``u``, in theta's dtype (the state
    dtype, as the reference forms them), summed in the reference's order."""
    pw = th
    wu = tl.zeros_like(th)
    for p in tl.static_range(P):
        term = pw * tl.load(d_ptr + u * P + p).to(th.dtype)
        if p == 0:
            wu = term
        else:
            wu = wu + term
        pw = pw * th
    return wu


@triton.jit
def _interpolate_kernel(y_ptr, k_ptr, h_ptr, th_ptr, d_ptr, idx_ptr, out_ptr, G, N, stride_s,
                        NU: tl.constexpr, P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    cb, rows, cols, rmask, cmask, mask, offs = row_tile(G, N, BLOCK_G, BLOCK_N)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    out = y
    if NU > 0:
        h = tl.load(h_ptr + rows, mask=rmask, other=0.0)
        th = tl.load(th_ptr + rows, mask=rmask, other=0.0)
        acc = tl.zeros_like(y)
        for u in tl.static_range(NU):
            wu = dense_weight(d_ptr, u, th, P)
            k = tl.load(k_ptr + tl.load(idx_ptr + u).to(tl.int64) * stride_s + offs, mask=mask, other=0.0)
            if u == 0:
                acc = wu[:, None] * k
            else:
                acc = acc + wu[:, None] * k
        out = y + h[:, None] * acc
    tl.store(out_ptr + offs, out, mask=mask)


@register_op("fastnode_triton::interpolate")
def interpolate(y: torch.Tensor, K: torch.Tensor, h: torch.Tensor, theta: torch.Tensor, dense: torch.Tensor,
                idx: torch.Tensor) -> torch.Tensor:
    """Dense output at ``t0 + theta * h`` of every row, in one pass.

    Args:
        y: [G, N] float32/float64 state at the step's start, contiguous.
        K: [S, G, N] the step's stages.
        h: [G] step sizes, ``theta``: [G] fractions of the step, both in ``y``'s dtype.
        dense: [U * P] float64, the dense-output rows (``P`` coefficients each) of the stages ``idx``: [U] int32.

    Returns:
        [G, N] in ``y``'s dtype.

    Example:
        >>> y, K = torch.zeros(1, 2), torch.ones(2, 1, 2)
        >>> h, th = torch.ones(1), torch.full((1,), 0.5)
        >>> d = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)  # w_0 = theta, w_1 = theta^2
        >>> interpolate(y, K, h, th, d, torch.tensor([0, 1], dtype=torch.int32))[0, 0].item()
        0.75
    """
    op = "interpolate"
    check_state(y, op)
    check_stages(K, y, op)
    G, N = y.shape
    check_rows(h, G, y.dtype, "h", op, y.device)
    check_rows(theta, G, y.dtype, "theta", op, y.device)
    U = idx.shape[0] if idx.dim() == 1 else -1
    if (idx.dtype != torch.int32 or U < 0 or U > K.shape[0] or dense.dtype != torch.float64 or dense.dim() != 1
            or (U > 0 and dense.numel() % U) or (U == 0 and dense.numel())):
        raise ValueError(f"fastnode_triton.{op}: dense must be float64 [U * P] with int32 stage indices idx [U], "
                         f"U <= S = {K.shape[0]}")
    if dense.device != y.device or idx.device != y.device:
        raise ValueError(f"fastnode_triton.{op}: dense and idx must be on {y.device}")
    check_indices(idx, K.shape[0], "idx", op)
    P = dense.numel() // U if U else 0
    out = empty(y.shape, y.dtype, y.device)
    if G * N == 0 or not launches(y):
        return out
    bg, bn, nw = tiles(G, N, y.device)
    grid = (triton.cdiv(G, bg) * triton.cdiv(N, bn),)
    wrap_triton(_interpolate_kernel)[grid](y, K, h, theta, dense, idx, out, G, N, G * N, NU=U, P=P, BLOCK_G=bg,
                                           BLOCK_N=bn, num_warps=nw)
    return out
