"""The C++ extension's CUDA ops (``csrc/cuda``) on a GPU: parity with the torch reference where the launch geometry
matters (grids past 65,535 blocks, rows and columns past one block, strided inputs), poisoned outputs, whole solves
and the adjoint forced onto ``ext``, and the host syncs of a solve.

The ops at the sizes of every other op test run as the ``ext-cuda`` twins in ``tests/ops``. Everything here needs a
CUDA device and a build of ``fastnode._C`` with its CUDA sources (``make gpu-check`` builds one); elsewhere the module
skips with the reason. Fresh memory is poisoned: ``torch.use_deterministic_algorithms`` fills every ``empty`` (the
extension's ``at::empty`` too) with NaN, so an element an op forgets to write fails.
"""

from __future__ import annotations

import pytest
import torch

from fastnode import last_stats, odeint, odeint_adjoint
from fastnode._options import ControllerConfig, RMSNorm
from fastnode.backends import ext_ops, get_backend
from fastnode.backends.torch_ops import TorchStepOps
from fastnode.solvers import SOLVERS

from tests.cuda_syncs import count_syncs
from tests.ops._calls import EPS, assert_rounding_close, combo_bound


def _why_skip() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if not ext_ops.available():
        return f"fastnode._C is not built ({ext_ops._LOAD_ERROR})"
    return ext_ops.unavailable_reason(torch.device("cuda"))


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))]

F32, F64 = torch.float32, torch.float64
DTYPES = [pytest.param(F32, id="f32"), pytest.param(F64, id="f64")]
REF = TorchStepOps()
# The CUDA launches cap their grids at 65,535 blocks of 256 threads: one more row than that many threads.
PAST_GRID = 65535 * 256 + 17


@pytest.fixture(autouse=True)
def poison_fresh_memory():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(prev)


def _randn(*shape, dtype, seed, strided=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if not strided:
        return torch.randn(*shape, generator=g, device="cuda", dtype=dtype)
    # Every other column of a twice as wide tensor: same shape, column stride 2.
    return torch.randn(*shape[:-1], 2 * shape[-1], generator=g, device="cuda", dtype=dtype)[..., ::2]


def _steps(G, dtype, seed=5):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.logspace(-3, -1, G, device="cuda", dtype=F64)[torch.randperm(G, generator=g, device="cuda")]
            .to(dtype))


def _finish_args(tab, y, K, hy, h_ctl, rtol=1e-3, atol=1e-4, norm=None):
    G = y.shape[0]
    prev = torch.ones(G, dtype=F64, device="cuda")
    running = torch.ones(G, dtype=torch.bool, device="cuda")
    return (tab, y, K, hy, rtol, atol, norm or RMSNorm(), ControllerConfig(order=tab.order), h_ctl, prev, running)


def _ext_finish(tab, y, K, hy, rtol, atol, norm, cfg, h_ctl, prev, running, floor=None):
    rt, rs = ext_ops.tol_args(rtol, y.shape[1])
    at, as_ = ext_ops.tol_args(atol, y.shape[1])
    return torch.ops.fastnode.finish_control(y, list(K), hy, list(tab.b), list(tab.e), rt, rs, at, as_,
                                             norm.bounds(y.shape[1]), h_ctl, prev, running, floor, cfg.as_floats())


def _check_finish(got, ref, y, K, hy, tab, dtype):
    """Every output written and equal to the reference up to rounding (decisions where the ratio is clear of 1)."""
    y_new, ratio, ok, accept, h_next, prev_out = got
    assert_rounding_close(y_new, ref[0], combo_bound(y, K, hy, tab.b))
    for flag in (ok, accept):
        assert int(flag.view(torch.uint8).max()) <= 1, "a flag was never written"
    assert torch.equal(ok, ref[2])
    assert not torch.isnan(ratio).any() and not torch.isnan(h_next).any() and not torch.isnan(prev_out).any()
    rtol = 16 * EPS[dtype] if dtype == F32 else 64 * EPS[F64]
    torch.testing.assert_close(ratio, ref[1].to(F64), rtol=rtol, atol=0.0)
    clear = (ref[1].to(F64) - 1.0).abs() > 4 * rtol
    assert torch.equal(accept[clear], ref[3][clear])
    torch.testing.assert_close(h_next[clear], ref[4][clear], rtol=rtol + 64 * EPS[F64], atol=0.0)


# --- the ops where the launch geometry matters --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G, N", [(PAST_GRID, 1), (3, 256 * 1024 + 77), (1000, 777)],
                         ids=["rows-past-grid", "columns-past-1024-blocks", "odd"])
def test_finish_control_every_row_and_column(dtype, G, N):
    """Rows past the 65,535-block grid (the row loop of pass 1, the grid-stride loop of pass 2) and rows wider than
    1,024 blocks of 256 columns (the column loop): every output written, equal to the reference."""
    tab = SOLVERS["dopri5"].tableau
    y = _randn(G, N, dtype=dtype, seed=1)
    K = [_randn(G, N, dtype=dtype, seed=10 + j) for j in range(tab.num_stages)]
    h_ctl = _steps(G, F64)
    hy = h_ctl.to(dtype)
    args = _finish_args(tab, y, K, hy, h_ctl)
    _check_finish(_ext_finish(*args), REF.finish_control(*args), y, K, hy, tab, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [301, 45], ids=["block-per-row", "warp-per-row"])
def test_finish_control_strided_inputs_and_tolerances(dtype, N):
    """Non-contiguous state, stages, step and per-row tolerances; two norm segments; a non-finite last stage; rows
    wider than 256 columns (a block per row) and narrower (a warp per row)."""
    tab = SOLVERS["tsit5"].tableau
    G = 37
    y = _randn(G, N, dtype=dtype, seed=2, strided=True)
    K = [_randn(G, N, dtype=dtype, seed=20 + j, strided=True) for j in range(tab.num_stages)]
    K[-1][5, N - 1] = float("inf")  # row 5 fails, the others do not
    h_ctl = _steps(2 * G, F64)[::2]
    hy = h_ctl.to(dtype)
    rtol = _randn(G, N, dtype=dtype, seed=3, strided=True)
    rtol.abs_().mul_(1e-3)  # in place: the view keeps its strides
    atol = torch.full((1, N), 1e-5, dtype=dtype, device="cuda")
    assert not (y.is_contiguous() or K[0].is_contiguous() or h_ctl.is_contiguous() or rtol.is_contiguous())
    args = _finish_args(tab, y, K, hy, h_ctl, rtol, atol, RMSNorm([(0, N // 3), (N // 3, N)]))
    got, ref = _ext_finish(*args), REF.finish_control(*args)
    _check_finish(got, ref, y, K, hy, tab, dtype)
    assert not bool(got[2][5]) and bool(got[2].sum() == G - 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G, N, strided", [(PAST_GRID, 1, False), (9, 1001, True), (1, 1, False)],
                         ids=["past-grid", "strided", "one"])
def test_rk_combine(dtype, G, N, strided):
    tab = SOLVERS["dopri8"].tableau  # 14 stages: the longest weight lists
    y = _randn(G, N, dtype=dtype, seed=4, strided=strided)
    K = [_randn(G, N, dtype=dtype, seed=40 + j, strided=strided) for j in range(tab.num_stages)]
    h = _steps(G, dtype)
    for w in (tab.a[tab.num_stages - 1][: tab.num_stages - 1], tab.b, tab.a[1][:1]):
        w = [float(v) for v in w]
        got = torch.ops.fastnode.rk_combine(y, K[: len(w)], h, w)
        assert got.is_contiguous()
        assert_rounding_close(got, REF.rk_combine(y, K, h, w), combo_bound(y, K, h, w))


@pytest.mark.parametrize("dtype", DTYPES)
def test_adjoint_weights_past_the_grid(dtype):
    """S * G past the 65,535-block grid (the grid-stride loop): every weight written, exactly the closed form."""
    b = [float(v) for v in SOLVERS["dopri5"].tableau.b]
    G = PAST_GRID // len(b) + 1000
    h = _steps(G, dtype)
    accept = torch.arange(G, device="cuda") % 3 != 0
    w = torch.ops.fastnode.adjoint_weights(h, accept, b)
    expect = torch.tensor(b, dtype=dtype, device="cuda")[:, None] * torch.where(accept, h, 0)[None, :]
    assert torch.equal(w, expect)


def test_ops_make_no_host_sync():
    """The three CUDA ops never block the host (after a first call)."""
    tab = SOLVERS["dopri5"].tableau
    y = _randn(64, 257, dtype=F64, seed=6)
    K = [_randn(64, 257, dtype=F64, seed=60 + j) for j in range(tab.num_stages)]
    h_ctl = _steps(64, F64)
    args = _finish_args(tab, y, K, h_ctl, h_ctl)

    def step():
        torch.ops.fastnode.rk_combine(y, K[:5], h_ctl, [float(v) for v in tab.a[5][:5]])
        torch.ops.fastnode.adjoint_weights(h_ctl, args[-1], [float(v) for v in tab.b])
        return _ext_finish(*args)

    step()
    _, n = count_syncs(step)
    assert n == 0


# --- whole solves forced onto ext -----------------------------------------------------------------------------------

def _field(t, y):
    tt = t.reshape(-1, 1) if t.dim() else t
    return torch.cos(3 * tt) * y - 0.3 * y**3 / (1 + y**2) + 0.1 * y.roll(1, dims=1)


def _pair(method, per_sample, dtype, B=33, N=5):
    y0 = _randn(B, N, dtype=dtype, seed=B)
    t = torch.linspace(0, 1, 6, dtype=dtype, device="cuda")
    tol = {"rtol": 1e-7, "atol": 1e-9} if dtype == F64 else {"rtol": 1e-4, "atol": 1e-6}
    out = {}
    with torch.no_grad():
        for backend in ("torch", "ext"):
            ys = odeint(_field, y0, t, method=method, options={"per_sample": per_sample, "backend": backend}, **tol)
            out[backend] = (ys, last_stats())
    return out


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_whole_solve_on_ext_matches_torch(method, per_sample):
    res = _pair(method, per_sample, F64)
    (a, sa), (b, sb) = res["torch"], res["ext"]
    assert sb.backend == "ext" and sa.backend == "torch"
    assert sa.nfe == sb.nfe
    for name in ("n_accepted", "n_rejected"):
        assert torch.equal(torch.as_tensor(getattr(sa, name)), torch.as_tensor(getattr(sb, name))), name
    steps = int(torch.as_tensor(sa.n_accepted).max())
    tol = 64 * EPS[F64] * max(steps, 1)
    torch.testing.assert_close(b, a, rtol=tol, atol=tol)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_whole_solve_float32_on_ext(per_sample):
    """float32: the error against the float64 solve within 2x the reference backend's own (see tests/backends)."""
    ref = _pair("dopri5", per_sample, F64)["torch"][0]
    res = _pair("dopri5", per_sample, F32)
    err = {k: (v[0].double() - ref).abs().max().item() for k, v in res.items()}
    assert res["ext"][1].backend == "ext"
    assert err["ext"] <= 2 * err["torch"] + 1e-6, err


class _MLP(torch.nn.Module):
    def __init__(self, n=4, hidden=16):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w1 = torch.nn.Parameter(torch.randn(n, hidden, generator=g, dtype=F64) * 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(hidden, n, generator=g, dtype=F64) * 0.5)

    def forward(self, t, y):
        return torch.tanh(y @ self.w1) @ self.w2 - 0.5 * y


def _adjoint(backend, per_sample, method="dopri5", t_end=0.8, B=9):
    func = _MLP().cuda()
    y0 = _randn(B, 4, dtype=F64, seed=7).requires_grad_(True)
    t = torch.linspace(0.0, t_end, 3, dtype=F64, device="cuda")
    opts = {"backend": backend, "per_sample": per_sample}
    out = odeint_adjoint(func, y0, t, rtol=1e-7, atol=1e-9, method=method, options=opts, adjoint_options=opts)
    st = last_stats()
    (out * torch.arange(1, 5, dtype=F64, device="cuda")).sum().backward()
    return out.detach(), [y0.grad] + [p.grad for p in func.parameters()], st


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
def test_adjoint_on_ext_matches_torch(per_sample, method):
    a, ga, sa = _adjoint("torch", per_sample, method)
    b, gb, sb = _adjoint("ext", per_sample, method)
    assert sb.backend == "ext" and sb.backward.backend == "ext"
    assert sa.backward.nfe == sb.backward.nfe
    for name in ("n_accepted", "n_rejected"):
        x, z = getattr(sa.backward, name), getattr(sb.backward, name)
        assert torch.equal(torch.as_tensor(x), torch.as_tensor(z)), name
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13)
    for x, z in zip(ga, gb):
        torch.testing.assert_close(z, x, rtol=1e-10, atol=1e-12)


# --- host syncs ----------------------------------------------------------------------------------------------------

def _solve_syncs(backend, per_sample, t_end):
    y0 = _randn(16, 3, dtype=F64, seed=8)
    t = torch.tensor([0.0, t_end], dtype=F64, device="cuda")
    with torch.no_grad():
        _, n = count_syncs(lambda: odeint(_field, y0, t, rtol=1e-8, atol=1e-10,
                                          options={"backend": backend, "per_sample": per_sample}))
    return n, last_stats()


@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_one_host_sync_per_step(backend, per_sample):
    """A longer solve makes exactly one more host sync per extra loop iteration, and the solver counts them."""
    _solve_syncs(backend, per_sample, 1.0)  # first use: constant uploads
    n1, s1 = _solve_syncs(backend, per_sample, 1.0)
    n2, s2 = _solve_syncs(backend, per_sample, 4.0)
    assert s1.backend == s2.backend == backend
    assert s2.n_iterations > s1.n_iterations + 5
    assert n2 - n1 == s2.n_iterations - s1.n_iterations, (n1, n2, s1.n_iterations, s2.n_iterations)
    assert s2.n_host_syncs - s1.n_host_syncs == s2.n_iterations - s1.n_iterations


def test_ext_cuda_ops_registered():
    """The build has every CUDA op the csrc/cuda sources define, and fastnode reports the extension on CUDA."""
    for op in ("rk_combine", "finish_control", "adjoint_weights"):
        assert ext_ops._has_kernel(op, "CUDA"), op
    assert get_backend("ext", torch.device("cuda")).name == "ext"
