"""Memory of backprop-through-the-solver vs the adjoint as the number of steps grows (10, 100, 1000).

Run: ``.venv/bin/python bench/adjoint_memory.py`` (writes ``bench/results/<device>/adjoint_memory.md``).

The step count is pinned with ``first_step = max_step = 1/n`` and a loose tolerance (every step accepted), so
only the number of steps changes. Per configuration, in a fresh subprocess (so one run's allocator state cannot
leak into the next):

* ``graph MB``: bytes of the tensors autograd saved for backward during the forward (exact, via
  ``torch.autograd.graph.saved_tensors_hooks``): what the solve keeps alive between forward and backward.
* ``peak MB``: on CUDA, ``torch.cuda.max_memory_allocated`` over forward+backward minus the memory before; on
  CPU, the growth of the process's peak resident set size (``ru_maxrss``) over forward+backward, which also
  counts allocator caching and is only indicative.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
from report import write_markdown  # scripts run as `python bench/<name>.py`: bench/ is on sys.path
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def one(mode: str, n: int, dev: str, batch: int, dim: int, hidden: int) -> dict:
    import fastnode

    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim)).to(dev)

    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = f

        def forward(self, t, y):
            return self.net(y)

    func = F()
    y0 = torch.randn(batch, dim, device=dev, requires_grad=True)
    t = torch.tensor([0.0, 1.0], device=dev)
    opts = {"first_step": 1.0 / n, "max_step": 1.0 / n}
    solve = fastnode.odeint_adjoint if mode == "adjoint" else fastnode.odeint
    # warm-up (allocator, lazy init) on a tiny solve
    solve(func, y0, t, rtol=1e-2, atol=1e-2, options={"first_step": 0.5, "max_step": 0.5}).sum().backward()
    saved = [0]

    def pack(x):
        saved[0] += x.numel() * x.element_size()
        return x

    if dev == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        ys = solve(func, y0, t, rtol=1e-2, atol=1e-2, options=opts)
    steps = fastnode.last_stats().n_accepted
    ys.sum().backward()
    if dev == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # kB -> MB (Linux)
    return {"mode": mode, "n": n, "steps": steps, "graph_mb": saved[0] / 2**20, "peak_mb": peak}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2, metavar=("MODE", "N"))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), dev, args.batch, args.dim, args.hidden)))
        return
    rows = []
    for n in (10, 100, 1000):
        for mode in ("backprop", "adjoint"):
            cmd = [sys.executable, __file__, "--one", mode, str(n), "--batch", str(args.batch), "--dim", str(args.dim),
                   "--hidden", str(args.hidden)]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(r, flush=True)
    peak_name = "peak MB (CUDA max allocated)" if dev == "cuda" else "peak MB (RSS growth, indicative)"
    lines = [f"# Adjoint memory: backprop vs adjoint (torch {torch.__version__}, {dev})", "",
             (f"Command: `.venv/bin/python bench/adjoint_memory.py`. MLP {args.dim}-{args.hidden}-{args.dim}, "
              f"batch {args.batch}, float32, dopri5, steps pinned with first_step = max_step = 1/n."), "",
             f"| steps | mode | accepted steps | graph MB (saved for backward) | {peak_name} |",
             "|--:|---|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['mode']} | {r['steps']} | {r['graph_mb']:.2f} | {r['peak_mb']:.1f} |")
    write_markdown("\n".join(lines) + "\n", args.out, "adjoint_memory.md", dev)


if __name__ == "__main__":
    main()
