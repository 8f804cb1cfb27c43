"""Standard benchmark problems with cached high-accuracy reference solutions.

Each problem bundles a vector field ``func`` (an ``nn.Module`` whose ``forward(t, y)`` accepts a 0-d ``t``, as
torchdiffeq passes it, or a ``t`` of shape ``[B]``, as per-sample solvers pass it), a batched initial state
``y0: [B, N]``, output times ``t_eval: [T]``, the tolerances to benchmark at, and a reference solution computed
sample by sample with scipy's DOP853 at ``rtol = atol = 1e-12``.

The reference is the exact solution of the problem *as stored*: float32 weights and initial states are widened to
float64 without rounding, so the only error left in a provider's answer is its own (truncation plus rounding in the
benchmark dtype).

Example:
    >>> from bench.problems import get_problem
    >>> p = get_problem("mlp-small")
    >>> p.y0.shape, p.t_eval.shape
    (torch.Size([128, 32]), torch.Size([2]))
    >>> ref = p.reference()  # [T, B, N] float64 numpy array, cached under bench/.out/
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

# The reference cache lives next to the benchmarks and is git-ignored (see .gitignore: bench/.out/).
CACHE_DIR = Path(os.environ.get("FASTNODE_BENCH_CACHE", Path(__file__).resolve().parent / ".out"))

REF_METHOD = "DOP853"
REF_RTOL = 1e-12
REF_ATOL = 1e-12


@dataclass(frozen=True)
class Tolerance:
    """A named (rtol, atol) pair.

    Args:
        name: Short label used in benchmark ids, e.g. ``"tol1e-5"``.
        rtol: Relative tolerance passed to every provider.
        atol: Absolute tolerance passed to every provider.
    """

    name: str
    rtol: float
    atol: float


DEFAULT_TOL = Tolerance("tol1e-5", rtol=1e-5, atol=1e-7)
# Only meaningful in float64: float32 rounding (eps ~ 1.2e-7) would dominate the truncation error.
TIGHT_TOL = Tolerance("tol1e-8", rtol=1e-8, atol=1e-10)


def _time_column(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Returns ``t`` as a ``[B, 1]`` column in ``y``'s dtype.

    Args:
        t: 0-d (shared step) or ``[B]`` (per-sample step).
        y: ``[B, N]`` state.
    """
    t = t.to(dtype=y.dtype)
    if t.ndim == 0:
        return t.expand(y.shape[0]).unsqueeze(1)
    return t.reshape(y.shape[0], 1)


class MLPODE(nn.Module):
    """Time-dependent MLP vector field ``dy/dt = W2 tanh(W1 [y, t] + b1) + b2``.

    ``t`` enters as an extra input column (the usual "concat t" neural-ODE layer), so the per-sample ``t: [B]``
    path is exercised and not just accepted.

    Args:
        dim: State size N.
        hidden: Hidden width H.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Evaluates the field.

        Args:
            t: 0-d or ``[B]``.
            y: ``[B, N]``.

        Returns:
            ``[B, N]`` derivative.
        """
        return self.net(torch.cat([y, _time_column(t, y)], dim=1))

    def numpy_rhs(self, index: int) -> Callable[[float, np.ndarray], np.ndarray]:
        """Float64 NumPy right-hand side for one sample (the same for every sample: shared weights).

        Args:
            index: Sample index (unused: all samples share the field).
        """
        del index
        w1 = self.net[0].weight.detach().double().numpy()
        b1 = self.net[0].bias.detach().double().numpy()
        w2 = self.net[2].weight.detach().double().numpy()
        b2 = self.net[2].bias.detach().double().numpy()
        # Split W1 into its state and time columns so the hot loop is two mat-vecs and no concatenation.
        w1y, w1t = np.ascontiguousarray(w1[:, :-1]), w1[:, -1].copy()

        def rhs(t: float, y: np.ndarray) -> np.ndarray:
            return w2 @ np.tanh(w1y @ y + w1t * t + b1) + b2

        return rhs


class VanDerPol(nn.Module):
    """Batch of van der Pol oscillators ``x'' = mu (1 - x^2) x' - x``, one ``mu`` per sample.

    State ``y = [x, x']``. Large ``mu`` makes a sample stiff-ish and forces small explicit steps: with a step size
    shared across the batch every sample pays for the hardest one, which is what per-sample control avoids.

    Args:
        mu: ``[B]`` damping parameters.
    """

    def __init__(self, mu: torch.Tensor):
        super().__init__()
        self.register_buffer("mu", mu)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Evaluates the field (autonomous: ``t`` is accepted in either shape and ignored).

        Args:
            t: 0-d or ``[B]``.
            y: ``[B, 2]``.

        Returns:
            ``[B, 2]`` derivative.
        """
        del t
        x, v = y[:, 0], y[:, 1]
        return torch.stack([v, self.mu * (1.0 - x * x) * v - x], dim=1)

    def numpy_rhs(self, index: int) -> Callable[[float, np.ndarray], np.ndarray]:
        """Float64 NumPy right-hand side for sample ``index``.

        Args:
            index: Sample index selecting ``mu``.
        """
        mu = float(self.mu[index])

        def rhs(t: float, y: np.ndarray) -> np.ndarray:
            return np.array([y[1], mu * (1.0 - y[0] * y[0]) * y[1] - y[0]])

        return rhs


@dataclass
class Problem:
    """One benchmark problem.

    Attributes:
        name: Id used in benchmark names, e.g. ``"mlp-small"``.
        description: One line for humans.
        func: Vector field module.
        y0: ``[B, N]`` initial state.
        t_eval: ``[T]`` output times, increasing; ``t_eval[0]`` is the initial time.
        tolerances: Tolerances to benchmark at.
        grad_modes: Whether the ``full`` (forward + backward) mode is benchmarked for this problem.
    """

    name: str
    description: str
    func: nn.Module
    y0: torch.Tensor
    t_eval: torch.Tensor
    tolerances: tuple[Tolerance, ...]
    grad_modes: bool = False
    _ref: np.ndarray | None = field(default=None, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        """State dtype."""
        return self.y0.dtype

    @property
    def batch(self) -> int:
        """Batch size B."""
        return self.y0.shape[0]

    def fingerprint(self) -> str:
        """Hash of everything the reference depends on (weights, y0, t_eval, reference settings)."""
        h = hashlib.sha256()
        h.update(f"{self.name}|{type(self.func).__name__}|{REF_METHOD}|{REF_RTOL}|{REF_ATOL}".encode())
        for tensor in [self.y0, self.t_eval, *self.func.state_dict().values()]:
            buf = io.BytesIO()
            np.save(buf, tensor.detach().cpu().double().numpy())
            h.update(buf.getvalue())
        return h.hexdigest()[:16]

    def reference(self) -> np.ndarray:
        """Reference solution at ``t_eval``, ``[T, B, N]`` float64.

        Computed once per problem (per sample, scipy DOP853, rtol = atol = 1e-12), kept in memory and on disk
        under ``bench/.out/`` keyed by :meth:`fingerprint`, so a changed problem never reuses a stale file.
        """
        if self._ref is not None:
            return self._ref
        path = CACHE_DIR / f"ref_{self.name}_{self.fingerprint()}.npy"
        if path.exists():
            self._ref = np.load(path)
            return self._ref
        from scipy.integrate import solve_ivp

        t = self.t_eval.detach().double().numpy()
        y0 = self.y0.detach().double().numpy()
        out = np.empty((t.shape[0], *y0.shape), dtype=np.float64)
        for i in range(y0.shape[0]):
            sol = solve_ivp(
                self.func.numpy_rhs(i), (t[0], t[-1]), y0[i], method=REF_METHOD, t_eval=t, rtol=REF_RTOL, atol=REF_ATOL
            )
            if not sol.success:
                raise RuntimeError(f"reference solve failed for {self.name} sample {i}: {sol.message}")
            out[:, i, :] = sol.y.T
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        # Write then rename so an interrupted run never leaves a truncated cache file behind.
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(path)
        self._ref = out
        return out

    def max_rel_error(self, ys: torch.Tensor) -> float:
        """Maximum relative error of a solution against the reference.

        For each sample and output time the error is ``max_n |y - y_ref| / max_n |y_ref|`` (inf-norm of the error
        relative to the inf-norm of the reference state); the result is the maximum over samples and times. Using
        the state's norm instead of each component avoids blowing up on components that cross zero.

        Args:
            ys: ``[T, B, N]`` solution in torchdiffeq's layout.
        """
        ref = self.reference()
        y = ys.detach().cpu().double().numpy()
        if y.shape != ref.shape:
            raise ValueError(f"ys: expected shape {ref.shape}, got {tuple(y.shape)}")
        err = np.abs(y - ref).max(axis=-1)
        scale = np.maximum(np.abs(ref).max(axis=-1), np.finfo(np.float64).tiny)
        return float((err / scale).max())


def _mlp_problem(name: str, batch: int, dim: int, hidden: int, seed: int, description: str) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    # nn.Linear draws from the global generator: seed it so the weights are the same in every session.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        func = MLPODE(dim, hidden)
    func.requires_grad_(True)
    y0 = torch.randn(batch, dim, generator=gen)
    t_eval = torch.tensor([0.0, 1.0])
    return Problem(name, description, func, y0, t_eval, (DEFAULT_TOL,), grad_modes=True)


def mlp_small() -> Problem:
    """MLP neural ODE, B=128, N=32, H=64, float32, t in [0, 1]."""
    return _mlp_problem("mlp-small", 128, 32, 64, seed=0, description="MLP ODE B=128 N=32 H=64 fp32 t=[0,1]")


def mlp_medium() -> Problem:
    """MLP neural ODE, B=512, N=256, H=512, float32, t in [0, 1]."""
    return _mlp_problem("mlp-medium", 512, 256, 512, seed=1, description="MLP ODE B=512 N=256 H=512 fp32 t=[0,1]")


def van_der_pol(batch: int = 64, t_end: float = 10.0) -> Problem:
    """Van der Pol batch with log-spaced mu in [0.5, 10], float64, 11 output times on [0, t_end].

    Float64 so the tight tolerance measures the solver and not float32 rounding.

    Args:
        batch: Number of oscillators B.
        t_end: Final time.
    """
    gen = torch.Generator().manual_seed(2)
    mu = torch.logspace(np.log10(0.5), 1.0, batch, dtype=torch.float64)
    x0 = 1.0 + 1.5 * torch.rand(batch, generator=gen, dtype=torch.float64)
    y0 = torch.stack([x0, torch.zeros_like(x0)], dim=1)
    t_eval = torch.linspace(0.0, t_end, 11, dtype=torch.float64)
    return Problem(
        "vdp",
        f"van der Pol B={batch} mu=0.5..10 (log) fp64 t=[0,{t_end:g}]",
        VanDerPol(mu),
        y0,
        t_eval,
        (DEFAULT_TOL, TIGHT_TOL),
    )


BUILDERS: dict[str, Callable[[], Problem]] = {
    "mlp-small": mlp_small,
    "mlp-medium": mlp_medium,
    "vdp": van_der_pol,
}


@functools.cache
def get_problem(name: str) -> Problem:
    """Builds (once per session) the problem called ``name``; see :data:`BUILDERS`.

    Args:
        name: One of ``BUILDERS``' keys.
    """
    if name not in BUILDERS:
        raise ValueError(f"name: unknown problem {name!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[name]()
