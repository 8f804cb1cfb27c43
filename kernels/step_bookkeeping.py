"""Transitional name: ``kernels/step_ops.py`` imports this module to register the step ops.

The ops live in ``step_begin.py`` and ``step_end.py``; this module goes when ``step_ops.py`` moves to
``fastnode/backends/triton_ops.py`` (which imports ``fastnode.kernels``, registering every op).
"""

from .step_begin import step_begin
from .step_end import step_end

__all__ = ["step_begin", "step_end"]
