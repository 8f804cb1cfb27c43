"""Backpropagation through whole solves on the fast backends: ``auto`` keeps a recorded solve on ``ext`` (CPU) and
its gradients (w.r.t. the initial state, the output times and func's parameters) match the torch reference
backend's, for every adaptive method, shared and per-sample step control, tuple states, decreasing time, and solves
that reject steps (asserted). Both backends take the same steps; their values differ only in the rounding of the
fused ops (a few ulps per step), so the gradients agree to about 1e-10 relative."""

from __future__ import annotations

import pytest
import torch

from fastnode import ADAPTIVE_METHODS, last_stats, odeint
from fastnode.backends import ext_ops

F64 = torch.float64
needs_ext = pytest.mark.skipif(not ext_ops.available(), reason="fastnode._C is not built (FASTNODE_SKIP_EXT=1)")
pytestmark = needs_ext


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(F64)


def _field(net):
    def f(t, y):
        tt = t.reshape(-1, 1) if t.dim() else t
        return 3.0 * net(y) * (1.0 + 0.3 * torch.sin(tt))

    return f


def _n_rejected() -> int:
    return int(torch.as_tensor(last_stats().n_rejected).sum())


def _grads(backend: str, method: str, per_sample: bool, decreasing: bool, first_step: float):
    net = _net()
    y0 = torch.linspace(-1.0, 1.0, 12, dtype=F64).reshape(3, 4).requires_grad_()
    times = [0.0, 0.9, 1.3]
    t = torch.tensor(times[::-1] if decreasing else times, dtype=F64, requires_grad=True)
    opts = {"backend": backend, "first_step": first_step, "per_sample": per_sample}
    ys = odeint(_field(net), y0, t, method=method, rtol=1e-6, atol=1e-8, options=opts)
    stats = (last_stats().backend, _n_rejected())
    w = torch.cos(torch.arange(ys.numel(), dtype=F64)).reshape(ys.shape)
    grads = torch.autograd.grad((ys * w).sum(), [y0, t, *net.parameters()])
    return ys.detach(), grads, stats


@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("decreasing", [False, True], ids=["inc", "dec"])
def test_gradients_match_the_reference(method, per_sample, decreasing):
    """A too-large first step forces rejections; the solve runs on ext under auto and on torch when forced."""
    ys, got, (backend, n_rej) = _grads("auto", method, per_sample, decreasing, first_step=0.8)
    ys_ref, ref, (backend_ref, n_rej_ref) = _grads("torch", method, per_sample, decreasing, first_step=0.8)
    assert backend == "ext" and backend_ref == "torch"
    assert n_rej >= 1 and n_rej == n_rej_ref, "set-up: the 0.8 first step should have been rejected"
    torch.testing.assert_close(ys, ys_ref, rtol=1e-11, atol=1e-13)
    for name, a, b in zip(["y0", "t", "W1", "b1", "W2", "b2"], got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"d/d{n}: {m}")


def test_tuple_state_gradients_match_the_reference():
    """A tuple state (norm segments: the fused finish's max over per-tensor RMS) with rejections."""

    def run(backend):
        net = _net(1)
        a0 = torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=F64, requires_grad=True)
        b0 = torch.tensor([[0.5], [-0.6]], dtype=F64).expand(2, 2).contiguous().requires_grad_()
        f = _field(net)

        def tf(t, s):
            d = f(t, torch.cat(s, dim=1))
            return d[:, :2], d[:, 2:]

        t = torch.tensor([0.0, 0.5, 1.0], dtype=F64, requires_grad=True)
        ya, yb = odeint(tf, (a0, b0), t, method="dopri5", rtol=1e-7, atol=1e-9,
                        options={"backend": backend, "first_step": 0.9})
        assert _n_rejected() >= 1
        used = last_stats().backend
        return used, torch.autograd.grad(ya.sum() + (yb**2).sum(), [a0, b0, t, *net.parameters()])

    used, got = run("auto")
    used_ref, ref = run("torch")
    assert (used, used_ref) == ("ext", "torch")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_forced_ext_backprop_and_its_stages_gradient():
    """A forced ext solve records a graph now; y' = -y has the closed-form gradient e^{-t} per output."""
    y0 = torch.ones(2, 3, dtype=F64, requires_grad=True)
    ys = odeint(lambda t, y: -y, y0, torch.tensor([0.0, 0.5, 1.0], dtype=F64), rtol=1e-10, atol=1e-12,
                options={"backend": "ext"})
    assert last_stats().backend == "ext"
    ys.sum().backward()
    expect = 1.0 + torch.exp(torch.tensor(-0.5, dtype=F64)) + torch.exp(torch.tensor(-1.0, dtype=F64))
    torch.testing.assert_close(y0.grad, expect.expand(2, 3), rtol=1e-8, atol=0)


def _solve_recorded(backend: str, method: str, t, per_sample: bool, **opts):
    """``(ys, grads w.r.t. y0 and the parameters)`` of a solve whose times need no gradient (the loop's lean recording
    in shared mode: no masks per step, the outputs stacked as rows)."""
    net = _net(2)
    y0 = torch.linspace(-1.0, 1.0, 12, dtype=F64).reshape(3, 4).requires_grad_()
    options = {"backend": backend, "first_step": 0.8, "per_sample": per_sample, **opts}
    ys = odeint(_field(net), y0, t, method=method, rtol=1e-8, atol=1e-10, options=options)
    w = torch.sin(torch.arange(ys.numel(), dtype=F64)).reshape(ys.shape)
    loss = (torch.nan_to_num(ys) * w).sum()
    return ys, torch.autograd.grad(loss, [y0, *net.parameters()])


@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_gradients_without_time_gradients(method, per_sample):
    """Times without gradients, with rejections: the recorded solve's outputs are bitwise the no-grad solve's, and
    its gradients match the torch reference's (which takes the same lean path in shared mode) and those of the same
    solve with times that need gradients (then the loop records its masks and in-place output writes: another
    graph of the same function)."""
    t = torch.tensor([0.0, 0.2, 0.9, 1.0, 1.3], dtype=F64)
    ys, got = _solve_recorded("auto", method, t, per_sample)
    assert last_stats().backend == "ext" and _n_rejected() >= 1
    with torch.no_grad():
        y0 = torch.linspace(-1.0, 1.0, 12, dtype=F64).reshape(3, 4)
        plain = odeint(_field(_net(2)), y0, t, method=method, rtol=1e-8, atol=1e-10,
                       options={"first_step": 0.8, "per_sample": per_sample})
    assert torch.equal(ys.detach(), plain)
    for backend, times in (("torch", t), ("auto", t.clone().requires_grad_())):
        _, ref = _solve_recorded(backend, method, times, per_sample)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_recorded_failed_solve_returns_nan_rows(per_sample):
    """on_failure="return" with too few steps: the rows never reached are NaN, as without a graph, and the reached
    rows carry their gradients (equal to the torch reference's)."""
    t = torch.linspace(0.0, 3.0, 7, dtype=F64)
    ys, got = _solve_recorded("auto", "dopri5", t, per_sample, max_num_steps=14, on_failure="return")
    assert (torch.as_tensor(last_stats().status) != 0).any()
    with torch.no_grad():
        y0 = torch.linspace(-1.0, 1.0, 12, dtype=F64).reshape(3, 4)
        plain = odeint(_field(_net(2)), y0, t, rtol=1e-8, atol=1e-10,
                       options={"first_step": 0.8, "per_sample": per_sample, "max_num_steps": 14,
                                "on_failure": "return"})
    assert torch.allclose(ys.detach(), plain, rtol=0, atol=0, equal_nan=True)
    assert ys.isnan().any() and not ys[:3].isnan().any()
    _, ref = _solve_recorded("torch", "dopri5", t, per_sample, max_num_steps=14, on_failure="return")
    for a, b in zip(got, ref):
        assert a.isfinite().all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_lean_outputs_one_interpolation_per_output(monkeypatch):
    """A backend whose interpolate takes one theta per group (triton) gets one call per output time in the lean
    recording: the same outputs bit for bit and the same gradients as the batched call."""
    from fastnode.backends.torch_ops import TorchStepOps

    t = torch.tensor([0.0, 0.2, 0.9, 1.0, 1.3], dtype=F64)
    ys, got = _solve_recorded("auto", "dopri5", t, False)
    monkeypatch.setattr(TorchStepOps, "interpolates_many", False)  # ext inherits it
    ys1, ref = _solve_recorded("auto", "dopri5", t, False)
    assert last_stats().backend == "ext"
    assert torch.equal(ys.detach(), ys1.detach())
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _view_nodes(out: torch.Tensor) -> int:
    """Nodes of the graph behind ``out`` that are views (ViewBackward0 and its kin)."""
    seen, todo, n = set(), [out.grad_fn], 0
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        n += "View" in node.name() or "Reshape" in node.name()
        todo.extend(nx for nx, _ in node.next_functions)
    return n


def _shaped_solve(y0, func, t, net):
    ys = odeint(func, y0, t, rtol=1e-7, atol=1e-9, options={"first_step": 0.8})
    stats = last_stats()
    w = torch.cos(torch.arange(ys.numel(), dtype=ys.dtype)).reshape(ys.shape)
    return ys, stats, torch.autograd.grad((ys * w).sum(), [y0, *net.parameters()])


@pytest.mark.parametrize("shape", [(4,), (3, 4), (2, 3, 4), "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_state_kept_in_func_shape(shape, dtype):
    """A one-group recorded solve on ext keeps a single-tensor state in func's shape: no view node per evaluation,
    and outputs and gradients bitwise those of the same solve on the state as one row [1, N] (its func views the row
    back, so that solve records two views per evaluation)."""
    net = _net(4).to(dtype)
    base = torch.linspace(-1.0, 1.0, 24, dtype=dtype)
    x0 = base[:12].reshape(4, 3).t() if shape == "transposed" else base[: torch.Size(shape).numel()].reshape(shape)
    user_shape = x0.shape
    t = torch.tensor([0.0, 0.2, 0.9, 1.0, 1.3], dtype=F64).to(dtype)
    f = _field(net)

    y0 = x0.clone().requires_grad_()
    ys, stats, got = _shaped_solve(y0, f, t, net)
    assert stats.backend == "ext" and stats.n_rejected >= 1
    assert ys.shape == (5, *user_shape)

    def f_row(t, y):
        return f(t, y.reshape(user_shape)).reshape(1, -1)

    ys_row, _, ref = _shaped_solve(x0.reshape(1, -1).clone().requires_grad_(), f_row, t, net)
    # The row solve's func adds two views per recorded evaluation (all but the initial-step probe's).
    assert _view_nodes(ys_row) - _view_nodes(ys) >= 2 * (stats.nfe - 1)
    assert torch.equal(ys.detach(), ys_row.detach().reshape(ys.shape))
    # The gradients: the same terms, but y0's summed in another grouping (the loop's and the first output row's
    # share of it meet only at y0 in the row solve), so equal up to a few roundings of the largest term.
    eps = torch.finfo(dtype).eps
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=0, atol=4 * eps * float(b.abs().max()))


@pytest.mark.parametrize("on_stiff", ["raise", "ignore"])
def test_state_kept_in_func_shape_through_health_windows(on_stiff):
    """A long solve (past the health check's windows at iterations 256 and 512, which read the stages as rows) keeps
    its state in func's shape: the same steps and bitwise the same outputs as the solve on one row [1, N]."""
    A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64)

    def f(t, y):
        return y @ A.T

    def f_row(t, y):
        return f(t, y.reshape(3, 2)).reshape(1, -1)

    y0 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, -0.5]], dtype=F64)
    t = torch.linspace(0.0, 60.0, 7, dtype=F64)
    opts = {"on_stiff": on_stiff}
    ys = odeint(f, y0, t, rtol=1e-10, atol=1e-12, options=opts)
    stats = last_stats()
    assert stats.backend == "ext" and stats.n_iterations > 1100  # the stiffness test runs from iteration 1024
    ys_row = odeint(f_row, y0.reshape(1, -1), t, rtol=1e-10, atol=1e-12, options=opts)
    assert last_stats().n_steps == stats.n_steps
    assert torch.equal(ys, ys_row.reshape(ys.shape))
    exact = torch.stack([y0 @ torch.linalg.matrix_exp(A.T * float(tk)) for tk in t])
    torch.testing.assert_close(ys, exact, rtol=0, atol=1e-7)


def test_state_kept_in_func_shape_with_a_tensor_subclass_output():
    """func returning a tensor subclass (checked by the general flatten path) still hands the loop func's shape."""

    class Tagged(torch.Tensor):
        pass

    y0 = torch.linspace(-1.0, 1.0, 12, dtype=F64).reshape(3, 4)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    ys = odeint(lambda t, y: (-y).as_subclass(Tagged), y0, t, rtol=1e-9, atol=1e-11)
    assert last_stats().backend == "ext"
    ref = odeint(lambda t, y: -y, y0, t, rtol=1e-9, atol=1e-11)
    assert torch.equal(ys.as_subclass(torch.Tensor), ref)
