"""rk_combine (stage inputs ``y + h sum_{j<i} a_ij k_j`` and solutions ``y + h sum_j b_j k_j``) vs the reference,
on every backend, and each namespace's own argument checks, opcheck and torch.compile."""

import pytest
import torch

from . import _calls as C
from ._calls import ADAPTIVE, DTYPES, F64, assert_rounding_close, combo_bound, stages, state, steps, tableau

OP = "rk_combine"
# Masked tails (odd G and N), one row, one column, one element; a long row (several column tiles on the CPU).
SHAPES = C.SHAPES + [(1, 200), (5, 1)]
SHAPE_IDS = C.SHAPE_IDS + ["G1-N200", "G5-N1"]


def _check_all_rows(be, tab, y, K, h):
    for i in range(1, tab.num_stages):
        out = C.rk_combine(be, tab, i, y, K, h)
        assert_rounding_close(out, C.ref_rk_combine(tab, i, y, K, h), combo_bound(y, K[:i], h, tab.a[i]))
    assert_rounding_close(C.rk_combine(be, tab, None, y, K, h), C.ref_rk_combine(tab, None, y, K, h),
                          combo_bound(y, K, h, tab.b))


@pytest.mark.parametrize("be", C.backends(OP))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ADAPTIVE + ["rk4"])
def test_every_stage_input_and_solution(be, dtype, method):
    """Every row of every tableau (coefficients are data, not dopri5's constants)."""
    tab = tableau(method)
    G, N = 7, 63
    y, K, h = state(G, N, dtype, be.device), stages(tab.num_stages, G, N, dtype, be.device), steps(G, dtype, be.device)
    _check_all_rows(be, tab, y, K, h)


@pytest.mark.parametrize("be", C.backends(OP))
@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_shapes_and_layouts(be, method, dtype, contiguous, shape):
    """Masked tails, one row, one column; strided y and stages (the C++ op reads them as they are, the Triton op's
    contract is contiguous input: the call packs them)."""
    tab = tableau(method)
    G, N = shape
    S = tab.num_stages
    y = state(G, N, dtype, be.device, contiguous)
    K = [state(G, N, dtype, be.device, contiguous, seed=10 + j) for j in range(S)]
    _check_all_rows(be, tab, y, K, steps(G, dtype, be.device))


@pytest.mark.parametrize("be", C.backends(OP))
def test_zero_weight_stage_does_not_leak(be):
    """A non-finite stage whose weight is zero (dopri5's b_2 = 0) leaves the solution finite, as in the reference."""
    tab = tableau("dopri5")
    assert tab.b[1] == 0.0
    G, N = 3, 5
    y, K, h = state(G, N, F64, be.device), stages(tab.num_stages, G, N, F64, be.device), steps(G, F64, be.device)
    K[1, 1, 2] = float("nan")
    out = C.rk_combine(be, tab, None, y, K, h)
    assert torch.isfinite(out).all()
    assert_rounding_close(out, C.ref_rk_combine(tab, None, y, K, h), combo_bound(y, K, h, tab.b))


@pytest.mark.parametrize("be", C.backends(OP, names=("triton",)))
def test_triton_checks_name_the_argument(be):
    device = be.device
    tab = tableau("dopri5")
    y, K, h = state(3, 4, F64, device), stages(7, 3, 4, F64, device), steps(3, F64, device)
    w, idx = C._weights(tab.b, device)
    op = be.ops.rk_combine
    with pytest.raises(ValueError, match="y must be contiguous"):
        op(state(3, 4, F64, device, contiguous=False), K, h, w, idx)
    with pytest.raises(ValueError, match="K must be"):
        op(y, K[:, :2], h, w, idx)
    with pytest.raises(ValueError, match="h must be"):
        op(y, K, h[:2], w, idx)
    with pytest.raises(TypeError, match="y must be float32 or float64"):
        op(y.half(), K.half(), h.half(), w, idx)
    with pytest.raises(ValueError, match="w weights"):
        op(y, K, h, w.float(), idx)


@pytest.mark.parametrize("be", C.backends(OP, names=("ext",)))
def test_ext_checks_name_the_argument(be):
    y = torch.randn(3, 4).to(be.device)
    op = be.ops.rk_combine
    with pytest.raises(RuntimeError, match="stage 0 has shape"):
        op(y, [torch.randn(3, 5).to(be.device)], torch.ones(3).to(be.device), [1.0])
    with pytest.raises(RuntimeError, match="h must be"):
        op(y, [torch.randn(3, 4).to(be.device)], torch.ones(2).to(be.device), [1.0])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(y.half(), [], torch.ones(3).half().to(be.device), [])


@pytest.mark.parametrize("be", C.backends(OP))
def test_opcheck_and_compile(be):
    """The registered op passes torch.library.opcheck and runs inside torch.compile (no graph break)."""
    device = be.device
    tab = tableau("tsit5")
    y, K, h = state(3, 5, F64, device), stages(tab.num_stages, 3, 5, F64, device), steps(3, F64, device)
    if be.name == "ext":
        args = (y, list(K[:3]), h, [0.1, 0.0, 0.3])
    else:
        args = (y, K, h, *C._weights(tab.a[4][:4], device))
    torch.library.opcheck(be.ops.rk_combine.default, args)

    def f(y, K, h):
        return be.ops.rk_combine(y, K, h, *args[3:]) * 2.0

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*args[:3])
    assert torch.equal(got, f(*args[:3]))
