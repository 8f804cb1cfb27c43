"""fastnode: fast, torchdiffeq-compatible ODE solvers for PyTorch.

Example:
    >>> import torch
    >>> from fastnode import odeint
    >>> ys = odeint(lambda t, y: -y, torch.ones(4), torch.linspace(0.0, 1.0, 5))
    >>> tuple(ys.shape)
    (5, 4)
"""

from ._adjoint import odeint_adjoint
from ._odeint import odeint, odeint_event
from ._stats import (
    MAX_STEPS,
    NON_FINITE,
    STATUS_NAMES,
    STEP_UNDERFLOW,
    STIFF,
    SUCCESS,
    SolverError,
    SolveStats,
    last_stats,
)
from .solvers import ADAPTIVE_METHODS, FIXED_METHODS, SOLVERS

__all__ = [
    "ADAPTIVE_METHODS",
    "FIXED_METHODS",
    "MAX_STEPS",
    "NON_FINITE",
    "SOLVERS",
    "STATUS_NAMES",
    "STIFF",
    "STEP_UNDERFLOW",
    "SUCCESS",
    "SolveStats",
    "SolverError",
    "last_stats",
    "odeint",
    "odeint_adjoint",
    "odeint_event",
]
__version__ = "0.1.0"
