"""The ext ops' values and gradients on a one-group state in another shape than ``[1, N]`` (the shape func takes,
which a lean solve keeps: see csrc/autograd.cpp): bitwise those of the same call on the ``[1, N]`` rows, outputs in
the state's shape (``interpolate``'s M outputs ``[M, *shape]``), gradients in the inputs' shapes; gradcheck and
gradgradcheck (float64) through the reshaped path; and clear errors for stages of another shape, and for a state of
several groups that is not ``[G, N]``."""

from __future__ import annotations

import pytest
import torch

from fastnode._options import ControllerConfig, RMSNorm

from ._calls import DTYPES, F64, backends, tableau

pytestmark = pytest.mark.parametrize("be", backends("rk_combine", names=("ext",), cuda=()))

SHAPES = [pytest.param((5, 7), id="5x7"), pytest.param((35,), id="35"), pytest.param((1, 5, 7), id="1x5x7"),
          pytest.param("t", id="5x7-transposed")]
OPS = torch.ops.fastnode if hasattr(torch.ops, "fastnode") else None


def _state(shape, dtype, seed: int, grad: bool = False):
    """A state of ``shape`` ("t": [5, 7], not contiguous) and its [1, N] rows (a separate leaf with the same values)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 5, generator=g, dtype=dtype).t() if shape == "t" else torch.randn(shape, generator=g,
                                                                                         dtype=dtype)
    rows = x.detach().reshape(1, -1).clone().requires_grad_(grad)
    return x.detach().clone().requires_grad_(grad) if shape != "t" else x.detach().requires_grad_(grad), rows


def _pair(shape, dtype, S: int, grad: bool = False):
    y, yr = _state(shape, dtype, 0, grad)
    ks = [_state(shape, dtype, 1 + j, grad) for j in range(S)]
    h = torch.tensor([0.3], dtype=dtype)
    return (y, [k for k, _ in ks], h), (yr, [r for _, r in ks], h)


def _combine(y, K, h, w):
    return OPS.rk_combine(y, K, h, w)


def _finish(y, K, h, tab):
    cfg = ControllerConfig(order=tab.order, safety=0.9, ifactor=10.0, dfactor=0.2, min_step=0.0,
                           max_step=float("inf"), kind="i", pi_alpha=0.7, pi_beta=0.4)
    one = torch.ones(1, dtype=F64)
    return OPS.finish_control(y, K, h, list(tab.b), list(tab.e), None, 1e-3, None, 1e-6,
                              RMSNorm().bounds(y.numel()), one * 0.3, one, torch.ones(1, dtype=torch.bool), None,
                              list(cfg.as_floats()))


def _interpolate(y, K, h, theta, tab):
    return OPS.interpolate(y, K, h, theta.to(y.dtype), [float(v) for r in tab.dense for v in r], len(tab.dense[0]))


def _calls(tab, theta):
    """name -> call(y, K, h) for every op that takes the state's shape."""
    w = [float(v) for v in tab.a[4][:4]]
    return {
        "rk_combine": lambda y, K, h: _combine(y, K, h, w),
        "finish_control": lambda y, K, h: _finish(y, K, h, tab)[0],
        "interpolate": lambda y, K, h: _interpolate(y, K, h, theta, tab),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", ["rk_combine", "finish_control", "interpolate"])
@pytest.mark.parametrize("theta", [[0.25, 0.5, 1.0], [0.6]], ids=["M3", "M1"])
def test_values_and_gradients_are_those_of_the_rows(be, op, shape, dtype, theta):
    tab = tableau("dopri5")
    th = torch.tensor(theta, dtype=F64)
    call = _calls(tab, th)[op]
    (y, K, h), (yr, Kr, hr) = _pair(shape, dtype, len(tab.c), grad=True)
    out, ref = call(y, K, h), call(yr, Kr, hr)
    want = (len(theta), *y.shape) if op == "interpolate" else y.shape
    assert out.shape == want
    assert torch.equal(out.reshape(ref.shape), ref)
    w = torch.cos(torch.arange(ref.numel(), dtype=dtype)).reshape(ref.shape)
    got = torch.autograd.grad((out * w.reshape(out.shape)).sum(), [y, *K], allow_unused=True)
    exp = torch.autograd.grad((ref * w).sum(), [yr, *Kr], allow_unused=True)
    for a, b, x in zip(got, exp, [y, *K]):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == x.shape
            assert torch.equal(a.reshape(b.shape), b)


def test_finish_control_decision_is_that_of_the_rows(be):
    tab = tableau("dopri5")
    (y, K, h), (yr, Kr, hr) = _pair((5, 7), torch.float32, len(tab.c))
    got, ref = _finish(y, K, h, tab), _finish(yr, Kr, hr, tab)
    for a, b in zip(got[1:], ref[1:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["rk_combine", "finish_control", "interpolate"])
def test_gradcheck_and_gradgradcheck(be, op):
    """float64 through the reshaped path, y, the stages and (rk_combine, interpolate) h and theta."""
    tab = tableau("dopri5")
    S = len(tab.c)
    (y, K, _), _ = _pair((3, 2), F64, S, grad=True)
    h = torch.tensor([0.3], dtype=F64, requires_grad=op != "finish_control")
    theta = torch.tensor([0.3, 0.8], dtype=F64, requires_grad=True)
    w = [float(v) for v in tab.a[4][:4]]

    def f(y, h, theta, *K):
        if op == "rk_combine":
            return _combine(y, list(K), h, w)
        if op == "finish_control":
            return _finish(y, list(K), h, tab)[0]
        return _interpolate(y, list(K), h, theta, tab)

    args = (y, h, theta, *K)
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_stages_of_another_shape_are_refused(be):
    y = torch.randn(5, 7)
    K = [torch.randn(5, 7), torch.randn(7, 5)]
    with pytest.raises(RuntimeError, match=r"stage 1 has shape \[7, 5\]; the stages need y's shape \[5, 7\]"):
        _combine(y, K, torch.ones(1), [0.5, 0.5])


def test_only_one_group_is_taken_in_another_shape(be):
    """With G > 1 a state that is not [G, N] is refused by the op's own check (not reinterpreted as G rows)."""
    y = torch.randn(4, 7)
    with pytest.raises(RuntimeError, match="h must be"):
        _combine(y, [torch.randn(4, 7)], torch.ones(2), [1.0])
