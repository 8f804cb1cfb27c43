"""The ``fastnode::`` backward ops' fakes; the autograd formulas themselves are C++ (``csrc/autograd.cpp``).

The ops that carry values have Autograd kernels in the extension, on every device:

- ``rk_combine``: ``out = y + h * sum_j w_j K[j]``. ``d y = g``, ``d K[j] = (h * g) * w_j`` (zero weights: no
  gradient, as the reference skips those stages), ``d h = sum_n g * sum_j w_j K[j]`` per row.
- ``finish_control``: only its solution ``y_new = y + h * sum_j b_j K[j]`` is differentiable (the same formula);
  the error ratio, the flags, the next step and the controller memory are marked non-differentiable, as the
  reference computes them under ``no_grad``.
- ``interpolate``: ``out = y + h * sum_j w_j(theta) K[j]``; ``d theta = h * sum_n g * sum_j w_j'(theta) K[j]``.

The backward of each is one fused op (``rk_combine_backward``, ``interpolate_backward``) that writes every stage's
gradient in one pass. Where that op cannot run (a CUDA tensor on a build without its CUDA kernel) or a second
derivative is asked for (``create_graph=True``: the backward must itself record a graph), the same formulas run as
ATen ops. A combination saves its stages only when ``h`` needs a gradient (time gradients). This module registers
the fakes of the two backward ops (``torch.compile`` and opcheck trace through them).

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


def _interp_used(dense, P: int, S: int) -> list[int]:
    return [j for j in range(S) if any(v != 0.0 for v in dense[j * P : (j + 1) * P])]


# ---- fakes of the backward ops, and the registrations ----


def _rk_combine_backward_fake(grad, K, h, w, need_h):
    return [torch.empty_like(grad) for v in w if v != 0.0], grad.new_empty((grad.shape[0] if need_h else 0,))


def _interpolate_backward_fake(grad, K, h, theta, dense, P, need_ht):
    n = len(_interp_used(dense, P, len(K)))
    many = len(K) > 0 and K[0].shape[0] == 1 and grad.shape[0] != 1  # M outputs of one row: stage grads [1, N]
    G = grad.shape[0] if need_ht else 0
    R = (1 if many else G) if need_ht else 0
    gk = [K[0].new_empty(K[0].shape) if many else torch.empty_like(grad) for _ in range(n)]
    return gk, grad.new_empty((R,)), grad.new_empty((G,))


def register() -> None:
    """Registers the fakes of the backward ops (once, when ``fastnode._C`` loads)."""
    torch.library.register_fake("fastnode::rk_combine_backward")(_rk_combine_backward_fake)
    torch.library.register_fake("fastnode::interpolate_backward")(_interpolate_backward_fake)
