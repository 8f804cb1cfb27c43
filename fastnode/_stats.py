"""Solver statistics and per-sample status, reachable after every call without changing the call form."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

# Per-sample status codes.
SUCCESS = 0
MAX_STEPS = 1
STEP_UNDERFLOW = 2
NON_FINITE = 3
TIME_OVERFLOW = 4
STIFF = 5
STATUS_NAMES = {SUCCESS: "success", MAX_STEPS: "max_num_steps exceeded", STEP_UNDERFLOW: "step size underflow",
                NON_FINITE: "non-finite values (NaN/inf) from func", TIME_OVERFLOW: "time overflowed to infinity",
                STIFF: "problem appears stiff"}

IntOrTensor = int | torch.Tensor


@dataclass
class SolveStats:
    """Statistics of one ``odeint`` call.

    In shared mode the counters are Python ints. In per-sample mode ``n_accepted``, ``n_rejected`` and
    ``n_steps`` are ``[B]`` int64 tensors (one entry per sample), ``status`` is ``[B]`` (see ``STATUS_NAMES``)
    and ``t_reached`` ``[B]`` the time each sample reached. ``nfe`` counts calls of ``func`` (in per-sample
    mode each call evaluates the whole batch). ``n_host_syncs`` counts the device-to-host transfers the
    solver made (one per step attempt in the adaptive loop, plus a few at set-up and at the end).

    Example:
        >>> import torch, fastnode
        >>> y = fastnode.odeint(lambda t, y: -y, torch.ones(3), torch.linspace(0, 1, 5))
        >>> st = fastnode.last_stats()
        >>> st.nfe > 0 and st.n_accepted > 0
        True
    """

    method: str = ""
    per_sample: bool = False
    nfe: int = 0
    n_accepted: IntOrTensor = 0
    n_rejected: IntOrTensor = 0
    n_steps: IntOrTensor = 0
    n_iterations: int = 0
    n_host_syncs: int = 0
    status: torch.Tensor | None = None
    t_reached: torch.Tensor | None = None
    messages: list = field(default_factory=list)
    backend: str = ""  # the StepOps backend that ran the solve ("torch", "ext", "triton", "ext+triton")
    h_final: torch.Tensor | None = None  # [G] the step size the controller proposed last (integration time)
    # Compiled steps (options['compile'], fastnode._compiled): whether steps ran compiled, the seconds spent
    # compiling in this call (0.0 when the cached program was reused), why a requested compiled solve ran eager
    # (None: it did not), and the steps the compiled unit ran after every group had finished (a round of
    # steps_per_sync steps overshoots the end; their func evaluations are not counted in nfe).
    compiled: bool = False
    compile_seconds: float = 0.0
    compile_fallback: str | None = None
    n_idle_steps: int = 0
    # Backward-pass counters, filled by odeint_adjoint's backward (added up over repeated backward calls).
    nfe_backward: int = 0
    n_accepted_backward: IntOrTensor = 0
    n_rejected_backward: IntOrTensor = 0
    backward: SolveStats | None = None  # the latest backward solve's own statistics

    @property
    def success(self) -> bool:
        return self.status is None or bool((self.status == SUCCESS).all())


_local = threading.local()


def _set_last(stats: SolveStats) -> None:
    _local.stats = stats


def last_stats() -> SolveStats | None:
    """Statistics of the most recent ``odeint`` call in this thread (``None`` before the first call).

    Example:
        >>> import torch, fastnode
        >>> _ = fastnode.odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]))
        >>> fastnode.last_stats().method
        'dopri5'
    """
    return getattr(_local, "stats", None)


class SolverError(ValueError):
    """A solve that could not finish: names the failing samples, the time they reached and why.

    Attributes:
        status: [G] status codes (``fastnode.STATUS_NAMES``).
        samples: indices of the failing samples (``[0]`` in shared mode).
        times: the time each failing sample reached.
    """

    def __init__(self, message: str, status=None, samples=(), times=()):
        super().__init__(message)
        self.status = status
        self.samples = list(samples)
        self.times = list(times)
