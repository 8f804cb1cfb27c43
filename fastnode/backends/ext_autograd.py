"""Autograd formulas of the ``fastnode::`` ops that carry values, registered with ``torch.library.register_autograd``.

- ``rk_combine``: ``out = y + h * sum_j w_j K[j]``. ``d y = g``, ``d K[j] = (h * g) * w_j`` (zero weights: no
  gradient, as the reference skips those stages), ``d h = sum_n g * sum_j w_j K[j]`` per row.
- ``finish_control``: only its solution ``y_new = y + h * sum_j b_j K[j]`` is differentiable (the same formula);
  the error ratio, the flags, the next step and the controller memory are marked non-differentiable, as the
  reference computes them under ``no_grad``.
- ``interpolate``: ``out = y + h * sum_j w_j(theta) K[j]``; ``d theta = h * sum_n g * sum_j w_j'(theta) K[j]``.

The backward of each is one fused op (``rk_combine_backward``, ``interpolate_backward``) that writes every stage's
gradient in one pass. Where that op cannot run (a CUDA tensor on a build without its CUDA kernel) or a second
derivative is asked for (``create_graph=True``: the backward must itself record a graph), the same formulas run as
torch ops. A combination saves its stages only when ``h`` needs a gradient (time gradients).

Example:
    >>> import torch, fastnode.backends.ext_ops  # noqa: F401  (loads the ops and these formulas)
    >>> y = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    >>> k = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
    >>> out = torch.ops.fastnode.rk_combine(y, [k], torch.full((1,), 0.5, dtype=torch.float64), [2.0])
    >>> out.sum().backward(); k.grad.tolist()
    [[1.0, 1.0]]
"""

from __future__ import annotations

import torch


def _has_kernel(op: str, device: torch.device) -> bool:
    key = "CPU" if device.type == "cpu" else "CUDA" if device.type == "cuda" else None
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnode::{op}", key)


def _fused(op: str, grad: torch.Tensor) -> bool:
    """Whether the backward runs the fused op ``op`` (not under ``create_graph``; a kernel exists for the device)."""
    return not torch.is_grad_enabled() and _has_kernel(op, grad.device)


# ---- rk_combine and finish_control's solution ----


def _combine_backward_torch(grad, K, h, w, need_h):
    """The fused backward's formulas as torch ops: ``([d K[j] for w_j != 0], d h or None)``."""
    hg = grad * h.unsqueeze(1)
    gk = [hg * wj for wj in w if wj != 0.0]
    gh = None
    if need_h:
        acc = None
        for wj, k in zip(w, K):
            if wj != 0.0:
                acc = k * wj if acc is None else acc + k * wj
        gh = (grad * acc).sum(dim=1) if acc is not None else torch.zeros_like(h)
    return gk, gh


def _combine_grads(ctx, grad, w):
    """``(d K list with None at zero weights, d h or None)`` for ``y + h * sum_j w_j K[j]`` (``ctx.n`` stages)."""
    h, *K = ctx.saved_tensors
    need_h = ctx.need_h
    if _fused("rk_combine_backward", grad):
        gk, gh = torch.ops.fastnode.rk_combine_backward(grad, K, h, list(w), need_h)
    else:
        gk, gh = _combine_backward_torch(grad, K, h, w, need_h)
    out = [None] * ctx.n
    it = iter(gk)
    for j, wj in enumerate(w):
        if wj != 0.0:
            out[j] = next(it)
    return out, (gh if need_h else None)


def _save_combine(ctx, K, h, n_weights: int) -> None:
    ctx.n = len(K)
    ctx.need_h = h.requires_grad
    # The stages are needed only for h's gradient: saved then only (they are alive anyway in a recorded solve).
    ctx.save_for_backward(h, *(K[:n_weights] if ctx.need_h else ()))


def _rk_combine_setup(ctx, inputs, output):
    y, K, h, w = inputs
    ctx.w = tuple(w)
    _save_combine(ctx, K, h, len(w))


def _rk_combine_backward(ctx, grad):
    gk, gh = _combine_grads(ctx, grad, ctx.w)
    return grad if ctx.needs_input_grad[0] else None, gk, gh, None


def _finish_control_setup(ctx, inputs, output):
    y, K, h, b = inputs[:4]
    ctx.w = tuple(b)
    _save_combine(ctx, K, h, len(b))
    ctx.mark_non_differentiable(*output[1:])  # ratio, ok, accept, h_next, prev_ratio: the controller's, no graph


def _finish_control_backward(ctx, grad, *_):
    gk, gh = _combine_grads(ctx, grad, ctx.w)
    return (grad if ctx.needs_input_grad[0] else None, gk, gh) + (None,) * 12


# ---- interpolate ----


def _interp_used(dense, P: int, S: int) -> list[int]:
    return [j for j in range(S) if any(v != 0.0 for v in dense[j * P : (j + 1) * P])]


def _interp_weights(dense, P: int, used, theta):
    """``(w [G, U], w' [G, U])``: the dense-output weights of the used stages at ``theta`` and their derivatives."""
    D = torch.tensor([dense[j * P : (j + 1) * P] for j in used], dtype=theta.dtype, device=theta.device)  # [U, P]
    th = theta.unsqueeze(1)
    powers = torch.cat([th ** (p + 1) for p in range(P)], dim=1)  # [G, P]
    dpowers = torch.cat([(p + 1) * th**p for p in range(P)], dim=1)
    return powers @ D.T, dpowers @ D.T


def _interpolate_backward_torch(grad, K, h, theta, dense, P, need_ht):
    used = _interp_used(dense, P, len(K))
    w, dw = _interp_weights(dense, P, used, theta)
    hg = grad * h.unsqueeze(1)
    gk = [hg * w[:, u : u + 1] for u in range(len(used))]
    gh = gt = None
    if need_ht:
        a = sum(w[:, u : u + 1] * K[j] for u, j in enumerate(used))
        da = sum(dw[:, u : u + 1] * K[j] for u, j in enumerate(used))
        gh, gt = (grad * a).sum(dim=1), h * (grad * da).sum(dim=1)
    return gk, gh, gt


def _interpolate_setup(ctx, inputs, output):
    y, K, h, theta, dense, P = inputs
    ctx.n, ctx.dense, ctx.P = len(K), tuple(dense), P
    ctx.need_ht = h.requires_grad or theta.requires_grad
    # The stages are saved even without time gradients: the fused backward checks their shapes, and a dense output
    # is taken only on the steps that pass an output time (the stages are alive anyway in a recorded solve).
    ctx.save_for_backward(h, theta, *K)


def _interpolate_backward(ctx, grad):
    h, theta, *K = ctx.saved_tensors
    need = ctx.need_ht
    if _fused("interpolate_backward", grad):
        gk, gh, gt = torch.ops.fastnode.interpolate_backward(grad, K, h, theta, list(ctx.dense), ctx.P, need)
    else:
        gk, gh, gt = _interpolate_backward_torch(grad, K, h, theta, ctx.dense, ctx.P, need)
    out = [None] * ctx.n
    for g, j in zip(gk, _interp_used(ctx.dense, ctx.P, ctx.n)):
        out[j] = g
    return (grad if ctx.needs_input_grad[0] else None, out, gh if need else None, gt if need else None, None, None)


# ---- the backend's direct path ----
# NOTE: the generic wrapper that torch.library.register_autograd installs (pytree flattening of the stage list, a
# generated autograd.Function per call) costs about 35 us per forward call and 100 us per backward on this CPU,
# against about 10 us for the op itself (bench/backprop.py, mlp-small). ExtStepOps therefore applies these plain
# autograd.Functions, which share the formulas above and call the CPU kernels below the Autograd key; the
# registered formulas serve every other caller (torch.ops.fastnode.*, opcheck, torch.compile).


def _below_autograd():
    return torch._C._AutoDispatchBelowAutograd()


class RkCombineFunction(torch.autograd.Function):
    """``fastnode::rk_combine`` with its gradient: ``apply(y, h, w, *K)``."""

    @staticmethod
    def forward(ctx, y, h, w, *K):
        _save_combine(ctx, K, h, len(w))
        ctx.w = w
        with _below_autograd():
            return torch.ops.fastnode.rk_combine(y, K, h, w)

    @staticmethod
    def backward(ctx, grad):
        gk, gh = _combine_grads(ctx, grad, ctx.w)
        return (grad, gh, None, *gk)


class FinishControlFunction(torch.autograd.Function):
    """``fastnode::finish_control`` with the solution's gradient: ``apply(y, h, args, *K)`` where ``args`` are the
    op's arguments after ``h`` (``b`` first)."""

    @staticmethod
    def forward(ctx, y, h, args, *K):
        b = args[0]
        _save_combine(ctx, K, h, len(b))
        ctx.w = b
        with _below_autograd():
            out = torch.ops.fastnode.finish_control(y, K, h, *args)
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, grad, *_):
        gk, gh = _combine_grads(ctx, grad, ctx.w)
        return (grad, gh, None, *gk)


class InterpolateFunction(torch.autograd.Function):
    """``fastnode::interpolate`` with its gradients: ``apply(y, h, theta, dense, P, *K)``."""

    @staticmethod
    def forward(ctx, y, h, theta, dense, P, *K):
        _interpolate_setup(ctx, (y, K, h, theta, dense, P), None)
        with _below_autograd():
            return torch.ops.fastnode.interpolate(y, K, h, theta, dense, P)

    @staticmethod
    def backward(ctx, grad):
        gy, gk, gh, gt, _, _ = _interpolate_backward(ctx, grad)
        return (gy, gh, gt, None, None, *gk)


# ---- fakes of the backward ops, and the registrations ----


def _rk_combine_backward_fake(grad, K, h, w, need_h):
    return [torch.empty_like(grad) for v in w if v != 0.0], grad.new_empty((grad.shape[0] if need_h else 0,))


def _interpolate_backward_fake(grad, K, h, theta, dense, P, need_ht):
    n = len(_interp_used(dense, P, len(K)))
    G = grad.shape[0] if need_ht else 0
    return [torch.empty_like(grad) for _ in range(n)], grad.new_empty((G,)), grad.new_empty((G,))


def register() -> None:
    """Registers the fakes of the backward ops and the autograd formulas (once, when ``fastnode._C`` loads)."""
    torch.library.register_fake("fastnode::rk_combine_backward")(_rk_combine_backward_fake)
    torch.library.register_fake("fastnode::interpolate_backward")(_interpolate_backward_fake)
    torch.library.register_autograd("fastnode::rk_combine", _rk_combine_backward, setup_context=_rk_combine_setup)
    torch.library.register_autograd("fastnode::finish_control", _finish_control_backward,
                                    setup_context=_finish_control_setup)
    torch.library.register_autograd("fastnode::interpolate", _interpolate_backward, setup_context=_interpolate_setup)
