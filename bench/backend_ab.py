"""Side-by-side A/B of fastnode's backends against torchdiffeq on one standard problem, CPU.

Times the calling thread's CPU time (``time.thread_time``) with torch on one thread, so the figures hold up on a
machine shared with other work; the providers are interleaved round by round and the medians printed.

Run: ``.venv/bin/python bench/backend_ab.py [mlp-small|mlp-medium|vdp]``. Modes: ``fwd`` = one solve under no_grad;
``adjoint`` = odeint_adjoint forward + backward of sum(ys).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torchdiffeq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastnode
from bench.problems import get_problem


def main(name: str = "mlp-small", rounds: int = 25) -> None:
    torch.set_num_threads(1)
    p = get_problem(name)
    f, y0, t = p.func, p.y0, p.t_eval
    tol = p.tolerances[0]

    def fwd(backend):
        def run():
            with torch.no_grad():
                fastnode.odeint(f, y0, t, rtol=tol.rtol, atol=tol.atol, options={"backend": backend})
        return run

    def adj(backend):
        def run():
            y = y0.clone().requires_grad_(True)
            ys = fastnode.odeint_adjoint(f, y, t, rtol=tol.rtol, atol=tol.atol, options={"backend": backend})
            ys.sum().backward()
        return run

    def td_fwd():
        with torch.no_grad():
            torchdiffeq.odeint(f, y0, t, rtol=tol.rtol, atol=tol.atol)

    def td_adj():
        y = y0.clone().requires_grad_(True)
        torchdiffeq.odeint_adjoint(f, y, t, rtol=tol.rtol, atol=tol.atol).sum().backward()

    def one_func():
        with torch.no_grad():
            f(t[0], y0)

    cases = [("fwd ext", fwd("ext")), ("fwd torch", fwd("torch")), ("fwd torchdiffeq", td_fwd),
             ("adjoint ext", adj("ext")), ("adjoint torch", adj("torch")), ("adjoint torchdiffeq", td_adj),
             ("one func call", one_func)]
    for _, fn in cases:
        for _ in range(3):
            fn()
    res = {k: [] for k, _ in cases}
    for _ in range(rounds):
        for k, fn in cases:
            a = time.thread_time()
            fn()
            res[k].append(time.thread_time() - a)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in res.items()}
    fwd("ext")()
    nfe = fastnode.last_stats().nfe
    print(f"{name}: B x N = {tuple(y0.shape)}, rtol {tol.rtol}, one thread, thread CPU time, median of {rounds}")
    print("| case | ms | / torchdiffeq | overhead t/(NFE t_func) - 1 |")
    print("|---|--:|--:|--:|")
    for k, ms in med.items():
        base = med["fwd torchdiffeq"] if k.startswith("fwd") else med["adjoint torchdiffeq"]
        over = f"{ms / (nfe * med['one func call']) - 1:.2f}" if k.startswith("fwd") else ""
        ratio = f"{ms / base:.2f}" if k != "one func call" else ""
        print(f"| {k} | {ms:.2f} | {ratio} | {over} |")


if __name__ == "__main__":
    main(*sys.argv[1:2])
