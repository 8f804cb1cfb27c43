"""Autograd formulas of the ``fastnode_triton::`` ops that carry values (the Triton twin of
``fastnode.backends.ext_autograd``), registered when the package is imported.

- ``rk_combine``: ``out = y + h * sum_m w[m] K[idx[m]]``; ``finish_control`` and ``step_error``: their solution
  ``y_new = y + h * sum_j b_j K[j]`` (the ratio, flags, next step, controller memory and the scaled error are
  non-differentiable, as the reference computes them under ``no_grad``);
- ``interpolate``: ``out = y + h * sum_u w_u(theta) K[idx[u]]``, with the gradients of ``h`` and ``theta``.

Each backward is one fused op (``fastnode_triton::rk_combine_backward``, ``interpolate_backward``) that writes the
whole ``[S, G, N]`` stage-buffer gradient at once. The stage buffer is filled in place (``set_stage``), so autograd
routes each slot's gradient to the stage copied into it. A combination's stages are read back only for the step's
gradient (time gradients): they are then saved as a copy, since later stages are written into the same buffer.
Under ``create_graph=True`` the same formulas run as torch ops, so the backward records a graph.
"""

from __future__ import annotations

import torch

from . import finish_control, interpolate, interpolate_backward, rk_combine, rk_combine_backward  # noqa: F401


def _stand_in(g: torch.Tensor, S: int) -> torch.Tensor:
    """A [S, G, N] view the backward op does not read (stages are read only for time gradients)."""
    return g.new_zeros(()).expand(S, *g.shape)


def _combine_backward_torch(g, K, h, w, idx, mask: int, need_h: bool):
    """The fused backward's formulas as torch ops (a second derivative records its graph through them)."""
    sel = [m for m in range(w.shape[0]) if mask < 0 or (mask >> m) & 1]
    hg = g * h.unsqueeze(1)
    gk = torch.zeros((K.shape[0],) + tuple(g.shape), dtype=g.dtype, device=g.device)
    acc = torch.zeros_like(g)
    for m in sel:
        j = int(idx[m])
        wm = w[m].to(g.dtype)
        gk = gk.index_add(0, idx[m : m + 1].long(), (hg * wm).unsqueeze(0))
        if need_h:
            acc = acc + wm * K[j]
    return gk, ((g * acc).sum(dim=1) if need_h else None)


def _combine(ctx, g, mask: int):
    h, w, idx, *K = ctx.saved_tensors
    need_h = ctx.need_h
    Kb = K[0] if need_h else _stand_in(g, ctx.S)
    if torch.is_grad_enabled():
        return _combine_backward_torch(g, Kb, h, w, idx, mask, need_h)
    gk, gh = torch.ops.fastnode_triton.rk_combine_backward(g.contiguous(), Kb, h, w, idx, mask, need_h)
    return gk, (gh if need_h else None)


def _save(ctx, K, h, w, idx, copy: bool) -> None:
    ctx.S = K.shape[0]
    ctx.need_h = h.requires_grad
    keep = (K.detach().clone() if copy else K,) if ctx.need_h else ()
    ctx.save_for_backward(h, w, idx, *keep)


def _rk_combine_setup(ctx, inputs, output):
    y, K, h, w, idx = inputs
    _save(ctx, K, h, w, idx, copy=True)  # later stages are written into K: a copy of what this call read


def _rk_combine_backward(ctx, g):
    gk, gh = _combine(ctx, g, -1)
    return g, gk, gh, None, None


def _finish_setup(ctx, inputs, output):
    y, K, h, be_w, be_idx, b_mask = inputs[:6]
    ctx.n_in, ctx.b_mask = len(inputs), b_mask
    n = be_idx.shape[0]
    _save(ctx, K, h, be_w[:n], be_idx, copy=False)  # the step's full buffer: not written after the finish
    ctx.mark_non_differentiable(*output[1:])


def _finish_backward(ctx, g, *_):
    gk, gh = _combine(ctx, g, ctx.b_mask)
    return (g, gk, gh) + (None,) * (ctx.n_in - 3)


def _interp_torch(g, K, h, theta, dense, idx, need):
    U = idx.shape[0]
    P = dense.numel() // U if U else 0
    D = dense.reshape(U, P).to(g.dtype)
    th = theta.unsqueeze(1)
    w = torch.cat([th ** (p + 1) for p in range(P)], dim=1) @ D.T  # [G, U]
    dw = torch.cat([(p + 1) * th**p for p in range(P)], dim=1) @ D.T
    hg = g * h.unsqueeze(1)
    gk = torch.zeros((K.shape[0],) + tuple(g.shape), dtype=g.dtype, device=g.device)
    for u in range(U):
        gk = gk.index_add(0, idx[u : u + 1].long(), (hg * w[:, u : u + 1]).unsqueeze(0))
    if not need:
        return gk, None, None
    a = sum(w[:, u : u + 1] * K[int(idx[u])] for u in range(U))
    da = sum(dw[:, u : u + 1] * K[int(idx[u])] for u in range(U))
    return gk, (g * a).sum(dim=1), h * (g * da).sum(dim=1)


def _interpolate_setup(ctx, inputs, output):
    y, K, h, theta, dense, idx = inputs
    ctx.S = K.shape[0]
    ctx.need = h.requires_grad or theta.requires_grad
    ctx.save_for_backward(h, theta, dense, idx, *((K,) if ctx.need else ()))


def _interpolate_backward(ctx, g):
    h, theta, dense, idx, *K = ctx.saved_tensors
    need = ctx.need
    Kb = K[0] if need else _stand_in(g, ctx.S)
    if torch.is_grad_enabled():
        gk, gh, gt = _interp_torch(g, Kb, h, theta, dense, idx, need)
    else:
        gk, gh, gt = torch.ops.fastnode_triton.interpolate_backward(g.contiguous(), Kb, h, theta, dense, idx, need)
    return g, gk, (gh if need else None), (gt if need else None), None, None


def register() -> None:
    """Registers the formulas (once, when ``fastnode.kernels`` is first imported)."""
    torch.library.register_autograd("fastnode_triton::rk_combine", _rk_combine_backward,
                                    setup_context=_rk_combine_setup)
    torch.library.register_autograd("fastnode_triton::finish_control", _finish_backward, setup_context=_finish_setup)
    torch.library.register_autograd("fastnode_triton::step_error", _finish_backward, setup_context=_finish_setup)
    torch.library.register_autograd("fastnode_triton::interpolate", _interpolate_backward,
                                    setup_context=_interpolate_setup)


register()
