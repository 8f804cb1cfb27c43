"""``ODEBlock``: an ``nn.Module`` that integrates a learned vector field with ``odeint`` or ``odeint_adjoint``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._adjoint import odeint_adjoint
from .._odeint import odeint
from .._stats import last_stats
from ..backends import BACKEND_NAMES

__all__ = ["ODEBlock", "count_parameters"]


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``.

    Args:
        module: any ``nn.Module``.

    Returns:
        The sum of ``p.numel()`` over the parameters that require grad.

    Example:
        >>> from torch import nn
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class _CountingFunc(nn.Module):
    """Wraps ``func(t, y)``; in backprop mode counts how many of its outputs receive a gradient in backward.

    Every evaluation whose output reaches the loss gets exactly one gradient during ``backward()``, so the count is
    the number of vector-Jacobian products of ``func`` that backpropagation through the solver performs (NFE-B of
    backprop). In adjoint mode no hooks are registered: the solver's own ``nfe_backward`` is exact there.
    """

    def __init__(self, func: nn.Module):
        super().__init__()
        self.func = func
        self.count_backward = False
        self.n_backward = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.func(t, y)
        if self.count_backward and torch.is_grad_enabled() and out.requires_grad:
            out.register_hook(self._hook)
        return out

    def _hook(self, grad: torch.Tensor) -> None:
        self.n_backward += 1


class ODEBlock(nn.Module):
    """Maps ``x`` to ``z(t1)`` where ``dz/dt = func(t, z)``, ``z(t0) = x``.

    Args:
        func: the vector field, an ``nn.Module`` called as ``func(t, z)`` with ``t`` a 0-d tensor; returns
            ``dz/dt`` shaped like ``z``.
        t: integration times ``[T]`` (at least two, strictly monotone; default ``(0, 1)``). ``forward`` returns
            the state at ``t[-1]`` unless ``return_trajectory`` is set.
        method: solver name (``fastnode.SOLVERS``), default ``dopri5``.
        rtol, atol: tolerances of the forward solve (also of the adjoint solve unless ``adjoint_rtol``/
            ``adjoint_atol`` are given).
        adjoint: gradients by the adjoint method (``odeint_adjoint``, memory constant in the number of steps)
            instead of backpropagation through the solver's operations.
        backend: solver arithmetic backend: ``"auto"`` (fastest available) or a name in
            ``fastnode.backends.BACKEND_NAMES`` (``"torch"`` is the reference).
        options: further solver options (``max_num_steps``, ``step_size`` for fixed grids, ...).
        adjoint_rtol, adjoint_atol: tolerances of the backward solve (adjoint mode).
        adjoint_options: options of the backward solve, e.g. ``{"norm": "seminorm"}`` (adjoint mode).
        return_trajectory: return ``[T, *x.shape]`` instead of the final state.

    Attributes:
        nfe_forward: function evaluations of the latest forward solve.
        nfe_backward: function evaluations of the latest backward pass: the adjoint solve's ``nfe_backward``
            (adjoint mode), or the number of ``func`` outputs that received a gradient (backprop mode, counted by
            autograd hooks). ``None`` before any backward.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class F(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(2, 2)
        ...     def forward(self, t, z):
        ...         return torch.tanh(self.lin(z))
        >>> block = ODEBlock(F(), rtol=1e-4, atol=1e-4, adjoint=True)
        >>> z = block(torch.randn(5, 2))
        >>> tuple(z.shape)
        (5, 2)
        >>> z.sum().backward()
        >>> block.nfe_forward > 0 and block.nfe_backward > 0
        True
    """

    def __init__(self, func: nn.Module, t: Sequence[float] | torch.Tensor = (0.0, 1.0), *, method: str = "dopri5",
                 rtol: float = 1e-3, atol: float = 1e-3, adjoint: bool = False, backend: str = "auto",
                 options: dict | None = None, adjoint_rtol: float | None = None, adjoint_atol: float | None = None,
                 adjoint_options: dict | None = None, return_trajectory: bool = False):
        super().__init__()
        if not isinstance(func, nn.Module):
            raise TypeError(f"func must be an nn.Module (its parameters are trained), got {type(func).__name__}")
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.ndim != 1 or t.numel() < 2:
            raise ValueError(f"t must be a 1-D sequence of at least two times, got shape {tuple(t.shape)}")
        dt = t[1:] - t[:-1]
        if not (bool((dt > 0).all()) or bool((dt < 0).all())):
            raise ValueError(f"t must be strictly increasing or decreasing, got {t.tolist()}")
        if not isinstance(method, str):
            raise TypeError(f"method must be a str, got {type(method).__name__}")
        for name, val in (("rtol", rtol), ("atol", atol)):
            if not isinstance(val, (int, float)) or val <= 0:
                raise ValueError(f"{name} must be a positive number, got {val!r}")
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options must be a dict or None, got {type(options).__name__}")
        if adjoint_options is not None and not isinstance(adjoint_options, dict):
            raise TypeError(f"adjoint_options must be a dict or None, got {type(adjoint_options).__name__}")
        self.func = _CountingFunc(func)
        self.register_buffer("t", t, persistent=False)
        self.method = method
        self.rtol, self.atol = float(rtol), float(atol)
        self.adjoint = bool(adjoint)
        self.backend = backend
        self.options = dict(options or {})
        self.adjoint_rtol, self.adjoint_atol = adjoint_rtol, adjoint_atol
        self.adjoint_options = None if adjoint_options is None else dict(adjoint_options)
        self.return_trajectory = bool(return_trajectory)
        self.nfe_forward: int | None = None
        self._stats = None

    @property
    def nfe_backward(self) -> int | None:
        if self._stats is None:
            return None
        if self.adjoint:
            return self._stats.nfe_backward if self._stats.backward is not None else None
        return self.func.n_backward if self._backward_seen() else None

    def _backward_seen(self) -> bool:
        return self.func.n_backward > 0

    def forward(self, x: torch.Tensor, rtol: float | None = None, atol: float | None = None) -> torch.Tensor:
        """Integrate from ``x``.

        Args:
            x: ``[B, ...]`` initial state.
            rtol, atol: override the block's tolerances for this call (e.g. to test at other tolerances).

        Returns:
            ``[B, ...]`` the state at ``t[-1]`` (``[T, B, ...]`` with ``return_trajectory``).
        """
        rtol = self.rtol if rtol is None else rtol
        atol = self.atol if atol is None else atol
        t = self.t.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
        opts = dict(self.options)
        if self.backend != "auto":
            opts["backend"] = self.backend
        self.func.n_backward = 0
        self.func.count_backward = not self.adjoint
        if self.adjoint:
            kw = {}
            if self.adjoint_rtol is not None:
                kw["adjoint_rtol"] = self.adjoint_rtol
            if self.adjoint_atol is not None:
                kw["adjoint_atol"] = self.adjoint_atol
            adj_opts = self.adjoint_options
            if adj_opts is not None and self.backend != "auto":
                adj_opts = {**adj_opts, "backend": self.backend}
            out = odeint_adjoint(self.func, x, t, rtol=rtol, atol=atol, method=self.method, options=opts or None,
                                 adjoint_options=adj_opts, **kw)
        else:
            out = odeint(self.func, x, t, rtol=rtol, atol=atol, method=self.method, options=opts or None)
        self._stats = last_stats()
        self.nfe_forward = int(self._stats.nfe)
        return out if self.return_trajectory else out[-1]

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, rtol={self.rtol:g}, atol={self.atol:g}, adjoint={self.adjoint}, "
                f"backend={self.backend!r}, t={self.t.tolist()}")
