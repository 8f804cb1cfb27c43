"""Bogacki-Shampine 3(2), FSAL."""

from .._tableau import ButcherTableau

TABLEAU = ButcherTableau(
    name="bosh3",
    order=3,
    c=[0, "1/2", "3/4", 1],
    a=[[], ["1/2"], [0, "3/4"], ["2/9", "1/3", "4/9"]],
    b=["2/9", "1/3", "4/9", 0],
    # b minus the embedded 2nd-order weights (7/24, 1/4, 1/3, 1/8).
    e=["-5/72", "1/12", "1/9", "-1/8"],
)
