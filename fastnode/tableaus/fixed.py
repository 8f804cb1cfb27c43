"""Fixed-grid methods (one tableau each; no error estimate)."""

from .._tableau import ButcherTableau

EULER = ButcherTableau(name="euler", order=1, c=[0], a=[[]], b=[1])
MIDPOINT = ButcherTableau(name="midpoint", order=2, c=[0, "1/2"], a=[[], ["1/2"]], b=[0, 1])
HEUN2 = ButcherTableau(name="heun2", order=2, c=[0, 1], a=[[], [1]], b=["1/2", "1/2"])
HEUN3 = ButcherTableau(name="heun3", order=3, c=[0, "1/3", "2/3"], a=[[], ["1/3"], [0, "2/3"]], b=["1/4", 0, "3/4"])
# Kutta's 3/8 rule: slightly smaller error constant than the classic RK4 for one more multiply.
RK4 = ButcherTableau(
    name="rk4", order=4, c=[0, "1/3", "2/3", 1], a=[[], ["1/3"], ["-1/3", 1], [1, -1, 1]],
    b=["1/8", "3/8", "3/8", "1/8"],
)
