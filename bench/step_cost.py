"""Solver cost per step apart from ``func``: ops and tensor-to-Python conversions, fastnode vs torchdiffeq.

Every ATen op is a kernel launch on a GPU and every tensor-to-Python conversion (``item``, ``bool``, ...) a
blocking device-to-host sync, so these counts predict GPU overhead better than CPU timings do.

Run: ``.venv/bin/python bench/step_cost.py`` (needs torchdiffeq). Problem: van der Pol, B=64, mu 0.5..10,
dopri5, rtol=atol=1e-5, shared step control (both solvers take the same steps).
"""

from __future__ import annotations

import math

import torch
import torchdiffeq
from torch.profiler import profile

import fastnode
from fastnode.testing import count_host_transfers

B = 64
MU = torch.logspace(math.log10(0.5), 1.0, B)
Y0 = torch.stack([torch.full((B,), 2.0), torch.zeros(B)], dim=1)
T = torch.linspace(0.0, 10.0, 11)
TOL = 1e-5


def vdp(t, y):
    x, v = y[:, 0], y[:, 1]
    return torch.stack([v, MU * (1 - x * x) * v - x], dim=1)


def _is_op(name: str) -> bool:
    return name.startswith(("aten::", "fastnode::"))


def top_level_aten_ops(fn) -> int:
    """Ops (ATen and the extension's fastnode:: ops) called directly from Python (not nested inside other ops)."""
    with torch.no_grad():
        fn()
        with profile() as prof:
            fn()
    return sum(1 for e in prof.events() if _is_op(e.name) and (e.cpu_parent is None or not _is_op(e.cpu_parent.name)))


def main():
    func_ops = top_level_aten_ops(lambda: vdp(T[0], Y0))
    rows = []
    for backend in ("torch", "ext"):
        opts = {"backend": backend}
        try:
            fn_ops = top_level_aten_ops(lambda o=opts: fastnode.odeint(vdp, Y0, T, rtol=TOL, atol=TOL, options=o))
        except ValueError as exc:  # the extension is not built
            print(f"(skipping backend {backend}: {exc})")
            continue
        st = fastnode.last_stats()
        with torch.no_grad(), count_host_transfers() as c:
            fastnode.odeint(vdp, Y0, T, rtol=TOL, atol=TOL, options=opts)
        rows.append((backend, st, fn_ops, c["n"]))
    calls = [0]

    def counted(t, y):
        calls[0] += 1
        return vdp(t, y)

    td_ops = top_level_aten_ops(lambda: torchdiffeq.odeint(counted, Y0, T, rtol=TOL, atol=TOL))
    td_nfe = calls[0] // 2
    td_steps = (td_nfe - 2) // 6  # dopri5: 2 evaluations at set-up, 6 per step attempt
    with torch.no_grad(), count_host_transfers() as c:
        torchdiffeq.odeint(vdp, Y0, T, rtol=TOL, atol=TOL)
    td_conv = c["n"]
    print("| solver | step attempts | NFE | solver ops / step | tensor->Python conversions / step |")
    print("|---|---:|---:|---:|---:|")
    for backend, st, fn_ops, fn_conv in rows:
        print(f"| fastnode ({backend} backend) | {st.n_steps} | {st.nfe} | "
              f"{(fn_ops - st.nfe * func_ops) / st.n_steps:.0f} | {fn_conv / st.n_steps:.2f} |")
    print(f"| torchdiffeq 0.2.5 | {td_steps} | {td_nfe} | {(td_ops - td_nfe * func_ops) / td_steps:.0f} "
          f"| {td_conv / td_steps:.2f} |")


if __name__ == "__main__":
    main()
