"""Backpropagation through the solver (forward + backward of a recorded solve), CPU: fastnode's ext backend vs its
torch reference backend vs torchdiffeq.

The problems are the issue's: a tanh MLP vector field ``N-H-H-N`` (three linear layers), float32, dopri5,
``rtol=1e-6, atol=1e-8``, 10 output times on [0, 1], loss ``sum(ys * w)`` with a fixed ``w``:

- ``mlp-small``: B=128, N=32, H=64;
- ``mlp-medium``: B=512, N=256, H=512.

Times are the calling thread's CPU time (``time.thread_time``) with torch on one thread, so the figures hold up on a
machine shared with other work; the providers are interleaved round by round, after warm-up rounds, and the median
is printed with the spread (max/min of the rounds) and the NFE; beside the ratio of the medians, the median of the
per-round ratios (each round's providers ran back to back, under the same load).

Run: ``.venv/bin/python bench/backprop.py [mlp-small|mlp-medium|all] [rounds]`` (``make deps-bench`` installs
torchdiffeq). ``--profile`` prints torch's profiler table of one ext round instead.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastnode  # noqa: E402

SIZES = {"mlp-small": (128, 32, 64), "mlp-medium": (512, 256, 512)}
RTOL, ATOL, T_OUT = 1e-6, 1e-8, 10


def problem(name: str):
    """``(func, y0 [B, N], t [10], w [10, B, N])`` float32, seeded."""
    B, N, H = SIZES[name]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(N, H), torch.nn.Tanh(), torch.nn.Linear(H, H), torch.nn.Tanh(),
                              torch.nn.Linear(H, N))

    def func(t, y):
        return net(y)

    y0 = torch.randn(B, N)
    t = torch.linspace(0.0, 1.0, T_OUT)
    w = torch.randn(T_OUT, B, N)
    return func, net, y0, t, w


def providers(name: str) -> dict:
    func, net, y0, t, w = problem(name)
    params = list(net.parameters())

    def fastnode_run(backend):
        def run():
            y = y0.clone().requires_grad_(True)
            ys = fastnode.odeint(func, y, t, rtol=RTOL, atol=ATOL, options={"backend": backend})
            torch.autograd.grad((ys * w).sum(), [y, *params])
        return run

    out = {"fastnode ext": fastnode_run("auto"), "fastnode torch": fastnode_run("torch")}
    try:
        import torchdiffeq
    except ImportError:
        print("torchdiffeq is not installed (make deps-bench): its row is left out")
        return out

    def td_run():
        y = y0.clone().requires_grad_(True)
        ys = torchdiffeq.odeint(func, y, t, rtol=RTOL, atol=ATOL)
        torch.autograd.grad((ys * w).sum(), [y, *params])

    out["torchdiffeq"] = td_run
    return out


def nfe(name: str) -> tuple[int, str]:
    func, net, y0, t, w = problem(name)
    fastnode.odeint(func, y0.clone().requires_grad_(True), t, rtol=RTOL, atol=ATOL)
    s = fastnode.last_stats()
    return int(s.nfe), s.backend


def measure(name: str, rounds: int, warmup: int = 3) -> None:
    cases = providers(name)
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    res = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            a = time.thread_time()
            fn()
            res[k].append(time.thread_time() - a)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in res.items()}
    n, backend = nfe(name)
    B, N, H = SIZES[name]
    print(f"\n{name}: B={B}, {N}-{H}-{H}-{N} tanh MLP, float32, dopri5, rtol {RTOL:g}, atol {ATOL:g}, {T_OUT} outputs;"
          f" forward NFE {n} (auto ran on {backend}); one thread, thread CPU time, median of {rounds} rounds")
    print("| provider | fwd+bwd ms | spread (max/min) | torchdiffeq / this | median of per-round ratios |")
    print("|---|--:|--:|--:|--:|")
    for k, ms in med.items():
        spread = max(res[k]) / min(res[k])
        speed = per_round = ""
        if "torchdiffeq" in med:
            speed = f"{med['torchdiffeq'] / ms:.2f}x"
            ratios = sorted(b / a for a, b in zip(res[k], res["torchdiffeq"]))  # the same round: the same load
            per_round = f"{ratios[len(ratios) // 2]:.2f}x"
        print(f"| {k} | {ms:.2f} | {spread:.2f} | {speed} | {per_round} |")


def profile(name: str) -> None:
    run = providers(name)["fastnode ext"]
    for _ in range(3):
        run()
    with torch.profiler.profile() as prof:
        run()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    which = args[0] if args else "all"
    names = list(SIZES) if which == "all" else [which]
    if "--profile" in sys.argv:
        for nm in names:
            profile(nm)
    else:
        for nm in names:
            measure(nm, int(args[1]) if len(args) > 1 else 15)
