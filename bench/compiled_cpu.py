"""Compiled steps (``options['compile']``) against eager fastnode, torchdiffeq and torchode on CPU, one thread.

Thread CPU time (``time.thread_time``: other processes on a shared machine do not count), interleaved rounds (every
provider once per round, so slow drifts hit all alike), medians after warm-up. The compile happens in the warm-up;
its seconds are reported apart (``stats.compile_seconds`` of the first compiled solve).

Cases:
    mlp-small: B=128, 32-64-64-32 tanh MLP (autonomous), float32, dopri5, rtol 1e-6 atol 1e-8, 10 output times on
        [0, 1]; ``fwd`` (no_grad), ``bwd`` (backprop of ``sum(ys)`` to y0 and the parameters) and ``adj``
        (``odeint_adjoint``, forward and backward solves, against torchdiffeq's ``odeint_adjoint``; NFE is
        forward+backward, compile time both programs').
    mlp-medium: B=512, 256-512-512-256, otherwise the same.
    vdp: bench.problems' van der Pol batch (B=64, mu in [0.5, 10], float64, rtol 1e-5), per-sample step control,
        against torchode (per-sample) and fastnode eager per-sample.

Run: ``.venv/bin/python -m bench.compiled_cpu [mlp-small|mlp-medium|vdp] [--rounds N] [--modes fwd,bwd,adj]`` (from
the repository root).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import fastnode


class MLP(nn.Module):
    def __init__(self, n: int, h: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, n))

    def forward(self, t, y):
        return self.net(y)


def _mlp_case(n: int, h: int, batch: int):
    torch.manual_seed(0)
    func = MLP(n, h)
    y0 = torch.randn(batch, n)
    return func, y0, torch.linspace(0.0, 1.0, 10), dict(rtol=1e-6, atol=1e-8)


def _vdp_case():
    from bench.problems import van_der_pol

    p = van_der_pol()
    return p.func, p.y0, p.t_eval, dict(rtol=p.tolerances[0].rtol, atol=p.tolerances[0].atol)


def _adjoint_providers(func, t, tol):
    """name -> solve(y0) -> ys [T, B, N] by the adjoint method."""
    out = {
        "fastnode-eager": lambda y0: fastnode.odeint_adjoint(func, y0, t, **tol),
        "fastnode-compiled": lambda y0: fastnode.odeint_adjoint(func, y0, t, options={"compile": True}, **tol),
    }
    try:
        import torchdiffeq

        out["torchdiffeq"] = lambda y0: torchdiffeq.odeint_adjoint(func, y0, t, **tol)
    except ImportError:
        pass
    return out


def _providers(func, t, tol, per_sample: bool):
    """name -> solve(y0) -> ys [T, B, N]."""
    opts = {"per_sample": True} if per_sample else {}
    out = {
        "fastnode-eager": lambda y0: fastnode.odeint(func, y0, t, options=dict(opts), **tol),
        "fastnode-compiled": lambda y0: fastnode.odeint(func, y0, t, options=dict(opts, compile=True), **tol),
    }
    if not per_sample:
        try:
            import torchdiffeq

            out["torchdiffeq"] = lambda y0: torchdiffeq.odeint(func, y0, t, **tol)
        except ImportError:
            pass
    try:
        import torchode as to

        term = to.ODETerm(func)
        solver = to.AutoDiffAdjoint(to.Dopri5(term=term), to.IntegralController(term=term, **tol))
        t_b = t.to(torch.float64 if per_sample else t.dtype)

        def torchode_solve(y0):
            tb = t_b.to(y0.dtype).expand(y0.shape[0], -1)
            return solver.solve(to.InitialValueProblem(y0=y0, t_eval=tb), term=term).ys.transpose(0, 1)

        if per_sample:
            out["torchode"] = torchode_solve
    except ImportError:
        pass
    return out


def _timed(fn, y0, params, bwd: bool) -> float:
    t0 = time.thread_time()
    if bwd:
        y = y0.detach().requires_grad_(True)
        torch.autograd.grad(fn(y).sum(), [y, *params])
    else:
        with torch.no_grad():
            fn(y0)
    return time.thread_time() - t0


def run(name: str, mode: str, rounds: int) -> None:
    torch.set_num_threads(1)
    if name == "vdp":
        func, y0, t, tol = _vdp_case()
    else:
        func, y0, t, tol = _mlp_case(*((32, 64, 128) if name == "mlp-small" else (256, 512, 512)))
    per_sample = name == "vdp"
    provs = _adjoint_providers(func, t, tol) if mode == "adj" else _providers(func, t, tol, per_sample)
    bwd = mode in ("bwd", "adj")
    params = [p for p in func.parameters() if p.requires_grad] if bwd else []
    nfe, compile_s = {}, None
    for pname, fn in provs.items():  # warm-up (compiles), NFE
        for _ in range(2):
            _timed(fn, y0, params, bwd)
            if pname.startswith("fastnode"):
                s = fastnode.last_stats()
                nfe[pname] = f"{s.nfe}+{s.nfe_backward}" if mode == "adj" else s.nfe
                if pname.endswith("compiled") and compile_s is None:
                    compile_s = s.compile_seconds
                    assert s.compiled, s.compile_fallback
                    if mode == "adj":
                        compile_s += s.backward.compile_seconds
                        assert s.backward.compiled, s.backward.compile_fallback
    times: dict = {k: [] for k in provs}
    for _ in range(rounds):
        for pname, fn in provs.items():
            times[pname].append(_timed(fn, y0, params, bwd))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{name} {mode}: one thread, thread CPU time, median of {rounds} interleaved rounds; "
          f"compile (first solve) {compile_s:.1f} s")
    print("| provider | ms | NFE | compiled speed-up vs this |")
    print("|---|--:|--:|--:|")
    c = med["fastnode-compiled"]
    for k, v in med.items():
        print(f"| {k} | {v * 1e3:.2f} | {nfe.get(k, '')} | {v / c:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", default=["mlp-small", "vdp"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--modes", default="fwd,bwd")
    args = ap.parse_args()
    for name in args.cases:
        for mode in args.modes.split(","):
            if name == "vdp" and mode in ("bwd", "adj"):
                continue
            run(name, mode, args.rounds)


if __name__ == "__main__":
    main()
