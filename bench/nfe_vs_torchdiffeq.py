"""NFE and error of fastnode vs torchdiffeq, method by method, on the same problems and tolerances.

Run: ``.venv/bin/python bench/nfe_vs_torchdiffeq.py`` (needs the bench extras: torchdiffeq, scipy).
Prints a Markdown table; errors are max |y - y_ref| / max |y_ref| against scipy DOP853 at rtol=atol=1e-12.
"""

from __future__ import annotations

import numpy as np
import torch
import torchdiffeq
from scipy.integrate import solve_ivp

import fastnode

F64 = torch.float64


def vdp(mu):
    return lambda t, y: torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


def lotka(t, y):
    return torch.stack([1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]])


PROBLEMS = {"vdp mu=1": (vdp(1.0), [2.0, 0.0]), "vdp mu=5": (vdp(5.0), [2.0, 0.0]),
            "lotka-volterra": (lotka, [1.0, 1.0])}
METHODS = ["dopri5", "bosh3", "dopri8", "fehlberg2", "adaptive_heun"]


def main():
    t = torch.linspace(0.0, 10.0, 21, dtype=F64)
    print("| problem | method | rtol | fastnode NFE | torchdiffeq NFE | NFE ratio | fastnode err | torchdiffeq err |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, (f, y0l) in PROBLEMS.items():
        y0 = torch.tensor(y0l, dtype=F64)
        ref = solve_ivp(lambda s, y, f=f: f(s, torch.from_numpy(y)).numpy(), (0.0, 10.0), y0l, method="DOP853",
                        rtol=1e-12, atol=1e-12, t_eval=t.numpy()).y.T
        scale = np.abs(ref).max()
        for method in METHODS:
            rtol = 1e-8 if method in ("dopri5", "dopri8") else 1e-5
            atol = rtol * 1e-2
            y = fastnode.odeint(f, y0, t, rtol=rtol, atol=atol, method=method)
            nfe = fastnode.last_stats().nfe
            calls = [0]

            def counted(s, y, f=f, calls=calls):
                calls[0] += 1
                return f(s, y)

            yt = torchdiffeq.odeint(counted, y0, t, rtol=rtol, atol=atol, method=method)
            e1 = np.abs(y.numpy() - ref).max() / scale
            e2 = np.abs(yt.numpy() - ref).max() / scale
            print(f"| {name} | {method} | {rtol:g} | {nfe} | {calls[0]} | {nfe / calls[0]:.2f} | {e1:.1e} | {e2:.1e} |")


if __name__ == "__main__":
    main()
