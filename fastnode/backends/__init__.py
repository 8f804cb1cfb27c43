"""StepOps backends: every piece of the solver's own arithmetic goes through one of these.

- ``torch`` (``torch_ops``): the pure-PyTorch reference of every op, any device, records autograd graphs.
- ``ext`` (``ext_ops``): the compiled extension ``fastnode._C`` (CPU; its CUDA build adds the adjoint step ops).
- ``triton`` (``triton_ops`` on the op library ``fastnode.kernels``): Triton kernels for CUDA tensors (on CPU only
  under ``TRITON_INTERPRET=1``).

The interface is ``base.StepOps`` (one docstring per op). One name per op in every layer; where a compiled op does
not cover a case, the fast backend runs the reference for that call (the "falls back" column):

===================  =========================  ==========================  ===========================================
StepOps method       ``fastnode::`` (C++)       ``fastnode_triton::``       ABI differences; falls back when
===================  =========================  ==========================  ===========================================
``rk_combine``       ``rk_combine``             ``rk_combine``              C++: ``K`` a list, ``w`` Python floats;
                                                                            Triton: ``K`` an ``[S, G, N]`` buffer, the
                                                                            nonzero ``w`` and their stage ``idx`` as
                                                                            device tensors
``step_error``       (none: reference)          ``step_error``              Triton: tableau as ``(be_w, be_idx, b_mask,
                                                                            e_mask, last_pos)``, tolerances in a
                                                                            ``consts`` tensor
``finish_control``   ``finish_control``         ``finish_control``          C++: ``b``, ``e``, ``segments``, ``ctrl``
                                                                            as lists; Triton: as device tensors
                                                                            (``ctrl`` = ``ControllerConfig.as_floats()``
                                                                            in both). Falls back: a user or custom
                                                                            adjoint norm, float32 time
``interpolate``      ``interpolate``            ``interpolate``             C++: ``dense`` flat floats and ``P``;
                                                                            Triton: nonzero rows and their ``idx``
``step_begin``       ``step_begin``             ``step_begin``              Triton takes ``c`` as a tensor and
                                                                            ``negate`` for ``sign``, no ``squeeze``.
                                                                            Falls back: ``stops``, ``end_perturb``,
                                                                            ``time_grad``
``step_end``         ``step_end``               ``step_end``                Triton takes ``codes`` as a tensor.
                                                                            Falls back: ``jump_t``, ``stop`` (events)
``adjoint_weights``  ``adjoint_weights``        (none: reference)           C++: ``b`` as a list
``initial_step``     ``initial_step_probe`` +   (none: reference)           C++: around the probe evaluation of func.
                     ``initial_step_finish``                                Falls back: a user norm, float32 time
``controller``       (inside finish_control)    (inside finish_control)     reference only (the unfused finish)
===================  =========================  ==========================  ===========================================

``backend="auto"`` picks triton for CUDA tensors when triton is importable and the extension for CPU tensors
when it is built; otherwise torch. Backpropagation through the solver runs on the fast backends too:
``rk_combine``, ``finish_control``'s solution and ``interpolate`` carry autograd formulas whose backwards are fused
ops (``rk_combine_backward``, ``interpolate_backward``: C++ Autograd kernels in ``csrc/autograd.cpp`` for
``fastnode::``, ``kernels/_autograd.py`` for ``fastnode_triton::``); the controller's outputs carry no gradient, as
on torch. ``initial_step`` (the starting step) is fused around its probe evaluation on ext
(``initial_step_probe``/``initial_step_finish``). For ``odeint_adjoint``'s backward solve on CUDA it picks the
extension's CUDA step ops when they are built, with the Triton set-up and bookkeeping (``ext+triton``,
``ext_triton_ops``). Each solve's ``SolveStats.backend`` names the backend that ran it.
"""

from __future__ import annotations

import os

import torch

from .base import StepOps
from .torch_ops import TorchStepOps

BACKEND_NAMES = ("auto", "torch", "ext", "triton")


def _chosen(name: str, device: torch.device, why: str | None, make, forced: bool) -> StepOps | None:
    """The fast backend ``make(forced=...)`` when ``why`` is None; else None, or a clear error when it was forced."""
    if why is None:
        return make(forced=forced)
    if forced:
        raise ValueError(f"options['backend']={name!r} is not available for {device.type} tensors: {why}")
    return None


# ExtStepOps holds no per-solve state: one instance per ``forced`` serves every solve.
_EXT: dict = {}


def _ext_ops(device: torch.device, forced: bool) -> StepOps | None:
    from . import ext_ops

    def make(forced: bool) -> StepOps:
        ops = _EXT.get(forced)
        if ops is None or type(ops) is not ext_ops.ExtStepOps:
            ops = _EXT[forced] = ext_ops.ExtStepOps(forced=forced)
        return ops

    return _chosen("ext", device, ext_ops.unavailable_reason(device), make, forced)


def _triton_ops(device: torch.device, forced: bool) -> StepOps | None:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        why = "the Triton kernels run on CUDA tensors (on CPU only in Triton's interpreter, TRITON_INTERPRET=1)"
        return _chosen("triton", device, why, None, forced)
    try:
        from .. import kernels
    except ImportError as exc:  # triton itself missing or broken
        return _chosen("triton", device, f"triton could not be imported ({exc})", None, forced)
    from .triton_ops import TritonStepOps

    return _chosen("triton", device, kernels.unavailable_reason(device), TritonStepOps, forced)


def _adjoint_cuda_ops(device: torch.device) -> StepOps | None:
    """``auto`` for the adjoint's backward solve on CUDA: the C++/CUDA step ops where they are built (with the Triton
    set-up and bookkeeping when triton runs too: ``ext+triton``), else None (the usual choice)."""
    from . import ext_ops

    if ext_ops.unavailable_reason(device) is not None:
        return None
    triton = _triton_ops(device, forced=False)
    if triton is None:
        return ext_ops.ExtStepOps(forced=False)
    from .ext_triton_ops import ExtTritonStepOps

    return ExtTritonStepOps(forced=False)


def get_backend(name: str, device: torch.device, role: str = "solve") -> StepOps:
    """Return the StepOps for ``name`` (``"auto"`` picks the fastest available for ``device``).

    ``role="adjoint"``: the backward solve of ``odeint_adjoint``; on CUDA ``auto`` then prefers the C++/CUDA step ops
    (``ext+triton``, see ``ext_triton_ops``) to the Triton ones, which run the forward solves.

    Example:
        >>> import torch
        >>> get_backend("torch", torch.device("cpu")).name
        'torch'
    """
    if role not in ("solve", "adjoint"):
        raise ValueError(f"role must be 'solve' or 'adjoint', got {role!r}")
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"options['backend'] must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "torch":
        return TorchStepOps()
    if name == "ext":
        return _ext_ops(device, forced=True)
    if name == "triton":
        return _triton_ops(device, forced=True)
    ops = None
    if device.type == "cuda" and role == "adjoint":
        ops = _adjoint_cuda_ops(device)
    if ops is None:
        ops = _triton_ops(device, forced=False) if device.type == "cuda" else _ext_ops(device, forced=False)
    return ops if ops is not None else TorchStepOps()


def for_recording(ops: StepOps, recording: bool) -> StepOps:
    """The backend a solve runs on once it is known whether it records an autograd graph.

    ``recording``: grad mode is on and the state, a stage or a time tensor requires grad (backpropagation
    through the solver). A backend without autograd formulas (``supports_autograd = False``) does not record
    graphs: ``auto`` falls back to torch, a forced one raises.
    """
    if not recording or ops.supports_autograd:
        return ops
    if getattr(ops, "forced", False):
        raise ValueError(
            f"options['backend']={ops.name!r} computes no gradients by backpropagation through the solver, and "
            "this solve records an autograd graph (y0, t or func's parameters require grad). Use "
            "fastnode.odeint_adjoint (its solves record no graph and run on this backend), run under "
            "torch.no_grad(), or pick backend='auto' or 'torch'.")
    return TorchStepOps()
