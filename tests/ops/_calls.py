"""How the op tests call each backend's ops and the torch reference: the one place that knows both ABIs.

Each ``<op>(be, ...)`` takes the reference's arguments (a tableau, a stage list, Python tolerances, a controller
config, ...) and calls ``torch.ops.fastnode.<op>`` (``be.name == "ext"``) or ``torch.ops.fastnode_triton.<op>``
(``"triton"``) directly, in that namespace's ABI: the ``fastnode::`` ops take a list of stages and float weights,
the ``fastnode_triton::`` ops one ``[S, G, N]`` stage buffer and the nonzero weights as device tensors. ``ref_<op>``
calls the reference, ``TorchStepOps``, by its Python method name. A renamed reference method, a moved import or a
changed controller packing is fixed here, once.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import pytest
import torch

from fastnode.backends import ext_ops
from fastnode._options import ControllerConfig, RMSNorm  # noqa: F401  (re-exported to the op tests)
from fastnode.backends.torch_ops import TorchStepOps
from fastnode.solvers import SOLVERS

F32, F64 = torch.float32, torch.float64
ADAPTIVE = [name for name, cls in SOLVERS.items() if cls.adaptive]
DTYPES = [pytest.param(F32, id="f32"), pytest.param(F64, id="f64")]


def tableau(method: str):
    return SOLVERS[method].tableau


def ctrl_values(cfg) -> list[float]:
    """The controller settings in the order both op namespaces take them."""
    return list(cfg.as_floats())


# --- backends ---------------------------------------------------------------------------------------------------------

class Backend(NamedTuple):
    name: str  # "ext" or "triton"
    device: torch.device

    @property
    def ops(self):
        return torch.ops.fastnode if self.name == "ext" else torch.ops.fastnode_triton


def _why_not(name: str, device: str, op: str) -> str | None:
    if name == "ext":
        if not ext_ops.available():
            return "fastnode._C is not built (FASTNODE_SKIP_EXT=1)"
        if device == "cuda":
            if not torch.cuda.is_available():
                return "no GPU"
            if not ext_ops._has_kernel(op, "CUDA"):
                return f"fastnode::{op} has no CUDA kernel in this build"
        return None
    from fastnode import kernels

    if device == "cuda" and not torch.cuda.is_available():
        return "no GPU"
    why = kernels.unavailable_reason(torch.device(device))
    if why is not None and device == "cpu" and os.environ.get("FASTNODE_NO_INTERPRETER"):
        why = os.environ["FASTNODE_NO_INTERPRETER"]  # tests/conftest.py: the interpreter cannot run here
    if why is None and device == "cuda" and kernels.INTERPRETED:
        why = "Triton's interpreter is on: run with FASTNODE_TEST_CUDA=1 to test the compiled kernels"
    return why


def backends(op: str, names=("ext", "triton"), cuda=("ext", "triton")) -> list:
    """pytest params ``Backend(name, device)``: every backend on CPU, and its CUDA twin (marked gpu, skipped where it
    cannot run). ``cuda`` names the backends whose ``op`` has a CUDA implementation."""
    out = []
    for dev in ("cpu", "cuda"):
        for name in names:
            if dev == "cuda" and name not in cuda:
                continue
            marks = [pytest.mark.gpu] if dev == "cuda" else []
            why = _why_not(name, dev, op)
            if why is not None:
                marks.append(pytest.mark.skip(reason=why))
            out.append(pytest.param(Backend(name, torch.device(dev)), marks=marks, id=f"{name}-{dev}"))
    return out


# --- random inputs -------------------------------------------------------------------------------------------------

# [G, N]: odd sizes (masked tails in rows and columns), one row, one column, one element.
SHAPES = [(7, 63), (1, 63), (7, 1), (1, 1)]
SHAPE_IDS = ["G7-N63", "G1-N63", "G7-N1", "G1-N1"]


def state(G: int, N: int, dtype, device, contiguous: bool = True, seed: int = 0) -> torch.Tensor:
    """``[G, N]`` random state; non-contiguous: every other column of a ``[G, 2N]`` tensor."""
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        return torch.randn(G, N, generator=g, dtype=F64).to(dtype=dtype, device=device)
    return torch.randn(G, 2 * N, generator=g, dtype=F64).to(dtype=dtype, device=device)[:, ::2]


def stages(S: int, G: int, N: int, dtype, device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, G, N, generator=g, dtype=F64).to(dtype=dtype, device=device)


def steps(G: int, dtype, device, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.05 + 0.5 * torch.rand(G, generator=g, dtype=F64)).to(dtype=dtype, device=device)


# --- the rounding bound --------------------------------------------------------------------------------------------

EPS = {F32: torch.finfo(F32).eps, F64: torch.finfo(F64).eps}
# Ulps of the bound below allowed between a fast op and the reference, per state dtype: both sides round each
# product and sum once in the reference's order; only fused multiply-adds (a compiler's or a GPU's) differ.
ULPS = {F32: 8.0, F64: 8.0}


def combo_bound(y: torch.Tensor, K, h: torch.Tensor, weights) -> torch.Tensor:
    """``|y| + |h| * sum_j |w_j| |k_j|``: the magnitude the rounding error of ``y + h * sum_j w_j k_j`` scales with
    (not the result's, which cancels for tableaus like dopri8's)."""
    acc = torch.zeros_like(y, dtype=F64)
    for w, k in zip(weights, K):
        if w == 0.0:  # skipped, as the reference skips it (a non-finite stage with weight 0 stays out)
            continue
        acc += abs(float(w)) * k.double().abs()
    return y.double().abs() + h.double().abs().reshape(-1, 1) * acc


def assert_outputs_layout(got, exp) -> None:
    """Same number of outputs, each with the reference's dtype and shape; every bool flag was written (0 or 1)."""
    assert len(got) == len(exp)
    for i, (a, b) in enumerate(zip(got, exp)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        if a.dtype == torch.bool and a.numel():
            assert int(a.view(torch.uint8).max()) <= 1, (i, "a flag was never written")


def assert_second_derivative(f, args, wrt, g: torch.Tensor) -> None:
    """``create_graph``: the composite first derivative (the formulas as ATen ops, recording a graph) equals the fused
    one, and ``gradgradcheck`` passes through it. ``wrt``: the arguments that need gradients; ``g``: the output's
    cotangent."""
    fused = torch.autograd.grad(f(*args), wrt, g, allow_unused=True)
    composite = torch.autograd.grad(f(*args), wrt, g, allow_unused=True, create_graph=True)
    for a, b in zip(composite, fused):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    assert torch.autograd.gradgradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-6)


def assert_rounding_close(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, ulps: float | None = None) -> None:
    """``|out - ref| <= ulps * eps * bound`` elementwise (``ULPS[dtype]`` by default), and no NaN.

    A wrong weight, a missed stage or an unwritten (poisoned) element differs by O(bound); the two implementations'
    different rounding by a few eps times the bound.
    """
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    assert not torch.isnan(out).any(), "output has NaN (an element was never written)"
    tol = (ULPS[out.dtype] if ulps is None else ulps) * EPS[out.dtype] * bound.to(out.device)
    err = (out.double() - ref.double()).abs()
    worst = (err - tol).max()
    assert worst <= 0, f"max error {err.max().item():.3e} exceeds the rounding bound (excess {worst.item():.3e})"


# --- argument packing ----------------------------------------------------------------------------------------------

def _rows(x: torch.Tensor, G: int, dtype) -> torch.Tensor:
    return torch.broadcast_to(torch.as_tensor(x).to(dtype), (G,)).contiguous()


def _weights(w, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Nonzero weights of a dense row as the Triton ops take them: ``(w [M] float64, idx [M] int32)``."""
    nz = [(j, float(v)) for j, v in enumerate(w) if v != 0.0]
    return (torch.tensor([v for _, v in nz], dtype=F64, device=device),
            torch.tensor([j for j, _ in nz], dtype=torch.int32, device=device))


def buffer(K) -> torch.Tensor:
    """A stage list as the Triton ops take it: one contiguous ``[S, G, N]`` buffer."""
    return torch.stack(list(K)).contiguous() if not isinstance(K, torch.Tensor) else K.contiguous()


def _triton_tol(tol, y):
    """``(tensor [R, N] or None, scalar)``: a tensor tolerance with R in {1, G}."""
    if not isinstance(tol, torch.Tensor):
        return None, float(tol)
    return tol.to(y.dtype).reshape(-1, y.shape[1]).contiguous(), 0.0


def finish_args(tab, y):
    """The Triton finish's stage weights: ``(be_w, be_idx, b_mask, e_mask, last_pos)`` of the stages with a nonzero
    solution or error weight (the packing of ``fastnode.kernels._launch.TableauConstants``)."""
    S = tab.num_stages
    e = tab.e if tab.e is not None else [0.0] * S
    union = [j for j in range(S) if tab.b[j] != 0.0 or e[j] != 0.0]
    be_w = torch.tensor([float(tab.b[j]) for j in union] + [float(e[j]) for j in union], dtype=F64, device=y.device)
    be_idx = torch.tensor(union, dtype=torch.int32, device=y.device)
    b_mask = sum(1 << u for u, j in enumerate(union) if tab.b[j] != 0.0)
    e_mask = sum(1 << u for u, j in enumerate(union) if e[j] != 0.0)
    return be_w, be_idx, b_mask, e_mask, union.index(S - 1) if S - 1 in union else -1


def dense_args(tab, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton dense output's ``(d [U * P] float64, idx [U] int32)`` of the stages with a nonzero row."""
    used = [j for j in range(tab.num_stages) if any(v != 0.0 for v in tab.dense[j])]
    d = torch.tensor([float(v) for j in used for v in tab.dense[j]], dtype=F64, device=device)
    return d, torch.tensor(used, dtype=torch.int32, device=device)


def consts(rtol_s: float, atol_s: float, cfg, device) -> torch.Tensor:
    """The Triton finish's float64 constants: the scalar tolerances, then the controller settings."""
    ctrl = ctrl_values(cfg) if cfg is not None else [0.0] * 9
    return torch.tensor([rtol_s, atol_s, *ctrl], dtype=F64, device=device)


# --- the ops, called directly ----------------------------------------------------------------------------------------

def rk_combine(be: Backend, tab, i: int | None, y, K, h) -> torch.Tensor:
    """Stage input ``i`` (``y + h sum_{j<i} a_ij k_j``) or, for ``i=None``, the solution (``y + h sum_j b_j k_j``)."""
    w = tab.b if i is None else tab.a[i][:i]
    G = y.shape[0]
    if be.name == "ext":
        return be.ops.rk_combine(y, list(K)[: len(w)], _rows(h, G, y.dtype), [float(v) for v in w])
    wt, idx = _weights(w, y.device)
    return be.ops.rk_combine(y.contiguous(), buffer(K), _rows(h, G, y.dtype), wt, idx)


def finish_control(be: Backend, tab, y, K, h, rtol, atol, norm, cfg, h_ctl, prev_ratio, running, ratio_floor=None):
    """``(y_new, ratio, ok, accept, h_next, prev_ratio)`` with the built-in RMS norm ``norm``."""
    G, N = y.shape
    floor = None if ratio_floor is None else _rows(ratio_floor, G, F64)
    if be.name == "ext":
        rt, rs = ext_ops.tol_args(rtol, y.shape[1])
        at, as_ = ext_ops.tol_args(atol, y.shape[1])
        return be.ops.finish_control(y, list(K), _rows(h, G, y.dtype), list(tab.b), list(tab.e), rt, rs, at, as_,
                                     norm.bounds(N), _rows(h_ctl, G, F64), _rows(prev_ratio, G, F64),
                                     _rows(running, G, torch.bool), floor, ctrl_values(cfg))
    (rt, rs), (at, as_) = _triton_tol(rtol, y), _triton_tol(atol, y)
    seg = torch.tensor(norm.bounds(N), dtype=torch.int64, device=y.device)
    return be.ops.finish_control(y.contiguous(), buffer(K), _rows(h, G, y.dtype), *finish_args(tab, y), rt, at,
                                 consts(rs, as_, cfg, y.device), seg, _rows(h_ctl, G, F64),
                                 _rows(prev_ratio, G, F64), _rows(running, G, torch.bool), floor)


def step_error(be: Backend, tab, y, K, h, rtol, atol) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y_new, x)``: the solution and the scaled error before the norm (Triton only)."""
    (rt, rs), (at, as_) = _triton_tol(rtol, y), _triton_tol(atol, y)
    return be.ops.step_error(y.contiguous(), buffer(K), _rows(h, y.shape[0], y.dtype), *finish_args(tab, y), rt, at,
                             consts(rs, as_, None, y.device))


def interpolate(be: Backend, tab, y, K, h, theta) -> torch.Tensor:
    G = y.shape[0]
    th = _rows(theta, G, y.dtype)
    if be.name == "ext":
        dense = [float(v) for row in tab.dense for v in row]
        return be.ops.interpolate(y, list(K), _rows(h, G, y.dtype), th, dense, len(tab.dense[0]))
    d, idx = dense_args(tab, y.device)
    return be.ops.interpolate(y.contiguous(), buffer(K), _rows(h, G, y.dtype), th, d, idx)


def adjoint_weights(be: Backend, h, accept, b) -> torch.Tensor:
    return be.ops.adjoint_weights(h, accept, [float(v) for v in b])


def step_begin(be: Backend, t, h, running, t_out, t_end, to_outputs, c, sign, state_dtype, squeeze):
    """``(h_ctl, clipped, t_new, h_state, t_stage, t_end_stage)`` as the reference returns them."""
    if be.name == "ext":
        return be.ops.step_begin(t, h, running, t_out, t_end, to_outputs, [float(v) for v in c], float(sign),
                                 state_dtype, squeeze)
    G = t.shape[0]
    cc = torch.tensor([float(v) for v in c], dtype=F64, device=t.device)
    out = be.ops.step_begin(t.contiguous(), _rows(h, G, F64), _rows(running, G, torch.bool), t_out.contiguous(),
                            _rows(t_end, G, F64), bool(to_outputs), cc, sign < 0, state_dtype)
    h_ctl, clipped, t_new, hs, ts, te = out
    if squeeze:
        ts, te = ts.squeeze(-1), te.squeeze(-1)
    return h_ctl, clipped, t_new, hs, ts, te


def step_end(be: Backend, accept, h_next, h, clipped, running, t, t_new, t_end, n_att, n_acc, status, last_nonfinite,
             new_ok, next_idx, t_out, max_num_steps, codes):
    """``(h, t, n_att, n_acc, status, last_nonfinite, stuck, crossed, running_next, packet)``."""
    args = (accept, h_next, h, clipped, running, t, t_new, t_end, n_att, n_acc, status, last_nonfinite, new_ok,
            next_idx)
    if be.name == "ext":
        return be.ops.step_end(*args, t_out, int(max_num_steps), [int(v) for v in codes])
    G = t.shape[0]
    kinds = [torch.bool, F64, F64, torch.bool, torch.bool, F64, F64, F64, torch.int64, torch.int64, torch.int8,
             torch.bool, torch.bool, torch.int64]
    cd = torch.tensor([int(v) for v in codes], dtype=torch.int8, device=t.device)
    return be.ops.step_end(*[_rows(x, G, k) for x, k in zip(args, kinds)], t_out.contiguous(), int(max_num_steps), cd)


# --- the reference ----------------------------------------------------------------------------------------------------

REF = TorchStepOps()


def ref_rk_combine(tab, i: int | None, y, K, h) -> torch.Tensor:
    return REF.rk_combine(y, list(K), h, tab.b if i is None else tab.a[i][:i])


def ref_finish_control(tab, y, K, h, rtol, atol, norm, cfg, h_ctl, prev_ratio, running, ratio_floor=None):
    return REF.finish_control(tab, y, list(K), h, rtol, atol, norm, cfg, h_ctl, prev_ratio, running,
                              ratio_floor=ratio_floor)


def ref_interpolate(tab, y, K, h, theta) -> torch.Tensor:
    return REF.interpolate(tab, y, list(K), h, theta)


def ref_adjoint_weights(h, accept, b) -> torch.Tensor:
    return REF.adjoint_weights(h, accept, b)


def ref_step_begin(*args):
    """The reference's plan, in the ops' output order ``(h_ctl, clipped, t_new, h_state, t_stage, t_end_stage)``."""
    p = REF.step_begin(*args)
    return p.h_ctl, p.clipped, p.t_new, p.h_state, p.t_stage, p.t_end_stage


def ref_step_end(*args):
    """The reference's ``StepEnd`` without ``jumped`` (no ``jump_t`` here), in the ops' output order."""
    end = REF.step_end(*args)
    assert end.jumped is None
    return tuple(end)[:10]
