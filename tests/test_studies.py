"""fastnode.studies: the limits study shows what theory says, memory grows as theory says, data loaders fail
clearly, and a quick study run writes JSON, Markdown and PNG."""

import doctest
import importlib
import json
import struct
import warnings

import numpy as np
import pytest
import torch

from fastnode.studies import STUDIES, get_study, run_study
from fastnode.studies.__main__ import main
from fastnode.studies.common import SavedTensorMeter, batches
from fastnode.studies.data import (
    CALIFORNIA_FILES,
    CIFAR10_FILES,
    MNIST_FILES,
    load_california_csv,
    load_cifar10,
    load_images,
    load_mnist_idx,
    load_regression,
    make_annulus,
)
from fastnode.studies.limits import BOUND_1D, QUICK, fit_1d
from fastnode.studies.memory_vs_depth import MODELS, measure


def test_limits_1d_plain_ode_bounded_anode_and_resnet_fit():
    r = fit_1d(dict(QUICK), seed=0)
    ode, anode, resnet = r["ODE"], r["ANODE (+1 dim)"], r["ResNet (4 blocks)"]
    # Theory: the 1-D flow is increasing, so phi(-1) <= phi(1) and the mean squared error is at least 1.
    assert ode["g(-1)"] <= ode["g(1)"] + 1e-6
    assert ode["loss"] >= BOUND_1D - 1e-3
    # Training got close to the bound (it is the optimum for a flow), so the bound is what stops it.
    assert ode["loss"] < BOUND_1D + 0.05
    assert anode["loss"] < 0.01 and resnet["loss"] < 0.01
    assert anode["g(-1)"] > 0.9 and anode["g(1)"] < -0.9


def test_memory_grows_with_depth_except_adjoint():
    cfg = {"batch_size": 4, "image_size": 12, "width": 8, "in_channels": 1}
    dev = torch.device("cpu")
    mem = {(k, d): measure(k, d, cfg, dev)["saved_peak_mb"] for k in MODELS for d in (1, 8)}
    resnet, backprop, adjoint = MODELS
    assert mem[(resnet, 8)] > 1.5 * mem[(resnet, 1)]
    assert mem[(backprop, 8)] > 1.5 * mem[(backprop, 1)]
    assert mem[(adjoint, 8)] == pytest.approx(mem[(adjoint, 1)], rel=0.05)
    assert mem[(adjoint, 8)] < mem[(backprop, 8)]


def test_saved_tensor_meter_counts_and_releases():
    w = torch.randn(100, requires_grad=True)
    with SavedTensorMeter() as m:
        y = (w * w).sum()  # saves w (one storage, 400 bytes) for backward, twice: counted once
        assert m.live_bytes == 400
        y.backward()
    assert m.peak_bytes == 400 and m.live_bytes == 0


def test_batches_shard_global_batch():
    full = batches(10, 4, shuffle=True, seed=1, epoch=2)
    shards = [batches(10, 4, shuffle=True, seed=1, epoch=2, rank=r, world=2) for r in range(2)]
    for i in range(2):  # the incomplete last global batch is dropped under DDP
        assert torch.cat([shards[0][i], shards[1][i]]).tolist() == full[i].tolist()
    with pytest.raises(ValueError, match="batch_size"):
        batches(10, 3, shuffle=False, world=2)


@pytest.mark.parametrize("loader, files", [(load_mnist_idx, MNIST_FILES), (load_cifar10, CIFAR10_FILES),
                                           (load_california_csv, CALIFORNIA_FILES)],
                         ids=["mnist", "cifar10", "california"])
def test_loaders_name_expected_files(tmp_path, loader, files):
    with pytest.raises(FileNotFoundError, match="data_dir"):
        loader(None)
    with pytest.raises(FileNotFoundError) as exc:
        loader(tmp_path)  # exists but empty
    for f in files:
        assert f in str(exc.value)


def _write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    with open(path, "wb") as fh:
        fh.write(bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape) + arr.tobytes())


def test_mnist_idx_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    xtr, xte = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 256, (3, 28, 28))
    ytr, yte = rng.integers(0, 10, 5), rng.integers(0, 10, 3)
    for name, arr in zip(MNIST_FILES, (xtr, ytr, xte, yte)):
        _write_idx(tmp_path / name, arr)
    a, b, c, d = load_mnist_idx(tmp_path)
    assert tuple(a.shape) == (5, 1, 28, 28) and tuple(c.shape) == (3, 1, 28, 28)
    torch.testing.assert_close(a[:, 0], torch.tensor(xtr / 255.0, dtype=torch.float32))
    assert b.tolist() == ytr.tolist() and d.tolist() == yte.tolist()
    (tmp_path / MNIST_FILES[0]).write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="idx"):
        load_mnist_idx(tmp_path)


def test_california_csv(tmp_path):
    header = "longitude,latitude,housing_median_age,total_rooms,total_bedrooms,population,households," \
             "median_income,median_house_value,ocean_proximity\n"
    rows = [f"-122.{i},37.{i},{10 + i},{800 + i},{100 + i},{300 + i},{90 + i},{3 + i / 10},{150000 + 1000 * i},"
            f"{'NEAR BAY' if i % 2 else 'INLAND'}\n" for i in range(20)]
    rows[3] = "-122.3,37.3,13,803,,303,93,3.3,153000,INLAND\n"  # a missing value: the row is dropped
    (tmp_path / "housing.csv").write_text(header + "".join(rows))
    x, y = load_california_csv(tmp_path)
    assert x.shape == (19, 8 + 2) and y.shape == (19,)
    assert y[0] == pytest.approx(1.5)
    d = load_regression("california", data_dir=tmp_path)
    assert d["x_train"].shape[1] == 10 and abs(float(d["y_train"].mean())) < 1e-5


def test_images_and_annulus():
    d = load_images("digits", image_size=12, train_size=20, test_size=10)
    assert tuple(d["x_train"].shape) == (20, 1, 12, 12) and d["num_classes"] == 10
    with pytest.raises(ValueError, match="dataset"):
        load_images("imagenet")
    with pytest.raises(ValueError, match="train_size"):
        load_images("digits", train_size=10**6)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_images("mnist")
    x, y = make_annulus(200, seed=3)
    r = x.norm(dim=1)
    assert bool((r[y[:, 0] < 0] <= 0.5).all()) and bool(((r[y[:, 0] > 0] >= 1.0) & (r[y[:, 0] > 0] <= 1.5)).all())


def test_quick_study_writes_json_markdown_png(tmp_path):
    res = run_study("resnet-vs-odenet", out=tmp_path, quick=True, epochs=1, train_size=64, test_size=32)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["resnet-vs-odenet.json", "resnet-vs-odenet.md", "resnet-vs-odenet.png"]
    data = json.loads((tmp_path / "resnet-vs-odenet.json").read_text())
    ode = data["models"]["ODENet (adjoint)"]
    assert ode["epochs"][0]["nfe_forward"] > 0 and ode["epochs"][0]["nfe_backward"] > 0
    assert ode["train_samples_per_s"] > 0 and ode["saved_peak_mb"] > 0
    assert res["models"]["ResNet-6"]["epochs"][0]["nfe_forward"] is None
    assert "| ODENet (adjoint) |" in (tmp_path / "resnet-vs-odenet.md").read_text()


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["no-such-study"])
    with pytest.raises(SystemExit):
        main(["limits", "--epochs", "3", "--out", str(tmp_path)])  # limits has no epochs
    assert "no setting epochs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown setting"):
        run_study("limits", out=tmp_path, quick=True, nonsense=1)
    assert set(STUDIES) == {"resnet-vs-odenet", "memory-vs-depth", "tolerance", "limits", "tabular"}
    for name in STUDIES:
        mod = get_study(name)
        assert mod.NAME == name and set(mod.QUICK) == set(mod.DEFAULTS)


@pytest.mark.parametrize("name", ["fastnode.studies", "fastnode.studies.data", "fastnode.studies.report",
                                  "fastnode.studies.common", "fastnode.studies.limits",
                                  "fastnode.studies.memory_vs_depth"])
def test_docstring_examples(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0
