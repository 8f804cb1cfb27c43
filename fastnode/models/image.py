"""The thesis's image ODENet (Tables 4.1/4.2) and its ResNet baseline with residual blocks (Tables 4.3/4.4).

Both follow Chen et al.'s MNIST models layer by layer. Parameter counts (64 channels):

================================  ========  ========
input channels / classes          ODENet    ResNet-6
================================  ========  ========
1 / 10 (MNIST)                    208,266   601,482
3 / 10 (thesis Table 4.5)         209,418   602,634
3 / 36 (thesis Table 4.6)         211,108   604,324
================================  ========  ========

The 3-channel figures equal the thesis's Tables 4.5/4.6 exactly and 208,266 its MNIST figure. Table 4.3 lists
the two downsampling residual blocks' layers one after the other (``conv1x1/2`` then ``conv3x3/2``), which would
halve the map four times (26 -> 13 -> 7 -> 4 -> 2); in the blocks, the ``conv1x1/2`` is the shortcut's projection,
parallel to the ``conv3x3/2``, so the map goes 26 -> 13 -> 7 and the residual blocks run at 7x7 (the parameter
count is the same either way, and it matches the tables).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .ode_block import ODEBlock

__all__ = ["ConcatConv2d", "ImageODEFunc", "ImageODENet", "ImageResNet", "ResBlock", "group_norm"]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with ``min(32, channels)`` groups (Chen et al.'s ``norm``).

    Args:
        channels: number of channels ``C``.

    Returns:
        ``nn.GroupNorm(min(32, C), C)``.

    Example:
        >>> group_norm(64).num_groups
        32
    """
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    return nn.GroupNorm(min(32, channels), channels)


def _check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


class ConcatConv2d(nn.Module):
    """``Conv2d`` whose input gets the time ``t`` as one extra constant channel.

    Args:
        in_channels, out_channels: channels without / of the output (the conv sees ``in_channels + 1``).
        kernel_size, stride, padding: as ``nn.Conv2d``.

    Example:
        >>> import torch
        >>> conv = ConcatConv2d(4, 8)
        >>> tuple(conv(torch.tensor(0.5), torch.zeros(2, 4, 6, 6)).shape)
        (2, 8, 6, 6)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(_check_int("in_channels", in_channels) + 1, _check_int("out_channels", out_channels),
                              kernel_size, stride, padding)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C, H, W]``, ``t``: 0-d; returns ``[B, out_channels, H', W']``."""
        tt = torch.ones_like(x[:, :1]) * t.to(x.dtype)
        return self.conv(torch.cat([tt, x], dim=1))


class ImageODEFunc(nn.Module):
    """The thesis's ODE function (Table 4.2): GN, ReLU, conv3x3 (+t), GN, ReLU, conv3x3 (+t), GN.

    Args:
        channels: feature channels ``C`` (64 in the thesis).

    Example:
        >>> import torch
        >>> f = ImageODEFunc(8)
        >>> tuple(f(torch.tensor(0.0), torch.randn(2, 8, 5, 5)).shape)
        (2, 8, 5, 5)
    """

    def __init__(self, channels: int = 64):
        super().__init__()
        self.norm1 = group_norm(channels)
        self.conv1 = ConcatConv2d(channels, channels)
        self.norm2 = group_norm(channels)
        self.conv2 = ConcatConv2d(channels, channels)
        self.norm3 = group_norm(channels)
        self.relu = nn.ReLU()

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C, H, W]``; returns ``dx/dt`` ``[B, C, H, W]``."""
        out = self.conv1(t, self.relu(self.norm1(x)))
        out = self.conv2(t, self.relu(self.norm2(out)))
        return self.norm3(out)


def _conv_stem(in_channels: int, width: int) -> nn.Sequential:
    # Table 4.1 rows 0-6: conv3x3/1 (no padding: 28 -> 26), GN, ReLU, conv4x4/2 (26 -> 13), GN, ReLU, conv4x4/2
    # (13 -> 6). Padding 1 on the strided convs gives exactly these sizes.
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, 1), group_norm(width), nn.ReLU(),
        nn.Conv2d(width, width, 4, 2, 1), group_norm(width), nn.ReLU(),
        nn.Conv2d(width, width, 4, 2, 1),
    )


def _head(width: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(group_norm(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width,
                                                                                                        num_classes))


class ImageODENet(nn.Module):
    """Image classifier: conv stem (downsampling by 4), one ``ODEBlock``, GN, ReLU, global average pool, linear.

    Args:
        in_channels: image channels (1 for MNIST, 3 for colour).
        num_classes: output logits.
        width: feature channels (64 in the thesis).
        **block_kwargs: passed to ``ODEBlock`` (``method``, ``rtol``, ``atol``, ``adjoint``, ``backend``, ``t``,
            ``options``, ...). Default tolerances ``1e-3`` as in Chen et al.'s MNIST script.

    Example:
        >>> import torch
        >>> from fastnode.models import count_parameters
        >>> net = ImageODENet(in_channels=1, num_classes=10)
        >>> count_parameters(net)
        208266
        >>> tuple(net(torch.randn(2, 1, 28, 28)).shape)
        (2, 10)
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 64, **block_kwargs):
        super().__init__()
        _check_int("in_channels", in_channels)
        _check_int("num_classes", num_classes)
        _check_int("width", width)
        self.stem = _conv_stem(in_channels, width)
        self.block = ODEBlock(ImageODEFunc(width), **block_kwargs)
        self.head = _head(width, num_classes)

    @staticmethod
    def feature_map_size(image_size: int) -> int:
        """Side of the map the ODE block runs on for ``image_size x image_size`` inputs (28 -> 6).

        Example:
            >>> ImageODENet.feature_map_size(28), ImageODENet.feature_map_size(8)
            (6, 1)
        """
        s = _check_int("image_size", image_size) - 2  # conv3x3, no padding
        for _ in range(2):  # conv4x4, stride 2, padding 1
            s = (s - 2) // 2 + 1
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, in_channels, H, W]`` (``H, W >= 14`` for a useful network); returns ``[B, num_classes]``.

        Inputs under 14x14 leave the ODE block a feature map below 3x3, where its GroupNorm groups hold a handful
        of values (one, at 1x1 with 32 channels or fewer: the norm then outputs its bias whatever the input) and
        the network gives nearly the same logits for every image. The forward still runs (tests use tiny
        images), but warns once per model; the studies refuse such configurations.
        """
        if x.ndim != 4:
            raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
        h = self.stem(x)
        _warn_small_map(self, h, x, "ODENet", 14)
        return self.head(self.block(h))


def _warn_small_map(net: nn.Module, h: torch.Tensor, x: torch.Tensor, kind: str, min_input: int) -> None:
    if (h.shape[-1] < 3 or h.shape[-2] < 3) and not getattr(net, "_small_map_warned", False):
        net._small_map_warned = True
        per_group = (h.shape[1] // min(32, h.shape[1])) * h.shape[-1] * h.shape[-2]
        warnings.warn(f"{kind}: input of {tuple(x.shape[-2:])} leaves a {tuple(h.shape[-2:])} feature map after the "
                      f"stem, below 3x3 (GroupNorm groups of {per_group} value(s)): a degenerate network; use images "
                      f"of at least {min_input}x{min_input}", UserWarning, stacklevel=3)


class ResBlock(nn.Module):
    """Pre-activation residual block (Table 4.4): ``x + conv3x3(ReLU(GN(conv3x3(ReLU(GN(x))))))``.

    With ``stride=2`` the first conv halves the map and the shortcut is a strided ``conv1x1`` (no bias) applied to
    the block's pre-activation, as in Chen et al.'s ``ResBlock``.

    Args:
        channels: input and output channels.
        stride: 1, or 2 for a downsampling block.

    Example:
        >>> import torch
        >>> tuple(ResBlock(8, stride=2)(torch.randn(2, 8, 13, 13)).shape)
        (2, 8, 7, 7)
    """

    def __init__(self, channels: int = 64, stride: int = 1):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        self.norm1 = group_norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.norm2 = group_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.downsample = nn.Conv2d(channels, channels, 1, stride, bias=False) if stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C, H, W]``; returns ``[B, C, H/stride, W/stride]`` (rounded up)."""
        out = self.relu(self.norm1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.norm2(out)))
        return out + shortcut


class ImageResNet(nn.Module):
    """The thesis's ResNet baseline (Table 4.3): conv3x3, two downsampling residual blocks, ``n_blocks`` residual
    blocks (6 in the thesis), GN, ReLU, global average pool, linear.

    Args:
        in_channels: image channels.
        num_classes: output logits.
        n_blocks: residual blocks after the downsampling (the ODE block's discrete counterpart).
        width: feature channels (64).

    Example:
        >>> import torch
        >>> from fastnode.models import count_parameters
        >>> net = ImageResNet(in_channels=1, num_classes=10)
        >>> count_parameters(net)
        601482
        >>> tuple(net(torch.randn(2, 1, 28, 28)).shape)
        (2, 10)
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, n_blocks: int = 6, width: int = 64):
        super().__init__()
        _check_int("in_channels", in_channels)
        _check_int("num_classes", num_classes)
        _check_int("n_blocks", n_blocks, low=0)
        _check_int("width", width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1), ResBlock(width, 2), ResBlock(width, 2))
        self.blocks = nn.Sequential(*[ResBlock(width) for _ in range(n_blocks)])
        self.head = _head(width, num_classes)

    @staticmethod
    def feature_map_size(image_size: int) -> int:
        """Side of the map the residual blocks run on for ``image_size x image_size`` inputs (28 -> 7).

        Example:
            >>> ImageResNet.feature_map_size(28)
            7
        """
        s = _check_int("image_size", image_size) - 2
        for _ in range(2):  # conv3x3, stride 2, padding 1
            s = (s - 1) // 2 + 1
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, in_channels, H, W]`` (``H, W >= 11`` for a useful network, see ``ImageODENet.forward``);
        returns logits ``[B, num_classes]``."""
        if x.ndim != 4:
            raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
        h = self.stem(x)
        _warn_small_map(self, h, x, "ResNet", 11)
        return self.head(self.blocks(h))
