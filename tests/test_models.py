"""fastnode.models: parameter counts against the thesis's tables, ODEBlock NFE and gradients, training lowers the
loss."""

import doctest
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnode
from fastnode.models import (
    ANODE,
    ImageODENet,
    ImageResNet,
    MLPODEFunc,
    ODEBlock,
    ResNetMLP,
    TabularODENet,
    count_parameters,
)


# Thesis figures: MNIST 208,266 (Sec. 4.1; Chen et al. report 0.22M); Table 4.5 (3 channels, 10 classes) NODE 209,418
# and ResNet 602,634; Table 4.6 (3 channels, 36 classes) 211,108 and 604,324. The ResNet's MNIST count (1 channel) is
# not printed in the thesis; Chen et al.'s table says 0.60M, and 601,482 is the 3-channel figure minus the 2 input
# channels' 2 * 64 * 9 stem weights, exactly as for the ODENet (209,418 - 208,266 = 1,152 = 2 * 64 * 9).
@pytest.mark.parametrize("in_channels, classes, odenet, resnet", [
    (1, 10, 208_266, 601_482),
    (3, 10, 209_418, 602_634),
    (3, 36, 211_108, 604_324),
], ids=["mnist", "table4.5", "table4.6"])
def test_parameter_counts_match_thesis(in_channels, classes, odenet, resnet):
    n_ode = count_parameters(ImageODENet(in_channels, classes))
    n_res = count_parameters(ImageResNet(in_channels, classes, n_blocks=6))
    print(f"in={in_channels} classes={classes}: ODENet {n_ode:,}  ResNet-6 {n_res:,}")
    assert n_ode == odenet
    assert n_res == resnet
    assert round(n_ode / 1e6, 2) in (0.21, 0.22) and round(n_res / 1e6, 2) == 0.60


def test_image_shapes_follow_table_4_1():
    net = ImageODENet(3, 10)
    x = torch.randn(2, 3, 28, 28)
    stem = net.stem(x)
    assert tuple(stem.shape) == (2, 64, 6, 6)  # Table 4.1 row 6: 6x6x64 into the ODE block
    assert tuple(net(x).shape) == (2, 10)
    # ResNet: two downsampling blocks take 26 -> 13 -> 7 (the shortcut's conv1x1/2 is parallel, see image.py)
    assert tuple(ImageResNet(3, 10).stem(x).shape) == (2, 64, 7, 7)


class _Lin(nn.Module):
    def __init__(self, dim=3):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, t, z):
        return torch.tanh(self.lin(z))


@pytest.mark.parametrize("adjoint", [False, True], ids=["backprop", "adjoint"])
def test_ode_block_matches_odeint_and_counts_nfe(adjoint):
    torch.manual_seed(0)
    func = _Lin().double()
    block = ODEBlock(func, rtol=1e-8, atol=1e-8, adjoint=adjoint)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    z = block(x)
    ref = fastnode.odeint(func, x, torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=1e-8, atol=1e-8)[-1]
    torch.testing.assert_close(z, ref)
    assert block.nfe_forward > 6 and block.nfe_backward is None
    (gz,) = torch.autograd.grad(z.square().sum(), x)
    (gr,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(gz, gr, rtol=1e-5, atol=1e-7)
    assert block.nfe_backward is not None and block.nfe_backward > 0
    if not adjoint:
        # backprop: one vector-Jacobian product per function evaluation that reaches the output
        assert block.nfe_backward <= block.nfe_forward


def test_ode_block_adjoint_nfe_backward_is_solver_count():
    torch.manual_seed(0)
    block = ODEBlock(_Lin(), rtol=1e-5, atol=1e-5, adjoint=True)
    block(torch.randn(5, 3)).sum().backward()
    assert block.nfe_backward == block._stats.nfe_backward > 0


def test_ode_block_fixed_grid_nfe():
    block = ODEBlock(_Lin(), method="euler", options={"step_size": 0.125})
    block(torch.randn(2, 3))
    assert block.nfe_forward == 8


def test_ode_block_trajectory_and_backend():
    block = ODEBlock(_Lin(), t=[0.0, 0.5, 1.0], return_trajectory=True, backend="torch")
    assert tuple(block(torch.randn(2, 3)).shape) == (3, 2, 3)


@pytest.mark.parametrize("kwargs, exc, word", [
    ({"t": [0.0]}, ValueError, "t must"),
    ({"t": [0.0, 1.0, 0.5]}, ValueError, "t must"),
    ({"rtol": -1.0}, ValueError, "rtol"),
    ({"atol": 0}, ValueError, "atol"),
    ({"backend": "cuda-magic"}, ValueError, "backend"),
    ({"options": [1]}, TypeError, "options"),
    ({"method": 5}, TypeError, "method"),
], ids=["t-short", "t-order", "rtol", "atol", "backend", "options", "method"])
def test_ode_block_validation(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        ODEBlock(_Lin(), **kwargs)


def test_ode_block_needs_module():
    with pytest.raises(TypeError, match="func"):
        ODEBlock(lambda t, z: z)


@pytest.mark.parametrize("ctor, exc, word", [
    (lambda: ImageODENet(0, 10), ValueError, "in_channels"),
    (lambda: ImageResNet(1, 10, n_blocks=-1), ValueError, "n_blocks"),
    (lambda: ImageODENet(1, 2.5), TypeError, "num_classes"),
    (lambda: ANODE(2, augment_dim=-1), ValueError, "augment_dim"),
    (lambda: MLPODEFunc(2, activation="gelu"), ValueError, "activation"),
], ids=["channels", "blocks", "classes", "augment", "activation"])
def test_model_validation(ctor, exc, word):
    with pytest.raises(exc, match=word):
        ctor()


def test_input_shape_errors():
    with pytest.raises(ValueError, match="x must"):
        ImageODENet(1, 10, width=8)(torch.randn(2, 28, 28))
    with pytest.raises(ValueError, match="x must"):
        ANODE(2, 1, hidden=4)(torch.randn(3, 3))


def test_anode_augments_with_zeros():
    model = ANODE(2, augment_dim=3, hidden=8)
    assert model.block.func.func.net[0].in_features == 2 + 3 + 1  # state + augmentation + time
    z = model.flow(torch.randn(4, 2))
    assert tuple(z.shape) == (4, 5)
    assert tuple(model(torch.randn(4, 2)).shape) == (4, 2)


def test_resnet_mlp_trajectory_ends_at_output():
    m = ResNetMLP(2, 8, n_blocks=3)
    x = torch.randn(5, 2)
    traj = m.trajectory(x)
    assert traj.shape[0] == 4
    torch.testing.assert_close(traj[-1], m(x))


@pytest.mark.parametrize("adjoint", [False, True], ids=["backprop", "adjoint"])
def test_tiny_training_lowers_loss(adjoint):
    from sklearn.datasets import load_breast_cancer

    torch.manual_seed(0)
    raw = load_breast_cancer()
    x = torch.tensor(raw.data[:128], dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(raw.target[:128], dtype=torch.float32)
    net = TabularODENet(30, 1, width=8, hidden=16, rtol=1e-3, atol=1e-3, adjoint=adjoint)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(net(x).squeeze(-1), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.filterwarnings("ignore:ODENet. input of:UserWarning")  # 8x8 inputs: the 1x1 map is on purpose here
def test_image_odenet_training_step_lowers_loss():
    torch.manual_seed(0)
    # Width 64 as in the thesis: with fewer channels GroupNorm(min(32, C)) normalises every channel on its own
    # before the global pooling, which leaves the head little to learn from in a few steps.
    # A fixed grid (rk4, 4 steps) keeps this test independent of the backend: with dopri5 at rtol 1e-2 the adaptive
    # adjoint of this untrained 1x1-feature-map net stalls (step size -> 1e-12, parameter-error estimate
    # non-finite) for 5 of 8 seeds, on the torch and the ext backend alike, in float32 and float64.
    net = ImageODENet(1, 3, width=64, method="rk4", options={"step_size": 0.25}, adjoint=True)
    y = torch.arange(12) % 3
    x = torch.randn(3, 1, 8, 8)[y] + 0.3 * torch.randn(12, 1, 8, 8)  # one template image per class, plus noise
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert net.block.nfe_backward > 0
    assert float(F.cross_entropy(net(x), y).detach()) < 0.9 * first


@pytest.mark.parametrize("name", ["fastnode.models", "fastnode.models.ode_block", "fastnode.models.image",
                                  "fastnode.models.tabular"])
def test_docstring_examples(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0


def test_image_odenet_below_14x14_is_degenerate_as_its_warning_says():
    """What the guard is for: under 14x14 inputs the ODE block's map falls below 3x3. At 1x1 (8x8 inputs) with 32
    channels or fewer every GroupNorm group holds one value, the norm outputs its bias whatever the input, and the
    network gives every image the same logits; at 14x14 (3x3 map) the logits depend on the image."""
    torch.manual_seed(0)
    net = ImageODENet(1, 10, width=16, method="rk4", options={"step_size": 0.25}).double()
    with torch.no_grad():
        for p in net.parameters():  # a trained-looking net: the GroupNorm affine parameters off their 1/0 start
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(4, 1, 14, 14, dtype=torch.float64)
    with torch.no_grad():
        with pytest.warns(UserWarning, match=r"ODENet: input of \(8, 8\) leaves a \(1, 1\) feature map.*1 value"):
            small = net(x[..., :8, :8])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            full = net(x)
        with pytest.warns(UserWarning, match=r"\(13, 13\) leaves a \(2, 2\) feature map"):
            ImageODENet(1, 10, width=16).double()(x[..., :13, :13])
    torch.testing.assert_close(small, small[:1].expand_as(small), rtol=0, atol=1e-12)
    assert float((full - full[:1]).abs().max()) > 1e-3


@pytest.mark.parametrize("net_cls", [ImageODENet, ImageResNet], ids=["odenet", "resnet"])
def test_feature_map_size_and_small_map_warning(net_cls):
    net = net_cls(1, 10, width=8)
    for size in (8, 11, 13, 14, 16, 28, 31):  # the formula against the stem itself
        assert net_cls.feature_map_size(size) == net.stem(torch.zeros(1, 1, size, size)).shape[-1]
    smallest = 14 if net_cls is ImageODENet else 11
    assert net_cls.feature_map_size(smallest) == 3 and net_cls.feature_map_size(smallest - 1) == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net(torch.randn(2, 1, smallest, smallest))
        assert not caught
        net(torch.randn(2, 1, smallest - 1, smallest - 1))
        net(torch.randn(2, 1, smallest - 1, smallest - 1))  # once per model
    assert len(caught) == 1 and "below 3x3" in str(caught[0].message)
    with pytest.raises(ValueError, match="image_size"):
        net_cls.feature_map_size(0)
