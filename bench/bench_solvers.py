"""Solver benchmarks: problem x tolerance x provider, in two modes.

Modes:
    fwd: one solve under ``torch.no_grad()``.
    full: one solve with autograd recording, then the gradient of ``sum(ys)`` with respect to ``y0`` and the
        parameters: by backpropagation through the solver (``fastnode``, ``fastnode-per-sample``, ``torchdiffeq``)
        or by the adjoint (``fastnode-adjoint``, ``torchdiffeq-adjoint``; NFE counts the forward only, see
        ``bench/adjoint_nfe.py`` for backward NFE). MLP problems only.

Timing: the providers of one problem/tolerance/mode are timed together, in interleaved rounds (each round runs
every provider once, in a rotating order), on this thread's CPU time (``time.thread_time``, one torch thread by
default, see ``bench/conftest.py``) beside wall time. On a shared machine wall time charges other processes' bursts
to whichever provider ran then; thread CPU time does not, and interleaving spreads what remains (cache and memory
contention) over all providers. pytest-benchmark's statistics are those of the CPU-time rounds (replayed to it).

Each benchmark records in ``extra_info`` what is needed to read its time: device, dtype, versions, NFE,
accepted/rejected steps, the maximum relative error against the scipy reference, its rounds (``rounds_cpu_s``,
``rounds_wall_s``), their medians and spread (interquartile range over median; the report flags rows above 20%),
the median CPU time of one ``func`` call (``t_func_s``; forward plus backward in ``full`` mode) and
``overhead = t_solve / (NFE * t_func) - 1``, the share of the solve spent outside ``func``.

Run from the repository root (``make bench`` does this and writes the table to ``bench/out/``)::

    .venv/bin/python -m pytest -q bench --benchmark-json=bench/out/bench.json -p no:cacheprovider

Environment:
    FASTNODE_BENCH_DEVICE: ``cpu`` (default) or ``cuda``.
    FASTNODE_BENCH_TARGET_S: approximate timed seconds per provider and group (default 1.5; at least 5 rounds).
    FASTNODE_BENCH_WAIT_QUIET_S: total seconds the session may spend waiting for other processes to leave the CPU
        before timings (default 30; at most 20 per timing). Other processes' load during the rounds is recorded
        (``foreign_cpu_cores``) and marked in the report's wall-time column.
"""

from __future__ import annotations

import copy
import functools
import os
import time
from collections.abc import Callable

import pytest
import torch

from bench.problems import BUILDERS, get_problem
from bench.providers import (
    ForeignCPU,
    ProviderUnavailable,
    Rounds,
    ReplayClock,
    interleaved_rounds,
    make_provider,
    solve_stats,
    time_func,
    version_of,
)

DEVICE = torch.device(os.environ.get("FASTNODE_BENCH_DEVICE", "cpu"))
TARGET_S = float(os.environ.get("FASTNODE_BENCH_TARGET_S", "1.5"))
MIN_ROUNDS, MAX_ROUNDS = 5, 50
# Average cores used by other processes above which a measurement counts as disturbed (retried or flagged).
FOREIGN_CPU_LIMIT = 0.25
WAIT_EACH_S = 20.0
WAIT_TOTAL_S = float(os.environ.get("FASTNODE_BENCH_WAIT_QUIET_S", "30"))
_wait_left = WAIT_TOTAL_S
# The timer every benchmark here hands to pytest-benchmark (see ReplayClock).
REPLAY = ReplayClock()

# fastnode = backend "auto" (the compiled extension on CPU, Triton on CUDA; backpropagation through the solver runs
# on the torch reference); the -torch providers pin the reference backend.
FWD_PROVIDERS = ("fastnode", "fastnode-torch", "fastnode-per-sample", "torchdiffeq", "torchode")
FULL_PROVIDERS = ("fastnode", "fastnode-per-sample", "torchdiffeq", "fastnode-adjoint", "fastnode-adjoint-torch",
                  "torchdiffeq-adjoint")


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
    """Median thread CPU time of one func call on the whole batch, and the foreign CPU load while it was measured.

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
            t = time_func(func, t0, y0, backward=(mode == "full"), clock=time.thread_time)
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


def _runner(provider, mode: str, func: torch.nn.Module, y0: torch.Tensor) -> Callable[[], None]:
    """The timed work of one benchmark: a solve under no_grad (``fwd``) or a solve and its gradients (``full``)."""
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

    return run


@functools.cache
def _group_rounds(mode: str, problem_name: str, tol_name: str) -> tuple[dict[str, Rounds], float | None]:
    """Every available provider of one problem/tolerance/mode, timed together in interleaved rounds.

    Measured once, by the group's first benchmark; each benchmark then reports its own provider's rounds. Returns
    ``(provider -> Rounds, cores used by other processes meanwhile)``.
    """
    problem = get_problem(problem_name)
    tol = next(t for t in problem.tolerances if t.name == tol_name)
    func, y0 = _on_device(problem_name)
    runs = {}
    for name in FWD_PROVIDERS if mode == "fwd" else FULL_PROVIDERS:
        try:
            run = _runner(make_provider(name, problem, tol, DEVICE), mode, func, y0)
            run()  # a provider that cannot run this case is left out of the group (its own benchmark skips)
        except (ProviderUnavailable, NotImplementedError):
            continue
        runs[name] = run
    _wait_for_quiet()
    with ForeignCPU() as foreign:
        rounds = interleaved_rounds(runs, TARGET_S, MIN_ROUNDS, MAX_ROUNDS)
    return rounds, foreign.cores


@pytest.mark.benchmark(timer=REPLAY)
@pytest.mark.parametrize("mode, problem_name, tol_name, provider_name", _cases())
def test_solver(benchmark, mode: str, problem_name: str, tol_name: str, provider_name: str) -> None:
    """Reports one provider's interleaved rounds on one problem/tolerance/mode, with its statistics and accuracy."""
    problem = get_problem(problem_name)
    tol = next(t for t in problem.tolerances if t.name == tol_name)
    try:
        provider = make_provider(provider_name, problem, tol, DEVICE)
    except ProviderUnavailable as exc:
        pytest.skip(str(exc))
    func, y0 = _on_device(problem_name)

    # Untimed run for NFE, steps and accuracy (the counting wrapper would distort a timing).
    try:
        with torch.set_grad_enabled(mode == "full"):
            ys, stats = solve_stats(provider, func, y0)
    except NotImplementedError as exc:
        pytest.skip(f"{provider_name}: not implemented yet: {exc}")
    err = problem.max_rel_error(ys)
    del ys

    group, foreign = _group_rounds(mode, problem_name, tol_name)
    mine = group[provider_name]
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
            "clock": "thread_time",
            "rounds_cpu_s": mine.cpu,
            "rounds_wall_s": mine.wall,
            "cpu_median_s": mine.cpu_median,
            "wall_median_s": mine.wall_median,
            "spread": mine.spread,
            "group_providers": list(group),
            # Cores' worth of CPU other processes used during the group's rounds (wall times are suspect above a
            # threshold; thread CPU times much less so).
            "foreign_cpu_cores": foreign,
            "overhead": mine.cpu_median / (stats["nfe"] * t_func) - 1.0,
        }
    )
    # pytest-benchmark's statistics (and JSON "stats") are those of the recorded CPU-time rounds.
    REPLAY.load(mine.cpu)
    benchmark.pedantic(REPLAY.advance, rounds=len(mine.cpu), iterations=1, warmup_rounds=0)
