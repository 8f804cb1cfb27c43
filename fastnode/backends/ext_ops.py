"""The ``ext`` StepOps backend: the compiled extension ``fastnode._C`` (csrc/).

Each op is registered with ``torch.library`` (schemas in ``csrc/step_ops.cpp``, CPU in ``csrc/cpu``, CUDA in
``csrc/cuda``) and gets a fake (meta) implementation here, so ``torch.compile`` and ``torch.library.opcheck``
see them. The ops cover the solver's arithmetic: stage inputs and solutions (``rk_combine``),
a step's whole finish with the built-in norm and the controller (``finish_control``), dense output
(``interpolate``) and the adjoint's per-sample quadrature weights (``adjoint_weights``); the first three have
autograd formulas whose backwards are fused ops too (``csrc/autograd.cpp``). Anything they do not
cover (a user norm, a custom adjoint norm, float16/bfloat16, a float32 time dtype) runs on the torch reference,
op by op, inside the same solve.

Example:
    >>> import torch, fastnode
    >>> y = fastnode.odeint(lambda t, y: -y, torch.ones(4, 3), torch.linspace(0, 1, 3),
    ...                     options={"backend": "auto"})
    >>> fastnode.last_stats().backend in ("ext", "torch")  # "torch" when the extension is not built
    True
"""

from __future__ import annotations

import os
import warnings

import torch

from .._options import RMSNorm
from . import ext_autograd
from .base import StepEnd, StepPlan, StepResult, as_named
from .torch_ops import TorchStepOps

_FLOATS = (torch.float32, torch.float64)

try:
    from .. import _C  # noqa: F401  (loading it registers the fastnode:: ops)

    _LOAD_ERROR = None
except ImportError as exc:  # not built (FASTNODE_SKIP_EXT=1) or built against another torch
    _LOAD_ERROR = exc

_WARNED = False


def available() -> bool:
    """Whether ``fastnode._C`` is loaded."""
    return _LOAD_ERROR is None


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnode::{op}", key)


def unavailable_reason(device: torch.device) -> str | None:
    """Why the extension cannot run on ``device`` (``None`` when it can). Says once when it is not built."""
    global _WARNED
    if _LOAD_ERROR is not None:
        why = f"the compiled extension fastnode._C is not built or does not load ({_LOAD_ERROR})"
        if not _WARNED and os.environ.get("FASTNODE_SKIP_EXT", "0") != "1":
            _WARNED = True
            warnings.warn(f"fastnode: {why}; the solver arithmetic runs on the torch backend "
                          "(pip install --no-build-isolation -e . builds it)", RuntimeWarning, stacklevel=3)
        return why
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return None if _has_kernel("rk_combine", "CUDA") else "this build of fastnode._C has no CUDA kernels"
    return f"the extension has no kernels for {device.type} tensors"


if _LOAD_ERROR is None:

    @torch.library.register_fake("fastnode::rk_combine")
    def _rk_combine_fake(y, K, h, w):
        return torch.empty_like(y)

    @torch.library.register_fake("fastnode::finish_control")
    def _finish_control_fake(y, K, h, b, e, rtol_t, rtol, atol_t, atol, segments, h_ctl, prev_ratio, running,
                             ratio_floor, ctrl):
        G = y.shape[0]
        d = y.new_empty((G,), dtype=torch.float64)
        m = y.new_empty((G,), dtype=torch.bool)
        return torch.empty_like(y), d, m, torch.empty_like(m), torch.empty_like(d), torch.empty_like(d)

    @torch.library.register_fake("fastnode::interpolate")
    def _interpolate_fake(y, K, h, theta, dense, P):
        if y.shape[0] == 1 and theta.dim() == 1 and theta.shape[0] != 1:  # M outputs of the one row
            return y.new_empty((theta.shape[0], y.shape[1]))
        return torch.empty_like(y)

    @torch.library.register_fake("fastnode::step_begin")
    def _step_begin_fake(t, h, running, t_out, t_end, to_outputs, c, sign, state_dtype, squeeze):
        G, S = t.shape[0], len(c)
        ts = t.new_empty((S,) if squeeze else (S, G), dtype=state_dtype)
        te = t.new_empty(() if squeeze else (G,), dtype=state_dtype)
        return (torch.empty_like(t), torch.empty_like(running), torch.empty_like(t),
                t.new_empty((G,), dtype=state_dtype), ts, te)

    @torch.library.register_fake("fastnode::step_end")
    def _step_end_fake(accept, h_next, h, clipped, running, t, t_new, t_end, n_att, n_acc, status, last_nonfinite,
                       new_ok, next_idx, t_out, max_num_steps, codes):
        return (torch.empty_like(t), torch.empty_like(t), torch.empty_like(n_att), torch.empty_like(n_acc),
                torch.empty_like(status), torch.empty_like(last_nonfinite), torch.empty_like(running),
                torch.empty_like(next_idx), torch.empty_like(running), next_idx.new_empty((3,)))

    @torch.library.register_fake("fastnode::initial_step_probe")
    def _initial_step_probe_fake(y0, k0, rtol_t, rtol, atol_t, atol, segments):
        d = y0.new_empty((y0.shape[0],), dtype=torch.float64)
        return d, torch.empty_like(y0), torch.empty_like(d)

    @torch.library.register_fake("fastnode::initial_step_finish")
    def _initial_step_finish_fake(y0, k0, k1, h0, d1, rtol_t, rtol, atol_t, atol, segments, order):
        return y0.new_empty((y0.shape[0],), dtype=torch.float64)

    @torch.library.register_fake("fastnode::adjoint_weights")
    def _adjoint_weights_fake(h, accept, b):
        return h.new_empty((len(b), h.shape[0]))

    ext_autograd.register()


def tol_args(tol, n: int):
    """A tolerance as the ops take it: ``(None, value)`` for a number, ``(tensor [R, n], 0.0)`` otherwise (``n``:
    the state's values per group)."""
    if isinstance(tol, torch.Tensor):
        return tol.reshape(-1, n).contiguous(), 0.0
    return None, float(tol)


def _callable(op):
    """The C++ callable behind an OpOverload (the overload itself where a torch build has none)."""
    return getattr(op, "_op", op)


class ExtStepOps(TorchStepOps):
    """StepOps on ``fastnode._C``; falls back to the torch reference op by op where an op does not apply.

    Backpropagation through the solver: ``rk_combine``, ``finish_control``'s solution and ``interpolate`` carry
    autograd formulas (C++ Autograd kernels, ``csrc/autograd.cpp``: under ``no_grad`` or without inputs that need
    gradients they only step below the Autograd key, so every call goes through the dispatcher the same way);
    ``step_begin``/``step_end`` run on the reference when the times carry a graph (time gradients).

    ``rk_combine``, ``finish_control`` and ``interpolate`` also take the state in another shape holding the groups'
    rows (``takes_state_shape``: a solve with one group may keep its state as func sees it; see csrc/autograd.cpp).
    """

    takes_state_shape = True

    name = "ext"
    supports_autograd = True

    def __init__(self, forced: bool = False):
        self.forced = forced
        self._ops = torch.ops.fastnode
        # The overloads, resolved once (a call through the packet resolves the overload on every call), as their C++
        # callables (an overload's __call__ is one more Python frame per call).
        self._rk_combine = _callable(self._ops.rk_combine.default)
        self._finish_control = _callable(self._ops.finish_control.default)
        self._interpolate = _callable(self._ops.interpolate.default)
        self._step_begin = _callable(self._ops.step_begin.default)
        self._step_end = _callable(self._ops.step_end.default)
        self._initial_step_probe = _callable(self._ops.initial_step_probe.default)
        self._initial_step_finish = _callable(self._ops.initial_step_finish.default)

    # NOTE: the checks below run several times per step, so they are written inline (y.ndim, not y.dim(): a
    # property, not a call) rather than as a helper: the loop's per-step Python time is the CPU goal.

    def rk_combine(self, y, K, h, weights):
        if y.dtype not in _FLOATS:
            return super().rk_combine(y, K, h, weights)
        return self._rk_combine(y, K, h, weights)  # the op reads the first len(weights) stages

    def combiner(self, dtype):
        return self._rk_combine if dtype in _FLOATS else self.rk_combine

    def finish_control(self, tableau, y, K, h, rtol, atol, norm, cfg, h_ctl, prev_ratio, running,
                       ratio_floor=None, adjust=None):
        if (adjust is not None or not isinstance(norm, RMSNorm) or y.dtype not in _FLOATS
                or h_ctl.dtype != torch.float64 or tableau.e is None or len(K) != len(tableau.c)):
            return super().finish_control(tableau, y, K, h, rtol, atol, norm, cfg, h_ctl, prev_ratio, running,
                                          ratio_floor=ratio_floor, adjust=adjust)
        G = h_ctl.shape[0]
        n = y.numel() // G if G else 0
        rt, rs = (None, float(rtol)) if not isinstance(rtol, torch.Tensor) else tol_args(rtol, n)
        at, as_ = (None, float(atol)) if not isinstance(atol, torch.Tensor) else tol_args(atol, n)
        floor = None if ratio_floor is None else ratio_floor.to(torch.float64).reshape(-1).expand(G)
        args = (tableau.b, tableau.e, rt, rs, at, as_, norm.bounds(n), h_ctl, prev_ratio, running, floor,
                cfg.as_floats())
        return as_named(StepResult, self._finish_control(y, K, h, *args))

    def interpolate(self, tableau, y, K, h, theta):
        if y.dtype not in _FLOATS or not y.is_cpu:
            return super().interpolate(tableau, y, K, h, theta)
        dense = _dense_flat(tableau)
        P = len(tableau.dense[0])
        th = theta.to(y.dtype)
        # [M] thetas of the one group (interpolates_many) go as they are; [G], [1] or 0-d are spread over the groups.
        G = h.shape[0]
        th = th.contiguous() if th.ndim == 1 and G == 1 else th.expand(G).contiguous()
        return self._interpolate(y, list(K), h, th, dense, P)

    def step_begin(self, t, h, running, t_out, t_end, to_outputs, c, sign, state_dtype, squeeze, *, stops=None,
                   end_perturb=0, time_grad=False):
        # NOTE: t.is_cpu, not t.device.type: building a torch.device costs about as much as the rest of this check.
        if (stops is not None or end_perturb or time_grad or not t.is_cpu or t.dtype != torch.float64
                or state_dtype not in _FLOATS):
            return super().step_begin(t, h, running, t_out, t_end, to_outputs, c, sign, state_dtype, squeeze,
                                      stops=stops, end_perturb=end_perturb, time_grad=time_grad)
        h_ctl, clipped, t_new, hs, ts, te = self._step_begin(t, h, running, t_out, t_end, to_outputs, c,
                                                             float(sign), state_dtype, squeeze)
        return as_named(StepPlan, (h_ctl, h_ctl, clipped, t_new, hs, ts, te))

    def step_end(self, accept, h_next, h, clipped, running, t, t_new, t_end, n_att, n_acc, status, last_nonfinite,
                 new_ok, next_idx, t_out, max_num_steps, codes, *, jump_t=None, stop=None, fail=None):
        if (jump_t is not None or stop is not None or fail is not None or not t.is_cpu or t.dtype != torch.float64
                or t.requires_grad or t_new.requires_grad):  # the times' graph (time gradients): the reference keeps it
            return super().step_end(accept, h_next, h, clipped, running, t, t_new, t_end, n_att, n_acc, status,
                                    last_nonfinite, new_ok, next_idx, t_out, max_num_steps, codes, jump_t=jump_t,
                                    stop=stop, fail=fail)
        return as_named(StepEnd, self._step_end(accept, h_next, h, clipped, running, t, t_new, t_end, n_att, n_acc,
                                                status, last_nonfinite, new_ok, next_idx, t_out, int(max_num_steps),
                                                codes) + (None,))

    @torch.no_grad()
    def initial_step(self, probe, t0, y0, k0, order, rtol, atol, norm):
        if (not isinstance(norm, RMSNorm) or y0.dtype not in _FLOATS or y0.ndim != 2 or not y0.is_cpu
                or t0.dtype != torch.float64 or k0.dtype != y0.dtype or y0.numel() == 0):
            return super().initial_step(probe, t0, y0, k0, order, rtol, atol, norm)
        rt, rs = tol_args(rtol, y0.shape[1])
        at, as_ = tol_args(atol, y0.shape[1])
        seg = norm.bounds(y0.shape[1])
        h0, y1, d1 = self._initial_step_probe(y0, k0, rt, rs, at, as_, seg)
        k1 = probe(t0 + h0, y1)
        return self._initial_step_finish(y0, k0, k1.to(y0.dtype), h0, d1, rt, rs, at, as_, seg, float(order))

    def adjoint_weights(self, h: torch.Tensor, accept: torch.Tensor, b) -> torch.Tensor:
        """[S, G]: ``h_g * b_j`` where group g's step was accepted, else 0."""
        if h.dtype not in _FLOATS:
            return super().adjoint_weights(h, accept, b)
        return self._ops.adjoint_weights(h, accept, list(b))


_DENSE_FLAT: dict = {}


def _dense_flat(tableau) -> list[float]:
    hit = _DENSE_FLAT.get(id(tableau))
    if hit is None or hit[0] is not tableau:
        hit = _DENSE_FLAT[id(tableau)] = (tableau, [float(v) for row in tableau.dense for v in row])
    return hit[1]


__all__ = ["ExtStepOps", "available", "tol_args", "unavailable_reason"]
