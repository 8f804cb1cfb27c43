"""The gradients of a Runge-Kutta combination ``out = y + h * sum_m w[m] K[idx[m]]`` (``rk_combine``, and the
solution of ``finish_control``/``step_error``) in one launch: every stage slot's gradient ``(h * g) * w`` (exact
zeros for the slots without a weight) written into one ``[S, G, N]`` buffer, and when asked the step's gradient
``sum_n g * sum_m w[m] K[idx[m]]`` as per-column-tile partial sums ``[n_cb, G]`` (added up by the caller).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._launch import (check_backward_stages, check_indices, check_rows, check_state, check_weights, empty, launches,
                      register_op, row_tile, tiles)


@triton.jit
def _rk_combine_backward_kernel(g_ptr, k_ptr, h_ptr, w_ptr, idx_ptr, gk_ptr, gh_ptr, G, N, stride_s,
                                S: tl.constexpr, NW: tl.constexpr, MASK: tl.constexpr, NEED_H: tl.constexpr,
                                BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    cb, rows, cols, rmask, cmask, mask, offs = row_tile(G, N, BLOCK_G, BLOCK_N)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    h = tl.load(h_ptr + rows, mask=rmask, other=0.0)
    # The reference's rounding: autograd forms h * g once (addcmul's backward), then each stage's w_j * it.
    hg = h[:, None] * g
    for s in tl.static_range(S):
        ws = tl.zeros_like(h)
        has = tl.zeros_like(rows) != 0
        for m in tl.static_range(NW):
            if (MASK >> m) & 1:
                hit = tl.load(idx_ptr + m) == s
                ws = tl.where(hit, tl.load(w_ptr + m).to(g.dtype), ws)
                has = has | hit
        gks = tl.where(has[:, None], hg * ws[:, None], 0.0)
        tl.store(gk_ptr + s * stride_s + offs, gks, mask=mask)
    if NEED_H:
        acc = tl.zeros_like(g)
        first = True
        for m in tl.static_range(NW):
            if (MASK >> m) & 1:
                j = tl.load(idx_ptr + m).to(tl.int64)
                w = tl.load(w_ptr + m).to(g.dtype)
                k = tl.load(k_ptr + j * stride_s + offs, mask=mask, other=0.0)
                if first:
                    acc = w * k
                    first = False
                else:
                    acc = acc + w * k
        tl.store(gh_ptr + cb * G + rows, tl.sum(g * acc, axis=1), mask=rmask)


@register_op("fastnode_triton::rk_combine_backward")
def rk_combine_backward(g: torch.Tensor, K: torch.Tensor, h: torch.Tensor, w: torch.Tensor, idx: torch.Tensor,
                        mask: int, need_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every stage's gradient of ``y + h[:, None] * sum_m w[m] K[idx[m]]`` (over the ``m`` whose bit is set in
    ``mask``) in one pass, and the step's gradient when ``need_h``.

    Args:
        g: [G, N] the output's gradient, contiguous.
        K: [S, G, N] the stage buffer (read only when ``need_h``; its shape gives ``S``).
        h: [G] steps in ``g``'s dtype; ``w``: [M] float64 weights of the stages ``idx``: [M] int32.
        mask: bit ``m`` set: weight ``m`` takes part (``-1``: all); ``need_h``: compute the step's gradient.

    Returns:
        ``(gK [S, G, N], gh)``: ``gh`` is [G] when ``need_h``, else empty.

    Example:
        >>> g, K = torch.ones(1, 2), torch.zeros(3, 1, 2)
        >>> gK, gh = rk_combine_backward(g, K, torch.full((1,), 0.5), torch.tensor([2.0], dtype=torch.float64),
        ...                              torch.tensor([1], dtype=torch.int32), -1, False)
        >>> gK[:, 0, 0].tolist()
        [0.0, 1.0, 0.0]
    """
    op = "rk_combine_backward"
    check_state(g, op)
    G, N = g.shape
    check_backward_stages(K, g, need_h, op)
    S = K.shape[0]
    check_rows(h, G, g.dtype, "h", op, g.device)
    check_weights(w, idx, S, "w", op, g.device)
    check_indices(idx, S, "idx", op)
    M = w.shape[0]
    bits = (1 << M) - 1 if mask < 0 else mask & ((1 << M) - 1)
    gk = empty((S, G, N), g.dtype, g.device)
    bg, bn, nw = tiles(G, N, g.device)
    n_cb = triton.cdiv(N, bn) if N else 1
    part = empty((n_cb, G) if need_h else (0,), g.dtype, g.device)
    if not launches(g):
        return gk, part[0] if need_h else part
    if G * N == 0:
        return gk, g.new_zeros((G,) if need_h else (0,))
    grid = (triton.cdiv(G, bg) * n_cb,)
    wrap_triton(_rk_combine_backward_kernel)[grid](g, K, h, w, idx, gk, part, G, N, G * N, S=S, NW=M, MASK=bits,
                                                    NEED_H=bool(need_h), BLOCK_G=bg, BLOCK_N=bn, num_warps=nw)
    return gk, part.sum(0) if need_h else part
