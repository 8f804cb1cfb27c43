"""The gradients of the dense output ``out = y + h * sum_u w_u(theta) K[idx[u]]``,
``w_u(theta) = sum_p dense[u, p] theta^(p+1)`` (``interpolate``), in one launch: every stage slot's gradient
``(h * g) * w_u(theta)`` (exact zeros for the slots without a dense row) into one ``[S, G, N]`` buffer, and when
asked the per-column-tile partial sums ``[n_cb, G]`` of ``g * sum_u w_u K_u`` and ``g * sum_u w_u'(theta) K_u``
(the gradients of ``h`` and, times ``h``, of ``theta``; added up by the caller).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._launch import (check_backward_stages, check_indices, check_rows, check_state, empty, launches, register_op,
                      row_tile, tiles)
from .interpolate import dense_weight


@triton.jit
def _interpolate_backward_kernel(g_ptr, k_ptr, h_ptr, th_ptr, d_ptr, idx_ptr, gk_ptr, gh_ptr, gt_ptr, G, N, stride_s,
                                 S: tl.constexpr, NU: tl.constexpr, P: tl.constexpr, NEED: tl.constexpr,
                                 BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    cb, rows, cols, rmask, cmask, mask, offs = row_tile(G, N, BLOCK_G, BLOCK_N)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    h = tl.load(h_ptr + rows, mask=rmask, other=0.0)
    th = tl.load(th_ptr + rows, mask=rmask, other=0.0)
    hg = h[:, None] * g
    a = tl.zeros_like(g)
    da = tl.zeros_like(g)
    for s in tl.static_range(S):
        ws = tl.zeros_like(th)
        has = tl.zeros_like(rows) != 0
        for u in tl.static_range(NU):
            hit = tl.load(idx_ptr + u) == s
            wu = dense_weight(d_ptr, u, th, P)  # formed as the forward forms it
            ws = tl.where(hit, wu, ws)
            has = has | hit
        tl.store(gk_ptr + s * stride_s + offs, tl.where(has[:, None], hg * ws[:, None], 0.0), mask=mask)
    if NEED:
        for u in tl.static_range(NU):
            pw = th
            dpw = tl.zeros_like(th) + 1.0
            wu = tl.zeros_like(th)
            dwu = tl.zeros_like(th)
            for p in tl.static_range(P):
                d = tl.load(d_ptr + u * P + p).to(g.dtype)
                wu = wu + pw * d
                dwu = dwu + (p + 1) * d * dpw
                pw = pw * th
                dpw = dpw * th
            k = tl.load(k_ptr + tl.load(idx_ptr + u).to(tl.int64) * stride_s + offs, mask=mask, other=0.0)
            a = a + wu[:, None] * k
            da = da + dwu[:, None] * k
        tl.store(gh_ptr + cb * G + rows, tl.sum(g * a, axis=1), mask=rmask)
        tl.store(gt_ptr + cb * G + rows, tl.sum(g * da, axis=1), mask=rmask)


@register_op("fastnode_triton::interpolate_backward")
def interpolate_backward(g: torch.Tensor, K: torch.Tensor, h: torch.Tensor, theta: torch.Tensor, dense: torch.Tensor,
                         idx: torch.Tensor, need_ht: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every stage's gradient of ``interpolate``'s output in one pass; the gradients of ``h`` and ``theta`` when
    ``need_ht``.

    Args:
        g: [G, N] the output's gradient, contiguous; ``K``: [S, G, N] the stages (read only when ``need_ht``).
        h, theta: [G] in ``g``'s dtype; ``dense``: [U * P] float64 rows of the stages ``idx``: [U] int32.

    Returns:
        ``(gK [S, G, N], gh, gtheta)``: ``gh`` and ``gtheta`` are [G] when ``need_ht``, else empty.

    Example:
        >>> g, K = torch.ones(1, 2), torch.zeros(2, 1, 2)
        >>> d = torch.tensor([1.0, 0.0], dtype=torch.float64)  # w_1 = theta
        >>> gK, _, _ = interpolate_backward(g, K, torch.ones(1), torch.full((1,), 0.5), d,
        ...                                 torch.tensor([1], dtype=torch.int32), False)
        >>> gK[:, 0, 0].tolist()
        [0.0, 0.5]
    """
    op = "interpolate_backward"
    check_state(g, op)
    G, N = g.shape
    check_backward_stages(K, g, need_ht, op)
    S = K.shape[0]
    check_rows(h, G, g.dtype, "h", op, g.device)
    check_rows(theta, G, g.dtype, "theta", op, g.device)
    U = idx.shape[0] if idx.dim() == 1 else -1
    if (idx.dtype != torch.int32 or U < 0 or U > S or dense.dtype != torch.float64 or dense.dim() != 1
            or (U > 0 and dense.numel() % U) or (U == 0 and dense.numel())):
        raise ValueError(f"fastnode_triton.{op}: dense must be float64 [U * P] with int32 stage indices idx [U], "
                         f"U <= S = {S}")
    check_indices(idx, S, "idx", op)
    P = dense.numel() // U if U else 0
    gk = empty((S, G, N), g.dtype, g.device)
    bg, bn, nw = tiles(G, N, g.device)
    n_cb = triton.cdiv(N, bn) if N else 1
    shape = (n_cb, G) if need_ht else (0,)
    ph, pt = empty(shape, g.dtype, g.device), empty(shape, g.dtype, g.device)
    if not launches(g):
        return (gk, ph[0], pt[0]) if need_ht else (gk, ph, pt)
    if G * N == 0:
        z = g.new_zeros((G,) if need_ht else (0,))
        return gk, z, z.clone()
    grid = (triton.cdiv(G, bg) * n_cb,)
    wrap_triton(_interpolate_backward_kernel)[grid](g, K, h, theta, dense, idx, gk, ph, pt, G, N, G * N, S=S, NU=U,
                                                     P=P, NEED=bool(need_ht), BLOCK_G=bg, BLOCK_N=bn, num_warps=nw)
    if not need_ht:
        return gk, ph, pt
    return gk, ph.sum(0), h * pt.sum(0)
