"""Solve-level comparison on a GPU: fastnode (triton backend) vs fastnode (torch backend) vs torchdiffeq vs torchode.

For each standard problem (``bench/problems.py``) and tolerance: the median time of a forward solve under
``torch.no_grad()`` (CUDA-synchronised), NFE, accepted/rejected steps, the median time of one ``func`` call on the
batch and the overhead ``t_solve / (NFE * t_func) - 1`` (the share of the solve spent outside ``func``), plus the
maximum relative error against the scipy reference when scipy is installed.

Run on a CUDA machine from the repository root::

    python bench/gpu_solvers.py --out bench/results/<device>/gpu_solvers.md

Without CUDA it says so and exits (``--device cpu`` runs it on CPU anyway, where the triton rows are skipped).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.problems import BUILDERS, get_problem
from bench.providers import ProviderUnavailable, make_provider, solve_stats, time_func, version_of

PROVIDERS = ("fastnode-triton", "fastnode-torch", "fastnode-per-sample-triton", "fastnode-per-sample-torch",
             "torchdiffeq", "torchode")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn, device: torch.device, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(device: torch.device, problems, providers, rounds: int, accuracy: bool) -> list[dict]:
    rows = []
    for name in problems:
        problem = get_problem(name)
        func = copy.deepcopy(problem.func).to(device)
        y0 = problem.y0.to(device)
        t_func = time_func(func, problem.t_eval[0].to(device), y0, backward=False)
        for tol in problem.tolerances:
            for pname in providers:
                try:
                    provider = make_provider(pname, problem, tol, device)
                except ProviderUnavailable as exc:
                    print(f"skip {pname}: {exc}", file=sys.stderr)
                    continue
                with torch.no_grad():
                    ys, stats = solve_stats(provider, func, y0)  # untimed: NFE, steps; also the warm-up
                    err = problem.max_rel_error(ys) if accuracy else None
                    del ys

                    def solve(provider=provider, func=func, y0=y0):
                        provider.solve(func, y0)

                    solve()
                    t_solve = _median_s(solve, device, rounds)
                nfe = stats["nfe"]
                rows.append({"problem": name, "tol": tol.name, "provider": pname, "t_solve_ms": 1e3 * t_solve,
                             "nfe": nfe, "accepted": stats["n_accepted_mean"], "rejected": stats["n_rejected_mean"],
                             "t_func_ms": 1e3 * t_func, "overhead": t_solve / (nfe * t_func) - 1 if nfe else None,
                             "max_rel_err": err, "backend": stats.get("backend"), "batch": problem.batch,
                             "dim": problem.y0.shape[1],
                             "dtype": str(problem.dtype).removeprefix("torch.")})
                print(rows[-1], file=sys.stderr)
    return rows


def to_markdown(rows: list[dict], device_name: str) -> str:
    head = ["problem", "tol", "provider", "time (ms)", "NFE", "acc/rej (mean)", "t_func (ms)", "overhead",
            "max rel err"]
    lines = [f"# Solves on {device_name} (forward, no grad)", "",
             (f"torch {torch.__version__}, triton {version_of('triton')}, torchdiffeq {version_of('torchdiffeq')}, "
              f"torchode {version_of('torchode')}."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for r in rows:
        lines.append(f"| {r['problem']} | {r['tol']} | {r['provider']} | {r['t_solve_ms']:.2f} | {r['nfe']} | "
                     f"{f(r['accepted'], '.1f')}/{f(r['rejected'], '.1f')} | {r['t_func_ms']:.3f} | "
                     f"{f(r['overhead'], '.2f')} | {f(r['max_rel_err'], '.1e')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--problems", nargs="*", default=list(BUILDERS))
    ap.add_argument("--providers", nargs="*", default=list(PROVIDERS))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--no-accuracy", action="store_true", help="skip the scipy reference (and its error column)")
    ap.add_argument("--out", type=Path, help="write the Markdown table here (and the records next to it as .json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_solvers.py: no CUDA device (pass --device cpu to run the CPU providers anyway).")
        return 0
    accuracy = not args.no_accuracy
    if accuracy:
        try:
            import scipy  # noqa: F401
        except ImportError:
            print("scipy is not installed: no accuracy column", file=sys.stderr)
            accuracy = False
    rows = run(device, args.problems, args.providers, args.rounds, accuracy)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    md = to_markdown(rows, name)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)
        args.out.with_suffix(".json").write_text(json.dumps({"device": name, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
