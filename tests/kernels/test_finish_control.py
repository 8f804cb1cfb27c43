"""finish_control (solution, scaled error norm, finiteness, controller) vs the torch backend's composition."""

import math

import pytest
import torch
from fastnode.kernels import TritonStepOps

from fastnode.backends.torch_ops import ControllerConfig, RMSNorm, TorchStepOps

from .conftest import kernel_devices
from .helpers import ADAPTIVE, EPS, SHAPE_IDS, SHAPES, assert_rounding_close, combo_bound, state, tableau

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
# Relative tolerance of the error ratio: the reference sums the squares in the state dtype, the kernel in float64, so
# in float32 they differ by the reference's own rounding (a few eps); in float64 by reordering only.
RATIO_RTOL = {torch.float32: 16 * EPS[torch.float32], torch.float64: 64 * EPS[torch.float64]}


def _inputs(tab, G, N, dtype, device, contiguous=True, seed=0):
    y = state(G, N, dtype, device, contiguous, seed=seed)
    K = torch.stack([state(G, N, dtype, device, contiguous, seed=seed + 10 + j) for j in range(tab.num_stages)])
    # Step sizes spread over two decades so that both accepted and rejected groups occur at these tolerances.
    g = torch.Generator().manual_seed(seed + 3)
    h_ctl = torch.logspace(-3, -1, G, dtype=torch.float64)[torch.randperm(G, generator=g)].to(device)
    return y, K, h_ctl


def _run(tab, y, K, h_ctl, rtol, atol, norm, cfg, prev, running, floor):
    hy = h_ctl.to(y.dtype)
    ops = TritonStepOps()
    buf = ops.new_stages(tab, y)
    for i in range(tab.num_stages):
        buf = ops.set_stage(buf, i, K[i])
    got = ops.finish_control(tab, y, buf, hy, rtol, atol, norm, cfg, h_ctl, prev, running, ratio_floor=floor)
    ref = TorchStepOps().finish_control(tab, y, list(K), hy, rtol, atol, norm, cfg, h_ctl, prev, running,
                                        ratio_floor=floor)
    return got, ref, hy


def _check(got, ref, y, K, hy, tab, dtype):
    y_new, ratio, ok, accept, h_next, prev_out = got
    r_y, r_ratio, r_ok, r_accept, r_h, r_prev = ref
    assert_rounding_close(y_new, r_y, combo_bound(y, K, hy, tab.b))
    for flag in (ok, accept):
        assert flag.dtype == torch.bool and int(flag.view(torch.uint8).max()) <= 1, "a flag was never written"
    assert torch.equal(ok, r_ok)
    assert ratio.dtype == torch.float64 and not torch.isnan(ratio).any()
    torch.testing.assert_close(ratio, r_ratio.to(torch.float64), rtol=RATIO_RTOL[dtype], atol=0.0)
    # Accept decisions agree wherever the reference ratio is not within rounding of the threshold 1.
    clear = (r_ratio - 1.0).abs() > 4 * RATIO_RTOL[dtype]
    assert torch.equal(accept[clear], r_accept[clear])
    assert clear.sum() >= len(clear) - 1
    # The next step scales with ratio^(-1/order): its relative error is the ratio's over the order, plus pow's.
    torch.testing.assert_close(h_next, r_h, rtol=RATIO_RTOL[dtype] + 64 * EPS[torch.float64], atol=0.0)
    torch.testing.assert_close(prev_out, r_prev, rtol=RATIO_RTOL[dtype] + 64 * EPS[torch.float64], atol=0.0)
    return accept


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_shapes_dtypes_layouts(device, dtype, contiguous, shape):
    tab = tableau("dopri5")
    G, N = shape
    y, K, h_ctl = _inputs(tab, G, N, dtype, device, contiguous)
    cfg = ControllerConfig(order=tab.order)
    prev = torch.ones(G, dtype=torch.float64, device=device)
    running = torch.ones(G, dtype=torch.bool, device=device)
    got, ref, hy = _run(tab, y, K, h_ctl, 1e-3, 1e-4, RMSNorm(), cfg, prev, running, None)
    _check(got, ref, y, K, hy, tab, dtype)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("method", ADAPTIVE)
def test_every_adaptive_tableau(device, method):
    tab = tableau(method)
    G, N = 7, 63
    y, K, h_ctl = _inputs(tab, G, N, torch.float64, device)
    cfg = ControllerConfig(order=tab.order)
    prev = torch.ones(G, dtype=torch.float64, device=device)
    running = torch.ones(G, dtype=torch.bool, device=device)
    got, ref, hy = _run(tab, y, K, h_ctl, 1e-3, 1e-4, RMSNorm(), cfg, prev, running, None)
    accept = _check(got, ref, y, K, hy, tab, torch.float64)
    if method == "dopri5":
        assert accept.any() and not accept.all(), "the inputs should exercise both decisions"


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["tol-rows", "tol-row", "segments-gap", "pi-floor-minstep", "not-running"])
def test_tolerances_norm_segments_controller(device, dtype, case):
    """Tensor tolerances ([G, N] and [1, N]), norm segments with uncovered columns (max over segments), the PI
    controller with its memory, min/max step, a ratio floor, groups that are not running."""
    tab = tableau("dopri5")
    G, N = 7, 63
    y, K, h_ctl = _inputs(tab, G, N, dtype, device, seed=5)
    g = torch.Generator().manual_seed(7)
    rtol, atol, norm = 1e-3, 1e-4, RMSNorm()
    cfg = ControllerConfig(order=tab.order)
    prev = torch.ones(G, dtype=torch.float64, device=device)
    running = torch.ones(G, dtype=torch.bool, device=device)
    floor = None
    if case == "tol-rows":
        rtol = (1e-3 * (0.5 + torch.rand(G, N, generator=g, dtype=torch.float64))).to(dtype=dtype, device=device)
    elif case == "tol-row":
        atol = (1e-4 * (0.5 + torch.rand(1, N, generator=g, dtype=torch.float64))).to(dtype=dtype, device=device)
    elif case == "segments-gap":
        norm = RMSNorm([(0, 20), (30, 50), (50, 63)])
    elif case == "pi-floor-minstep":
        cfg = ControllerConfig(order=tab.order, kind="pi", min_step=2e-3, max_step=0.05)
        prev = (0.1 + torch.rand(G, generator=g, dtype=torch.float64)).to(device)
        floor = torch.linspace(0.0, 3.0, G, dtype=torch.float64, device=device)
    elif case == "not-running":
        running = torch.tensor([True, False, True, True, False, True, False], device=device)
        h_ctl = torch.where(running, h_ctl, 0.0)
    got, ref, hy = _run(tab, y, K, h_ctl, rtol, atol, norm, cfg, prev, running, floor)
    accept = _check(got, ref, y, K, hy, tab, dtype)
    if case == "not-running":
        assert not accept[~running].any()
        assert torch.equal(got[4][~running], h_ctl[~running])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_groups_are_rejected(device, dtype):
    """inf in the last stage or overflow in y_new: that group alone fails; NaN in a stage with zero weights
    (dopri5's second stage) does not leak into anything."""
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
    prev = torch.ones(G, dtype=torch.float64, device=device)
    running = torch.ones(G, dtype=torch.bool, device=device)
    hy = h_ctl.to(dtype)
    ops = TritonStepOps()
    buf = ops.new_stages(tab, y)
    for i in range(S):
        buf = ops.set_stage(buf, i, K[i])
    y_new, ratio, ok, accept, h_next, _ = ops.finish_control(tab, y, buf, hy, 1e-3, 1e-4, RMSNorm(), cfg, h_ctl, prev,
                                                             running)
    r = TorchStepOps().finish_control(tab, y, list(K), hy, 1e-3, 1e-4, RMSNorm(), cfg, h_ctl, prev, running)
    assert torch.equal(ok, r[2])
    assert ok.tolist() == [True, False, True, True, True, False, True]
    assert not accept[[1, 5]].any()
    assert torch.isinf(ratio[[1, 5]]).all() and torch.equal(torch.isinf(ratio), torch.isinf(r[1]))
    assert torch.isfinite(ratio[3]) and torch.isfinite(y_new[3]).all()
    torch.testing.assert_close(ratio[3], r[1][3].double(), rtol=RATIO_RTOL[dtype], atol=0.0)
    torch.testing.assert_close(h_next, r[4], rtol=RATIO_RTOL[dtype] + 64 * EPS[torch.float64], atol=0.0)
    torch.testing.assert_close(h_next[[1, 5]], h_ctl[[1, 5]] * cfg.dfactor, rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("device", kernel_devices())
def test_opcheck(device):
    tab = tableau("bosh3")
    G, N = 3, 5
    y, K, h_ctl = _inputs(tab, G, N, torch.float64, device)
    from fastnode.kernels._launch import device_constants, tableau_constants

    from fastnode.backends.ext_ops import ctrl_values

    tc = tableau_constants(tab, torch.device(device))
    dev = torch.device(device)
    consts = device_constants((1e-3, 1e-4, *ctrl_values(ControllerConfig(order=3))), torch.float64, dev)
    seg = device_constants((0, 2, 2, 5), torch.int64, dev)
    args = (y, K.contiguous(), h_ctl.to(y.dtype), *tc.finish(), None,
            torch.full((1, N), 1e-4, dtype=torch.float64, device=device), consts, seg, h_ctl,
            torch.ones(G, dtype=torch.float64, device=device), torch.ones(G, dtype=torch.bool, device=device),
            torch.full((G,), 0.5, dtype=torch.float64, device=device))
    torch.library.opcheck(torch.ops.fastnode_triton.finish_control.default, args)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_step_error_for_a_user_norm(device, dtype, shape):
    """A user norm: solution and scaled error in one pass, the norm applied to the scaled error as in the reference;
    through the reference composition, the whole finish then agrees."""
    tab = tableau("tsit5")
    G, N = shape
    y, K, h_ctl = _inputs(tab, G, N, dtype, device, contiguous=False, seed=3)
    seen = {}

    def norm(x):
        seen.setdefault("x", []).append(x.clone())
        return x.abs().amax(dim=1)

    cfg = ControllerConfig(order=tab.order)
    prev = torch.ones(G, dtype=torch.float64, device=device)
    running = torch.ones(G, dtype=torch.bool, device=device)
    atol = torch.full((1, N), 1e-4, dtype=dtype, device=device)
    got, ref, hy = _run(tab, y, K, h_ctl, 1e-3, atol, norm, cfg, prev, running, None)
    x_got, x_ref = seen["x"]
    scale = torch.maximum(y.abs(), ref[0].abs()) * 1e-3 + 1e-4
    assert_rounding_close(x_got, x_ref, combo_bound(torch.zeros_like(y), K, hy, tab.e) / scale)
    _check(got, ref, y, K, hy, tab, dtype)


@pytest.mark.parametrize("device", kernel_devices())
def test_step_error_opcheck(device):
    tab = tableau("dopri5")
    from fastnode.kernels._launch import device_constants, tableau_constants

    G, N = 3, 5
    y, K, h_ctl = _inputs(tab, G, N, torch.float64, device)
    dev = torch.device(device)
    args = (y, K.contiguous(), h_ctl.to(y.dtype), *tableau_constants(tab, dev).finish(), None, None,
            device_constants((1e-3, 1e-4) + (0.0,) * 9, torch.float64, dev))
    torch.library.opcheck(torch.ops.fastnode_triton.step_error.default, args)
