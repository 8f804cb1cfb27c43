"""Vector-state models: the ODENets paper's tabular ODENet, augmented neural ODEs (ANODE) and a residual MLP."""

from __future__ import annotations

import torch
from torch import nn

from .image import _check_int
from .ode_block import ODEBlock

__all__ = ["ANODE", "MLPODEFunc", "ResNetMLP", "TabularODENet"]


class MLPODEFunc(nn.Module):
    """Vector field ``f(t, z) = W2 act(W1 [z, t] + b1) + b2`` (time appended as one extra input).

    Args:
        dim: state size ``D``.
        hidden: hidden units.
        time_dependent: append ``t`` to the input.
        activation: ``"tanh"`` (default) or ``"relu"``.

    Example:
        >>> import torch
        >>> f = MLPODEFunc(3, 16)
        >>> tuple(f(torch.tensor(0.0), torch.randn(4, 3)).shape)
        (4, 3)
    """

    def __init__(self, dim: int, hidden: int = 32, time_dependent: bool = True, activation: str = "tanh"):
        super().__init__()
        _check_int("dim", dim)
        _check_int("hidden", hidden)
        if activation not in ("tanh", "relu"):
            raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")
        self.time_dependent = bool(time_dependent)
        self.net = nn.Sequential(nn.Linear(dim + int(self.time_dependent), hidden),
                                 nn.Tanh() if activation == "tanh" else nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``z``: ``[B, D]``, ``t``: 0-d; returns ``[B, D]``."""
        if self.time_dependent:
            z = torch.cat([z, (t.to(z.dtype) * torch.ones_like(z[:, :1]))], dim=1)
        return self.net(z)


class TabularODENet(nn.Module):
    """The ODENets paper's tabular model: 2-layer encoder, ``ODEBlock``, linear head.

    Args:
        in_features: input features.
        out_features: outputs (1 for binary classification logits or regression).
        width: latent size of the encoder and the ODE state.
        hidden: hidden units of the vector field.
        **block_kwargs: passed to ``ODEBlock``.

    Example:
        >>> import torch
        >>> net = TabularODENet(30, 1, width=16)
        >>> tuple(net(torch.randn(8, 30)).shape)
        (8, 1)
    """

    def __init__(self, in_features: int, out_features: int = 1, width: int = 32, hidden: int = 64, **block_kwargs):
        super().__init__()
        _check_int("in_features", in_features)
        _check_int("out_features", out_features)
        _check_int("width", width)
        self.encoder = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width))
        self.block = ODEBlock(MLPODEFunc(width, hidden), **block_kwargs)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, in_features]``; returns ``[B, out_features]``."""
        if x.ndim != 2:
            raise ValueError(f"x must be [B, in_features], got shape {tuple(x.shape)}")
        return self.head(self.block(self.encoder(x)))


class ANODE(nn.Module):
    """Augmented neural ODE (Dupont et al.): append ``augment_dim`` zeros to the state, flow, read out.

    With ``augment_dim=0`` it is a plain neural ODE. The readout is ``head`` applied to the final (augmented)
    state; by default no learned readout: the first ``dim`` coordinates are returned, so the model's map is the
    flow itself (what the topological limits of plain ODE flows are about).

    Args:
        dim: input size ``D``.
        augment_dim: extra zero dimensions ``A``.
        hidden: hidden units of the vector field.
        head: optional ``nn.Module`` mapping ``[B, D + A]`` to the output.
        **block_kwargs: passed to ``ODEBlock``.

    Example:
        >>> import torch
        >>> model = ANODE(1, augment_dim=1, hidden=16)
        >>> tuple(model(torch.randn(5, 1)).shape)
        (5, 1)
    """

    def __init__(self, dim: int, augment_dim: int = 1, hidden: int = 32, head: nn.Module | None = None,
                 **block_kwargs):
        super().__init__()
        _check_int("dim", dim)
        _check_int("augment_dim", augment_dim, low=0)
        if head is not None and not isinstance(head, nn.Module):
            raise TypeError(f"head must be an nn.Module or None, got {type(head).__name__}")
        self.dim, self.augment_dim = dim, augment_dim
        self.block = ODEBlock(MLPODEFunc(dim + augment_dim, hidden), **block_kwargs)
        self.head = head

    def flow(self, x: torch.Tensor) -> torch.Tensor:
        """The augmented state at the end: ``[B, D]`` -> ``[B, D + A]`` (``[T, B, D + A]`` with trajectories)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be [B, {self.dim}], got shape {tuple(x.shape)}")
        z = torch.cat([x, x.new_zeros(x.shape[0], self.augment_dim)], dim=1)
        return self.block(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, D]``; returns ``head(z(T))``, or ``z(T)[:, :D]`` without a head."""
        z = self.flow(x)
        if self.head is not None:
            return self.head(z)
        return z[..., : self.dim]


class ResNetMLP(nn.Module):
    """``n_blocks`` residual steps ``z <- z + f_k(z)`` with ``f_k`` a one-hidden-layer MLP (discrete counterpart).

    Args:
        dim: state size.
        hidden: hidden units of each block.
        n_blocks: residual blocks.
        head: optional readout ``nn.Module``.

    Example:
        >>> import torch
        >>> tuple(ResNetMLP(2, 16, n_blocks=3)(torch.randn(4, 2)).shape)
        (4, 2)
    """

    def __init__(self, dim: int, hidden: int = 32, n_blocks: int = 4, head: nn.Module | None = None):
        super().__init__()
        _check_int("dim", dim)
        _check_int("hidden", hidden)
        _check_int("n_blocks", n_blocks)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))
                                    for _ in range(n_blocks))
        self.head = head

    def trajectory(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` -> ``[n_blocks + 1, B, D]``: the state after each block (input first)."""
        zs = [x]
        for blk in self.blocks:
            zs.append(zs[-1] + blk(zs[-1]))
        return torch.stack(zs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, D]``; returns ``[B, D]`` (or ``head`` of it)."""
        z = x
        for blk in self.blocks:
            z = z + blk(z)
        return z if self.head is None else self.head(z)
