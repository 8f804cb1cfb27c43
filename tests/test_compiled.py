"""Compiled steps (``options['compile']``, fastnode._compiled) against the eager solver, the reference.

Compiling is the cost here, so the cases are few and small (N <= 4, B <= 8) and the functions live at module level:
``fastnode._compiled`` caches programs per function, so a case that repeats a (func, method, shapes) reuses the
program. Most cases run ``torch.compile`` with the ``aot_eager`` backend (fixture ``graph``): the same fullgraph
dynamo capture and AOTAutograd graph that Inductor receives, which checks the compiled step's semantics (masking,
dense output on the device, rounds of k steps) without Inductor's C++ compile of tens of seconds per graph on a CI
core. The cases named ``inductor`` run the real backend.

Tolerances: float64 and rtol 1e-6, so a compiled solve takes the same accepted and rejected steps and the same
number of evaluations as the eager one (asserted), and its values differ only by the rounding of reordered
arithmetic: ``1e-12`` relative to the solution's scale.
"""

import math
import warnings

import pytest
import torch

import fastnode
import fastnode._compiled as C
from fastnode.solvers import ADAPTIVE_METHODS

F64 = torch.float64
T = torch.linspace(0.0, 2.0, 5, dtype=F64)
TOL = dict(rtol=1e-6, atol=1e-9)
ROUND = 1e-12


def vdp(t, y):
    """Van der Pol, mu = 1, on ``[B, 2]`` (or ``[2]``)."""
    return torch.stack([y[..., 1], (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], dim=-1)


def forced(t, y):
    """A time-dependent linear system: exercises the stage times ``func`` sees (0-d shared, [B] per sample)."""
    tt = t.unsqueeze(-1) if t.dim() else t
    return -0.5 * y + torch.cos(3.0 * tt) * y.flip(-1)


def pair(t, y):
    """A tuple state ``(a [3], b [2, 2])``."""
    a, b = y
    return -a * b.sum(), torch.sin(b) - 0.1 * a[:2].sum()


def branchy(t, y):
    """Data-dependent Python control flow: dynamo cannot capture it in one graph."""
    if y.sum() > 0:
        return -y
    return -2.0 * y


def itemy(t, y):
    """A host read steering Python control flow."""
    return -y if float(y.abs().max().item()) > 0.5 else -0.5 * y


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).to(F64)

    def forward(self, t, y):
        return self.net(y)


torch.manual_seed(0)
mlp = MLP()
NET = mlp.net


Y0 = torch.tensor([[1.0, 0.0], [0.5, -0.5], [-1.0, 0.3]], dtype=F64)


@pytest.fixture
def graph(monkeypatch):
    monkeypatch.setattr(C, "BACKEND", "aot_eager")


def _solve(func, y0, compile_, t=T, **options):
    opts = dict(options, compile=compile_) if compile_ else options
    y = fastnode.odeint(func, y0, t, options=opts, **TOL)
    return y, fastnode.last_stats()


def _same_steps(se, sc):
    assert sc.compiled and sc.compile_fallback is None
    assert not se.compiled
    assert torch.equal(torch.as_tensor(sc.n_accepted), torch.as_tensor(se.n_accepted))
    assert torch.equal(torch.as_tensor(sc.n_rejected), torch.as_tensor(se.n_rejected))
    assert sc.nfe == se.nfe and sc.n_iterations == se.n_iterations


def _close(a, b):
    scale = max(float(b.abs().max()), 1.0)
    assert float((a - b).abs().max()) <= ROUND * scale


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_matches_eager_every_method(graph, method, per_sample):
    func = vdp if method in ("dopri5", "dopri8", "bosh3") else forced
    tol = TOL if method in ("dopri5", "dopri8", "tsit5") else dict(rtol=1e-4, atol=1e-7)  # low orders: few steps
    ye = fastnode.odeint(func, Y0, T, method=method, options={"per_sample": per_sample}, **tol)
    se = fastnode.last_stats()
    yc = fastnode.odeint(func, Y0, T, method=method, options={"per_sample": per_sample, "compile": True}, **tol)
    sc = fastnode.last_stats()
    _same_steps(se, sc)
    _close(yc, ye)


def test_tuple_state(graph):
    y0 = (torch.tensor([1.0, -0.5, 0.25], dtype=F64), torch.tensor([[0.1, 0.2], [-0.3, 0.4]], dtype=F64))
    ye, se = _solve(pair, y0, False)
    yc, sc = _solve(pair, y0, True)
    _same_steps(se, sc)
    for a, b in zip(yc, ye):
        _close(a, b)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_backprop_matches_eager(graph, per_sample):
    y0 = torch.tensor([[0.3, -0.2, 0.1, 0.5], [-0.4, 0.2, 0.0, 0.1]], dtype=F64)
    grads = []
    for compile_ in (False, True):
        x = y0.clone().requires_grad_()
        NET.zero_grad()
        y, s = _solve(mlp, x, compile_, per_sample=per_sample)
        (y[1:] ** 2).sum().backward()
        grads.append([x.grad] + [p.grad.clone() for p in NET.parameters()])
        assert s.compiled == compile_
    for a, b in zip(*grads):
        _close(a, b)


class TupleField(torch.nn.Module):
    """A tuple state ``(a [B, 3], b [B, 2])`` with parameters: the backward's flat ``[y, a]`` split back per part."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[0.3, -0.5], [0.2, 0.1], [-0.4, 0.25]], dtype=F64))
        self.c = torch.nn.Parameter(torch.tensor([0.1, -0.2], dtype=F64))

    def forward(self, t, y):
        a, b = y
        st = torch.sin(t).unsqueeze(-1) if t.dim() else torch.sin(t)  # per-sample: t [B], each row its own time
        return torch.tanh(b @ self.w.T) - 0.2 * a, -b * a.sum(dim=-1, keepdim=True) * self.c + st * self.c


TUPLE = TupleField()


def _adjoint_run(func, y0, compile_, t=T, params=None, options=None, adjoint_options=None):
    """One odeint_adjoint solve and its backward of ``sum(y[1:]^2)``: (gradients of y0 (parts), t and the
    parameters, forward statistics). ``compile_``: False, True (``options``: both solves) or ``"backward"``
    (``adjoint_options`` only: the forward runs eager, so the gradients isolate the compiled backward)."""
    ys = tuple(v.clone().requires_grad_() for v in y0) if isinstance(y0, tuple) else (y0.clone().requires_grad_(),)
    tt = t.clone().requires_grad_()
    mods = list(func.parameters()) if params is None else list(params)
    for p in mods:
        p.grad = None
    opts = dict(options or {}, **({"compile": True} if compile_ is True else {}))
    if compile_ == "backward":
        adjoint_options = dict(adjoint_options or {"per_sample": opts.get("per_sample", False)}, compile=True)
    aopts = None if adjoint_options is None else dict(adjoint_options, **({"compile": True} if compile_ else {}))
    y = fastnode.odeint_adjoint(func, ys if isinstance(y0, tuple) else ys[0], tt, options=opts,
                                adjoint_options=aopts, adjoint_params=params, **TOL)
    s = fastnode.last_stats()
    loss = sum((v[1:] ** 2).sum() for v in y) if isinstance(y, tuple) else (y[1:] ** 2).sum()
    loss.backward()
    return [v.grad for v in ys] + [tt.grad] + [p.grad.clone() for p in mods], s


def _same_backward(se, sc, forward_compiled=True, first_stage_again=False):
    """The same backward steps; ``first_stage_again``: the per-sample quadrature's compiled steps each evaluate
    func once more (their first stage's parameter product), else the same evaluations."""
    if forward_compiled:
        _same_steps(se, sc)
    be, bc = se.backward, sc.backward
    assert bc.compiled and bc.compile_fallback is None, bc.compile_fallback
    assert not be.compiled
    assert torch.equal(torch.as_tensor(bc.n_accepted), torch.as_tensor(be.n_accepted))
    assert torch.equal(torch.as_tensor(bc.n_rejected), torch.as_tensor(be.n_rejected))
    assert bc.n_iterations == be.n_iterations
    assert sc.nfe_backward == se.nfe_backward + (bc.n_iterations if first_stage_again else 0)


Y4 = torch.tensor([[0.3, -0.2, 0.1, 0.5], [-0.4, 0.2, 0.0, 0.1]], dtype=F64)
YT = (torch.tensor([[1.0, -0.5, 0.25], [0.2, 0.4, -0.1]], dtype=F64),
      torch.tensor([[0.1, 0.2], [-0.3, 0.4]], dtype=F64))


@pytest.mark.parametrize("case", ["mlp", "mlp-mixed", "tuple", "per_sample", "tuple-per_sample",
                                  "per_sample-no-params", "tuple-per_sample-no-params"])
def test_adjoint_matches_eager(graph, case):
    """The backward solve compiled (vjps and the parameter quadrature inside the step; landings on the host): the
    same backward steps and evaluations as eager, gradients of y0, t and the parameters within rounding. The
    forward is compiled too for ``mlp`` (``options['compile']`` reaches the backward); the other cases compile
    the backward only, since a compiled per-sample forward moves the step sizes (and so the outputs) by about
    1e-10 relative through the error estimate's cancellation (``test_failure_matches_eager``)."""
    per_sample = "per_sample" in case
    func = TUPLE if case.startswith("tuple") else mlp
    y0 = YT if case.startswith("tuple") else Y4
    kw = dict(options={"per_sample": per_sample}, params=() if "no-params" in case else None,
              adjoint_options={"norm": "mixed"} if "mixed" in case else None)  # default: the seminorm
    both = case == "mlp"
    ge, se = _adjoint_run(func, y0, False, **kw)
    gc, sc = _adjoint_run(func, y0, True if both else "backward", **kw)
    _same_backward(se, sc, forward_compiled=both, first_stage_again=per_sample and "no-params" not in case)
    assert len(ge) == len(gc) and all(g is not None for g in ge)
    for a, b in zip(gc, ge):
        _close(a, b)


def test_adjoint_parameter_update_reuses_program(graph):
    """A training loop: parameters change in place between solves; the cached backward program reads their new
    values (no recompile) and still matches eager."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).to(F64)

    def field(t, y):
        return net(y)

    params = tuple(net.parameters())
    _adjoint_run(field, Y4, True, params=params)
    with torch.no_grad():
        for p in params:
            p.mul_(0.9)
    before = C.compiles
    gc, sc = _adjoint_run(field, Y4, True, params=params)
    ge, se = _adjoint_run(field, Y4, False, params=params)
    assert C.compiles == before and sc.backward.compile_seconds == 0.0
    _same_backward(se, sc)
    for a, b in zip(gc, ge):
        _close(a, b)


class Oscillator(torch.nn.Module):
    """A forced linear oscillator with parameters: long solves at tight tolerances cheaply."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[-0.05, 1.0], [-1.0, -0.05]], dtype=F64))
        self.c = torch.nn.Parameter(torch.tensor([0.3, -0.2], dtype=F64))

    def forward(self, t, y):
        ct = torch.cos(3.0 * t).unsqueeze(-1) if t.dim() else torch.cos(3.0 * t)
        return y @ self.w.T + ct * self.c


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_adjoint_long_backward_hands_watched_windows_to_eager(graph, per_sample):
    """Past iteration 256 the health check watches windows of backward steps; they run eager with the hooks (the
    quadrature's state handed over both ways, per-sample pending first stages re-evaluated), the rest compiled."""
    f, y0 = Oscillator(), Y4[:, :2]
    t = torch.tensor([0.0, 20.0, 40.0], dtype=F64)
    kw = dict(options={"per_sample": per_sample}, adjoint_options={"per_sample": per_sample})
    ge, se = _adjoint_run(f, y0, False, t=t, **kw)
    gc, sc = _adjoint_run(f, y0, "backward", t=t, **kw)
    assert se.backward.n_iterations > 300
    assert torch.equal(torch.as_tensor(sc.backward.n_accepted), torch.as_tensor(se.backward.n_accepted))
    assert torch.equal(torch.as_tensor(sc.backward.n_rejected), torch.as_tensor(se.backward.n_rejected))
    assert sc.backward.compiled
    for a, b in zip(gc, ge):
        _close(a, b)


class SqrtField(torch.nn.Module):
    """dy/dt = w * sqrt(y): NaN below y = 0, which an over-long backward step reaches for small samples."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.3, dtype=F64))

    def forward(self, t, y):
        return self.w * torch.sqrt(y)


def test_adjoint_per_sample_nonfinite_step_runs_again_eager(graph, monkeypatch):
    """A backward step in which some samples turn NaN (rejected) while others accept: the compiled step's
    parameter sum would hold 0 * NaN, so that step is dropped and run again eager (its tainted evaluations
    re-evaluated on the samples with weight); the gradients match the eager backward's."""
    from fastnode._adjoint_dynamics import PerSampleQuadrature

    tainted = []
    orig = PerSampleQuadrature._retire_subset
    monkeypatch.setattr(PerSampleQuadrature, "_retire_subset",
                        lambda self, e: tainted.append(e.tainted) or orig(self, e))
    f, y0 = SqrtField(), torch.tensor([[0.02], [1.0], [4.0], [0.05]], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    kw = dict(options={"per_sample": True}, adjoint_options={"per_sample": True, "first_step": 1.0})
    ge, se = _adjoint_run(f, y0, False, t=t, **kw)
    n_eager = sum(tainted)
    gc, sc = _adjoint_run(f, y0, "backward", t=t, **kw)
    assert n_eager and sum(tainted) > n_eager, "the test must hit a step where some samples produced NaN"
    assert sc.backward.compiled and sc.backward.compile_fallback is None
    assert torch.equal(sc.backward.n_accepted, se.backward.n_accepted)
    assert torch.equal(sc.backward.n_rejected, se.backward.n_rejected)
    assert all(torch.isfinite(g).all() for g in gc)
    for a, b in zip(gc, ge):
        _close(a, b)


@pytest.mark.parametrize("case", ["adjoint-norm", "outside-graph", "graph-break"])
def test_adjoint_backward_falls_back(graph, monkeypatch, case):
    """What the compiled backward cannot do runs eager with the reason in the backward's statistics (one warning),
    with the eager gradients."""
    monkeypatch.setattr(C, "_warned", set())
    if case == "adjoint-norm":
        func, y0, why = mlp, Y4, "adjoint_options['norm']"
        kw = dict(adjoint_options={"norm": lambda errs: max(e.abs().max() for e in errs)})
    elif case == "outside-graph":
        w = torch.tensor([[0.5, -0.3], [0.2, 0.4]], dtype=F64, requires_grad=True)

        def func(t, y):
            return torch.tanh(y @ ext.T)

        ext = w * 2.0  # computed outside func from the parameter: its graph is the caller's
        y0, kw, why = Y4[:, :2], dict(params=(w,)), "outside"
    else:
        func, y0, kw, why = branchy, Y4[:, :2], dict(params=()), "could not capture"  # a key of its own
    ge, se = _adjoint_run(func, y0, False, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc, sc = _adjoint_run(func, y0, True, **kw)
    assert not sc.backward.compiled and why in sc.backward.compile_fallback
    assert any(why in str(w.message) for w in caught)
    assert sc.nfe_backward == se.nfe_backward
    for a, b in zip(gc, ge):
        _close(a, b)


def test_graph_break_falls_back_once(graph):
    y0 = torch.tensor([0.5, -0.25], dtype=F64)
    ye, _ = _solve(branchy, y0, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yc, sc = _solve(branchy, y0, True)
        yc2, sc2 = _solve(branchy, y0, True)
    msgs = [str(w.message) for w in caught if "compile" in str(w.message)]
    assert len(msgs) == 1 and "could not capture" in msgs[0] and "Data-dependent" in msgs[0]
    assert not sc.compiled and "Data-dependent" in sc.compile_fallback and sc2.compile_fallback == sc.compile_fallback
    assert torch.equal(yc, ye) and torch.equal(yc2, ye)  # eager: bit for bit


def test_host_read_in_func_is_right_either_way(graph):
    """``.item()`` steering Python: dynamo either captures it (guarded) or the solve falls back; never wrong."""
    y0 = torch.tensor([0.9, -0.25], dtype=F64)
    ye, se = _solve(itemy, y0, False)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        yc, sc = _solve(itemy, y0, True)
    assert sc.compiled or sc.compile_fallback
    _close(yc, ye)
    assert sc.n_accepted == se.n_accepted and sc.n_rejected == se.n_rejected


@pytest.mark.parametrize("k", [1, 3])
def test_one_transfer_per_k_steps(graph, k):
    ye, se = _solve(vdp, Y0, False, per_sample=True)
    yc, sc = _solve(vdp, Y0, True, per_sample=True, steps_per_sync=k)
    _same_steps(se, sc)
    # Set-up makes one transfer; eager then one per iteration, compiled one per round of k.
    assert se.n_host_syncs == se.n_iterations + 1
    assert sc.n_host_syncs == math.ceil(sc.n_iterations / k) + 1
    assert sc.n_idle_steps == math.ceil(sc.n_iterations / k) * k - sc.n_iterations
    _close(yc, ye)


def test_adaptive_steps_per_sync(graph, monkeypatch):
    monkeypatch.setattr(C, "ADAPTIVE_ON_CPU", True)  # the CUDA default, checked on CPU
    t = torch.linspace(0.0, 20.0, 3, dtype=F64)
    ye, se = _solve(vdp, Y0, False, t=t)
    yc, sc = _solve(vdp, Y0, True, t=t)
    _same_steps(se, sc)
    assert sc.n_host_syncs < se.n_host_syncs / 3 and sc.n_idle_steps < C.MAX_STEPS_PER_SYNC
    _close(yc, ye)


def test_second_solve_does_not_recompile(graph):
    _solve(forced, Y0, True, per_sample=True)  # compiled here, or earlier in the session: either is fine
    before, graphs = C.compiles, torch._dynamo.utils.counters["stats"]["unique_graphs"]
    yc, sc = _solve(forced, Y0 * 0.5, True, per_sample=True)
    assert sc.compiled and sc.compile_seconds == 0.0
    assert C.compiles == before and torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    # One graph per program: the first step's inputs (the start time, a view of the output times) do not make a
    # second one, nor does a constant the eager solver caches after the trace.
    progs = [p for p in C._programs.values() if p.func is forced]
    assert progs and all(set(p.compiled.values()) == {1} for p in progs), [p.compiled for p in progs]
    ye, _ = _solve(forced, Y0 * 0.5, False, per_sample=True)
    _close(yc, ye)


def test_long_solve_hands_watched_windows_to_eager(graph):
    """Past iteration 256 the health check watches windows of steps; they run eager, the rest compiled."""
    t = torch.tensor([0.0, 40.0], dtype=F64)
    y0 = Y0[:1]
    ye = fastnode.odeint(forced, y0, t, rtol=1e-10, atol=1e-12)
    se = fastnode.last_stats()
    yc = fastnode.odeint(forced, y0, t, rtol=1e-10, atol=1e-12, options={"compile": True, "steps_per_sync": 8})
    sc = fastnode.last_stats()
    assert se.n_iterations > 300
    _same_steps(se, sc)
    _close(yc, ye)


def test_failure_matches_eager(graph):
    opts = dict(per_sample=True, on_failure="return", max_num_steps=6)
    ye, se = _solve(vdp, Y0, False, **opts)
    yc, sc = _solve(vdp, Y0, True, **opts)
    assert torch.equal(sc.status, se.status)
    # The step sizes carry the error estimate's cancellation (a small difference of stages), which turns rounding
    # of the stages into about 1e-9 relative in h, and the time reached sums the steps.
    assert float((sc.t_reached - se.t_reached).abs().max()) <= 1e-9
    assert torch.equal(sc.n_accepted, se.n_accepted)
    assert torch.equal(yc.isnan(), ye.isnan())
    _close(yc.nan_to_num(), ye.nan_to_num())
    with pytest.raises(fastnode.SolverError, match="max_num_steps"):
        _solve(vdp, Y0, True, per_sample=True, max_num_steps=6)


def test_unsupported_configuration_runs_eager_with_reason(graph, monkeypatch):
    monkeypatch.setattr(C, "_warned", set())
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    ye = fastnode.odeint(vdp, y0, T, options={"jump_t": [0.7]}, **TOL)
    with pytest.warns(RuntimeWarning, match="jump_t"):
        yc = fastnode.odeint(vdp, y0, T, options={"jump_t": [0.7], "compile": True}, **TOL)
    s = fastnode.last_stats()
    assert not s.compiled and "jump_t" in s.compile_fallback
    assert torch.equal(yc, ye)


@pytest.mark.parametrize("bad, err, match", [
    ({"compile": "fastest"}, ValueError, r"options\['compile'\]"),
    ({"compile": 1}, TypeError, r"options\['compile'\]"),
    ({"compile": True, "steps_per_sync": 0}, ValueError, r"options\['steps_per_sync'\]"),
    ({"compile": True, "steps_per_sync": 2.5}, TypeError, r"options\['steps_per_sync'\]"),
    ({"steps_per_sync": 4}, ValueError, r"options\['steps_per_sync'\].*compile"),
])
def test_bad_options(bad, err, match):
    with pytest.raises(err, match=match):
        fastnode.odeint(vdp, Y0, T, options=bad)


def test_fixed_grid_method_names_the_option():
    with pytest.raises(ValueError, match="unknown option 'compile'"):
        fastnode.odeint(vdp, Y0, T, method="rk4", options={"compile": True})


def test_inductor_per_sample():
    """The real backend (Inductor fuses func with the step's arithmetic): same steps, values within rounding."""
    ye, se = _solve(vdp, Y0, False, per_sample=True)
    yc, sc = _solve(vdp, Y0, True, per_sample=True)
    _same_steps(se, sc)
    _close(yc, ye)


def test_inductor_backprop():
    """Backprop through the real backend (AOTAutograd's forward and backward graphs compiled by Inductor): the same
    steps and evaluations as eager, gradients to y0 and the parameters within rounding."""
    y0 = torch.tensor([[0.3, -0.2, 0.1, 0.5], [-0.4, 0.2, 0.0, 0.1]], dtype=F64)
    grads, stats = [], []
    for compile_ in (False, True):
        x = y0.clone().requires_grad_()
        NET.zero_grad()
        y, s = _solve(mlp, x, compile_)
        (y[1:] ** 2).sum().backward()
        grads.append([x.grad] + [p.grad.clone() for p in NET.parameters()])
        stats.append(s)
    _same_steps(*stats)
    for a, b in zip(*grads):
        _close(a, b)


class Counting(torch.nn.Module):
    """A func with Python state that changes at every call (dynamo would recompile at every step)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return -y


def test_recompiling_func_falls_back_soon(graph):
    func, y0 = Counting(), torch.tensor([0.5, -0.25], dtype=F64)
    ye, se = _solve(func, y0, False)
    before = C.compiles
    with pytest.warns(RuntimeWarning, match="recompiles at every step"):
        yc, sc = _solve(func, y0, True)
    assert C.compiles - before == C.MAX_GRAPHS_PER_MODE + 1 and "recompiles" in sc.compile_fallback
    assert sc.n_accepted == se.n_accepted and sc.nfe == se.nfe
    _close(yc, ye)
