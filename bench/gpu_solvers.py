"""Solve-level comparison on a GPU: fastnode (triton, per-sample, torch reference) vs torchdiffeq vs torchode vs
diffrax, at B in {64, 1024, 16384}, on an MLP neural ODE and a van der Pol batch, forward, backprop and adjoint.

Cells (problem, B, mode, provider), in priority order (B = 1024 first: the target row "B=1024 MLP forward faster than
torchdiffeq and torchode"); ``--budget`` stops starting new cells and the table holds what ran:

- ``forward``: a solve under ``torch.no_grad()`` (diffrax: a jitted solve);
- ``backprop``: the solve recording a graph, then the gradient of ``sum(ys**2)`` w.r.t. ``y0`` and the parameters
  (fastnode: ``auto`` runs such a solve on the torch backend; diffrax: ``RecursiveCheckpointAdjoint``);
- ``adjoint``: ``odeint_adjoint`` and the same gradient (fastnode: forward on triton, backward on what ``auto``
  picks for it; diffrax: ``BacksolveAdjoint``).

Timing: torch providers between two CUDA events around the call (median of rounds, after an untimed warm-up that
also gives NFE and steps); diffrax (JAX, its own streams) by the wall clock around the jitted call and
``block_until_ready``, compile excluded. fastnode's forward rows also give the host syncs per loop iteration as torch
sees them (``torch.cuda.set_sync_debug_mode``), set-up and end included.

Run on a CUDA machine from the repository root::

    python bench/gpu_solvers.py --out bench/results/<device>/solvers.md [--budget 80] [--batches 1024]

Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# JAX takes 75% of the GPU's memory at start-up unless told otherwise; torch shares the device here.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from bench.problems import MLPODE, VanDerPol  # noqa: E402
from bench.providers import version_of  # noqa: E402

BATCHES = (1024, 64, 16384)
PROBLEMS = ("mlp", "vdp")
MODES = ("forward", "adjoint", "backprop")
PROVIDERS = {
    "forward": ("fastnode-triton", "fastnode-per-sample-triton", "fastnode-torch", "torchdiffeq", "torchode",
                "diffrax", "diffrax-vmap"),
    "backprop": ("fastnode", "torchdiffeq", "torchode", "diffrax"),
    "adjoint": ("fastnode-adjoint", "fastnode-adjoint-per-sample", "torchdiffeq-adjoint", "diffrax-backsolve"),
}
RTOL, ATOL = 1e-5, 1e-7


class Unavailable(Exception):
    """The provider's library is not installed (the cell is skipped, not failed)."""


def make_problem(name: str, batch: int, device: torch.device):
    """``(func, y0 [B, N], t [T])`` on ``device``: the MLP (N=32, H=64, float32, t in [0, 1]) or van der Pol (N=2,
    float64, mu log-spaced in [0.5, 2], t in [0, 2]: the adjoint integrates it backwards, where the limit cycle
    repels, and at mu = 10 or t = 5 every library's backward solve underflows its step)."""
    if name == "mlp":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            func = MLPODE(32, 64)
        y0 = torch.randn(batch, 32, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([0.0, 1.0])
    elif name == "vdp":
        mu = torch.logspace(math.log10(0.5), math.log10(2.0), batch, dtype=torch.float64)
        x0 = 1.0 + 1.5 * torch.rand(batch, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        func, y0 = VanDerPol(mu), torch.stack([x0, torch.zeros_like(x0)], dim=1)
        t = torch.linspace(0.0, 2.0, 5, dtype=torch.float64)
    else:
        raise ValueError(f"problem: unknown {name!r}; known: {PROBLEMS}")
    return func.to(device), y0.to(device), t.to(device)


def count_syncs(fn) -> tuple[object, int]:
    """``(fn(), number of synchronizing CUDA calls it made)`` (see tests/cuda_syncs.py)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, sum(1 for w in caught if "synchroniz" in str(w.message).lower())


# --- torch providers --------------------------------------------------------------------------------------------------

def _grad_of(ys, y0, params):
    return torch.autograd.grad(ys.square().sum(), [y0, *params])


def _torch_call(provider: str, mode: str, func, y0, t):
    """A no-argument call running one solve (and its gradient) of ``provider``; raises Unavailable."""
    params = [p for p in func.parameters() if p.requires_grad]
    if provider.startswith("fastnode"):
        import fastnode

        opts = {"per_sample": "per-sample" in provider}
        if provider.endswith("-triton") or provider.endswith("-torch"):
            opts["backend"] = provider.rsplit("-", 1)[1]
        solve = fastnode.odeint_adjoint if mode == "adjoint" else fastnode.odeint
        kw = {"rtol": RTOL, "atol": ATOL, "method": "dopri5", "options": opts}
        if mode == "adjoint":
            kw["adjoint_options"] = dict(opts)
    elif provider.startswith("torchdiffeq"):
        try:
            import torchdiffeq
        except ImportError as exc:
            raise Unavailable(f"torchdiffeq is not installed ({exc})") from exc
        solve = torchdiffeq.odeint_adjoint if mode == "adjoint" else torchdiffeq.odeint
        kw = {"rtol": RTOL, "atol": ATOL, "method": "dopri5"}
    elif provider == "torchode":
        return _torchode_call(mode, func, y0, t)
    else:
        raise ValueError(provider)
    if mode == "forward":
        def call():
            with torch.no_grad():
                return solve(func, y0, t, **kw)
        return call

    def call_grad():
        y = y0.detach().requires_grad_(True)
        return _grad_of(solve(func, y, t, **kw), y, params)
    return call_grad


def _torchode_call(mode: str, func, y0, t):
    try:
        import torchode as to
    except ImportError as exc:
        raise Unavailable(f"torchode is not installed ({exc})") from exc
    if mode == "adjoint":
        raise Unavailable("torchode has no adjoint")
    term = to.ODETerm(func)
    solver = to.AutoDiffAdjoint(to.Dopri5(term=term), to.IntegralController(atol=ATOL, rtol=RTOL, term=term))
    t_eval = t.to(y0.dtype).expand(y0.shape[0], -1).contiguous()
    params = [p for p in func.parameters() if p.requires_grad]

    def solve(y):
        return solver.solve(to.InitialValueProblem(y0=y, t_eval=t_eval), term=term).ys

    if mode == "forward":
        def call():
            with torch.no_grad():
                return solve(y0)
        return call

    def call_grad():
        y = y0.detach().requires_grad_(True)
        return _grad_of(solve(y), y, params)
    return call_grad


# --- diffrax -------------------------------------------------------------------------------------------------------

def _diffrax_call(provider: str, mode: str, problem: str, func, y0, t):
    """A no-argument call of a jitted diffrax solve (or its gradient); returns ``(call, stats_fn)``."""
    try:
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_enable_x64", True)
        import diffrax
    except ImportError as exc:
        raise Unavailable(f"jax/diffrax is not installed ({exc})") from exc
    vmap = provider == "diffrax-vmap"
    if problem == "mlp":
        lin1, lin2 = func.net[0], func.net[2]
        args = tuple(jnp.asarray(p.detach().cpu().numpy()) for p in (lin1.weight, lin1.bias, lin2.weight, lin2.bias))

        def vf(s, y, a):
            w1, b1, w2, b2 = a
            tt = jnp.broadcast_to(jnp.asarray(s, y.dtype), y.shape[:-1] + (1,))
            return jnp.tanh(jnp.concatenate([y, tt], axis=-1) @ w1.T + b1) @ w2.T + b2
        in_axes = (None, 0)
    else:
        args = jnp.asarray(func.mu.cpu().numpy())

        def vf(s, y, mu):
            x, v = y[..., 0], y[..., 1]
            return jnp.stack([v, mu * (1.0 - x * x) * v - x], axis=-1)
        in_axes = (0, 0)
    ts = jnp.asarray(t.cpu().numpy())
    adjoint = diffrax.BacksolveAdjoint() if mode == "adjoint" else diffrax.RecursiveCheckpointAdjoint()

    def solve(a, y):
        sol = diffrax.diffeqsolve(diffrax.ODETerm(vf), diffrax.Dopri5(), ts[0], ts[-1], None, y, args=a,
                                  stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
                                  saveat=diffrax.SaveAt(ts=ts), adjoint=adjoint, max_steps=1 << 16)
        return sol.ys, sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"]

    if vmap:
        solve = jax.vmap(solve, in_axes=in_axes)
    y = jnp.asarray(y0.cpu().numpy())
    if mode == "forward":
        fn = jax.jit(solve)
        holder = {}

        def call():
            out = fn(args, y)
            jax.block_until_ready(out)
            holder["stats"] = out[1:]
            return out
        return call, lambda: {k: float(jnp.mean(v)) for k, v in zip(("accepted", "rejected"), holder["stats"])}

    def loss(a, yy):
        return jnp.sum(solve(a, yy)[0] ** 2)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))

    def call_grad():
        out = grad(args, y)
        jax.block_until_ready(out)
        return out
    return call_grad, lambda: {}


# --- timing --------------------------------------------------------------------------------------------------------

def _time_ms(call, rounds: int, events: bool) -> float:
    times = []
    for _ in range(rounds):
        if events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            call()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _fastnode_stats(stats) -> dict:
    out = {"backend": stats.backend, "nfe": stats.nfe, "iterations": stats.n_iterations}
    for k in ("n_accepted", "n_rejected"):
        v = getattr(stats, k)
        out[k.removeprefix("n_")] = float(torch.as_tensor(v, dtype=torch.float64).mean())
    if stats.backward is not None:
        out["backward_backend"] = stats.backward.backend
        out["nfe_backward"] = stats.backward.nfe
    return out


def run_cell(problem: str, batch: int, mode: str, provider: str, device, rounds: int, cell_s: float) -> dict:
    """One row: warm-up (stats, syncs), then up to ``rounds`` timed calls within about ``cell_s`` seconds."""
    row = {"problem": problem, "batch": batch, "mode": mode, "provider": provider}
    func, y0, t = make_problem(problem, batch, device)
    stats_fn = None
    if provider.startswith("diffrax"):
        call, stats_fn = _diffrax_call(provider, mode, problem, func, y0, t)
    else:
        call = _torch_call(provider, mode, func, y0, t)
    call()  # warm-up: Triton/XLA compiles, constant uploads
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if provider.startswith("fastnode") and mode == "forward":
        _, n_sync = count_syncs(call)  # the second call: what every later solve costs
    else:
        call()
        n_sync = None
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    if provider.startswith("fastnode"):
        import fastnode

        row.update(_fastnode_stats(fastnode.last_stats()))
        if n_sync is not None:
            row["syncs"] = n_sync
            row["syncs_per_step"] = n_sync / max(1, row["iterations"])
    elif stats_fn is not None:
        row.update(stats_fn())
    n = max(1, min(rounds, int(cell_s / max(first_s, 1e-4))))
    row["t_ms"] = _time_ms(call, n, events=not provider.startswith("diffrax"))
    row["rounds"] = n
    return row


def run(device, problems, batches, modes, providers, rounds: int, budget_s: float | None) -> list[dict]:
    rows = []
    t0 = time.monotonic()
    cells = [(p, b, m, pr) for b in batches for p in problems for m in modes for pr in PROVIDERS[m]
             if providers is None or pr in providers]
    for i, (p, b, m, pr) in enumerate(cells):
        left = None if budget_s is None else budget_s - (time.monotonic() - t0)
        if left is not None and left <= 0:
            print(f"gpu_solvers.py: time budget spent; {len(cells) - i} cells not run", file=sys.stderr)
            break
        try:
            row = run_cell(p, b, m, pr, device, rounds, min(5.0, left if left is not None else 5.0))
        except Unavailable as exc:
            print(f"skip {pr}: {exc}", file=sys.stderr)
            continue
        except Exception as exc:  # noqa: BLE001  (one failing library must not end the comparison)
            row = {"problem": p, "batch": b, "mode": m, "provider": pr, "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(row, file=sys.stderr, flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def to_markdown(rows: list[dict], device_name: str) -> str:
    head = ["problem", "B", "mode", "provider", "time (ms)", "NFE", "acc/rej (mean)", "backend", "syncs/iter"]
    lines = [f"# Solves on {device_name}", "",
             f"dopri5, rtol {RTOL:g}, atol {ATOL:g}. torch {torch.__version__}, triton {version_of('triton')}, "
             f"torchdiffeq {version_of('torchdiffeq')}, torchode {version_of('torchode')}, jax {version_of('jax')}, "
             f"diffrax {version_of('diffrax')}. Torch rows: CUDA events, median; diffrax: wall clock of the jitted "
             "call (compile excluded). mlp: N=32, H=64, float32, t in [0, 1]; vdp: N=2, float64, mu in [0.5, 2], "
             "t in [0, 2].", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['problem']} | {r['batch']} | {r['mode']} | {r['provider']} | error: "
                         f"{r['error'].replace('|', '/')} | | | | |")
            continue
        backend = r.get("backend", "-") + (f" / {r['backward_backend']}" if r.get("backward_backend") else "")
        lines.append(f"| {r['problem']} | {r['batch']} | {r['mode']} | {r['provider']} | {r['t_ms']:.2f} | "
                     f"{f(r.get('nfe'), 'd')} | {f(r.get('accepted'), '.1f')}/{f(r.get('rejected'), '.1f')} | "
                     f"{backend} | {f(r.get('syncs_per_step'), '.2f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", nargs="*", default=list(PROBLEMS), choices=PROBLEMS)
    ap.add_argument("--batches", nargs="*", type=int, default=list(BATCHES))
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    ap.add_argument("--providers", nargs="*", help="only these providers")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--budget", type=float, help="seconds: start no new cell after this")
    ap.add_argument("--out", type=Path, help="write the Markdown table here (and the records next to it as .json)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or any(b < 1 for b in args.batches) or (args.budget is not None and args.budget <= 0):
        ap.error("--rounds and --batches must be >= 1, --budget > 0")
    if not torch.cuda.is_available():
        print("gpu_solvers.py: no CUDA device; nothing to compare here.")
        return 0
    device = torch.device("cuda")
    rows = run(device, args.problems, args.batches, args.modes, args.providers, args.rounds, args.budget)
    name = torch.cuda.get_device_name(device)
    md = to_markdown(rows, name)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)
        args.out.with_suffix(".json").write_text(json.dumps({"device": name, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
