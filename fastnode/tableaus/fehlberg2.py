"""Runge-Kutta-Fehlberg 1(2), propagating the 2nd-order solution (local extrapolation).

The 3rd stage sits at ``t + h`` but at the 1st-order solution; it is reused as the next step's first stage
(``reuse_last_stage``), as torchdiffeq does: 2 evaluations per step. Re-evaluating ``f(t + h, y_new)`` instead
cost 1.5x the evaluations for the same error on van der Pol and Lotka-Volterra
(``bench/results/cpu/nfe_vs_torchdiffeq.md``).
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
    reuse_last_stage=True,
)
