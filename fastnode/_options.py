"""Options dicts -> typed configs, each checked once where the call is made."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# NOTE: AdaptiveConfig and parse_adaptive_options come from _odeint until they live in this module.
from ._odeint import AdaptiveConfig, parse_adaptive_options
from ._problem import _flag, _num, check_options, check_tol, time_dtype_of
from .solvers import get_solver

# ---- adjoint options ----


@dataclass
class AdjointConfig:
    """``odeint_adjoint``'s backward solve, checked once when ``odeint_adjoint`` is called.

    ``method``/``solver``: the backward method (``solver.adaptive``, ``solver.tableau``). ``adaptive``: its
    parsed adaptive options in the backward direction (None for a fixed-grid method); ``step_size`` (None: the
    output times are the grid) and ``perturb`` for a fixed-grid one. ``rtol``/``atol``: as ``check_tol`` gives
    them for the state (a float or ``[G, N]``). ``norm``: ``"default"``, ``"seminorm"`` or a callable.
    """

    method: str
    solver: type
    adaptive: AdaptiveConfig | None
    step_size: float | None
    perturb: bool
    time_dtype: torch.dtype
    backend: str
    rtol: torch.Tensor | float
    atol: torch.Tensor | float
    norm: str | Callable


def parse_adjoint_options(p, options: dict | None, adjoint_method: str | None, adjoint_options: dict | None,
                          adjoint_rtol, adjoint_atol) -> AdjointConfig:
    """Check ``odeint_adjoint``'s backward arguments against the checked forward call ``p`` (``Prepared``).

    Args:
        p: the forward call, as ``prepare`` returns it.
        options: the forward ``options`` as given (``adjoint_options`` default to them, without ``norm``).
        adjoint_method, adjoint_options, adjoint_rtol, adjoint_atol: as given to ``odeint_adjoint``.
    """
    method = p.method if adjoint_method is None else adjoint_method
    solver = get_solver(method)
    opts = _backward_options(p.method, options, method, solver.adaptive, adjoint_options)
    norm = _adjoint_norm(opts.pop("norm", "default"), p.per_sample)
    if not solver.adaptive:
        if "grid_constructor" in opts:
            raise ValueError("adjoint_options['grid_constructor'] is not supported for the backward solve; give "
                             "adjoint_options['step_size'] (output times are always grid points)")
        if callable(norm):
            raise ValueError(f"adjoint_options['norm'] has no effect with the fixed-grid adjoint_method "
                             f"{method!r} (no error control); leave it out")
    if "per_sample" in opts and _flag(opts, "per_sample", False) != p.per_sample:
        raise ValueError(f"adjoint_options['per_sample'] ({opts['per_sample']}) must match "
                         f"options['per_sample'] ({p.per_sample}): the backward solve uses the forward's step mode")
    if adjoint_options is not None and opts.get("on_failure", "raise") != "raise":
        raise ValueError("adjoint_options['on_failure'] must be 'raise': a backward solve that fails has no "
                         "gradient to return")
    opts.pop("per_sample", None)
    opts.pop("on_failure", None)
    tdt = time_dtype_of(opts) if "dtype" in opts else p.tau.dtype
    adaptive, step_size, perturb = None, None, False
    if solver.adaptive:
        adaptive = parse_adaptive_options(opts, solver.tableau, -p.sign, tdt, p.spec.device)
    else:
        if opts.get("step_size") is not None:
            step_size = _num(opts, "step_size", None, lo=0.0, lo_open=True)
        perturb = _flag(opts, "perturb", False)
    rtol = p.rtol if adjoint_rtol is None else check_tol("adjoint_rtol", adjoint_rtol, p.spec)
    atol = p.atol if adjoint_atol is None else check_tol("adjoint_atol", adjoint_atol, p.spec)
    return AdjointConfig(method, solver, adaptive, step_size, perturb, tdt, opts.get("backend", "auto"), rtol, atol,
                         norm)


def _backward_options(fwd_method: str, options: dict | None, method: str, adaptive: bool,
                      adjoint_options: dict | None) -> dict:
    """A checked copy of ``adjoint_options``, or of ``options`` without ``norm`` when they are not given."""
    if method != fwd_method and options is not None and adjoint_options is None:
        raise ValueError(f"adjoint_method ({method!r}) differs from method ({fwd_method!r}), so adjoint_options "
                         "cannot be inherited from options; pass adjoint_options as well (e.g. adjoint_options={})")
    if adjoint_options is None:
        return {k: v for k, v in (options or {}).items() if k != "norm"}
    return check_options(adjoint_options, adaptive, method, name="adjoint_options", extra=frozenset({"norm"}))


def _adjoint_norm(norm, per_sample: bool):
    """``adjoint_options['norm']``: ``"default"``, ``"seminorm"`` or a callable (not per sample)."""
    if isinstance(norm, str):
        if norm not in ("seminorm", "default"):
            raise ValueError(f"adjoint_options['norm'] must be 'seminorm' or a callable, got {norm!r}")
    elif not callable(norm):
        raise TypeError(f"adjoint_options['norm'] must be 'seminorm' or a callable, got {type(norm).__name__}")
    elif per_sample:
        raise ValueError("adjoint_options['norm'] as a callable is not supported with options['per_sample']=True: "
                         "per-sample error control uses each sample's own (y, adj_y) error (a seminorm)")
    return norm
