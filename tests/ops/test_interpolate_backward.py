"""Gradients of the dense output ``interpolate``, whose backward is the fused ``interpolate_backward``: gradcheck in
float64 w.r.t. the state, every stage, the step and theta (odd sizes, strided inputs), the backward op against the
reference's autograd, opcheck with the autograd checks; on ext (a stage list) and triton (a ``[S, G, N]`` buffer,
the interpreter on CPU)."""

import pytest
import torch
from torch.autograd import gradcheck

from . import _calls as C
from ._calls import ADAPTIVE, F64, state, steps, tableau

OP = "interpolate_backward"


def _dense(tab):
    return [float(v) for row in tab.dense for v in row], len(tab.dense[0])


def _leaves(G, N, S, contiguous, device):
    y = state(G, N, F64, device, contiguous).requires_grad_()
    K = [state(G, N, F64, device, contiguous, seed=30 + j).requires_grad_() for j in range(S)]
    h = steps(G, F64, device).requires_grad_()
    g = torch.Generator().manual_seed(4)
    theta = torch.rand(G, generator=g, dtype=F64).to(device).requires_grad_()
    return y, K, h, theta


@pytest.mark.parametrize("be", C.backends(OP, names=("triton",), cuda=("triton",)))
def test_triton_gradcheck(be):
    """The interpreter's time: one tableau, strided, odd sizes (gradcheck's fast mode)."""
    test_gradcheck(be, "tsit5", False, (3, 5))


@pytest.mark.parametrize("be", C.backends(OP, names=("ext",), cuda=()))
@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", [(3, 5), (1, 1)], ids=["G3-N5", "G1-N1"])
def test_gradcheck(be, method, contiguous, shape):
    tab = tableau(method)
    dense, P = _dense(tab)
    y, K, h, theta = _leaves(*shape, tab.num_stages, contiguous, be.device)

    def f(y, h, theta, *K):
        return C.interpolate(be, tab, y, K, h, theta)

    assert gradcheck(f, (y, h, theta, *K), eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=be.name == "triton")


@pytest.mark.parametrize("be", C.backends(OP, cuda=("triton",)))
@pytest.mark.parametrize("method", ADAPTIVE)
def test_backward_matches_the_reference(be, method):
    if be.name == "triton" and method not in ("dopri5", "bosh3"):
        pytest.skip("the interpreter's time: triton checks dopri5 and bosh3")
    tab = tableau(method)
    dense, P = _dense(tab)
    G, N = 7, 63
    y, K, h, theta = _leaves(G, N, tab.num_stages, True, be.device)
    used = [k for j, k in enumerate(K) if any(tab.dense[j])]
    g = state(G, N, F64, be.device, seed=5)
    got = torch.autograd.grad(C.interpolate(be, tab, y, K, h, theta), [y, h, theta] + used, g)
    ref = torch.autograd.grad(C.REF.interpolate(tab, y, K, h, theta), [y, h, theta] + used, g)
    assert torch.equal(got[0], ref[0])
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("be", C.backends(OP, names=("ext",), cuda=()))
def test_without_time_gradients(be):
    """Only the state and stages need gradients: the op is asked for no h/theta gradient (empty tensors)."""
    tab = tableau("dopri5")
    dense, P = _dense(tab)
    y, K, h, theta = _leaves(4, 6, tab.num_stages, True, be.device)
    out = be.ops.interpolate(y, K, h.detach(), theta.detach(), dense, P)
    g = torch.autograd.grad(out, K[0], torch.ones_like(out))[0]
    ref = torch.autograd.grad(C.REF.interpolate(tab, y, K, h.detach(), theta.detach()), K[0], torch.ones_like(out))[0]
    torch.testing.assert_close(g, ref, rtol=1e-14, atol=0)
    gk, gh, gt = be.ops.interpolate_backward(torch.ones_like(out), [k.detach() for k in K], h.detach(),
                                             theta.detach(), dense, P, False)
    assert gh.numel() == 0 and gt.numel() == 0 and len(gk) == sum(1 for r in tab.dense if any(r))


@pytest.mark.parametrize("be", C.backends(OP, names=("ext",), cuda=()))
def test_opcheck_with_autograd(be):
    tab = tableau("bosh3")
    dense, P = _dense(tab)
    y, K, h, theta = _leaves(3, 5, tab.num_stages, True, be.device)
    torch.library.opcheck(be.ops.interpolate.default, (y, K, h, theta, dense, P))
    g = state(3, 5, F64, be.device, seed=9)
    torch.library.opcheck(be.ops.interpolate_backward.default,
                          (g, [k.detach() for k in K], h.detach(), theta.detach(), dense, P, True))


@pytest.mark.parametrize("be", C.backends(OP, names=("triton",), cuda=("triton",)))
def test_triton_opcheck_with_autograd(be):
    tab = tableau("bosh3")
    y, K, h, theta = _leaves(3, 5, tab.num_stages, True, be.device)
    Kb = torch.stack(K).detach().requires_grad_()
    d, idx = C.dense_args(tab, be.device)
    torch.library.opcheck(be.ops.interpolate.default, (y, Kb, h, theta, d, idx))
    g = state(3, 5, F64, be.device, seed=9)
    for need in (True, False):
        torch.library.opcheck(be.ops.interpolate_backward.default,
                              (g, Kb.detach(), h.detach(), theta.detach(), d, idx, need))


@pytest.mark.parametrize("be", C.backends(OP, names=("ext",), cuda=()))
@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_second_derivative(be, method):
    """create_graph: the backward records its own graph (the formulas as ATen ops): gradgradcheck w.r.t. the state,
    every stage, the step and theta."""
    tab = tableau(method)
    y, K, h, theta = _leaves(3, 5, tab.num_stages, False, be.device)

    def f(y, h, theta, *K):
        return C.interpolate(be, tab, y, K, h, theta)

    args = (y, h, theta, *K)
    C.assert_second_derivative(f, args, args, state(3, 5, F64, be.device, seed=6))


@pytest.mark.parametrize("be", C.backends(OP, names=("ext",), cuda=()))
@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
@pytest.mark.parametrize("M", [2, 3])
def test_several_outputs_of_one_row(be, method, M):
    """One row (G = 1) with theta [M]: each output row is bitwise the one-row call at its theta (on the reference,
    which broadcasts, too), and close to the reference's; the gradients sum the outputs' (gradcheck w.r.t. the state,
    every stage, the step and the thetas; vs the reference's autograd; the composite's first derivative under
    create_graph equals the fused one's, and its second derivative passes gradgradcheck); opcheck sees the [M, N]
    fakes."""
    tab = tableau(method)
    dense, P = _dense(tab)
    y, K, h, _ = _leaves(1, 5, tab.num_stages, False, be.device)
    theta = torch.linspace(0.2, 1.0, M, dtype=F64, device=be.device).requires_grad_()
    out = be.ops.interpolate(y, K, h, theta, dense, P)
    assert out.shape == (M, 5)
    ref_out = C.REF.interpolate(tab, y, K, h, theta)
    for r in range(M):
        assert torch.equal(out[r : r + 1], be.ops.interpolate(y, K, h, theta[r : r + 1], dense, P))
        assert torch.equal(ref_out[r : r + 1], C.REF.interpolate(tab, y, K, h, theta[r : r + 1]))
    torch.testing.assert_close(out, ref_out, rtol=1e-14, atol=1e-14)

    def f(y, h, theta, *K):
        return be.ops.interpolate(y, list(K), h, theta, dense, P)

    args = (y, h, theta, *K)
    assert gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-6)
    g = state(M, 5, F64, be.device, seed=7)
    used = [k for j, k in enumerate(K) if any(tab.dense[j])]
    got = torch.autograd.grad(f(*args), [y, h, theta] + used, g)
    ref = torch.autograd.grad(C.REF.interpolate(tab, y, K, h, theta), [y, h, theta] + used, g)
    composite = torch.autograd.grad(f(*args), [y, h, theta] + used, g, create_graph=True)
    for a, b, c in zip(got, ref, composite):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(c, a, rtol=1e-13, atol=1e-14)
    assert torch.autograd.gradgradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-6)
    torch.library.opcheck(be.ops.interpolate.default, (y, K, h, theta, dense, P))
    torch.library.opcheck(be.ops.interpolate_backward.default,
                          (g, [k.detach() for k in K], h.detach(), theta.detach(), dense, P, True))
