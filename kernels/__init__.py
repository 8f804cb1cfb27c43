"""Triton kernels for fastnode's solver arithmetic, installed as ``fastnode.kernels``.

Ops (registered with ``torch.library.triton_op`` in the ``fastnode_triton`` namespace, so ``torch.compile`` and
``torch.library.opcheck`` see them; the function body is also the fake implementation; in Triton's interpreter they
are opaque ``custom_op`` s, see ``_launch.register_op``):

- ``rk_combine`` (``rk_combine.py``): stage inputs ``y + h * sum_{j<i} a_ij k_j`` and solutions
  ``y + h * sum_j b_j k_j`` from one ``[S, G, N]`` stage buffer;
- ``finish_control`` (``finish_control.py``): solution, scaled error RMS norm (per group, any segments), finiteness,
  accept/reject and the next step size (I or PI controller), on the device in two launches;
- ``step_error`` (``finish_control.py``): solution and scaled error in one pass, for a user's norm;
- ``step_begin`` (``step_begin.py``): a step's set-up (clip to the next stop, stage times), one launch;
- ``step_end`` (``step_end.py``): a step's bookkeeping (counters, status, output times crossed, the loop's
  host-transfer packet), one launch;
- ``interpolate`` (``interpolate.py``): dense output at per-row ``theta`` inside a step;
- ``rk_combine_backward`` (``rk_combine_backward.py``) and ``interpolate_backward`` (``interpolate_backward.py``):
  the gradients of a combination (or a solution) and of the dense output, every stage's at once (their autograd
  registrations for the value-carrying ops live in ``_autograd.py``).

This package is a leaf: it imports nothing from ``fastnode``. ``fastnode.backends.triton_ops.TritonStepOps`` (the
``triton`` backend) plugs the ops into the solver loop through the StepOps interface; the reference each op is
tested against is the method of the same name on ``fastnode.backends.torch_ops.TorchStepOps``. The adjoint's
augmented state ``[G, 2N]`` goes through the same ops.

The kernels run on CUDA tensors, and on CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1`` was set
before this package was first imported (the tests do that).
"""

from __future__ import annotations

import torch

from . import _autograd  # noqa: F401  (registers the autograd formulas)
from ._launch import INTERPRETED
from .finish_control import finish_control, step_error
from .interpolate import interpolate
from .interpolate_backward import interpolate_backward
from .rk_combine import rk_combine
from .rk_combine_backward import rk_combine_backward
from .step_begin import step_begin
from .step_end import step_end


def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device`` (``None`` when they can).

    Example:
        >>> import torch
        >>> unavailable_reason(torch.device("meta"))
        'there are no Triton kernels for meta tensors'
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not INTERPRETED and not torch.cuda.is_available():
            return "CUDA is not available to this torch build"
        return None
    if device.type == "cpu":
        if INTERPRETED:
            return None
        return ("Triton compiles kernels for CUDA tensors; CPU tensors run only in Triton's interpreter "
                "(TRITON_INTERPRET=1 set before fastnode.kernels is first imported)")
    return f"there are no Triton kernels for {device.type} tensors"


__all__ = [
    "INTERPRETED",
    "finish_control",
    "interpolate",
    "interpolate_backward",
    "rk_combine",
    "rk_combine_backward",
    "step_begin",
    "step_end",
    "step_error",
    "unavailable_reason",
]
