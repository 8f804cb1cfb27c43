"""Heun-Euler 2(1): Heun's method with Euler's as the embedded solution."""

from .._tableau import ButcherTableau

TABLEAU = ButcherTableau(
    name="adaptive_heun",
    order=2,
    c=[0, 1],
    a=[[], [1]],
    b=["1/2", "1/2"],
    e=["-1/2", "1/2"],
)
