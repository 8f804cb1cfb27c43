"""Gradients of the stage combinations: ``rk_combine`` and ``finish_control``'s solution, whose backward is the fused
``rk_combine_backward``, on ext (a stage list) and triton (a ``[S, G, N]`` stage buffer; the interpreter on CPU).
gradcheck in float64 (odd sizes, strided inputs, the step's gradient), the backward op against the reference's own
autograd, non-differentiable controller outputs, opcheck with the autograd checks."""

import pytest
import torch
from torch.autograd import gradcheck

from . import _calls as C
from ._calls import ADAPTIVE, F64, assert_rounding_close, state, steps, tableau

OP = "rk_combine_backward"  # ext-cuda skips: the backward op has no CUDA kernel (its formulas then run as torch ops)
SHAPES = [(3, 5), (1, 7), (2, 1)]
SHAPE_IDS = ["G3-N5", "G1-N7", "G2-N1"]


def _combine(be, y, K, h, w):
    """``y + h * sum_j w_j K[j]`` through ``be``'s op; the Triton op gets the stages stacked into one buffer (stack is
    differentiable: each stage receives its slot's gradient) and a contiguous y."""
    if be.name == "ext":
        return be.ops.rk_combine(y, list(K)[: len(w)], h, w)
    return be.ops.rk_combine(y.contiguous(), torch.stack(list(K)), h, *C._weights(w, y.device))


def _leaves(G, N, S, contiguous, device, h_grad=True):
    y = state(G, N, F64, device, contiguous).requires_grad_()
    K = [state(G, N, F64, device, contiguous, seed=10 + j).requires_grad_() for j in range(S)]
    h = steps(G, F64, device).requires_grad_(h_grad)
    return y, K, h


# The interpreter costs about a millisecond per launch (more under load): Triton runs a smaller matrix and checks a
# random projection of the Jacobian (gradcheck's fast mode).
TRITON_CASES = [pytest.param("dopri5", False, (3, 5), id="dopri5-strided-G3-N5"),
                pytest.param("bosh3", True, (1, 7), id="bosh3-contig-G1-N7")]


@pytest.mark.parametrize("be", C.backends(OP, names=("triton",)))
@pytest.mark.parametrize("method, contiguous, shape", TRITON_CASES)
def test_triton_gradcheck_every_row(be, method, contiguous, shape):
    test_gradcheck_every_row(be, method, contiguous, shape)


@pytest.mark.parametrize("be", C.backends(OP, names=("ext",)))
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_gradcheck_every_row(be, method, contiguous, shape):
    """Every stage input and the solution: gradients w.r.t. y, each stage and h against finite differences."""
    tab = tableau(method)
    G, N = shape
    y, K, h = _leaves(G, N, tab.num_stages, contiguous, be.device)
    fast = be.name == "triton"
    for w in [tab.a[i][:i] for i in range(1, tab.num_stages)] + [tab.b]:
        w = [float(v) for v in w]

        def f(y, h, *K, w=w):
            return _combine(be, y, K, h, w)

        assert gradcheck(f, (y, h, *K), eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=fast)


@pytest.mark.parametrize("be", C.backends(OP))
@pytest.mark.parametrize("method", ADAPTIVE)
def test_backward_matches_the_reference(be, method):
    if be.name == "triton" and method not in ("dopri5", "fehlberg2"):
        pytest.skip("the interpreter's time: triton checks dopri5 (7 stages) and fehlberg2 (zero weights)")
    """The fused backward's stage and step gradients vs autograd through the reference; zero-weight stages get none
    (the reference skips them)."""
    tab = tableau(method)
    G, N = 7, 63
    y, K, h = _leaves(G, N, tab.num_stages, True, be.device)
    g = state(G, N, F64, be.device, seed=5)
    w = [float(v) for v in tab.b]
    out = _combine(be, y, K, h, w)
    got = torch.autograd.grad(out, [y, h] + [k for k, v in zip(K, w) if v != 0.0], g)
    ref = torch.autograd.grad(C.REF.rk_combine(y, K, h, w), [y, h] + [k for k, v in zip(K, w) if v != 0.0], g)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-13, atol=1e-13)
    for a, b in zip(got[2:], ref[2:]):
        assert torch.equal(a, b)  # (h * g) * w_j: the same two roundings as the reference's autograd
    zero = [k for k, v in zip(K, w) if v == 0.0]
    if zero and be.name == "ext":
        assert torch.autograd.grad(_combine(be, y, K, h, w), zero, g, allow_unused=True)[0] is None
    elif zero:  # the buffer's slot of a zero weight gets an exact zero gradient
        assert torch.equal(torch.autograd.grad(_combine(be, y, K, h, w), zero, g)[0], torch.zeros_like(g))


@pytest.mark.parametrize("be", C.backends(OP, names=("ext",)))
def test_backward_op_shapes_and_no_step_gradient(be):
    """``rk_combine_backward`` alone: one gradient per nonzero weight, an empty step gradient when not asked, and the
    stages left out then; float32 against the float64 formula."""
    G, N = 5, 9
    for dtype in (torch.float32, F64):
        g = state(G, N, dtype, be.device, seed=3)
        K = [state(G, N, dtype, be.device, seed=20 + j) for j in range(3)]
        h = steps(G, dtype, be.device)
        w = [0.5, 0.0, -1.25]
        gk, gh = be.ops.rk_combine_backward(g, K, h, w, True)
        assert len(gk) == 2
        for gj, wj in zip(gk, (0.5, -1.25)):
            assert_rounding_close(gj, (g.double() * h.double()[:, None] * wj).to(dtype),
                                  (g.double() * h.double()[:, None] * wj).abs(), ulps=2)
        acc = 0.5 * K[0].double() - 1.25 * K[2].double()
        bound = (g.double().abs() * (0.5 * K[0].double().abs() + 1.25 * K[2].double().abs())).sum(1) * N
        assert_rounding_close(gh, (g.double() * acc).sum(1).to(dtype), bound)
        gk2, gh2 = be.ops.rk_combine_backward(g, [], h, w, False)
        assert gh2.numel() == 0 and all(torch.equal(a, b) for a, b in zip(gk, gk2))


@pytest.mark.parametrize("be", C.backends(OP))
def test_finish_control_solution_gradient(be):
    """finish_control's y_new carries the solution's gradient (gradcheck); ratio, next step and controller memory
    carry none, as in the reference."""
    tab = tableau("dopri5")
    G, N = 3, 4
    y, K, h = _leaves(G, N, tab.num_stages, False, be.device)
    cfg = C.ControllerConfig(order=tab.order)

    def f(y, h, *K):
        return C.finish_control(be, tab, y, K, h, 1e-6, 1e-8, C.RMSNorm(), cfg, h.detach(),
                                torch.ones(G, dtype=F64), torch.ones(G, dtype=torch.bool))

    out = f(y, h, *K)
    assert out[0].requires_grad and not any(o.requires_grad for o in out[1:])
    assert gradcheck(lambda *a: f(*a)[0], (y, h, *K), eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=be.name == "triton")


@pytest.mark.parametrize("be", C.backends(OP, names=("ext",)))
def test_opcheck_with_autograd(be):
    """opcheck on inputs that require grad runs the autograd registration checks; the backward op too."""
    y, K, h = _leaves(3, 5, 4, True, be.device)
    torch.library.opcheck(be.ops.rk_combine.default, (y, K, h, [0.1, 0.0, 0.3, -0.2]))
    g = state(3, 5, F64, be.device, seed=9)
    torch.library.opcheck(be.ops.rk_combine_backward.default, (g, [k.detach() for k in K], h.detach(),
                                                               [0.1, 0.0, 0.3, -0.2], True))


@pytest.mark.parametrize("be", C.backends(OP, names=("triton",)))
def test_triton_opcheck_with_autograd(be):
    """The Triton ops with inputs that require grad, and the backward op, pass opcheck."""
    y, K, h = _leaves(3, 5, 4, True, be.device)
    Kb = torch.stack(K).detach().requires_grad_()
    w, idx = C._weights([0.1, 0.0, 0.3, -0.2], be.device)
    torch.library.opcheck(be.ops.rk_combine.default, (y, Kb, h, w, idx))
    g = state(3, 5, F64, be.device, seed=9)
    for need_h in (True, False):
        torch.library.opcheck(be.ops.rk_combine_backward.default, (g, Kb.detach(), h.detach(), w, idx, -1, need_h))


@pytest.mark.parametrize("be", C.backends(OP, names=("ext",)))
@pytest.mark.parametrize("method", ["dopri5", "fehlberg2"])
def test_second_derivative(be, method):
    """create_graph: the backward records its own graph (the formulas as ATen ops), so gradgradcheck holds for the
    stage input, the solution and finish_control's y_new, with and without the step's gradient."""
    tab = tableau(method)
    G, N = 3, 5
    for h_grad in (True, False):
        y, K, h = _leaves(G, N, tab.num_stages, False, be.device, h_grad=h_grad)
        w = [float(v) for v in tab.b]
        cfg = C.ControllerConfig(order=tab.order)

        def comb(y, h, *K, w=w):
            return _combine(be, y, K, h, w)

        def fin(y, h, *K, cfg=cfg):
            return C.finish_control(be, tab, y, K, h, 1e-6, 1e-8, C.RMSNorm(), cfg, h.detach(),
                                    torch.ones(G, dtype=F64), torch.ones(G, dtype=torch.bool))[0]

        for f in (comb, fin):
            args = (y, h, *K)
            wrt = [a for a in args if a.requires_grad]
            C.assert_second_derivative(f, args, wrt, state(G, N, F64, be.device, seed=6))
