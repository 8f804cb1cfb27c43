"""interpolate (dense output inside a step) vs the reference, for every adaptive tableau's continuous extension,
on every backend; each namespace's opcheck."""

import pytest
import torch

from . import _calls as C
from ._calls import ADAPTIVE, DTYPES, EPS, F64, assert_rounding_close, combo_bound, stages, state, steps, tableau

OP = "interpolate"


def _theta(G, device):
    g = torch.Generator().manual_seed(4)
    th = torch.rand(G, generator=g, dtype=F64)
    th[0] = 0.0
    if G > 2:
        th[2] = 1.0
    return th.to(device)  # the loop passes theta in the time dtype


def _bound(tab, y, K, h):
    """combo_bound with each stage's largest weight magnitude over theta in [0, 1] (sum_p |dense[j, p]|)."""
    return combo_bound(y, K, h, [sum(abs(v) for v in row) for row in tab.dense])


@pytest.mark.parametrize("be", C.backends(OP, cuda=("triton",)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ADAPTIVE)
def test_every_adaptive_tableau(be, dtype, method):
    tab = tableau(method)
    G, N = 7, 63
    y, K, h = state(G, N, dtype, be.device), stages(tab.num_stages, G, N, dtype, be.device), steps(G, dtype, be.device)
    theta = _theta(G, be.device)
    out = C.interpolate(be, tab, y, K, h, theta)
    assert_rounding_close(out, C.ref_interpolate(tab, y, K, h, theta), _bound(tab, y, K, h))
    assert torch.equal(out[0], y[0])  # theta = 0 is the step's start exactly


@pytest.mark.parametrize("be", C.backends(OP, cuda=("triton",)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", C.SHAPES, ids=C.SHAPE_IDS)
def test_shapes_and_layouts(be, dtype, contiguous, shape):
    """Strided state and stages, one theta ([1]) broadcast to every row."""
    tab = tableau("dopri5")
    G, N = shape
    y = state(G, N, dtype, be.device, contiguous)
    K = [state(G, N, dtype, be.device, contiguous, seed=20 + j) for j in range(tab.num_stages)]
    h = steps(G, dtype, be.device)
    for theta in (_theta(G, be.device), torch.tensor([0.37], dtype=F64, device=be.device)):
        out = C.interpolate(be, tab, y, K, h, theta)
        assert_rounding_close(out, C.ref_interpolate(tab, y, K, h, theta), _bound(tab, y, K, h))


@pytest.mark.parametrize("be", C.backends(OP, cuda=("triton",)))
@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G, N", [(7, 63), (1, 1), (1, 200), (5, 1)], ids=lambda v: str(v))
def test_theta_zero_random_one(be, method, dtype, G, N):
    """theta = 0, random and 1 on strided stages, against the reference within 32 ulps of the result."""
    tab = tableau(method)
    gen = torch.Generator().manual_seed(5 * G + N)
    y = torch.randn(G, N, dtype=dtype, generator=gen).to(be.device)
    K = [torch.randn(N, G, dtype=dtype, generator=gen).to(be.device).t() for _ in range(tab.num_stages)]
    h = (torch.rand(G, dtype=dtype, generator=gen) + 0.1).to(be.device)
    for theta in (torch.zeros(G, dtype=F64), torch.rand(G, dtype=F64, generator=gen), torch.ones(G, dtype=F64)):
        theta = theta.to(be.device)
        out = C.interpolate(be, tab, y, K, h, theta)
        ref = C.ref_interpolate(tab, y, K, h, theta)
        torch.testing.assert_close(out, ref, rtol=32 * EPS[dtype], atol=32 * EPS[dtype])
        assert_rounding_close(out, ref, _bound(tab, y, K, h))


@pytest.mark.parametrize("be", C.backends(OP, cuda=("triton",)))
def test_opcheck(be):
    tab = tableau("dopri5")
    device = be.device
    y, K, h = state(3, 5, F64, device), stages(tab.num_stages, 3, 5, F64, device), steps(3, F64, device)
    theta = _theta(3, device)
    if be.name == "ext":
        args = (y, list(K), h, theta, [float(v) for r in tab.dense for v in r], len(tab.dense[0]))
    else:
        args = (y, K, h, theta, *C.dense_args(tab, device))
    torch.library.opcheck(be.ops.interpolate.default, args)
