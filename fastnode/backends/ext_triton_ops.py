"""The ``ext+triton`` StepOps backend: the adjoint's backward solve on CUDA, split between both op libraries.

The C++/CUDA ops (``fastnode::``, ``csrc/cuda``) take the step's arithmetic on the augmented state ``[G, 2N]``: stage
inputs and solution (``rk_combine``), the fused finish (``finish_control``: solution, error norm with the parameter
adjoint's floor, controller) and the per-sample quadrature weights (``adjoint_weights``). The extension has no CUDA
set-up, bookkeeping or dense-output ops, so those run on the Triton kernels (``step_begin``, ``step_end``,
``interpolate``), which keep the stage store: one ``[S, G, N]`` buffer, handed to the C++ ops as its ``S`` contiguous
``[G, N]`` views (no copy). Where the C++ finish does not apply (a custom adjoint norm) the Triton one runs.

``backend="auto"`` picks it for ``odeint_adjoint``'s backward solve on CUDA tensors when the extension was built
with its CUDA sources and triton imports (``get_backend(..., role="adjoint")``); the forward solve runs on
``triton``. ``SolveStats.backend`` of the backward solve then reads ``"ext+triton"``.
"""

from __future__ import annotations

import torch

from .._options import RMSNorm
from .ext_ops import ExtStepOps
from .triton_ops import TritonStepOps


class ExtTritonStepOps(TritonStepOps):
    """Triton's stage store, set-up and bookkeeping; the C++/CUDA combination, finish and adjoint weights."""

    name = "ext+triton"

    def __init__(self, forced: bool = False):
        super().__init__(forced=forced)
        self._ext = ExtStepOps(forced=forced)

    def rk_combine(self, y, K, h, weights):
        if not self._fits(y, K):
            return super().rk_combine(y, K, h, weights)
        return self._ext.rk_combine(y, K.unbind(0), h, weights)

    def finish_control(self, tableau, y, K, h, rtol, atol, norm, cfg, h_ctl, prev_ratio, running,
                       ratio_floor=None, adjust=None):
        if not self._fits(y, K) or adjust is not None or not isinstance(norm, RMSNorm):
            return super().finish_control(tableau, y, K, h, rtol, atol, norm, cfg, h_ctl, prev_ratio, running,
                                          ratio_floor=ratio_floor, adjust=adjust)
        return self._ext.finish_control(tableau, y, K.unbind(0), h, rtol, atol, norm, cfg, h_ctl, prev_ratio,
                                        running, ratio_floor=ratio_floor, adjust=adjust)

    def adjoint_weights(self, h: torch.Tensor, accept: torch.Tensor, b) -> torch.Tensor:
        return self._ext.adjoint_weights(h, accept, b)


__all__ = ["ExtTritonStepOps"]
