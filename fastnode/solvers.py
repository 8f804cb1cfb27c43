"""The method registry: one name -> one solver class, each a tableau plus a couple of class attributes."""

from __future__ import annotations

from ._adams import ADAMS_VALID, run_adams
from ._scipy_solver import SCIPY_OPTIONS, solve_scipy
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


class OtherSolver(Solver):
    """A method that is not a Butcher tableau: ``run(p, y0_flat, y0, t) -> [T, 1, N]`` solves a prepared call
    (shared step, no events), ``valid_options`` are its options."""

    adaptive = False
    tableau = None
    run: staticmethod
    valid_options: frozenset


def _other(name: str, run, valid: frozenset, **attrs) -> type:
    return type(f"{name.title().replace('_', '')}Solver", (OtherSolver,),
                {"run": staticmethod(run), "valid_options": valid, **attrs})


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
    "explicit_adams": _other("explicit_adams", run_adams, ADAMS_VALID, implicit=False),
    "implicit_adams": _other("implicit_adams", run_adams, ADAMS_VALID, implicit=True),
    "fixed_adams": _other("fixed_adams", run_adams, ADAMS_VALID, implicit=True),  # torchdiffeq's older name
    "scipy_solver": _other("scipy_solver", solve_scipy, SCIPY_OPTIONS, step_callbacks=frozenset()),
}
ADAPTIVE_METHODS = tuple(k for k, v in SOLVERS.items() if v.adaptive)
FIXED_METHODS = tuple(k for k, v in SOLVERS.items() if issubclass(v, FixedGridRK))
MULTISTEP_METHODS = ("explicit_adams", "implicit_adams", "fixed_adams")


def get_solver(method) -> type:
    if method is None:
        method = "dopri5"
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    if method not in SOLVERS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(SOLVERS)}")
    return SOLVERS[method]
