"""Whole solves on the triton backend vs the torch backend, the backend's own packing of the ops' arguments, its
docstring examples, and the GPU-only checks (no host sync, the kernels build for sm_90).

On CPU the kernels run in Triton's interpreter (about a millisecond per kernel op), so the problems are small and
short: a handful of steps each, enough for rejected steps, output times inside steps and per-sample control.
"""

import doctest
import importlib
import math

import pytest
import torch
from torch import nn

import fastnode
from fastnode import kernels, odeint, odeint_adjoint, odeint_event
from fastnode._options import ControllerConfig, RMSNorm
from fastnode.backends.torch_ops import TorchStepOps
from fastnode.solvers import SOLVERS

from tests.ops._calls import SHAPE_IDS, SHAPES, assert_rounding_close, combo_bound, stages, state, steps

from .conftest import COMPILED, field as _field, kernel_devices, y0 as _y0

# The Triton StepOps backend: the one import of it here.
TRITON_STEP_OPS_MODULE = "fastnode.backends.triton_ops"
TritonStepOps = importlib.import_module(TRITON_STEP_OPS_MODULE).TritonStepOps

F64, F32 = torch.float64, torch.float32
# Outputs: the two backends round the same arithmetic differently in a few places (the float64 sum of squares of the
# error norm, exp/log for pow in the controller, FMA on GPUs), so trajectories agree to a few ulp per step.
SOLVE_TOL = {F64: {"rtol": 1e-12, "atol": 1e-13}, F32: {"rtol": 2e-5, "atol": 2e-6}}


def _stats_equal(a, b):
    assert a.nfe == b.nfe
    for name in ("n_accepted", "n_rejected"):
        assert torch.equal(torch.as_tensor(getattr(a, name)), torch.as_tensor(getattr(b, name))), name


def _solve(backend, y0, t, **kw):
    opts = dict(kw.pop("options", {}), backend=backend)
    out = odeint(_field, y0, t, options=opts, **kw)
    return out, fastnode.last_stats()


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("method, per_sample, dtype, rtol", [
    ("dopri5", False, F64, 1e-4), ("dopri5", True, F64, 1e-4), ("dopri5", False, F32, 1e-4),
    ("dopri5", True, F32, 1e-4), ("tsit5", False, F64, 1e-4), ("tsit5", True, F64, 1e-4), ("bosh3", False, F64, 1e-4),
    ("bosh3", True, F64, 1e-4), ("dopri8", True, F64, 1e-6),
])
def test_solve_matches_torch(device, method, per_sample, dtype, rtol):
    """Same accepted/rejected steps and NFE; outputs (interpolated inside steps) equal to rounding."""
    y0 = _y0(dtype, device)
    t = torch.tensor([0.0, 0.13, 0.5], dtype=F64, device=device)
    # A first step far too large: the first attempts are rejected.
    kw = {"method": method, "rtol": rtol, "atol": rtol * 1e-2,
          "options": {"per_sample": per_sample, "first_step": 0.5}}
    with torch.no_grad():
        a, sa = _solve("triton", y0, t, **kw)
        b, sb = _solve("torch", y0, t, **kw)
    assert sa.backend == "triton" and sb.backend == "torch"
    _stats_equal(sa, sb)
    assert int(torch.as_tensor(sa.n_rejected).sum()) > 0, "the problem should exercise rejected steps"
    assert sa.n_host_syncs == sb.n_host_syncs  # the kernels add no host sync
    torch.testing.assert_close(a, b, **SOLVE_TOL[dtype])


@pytest.mark.parametrize("device", kernel_devices())
def test_pi_controller_tensor_tolerance_and_user_norm(device):
    """PI control with a per-component tolerance runs fused; a user norm falls back to torch for the finish only."""
    y0 = _y0(F64, device)
    t = torch.tensor([0.0, 0.4], dtype=F64, device=device)
    atol = torch.tensor([1e-6, 1e-8, 1e-6], dtype=F64, device=device)  # per component, broadcast over the batch
    opts = {"controller": "pi", "per_sample": True}
    a, sa = _solve("triton", y0, t, rtol=1e-4, atol=atol, options=opts)
    b, sb = _solve("torch", y0, t, rtol=1e-4, atol=atol, options=opts)
    _stats_equal(sa, sb)
    torch.testing.assert_close(a, b, **SOLVE_TOL[F64])

    def norm(x):
        return x.abs().max()

    a, sa = _solve("triton", y0, t, rtol=1e-4, atol=1e-6, options={"norm": norm})
    b, sb = _solve("torch", y0, t, rtol=1e-4, atol=1e-6, options={"norm": norm})
    assert sa.backend == "triton"
    _stats_equal(sa, sb)
    torch.testing.assert_close(a, b, **SOLVE_TOL[F64])


class _MLP(nn.Module):
    def __init__(self, n=3, hidden=8):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w1 = nn.Parameter(torch.randn(n, hidden, generator=g, dtype=F64) * 0.5)
        self.w2 = nn.Parameter(torch.randn(hidden, n, generator=g, dtype=F64) * 0.5)

    def forward(self, t, y):
        return torch.tanh(y @ self.w1) @ self.w2 - 0.5 * y


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("method, rtol", [("dopri5", 1e-5), ("tsit5", 1e-5), ("bosh3", 1e-4)])
def test_adjoint_matches_torch(device, per_sample, method, rtol):
    """The adjoint's augmented state [y, a] (and its parameter-error floor) goes through the same kernels."""
    t = torch.tensor([0.0, 0.3, 0.6], dtype=F64, device=device)
    results = {}
    for backend in ("triton", "torch"):
        func = _MLP().to(device)
        y0 = _y0(F64, device, B=5).requires_grad_(True)
        out = odeint_adjoint(func, y0, t, rtol=rtol, atol=rtol * 1e-2, method=method,
                             options={"backend": backend, "per_sample": per_sample})
        out.square().sum().backward()
        st = fastnode.last_stats()
        results[backend] = (out.detach(), y0.grad, [p.grad for p in func.parameters()], st)
    (a, ga, pa, sa), (b, gb, pb, sb) = results["triton"], results["torch"]
    assert sa.backend == "triton" and sa.backward is not None and sa.backward.backend == "triton"
    _stats_equal(sa, sb)
    _stats_equal(sa.backward, sb.backward)
    torch.testing.assert_close(a, b, **SOLVE_TOL[F64])
    torch.testing.assert_close(ga, gb, **SOLVE_TOL[F64])
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, **SOLVE_TOL[F64])


@pytest.mark.parametrize("device", kernel_devices())
def test_adjoint_custom_norm_matches_torch(device):
    """A custom adjoint norm goes through step_error (scaled error out, the norm and controller on torch)."""

    def norm(parts):
        _, y, a, *p = parts
        return torch.stack([x.square().mean().sqrt() for x in (y, a, *p)]).max()

    t = torch.tensor([0.0, 0.4], dtype=F64, device=device)
    results = {}
    for backend in ("triton", "torch"):
        func = _MLP().to(device)
        y0 = _y0(F64, device, B=4).requires_grad_(True)
        out = odeint_adjoint(func, y0, t, rtol=1e-5, atol=1e-7, options={"backend": backend},
                             adjoint_options={"norm": norm, "backend": backend})
        out.square().sum().backward()
        results[backend] = (y0.grad, [p.grad for p in func.parameters()], fastnode.last_stats())
    (ga, pa, sa), (gb, pb, sb) = results["triton"], results["torch"]
    assert sa.backward.backend == "triton"
    _stats_equal(sa.backward, sb.backward)
    torch.testing.assert_close(ga, gb, **SOLVE_TOL[F64])
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, **SOLVE_TOL[F64])


@pytest.mark.parametrize("device", kernel_devices())
def test_event_and_fixed_grid(device):
    """Events interpolate with the stage list they kept; fixed grids use the solution op."""
    y0 = torch.tensor([[1.0], [2.0]], dtype=F64, device=device)
    t0 = torch.tensor(0.0, dtype=F64, device=device)

    def event_fn(t, y):
        return y[..., 0] - 0.5

    got = {}
    for backend in ("triton", "torch"):
        with torch.no_grad():
            got[backend] = odeint_event(lambda t, y: -y, y0, t0, event_fn=event_fn, rtol=1e-6, atol=1e-8,
                                        options={"backend": backend, "per_sample": True})
    torch.testing.assert_close(got["triton"][0], got["torch"][0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got["triton"][1], got["torch"][1], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got["triton"][0].cpu(), torch.log(torch.tensor([2.0, 4.0], dtype=F64)), rtol=1e-5,
                               atol=0)

    t = torch.linspace(0.0, 1.0, 5, dtype=F64, device=device)
    y0 = _y0(F64, device)
    a = odeint(_field, y0, t, method="rk4", options={"backend": "triton", "step_size": 0.125})
    assert fastnode.last_stats().backend == "triton"
    b = odeint(_field, y0, t, method="rk4", options={"backend": "torch", "step_size": 0.125})
    torch.testing.assert_close(a, b, **SOLVE_TOL[F64])


@pytest.mark.parametrize("device", kernel_devices())
def test_float16_state_falls_back_inside_the_solve(device):
    """A state dtype the kernels do not take runs on the torch reference, op by op, under the triton backend."""
    y0 = _y0(torch.float16, device).float().half()
    t = torch.tensor([0.0, 0.2], dtype=F64, device=device)
    a, sa = _solve("triton", y0, t, rtol=1e-2, atol=1e-3)
    b, sb = _solve("torch", y0, t, rtol=1e-2, atol=1e-3)
    assert sa.backend == "triton"
    _stats_equal(sa, sb)
    assert torch.equal(a, b)






@pytest.mark.skipif(not kernels.INTERPRETED, reason="the examples use CPU tensors (Triton's interpreter)")
@pytest.mark.parametrize("name", ["fastnode.kernels", TRITON_STEP_OPS_MODULE])
def test_docstring_examples(name):
    res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0


@pytest.mark.skipif(not kernels.INTERPRETED, reason="the examples use CPU tensors (Triton's interpreter)")
@pytest.mark.parametrize("name", ["rk_combine", "interpolate"])
def test_op_docstring_examples(name):
    """The registered ops' examples (doctest does not find docstrings on torch.library op objects)."""
    op = getattr(kernels, name)
    test = doctest.DocTestParser().get_doctest(op.__doc__, {"torch": torch, name: op}, name, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    res = runner.run(test)
    assert res.attempted > 0 and res.failed == 0






@pytest.mark.gpu
@COMPILED
def test_ops_make_no_host_sync_on_cuda():
    """After the first call (which uploads the tableau's constants once), a step's ops never block the host."""
    tab = SOLVERS["dopri5"].tableau
    G, N = 64, 257
    y = torch.randn(G, N, device="cuda")
    h = torch.full((G,), 0.01, device="cuda")
    h_ctl = h.double()
    prev = torch.ones(G, dtype=F64, device="cuda")
    running = torch.ones(G, dtype=torch.bool, device="cuda")
    ops = TritonStepOps()

    def step():
        K = ops.new_stages(tab, y)
        K = ops.set_stage(K, 0, y)
        for i in range(1, tab.num_stages):
            K = ops.set_stage(K, i, ops.rk_combine(y, K, h, tab.a[i]))  # the stored row: cached constants
        out = ops.finish_control(tab, y, K, h, 1e-5, 1e-7, RMSNorm(), ControllerConfig(order=5), h_ctl, prev, running)
        return out, ops.interpolate(tab, y, K, h, torch.full((G,), 0.5, dtype=F64, device="cuda"))

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(float(step()[0][1].sum()))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_small_tiles_many_programs(device, dtype, monkeypatch):
    """Tiles far smaller than the state: many programs with masked row and column tails, a finish that reduces
    five column tiles per row two at a time (the layouts large states get on a GPU), all vs the torch backend."""
    from fastnode.kernels import _launch

    for name, value in (("_INTERP_TILE", 32), ("_INTERP_MAX_COLS", 16), ("_GPU_TILE", 32), ("_GPU_MAX_COLS", 16),
                        ("_INTERP_CBLOCK", 2), ("_GPU_CBLOCK", 2)):
        monkeypatch.setattr(_launch, name, value)
    tab = SOLVERS["dopri5"].tableau
    G, N = 7, 75  # 4 row blocks of 2 (last one half masked) x 5 column blocks of 16 (last one masked)
    assert _launch.tiles(G, N, torch.device(device))[:2] == (2, 16)
    y, K, h = state(G, N, dtype, device), stages(tab.num_stages, G, N, dtype, device), steps(G, dtype, device)
    ops, ref = TritonStepOps(), TorchStepOps()
    buf = ops.new_stages(tab, y)
    for i in range(tab.num_stages):
        buf = ops.set_stage(buf, i, K[i])
    i = tab.num_stages - 2
    assert_rounding_close(ops.rk_combine(y, buf, h, tab.a[i][:i]), ref.rk_combine(y, list(K), h, tab.a[i][:i]),
                          combo_bound(y, K[:i], h, tab.a[i]))
    theta = torch.linspace(0.0, 1.0, G, dtype=F64, device=device)
    assert_rounding_close(ops.interpolate(tab, y, buf, h, theta), ref.interpolate(tab, y, list(K), h, theta),
                          combo_bound(y, K, h, [sum(abs(v) for v in row) for row in tab.dense]))
    h_ctl = torch.logspace(-3, -1, G, dtype=F64, device=device)
    hy = h_ctl.to(dtype)
    K[tab.num_stages - 1, 3, 70] = math.inf  # in the last column tile: only group 3 fails
    buf[tab.num_stages - 1, 3, 70] = math.inf
    args = (1e-3, 1e-4, RMSNorm([(0, 40), (40, 75)]), ControllerConfig(order=5), h_ctl,
            torch.ones(G, dtype=F64, device=device), torch.ones(G, dtype=torch.bool, device=device))
    got = ops.finish_control(tab, y, buf, hy, *args)
    exp = ref.finish_control(tab, y, list(K), hy, *args)
    assert_rounding_close(got[0], exp[0], combo_bound(y, K, hy, tab.b))
    assert got[2].tolist() == exp[2].tolist() == [True, True, True, False, True, True, True]
    rtol = 16 * torch.finfo(dtype).eps
    torch.testing.assert_close(got[1], exp[1].double(), rtol=rtol, atol=0.0)
    assert torch.equal(got[3], exp[3])
    torch.testing.assert_close(got[4], exp[4], rtol=rtol + 1e-14, atol=0.0)


# --- the backend's packing of the ops' arguments ---------------------------------------------------------------------

@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_strided_state_is_packed_once(device, dtype, contiguous, shape):
    """Strided y and stages: the stage buffer is contiguous, a strided state is copied once per step (not once per
    stage), and the stage inputs and the solution still match the reference."""
    tab = SOLVERS["dopri5"].tableau
    G, N = shape
    S = tab.num_stages
    y = state(G, N, dtype, device, contiguous)
    K = [state(G, N, dtype, device, contiguous, seed=10 + j) for j in range(S)]
    h = steps(G, dtype, device)
    ops, ref = TritonStepOps(), TorchStepOps()
    buf = ops.new_stages(tab, y)
    for i in range(S):
        buf = ops.set_stage(buf, i, K[i])
    assert buf.is_contiguous() and ops._contiguous(y).is_contiguous()
    assert ops._contiguous(y) is ops._contiguous(y)
    i = S - 2  # the widest stage row (five nonzero weights)
    assert_rounding_close(ops.rk_combine(y, buf, h, tab.a[i][:i]), ref.rk_combine(y, K, h, tab.a[i][:i]),
                          combo_bound(y, K[:i], h, tab.a[i]))
    assert_rounding_close(ops.rk_combine(y, buf, h, tab.b), ref.rk_combine(y, K, h, tab.b), combo_bound(y, K, h, tab.b))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_interpolate_takes_a_stage_list(device, dtype, contiguous, shape):
    """Events keep a step's stages as a list: the backend stacks them; one theta ([1]) broadcasts."""
    tab = SOLVERS["dopri5"].tableau
    G, N = shape
    y = state(G, N, dtype, device, contiguous)
    K = [state(G, N, dtype, device, contiguous, seed=20 + j) for j in range(tab.num_stages)]
    h = steps(G, dtype, device)
    bound = combo_bound(y, K, h, [sum(abs(v) for v in row) for row in tab.dense])
    for theta in (torch.linspace(0, 1, G, dtype=F64, device=device), torch.tensor([0.37], dtype=F64, device=device)):
        out = TritonStepOps().interpolate(tab, y, K, h, theta)
        assert_rounding_close(out, TorchStepOps().interpolate(tab, y, K, h, theta), bound)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_user_norm_finish_through_step_error(device, dtype, shape):
    """With a user norm the backend's finish is step_error, the norm and the controller on torch: the whole finish
    agrees with the reference's composition."""
    from tests.ops.test_finish_control import _check, _inputs

    tab = SOLVERS["tsit5"].tableau
    G, N = shape
    y, K, h_ctl = _inputs(tab, G, N, dtype, device, contiguous=False, seed=3)
    hy = h_ctl.to(dtype)
    cfg = ControllerConfig(order=tab.order)
    prev = torch.ones(G, dtype=F64, device=device)
    running = torch.ones(G, dtype=torch.bool, device=device)
    atol = torch.full((1, N), 1e-4, dtype=dtype, device=device)
    ops = TritonStepOps()
    buf = ops.new_stages(tab, y)
    for i in range(tab.num_stages):
        buf = ops.set_stage(buf, i, K[i])

    def norm(x):
        return x.abs().amax(dim=1)

    got = ops.finish_control(tab, y, buf, hy, 1e-3, atol, norm, cfg, h_ctl, prev, running)
    ref = TorchStepOps().finish_control(tab, y, list(K), hy, 1e-3, atol, norm, cfg, h_ctl, prev, running)
    _check(got, ref, y, K, hy, tab, dtype)


def test_kernels_compile_for_sm90():
    """Every kernel builds for an H100 (sm_90) with Triton's compiler and ptxas, checked on machines without a GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.compiler", reason="this triton has no ahead-of-time compile API")
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-m", "tests.backends.compile_sm90"], check=False,
                         cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("sm_90 cubin") == 14, res.stdout


def _syncs_of_solve(per_sample, t_end, adjoint):
    from tests.cuda_syncs import count_syncs

    t = torch.tensor([0.0, t_end], dtype=F64, device="cuda")
    if not adjoint:
        y0 = _y0(F64, "cuda", B=16)
        with torch.no_grad():
            _, n = count_syncs(lambda: odeint(_field, y0, t, rtol=1e-8, atol=1e-10,
                                              options={"backend": "triton", "per_sample": per_sample}))
        st = fastnode.last_stats()
        return n, st.n_iterations, st.backend
    func = _MLP().cuda()
    y0 = _y0(F64, "cuda", B=16).requires_grad_(True)
    opts = {"per_sample": per_sample}

    def run():
        odeint_adjoint(func, y0, t, rtol=1e-8, atol=1e-10, options=opts, adjoint_options=opts).sum().backward()

    _, n = count_syncs(run)
    st = fastnode.last_stats()
    return n, st.n_iterations + st.backward.n_iterations, f"{st.backend}/{st.backward.backend}"


@pytest.mark.gpu
@COMPILED
@pytest.mark.parametrize("adjoint", [False, True], ids=["odeint", "adjoint"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_one_host_sync_per_step_on_cuda(per_sample, adjoint):
    """A longer solve makes exactly one more host sync (as torch's sync debug mode sees them) per extra loop
    iteration: the fetch of the step's packet, nothing else; the adjoint's forward and backward alike."""
    _syncs_of_solve(per_sample, 0.5, adjoint)  # first use: compiles, constant uploads
    n1, it1, b1 = _syncs_of_solve(per_sample, 0.5, adjoint)
    n2, it2, b2 = _syncs_of_solve(per_sample, 3.0, adjoint)
    assert b1 == b2 and b1.startswith("triton"), b1
    assert it2 > it1 + 5, (it1, it2)
    assert n2 - n1 == it2 - it1, (n1, n2, it1, it2)


def _autograd_kernel_calls(fn) -> int:
    """How many times ``torch.library.register_autograd``'s Python Autograd kernel runs during ``fn()``."""
    import sys
    import torch._library.autograd as lib_autograd

    calls = 0

    def tracer(frame, event, arg):
        nonlocal calls
        if event == "call" and frame.f_code.co_filename == lib_autograd.__file__:
            calls += 1

    sys.setprofile(tracer)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("device", kernel_devices())
def test_no_grad_solve_skips_the_autograd_kernel(device):
    """A solve that records no graph calls the value ops past their Python Autograd kernel (a few us a call); one
    that records a graph still goes through it and gets the same answer."""
    y0 = _y0(F64, device)
    t = torch.tensor([0.0, 0.3, 0.6], dtype=F64, device=device)
    kw = {"rtol": 1e-5, "atol": 1e-7, "options": {"backend": "triton"}}
    with torch.no_grad():
        ref = odeint(_field, y0, t, **kw)  # warm-up: kernels compiled, constants cached
        assert _autograd_kernel_calls(lambda: odeint(_field, y0, t, **kw)) == 0
    assert fastnode.last_stats().backend == "triton"
    y = y0.clone().requires_grad_(True)
    box = {}
    assert _autograd_kernel_calls(lambda: box.setdefault("out", odeint(_field, y, t, **kw))) > 0
    torch.testing.assert_close(box["out"].detach(), ref, rtol=0, atol=0)
