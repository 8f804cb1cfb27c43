"""odeint_adjoint: gradients against independent truth, per-sample control with rejections, memory, errors.

Truth, in order of independence: closed forms (linear ODEs), ``gradcheck`` (finite differences), and backprop
through ``fastnode.odeint`` (the reference path: no adjoint code involved) at tight tolerances in float64.
The adjoint's gradient is a different discretisation of the same derivative, so agreement is measured
relative to the gradient's size with a bound a few hundred times the tolerance.

Low-order methods (bosh3, fehlberg2, adaptive_heun) would need 10^4 - 10^6 steps at rtol=1e-10; they are
checked at a tolerance their order affords (``_METHOD_TOL``) against a dopri8 reference at rtol=1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

import fastnode
from fastnode import ADAPTIVE_METHODS, odeint, odeint_adjoint, odeint_event

DT = torch.float64

# method -> (rtol, atol, allowed relative gradient error)
_METHOD_TOL = {
    "dopri5": (1e-10, 1e-12, 1e-7),
    "tsit5": (1e-10, 1e-12, 1e-7),
    "dopri8": (1e-10, 1e-12, 1e-7),
    "bosh3": (1e-8, 1e-10, 1e-5),
    "fehlberg2": (1e-5, 1e-7, 1e-3),
    "adaptive_heun": (1e-5, 1e-7, 1e-3),
}
assert set(_METHOD_TOL) == set(ADAPTIVE_METHODS)


class Field(nn.Module):
    """dy/dt = W2 tanh(W1 y + b1) * cos(t) + b2: nonlinear, non-autonomous; ``unused`` never enters."""

    def __init__(self, n=3, hidden=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(n, hidden).to(DT)
        self.l2 = nn.Linear(hidden, n).to(DT)
        self.unused = nn.Linear(2, 2).to(DT)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.7)

    def forward(self, t, y):
        tt = t if t.dim() == 0 else t.unsqueeze(-1)
        return self.l2(torch.tanh(self.l1(y))) * torch.cos(tt)


def _y0(B=4, n=3, seed=1):
    return torch.randn(B, n, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _weights(shape, seed=3):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _grads(solve, func, y0, t, **kw):
    """Gradients of a weighted sum of all outputs w.r.t. (y0, t, *func.parameters())."""
    func.zero_grad(set_to_none=True)
    y0 = y0.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    ys = solve(func, y0, t, **kw)
    if isinstance(ys, tuple):
        loss = sum((y * _weights(y.shape, 3 + i)).sum() for i, y in enumerate(ys))
    else:
        loss = (ys * _weights(ys.shape)).sum()
    loss.backward()
    ps = [p.grad if p.grad is not None else torch.zeros_like(p) for p in func.parameters()]
    return [y0.grad, t.grad, *ps]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _assert_close(got, ref, bound, names=None):
    for i, (g, r) in enumerate(zip(got, ref)):
        if r.abs().max() == 0:
            assert g.abs().max() == 0, f"{names[i] if names else i}: expected exactly zero"
            continue
        err = _rel(g, r)
        assert err < bound, f"{names[i] if names else i}: relative error {err:.2e} >= {bound:.0e}"


NAMES = ["y0", "t", "l1.weight", "l1.bias", "l2.weight", "l2.bias", "unused.weight", "unused.bias"]


@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
@pytest.mark.parametrize("direction", ["increasing", "decreasing"])
def test_matches_backprop_every_method(method, direction):
    rtol, atol, bound = _METHOD_TOL[method]
    f = Field()
    t = torch.tensor([0.0, 0.4, 1.1, 1.5], dtype=DT)
    if direction == "decreasing":
        t = t.flip(0)
    got = _grads(odeint_adjoint, f, _y0(), t, rtol=rtol, atol=atol, method=method)
    ref = _grads(odeint, f, _y0(), t, rtol=1e-12, atol=1e-14, method="dopri8")
    # time gradients of backprop through a discretisation are only O(tol) accurate: checked against
    # finite differences in test_time_gradients_finite_differences instead.
    _assert_close(got[:1] + got[2:], ref[:1] + ref[2:], bound, NAMES[:1] + NAMES[2:])
    assert torch.equal(got[-1], torch.zeros_like(got[-1])) and torch.equal(got[-2], torch.zeros_like(got[-2]))


@pytest.mark.parametrize("T", [2, 3, 7, 20])
@pytest.mark.parametrize("norm", ["default", "seminorm", "mixed"])
def test_output_counts_and_norms(T, norm):
    f = Field()
    t = torch.linspace(0.0, 2.0, T, dtype=DT)
    opts = {} if norm == "default" else {"norm": norm}
    got = _grads(odeint_adjoint, f, _y0(), t, rtol=1e-10, atol=1e-12, adjoint_options=opts)
    ref = _grads(odeint, f, _y0(), t, rtol=1e-12, atol=1e-14)
    _assert_close(got[:1] + got[2:], ref[:1] + ref[2:], 1e-7, NAMES[:1] + NAMES[2:])


FIXED_ORDERS = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}


@pytest.mark.parametrize("method", list(FIXED_ORDERS))
def test_fixed_grid_adjoint_converges_at_method_order(method):
    """Fixed-grid adjoint (torchdiffeq's ``method="rk4", options={"step_size": h}`` use): the gradient error
    against a dopri8 reference at rtol=1e-12 falls as h^order when the step halves (measured ratios: 1.97,
    4.02, 3.99, 7.94, 15.5)."""
    f = Field()
    t = torch.tensor([0.0, 0.4, 1.1, 1.5], dtype=DT)
    ref = _grads(odeint, f, _y0(), t, rtol=1e-12, atol=1e-14, method="dopri8")
    errs = []
    for h in (0.02, 0.01):
        got = _grads(odeint_adjoint, f, _y0(), t, method=method, options={"step_size": h})
        errs.append(max(_rel(g, r) for g, r in zip(got[:1] + got[2:6], ref[:1] + ref[2:6])))
    p = FIXED_ORDERS[method]
    assert 0.75 * 2**p < errs[0] / errs[1] < 1.3 * 2**p, errs
    assert fastnode.last_stats().backward.n_accepted >= 150  # 1.5 / 0.01 steps (+ output times)


def test_mixed_methods_forward_adaptive_backward_fixed():
    f = Field()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    got = _grads(odeint_adjoint, f, _y0(), t, rtol=1e-10, atol=1e-12, adjoint_method="rk4",
                 adjoint_options={"step_size": 0.005})
    ref = _grads(odeint, f, _y0(), t, rtol=1e-12, atol=1e-14)
    _assert_close(got[:1] + got[2:], ref[:1] + ref[2:], 1e-7, NAMES[:1] + NAMES[2:])


def test_time_gradients_finite_differences():
    """dL/dt_i from the adjoint (g_i . f(t_i, y_i) and -a(t_0) . f(t_0, y_0)) against central differences."""
    f = Field()
    t = torch.tensor([0.1, 0.5, 0.9, 1.6], dtype=DT)
    y0 = _y0()
    g = _grads(odeint_adjoint, f, y0, t, rtol=1e-11, atol=1e-13)[1]
    w = _weights((4, *y0.shape))

    def loss(tt):
        with torch.no_grad():
            return float((odeint(f, y0, tt, rtol=1e-13, atol=1e-15) * w).sum())

    eps = 1e-5
    fd = []
    for i in range(4):
        tp, tm = t.clone(), t.clone()
        tp[i] += eps
        tm[i] -= eps
        fd.append((loss(tp) - loss(tm)) / (2 * eps))
    fd = torch.tensor(fd, dtype=DT)
    assert (g - fd).abs().max() < 1e-8 * fd.abs().max()


class TupleField(nn.Module):
    """Coupled tuple state (x [B, 2], v [B, 3])."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.A = nn.Parameter(torch.randn(2, 3, generator=g, dtype=DT) * 0.5)
        self.B = nn.Parameter(torch.randn(3, 2, generator=g, dtype=DT) * 0.5)

    def forward(self, t, state):
        x, v = state
        tt = t if t.dim() == 0 else t.unsqueeze(-1)  # [B] in per-sample mode
        return torch.tanh(v @ self.A.T) - 0.1 * x, torch.sin(x @ self.B.T) * (1 + tt)


def test_tuple_state():
    f = TupleField()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, generator=g, dtype=DT, requires_grad=True)
    v0 = torch.randn(4, 3, generator=g, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=DT)

    def run(solve, **kw):
        f.zero_grad(set_to_none=True)
        x, v = x0.detach().clone().requires_grad_(), v0.detach().clone().requires_grad_()
        xs, vs = solve(f, (x, v), t, **kw)
        ((xs * _weights(xs.shape, 1)).sum() + (vs * _weights(vs.shape, 2)).sum()).backward()
        return [x.grad, v.grad, f.A.grad, f.B.grad]

    got = run(odeint_adjoint, rtol=1e-10, atol=1e-12)
    ref = run(odeint, rtol=1e-12, atol=1e-14)
    _assert_close(got, ref, 1e-7)


# --------------------------------------------------------------------------------------------------------------
# Per-sample step control: each sample accepts/rejects on its own in the backward solve too.
# --------------------------------------------------------------------------------------------------------------

class VdP(nn.Module):
    """Van der Pol, one learnable mu per sample, plus a shared learnable scale: stiff and easy samples mixed."""

    def __init__(self, mu):
        super().__init__()
        self.mu = nn.Parameter(mu.clone())
        self.scale = nn.Parameter(torch.tensor(1.0, dtype=DT))

    def forward(self, t, y):
        x, v = y[:, 0], y[:, 1]
        return torch.stack([v * self.scale, self.mu * (1 - x * x) * v - x], dim=1)


@pytest.mark.parametrize("times", ["shared", "per-sample"])
def test_per_sample_forced_rejections(times):
    """A first step far too large (every sample rejects) and stiff/easy samples mixed (rejections at
    different iterations): gradients still match, so rejected samples' parameter contributions were dropped."""
    # NOTE: mu up to 5 over t <= 2.2: stiffer samples make the reverse-time problem ill-conditioned (at mu=8 over
    # t=3 the gradient itself is only good to ~1e-5 at rtol=1e-9, for backprop and adjoint alike).
    mu = torch.tensor([0.3, 3.0, 1.0, 5.0, 0.5], dtype=DT)
    f = VdP(mu)
    y0 = torch.stack([torch.linspace(1.0, 2.0, 5, dtype=DT), torch.zeros(5, dtype=DT)], dim=1)
    if times == "shared":
        t = torch.linspace(0.0, 2.0, 4, dtype=DT)
    else:  # irregular per-sample output times [B, T]
        t = torch.stack([torch.tensor([0.0, 0.5, 1.3, 2.0]) * (1 + 0.1 * b) for b in range(5)]).to(DT)
    opts = {"per_sample": True, "first_step": 2.0}
    got = _grads(odeint_adjoint, f, y0, t, rtol=1e-10, atol=1e-12, options=opts)
    st = fastnode.last_stats()
    rej = st.backward.n_rejected
    assert rej.min() >= 1, "the large first step must be rejected by every sample"
    assert len(set(rej.tolist())) > 1, "samples should reject different numbers of steps"
    ref = _grads(odeint, f, y0, t, rtol=1e-13, atol=1e-15, options={"per_sample": True})
    names = ["y0", "t", "mu", "scale"]
    _assert_close(got[:1] + got[2:], ref[:1] + ref[2:], 1e-7, names[:1] + names[2:])
    if times == "shared":  # and against a shared-step solve of the same batch
        shared = _grads(odeint, f, y0, t, rtol=1e-13, atol=1e-15)
        _assert_close(got[2:], shared[2:], 1e-7, names[2:])


def test_per_sample_rows_independent():
    """Per-sample adjoint: one sample's gradient does not depend on what else is in the batch."""
    mu = torch.tensor([0.5, 6.0, 2.0], dtype=DT)
    y0 = torch.tensor([[1.5, 0.0], [2.0, 0.5], [1.0, -1.0]], dtype=DT)
    t = torch.linspace(0.0, 2.0, 3, dtype=DT)
    opts = {"per_sample": True}

    def g_of(idx):
        f = VdP(mu[idx])
        y = y0[idx].clone().requires_grad_(True)
        ys = odeint_adjoint(f, y, t, rtol=1e-8, atol=1e-10, options=opts)
        ys[-1, :, 0].sum().backward()
        return y.grad, f.mu.grad

    gy_all, gmu_all = g_of([0, 1, 2])
    for i in range(3):
        gy, gmu = g_of([i])
        torch.testing.assert_close(gy_all[i], gy[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gmu_all[i], gmu[0], rtol=1e-12, atol=1e-14)


class SqrtField(nn.Module):
    """dy/dt = w * sqrt(y): NaN below y = 0, which an over-long backward step reaches for small samples."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.3, dtype=DT))

    def forward(self, t, y):
        return self.w * torch.sqrt(y)


def test_per_sample_nonfinite_rejection_does_not_poison_parameters(monkeypatch):
    """In one backward iteration a sample's stages hit NaN (rejected) while others accept: the shared parameter
    gradient must still match (0 * NaN from the rejected rows would otherwise poison it; without the subset
    re-evaluation this test fails)."""
    from fastnode._adjoint_dynamics import PerSampleQuadrature

    subset_calls = []
    orig = PerSampleQuadrature._retire_subset
    monkeypatch.setattr(PerSampleQuadrature, "_retire_subset", lambda self, e: subset_calls.append(1) or orig(self, e))
    f = SqrtField()
    y0 = torch.tensor([[0.02], [1.0], [4.0], [0.05]], dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    kw = {"rtol": 1e-4, "atol": 1e-6, "options": {"per_sample": True}}
    got = _grads(odeint_adjoint, f, y0, t, adjoint_options={"per_sample": True, "first_step": 1.0}, **kw)
    assert torch.isfinite(got[2]).all()
    assert subset_calls, "the test must hit a step where some samples produced NaN while others accepted"
    # exact: y(1) = (sqrt(y0) + w/2)^2
    w = f.w.detach()
    ys = torch.stack([y0, (y0.sqrt() + w / 2) ** 2])
    wt = _weights(ys.shape)
    # dL/dw = sum over samples of weight * dy(1)/dw = wt[1] * (sqrt(y0) + w/2)
    dw = (wt[1] * (y0.sqrt() + w / 2)).sum()
    dy0 = wt[0] + wt[1] * (y0.sqrt() + w / 2) / y0.sqrt()
    assert abs(float(got[2]) - float(dw)) < 1e-3 * abs(float(dw))
    torch.testing.assert_close(got[0], dy0, rtol=1e-3, atol=0)


# --------------------------------------------------------------------------------------------------------------
# Closed forms and finite differences
# --------------------------------------------------------------------------------------------------------------

def test_linear_ode_closed_form():
    """y' = A y: y(T) = expm(A (T - t0)) y0. Gradients of c . y(T) w.r.t. A, y0, t0, T from the matrix exponential."""
    g = torch.Generator().manual_seed(7)
    A0 = torch.randn(3, 3, generator=g, dtype=DT) * 0.6
    y00 = torch.randn(3, generator=g, dtype=DT)
    c = torch.randn(3, generator=g, dtype=DT)
    t_ = torch.tensor([0.2, 1.4], dtype=DT)

    A = A0.clone().requires_grad_(True)
    y0 = y00.clone().requires_grad_(True)
    t = t_.clone().requires_grad_(True)
    ys = odeint_adjoint(lambda tt, y: A @ y, y0, t, rtol=1e-11, atol=1e-13, adjoint_params=(A,))
    (c @ ys[-1]).backward()

    Ae = A0.clone().requires_grad_(True)
    ye = y00.clone().requires_grad_(True)
    te = t_.clone().requires_grad_(True)
    (c @ (torch.linalg.matrix_exp(Ae * (te[1] - te[0])) @ ye)).backward()
    for got, exp in [(A.grad, Ae.grad), (y0.grad, ye.grad), (t.grad, te.grad)]:
        torch.testing.assert_close(got, exp, rtol=1e-8, atol=1e-10)


def test_gradcheck_float64():
    f = Field(n=2, hidden=3)
    names = [n for n, _ in f.named_parameters() if not n.startswith("unused")]
    base = {n: p.detach() for n, p in f.named_parameters()}

    def fn(y0, t, *ps):
        params = dict(base)
        params.update(dict(zip(names, ps)))

        def rhs(tt, y):
            return torch.func.functional_call(f, params, (tt, y))

        return odeint_adjoint(rhs, y0, t, rtol=1e-11, atol=1e-13, adjoint_params=ps)

    y0 = _y0(2, 2).requires_grad_(True)
    t = torch.tensor([0.0, 0.45, 0.8], dtype=DT, requires_grad=True)
    ps = tuple(base[n].clone().requires_grad_(True) for n in names)
    assert gradcheck(fn, (y0, t, *ps), eps=1e-6, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Memory: nothing per step is kept
# --------------------------------------------------------------------------------------------------------------

def _saved_bytes(solve, n_steps):
    f = Field()
    y0 = _y0().requires_grad_(True)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    total = [0]

    def pack(x):
        total[0] += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        ys = solve(f, y0, t, rtol=1e-3, atol=1e-3, options={"max_step": 1.0 / n_steps, "first_step": 1.0 / n_steps})
    assert fastnode.last_stats().n_accepted >= n_steps
    return total[0], ys


def test_graph_does_not_grow_with_steps():
    small, _ = _saved_bytes(odeint_adjoint, 10)
    large, _ = _saved_bytes(odeint_adjoint, 1000)
    assert small == large
    # contrast: backprop through the solver keeps every step
    bp_small, _ = _saved_bytes(odeint, 10)
    bp_large, _ = _saved_bytes(odeint, 100)
    assert bp_large > 5 * bp_small


# --------------------------------------------------------------------------------------------------------------
# Statistics and backward cost
# --------------------------------------------------------------------------------------------------------------

def test_backward_statistics():
    f = Field()
    y0 = _y0().requires_grad_(True)
    ys = odeint_adjoint(f, y0, torch.linspace(0, 1, 5, dtype=DT), rtol=1e-8, atol=1e-10)
    st = fastnode.last_stats()
    assert st.nfe_backward == 0 and st.backward is None
    ys.sum().backward()
    assert st.nfe_backward == st.backward.nfe > 0
    assert st.n_accepted_backward == st.backward.n_accepted > 0
    assert st.n_rejected_backward == st.backward.n_rejected
    assert st.backward.method == "dopri5" and st.backward.success
    # with time gradients the extra f(t_0, y_0) evaluation is counted in both places
    t = torch.linspace(0, 1, 5, dtype=DT, requires_grad=True)
    odeint_adjoint(f, _y0().requires_grad_(True), t, rtol=1e-8, atol=1e-10).sum().backward()
    st = fastnode.last_stats()
    assert st.nfe_backward == st.backward.nfe > 0


class MLPField(nn.Module):
    """A typical neural-ODE field: dy/dt = W2 tanh(W1 [y, t] + b1) + b2 with 1/sqrt(fan-in) weights."""

    def __init__(self, n=8, hidden=32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1 = nn.Linear(n + 1, hidden).to(DT)
        self.l2 = nn.Linear(hidden, n).to(DT)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT) / p.shape[-1] ** 0.5)
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.l2(torch.tanh(self.l1(torch.cat([y, t.expand(y.shape[0], 1)], dim=1))))


@pytest.mark.parametrize("norm", ["seminorm", "mixed"])
def test_backward_nfe_one_continuous_solve(norm):
    """Backward NFE at len(t)=10 against torchdiffeq's per-interval restarts (a deterministic count, not a
    timing): at most half, with a gradient at least as accurate. "mixed" is torchdiffeq's default norm."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    f = MLPField()
    y0 = 0.5 * torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=DT)
    t = torch.linspace(0, 1, 10, dtype=DT)
    ref = _grads(odeint, f, y0, t, rtol=1e-12, atol=1e-14)
    res = {}
    for name, solve in [("fastnode", odeint_adjoint), ("torchdiffeq", torchdiffeq.odeint_adjoint)]:
        f.calls = 0
        got = _grads(_counting(solve, f, res, name), f, y0, t, rtol=1e-6, atol=1e-8,
                     adjoint_options={"norm": norm} if name == "fastnode" or norm == "seminorm" else {})
        res[name] = (res[name], f.calls - res[name], max(_rel(g, r) for g, r in zip(got[2:], ref[2:])))
    assert res["fastnode"][1] <= 0.5 * res["torchdiffeq"][1], res
    assert res["fastnode"][2] <= 1.5 * res["torchdiffeq"][2], res


@pytest.mark.parametrize("rtol", [1e-5, 1e-7, 1e-8])
def test_default_backward_nfe_at_most_half_at_equal_error(rtol):
    """Issue 13's adjoint target on bench/adjoint_precision.py's MLP problem (N=32, H=64, B=128, t = [0, 1], dopri5,
    atol = rtol), both solvers with their default options: fastnode's backward NFE at most half of torchdiffeq's
    at the same tolerance, with a gradient error (against backprop, dopri8 at 1e-12) no larger. torchdiffeq's NFE
    grows as its error falls, so this bounds the ratio at equal error by the same half (deterministic counts)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    f = MLPField(n=32, hidden=64)
    with torch.random.fork_rng(devices=[]):  # the bench's field: PyTorch's default initialisation, seed 0
        torch.manual_seed(0)
        f.l1, f.l2 = nn.Linear(33, 64).to(DT), nn.Linear(64, 32).to(DT)
    y0 = torch.randn(128, 32, generator=torch.Generator().manual_seed(0)).to(DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    ref = _grads(odeint, f, y0, t, rtol=1e-12, atol=1e-12, method="dopri8")
    res = {}
    for name, solve in [("fastnode", odeint_adjoint), ("torchdiffeq", torchdiffeq.odeint_adjoint)]:
        f.calls = 0
        got = _grads(_counting(solve, f, res, name), f, y0, t, rtol=rtol, atol=rtol)
        err = max(float((g - r).norm() / r.norm()) for g, r in zip(got[:1] + got[2:], ref[:1] + ref[2:]))
        res[name] = (res[name], f.calls - res[name], err)
    assert res["fastnode"][1] <= 0.5 * res["torchdiffeq"][1], res
    assert res["fastnode"][2] <= res["torchdiffeq"][2], res


class _StepLog(Field):
    """``Field`` that records the backward solve's accepted steps ``(t0, dt)`` per sample (user time; ``dt``
    positive backwards, as torchdiffeq passes it; per-sample mode: zero for a sample that did not accept)."""

    def __init__(self):
        super().__init__()
        self.steps = []

    def callback_accept_step_adjoint(self, t0, y0, dt):
        self.steps.append((t0.reshape(-1).tolist(), dt.reshape(-1).tolist()))

    def sample(self, b: int) -> list[tuple[float, float]]:
        return [(t0[b % len(t0)], dt[b % len(dt)]) for t0, dt in self.steps if dt[b % len(dt)] != 0.0]


@pytest.mark.parametrize("per_sample", [False, True])
def test_backward_halves_the_step_before_an_output_time(per_sample):
    """A proposal ``h`` short of the next output time by less than ``h`` (distance ``r`` in ``(h, 2h)``) becomes two
    steps of ``r / 2`` instead of ``h`` and a sliver; a proposal with ``r >= 2h`` is kept. Gradients against backprop
    (``first_step`` forced, so the first interval's steps are known in advance)."""
    t = torch.tensor([0.0, 0.3, 0.5], dtype=DT)
    ref = _grads(odeint, Field(), _y0(), t, rtol=1e-12, atol=1e-14, method="dopri8")
    opts = {"per_sample": True} if per_sample else {}
    # From t = 0.5 the output time 0.3 is 0.2 away: in (0.125, 0.25), so 0.1 twice; 0.2 >= 2 * 0.05 keeps 0.05.
    for first, expect in ((0.125, [0.1, 0.1]), (0.05, [0.05])):
        f = _StepLog()
        got = _grads(odeint_adjoint, f, _y0(), t, rtol=1e-4, atol=1e-6, options=opts,
                     adjoint_options={**opts, "first_step": first})
        _assert_close(got[:1] + got[2:], ref[:1] + ref[2:], 1e-3, NAMES[:1] + NAMES[2:])
        # Samples without a rejection (a rejection would alter the proposals checked below): all of them shared,
        # 3 of 4 per sample.
        clean = (torch.as_tensor(fastnode.last_stats().backward.n_rejected).reshape(-1) == 0).nonzero().flatten()
        assert clean.numel() == (3 if per_sample else 1)
        for b in clean.tolist():
            steps = f.sample(b)
            assert [round(dt, 12) for _, dt in steps[: len(expect)]] == expect, steps
            # No sliver anywhere: a step that lands on an output time is at least as long as the step before it
            # in the same interval (without rejections that step's proposal was at least the previous step).
            for (t0, dt), (t1, dt1) in zip(steps, steps[1:]):
                lands = any(abs(t1 - dt1 - float(tk)) < 1e-12 for tk in t)
                same_interval = not any(abs(t0 - dt - float(tk)) < 1e-12 for tk in t)
                if lands and same_interval:
                    assert dt1 >= dt * (1 - 1e-12), steps


def _counting(solve, f, res, name):
    """``solve`` that records in ``res[name]`` how many func calls the forward made."""

    def run(*a, **kw):
        out = solve(*a, **kw)
        res[name] = f.calls
        return out

    return run


# --------------------------------------------------------------------------------------------------------------
# Events: gradients through the event time (implicit function theorem)
# --------------------------------------------------------------------------------------------------------------

class Decay(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k, dtype=DT))

    def forward(self, t, y):
        return -self.k * y


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
@pytest.mark.parametrize("reverse", [False, True])
def test_event_closed_form(interface, reverse):
    """y' = -k y from t0 until y = c: t* = t0 + log(y0 / c) / k in either direction (with reverse_time the solve
    runs backwards from t0, y grows, and the event y = c > y0 lies before t0)."""
    solve = odeint if interface == "odeint" else odeint_adjoint
    f = Decay(0.7)
    y0 = torch.tensor([2.0], dtype=DT, requires_grad=True)
    t0 = torch.tensor(0.3, dtype=DT, requires_grad=True)
    c = torch.tensor(0.5 if not reverse else 5.0, dtype=DT, requires_grad=True)
    t_ev, sol = odeint_event(f, y0, t0, event_fn=lambda t, y: y[0] - c, reverse_time=reverse,
                             odeint_interface=solve, rtol=1e-11, atol=1e-13)
    k, cv = 0.7, float(c.detach())
    exp_t = 0.3 + math.log(2.0 / cv) / k
    assert (float(t_ev.detach()) < 0.3) == reverse
    assert abs(float(t_ev.detach()) - exp_t) < 1e-8
    torch.testing.assert_close(sol[-1, 0], c.detach(), rtol=1e-8, atol=1e-10)
    (t_ev + 3.0 * sol[-1, 0]).backward()
    # the state at the event is c whatever the inputs: d(sol)/dc = 1, and no other dependence.
    assert abs(float(y0.grad) - 1.0 / (k * 2.0)) < 1e-7
    assert abs(float(t0.grad) - 1.0) < 1e-7
    assert abs(float(f.k.grad) - (-math.log(2.0 / cv) / k**2)) < 1e-7
    assert abs(float(c.grad) - (-1.0 / (k * cv) + 3.0)) < 1e-7


def test_event_per_sample_and_tuple():
    """Projectile (tuple state (height, velocity)) per sample with its own start time: t* of h = 0."""
    g = 9.81
    h0 = torch.tensor([1.0, 2.0, 5.0], dtype=DT, requires_grad=True)
    v0 = torch.tensor([0.5, -1.0, 3.0], dtype=DT, requires_grad=True)
    t0 = torch.tensor([0.0, 0.5, 1.0], dtype=DT, requires_grad=True)

    def field(t, s):
        return s[1], torch.full_like(s[1], -g)

    for solve in (odeint, odeint_adjoint):
        for x in (h0, v0, t0):
            x.grad = None
        kw = {"adjoint_params": ()} if solve is odeint_adjoint else {}
        t_ev, _ = odeint_event(field, (h0, v0), t0, event_fn=lambda t, s: s[0], odeint_interface=solve,
                                      rtol=1e-11, atol=1e-13, options={"per_sample": True}, **kw)
        disc = (v0**2 + 2 * g * h0).sqrt()
        exp_t = t0 + (v0 + disc) / g
        torch.testing.assert_close(t_ev, exp_t.detach(), rtol=1e-9, atol=1e-9)
        t_ev.sum().backward()
        torch.testing.assert_close(h0.grad, (1 / disc).detach(), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(v0.grad, ((1 + v0 / disc) / g).detach(), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(t0.grad, torch.ones(3, dtype=DT), rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------------------------
# Bad input and failures
# --------------------------------------------------------------------------------------------------------------

def test_errors():
    y0 = _y0()
    t = torch.tensor([0.0, 1.0], dtype=DT)
    f = Field()
    with pytest.raises(ValueError, match="nn.Module"):
        odeint_adjoint(lambda tt, y: -y, y0, t)
    with pytest.raises(TypeError, match="single tensor"):
        odeint_adjoint(f, y0, t, adjoint_params=torch.ones(2, requires_grad=True))
    with pytest.raises(TypeError, match=r"adjoint_params\[1\] must be a torch.Tensor"):
        odeint_adjoint(f, y0, t, adjoint_params=(f.l1.weight, 3.0))
    with pytest.raises(ValueError, match="adjoint_options"):
        odeint_adjoint(f, y0, t, method="dopri5", options={"max_step": 0.1}, adjoint_method="bosh3")
    with pytest.raises(ValueError, match="seminorm"):
        odeint_adjoint(f, y0, t, adjoint_options={"norm": "semi"})
    with pytest.raises(ValueError, match="unknown option 'stepsize' in adjoint_options"):
        odeint_adjoint(f, y0, t, adjoint_options={"stepsize": 0.1})
    with pytest.raises(ValueError, match="per_sample"):
        odeint_adjoint(f, y0, t, adjoint_options={"per_sample": True})
    with pytest.raises(TypeError, match="grid_constructor"):
        odeint_adjoint(f, y0, t, method="rk4", adjoint_options={"grid_constructor": 3})
    with pytest.raises(ValueError, match="mutually exclusive"):
        odeint_adjoint(f, y0, t, method="rk4", adjoint_options={"grid_constructor": lambda *a: t, "step_size": 0.1})
    with pytest.raises(ValueError, match="no error control"):
        odeint_adjoint(f, y0, t, adjoint_method="rk4", adjoint_options={"norm": lambda x: 0.0})
    with pytest.raises(ValueError, match=r"unknown option 'first_step' in adjoint_options for the fixed-grid"):
        odeint_adjoint(f, y0, t, adjoint_method="rk4", adjoint_options={"first_step": 0.1})
    with pytest.raises(ValueError, match="unknown method"):
        odeint_adjoint(f, y0, t, adjoint_method="rk5")
    with pytest.raises(ValueError, match="callable is not supported"):
        odeint_adjoint(f, y0, t, options={"per_sample": True}, adjoint_options={"norm": lambda x: 0.0})
    with pytest.raises(ValueError, match=r"'mixed' is not supported with options\['per_sample'\]"):
        odeint_adjoint(f, y0, t, options={"per_sample": True}, adjoint_options={"norm": "mixed"})
    with pytest.raises(ValueError, match=r"'seminorm', 'mixed' or a callable, got 'rms'"):
        odeint_adjoint(f, y0, t, adjoint_options={"norm": "rms"})
    with pytest.raises(TypeError, match=r"'seminorm', 'mixed' or a callable, got int"):
        odeint_adjoint(f, y0, t, adjoint_options={"norm": 3})
    with pytest.raises(ValueError, match=r"adjoint_options\['max_step'\]|options\['max_step'\]"):
        odeint_adjoint(f, y0, t, adjoint_options={"max_step": -1.0})
    with pytest.raises(TypeError, match="adjoint_options must be a dict"):
        odeint_adjoint(f, y0, t, adjoint_options=[1])


def test_backward_failure_names_the_solve():
    f = Field()
    y0 = _y0().requires_grad_(True)
    ys = odeint_adjoint(f, y0, torch.tensor([0.0, 5.0], dtype=DT), rtol=1e-10, atol=1e-12,
                        adjoint_options={"max_num_steps": 3})
    with pytest.raises(fastnode.SolverError, match=r"adjoint \(backward\) solve failed.*max_num_steps"):
        ys.sum().backward()


def test_custom_adjoint_norm_sees_every_part():
    f = Field()
    seen = []

    def norm(parts):
        seen.append(len(parts))
        return max(float(x.abs().max()) if x.numel() else 0.0 for x in parts)

    got = _grads(odeint_adjoint, f, _y0(), torch.tensor([0.0, 1.0], dtype=DT), rtol=1e-9, atol=1e-11,
                 adjoint_options={"norm": norm})
    ref = _grads(odeint, f, _y0(), torch.tensor([0.0, 1.0], dtype=DT), rtol=1e-12, atol=1e-14)
    assert seen and set(seen) == {3 + len(list(f.parameters()))}
    _assert_close(got[:1] + got[2:], ref[:1] + ref[2:], 1e-6, NAMES[:1] + NAMES[2:])


def test_frozen_module_parameters_are_skipped():
    f = Field()
    f.l1.weight.requires_grad_(False)
    y0 = _y0().requires_grad_(True)
    odeint_adjoint(f, y0, torch.tensor([0.0, 1.0], dtype=DT)).sum().backward()
    assert f.l1.weight.grad is None and f.l2.weight.grad is not None


def test_float32_state():
    """float32: the adjoint's gradient is as accurate as backprop's in float32 (against a float64 reference)."""
    f64 = Field()
    f32 = Field().float()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    ref = _grads(odeint, f64, _y0(), t, rtol=1e-12, atol=1e-14)
    got = _grads(odeint_adjoint, f32, _y0().float(), t.float(), rtol=1e-6, atol=1e-7)
    bp = _grads(odeint, f32, _y0().float(), t.float(), rtol=1e-6, atol=1e-7)
    assert all(g.dtype == torch.float32 for g in got)
    for i in (0, 2, 3, 4, 5):
        err_adj, err_bp = _rel(got[i].double(), ref[i]), _rel(bp[i].double(), ref[i])
        assert err_adj < max(3 * err_bp, 1e-5), (NAMES[i], err_adj, err_bp)


def test_per_sample_tuple_state_with_parameters():
    f = TupleField()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, generator=g, dtype=DT)
    v0 = torch.randn(4, 3, generator=g, dtype=DT)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=DT)

    def run(solve, **kw):
        f.zero_grad(set_to_none=True)
        x, v = x0.clone().requires_grad_(), v0.clone().requires_grad_()
        xs, vs = solve(f, (x, v), t, options={"per_sample": True, "first_step": 0.9}, **kw)
        ((xs * _weights(xs.shape, 1)).sum() + (vs * _weights(vs.shape, 2)).sum()).backward()
        return [x.grad, v.grad, f.A.grad, f.B.grad]

    got = run(odeint_adjoint, rtol=1e-10, atol=1e-12)
    assert fastnode.last_stats().backward.n_rejected.sum() > 0
    ref = run(odeint, rtol=1e-12, atol=1e-14)
    _assert_close(got, ref, 1e-7)


class Switch(nn.Module):
    """dy/dt = w * y for t < 0.5, -w * y after: a discontinuity in time at 0.5."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.8, dtype=DT))

    def forward(self, t, y):
        sign = torch.where(t < 0.5, 1.0, -1.0).to(y.dtype)
        return self.w * (sign.unsqueeze(-1) if sign.dim() else sign) * y


@pytest.mark.parametrize("per_sample", [False, True])
def test_jump_t_in_backward(per_sample):
    """jump_t is inherited by the backward solve, which steps onto the discontinuity and re-evaluates there.
    Closed form: y(0.75) = y0 exp(0.5 w - 0.25 w)."""
    f = Switch()
    y0 = torch.tensor([[1.0], [2.0]], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.75], dtype=DT, requires_grad=True)
    ys = odeint_adjoint(f, y0, t, rtol=1e-10, atol=1e-12, options={"jump_t": [0.5], "per_sample": per_sample})
    ys[-1].sum().backward()
    w = 0.8
    torch.testing.assert_close(y0.grad, torch.full_like(y0, math.exp(0.25 * w)), rtol=1e-8, atol=0)
    y_end = float(y0.detach().sum()) * math.exp(0.25 * w)
    exp_w = y_end * 0.25
    assert abs(float(f.w.grad) - exp_w) < 1e-8 * abs(exp_w)
    # y(T) = y0 exp(w (0.5 - t0) - w (T - 0.5)): dL/dt0 = dL/dT = -w y(T); the jump is not an output time.
    torch.testing.assert_close(t.grad, torch.full((2,), -w * y_end, dtype=DT), rtol=1e-8, atol=0)


def test_per_sample_output_time_gradients_closed_form():
    """y' = -k_b y per sample with its own output times t[b, :]: L = sum_bi w_bi y_b(t_bi), so
    dL/dt_bi = -k_b w_bi y_b(t_bi) (i > 0) and dL/dt_b0 = k_b sum_{i>0} w_bi y_b(t_bi)."""
    k = torch.tensor([0.5, 1.5, 3.0], dtype=DT)

    class Decay3(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(k.clone())

        def forward(self, t, y):
            return -self.k.unsqueeze(1) * y

    f = Decay3()
    y0 = torch.tensor([[1.0], [2.0], [0.5]], dtype=DT, requires_grad=True)
    t = torch.tensor([[0.0, 0.3, 1.0], [0.2, 0.9, 1.4], [-0.5, 0.1, 0.6]], dtype=DT, requires_grad=True)
    w = torch.tensor([[0.0, 1.0, -2.0], [0.0, 0.5, 1.0], [0.0, -1.0, 3.0]], dtype=DT)  # [B, T]
    ys = odeint_adjoint(f, y0, t, rtol=1e-11, atol=1e-13, options={"per_sample": True})  # [T, B, 1]
    (ys[..., 0].T * w).sum().backward()
    td = t.detach()
    y_exact = y0.detach() * torch.exp(-k.unsqueeze(1) * (td - td[:, :1]))  # [B, T]
    exp_t = -k.unsqueeze(1) * w * y_exact
    exp_t[:, 0] = (k.unsqueeze(1) * w * y_exact)[:, 1:].sum(dim=1)
    torch.testing.assert_close(t.grad, exp_t, rtol=1e-8, atol=1e-12)
    exp_k = (w * y_exact * -(td - td[:, :1])).sum(dim=1)
    torch.testing.assert_close(f.k.grad, exp_k, rtol=1e-8, atol=1e-12)


def test_edge_cases_single_time_scalar_state_generator_params_twice():
    # one output time: the output is y0 itself
    f = Field()
    y0 = _y0().requires_grad_(True)
    t1 = torch.tensor([0.3], dtype=DT, requires_grad=True)
    odeint_adjoint(f, y0, t1).sum().backward()
    assert torch.equal(y0.grad, torch.ones_like(y0)) and torch.equal(t1.grad, torch.zeros_like(t1))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in f.parameters())

    # 0-d state, parameters passed as a generator, and a non-leaf parameter (gradient reaches its source)
    base = torch.tensor(0.35, dtype=DT, requires_grad=True)
    k = base * 2.0
    x0 = torch.tensor(1.5, dtype=DT, requires_grad=True)
    xs = odeint_adjoint(lambda t, x: -k * x, x0, torch.tensor([0.0, 1.2], dtype=DT),
                        rtol=1e-11, atol=1e-13, adjoint_params=(p for p in [k]))
    xs[-1].backward()
    assert abs(float(x0.grad) - math.exp(-0.84)) < 1e-9
    assert abs(float(base.grad) - (-2.0 * 1.2 * 1.5 * math.exp(-0.84))) < 1e-9

    # backward twice through the same graph: same gradients, statistics add up
    g = Field()
    y0 = _y0().requires_grad_(True)
    ys = odeint_adjoint(g, y0, torch.tensor([0.0, 1.0], dtype=DT), rtol=1e-8, atol=1e-10)
    st = fastnode.last_stats()
    ys.sum().backward(retain_graph=True)
    first, n1 = y0.grad.clone(), st.nfe_backward
    ys.sum().backward()
    torch.testing.assert_close(y0.grad, 2 * first, rtol=0, atol=0)
    assert st.nfe_backward == 2 * n1
