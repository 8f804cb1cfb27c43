"""Solver benchmarks: problem x tolerance x provider, in two modes.

Modes:
    fwd: one solve under ``torch.no_grad()``.
    full: one solve with autograd recording, then the gradient of ``sum(ys)`` with respect to ``y0`` and the
        parameters: by backpropagation through the solver (``fastnode``, ``fastnode-per-sample``, ``torchdiffeq``)
        or by the adjoint (``fastnode-adjoint``, ``torchdiffeq-adjoint``; NFE counts the forward only, see
        ``bench/adjoint_nfe.py`` for backward NFE). MLP problems only.

Each benchmark records in ``extra_info`` what is needed to read its time: device, dtype, versions, NFE,
accepted/rejected steps, the maximum relative error against the scipy reference, the median time of one ``func``
call (``t_func_s``; forward plus backward in ``full`` mode) and
``overhead = t_solve / (NFE * t_func) - 1``, the share of the solve spent outside ``func``.

Run from the repository root (``make bench`` does this and writes the table)::

    .venv/bin/python -m pytest -q bench --benchmark-json=bench/results/cpu/bench.json -p no:cacheprovider

Environment:
    FASTNODE_BENCH_DEVICE: ``cpu`` (default) or ``cuda``.
    FASTNODE_BENCH_TARGET_S: approximate timed seconds per benchmark (default 1.5; at least 3 rounds are taken).
    FASTNODE_BENCH_WAIT_QUIET_S: total seconds the session may spend waiting for other processes to leave the CPU
        before timings (default 120; at most 20 per timing). Timings disturbed anyway are recorded
        (``foreign_cpu_cores``) and marked in the report.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import time

import pytest
import torch

from bench.problems import BUILDERS, get_problem
from bench.providers import ForeignCPU, ProviderUnavailable, make_provider, solve_stats, time_func, version_of

DEVICE = torch.device(os.environ.get("FASTNODE_BENCH_DEVICE", "cpu"))
TARGET_S = float(os.environ.get("FASTNODE_BENCH_TARGET_S", "1.5"))
MIN_ROUNDS, MAX_ROUNDS = 3, 50
# Average cores used by other processes above which a measurement counts as disturbed (retried or flagged).
FOREIGN_CPU_LIMIT = 0.25
WAIT_EACH_S = 20.0
WAIT_TOTAL_S = float(os.environ.get("FASTNODE_BENCH_WAIT_QUIET_S", "120"))
_wait_left = WAIT_TOTAL_S

# fastnode = backend "auto" (the compiled extension on CPU, Triton on CUDA; backpropagation through the solver runs
# on the torch reference); the -torch providers pin the reference backend.
# -compiled: options['compile'] (the step with func as one torch.compile'd program; compiled in the warm-up run).
FWD_PROVIDERS = ("fastnode", "fastnode-torch", "fastnode-per-sample", "fastnode-compiled",
                 "fastnode-per-sample-compiled", "torchdiffeq", "torchode")
FULL_PROVIDERS = ("fastnode", "fastnode-per-sample", "fastnode-compiled", "torchdiffeq", "fastnode-adjoint",
                  "fastnode-adjoint-torch", "torchdiffeq-adjoint")


def _cases() -> list:
    cases = []
    for name in BUILDERS:
        problem = get_problem(name)
        for mode, providers in (("fwd", FWD_PROVIDERS), ("full", FULL_PROVIDERS)):
            if mode == "full" and not problem.grad_modes:
                continue
            for tol in problem.tolerances:
                for provider in providers:
                    cases.append(
                        pytest.param(mode, name, tol.name, provider, id=f"{mode}-{name}-{tol.name}-{provider}")
                    )
    return cases


@functools.cache
def _on_device(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The problem's func and y0 on the benchmark device (a copy, so the CPU originals stay intact)."""
    problem = get_problem(name)
    return copy.deepcopy(problem.func).to(DEVICE), problem.y0.to(DEVICE)


@functools.cache
def _t_func(name: str, mode: str) -> tuple[float, float | None]:
    """Median time of one func call on the whole batch, and the foreign CPU load while it was measured.

    Measured once per problem and mode with the 0-d ``t`` of the shared-step call: the per-sample ``t: [B]`` costs the
    same (one column either way), and a single measurement keeps timer noise from showing up as overhead differences
    between providers. Because it is cached, one disturbed measurement would skew every row that uses it, so it is
    retried (keeping the fastest) while other processes were busy.
    """
    func, y0 = _on_device(name)
    t0 = get_problem(name).t_eval[0].to(DEVICE)
    best: tuple[float, float | None] | None = None
    for _ in range(3):
        _wait_for_quiet()
        with ForeignCPU() as foreign:
            t = time_func(func, t0, y0, backward=(mode == "full"))
        if best is None or t < best[0]:
            best = (t, foreign.cores)
        if foreign.cores is None or foreign.cores <= FOREIGN_CPU_LIMIT:
            break
    return best


def _wait_for_quiet() -> None:
    """Waits until other processes leave the CPU alone, so a timing starts on a quiet machine.

    At most WAIT_EACH_S per call and WAIT_TOTAL_S per session, so a machine that never quiets down cannot stretch
    the run past its budget; a benchmark disturbed anyway is flagged in the report by its foreign-CPU record.
    """
    global _wait_left
    deadline = time.perf_counter() + min(WAIT_EACH_S, _wait_left)
    start = time.perf_counter()
    try:
        while time.perf_counter() < deadline:
            with ForeignCPU() as foreign:
                time.sleep(0.2)
            if foreign.cores is None or foreign.cores <= FOREIGN_CPU_LIMIT:
                return
    finally:
        _wait_left = max(0.0, _wait_left - (time.perf_counter() - start))


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize("mode, problem_name, tol_name, provider_name", _cases())
def test_solver(benchmark, mode: str, problem_name: str, tol_name: str, provider_name: str) -> None:
    """Times one provider on one problem/tolerance/mode and records its statistics and accuracy."""
    problem = get_problem(problem_name)
    tol = next(t for t in problem.tolerances if t.name == tol_name)
    try:
        provider = make_provider(provider_name, problem, tol, DEVICE)
    except ProviderUnavailable as exc:
        pytest.skip(str(exc))
    func, y0 = _on_device(problem_name)
    params = [p for p in func.parameters() if p.requires_grad]

    if mode == "fwd":

        def run() -> None:
            with torch.no_grad():
                provider.solve(func, y0)
            _sync()

    else:

        def run() -> None:
            yy = y0.detach().requires_grad_(True)
            loss = provider.solve(func, yy).sum()
            torch.autograd.grad(loss, [yy, *params])
            _sync()

    # Untimed run for NFE, steps and accuracy (the counting wrapper would distort a timing). It also warms up.
    try:
        with torch.set_grad_enabled(mode == "full"):
            ys, stats = solve_stats(provider, func, y0)
    except NotImplementedError as exc:
        pytest.skip(f"{provider_name}: not implemented yet: {exc}")
    err = problem.max_rel_error(ys)
    del ys

    # One plain timed call sizes the number of rounds so each benchmark takes about TARGET_S.
    start = time.perf_counter()
    run()
    once = time.perf_counter() - start
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, math.ceil(TARGET_S / max(once, 1e-6))))

    t_func, t_func_foreign = _t_func(problem_name, mode)
    benchmark.group = f"{problem_name}/{tol_name}/{mode}"
    benchmark.extra_info.update(
        {
            "problem": problem_name,
            "problem_description": problem.description,
            "mode": mode,
            "provider": provider_name,
            "method": "dopri5",
            "tolerance": tol_name,
            "rtol": tol.rtol,
            "atol": tol.atol,
            "per_sample": provider.per_sample,
            "device": str(DEVICE),
            "dtype": str(problem.dtype).removeprefix("torch."),
            "batch": problem.batch,
            "dim": problem.y0.shape[1],
            "n_eval": problem.t_eval.shape[0],
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "torchdiffeq_version": version_of("torchdiffeq"),
            "torchode_version": version_of("torchode"),
            "fastnode_version": version_of("fastnode"),
            **stats,
            "max_rel_error": err,
            "t_func_s": t_func,
            "t_func_foreign_cpu_cores": t_func_foreign,
        }
    )
    _wait_for_quiet()
    with ForeignCPU() as foreign:
        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    # Cores' worth of CPU other processes used during the timed rounds: the report flags timings above a threshold.
    benchmark.extra_info["foreign_cpu_cores"] = foreign.cores
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["overhead"] = median / (stats["nfe"] * t_func) - 1.0
