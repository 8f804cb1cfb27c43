"""finish_control (solution, scaled-error RMS norm, finiteness, accept/reject, next step) vs the reference's
composition, on every backend; each namespace's opcheck."""

import math

import pytest
import torch

from . import _calls as C
from ._calls import (ADAPTIVE, DTYPES, EPS, F32, F64, ControllerConfig, RMSNorm, assert_rounding_close, combo_bound,
                     state, tableau)

OP = "finish_control"
# Relative tolerance of the error ratio: the reference sums the squares in the state dtype, the fast ops in float64,
# so in float32 they differ by the reference's own rounding (a few eps); in float64 by reordering only.
RATIO_RTOL = {F32: 16 * EPS[F32], F64: 64 * EPS[F64]}
# The next step scales with ratio^(-1/order): its relative error is the ratio's over the order, plus pow's.
STEP_RTOL = {dt: RATIO_RTOL[dt] + 64 * EPS[F64] for dt in (F32, F64)}
# The long row spans several column chunks of the CPU op and several column tiles of the Triton one.
GEN_SHAPES = [(7, 63), (1, 1), (1, 200), (5, 1), (3, 40000)]


def _check(got, ref, y, K, hy, tab, dtype):
    """Every output against the reference; returns the fast op's accept flags."""
    names = ("y_new", "ratio", "ok", "accept", "h_next", "prev_ratio")
    for name, x, z in zip(names, got, ref):
        assert x.shape == z.shape and x.device == z.device, name
    y_new, ratio, ok, accept, h_next, prev_out = got
    r_y, r_ratio, r_ok, r_accept, r_h, r_prev = ref
    assert_rounding_close(y_new, r_y, combo_bound(y, K, hy, tab.b))
    torch.testing.assert_close(y_new, r_y, rtol=C.ULPS[dtype] * EPS[dtype], atol=C.ULPS[dtype] * EPS[dtype])
    for flag in (ok, accept):
        assert flag.dtype == torch.bool and int(flag.view(torch.uint8).max()) <= 1, "a flag was never written"
    assert torch.equal(ok, r_ok)
    assert ratio.dtype == F64 and not torch.isnan(ratio).any()
    torch.testing.assert_close(ratio, r_ratio.to(F64), rtol=RATIO_RTOL[dtype], atol=0.0)
    # Accept decisions agree wherever the reference ratio is not within rounding of the threshold 1.
    clear = (r_ratio - 1.0).abs() > 4 * RATIO_RTOL[dtype]
    assert torch.equal(accept[clear], r_accept[clear])
    assert clear.sum() >= len(clear) - 1
    assert h_next.dtype == F64 and prev_out.dtype == F64
    torch.testing.assert_close(h_next, r_h, rtol=STEP_RTOL[dtype], atol=0.0)
    torch.testing.assert_close(prev_out, r_prev, rtol=STEP_RTOL[dtype], atol=0.0)
    return accept


def _run(be, tab, y, K, h_ctl, rtol, atol, norm, cfg, prev, running, floor=None):
    hy = h_ctl.to(y.dtype)
    got = C.finish_control(be, tab, y, K, hy, rtol, atol, norm, cfg, h_ctl, prev, running, floor)
    ref = C.ref_finish_control(tab, y, K, hy, rtol, atol, norm, cfg, h_ctl, prev, running, floor)
    return got, ref, hy


def _inputs(tab, G, N, dtype, device, contiguous=True, seed=0):
    y = state(G, N, dtype, device, contiguous, seed=seed)
    K = torch.stack([state(G, N, dtype, device, contiguous, seed=seed + 10 + j) for j in range(tab.num_stages)])
    # Step sizes spread over two decades so that both accepted and rejected groups occur at these tolerances.
    g = torch.Generator().manual_seed(seed + 3)
    h_ctl = torch.logspace(-3, -1, G, dtype=F64)[torch.randperm(G, generator=g)].to(device)
    return y, K, h_ctl


def _gen_stages(S, G, N, dtype, contiguous, gen, device):
    # Strided: a transposed view (same values, non-unit column stride).
    if contiguous:
        return [torch.randn(G, N, dtype=dtype, generator=gen).to(device) for _ in range(S)]
    return [torch.randn(N, G, dtype=dtype, generator=gen).to(device).t() for _ in range(S)]


def _gen_inputs(tab, G, N, dtype, gen, device, contiguous=True, tol_kind="scalar"):
    y = torch.randn(G, N, dtype=dtype, generator=gen).to(device)
    K = _gen_stages(tab.num_stages, G, N, dtype, contiguous, gen, device)
    h = (torch.rand(G, dtype=F64, generator=gen) * 0.3 + 1e-3).to(device)
    if tol_kind == "scalar":
        rtol, atol = 1e-3, 1e-5
    elif tol_kind == "row":
        rtol = (torch.rand(1, N, dtype=dtype, generator=gen) * 1e-3).to(device)
        atol = (torch.rand(1, N, dtype=dtype, generator=gen) * 1e-5 + 1e-7).to(device)
    else:
        rtol = (torch.rand(G, N, dtype=dtype, generator=gen) * 1e-3).to(device)
        atol = torch.full((G, N), 1e-6, dtype=dtype, device=device)
    running = (torch.rand(G, generator=gen) > 0.2).to(device)
    prev = (torch.rand(G, dtype=F64, generator=gen) + 0.5).to(device)
    return y, K, h, rtol, atol, running, prev


@pytest.mark.parametrize("be", C.backends(OP))
@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G, N", GEN_SHAPES, ids=lambda v: str(v))
def test_every_method_and_shape(be, method, dtype, G, N):
    tab = tableau(method)
    gen = torch.Generator().manual_seed(G + 7 * N)
    y, K, h, rtol, atol, running, prev = _gen_inputs(tab, G, N, dtype, gen, be.device, contiguous=(G * N) % 2 == 0)
    got, ref, hy = _run(be, tab, y, K, h * running, rtol, atol, RMSNorm(), ControllerConfig(order=tab.order), prev,
                        running)
    # Decisions are compared everywhere: no ratio sits within rounding of 1 at these random inputs.
    assert not bool(((ref[1] - 1).abs() < 1e-4).any())
    accept = _check(got, ref, y, K, hy, tab, dtype)
    assert torch.equal(accept, ref[3])


@pytest.mark.parametrize("be", C.backends(OP))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", C.SHAPES, ids=C.SHAPE_IDS)
def test_shapes_dtypes_layouts(be, dtype, contiguous, shape):
    tab = tableau("dopri5")
    G, N = shape
    y, K, h_ctl = _inputs(tab, G, N, dtype, be.device, contiguous)
    prev = torch.ones(G, dtype=F64, device=be.device)
    running = torch.ones(G, dtype=torch.bool, device=be.device)
    got, ref, hy = _run(be, tab, y, K, h_ctl, 1e-3, 1e-4, RMSNorm(), ControllerConfig(order=tab.order), prev, running)
    _check(got, ref, y, K, hy, tab, dtype)


@pytest.mark.parametrize("be", C.backends(OP))
@pytest.mark.parametrize("method", ADAPTIVE)
def test_every_adaptive_tableau(be, method):
    tab = tableau(method)
    G, N = 7, 63
    y, K, h_ctl = _inputs(tab, G, N, F64, be.device)
    prev = torch.ones(G, dtype=F64, device=be.device)
    running = torch.ones(G, dtype=torch.bool, device=be.device)
    got, ref, hy = _run(be, tab, y, K, h_ctl, 1e-3, 1e-4, RMSNorm(), ControllerConfig(order=tab.order), prev, running)
    accept = _check(got, ref, y, K, hy, tab, F64)
    if method == "dopri5":
        assert accept.any() and not accept.all(), "the inputs should exercise both decisions"


@pytest.mark.parametrize("be", C.backends(OP))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["tol-rows", "tol-row", "segments-gap", "pi-floor-minstep", "not-running"])
def test_tolerances_norm_segments_controller(be, dtype, case):
    """Tensor tolerances ([G, N] and [1, N]), norm segments with uncovered columns (max over segments), the PI
    controller with its memory, min/max step, a ratio floor, groups that are not running."""
    device = be.device
    tab = tableau("dopri5")
    G, N = 7, 63
    y, K, h_ctl = _inputs(tab, G, N, dtype, device, seed=5)
    g = torch.Generator().manual_seed(7)
    rtol, atol, norm = 1e-3, 1e-4, RMSNorm()
    cfg = ControllerConfig(order=tab.order)
    prev = torch.ones(G, dtype=F64, device=device)
    running = torch.ones(G, dtype=torch.bool, device=device)
    floor = None
    if case == "tol-rows":
        rtol = (1e-3 * (0.5 + torch.rand(G, N, generator=g, dtype=F64))).to(dtype=dtype, device=device)
    elif case == "tol-row":
        atol = (1e-4 * (0.5 + torch.rand(1, N, generator=g, dtype=F64))).to(dtype=dtype, device=device)
    elif case == "segments-gap":
        norm = RMSNorm([(0, 20), (30, 50), (50, 63)])
    elif case == "pi-floor-minstep":
        cfg = ControllerConfig(order=tab.order, kind="pi", min_step=2e-3, max_step=0.05)
        prev = (0.1 + torch.rand(G, generator=g, dtype=F64)).to(device)
        floor = torch.linspace(0.0, 3.0, G, dtype=F64, device=device)
    elif case == "not-running":
        running = torch.tensor([True, False, True, True, False, True, False], device=device)
        h_ctl = torch.where(running, h_ctl, 0.0)
    got, ref, hy = _run(be, tab, y, K, h_ctl, rtol, atol, norm, cfg, prev, running, floor)
    accept = _check(got, ref, y, K, hy, tab, dtype)
    if case == "not-running":
        assert not accept[~running].any()
        assert torch.equal(got[4][~running], h_ctl[~running])


@pytest.mark.parametrize("be", C.backends(OP))
@pytest.mark.parametrize("tol_kind", ["scalar", "row", "full"])
@pytest.mark.parametrize("controller", ["i", "pi"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tolerances_segments_controllers(be, tol_kind, controller, dtype):
    """Every tolerance kind with both controllers, min/max step, three norm segments and a ratio floor."""
    tab = tableau("dopri5")
    G, N = 6, 50
    gen = torch.Generator().manual_seed(3)
    y, K, h, rtol, atol, running, prev = _gen_inputs(tab, G, N, dtype, gen, be.device, tol_kind=tol_kind)
    cfg = ControllerConfig(order=tab.order, kind=controller, safety=0.8, ifactor=5.0, dfactor=0.3,
                           min_step=2e-3, max_step=0.25)
    norm = RMSNorm([(0, 10), (10, 11), (11, 50)])
    floor = (torch.rand(G, dtype=F64, generator=gen) * 1.5).to(be.device)
    got, ref, hy = _run(be, tab, y, K, h * running, rtol, atol, norm, cfg, prev, running, floor)
    assert not bool(((ref[1] - 1).abs() < 1e-4).any())
    accept = _check(got, ref, y, K, hy, tab, dtype)
    assert torch.equal(accept, ref[3])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
@pytest.mark.parametrize("be", C.backends(OP))
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_groups_are_rejected(be, dtype):
    """inf in the last stage or overflow in y_new: that group alone fails; NaN in a stage with zero weights
    (dopri5's second stage) does not leak into anything."""
    device = be.device
    tab = tableau("dopri5")
    G, N = 7, 63
    S = tab.num_stages
    y, K, h_ctl = _inputs(tab, G, N, dtype, device, seed=9)
    K[S - 1, 1, 62] = math.inf  # last stage (weight 0 in b, nonzero in e): not ok
    assert tab.b[1] == 0.0 and tab.e[1] == 0.0
    K[1, 3, 0] = math.nan
    y[5, 30] = torch.finfo(dtype).max  # y_new overflows
    K[0, 5, 30] = torch.finfo(dtype).max
    cfg = ControllerConfig(order=tab.order)
    prev = torch.ones(G, dtype=F64, device=device)
    running = torch.ones(G, dtype=torch.bool, device=device)
    (y_new, ratio, ok, accept, h_next, _), r, _ = _run(be, tab, y, K, h_ctl, 1e-3, 1e-4, RMSNorm(), cfg, prev, running)
    assert torch.equal(ok, r[2])
    assert ok.tolist() == [True, False, True, True, True, False, True]
    assert not accept[[1, 5]].any()
    assert torch.isinf(ratio[[1, 5]]).all() and torch.equal(torch.isinf(ratio), torch.isinf(r[1]))
    assert torch.isfinite(ratio[3]) and torch.isfinite(y_new[3]).all()
    torch.testing.assert_close(ratio[3], r[1][3].double(), rtol=RATIO_RTOL[dtype], atol=0.0)
    torch.testing.assert_close(h_next, r[4], rtol=STEP_RTOL[dtype], atol=0.0)
    torch.testing.assert_close(h_next[[1, 5]], h_ctl[[1, 5]] * cfg.dfactor, rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("be", C.backends(OP))
@pytest.mark.parametrize("bad", ["nan_stage", "inf_last", "nan_y"])
def test_non_finite_rows(be, bad):
    """A NaN in a weighted stage, an inf in the last stage, a NaN in y: that row is not ok, rejected, and its step
    shrinks by dfactor; the other rows are untouched."""
    tab = tableau("dopri5")
    G, N = 5, 33
    gen = torch.Generator().manual_seed(11)
    y, K, h, rtol, atol, running, prev = _gen_inputs(tab, G, N, F64, gen, be.device)
    running[:] = True
    if bad == "nan_stage":
        K[2][1, 7] = math.nan
    elif bad == "inf_last":
        K[-1][1, 0] = math.inf
    else:
        y[1, 32] = math.nan
    cfg = ControllerConfig(order=tab.order)
    b, a, _ = _run(be, tab, y, K, h, rtol, atol, RMSNorm(), cfg, prev, running)
    assert not bool(b[2][1]) and bool(b[2][[0, 2, 3, 4]].all())
    assert math.isinf(b[1][1].item()) and not bool(b[3][1])
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    torch.testing.assert_close(b[4], a[4], rtol=1e-12, atol=0.0)
    assert b[4][1].item() == pytest.approx(h[1].item() * cfg.dfactor, rel=1e-15)


@pytest.mark.parametrize("be", C.backends(OP))
def test_opcheck(be):
    device = be.device
    G, N = 3, 17
    gen = torch.Generator().manual_seed(0)
    tab = tableau("dopri5")
    y = torch.randn(G, N, dtype=F64, generator=gen).to(device)
    K = torch.randn(tab.num_stages, G, N, dtype=F64, generator=gen).to(device)
    h = torch.rand(G, dtype=F64, generator=gen).to(device)
    running = torch.tensor([True, True, False], device=device)
    ones = torch.ones(G, dtype=F64, device=device)
    cfg = ControllerConfig(order=5)
    if be.name == "ext":
        ctrl = C.ctrl_values(cfg)
        cases = [
            (y, list(K), h, list(tab.b), list(tab.e), None, 1e-3, None, 1e-6, [0, 5, 5, N], h, ones, running, None,
             ctrl),
            (y, list(K), h, list(tab.b), list(tab.e), torch.full((1, N), 1e-3, dtype=F64, device=device), 0.0,
             torch.full((G, N), 1e-6, dtype=F64, device=device), 0.0, [0, N], h, ones, running,
             torch.rand(G, dtype=F64).to(device), ctrl),
        ]
    else:
        tab3 = tableau("bosh3")  # the original case: bosh3, G, N = 3, 5, two segments, a [1, N] atol, a floor
        y3, K3 = y[:, :5].contiguous(), K[: tab3.num_stages, :, :5].contiguous()
        seg = torch.tensor([0, 2, 2, 5], dtype=torch.int64, device=device)
        cases = [(y3, K3, h, *C.finish_args(tab3, y3), None, torch.full((1, 5), 1e-4, dtype=F64, device=device),
                  C.consts(1e-3, 1e-4, ControllerConfig(order=3), device), seg, h, ones,
                  torch.ones(G, dtype=torch.bool, device=device), torch.full((G,), 0.5, dtype=F64, device=device))]
    for args in cases:
        torch.library.opcheck(be.ops.finish_control.default, args)
