"""The ``triton`` StepOps backend: the solver loop's arithmetic on the ``fastnode_triton::`` ops.

The stage store is one ``[S, G, N]`` buffer per step (``new_stages``); ``set_stage`` copies each stage in, which also
makes a non-contiguous ``func`` output contiguous once. With a user norm or a custom adjoint norm the
finish computes the solution and the scaled error in one pass (``step_error``) and the rest (the norm, finiteness,
controller) on torch. Ops that do not apply run on the torch reference, op by op, inside the same solve (as the
``ext`` backend): float16/bfloat16 states, a float32 time dtype, tolerances that are not ``[1, N]``/``[G, N]``.

Example:
    >>> import torch, fastnode
    >>> y = fastnode.odeint(lambda t, y: -y, torch.ones(4, 3), torch.linspace(0, 1, 3),
    ...                     options={"backend": "triton"})  # CUDA tensors; CPU only with TRITON_INTERPRET=1
    >>> fastnode.last_stats().backend
    'triton'
"""

from __future__ import annotations

import contextlib

import torch

from .._options import RMSNorm
from .. import kernels as _kernels  # noqa: F401  (importing the package registers every fastnode_triton:: op)
from ..kernels._launch import FLOAT_DTYPES, device_constants, tableau_constants
from .base import StepEnd, StepPlan, StepResult, as_named
from .torch_ops import TorchStepOps


def _tol(tol, y: torch.Tensor):
    """``(tensor [R, N] or None, scalar)``; ``False`` when a tensor tolerance is not ``[R, N]`` with R in {1, G}."""
    if not isinstance(tol, torch.Tensor):
        return None, float(tol)
    G, N = y.shape
    t = tol.to(y.dtype)
    if t.dim() != 2:
        if t.numel() % N or t.numel() // N not in (1, G):
            return False
        t = t.reshape(-1, N)
    if t.shape[1] != N or t.shape[0] not in (1, G):
        return False
    if t.shape[0] > 1 and t.stride(0) == 0:
        t = t[:1]  # one row broadcast over the groups: the kernel reads it with row stride 0
    return t.contiguous(), 0.0


def _on(device: torch.device):
    """Launch on ``device``: Triton launches on the current CUDA device, which may not be the tensors' one."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


_WEIGHTS: dict = {}


def _weights(weights, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w [M] float64, idx [M] int32)`` on ``device``: the nonzero entries of a tableau row and their stages.

    Cached per row object (a tableau's rows are tuples that live as long as the tableau)."""
    key = (id(weights), device)
    hit = _WEIGHTS.get(key)
    if hit is None or hit[0] is not weights:
        nz = [(j, float(w)) for j, w in enumerate(weights) if w != 0.0]
        w = torch.tensor([v for _, v in nz], dtype=torch.float64, device=device)
        idx = torch.tensor([j for j, _ in nz], dtype=torch.int32, device=device)
        hit = _WEIGHTS[key] = (weights, w, idx)
    return hit[1], hit[2]


def _rows(x: torch.Tensor, G: int, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (0-d, [1] or [G]) as a contiguous [G] tensor of ``dtype`` (no copy when it already is one)."""
    return torch.broadcast_to(x.to(dtype), (G,)).contiguous()


_BACKEND_KEYS = {"cpu": torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
                 "cuda": torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)}


def _records(*xs: torch.Tensor) -> bool:
    """Whether a call on ``xs`` records an autograd graph."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def _call(op, recording: bool, y: torch.Tensor, *args):
    """``op(y, *args)``; past its Autograd kernel when the call records no graph.

    Every ``fastnode_triton::`` op has a Python Autograd kernel (``torch.library.custom_op``'s, with the formulas of
    ``kernels/_autograd.py`` where registered) that runs on every call, under ``no_grad`` too (about 4 us of a
    ~10 us dispatch). Tensor subclasses
    and dispatch modes (fake tensors, functionalization under ``torch.compile``) take the ordinary path.
    """
    keys = _BACKEND_KEYS.get(y.device.type)
    if recording or keys is None or type(y) is not torch.Tensor or torch._C._len_torch_dispatch_stack():
        return op(y, *args)
    return op.default.redispatch(keys, y, *args)


class TritonStepOps(TorchStepOps):
    """StepOps on Triton kernels; falls back to the torch reference op by op where an op does not apply."""

    name = "triton"
    supports_autograd = True  # rk_combine, the finish's solution and interpolate have formulas (kernels/_autograd.py)
    interpolates_many = False  # the kernels take one theta per group

    def __init__(self, forced: bool = False):
        self.forced = forced
        self._ops = torch.ops.fastnode_triton
        self._y_src = None
        self._y_contig = None
        self._tols: dict = {}

    @staticmethod
    def _fits(y: torch.Tensor, K) -> bool:
        return isinstance(K, torch.Tensor) and y.dtype in FLOAT_DTYPES and y.dim() == 2 and y.numel() > 0

    def _contiguous(self, y: torch.Tensor) -> torch.Tensor:
        # A non-contiguous state is copied once per step, not once per stage: the loop passes the same y to every
        # stage input and to the finish.
        if y.is_contiguous():
            return y
        if self._y_src is not y:
            self._y_src, self._y_contig = y, y.contiguous()
        return self._y_contig

    def _tol(self, tol, y: torch.Tensor):
        # A tensor tolerance is the same object for the whole solve (often a broadcast view): prepared once.
        if not isinstance(tol, torch.Tensor):
            return _tol(tol, y)
        key = (id(tol), tuple(y.shape), y.dtype)
        hit = self._tols.get(key)
        if hit is None or hit[0] is not tol:
            if len(self._tols) >= 8:
                self._tols.clear()
            hit = self._tols[key] = (tol, _tol(tol, y))
        return hit[1]

    stages_are_lists = False  # one [S, G, N] buffer

    def new_stages(self, tableau, y):
        if y.dtype not in FLOAT_DTYPES or y.dim() != 2 or y.numel() == 0:
            return []
        return torch.empty((tableau.num_stages,) + tuple(y.shape), dtype=y.dtype, device=y.device)

    def set_stage(self, K, i, k):
        if not isinstance(K, torch.Tensor):
            return super().set_stage(K, i, k)
        K[i].copy_(k)
        return K

    def rk_combine(self, y, K, h, weights):
        if not self._fits(y, K):
            return super().rk_combine(y, K, h, weights)
        w, idx = _weights(weights, y.device)
        with _on(y.device):
            return _call(self._ops.rk_combine, _records(y, K, h), self._contiguous(y), K,
                         _rows(h, y.shape[0], y.dtype), w, idx)

    def step_begin(self, t, h, running, t_out, t_end, to_outputs, c, sign, state_dtype, squeeze, *, stops=None,
                   end_perturb=0, time_grad=False):
        if (stops is not None or end_perturb or time_grad or t.dtype != torch.float64 or t.dim() != 1
                or t_out.dtype != torch.float64 or t_out.dim() != 2 or t_out.shape[0] != t.shape[0]
                or state_dtype not in FLOAT_DTYPES or t.numel() == 0):
            return super().step_begin(t, h, running, t_out, t_end, to_outputs, c, sign, state_dtype, squeeze,
                                      stops=stops, end_perturb=end_perturb, time_grad=time_grad)
        G, dev, f64 = t.shape[0], t.device, torch.float64
        cc = device_constants(tuple(float(v) for v in c), f64, dev)
        with _on(dev), torch.no_grad():
            h_ctl, clipped, t_new, hs, ts, te = _call(
                self._ops.step_begin, False, t.contiguous(), _rows(h, G, f64), _rows(running, G, torch.bool),
                t_out.contiguous(), _rows(t_end, G, f64), bool(to_outputs), cc, sign < 0, state_dtype)
        if squeeze:
            ts, te = ts.squeeze(-1), te.squeeze(-1)
        return as_named(StepPlan, (h_ctl, h_ctl, clipped, t_new, hs, ts, te))

    def step_end(self, accept, h_next, h, clipped, running, t, t_new, t_end, n_att, n_acc, status, last_nonfinite,
                 new_ok, next_idx, t_out, max_num_steps, codes, *, jump_t=None, stop=None, fail=None):
        if (jump_t is not None or stop is not None or fail is not None or t.dtype != torch.float64 or t.dim() != 1
                or t.requires_grad or t_new.requires_grad  # the times' graph (time gradients): the reference keeps it
                or t_out.dtype != torch.float64 or t_out.dim() != 2 or t_out.shape[0] != t.shape[0] or t.numel() == 0):
            return super().step_end(accept, h_next, h, clipped, running, t, t_new, t_end, n_att, n_acc, status,
                                    last_nonfinite, new_ok, next_idx, t_out, max_num_steps, codes, jump_t=jump_t,
                                    stop=stop, fail=fail)
        G, dev, f64 = t.shape[0], t.device, torch.float64
        cd = device_constants(tuple(int(v) for v in codes), torch.int8, dev)
        b, i64 = torch.bool, torch.int64
        with _on(dev), torch.no_grad():
            return as_named(StepEnd, _call(
                self._ops.step_end, False, _rows(accept, G, b), _rows(h_next, G, f64), _rows(h, G, f64),
                _rows(clipped, G, b), _rows(running, G, b), _rows(t, G, f64), _rows(t_new, G, f64),
                _rows(t_end, G, f64), _rows(n_att, G, i64), _rows(n_acc, G, i64), _rows(status, G, torch.int8),
                _rows(last_nonfinite, G, b), _rows(new_ok, G, b), _rows(next_idx, G, i64), t_out.contiguous(),
                int(max_num_steps), cd) + (None,))

    def step_error(self, tableau, y, K, h, rtol, atol):
        # Reached through finish_control's composition when the norm is a user's (or the adjoint's custom norm):
        # solution and scaled error in one pass; the norm then runs on torch.
        rt = at = False
        if self._fits(y, K) and tableau.e is not None and K.shape[0] == tableau.num_stages:
            rt, at = self._tol(rtol, y), self._tol(atol, y)
        if rt is False or at is False:
            return super().step_error(tableau, y, K, h, rtol, atol)
        tc = tableau_constants(tableau, y.device)
        consts = device_constants((rt[1], at[1]) + (0.0,) * 9, torch.float64, y.device)
        with _on(y.device):
            return _call(self._ops.step_error, _records(y, K, h), self._contiguous(y), K,
                         _rows(h, y.shape[0], y.dtype), *tc.finish(), rt[0], at[0], consts)

    def finish_control(self, tableau, y, K, h, rtol, atol, norm, cfg, h_ctl, prev_ratio, running,
                       ratio_floor=None, adjust=None):
        rt = at = False
        if self._fits(y, K):
            rt, at = self._tol(rtol, y), self._tol(atol, y)
        if (rt is False or at is False or adjust is not None or not isinstance(norm, RMSNorm)
                or h_ctl.dtype != torch.float64 or tableau.e is None or K.shape[0] != tableau.num_stages):
            return super().finish_control(tableau, y, K, h, rtol, atol, norm, cfg, h_ctl, prev_ratio, running,
                                          ratio_floor=ratio_floor, adjust=adjust)
        G, N = y.shape
        dev = y.device
        tc = tableau_constants(tableau, dev)
        consts = device_constants((rt[1], at[1], *cfg.as_floats()), torch.float64, dev)
        segments = device_constants(tuple(norm.bounds(N)), torch.int64, dev)
        floor = None if ratio_floor is None else _rows(ratio_floor, G, torch.float64)  # 0-d in shared mode
        with _on(y.device):
            return as_named(StepResult, _call(
                self._ops.finish_control, _records(y, K, h), self._contiguous(y), K, _rows(h, G, y.dtype),
                *tc.finish(), rt[0], at[0], consts, segments, _rows(h_ctl, G, torch.float64),
                _rows(prev_ratio, G, torch.float64), _rows(running, G, torch.bool), floor))

    def interpolate(self, tableau, y, K, h, theta):
        if (isinstance(K, (list, tuple)) and len(K) == tableau.num_stages
                and all(isinstance(k, torch.Tensor) for k in K)):
            # Events keep a step's stages as a list and interpolate later: one stacked buffer then.
            K = torch.stack([k.to(y.dtype) for k in K], dim=0)
        if not self._fits(y, K) or tableau.dense is None or K.shape[1:] != y.shape:
            return super().interpolate(tableau, y, K, h, theta)
        G = y.shape[0]
        d, idx = tableau_constants(tableau, y.device).dense()
        with _on(y.device):
            return _call(self._ops.interpolate, _records(y, K, h, theta), self._contiguous(y), K,
                         _rows(h, G, y.dtype), _rows(theta, G, y.dtype), d, idx)
