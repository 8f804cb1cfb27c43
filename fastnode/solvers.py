"""The method registry: one name -> one solver class, each a tableau plus a couple of class attributes."""

from __future__ import annotations

from ._tableau import ButcherTableau
from .tableaus import adaptive_heun, bosh3, dopri5, dopri8, fehlberg2, fixed, tsit5


class Solver:
    """A Runge-Kutta method: ``tableau`` is its data; ``adaptive`` says whether it controls its step."""

    tableau: ButcherTableau
    adaptive: bool


class AdaptiveRK(Solver):
    adaptive = True


class FixedGridRK(Solver):
    adaptive = False


def _adaptive(t: ButcherTableau) -> type:
    return type(f"{t.name.title().replace('_', '')}Solver", (AdaptiveRK,), {"tableau": t})


def _fixed(t: ButcherTableau) -> type:
    return type(f"{t.name.title().replace('_', '')}Solver", (FixedGridRK,), {"tableau": t})


SOLVERS: dict[str, type] = {
    "dopri5": _adaptive(dopri5.TABLEAU),
    "tsit5": _adaptive(tsit5.TABLEAU),
    "bosh3": _adaptive(bosh3.TABLEAU),
    "dopri8": _adaptive(dopri8.TABLEAU),
    "fehlberg2": _adaptive(fehlberg2.TABLEAU),
    "adaptive_heun": _adaptive(adaptive_heun.TABLEAU),
    "euler": _fixed(fixed.EULER),
    "midpoint": _fixed(fixed.MIDPOINT),
    "heun2": _fixed(fixed.HEUN2),
    "heun3": _fixed(fixed.HEUN3),
    "rk4": _fixed(fixed.RK4),
}
ADAPTIVE_METHODS = tuple(k for k, v in SOLVERS.items() if v.adaptive)
FIXED_METHODS = tuple(k for k, v in SOLVERS.items() if not v.adaptive)


def get_solver(method) -> type:
    if method is None:
        method = "dopri5"
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    if method not in SOLVERS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(SOLVERS)}")
    return SOLVERS[method]
