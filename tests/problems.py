"""Test problems with closed-form solutions (torchdiffeq's ``tests/problems.py`` idea).

Every problem has a 3-component state so tests can split it into a tuple of tensors of different shapes
(``split_state``). ``func(t, y)`` accepts ``t`` as a 0-d tensor (shared mode) or ``[B]`` (per-sample mode,
``y: [B, 3]``) and works in float32 and float64. ``exact(t)`` maps output times ``[T]`` to ``[T, 3]``;
``y_at(t0)`` is the exact state at ``t0`` (the initial condition of a solve starting there).

``rate`` bounds how fast a problem varies: its rates (eigenvalues, ``|k|``, frequencies) are at most ``rate``
in modulus on ``|t| <= 1``, so order-``n`` derivatives and elementary differentials scale like
``rate^n * max|y|`` (the fixed-grid error bounds in the tests use it). ``constant`` has ``rate = 0``: every
consistent Runge-Kutta method integrates it exactly, leaving only rounding.

Example:
    >>> import torch
    >>> p = make_problem("exponential", torch.float64)
    >>> t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    >>> bool(torch.allclose(p.exact(t)[0], p.y0))
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

PROBLEM_NAMES = ("constant", "linear", "sine", "exponential", "rational")


@dataclass
class Problem:
    """One ODE with its exact solution.

    Attributes:
        name: problem name.
        func: ``func(t, y) -> dy/dt``; ``t`` 0-d or [B], ``y`` [3] or [B, 3].
        exact: ``exact(t: [T]) -> [T, 3]``, the solution through ``y0`` at ``t = 0``.
        y0: [3] the state at ``t = 0``.
        rate: bound on the growth rates (see module docstring).
        autonomous: whether ``func`` ignores ``t``.
    """

    name: str
    func: Callable
    exact: Callable
    y0: torch.Tensor
    rate: float
    autonomous: bool

    def y_at(self, t0) -> torch.Tensor:
        """Exact state at the single time ``t0`` ([3])."""
        t0 = torch.as_tensor(t0, dtype=self.y0.dtype).reshape(1)
        return self.exact(t0)[0]


def _bcast_t(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """0-d t -> 0-d; per-sample t [B] -> [B, 1] so it broadcasts against y [B, 3]."""
    return t if t.dim() == 0 else t.reshape(t.shape + (1,) * (y.dim() - t.dim()))


def linear_matrix(dtype: torch.dtype) -> torch.Tensor:
    """A 3x3 matrix with a decaying rotation (eigenvalues -0.1 +- 1.5i) coupled to a decaying mode (-0.5).

    Non-normal (the upper-right coupling) so the solution is not just three independent scalar ODEs.
    """
    return torch.tensor([[-0.1, -1.5, 0.3],
                         [1.5, -0.1, 0.0],
                         [0.0, 0.0, -0.5]], dtype=dtype)


def make_problem(name: str, dtype: torch.dtype = torch.float64) -> Problem:
    """Build the problem ``name`` (one of ``PROBLEM_NAMES``) in ``dtype``."""
    if name == "constant":
        # dy/dt = c  ->  y = y0 + c t. Every consistent method integrates it exactly (rounding only).
        c = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
        y0 = torch.tensor([1.0, 2.0, -1.0], dtype=dtype)

        def func(t, y):
            return c.expand_as(y).clone()

        def exact(t):
            return y0 + t.to(dtype).unsqueeze(-1) * c

        # rate 0: y'' = 0 and f has zero Jacobian, so every truncation error term vanishes.
        return Problem(name, func, exact, y0, rate=0.0, autonomous=True)

    if name == "linear":
        # dy/dt = A y  ->  y = expm(A t) y0.
        A = linear_matrix(dtype)
        y0 = torch.tensor([1.0, 0.0, 1.0], dtype=dtype)

        def func(t, y):
            return y @ A.T

        def exact(t):
            # matrix_exp in float64 even for float32 problems, so the reference is not the error source.
            E = torch.linalg.matrix_exp(A.double() * t.double().reshape(-1, 1, 1))
            return (E @ y0.double()).to(dtype)

        # |eigenvalues| <= 1.51; the non-normal coupling adds at most 0.3 to the norm.
        return Problem(name, func, exact, y0, rate=2.0, autonomous=True)

    if name == "sine":
        # dy/dt = w cos(t)  ->  y = y0 + w sin(t). Non-autonomous: tests that stage times c_i h are right.
        w = torch.tensor([1.0, -0.5, 2.0], dtype=dtype)
        y0 = torch.tensor([0.5, 1.0, -1.0], dtype=dtype)

        def func(t, y):
            return torch.cos(_bcast_t(t, y)) * w

        def exact(t):
            return y0 + torch.sin(t.to(dtype)).unsqueeze(-1) * w

        return Problem(name, func, exact, y0, rate=1.0, autonomous=False)

    if name == "exponential":
        # dy/dt = k y  ->  y = y0 exp(k t), one growing and two decaying components.
        k = torch.tensor([-1.0, 0.5, -2.0], dtype=dtype)
        y0 = torch.tensor([1.0, 0.5, 2.0], dtype=dtype)

        def func(t, y):
            return k * y

        def exact(t):
            return y0 * torch.exp(t.to(dtype).unsqueeze(-1) * k)

        return Problem(name, func, exact, y0, rate=2.0, autonomous=True)

    if name == "rational":
        # dy/dt = -2 t y^2  ->  y = c / (1 + c t^2) with y(0) = c > 0: nonlinear and non-autonomous.
        c = torch.tensor([1.0, 0.5, 2.0], dtype=dtype)

        def func(t, y):
            return -2.0 * _bcast_t(t, y) * y * y

        def exact(t):
            tt = t.to(dtype).unsqueeze(-1)
            return c / (1.0 + c * tt * tt)

        # The Jacobian -4 t y = -4 t c / (1 + c t^2) peaks at 2 sqrt(c) (2.8 for c = 2, at t = 0.7) and the
        # singularities at t = +-i/sqrt(c) (distance >= 1/sqrt(2)) make the Taylor coefficients grow like
        # sqrt(2)^n: rate = 2 is representative rather than a strict bound (the tests' margins cover it).
        return Problem(name, func, exact, c.clone(), rate=2.0, autonomous=False)

    raise ValueError(f"unknown problem {name!r}; available: {PROBLEM_NAMES}")


def split_state(y: torch.Tensor):
    """[..., 3] -> tuple ([..., 1], [..., 2, 1]): two tensors of different shapes and ranks."""
    return y[..., :1], y[..., 1:].unsqueeze(-1)


def merge_state(parts) -> torch.Tensor:
    """Inverse of ``split_state``."""
    a, b = parts
    return torch.cat([a, b.squeeze(-1)], dim=-1)


def tuple_func(func: Callable) -> Callable:
    """Wrap ``func`` on [..., 3] states into the same ODE on ``split_state`` tuples."""

    def f(t, parts):
        return split_state(func(t, merge_state(parts)))

    return f


def lotka_volterra(alpha=1.5, beta=1.0, delta=1.0, gamma=3.0):
    """Predator-prey ``x' = a x - b x y``, ``y' = d x y - g y`` (no closed form; scipy is the reference)."""

    def f_np(t, z):
        x, y = z
        return [alpha * x - beta * x * y, delta * x * y - gamma * y]

    def f_torch(t, z):
        x, y = z[..., 0], z[..., 1]
        return torch.stack([alpha * x - beta * x * y, delta * x * y - gamma * y], dim=-1)

    return f_np, f_torch


def van_der_pol(mu):
    """``x'' - mu (1 - x^2) x' + x = 0`` as a first-order system. ``mu``: float, or [B] tensor (per sample)."""

    def f_np(t, z):
        x, v = z
        return [v, mu * (1.0 - x * x) * v - x]

    def f_torch(t, z):
        x, v = z[..., 0], z[..., 1]
        return torch.stack([v, mu * (1.0 - x * x) * v - x], dim=-1)

    return f_np, f_torch


__all__ = ["PROBLEM_NAMES", "Problem", "linear_matrix", "lotka_volterra", "make_problem", "merge_state", "split_state",
           "tuple_func", "van_der_pol"]
