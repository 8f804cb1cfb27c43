"""Adjoint backward cost and gradient error: fastnode.odeint_adjoint vs torchdiffeq.odeint_adjoint.

Run: ``.venv/bin/python bench/adjoint_nfe.py`` (needs the bench extras). Writes
``bench/results/<device>/adjoint_nfe.md`` and prints it.

For each problem, number of output times ``len(t)`` (2, 10, 100) and adjoint norm (``"mixed"``: torchdiffeq's
default, fastnode's ``adjoint_options={"norm": "mixed"}``; ``"seminorm"``: fastnode's default): forward NFE,
backward NFE (every call of ``func`` during ``backward()``), the gradient's error
against a tight reference (backprop through ``fastnode.odeint`` in float64 at rtol=1e-12, atol=1e-14; an
independent code path), and the median wall time of forward+backward after warm-up (both providers in the same
run, alternating).

The loss weights every output time (``sum(w * y)`` with fixed random ``w``), so every output time has a
cotangent: the case where torchdiffeq's per-interval restarts cost the most.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torchdiffeq
from report import write_markdown  # scripts run as `python bench/<name>.py`: bench/ is on sys.path
from torch import nn

import fastnode

F64 = torch.float64


class MLP(nn.Module):
    """dy/dt = W2 tanh(W1 [y, t] + b1) + b2 (float64); counts calls."""

    def __init__(self, dim=32, hidden=64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(dim + 1, hidden).to(F64)
        self.l2 = nn.Linear(hidden, dim).to(F64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) / max(p.shape[-1], 1) ** 0.5)
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        tc = (t if t.dim() else t.expand(y.shape[0])).to(y.dtype).reshape(-1, 1).expand(y.shape[0], 1)
        return self.l2(torch.tanh(self.l1(torch.cat([y, tc], dim=1))))


class VdP(nn.Module):
    """Van der Pol batch with a learnable mu per sample (float64); counts calls."""

    def __init__(self, batch=16):
        super().__init__()
        self.mu = nn.Parameter(torch.logspace(-0.3, 0.3, batch, dtype=F64))
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        x, v = y[:, 0], y[:, 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], dim=1)


def problems():
    g = torch.Generator().manual_seed(1)
    yield "mlp B128 N32 H64", MLP(), torch.randn(128, 32, generator=g, dtype=F64) * 0.5, 1.0, (1e-6, 1e-8), False
    x0 = 1.0 + torch.rand(16, generator=g, dtype=F64)
    # NOTE: with mu up to 5 over [0, 5] the len(t)=2 backward solve fails for both providers: van der Pol run
    # backwards is unstable, and only the state resets at intermediate output times keep it on track.
    yield "vdp B16 mu 0.5..2", VdP(), torch.stack([x0, torch.zeros_like(x0)], 1), 3.0, (1e-6, 1e-8), True


def loss_of(ys, w):
    return (ys * w).sum()


def grads(func, y0, t, w, solve, **kw):
    func.zero_grad(set_to_none=True)
    y0 = y0.clone().requires_grad_(True)
    func.calls = 0
    ys = solve(func, y0, t, **kw)
    nfe_f = func.calls
    loss_of(ys, w).backward()
    nfe_b = func.calls - nfe_f
    g = torch.cat([y0.grad.flatten()] + [p.grad.flatten() for p in func.parameters()])
    return g, nfe_f, nfe_b


def timed(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name, func, y0, t_end, (rtol, atol), per_sample in problems():
        func.to(dev)
        y0 = y0.to(dev)
        for T in (2, 10, 100):
            t = torch.linspace(0, t_end, T, dtype=F64, device=dev)
            w = torch.randn((T, *y0.shape), generator=torch.Generator().manual_seed(T), dtype=F64).to(dev)
            ref, _, _ = grads(func, y0, t, w, fastnode.odeint, rtol=1e-12, atol=1e-14)
            scale = ref.abs().max()
            for norm in ("mixed", "seminorm"):
                kw = {"rtol": rtol, "atol": atol, "adjoint_options": {"norm": norm}}
                kw_td = {**kw, "adjoint_options": {} if norm == "mixed" else {"norm": norm}}  # "mixed": td's default
                runs = {"torchdiffeq": functools.partial(grads, func, y0, t, w, torchdiffeq.odeint_adjoint, **kw_td),
                        "fastnode": functools.partial(grads, func, y0, t, w, fastnode.odeint_adjoint, **kw)}
                if per_sample and norm == "seminorm":  # per-sample control both ways (its error control is a seminorm)
                    runs["fastnode-per-sample"] = functools.partial(grads, func, y0, t, w, fastnode.odeint_adjoint,
                                                                    options={"per_sample": True}, **kw)
                res = {}
                for k, fn in runs.items():
                    try:
                        res[k] = fn()
                    except (AssertionError, RuntimeError, ValueError) as err:  # record a provider's failure
                        res[k] = f"failed: {str(err).splitlines()[0][:60]}"
                times = {k: [] for k in runs}
                for _ in range(args.reps):  # alternate providers so drifts hit both
                    for k, fn in runs.items():
                        if not isinstance(res[k], str):
                            times[k].append(timed(fn, 1))
                for k in runs:
                    if isinstance(res[k], str):
                        rows.append((name, T, norm, k, res[k], None, None, None))
                        continue
                    g, nf, nb = res[k]
                    err = float((g - ref).abs().max() / scale)
                    rows.append((name, T, norm, k, nf, nb, err, statistics.median(times[k])))
                for r in rows[-len(runs):]:
                    print(" | ".join(str(x) for x in r), flush=True)
    lines = [
        f"# Adjoint: fastnode vs torchdiffeq {torchdiffeq.__version__} (torch {torch.__version__}, {dev})",
        "",
        ("Command: `.venv/bin/python bench/adjoint_nfe.py`. Gradient w.r.t. y0 and all parameters; error = max abs "
         "difference / max abs of a backprop reference at rtol=1e-12. ms = median forward+backward wall time."),
        "",
        "| problem | len(t) | adjoint norm | provider | fwd NFE | bwd NFE | bwd NFE ratio | grad rel err | ms "
        "| ms ratio |",
        "|---|--:|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for key in dict.fromkeys(r[:3] for r in rows):
        group = [r for r in rows if r[:3] == key]
        td = group[0]  # torchdiffeq first
        for r in group:
            if r[5] is None:
                lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | | | | | |")
                continue
            ok = td[5] is not None
            lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | "
                         f"{f'{r[5] / td[5]:.2f}' if ok else '-'} | {r[6]:.1e} | {r[7]:.1f} | "
                         f"{f'{r[7] / td[7]:.2f}' if ok else '-'} |")
    write_markdown("\n".join(lines) + "\n", args.out, "adjoint_nfe.md", dev)


if __name__ == "__main__":
    main()
