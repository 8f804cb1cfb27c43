"""Runge-Kutta combination ``out = y + h * sum_j w_j K[j]``: stage inputs (``w = a_i``) and solutions (``w = b``).

One launch per call reads ``y``, the stages with nonzero weight from the ``[S, G, N]`` stage buffer and ``h: [G]``,
and writes ``out: [G, N]``: the memory traffic of the combination and nothing more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._launch import (check_indices, check_rows, check_stages, check_state, check_weights, empty, launches, register_op,
                      row_tile, tiles)


@triton.jit
def _rk_combine_kernel(y_ptr, k_ptr, h_ptr, w_ptr, idx_ptr, out_ptr, G, N, stride_s,
                       NW: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    cb, rows, cols, rmask, cmask, mask, offs = row_tile(G, N, BLOCK_G, BLOCK_N)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    out = y
    if NW > 0:
        h = tl.load(h_ptr + rows, mask=rmask, other=0.0)
        acc = tl.zeros_like(y)
        # The reference's association: acc = w0 k0 + w1 k1 + ...; then y + h * acc.
        for s in tl.static_range(NW):
            j = tl.load(idx_ptr + s).to(tl.int64)
            w = tl.load(w_ptr + s).to(y.dtype)  # float64 in memory: rounded once to the state dtype
            k = tl.load(k_ptr + j * stride_s + offs, mask=mask, other=0.0)
            if s == 0:
                acc = w * k
            else:
                acc = acc + w * k
        out = y + h[:, None] * acc
    tl.store(out_ptr + offs, out, mask=mask)


@register_op("fastnode_triton::rk_combine")
def rk_combine(y: torch.Tensor, K: torch.Tensor, h: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``y + h[:, None] * sum_m w[m] * K[idx[m]]`` in one pass.

    Args:
        y: [G, N] float32/float64, contiguous.
        K: [S, G, N] stage buffer like ``y``, contiguous.
        h: [G] step sizes in ``y``'s dtype.
        w: [M] float64 nonzero weights, ``M <= S``; ``idx``: [M] int32 stage indices.

    Returns:
        [G, N] in ``y``'s dtype (``y`` copied when ``M == 0``).

    Example:
        >>> y, K, h = torch.zeros(2, 3), torch.ones(4, 2, 3), torch.full((2,), 0.5)
        >>> rk_combine(y, K, h, torch.tensor([1.0, 2.0], dtype=torch.float64),
        ...            torch.tensor([0, 3], dtype=torch.int32))[0, 0].item()
        1.5
    """
    check_state(y, "rk_combine")
    check_stages(K, y, "rk_combine")
    G, N = y.shape
    check_rows(h, G, y.dtype, "h", "rk_combine", y.device)
    check_weights(w, idx, K.shape[0], "w", "rk_combine", y.device)
    check_indices(idx, K.shape[0], "idx", "rk_combine")
    out = empty(y.shape, y.dtype, y.device)
    if G * N == 0 or not launches(y):
        return out
    bg, bn, nw = tiles(G, N, y.device)
    grid = (triton.cdiv(G, bg) * triton.cdiv(N, bn),)
    wrap_triton(_rk_combine_kernel)[grid](y, K, h, w, idx, out, G, N, G * N, NW=w.shape[0], BLOCK_G=bg,
                                           BLOCK_N=bn, num_warps=nw)
    return out
