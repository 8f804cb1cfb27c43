"""Runge-Kutta-Fehlberg 1(2), propagating the 2nd-order solution (local extrapolation).

The published 3rd stage is evaluated at the 1st-order solution, so ``f(t + h, y_new)`` is one more stage
(appended by the tableau's FSAL form): 2 new evaluations per accepted step.
"""

from .._tableau import ButcherTableau

TABLEAU = ButcherTableau(
    name="fehlberg2",
    order=2,
    c=[0, "1/2", 1],
    a=[[], ["1/2"], ["1/256", "255/256"]],
    b=["1/512", "255/256", "1/512"],
    # b minus the 1st-order weights (1/256, 255/256, 0).
    e=["-1/512", 0, "1/512"],
)
