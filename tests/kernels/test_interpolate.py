"""interpolate (dense output) vs the torch backend, for every adaptive tableau's continuous extension."""

import pytest
import torch
from fastnode.kernels import TritonStepOps

from fastnode.backends.torch_ops import TorchStepOps

from .conftest import kernel_devices
from .helpers import ADAPTIVE, SHAPE_IDS, SHAPES, assert_rounding_close, combo_bound, stages, state, steps, tableau

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]


def _theta(G, dtype, device):
    g = torch.Generator().manual_seed(4)
    th = torch.rand(G, generator=g, dtype=torch.float64)
    th[0] = 0.0
    if G > 2:
        th[2] = 1.0
    return th.to(device)  # the loop passes theta in the time dtype


def _bound(tab, y, K, h, theta):
    """combo_bound with each stage's largest weight magnitude over theta in [0, 1] (sum_p |dense[j, p]|)."""
    w = [sum(abs(v) for v in row) for row in tab.dense]
    return combo_bound(y, K, h, w)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ADAPTIVE)
def test_every_adaptive_tableau(device, dtype, method):
    tab = tableau(method)
    G, N = 7, 63
    y, K, h = state(G, N, dtype, device), stages(tab.num_stages, G, N, dtype, device), steps(G, dtype, device)
    theta = _theta(G, dtype, device)
    ops = TritonStepOps()
    buf = ops.new_stages(tab, y)
    for i in range(tab.num_stages):
        buf = ops.set_stage(buf, i, K[i])
    out = ops.interpolate(tab, y, buf, h, theta)
    ref = TorchStepOps().interpolate(tab, y, list(K), h, theta)
    assert_rounding_close(out, ref, _bound(tab, y, K, h, theta))
    assert torch.equal(out[0], y[0])  # theta = 0 is the step's start exactly


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_shapes_layouts_and_stage_lists(device, dtype, contiguous, shape):
    """Strided state and stages given as a list (what events keep), one theta ([1]) broadcast to every row."""
    tab = tableau("dopri5")
    G, N = shape
    y = state(G, N, dtype, device, contiguous)
    K = [state(G, N, dtype, device, contiguous, seed=20 + j) for j in range(tab.num_stages)]
    h = steps(G, dtype, device)
    for theta in (_theta(G, dtype, device), torch.tensor([0.37], dtype=torch.float64, device=device)):
        out = TritonStepOps().interpolate(tab, y, K, h, theta)
        ref = TorchStepOps().interpolate(tab, y, K, h, theta)
        assert_rounding_close(out, ref, _bound(tab, y, K, h, theta))


@pytest.mark.parametrize("device", kernel_devices())
def test_opcheck(device):
    tab = tableau("dopri5")
    from fastnode.kernels._launch import tableau_constants

    y, K, h = state(3, 5, torch.float64, device), stages(tab.num_stages, 3, 5, torch.float64, device), steps(3, torch.float64, device)
    d, idx = tableau_constants(tab, torch.device(device)).dense()
    torch.library.opcheck(torch.ops.fastnode_triton.interpolate.default,
                          (y, K, h, _theta(3, torch.float64, device).to(y.dtype), d, idx))
