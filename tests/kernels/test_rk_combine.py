"""rk_combine (stage inputs and solutions) vs the torch backend, and the op's own checks."""

import pytest
import torch
from fastnode.kernels import TritonStepOps, rk_combine
from fastnode.kernels._launch import tableau_constants

from fastnode.backends.torch_ops import TorchStepOps

from .conftest import kernel_devices
from .helpers import ADAPTIVE, SHAPE_IDS, SHAPES, assert_rounding_close, combo_bound, stages, state, steps, tableau

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]


def _buffer(ops, tab, y, K):
    buf = ops.new_stages(tab, y)
    for i in range(tab.num_stages):
        buf = ops.set_stage(buf, i, K[i])
    return buf


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ADAPTIVE + ["rk4"])
def test_every_stage_input_and_solution(device, dtype, method):
    """Every row of every tableau (coefficients are data, not dopri5's constants)."""
    tab = tableau(method)
    G, N = 7, 63
    y, K, h = state(G, N, dtype, device), stages(tab.num_stages, G, N, dtype, device), steps(G, dtype, device)
    ops, ref = TritonStepOps(), TorchStepOps()
    buf = _buffer(ops, tab, y, K)
    for i in range(1, tab.num_stages):
        out = ops.stage_input(tab, i, y, buf, h)
        assert_rounding_close(out, ref.stage_input(tab, i, y, list(K), h), combo_bound(y, K[:i], h, tab.a[i]))
    out = ops.solution(tab, y, buf, h)
    assert_rounding_close(out, ref.solution(tab, y, list(K), h), combo_bound(y, K, h, tab.b))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_shapes_and_layouts(device, dtype, contiguous, shape):
    """Masked tails (odd G and N), one row, one column; strided y and stages (made contiguous by the backend)."""
    tab = tableau("dopri5")
    G, N = shape
    S = tab.num_stages
    y = state(G, N, dtype, device, contiguous)
    K = [state(G, N, dtype, device, contiguous, seed=10 + j) for j in range(S)]
    h = steps(G, dtype, device)
    ops, ref = TritonStepOps(), TorchStepOps()
    buf = _buffer(ops, tab, y, K)
    assert buf.is_contiguous() and ops._contiguous(y).is_contiguous()
    assert ops._contiguous(y) is ops._contiguous(y)  # a strided state is copied once, not once per stage
    i = S - 2  # the widest stage row (five nonzero weights)
    assert_rounding_close(ops.stage_input(tab, i, y, buf, h), ref.stage_input(tab, i, y, K, h),
                          combo_bound(y, K[:i], h, tab.a[i]))
    assert_rounding_close(ops.solution(tab, y, buf, h), ref.solution(tab, y, K, h), combo_bound(y, K, h, tab.b))


@pytest.mark.parametrize("device", kernel_devices())
def test_zero_weight_stage_does_not_leak(device):
    """A non-finite stage whose weight is zero (dopri5's b_2 = 0) leaves the solution finite, as in the reference."""
    tab = tableau("dopri5")
    assert tab.b[1] == 0.0
    G, N = 3, 5
    y, K, h = state(G, N, torch.float64, device), stages(tab.num_stages, G, N, torch.float64, device), steps(G, torch.float64, device)
    K[1, 1, 2] = float("nan")
    ops = TritonStepOps()
    out = ops.solution(tab, y, _buffer(ops, tab, y, K), h)
    assert torch.isfinite(out).all()
    assert_rounding_close(out, TorchStepOps().solution(tab, y, list(K), h), combo_bound(y, K, h, tab.b))


@pytest.mark.parametrize("device", kernel_devices())
def test_op_checks_name_the_argument(device):
    tab = tableau("dopri5")
    y, K, h = state(3, 4, torch.float64, device), stages(7, 3, 4, torch.float64, device), steps(3, torch.float64, device)
    w, idx = tableau_constants(tab, torch.device(device)).weights("b")
    with pytest.raises(ValueError, match="y must be contiguous"):
        rk_combine(state(3, 4, torch.float64, device, contiguous=False), K, h, w, idx)
    with pytest.raises(ValueError, match="K must be"):
        rk_combine(y, K[:, :2], h, w, idx)
    with pytest.raises(ValueError, match="h must be"):
        rk_combine(y, K, h[:2], w, idx)
    with pytest.raises(TypeError, match="y must be float32 or float64"):
        rk_combine(y.half(), K.half(), h.half(), w, idx)
    with pytest.raises(ValueError, match="w weights"):
        rk_combine(y, K, h, w.float(), idx)


@pytest.mark.parametrize("device", kernel_devices())
def test_opcheck_and_compile(device):
    """The registered op passes torch.library.opcheck and runs inside torch.compile."""
    tab = tableau("tsit5")
    y, K, h = state(3, 5, torch.float64, device), stages(tab.num_stages, 3, 5, torch.float64, device), steps(3, torch.float64, device)
    w, idx = tableau_constants(tab, torch.device(device)).weights(("a", 4))
    op = torch.ops.fastnode_triton.rk_combine.default
    torch.library.opcheck(op, (y, K, h, w, idx))

    def f(y, K, h):
        return torch.ops.fastnode_triton.rk_combine(y, K, h, w, idx) * 2.0

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(y, K, h)
    assert torch.equal(got, f(y, K, h))
