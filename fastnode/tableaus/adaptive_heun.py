"""Heun-Euler 2(1): Heun's method with Euler's as the embedded solution.

The 2nd stage (at ``t + h``, at the Euler predictor) is reused as the next step's first stage
(``reuse_last_stage``), as torchdiffeq does: 1 evaluation per step instead of 2, at the same error on the
benchmarks (``bench/results/cpu/nfe_vs_torchdiffeq.md``).
"""

from .._tableau import ButcherTableau

TABLEAU = ButcherTableau(
    name="adaptive_heun",
    order=2,
    c=[0, 1],
    a=[[], [1]],
    b=["1/2", "1/2"],
    e=["-1/2", "1/2"],
    reuse_last_stage=True,
)
