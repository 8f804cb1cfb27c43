"""Solver providers compared by the benchmarks, and the measurements shared by all of them.

A provider wraps one library behind the same call, ``solve(func, y0) -> ys`` with ``ys: [T, B, N]`` (torchdiffeq's
layout), and reports the library's own step statistics for its latest solve. Everything a provider needs is bound
at construction (problem, tolerances), so the timed call does only what a user's call would.

Example:
    >>> from bench.problems import get_problem
    >>> from bench.providers import make_provider
    >>> p = get_problem("mlp-small")
    >>> solver = make_provider("torchdiffeq", p, p.tolerances[0])
    >>> ys = solver.solve(p.func, p.y0)  # [T, B, N]
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bench.problems import Problem, Tolerance

if TYPE_CHECKING:  # typing.Self needs Python 3.11; the package supports 3.10
    from typing_extensions import Self

METHOD = "dopri5"

# Dormand-Prince nodes of the six stages evaluated per attempted step (the first stage reuses the last
# evaluation of the previous step, FSAL): c2..c7.
_DOPRI5_NODES = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)


class ProviderUnavailable(Exception):
    """The provider's library cannot be imported (the benchmark is skipped, not failed)."""


def version_of(dist: str) -> str:
    """Installed version of distribution ``dist``, or ``"n/a"``.

    Args:
        dist: Distribution name, e.g. ``"torchode"``.
    """
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "n/a"


def _sync(device: torch.device) -> None:
    # CUDA work is asynchronous: without a sync a timer measures the launch, not the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CountingFunc(nn.Module):
    """Wraps a vector field, counting calls and recording the time argument of each.

    Used only in the untimed statistics run, so its own cost never enters a timing.

    Args:
        func: The wrapped vector field.
    """

    def __init__(self, func: nn.Module):
        super().__init__()
        self.func = func
        self.calls = 0
        self.times: list[torch.Tensor] = []

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Counts, records ``t`` and forwards the call."""
        self.calls += 1
        self.times.append(t.detach().clone())
        return self.func(t, y)


def infer_shared_steps(times: list[torch.Tensor]) -> tuple[int, int] | None:
    """Infers (accepted, rejected) for a shared-step dopri5 solve from the times ``func`` was called at.

    Applies to solvers that spend two calls choosing the initial step and then six calls per attempted step at
    ``t0 + c_i h`` (torchdiffeq's dopri5). An attempt is rejected when the next attempt starts at the same ``t0``
    and accepted when it starts at ``t0 + h``; the last attempt is accepted (the solve ended).

    Args:
        times: 0-d tensors, one per call, in call order.

    Returns:
        ``(n_accepted, n_rejected)``, or ``None`` when the call pattern does not fit (then nothing is claimed).
    """
    if len(times) < 8 or (len(times) - 2) % 6 or any(t.ndim != 0 for t in times):
        return None
    ts = [float(t) for t in times[2:]]
    starts, ends = [], []
    for k in range(0, len(ts), 6):
        first, last = ts[k], ts[k + 4]
        h = (last - first) / (_DOPRI5_NODES[4] - _DOPRI5_NODES[0])
        starts.append(last - h)
        ends.append(last)
    accepted = rejected = 0
    for i in range(len(starts) - 1):
        if abs(starts[i + 1] - ends[i]) < abs(starts[i + 1] - starts[i]):
            accepted += 1
        else:
            rejected += 1
    return accepted + 1, rejected


def _summary(value: Any) -> tuple[float | None, float | None]:
    """``(mean, max)`` of a per-sample tensor, or ``(v, v)`` of a scalar; ``(None, None)`` if missing."""
    if value is None:
        return None, None
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            return float(value), float(value)
        v = value.detach().double()
        return float(v.mean()), float(v.max())
    return float(value), float(value)


class Provider:
    """Base class: one library solving one problem at one tolerance.

    Args:
        problem: The problem (its ``t_eval`` and tolerances are bound here).
        tol: Tolerances to solve at.
        device: Device the state lives on.

    Attributes:
        name: Provider id used in benchmark names.
        per_sample: Whether ``func`` receives ``t: [B]`` (per-sample step control).
    """

    name = "base"
    per_sample = False

    def __init__(self, problem: Problem, tol: Tolerance, device: torch.device):
        self.problem = problem
        self.tol = tol
        self.device = device
        self.t_eval = problem.t_eval.to(device)

    def solve(self, func: nn.Module, y0: torch.Tensor) -> torch.Tensor:
        """Solves ``dy/dt = func(t, y)`` from ``y0: [B, N]``; returns ``ys: [T, B, N]``."""
        raise NotImplementedError

    def native_stats(self) -> dict[str, Any]:
        """The library's own statistics of the latest :meth:`solve`: any of ``nfe``, ``n_steps``, ``n_accepted``,
        ``n_rejected`` (python numbers, or ``[B]`` tensors for per-sample solvers)."""
        return {}


class FastnodeProvider(Provider):
    """fastnode's ``odeint``, shared step (torchdiffeq semantics) or per-sample step control."""

    name = "fastnode"

    def __init__(self, problem: Problem, tol: Tolerance, device: torch.device, per_sample: bool = False,
                 backend: str = "auto"):
        super().__init__(problem, tol, device)
        try:
            from fastnode import last_stats, odeint
        except ImportError as exc:
            raise ProviderUnavailable(f"fastnode is not importable yet ({exc})") from exc
        self._odeint, self._last_stats = odeint, last_stats
        self.per_sample = per_sample
        self.options = {"per_sample": True} if per_sample else {}
        if backend != "auto":
            # "torch": the pure-PyTorch reference backend, to measure what the compiled/kernel backends add. A backend
            # that cannot run here (triton without CUDA) skips the benchmark rather than failing it.
            from fastnode.backends import get_backend

            try:
                get_backend(backend, torch.device(device))
            except ValueError as exc:
                raise ProviderUnavailable(str(exc)) from exc
            self.options["backend"] = backend
        self.name = "fastnode" + ("-per-sample" if per_sample else "") + ("" if backend == "auto" else f"-{backend}")

    def solve(self, func: nn.Module, y0: torch.Tensor) -> torch.Tensor:
        return self._odeint(
            func, y0, self.t_eval, rtol=self.tol.rtol, atol=self.tol.atol, method=METHOD, options=dict(self.options)
        )

    def native_stats(self) -> dict[str, Any]:
        s = self._last_stats()
        return {k: getattr(s, k, None) for k in ("nfe", "n_steps", "n_accepted", "n_rejected", "backend")}


class FastnodeAdjointProvider(FastnodeProvider):
    """fastnode's ``odeint_adjoint`` (gradients from one backward adjoint solve, memory constant in the steps)."""

    def __init__(self, problem: Problem, tol: Tolerance, device: torch.device, per_sample: bool = False,
                 backend: str = "auto"):
        super().__init__(problem, tol, device, per_sample=per_sample, backend=backend)
        from fastnode import odeint_adjoint

        self._odeint = odeint_adjoint
        self.name = ("fastnode-adjoint" + ("-per-sample" if per_sample else "")
                     + ("" if backend == "auto" else f"-{backend}"))


class TorchdiffeqProvider(Provider):
    """torchdiffeq's ``odeint`` (backpropagation through the solver, not the adjoint)."""

    name = "torchdiffeq"

    def __init__(self, problem: Problem, tol: Tolerance, device: torch.device):
        super().__init__(problem, tol, device)
        try:
            import torchdiffeq
        except ImportError as exc:
            raise ProviderUnavailable(f"torchdiffeq is not installed ({exc})") from exc
        self._odeint = torchdiffeq.odeint

    def solve(self, func: nn.Module, y0: torch.Tensor) -> torch.Tensor:
        return self._odeint(func, y0, self.t_eval, rtol=self.tol.rtol, atol=self.tol.atol, method=METHOD)


class TorchdiffeqAdjointProvider(TorchdiffeqProvider):
    """torchdiffeq's ``odeint_adjoint`` (default adjoint options)."""

    name = "torchdiffeq-adjoint"

    def __init__(self, problem: Problem, tol: Tolerance, device: torch.device):
        super().__init__(problem, tol, device)
        import torchdiffeq

        self._odeint = torchdiffeq.odeint_adjoint


class TorchodeProvider(Provider):
    """torchode: per-sample ``t``/``dt``, dopri5, integral controller (torchdiffeq's controller, same constants).

    The stepper, controller and solver objects are built once per func rather than per call (what a training loop
    does), so the timing covers the solve, not module construction.
    """

    name = "torchode"
    per_sample = True

    def __init__(self, problem: Problem, tol: Tolerance, device: torch.device):
        super().__init__(problem, tol, device)
        try:
            import torchode
        except ImportError as exc:
            raise ProviderUnavailable(f"torchode is not installed ({exc})") from exc
        self._to = torchode
        self._solvers: dict[int, tuple[Any, Any]] = {}
        self._last = None
        # torchode wants per-sample evaluation times [B, T] in the same dtype as its start/end times.
        self._t_eval_b = self.t_eval.to(problem.dtype).expand(problem.batch, -1).contiguous()

    def _solver_for(self, func: nn.Module) -> tuple[Any, Any]:
        key = id(func)
        if key not in self._solvers:
            to = self._to
            term = to.ODETerm(func)
            # safety 0.9, factor range [0.2, 10]: the same I-controller as torchdiffeq, so NFE differences come from
            # per-sample versus batch-global error norms, not from different controller constants.
            controller = to.IntegralController(atol=self.tol.atol, rtol=self.tol.rtol, term=term)
            solver = to.AutoDiffAdjoint(to.Dopri5(term=term), controller).to(self.device)
            self._solvers[key] = (term, solver)
        return self._solvers[key]

    def solve(self, func: nn.Module, y0: torch.Tensor) -> torch.Tensor:
        term, solver = self._solver_for(func)
        sol = solver.solve(self._to.InitialValueProblem(y0=y0, t_eval=self._t_eval_b), term=term)
        self._last = sol
        return sol.ys.transpose(0, 1)

    def native_stats(self) -> dict[str, Any]:
        if self._last is None:
            return {}
        st = self._last.stats
        n_steps, n_acc = st.get("n_steps"), st.get("n_accepted")
        failed = int((self._last.status != 0).sum())
        if failed:
            raise RuntimeError(f"torchode: {failed} samples did not finish (status {self._last.status.unique()})")
        return {
            # torchode counts every batch-wide call once per sample, so all entries are equal: the batch NFE.
            "nfe": int(st["n_f_evals"].max()) if "n_f_evals" in st else None,
            "n_steps": n_steps,
            "n_accepted": n_acc,
            "n_rejected": None if n_steps is None or n_acc is None else n_steps - n_acc,
        }


PROVIDERS: dict[str, Callable[..., Provider]] = {
    "fastnode": lambda p, tol, dev: FastnodeProvider(p, tol, dev, per_sample=False),
    "fastnode-per-sample": lambda p, tol, dev: FastnodeProvider(p, tol, dev, per_sample=True),
    "fastnode-torch": lambda p, tol, dev: FastnodeProvider(p, tol, dev, per_sample=False, backend="torch"),
    "fastnode-adjoint": lambda p, tol, dev: FastnodeAdjointProvider(p, tol, dev, per_sample=False),
    "fastnode-adjoint-torch": lambda p, tol, dev: FastnodeAdjointProvider(p, tol, dev, backend="torch"),
    "fastnode-triton": lambda p, tol, dev: FastnodeProvider(p, tol, dev, per_sample=False, backend="triton"),
    "fastnode-per-sample-torch": lambda p, tol, dev: FastnodeProvider(p, tol, dev, per_sample=True, backend="torch"),
    "fastnode-per-sample-triton": lambda p, tol, dev: FastnodeProvider(p, tol, dev, per_sample=True,
                                                                       backend="triton"),
    "torchdiffeq": TorchdiffeqProvider,
    "torchdiffeq-adjoint": TorchdiffeqAdjointProvider,
    "torchode": TorchodeProvider,
}


def make_provider(name: str, problem: Problem, tol: Tolerance, device: torch.device | str = "cpu") -> Provider:
    """Builds provider ``name``; raises :class:`ProviderUnavailable` when its library is missing.

    Args:
        name: One of :data:`PROVIDERS`' keys.
        problem: Problem to solve.
        tol: Tolerances.
        device: Device of the state.
    """
    if name not in PROVIDERS:
        raise ValueError(f"name: unknown provider {name!r}; known: {sorted(PROVIDERS)}")
    return PROVIDERS[name](problem, tol, torch.device(device))


def solve_stats(provider: Provider, func: nn.Module, y0: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Untimed run that collects NFE and step statistics.

    ``nfe`` is the provider's own count when it has one, otherwise the wrapper's; ``nfe_counted`` is always the
    wrapper's, so a disagreement between a library's statistics and reality shows up in the results.

    Args:
        provider: Provider to run.
        func: Vector field.
        y0: ``[B, N]`` initial state.

    Returns:
        ``(ys, stats)`` with ``ys: [T, B, N]`` and ``stats`` JSON-ready.
    """
    counted = CountingFunc(func)
    ys = provider.solve(counted, y0)
    _sync(y0.device)
    native = provider.native_stats()
    acc, rej = native.get("n_accepted"), native.get("n_rejected")
    steps_source = "native"
    if acc is None and not provider.per_sample:
        inferred = infer_shared_steps(counted.times)
        if inferred is not None:
            acc, rej = inferred
            steps_source = "inferred from call times"
    n_steps = native.get("n_steps")
    if n_steps is None and acc is not None and rej is not None:
        n_steps = acc + rej
    nfe = native.get("nfe")
    stats: dict[str, Any] = {"nfe": int(nfe) if nfe is not None else counted.calls, "nfe_counted": counted.calls}
    for key, value in (("n_steps", n_steps), ("n_accepted", acc), ("n_rejected", rej)):
        mean, mx = _summary(value)
        stats[f"{key}_mean"], stats[f"{key}_max"] = mean, mx
    stats["steps_source"] = steps_source if acc is not None else None
    if native.get("backend"):
        stats["backend"] = native["backend"]  # the StepOps backend fastnode ran the solve on
    return ys, stats


def time_func(func: nn.Module, t: torch.Tensor, y: torch.Tensor, backward: bool, budget_s: float = 1.0,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Median time (s) of one call of ``func`` (plus its backward when ``backward``) on ``clock``.

    Times blocks of calls sized to about a millisecond or more each (single calls of a small MLP are near the timer's
    resolution) and returns the median per-call time over the blocks.

    Args:
        func: Vector field.
        t: Time argument as the solver passes it (0-d or ``[B]``).
        y: ``[B, N]`` state.
        backward: Also backpropagate a ones cotangent to ``y`` and the parameters (the ``full`` mode's unit cost).
        budget_s: Rough total time to spend (wall).
        clock: ``time.perf_counter`` (wall) or ``time.thread_time`` (this thread's CPU time; with one torch thread
            it is the whole CPU cost, and other processes on the machine do not inflate it).
    """
    params = [p for p in func.parameters() if p.requires_grad]

    def call() -> None:
        if backward:
            yy = y.detach().requires_grad_(True)
            out = func(t, yy)
            torch.autograd.grad(out, [yy, *params], grad_outputs=torch.ones_like(out))
        else:
            with torch.no_grad():
                func(t, y)

    for _ in range(3):
        call()
    _sync(y.device)
    start = time.perf_counter()
    call()
    _sync(y.device)
    once = max(time.perf_counter() - start, 1e-7)
    per_block = max(1, int(1e-3 / once))
    n_blocks = max(5, min(50, int(budget_s / (once * per_block))))
    samples = []
    for _ in range(n_blocks):
        start = clock()
        for _ in range(per_block):
            call()
        _sync(y.device)
        samples.append((clock() - start) / per_block)
    return statistics.median(samples)


# Rounds whose spread (interquartile range over median) exceeds this are flagged: their median is not to be trusted.
SPREAD_LIMIT = 0.20


class Rounds:
    """One provider's timings over interleaved rounds: thread CPU time and wall time (s), one entry per round.

    Args:
        cpu: ``time.thread_time`` per round.
        wall: ``time.perf_counter`` per round.
    """

    def __init__(self, cpu: list[float] | None = None, wall: list[float] | None = None):
        self.cpu = list(cpu or [])
        self.wall = list(wall or [])

    @property
    def cpu_median(self) -> float:
        """Median thread CPU time (s)."""
        return statistics.median(self.cpu)

    @property
    def wall_median(self) -> float:
        """Median wall time (s)."""
        return statistics.median(self.wall)

    @property
    def spread(self) -> float:
        """Interquartile range of the CPU-time rounds over their median: how much the rounds disagree."""
        return relative_spread(self.cpu)


def relative_spread(samples: list[float]) -> float:
    """Interquartile range over median of ``samples`` (0 for fewer than two samples).

    The interquartile range rather than max - min: one round hit by a page fault or a collection should not flag a
    row whose other rounds agree.

    Example:
        >>> relative_spread([1.0, 1.0, 1.0, 1.0])
        0.0
    """
    if len(samples) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    med = statistics.median(samples)
    return (q3 - q1) / med if med > 0 else 0.0


def interleaved_rounds(runs: dict[str, Callable[[], None]], target_s: float, min_rounds: int = 5,
                       max_rounds: int = 50) -> dict[str, Rounds]:
    """Times several callables in interleaved rounds: each round runs every callable once, in a rotating order.

    Interleaving spreads a slow phase of a shared machine (another process's burst, frequency changes) over all
    providers instead of charging it to whichever ran then; thread CPU time (``time.thread_time``) leaves out the
    time this thread waited for a core. Each callable runs once untimed first (warm-up; it also sizes the rounds).

    Args:
        runs: ``name -> run()``; each call does the complete timed work (and any device sync).
        target_s: Approximate seconds each callable should spend in timed rounds (the slowest sets the count).
        min_rounds, max_rounds: Bounds on the number of rounds.

    Returns:
        ``name -> Rounds`` with one entry per round.
    """
    names = list(runs)
    slowest = 0.0
    for name in names:
        start = time.perf_counter()
        runs[name]()
        slowest = max(slowest, time.perf_counter() - start)
    n = max(min_rounds, min(max_rounds, math.ceil(target_s / max(slowest, 1e-6))))
    out = {name: Rounds() for name in names}
    for r in range(n):
        for name in names[r % len(names):] + names[: r % len(names)]:
            c0, w0 = time.thread_time(), time.perf_counter()
            runs[name]()
            w1, c1 = time.perf_counter(), time.thread_time()
            out[name].cpu.append(c1 - c0)
            out[name].wall.append(w1 - w0)
    return out


class ReplayClock:
    """A clock for pytest-benchmark that replays durations measured elsewhere (by :func:`interleaved_rounds`).

    pytest-benchmark times one benchmark at a time; interleaved rounds time a whole group together. To keep its
    JSON, terminal table and statistics, the benchmark is given this clock as its timer and :meth:`advance` as the
    target: each round the clock moves by the next recorded duration, so pytest-benchmark's statistics are those of
    the recorded rounds.

    Example:
        >>> clock = ReplayClock()
        >>> clock.load([0.5, 0.25])
        >>> t0 = clock(); clock.advance(); clock() - t0
        0.5
    """

    __name__ = "thread_time_interleaved"

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[float] = []

    def load(self, durations: list[float]) -> None:
        """Queues the durations the next rounds will take."""
        self._queue = list(durations)

    def __call__(self) -> float:
        return self.now

    def advance(self) -> None:
        """The benchmark's target: one round, as long as the next queued duration."""
        if not self._queue:
            raise RuntimeError("ReplayClock: more rounds than recorded durations")
        self.now += self._queue.pop(0)


class ForeignCPU:
    """Measures how much CPU other processes used while a block of code ran (Linux; ``None`` elsewhere).

    CPU timings on a shared machine are only meaningful when nothing else ran: torch's intra-op threads spin-wait,
    so one competing process can slow a small solve several-fold. The load average reacts too slowly to catch a
    short burst; the difference between the machine's busy time (``/proc/stat``) and this process's own CPU time over
    the same window does.

    Example:
        >>> with ForeignCPU() as fc:
        ...     run_benchmark()
        >>> fc.cores  # average number of cores used by other processes meanwhile
    """

    def __init__(self) -> None:
        self.cores: float | None = None
        self._start: tuple[float, float, float] | None = None

    @staticmethod
    def _snapshot() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (sum(vals) - vals[3] - vals[4]) / tick  # everything but idle and iowait
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    def __enter__(self) -> Self:
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._snapshot()
        if self._start is None or end is None:
            return
        wall = end[2] - self._start[2]
        if wall > 0:
            foreign = (end[0] - self._start[0]) - (end[1] - self._start[1])
            self.cores = max(0.0, foreign / wall)
