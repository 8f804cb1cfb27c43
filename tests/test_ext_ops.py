"""The compiled extension ``fastnode._C`` (the ``ext`` backend) against the torch reference, op by op and whole solves.

Fresh outputs are poisoned: ``torch.use_deterministic_algorithms`` makes every ``empty`` (the extension's
``at::empty_like`` included) fill floating memory with NaN, so an element an op forgets to write fails the test.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from fastnode import last_stats, odeint, odeint_adjoint
from fastnode.backends import ext_ops, get_backend
from fastnode.backends.torch_ops import ControllerConfig, RMSNorm, TorchStepOps
from fastnode.solvers import get_solver

F32, F64 = torch.float32, torch.float64
ADAPTIVE = ("dopri5", "tsit5", "bosh3", "dopri8", "fehlberg2", "adaptive_heun")
SHAPES = [(7, 63), (1, 1), (1, 200), (5, 1), (3, 40000)]  # the last spans several column chunks

needs_ext = pytest.mark.skipif(not ext_ops.available(), reason="fastnode._C is not built (FASTNODE_SKIP_EXT=1)")
pytestmark = needs_ext


def test_extension_is_built():
    # A build that silently failed would skip every test below: make that a failure unless skipping was asked for.
    if os.environ.get("FASTNODE_SKIP_EXT", "0") == "1":
        pytest.skip("FASTNODE_SKIP_EXT=1")
    assert ext_ops.available()
    assert get_backend("auto", torch.device("cpu")).name == "ext"


@pytest.fixture(autouse=True)
def poison_fresh_memory():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(prev)


def _stages(S, G, N, dtype, contiguous, gen):
    K = []
    for _ in range(S):
        if contiguous:
            K.append(torch.randn(G, N, dtype=dtype, generator=gen))
        else:
            # A transposed view: same values, non-unit column stride.
            K.append(torch.randn(N, G, dtype=dtype, generator=gen).t())
    return K


def _tol(dtype):
    # Both sides round each product and sum once in the same order; only the compiler's use of fused
    # multiply-adds can differ: a few ulps of the result's magnitude.
    return {"rtol": 8 * torch.finfo(dtype).eps, "atol": 8 * torch.finfo(dtype).eps}


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("G, N", SHAPES[:4], ids=lambda v: str(v))
def test_stage_input_and_solution(method, dtype, contiguous, G, N):
    tab = get_solver(method).tableau
    gen = torch.Generator().manual_seed(G * 1000 + N)
    S = tab.num_stages
    y = torch.randn(G, N, dtype=dtype, generator=gen)
    K = _stages(S, G, N, dtype, contiguous, gen)
    h = torch.rand(G, dtype=dtype, generator=gen) + 0.1
    ref, ext = TorchStepOps(), ext_ops.ExtStepOps()
    for i in range(1, S):
        _close_sum(ext.stage_input(tab, i, y, K, h), ref.stage_input(tab, i, y, K, h), y, K, h, tab.a[i])
    _close_sum(ext.solution(tab, y, K, h), ref.solution(tab, y, K, h), y, K, h, tab.b)


def _close_sum(got, ref, y, K, h, w):
    """Both sides sum the same terms in the same order; FMA contraction may differ. The meaningful bound for a
    sum of S rounded terms is a few (S + 2) ulps of the terms' magnitude |y| + h * sum |w_j k_j|, not of the
    result (tableaus like dopri8's cancel large weights)."""
    assert not bool(torch.isnan(got).any())
    mag = y.abs() + h.abs().unsqueeze(1) * sum(abs(wj) * k.abs() for wj, k in zip(w, K))
    bound = 2 * (len(w) + 2) * torch.finfo(y.dtype).eps * mag
    assert bool(((got - ref).abs() <= bound).all()), float(((got - ref).abs() / bound).max())


def _finish_args(tab, G, N, dtype, gen, contiguous=True, tol_kind="scalar"):
    S = tab.num_stages
    y = torch.randn(G, N, dtype=dtype, generator=gen)
    K = _stages(S, G, N, dtype, contiguous, gen)
    h = (torch.rand(G, dtype=F64, generator=gen) * 0.3 + 1e-3)
    if tol_kind == "scalar":
        rtol, atol = 1e-3, 1e-5
    elif tol_kind == "row":
        rtol = torch.rand(1, N, dtype=dtype, generator=gen) * 1e-3
        atol = torch.rand(1, N, dtype=dtype, generator=gen) * 1e-5 + 1e-7
    else:
        rtol = torch.rand(G, N, dtype=dtype, generator=gen) * 1e-3
        atol = torch.full((G, N), 1e-6, dtype=dtype)
    running = torch.rand(G, generator=gen) > 0.2
    prev = torch.rand(G, dtype=F64, generator=gen) + 0.5
    return y, K, h, rtol, atol, running, prev


def _compare_finish(tab, y, K, h, rtol, atol, norm, cfg, running, prev, floor=None):
    ref, ext = TorchStepOps(), ext_ops.ExtStepOps()
    hy = h.to(y.dtype)
    h_ctl = h * running
    a = ref.finish_control(tab, y, K, hy, rtol, atol, norm, cfg, h_ctl, prev, running, ratio_floor=floor)
    b = ext.finish_control(tab, y, K, hy, rtol, atol, norm, cfg, h_ctl, prev, running, ratio_floor=floor)
    names = ("y_new", "ratio", "ok", "accept", "h_next", "prev_ratio")
    for name, x, z in zip(names, a, b):
        assert x.shape == z.shape and x.dtype == z.dtype, name
    torch.testing.assert_close(b[0], a[0], **_tol(y.dtype), equal_nan=True)
    # The ratio: the reference sums squares in the state dtype, the extension in float64.
    rt = 1e-5 if y.dtype == F32 else 1e-12
    torch.testing.assert_close(b[1], a[1], rtol=rt, atol=0.0, equal_nan=True)
    assert torch.equal(b[2], a[2])
    # Decisions: equal unless a ratio sits within rounding of 1 (none do at these random inputs).
    assert not bool(((a[1] - 1).abs() < 1e-4).any())
    assert torch.equal(b[3], a[3])
    torch.testing.assert_close(b[4], a[4], rtol=rt, atol=0.0)
    torch.testing.assert_close(b[5], a[5], rtol=rt, atol=0.0)
    return a, b


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("G, N", SHAPES, ids=lambda v: str(v))
def test_finish_control_matches_reference(method, dtype, G, N):
    tab = get_solver(method).tableau
    gen = torch.Generator().manual_seed(G + 7 * N)
    y, K, h, rtol, atol, running, prev = _finish_args(tab, G, N, dtype, gen, contiguous=(G * N) % 2 == 0)
    cfg = ControllerConfig(order=tab.order)
    _compare_finish(tab, y, K, h, rtol, atol, RMSNorm(), cfg, running, prev)


@pytest.mark.parametrize("tol_kind", ["scalar", "row", "full"])
@pytest.mark.parametrize("controller", ["i", "pi"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_finish_control_tolerances_segments_controllers(tol_kind, controller, dtype):
    tab = get_solver("dopri5").tableau
    G, N = 6, 50
    gen = torch.Generator().manual_seed(3)
    y, K, h, rtol, atol, running, prev = _finish_args(tab, G, N, dtype, gen, tol_kind=tol_kind)
    cfg = ControllerConfig(order=tab.order, kind=controller, safety=0.8, ifactor=5.0, dfactor=0.3,
                           min_step=2e-3, max_step=0.25)
    norm = RMSNorm([(0, 10), (10, 11), (11, 50)])
    floor = torch.rand(G, dtype=F64, generator=gen) * 1.5
    _compare_finish(tab, y, K, h, rtol, atol, norm, cfg, running, prev, floor=floor)


@pytest.mark.parametrize("bad", ["nan_stage", "inf_last", "nan_y"])
def test_finish_control_non_finite_rows(bad):
    tab = get_solver("dopri5").tableau
    G, N = 5, 33
    gen = torch.Generator().manual_seed(11)
    y, K, h, rtol, atol, running, prev = _finish_args(tab, G, N, F64, gen)
    running[:] = True
    if bad == "nan_stage":
        K[2][1, 7] = math.nan
    elif bad == "inf_last":
        K[-1][1, 0] = math.inf
    else:
        y[1, 32] = math.nan
    cfg = ControllerConfig(order=tab.order)
    ref, ext = TorchStepOps(), ext_ops.ExtStepOps()
    hy = h.to(y.dtype)
    a = ref.finish_control(tab, y, K, hy, rtol, atol, RMSNorm(), cfg, h, prev, running)
    b = ext.finish_control(tab, y, K, hy, rtol, atol, RMSNorm(), cfg, h, prev, running)
    assert not bool(b[2][1]) and bool(b[2][[0, 2, 3, 4]].all())
    assert math.isinf(b[1][1].item()) and not bool(b[3][1])
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    torch.testing.assert_close(b[4], a[4], rtol=1e-12, atol=0.0)
    # Rejected after a non-finite step: the step shrinks by dfactor.
    assert b[4][1].item() == pytest.approx(h[1].item() * cfg.dfactor, rel=1e-15)


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("G, N", SHAPES[:4], ids=lambda v: str(v))
def test_interpolate_matches_reference(method, dtype, G, N):
    tab = get_solver(method).tableau
    gen = torch.Generator().manual_seed(5 * G + N)
    y = torch.randn(G, N, dtype=dtype, generator=gen)
    K = _stages(tab.num_stages, G, N, dtype, False, gen)
    h = torch.rand(G, dtype=dtype, generator=gen) + 0.1
    ref, ext = TorchStepOps(), ext_ops.ExtStepOps()
    for theta in (torch.zeros(G, dtype=F64), torch.rand(G, dtype=F64, generator=gen), torch.ones(G, dtype=F64)):
        torch.testing.assert_close(ext.interpolate(tab, y, K, h, theta), ref.interpolate(tab, y, K, h, theta),
                                   rtol=32 * torch.finfo(dtype).eps, atol=32 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_adjoint_weights(dtype):
    h = torch.tensor([0.5, 0.25, 1e-3, 2.0], dtype=dtype)
    accept = torch.tensor([True, False, True, False])
    b = get_solver("dopri5").tableau.b
    w = ext_ops.ExtStepOps().adjoint_weights(h, accept, b)
    expect = torch.tensor(b, dtype=dtype).unsqueeze(1) * torch.where(accept, h, 0.0).unsqueeze(0)
    assert w.shape == (len(b), 4) and torch.equal(w, expect)


def test_opcheck_every_op():
    gen = torch.Generator().manual_seed(0)
    G, N = 3, 17
    y = torch.randn(G, N, dtype=F64, generator=gen)
    K = [torch.randn(G, N, dtype=F64, generator=gen) for _ in range(7)]
    h = torch.rand(G, dtype=F64, generator=gen)
    tab = get_solver("dopri5").tableau
    ops = torch.ops.fastnode
    running = torch.tensor([True, True, False])
    ctrl = ext_ops.ctrl_values(ControllerConfig(order=5))
    cases = [
        (ops.rk_combine.default, (y, K[:3], h, [0.1, 0.0, 0.3])),
        (ops.finish_control.default, (y, K, h, list(tab.b), list(tab.e), None, 1e-3, None, 1e-6, [0, 5, 5, N], h,
                                      torch.ones(G, dtype=F64), running, None, ctrl)),
        (ops.finish_control.default, (y, K, h, list(tab.b), list(tab.e), torch.full((1, N), 1e-3, dtype=F64), 0.0,
                                      torch.full((G, N), 1e-6, dtype=F64), 0.0, [0, N], h,
                                      torch.ones(G, dtype=F64), running, torch.rand(G, dtype=F64), ctrl)),
        (ops.interpolate.default, (y, K, h, torch.rand(G, dtype=F64), [float(v) for r in tab.dense for v in r],
                                   len(tab.dense[0]))),
        (ops.adjoint_weights.default, (h, running, list(tab.b))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compile_sees_the_ops():
    # The fake implementations let torch.compile trace the ops into one graph (no graph breaks).
    y = torch.randn(4, 9, dtype=F64)
    K = [torch.randn(4, 9, dtype=F64) for _ in range(2)]
    h = torch.rand(4, dtype=F64)

    def fn(y, k0, k1, h):
        return torch.ops.fastnode.rk_combine(y, [k0, k1], h, [0.5, 0.25]) * 2

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(y, *K, h), fn(y, *K, h))


def test_op_errors_name_the_argument():
    y = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="stage 0 has shape"):
        torch.ops.fastnode.rk_combine(y, [torch.randn(3, 5)], torch.ones(3), [1.0])
    with pytest.raises(RuntimeError, match="h must be"):
        torch.ops.fastnode.rk_combine(y, [torch.randn(3, 4)], torch.ones(2), [1.0])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.fastnode.rk_combine(y.half(), [], torch.ones(3).half(), [])


# --- whole solves ------------------------------------------------------------------------------------------------

def _field(t, y):
    """A nonlinear, time-dependent field that works with a 0-d t (shared) and a [B] t (per-sample)."""
    tt = t.reshape(-1, 1) if t.dim() else t
    return torch.cos(3 * tt) * y - 0.3 * y**3 / (1 + y**2) + 0.1 * y.roll(1, dims=1)


def _solve_pair(method, per_sample, dtype, B=5, tuple_state=False):
    gen = torch.Generator().manual_seed(B)
    y0 = torch.randn(B, 3, dtype=dtype, generator=gen)
    if tuple_state:
        y0 = (y0[:, :1].clone(), y0[:, 1:].clone())
        f = lambda t, y: _split(_field(t, torch.cat(y, 1)))
    else:
        f = _field
    t = torch.linspace(0, 1, 6, dtype=dtype)
    tol = {"rtol": 1e-6, "atol": 1e-8} if dtype == F64 else {"rtol": 1e-4, "atol": 1e-6}
    out = []
    for backend in ("torch", "ext"):
        ys = odeint(f, y0, t, method=method, options={"per_sample": per_sample, "backend": backend}, **tol)
        out.append((ys, last_stats()))
    return out


def _split(y):
    return y[:, :1], y[:, 1:]


def _same_steps(sa, sb):
    assert sb.backend == "ext" and sa.backend == "torch"
    assert sa.nfe == sb.nfe
    for name in ("n_accepted", "n_rejected"):
        x, z = getattr(sa, name), getattr(sb, name)
        assert (torch.equal(x, z) if isinstance(x, torch.Tensor) else x == z), name


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_whole_solve_same_steps_and_results(method, per_sample, dtype):
    (a, sa), (b, sb) = _solve_pair(method, per_sample, dtype)
    if dtype == F32:
        # In float32 the error estimate of a small step is rounding noise (sum e_j k_j cancels to a few ulps of
        # k), so any difference in rounding (fused multiply-adds, a float64 norm accumulator) changes that
        # step's ratio by percents and the step sequence can part. The test is then the low-precision rule:
        # the extension's error against the float64 solve is within 2x the reference backend's own error.
        (ref, _), _ = _solve_pair(method, per_sample, F64)
        err_a = (a.double() - ref).abs().max().item()
        err_b = (b.double() - ref).abs().max().item()
        assert err_b <= 2 * err_a + 1e-6, (err_a, err_b)
        assert sb.backend == "ext" and abs(sa.nfe - sb.nfe) <= max(6, 0.1 * sa.nfe)
        return
    _same_steps(sa, sb)
    eps = torch.finfo(dtype).eps
    # Rounding differences (a few ulps per op) accumulate over the steps: bound them by steps x ulps.
    steps = int(sa.n_accepted.max()) if per_sample else sa.n_accepted
    torch.testing.assert_close(b, a, rtol=64 * eps * max(steps, 1), atol=64 * eps * max(steps, 1))


def test_whole_solve_tuple_state_mixed_norm():
    (a, sa), (b, sb) = _solve_pair("dopri5", False, F64, tuple_state=True)
    _same_steps(sa, sb)
    for x, z in zip(a, b):
        torch.testing.assert_close(z, x, rtol=1e-13, atol=1e-14)


def test_whole_solve_pi_controller_tensor_tolerance_and_stiff_rejections():
    # van der Pol at mu 5 forces rejections; PI control and a per-component tolerance go through the fused op.
    def vdp(t, y):
        return torch.stack([y[:, 1], 5.0 * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], dim=1)

    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.5, -1.0]], dtype=F64)
    t = torch.linspace(0, 6, 4, dtype=F64)
    atol = torch.tensor([1e-8, 1e-6], dtype=F64)
    res = []
    for backend in ("torch", "ext"):
        for ps in (False, True):
            ys = odeint(vdp, y0, t, rtol=1e-6, atol=atol,
                        options={"backend": backend, "controller": "pi", "per_sample": ps})
            res.append((ys, last_stats()))
    for i in (0, 1):
        (a, sa), (b, sb) = res[i], res[i + 2]
        _same_steps(sa, sb)
        assert int(torch.as_tensor(sa.n_rejected).sum()) > 0
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("norm", ["default", "seminorm"])
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
def test_adjoint_same_steps_and_gradients(per_sample, norm, method):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y):
            return self.net(y)

    func = Field()
    y0 = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([0.0, 0.4, 1.1, 1.5], dtype=F64)
    grads, stats = [], []
    for backend in ("torch", "ext"):
        y = y0.clone().requires_grad_(True)
        opts = {"backend": backend, "per_sample": per_sample}
        ys = odeint_adjoint(func, y, t, rtol=1e-9, atol=1e-11, method=method, options=opts,
                            adjoint_options={**opts, "norm": norm})
        st = last_stats()
        (ys * torch.arange(1, 4, dtype=F64)).sum().backward()
        grads.append([y.grad.clone()] + [p.grad.clone() for p in func.parameters()])
        for p in func.parameters():
            p.grad = None
        stats.append(st)
    sa, sb = stats
    _same_steps(sa, sb)
    assert sb.backward.backend == "ext" and sa.backward.backend == "torch"
    _same_steps(sa.backward, sb.backward)
    for ga, gb in zip(*grads):
        torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-12)


def test_adjoint_ext_gradients_match_backprop_reference():
    # The ext adjoint vs backpropagation through the torch reference solver at a tight tolerance.
    torch.manual_seed(1)
    func = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    f = lambda t, y: func(y)
    y0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    params = tuple(func.parameters())
    ys = odeint_adjoint(f, y0, t, rtol=1e-11, atol=1e-12, options={"backend": "ext"}, adjoint_params=params)
    assert last_stats().backend == "ext"
    g_adj = torch.autograd.grad(ys.square().sum(), (y0, *params))
    ys_ref = odeint(f, y0, t, rtol=1e-11, atol=1e-12, method="dopri8", options={"backend": "torch"})
    g_ref = torch.autograd.grad(ys_ref.square().sum(), (y0, *params))
    for a, b in zip(g_adj, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


# --- selection and fallbacks ---------------------------------------------------------------------------------------

def test_backprop_through_the_solver_runs_on_torch_under_auto():
    y0 = torch.ones(2, 3, dtype=F64, requires_grad=True)
    ys = odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=F64), options={"backend": "auto"})
    assert last_stats().backend == "torch"
    ys.sum().backward()
    torch.testing.assert_close(y0.grad, torch.full_like(y0, 1 + math.exp(-1)), rtol=1e-6, atol=0)
    with torch.no_grad():
        odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=F64), options={"backend": "auto"})
    assert last_stats().backend == "ext"


def test_forced_ext_refuses_to_record_a_graph():
    lin = torch.nn.Linear(3, 3).double()
    with pytest.raises(ValueError, match=r"backend'\]='ext' computes no gradients by backpropagation"):
        odeint(lambda t, y: lin(y), torch.ones(2, 3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
               options={"backend": "ext"})
    with pytest.raises(ValueError, match=r"backend'\]='ext' computes no gradients"):
        odeint(lambda t, y: lin(y), torch.ones(2, 3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
               method="rk4", options={"backend": "ext", "step_size": 0.25})


def test_user_norm_half_precision_and_float32_time_fall_back_per_op():
    y0 = torch.randn(4, 3, dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    f = lambda t, y: -y + 0.1 * y.square()
    for opts in ({"norm": lambda e: e.abs().max()}, {"dtype": torch.float32}):
        a = odeint(f, y0, t, options={**opts, "backend": "torch"})
        na = last_stats().nfe
        b = odeint(f, y0, t, options={**opts, "backend": "ext"})
        assert last_stats().backend == "ext" and last_stats().nfe == na
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    yh = odeint(f, y0.to(torch.bfloat16), t, rtol=1e-2, atol=1e-3, options={"backend": "ext"})
    yr = odeint(f, y0.to(torch.bfloat16), t, rtol=1e-2, atol=1e-3, options={"backend": "torch"})
    assert torch.equal(yh, yr)


def test_events_and_fixed_grid_on_ext():
    y0 = torch.tensor([[1.0], [2.0]], dtype=F64)
    ev = lambda t, y: y[:, 0] - 0.5
    for backend in ("torch", "ext"):
        et, _sol = odeint(lambda t, y: -y, y0, torch.tensor([0.0], dtype=F64), event_fn=ev, rtol=1e-10, atol=1e-12,
                         options={"backend": backend, "per_sample": True})
        torch.testing.assert_close(et, torch.log(y0[:, 0] / 0.5), rtol=1e-9, atol=0)
    with torch.no_grad():
        a = odeint(lambda t, y: -y, y0, torch.linspace(0, 1, 5, dtype=F64), method="rk4",
                   options={"step_size": 0.1, "backend": "torch"})
        b = odeint(lambda t, y: -y, y0, torch.linspace(0, 1, 5, dtype=F64), method="rk4",
                   options={"step_size": 0.1, "backend": "ext"})
    assert last_stats().backend == "ext"
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


def test_threads_do_not_change_results():
    # The column-chunk split (several threads on a large shared-mode row) must not change any value.
    y0 = torch.randn(1, 70000, dtype=F64)
    t = torch.tensor([0.0, 0.5], dtype=F64)
    f = lambda t, y: torch.sin(y) - 0.3 * y
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = odeint(f, y0, t, options={"backend": "ext"})
        torch.set_num_threads(max(2, n))
        b = odeint(f, y0, t, options={"backend": "ext"})
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b)


# --- the loop's per-step set-up and bookkeeping ----------------------------------------------------------------------

def _book_inputs(G, T, gen):
    t_out = torch.sort(torch.rand(G, T, dtype=F64, generator=gen) * 3, dim=1).values
    t_out[:, 0] = 0.0
    t = t_out[:, 0] + torch.rand(G, dtype=F64, generator=gen) * t_out[:, -1] * 0.8
    h = torch.rand(G, dtype=F64, generator=gen) * 0.7
    h[0] = math.inf if G > 2 else h[0]  # a step grown without bound
    running = torch.rand(G, generator=gen) > 0.2
    return t_out, t, h, running


@pytest.mark.parametrize("G, T", [(1, 2), (1, 9), (7, 5), (33, 1)], ids=lambda v: str(v))
@pytest.mark.parametrize("to_outputs", [False, True])
@pytest.mark.parametrize("sign, sdt", [(1.0, F64), (-1.0, F32)], ids=["fwd-f64", "rev-f32"])
def test_step_begin_matches_reference(G, T, to_outputs, sign, sdt):
    gen = torch.Generator().manual_seed(G * 10 + T)
    t_out, t, h, running = _book_inputs(G, T, gen)
    c = get_solver("dopri5").tableau.c
    squeeze = G == 1
    args = (t, h, running, t_out, t_out[:, -1], to_outputs, c, sign, sdt, squeeze)
    a = TorchStepOps().step_begin(*args)
    b = ext_ops.ExtStepOps().step_begin(*args)
    for x, z in zip(a, b):
        assert x.shape == z.shape and x.dtype == z.dtype
        # Equal, up to whether a CPU's addcmul fuses the multiply-add (1 ulp of a stage time).
        torch.testing.assert_close(z, x, rtol=2 * torch.finfo(x.dtype).eps if x.is_floating_point() else 0, atol=0,
                                   equal_nan=True)


@pytest.mark.parametrize("G, T", [(1, 2), (7, 5), (40, 3)], ids=lambda v: str(v))
def test_step_end_matches_reference(G, T):
    gen = torch.Generator().manual_seed(G + T)
    t_out, t, h, running = _book_inputs(G, T, gen)
    accept = torch.rand(G, generator=gen) > 0.3
    h_next = torch.rand(G, dtype=F64, generator=gen) * 0.5
    h_next[-1] = 0.0  # a rejected step that cannot move t: underflow (or non-finite)
    clipped = torch.rand(G, generator=gen) > 0.5
    t_new = t + torch.rand(G, dtype=F64, generator=gen)
    n_att = torch.randint(0, 10, (G,), generator=gen)
    n_acc = torch.minimum(n_att, torch.randint(0, 10, (G,), generator=gen))
    status = torch.zeros(G, dtype=torch.int8)
    last_nf = torch.rand(G, generator=gen) > 0.5
    new_ok = torch.rand(G, generator=gen) > 0.3
    next_idx = torch.ones(G, dtype=torch.int64)
    codes = (3, 2, 4, 1)
    args = (accept, h_next, h, clipped, running, t, t_new, t_out[:, -1], n_att, n_acc, status, last_nf, new_ok,
            next_idx, t_out, 8, codes)
    a = TorchStepOps().step_end(*args)
    b = ext_ops.ExtStepOps().step_end(*args)
    for x, z in zip(a, b):
        assert x.shape == z.shape and x.dtype == z.dtype
        assert torch.equal(torch.nan_to_num(x), torch.nan_to_num(z))


def test_opcheck_bookkeeping_ops():
    gen = torch.Generator().manual_seed(2)
    t_out, t, h, running = _book_inputs(5, 4, gen)
    c = list(get_solver("tsit5").tableau.c)
    torch.library.opcheck(torch.ops.fastnode.step_begin.default,
                          (t, h, running, t_out, t_out[:, -1].contiguous(), True, c, 1.0, F32, False))
    G = 5
    args = (running, h, h, running, running, t, t + 0.1, t_out[:, -1].contiguous(), torch.zeros(G, dtype=torch.int64),
            torch.zeros(G, dtype=torch.int64), torch.zeros(G, dtype=torch.int8), running, running,
            torch.ones(G, dtype=torch.int64), t_out, 100, [3, 2, 4, 1])
    torch.library.opcheck(torch.ops.fastnode.step_end.default, args)


def test_package_runs_without_the_extension_and_says_so_once():
    # A missing or broken build: the package imports, auto falls back to torch, and one warning says why.
    import subprocess
    import sys

    code = (
        "import sys, warnings\n"
        "sys.modules['fastnode._C'] = None  # makes 'from .. import _C' raise ImportError\n"
        "import torch, fastnode\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3):\n"
        "        fastnode.odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]))\n"
        "        assert fastnode.last_stats().backend == 'torch'\n"
        "msgs = [str(x.message) for x in w if 'fastnode._C' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "try:\n"
        "    fastnode.odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), options={'backend': 'ext'})\n"
        "except ValueError as e:\n"
        "    assert \"options['backend']='ext' is not available\" in str(e), e\n"
        "else:\n"
        "    raise SystemExit('forced ext did not raise')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTNODE_SKIP_EXT"}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
