"""Random inputs for the kernel tests and a rounding-error bound that means something."""

from __future__ import annotations

import torch

from fastnode.solvers import SOLVERS

ADAPTIVE = [name for name, cls in SOLVERS.items() if cls.adaptive]
# [G, N]: odd sizes (masked tails in rows and columns), one row, one column, one element.
SHAPES = [(7, 63), (1, 63), (7, 1), (1, 1)]
SHAPE_IDS = ["G7-N63", "G1-N63", "G7-N1", "G1-N1"]
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


def tableau(method: str):
    return SOLVERS[method].tableau


def state(G: int, N: int, dtype, device, contiguous: bool = True, seed: int = 0) -> torch.Tensor:
    """``[G, N]`` random state; non-contiguous: every other column of a ``[G, 2N]`` tensor."""
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        return torch.randn(G, N, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    return torch.randn(G, 2 * N, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)[:, ::2]


def stages(S: int, G: int, N: int, dtype, device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, G, N, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def steps(G: int, dtype, device, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.05 + 0.5 * torch.rand(G, generator=g, dtype=torch.float64)).to(dtype=dtype, device=device)


def combo_bound(y: torch.Tensor, K, h: torch.Tensor, weights: list) -> torch.Tensor:
    """``|y| + |h| * sum_j |w_j| |k_j|``: the magnitude the rounding error of ``y + h * sum_j w_j k_j`` scales with."""
    acc = torch.zeros_like(y, dtype=torch.float64)
    for w, k in zip(weights, K):
        if w == 0.0:  # skipped, as the reference skips it (a non-finite stage with weight 0 stays out)
            continue
        acc += abs(float(w)) * k.double().abs()
    return y.double().abs() + h.double().abs().reshape(-1, 1) * acc


def assert_rounding_close(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, ulps: float = 8.0) -> None:
    """``|out - ref| <= ulps * eps * bound`` elementwise (and no NaN: poisoned outputs fail here).

    A wrong weight, a missed stage or an unwritten element differs by O(bound); the two implementations'
    different rounding (operation order, fused multiply-add on GPUs) by a few eps times the bound.
    """
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.isnan(out).any(), "output has NaN (an element was never written)"
    tol = ulps * EPS[out.dtype] * bound
    err = (out.double() - ref.double()).abs()
    worst = (err - tol).max()
    assert worst <= 0, f"max error {err.max().item():.3e} exceeds the rounding bound (excess {worst.item():.3e})"
