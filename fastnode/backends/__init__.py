"""StepOps backends: every piece of the solver's own arithmetic goes through one of these.

The ``torch`` backend (``torch_ops``) is the reference; faster backends (Triton kernels on CUDA, the compiled
extension on CPU) implement the same interface and are tested op by op against it.
"""

from __future__ import annotations

import torch

from .torch_ops import StepOps, TorchStepOps

_BACKENDS = {"torch": TorchStepOps}
BACKEND_NAMES = ("auto", "torch")


def get_backend(name: str, device: torch.device) -> StepOps:
    """Return the StepOps for ``name`` (``"auto"`` picks the fastest available for ``device``)."""
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"options['backend'] must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "auto":
        name = "torch"
    return _BACKENDS[name]()
