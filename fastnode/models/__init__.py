"""Neural ODE models on fastnode: ``ODEBlock``, the thesis's image ODENet and ResNet, tabular ODENet, ANODE.

Example:
    >>> import torch
    >>> from fastnode.models import ANODE
    >>> tuple(ANODE(2, augment_dim=1, hidden=8)(torch.randn(3, 2)).shape)
    (3, 2)
"""

from .image import ConcatConv2d, ImageODEFunc, ImageODENet, ImageResNet, ResBlock, group_norm
from .ode_block import ODEBlock, count_parameters
from .tabular import ANODE, MLPODEFunc, ResNetMLP, TabularODENet

__all__ = [
    "ANODE",
    "ConcatConv2d",
    "ImageODEFunc",
    "ImageODENet",
    "ImageResNet",
    "MLPODEFunc",
    "ODEBlock",
    "ResBlock",
    "ResNetMLP",
    "TabularODENet",
    "count_parameters",
    "group_norm",
]
