"""Shared test set-up: Triton's CPU interpreter for kernel tests, device/dtype lists, gpu marker skipping."""

import importlib.util
import os
import re
from pathlib import Path



def _version(dist: str) -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(p) for p in re.findall(r"\d+", version(dist))[:2])
    except PackageNotFoundError:
        return ()


def interpreter_broken() -> str | None:
    """Why Triton's interpreter cannot run the kernels with the installed versions (None when it can).

    Triton < 3.7's interpreter converts a 1-element array with ``int()`` in loops with a runtime bound, which numpy
    >= 2.4 rejects; torch < 2.12's ``wrap_triton`` rejects interpreted kernels (the GPU image: torch 2.11, triton 3.6,
    numpy 2.5). There the CPU (interpreter) cases skip with this reason and the compiled CUDA twins run instead.
    """
    triton, numpy = _version("triton"), _version("numpy")
    if triton and triton < (3, 7) and numpy >= (2, 4):
        return (f"Triton {'.'.join(map(str, triton))}'s interpreter fails with numpy {'.'.join(map(str, numpy))} "
                "(needs triton >= 3.7 or numpy < 2.4)")
    if not _torch_wraps_interpreted_kernels():
        return f"torch {'.'.join(map(str, _version('torch')))}'s wrap_triton rejects interpreted Triton kernels"
    return None


def _torch_wraps_interpreted_kernels() -> bool:
    # Read, not imported: importing torch's triton helpers here could import triton before TRITON_INTERPRET is set.
    spec = importlib.util.find_spec("torch")
    src = Path(spec.origin).parent / "_library" / "triton.py" if spec and spec.origin else None
    return src is None or not src.exists() or "_is_interpreted_triton_kernel" in src.read_text()


# Must be set before triton is imported anywhere (kernel tests run in the interpreter on CPU). Where the interpreter
# cannot run (interpreter_broken, or FASTNODE_NO_INTERPRETER=<reason> set by hand), it stays off and
# FASTNODE_NO_INTERPRETER tells the device lists why.
if not os.environ.get("FASTNODE_TEST_CUDA"):
    _broken = os.environ.get("FASTNODE_NO_INTERPRETER") or interpreter_broken()
    if _broken is None:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        os.environ["FASTNODE_NO_INTERPRETER"] = _broken

import pytest  # noqa: E402  (after TRITON_INTERPRET is decided)
import torch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # The marker, not item.keywords: keywords also hold the names of the parent folders (a checkout named gpu).
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def pytest_configure(config):
    # FASTNODE_RECORD_LAUNCHES=<file>: every distinct Triton launch of the run, for tests/backends/replay_sm90.py.
    path = os.environ.get("FASTNODE_RECORD_LAUNCHES")
    if path and os.environ.get("TRITON_INTERPRET") == "1":
        from tests.backends.replay_sm90 import install_recorder

        install_recorder(path)
