"""pytest set-up for the benchmarks: collect ``bench_*.py`` and pin the CPU thread count.

The top-level pyproject keeps pytest's default ``python_files`` (``test_*.py``), which would collect nothing here. A
``pytest.ini`` in ``bench/`` would only apply when ``bench/`` is the rootdir, so instead this conftest collects
``bench_*.py`` itself; it works for ``pytest bench`` run from the repository root.

Environment:
    FASTNODE_BENCH_THREADS: torch intra-op threads (default 1). The benchmarks time this thread's CPU time
        (``time.thread_time``): with one thread that is the solve's whole CPU cost, and a shared machine's other
        processes do not inflate it. With more threads it misses the other threads' work (wall time still counts).
"""

from __future__ import annotations

import fnmatch
import os

import torch

torch.set_num_threads(int(os.environ.get("FASTNODE_BENCH_THREADS", "1")))


def pytest_collect_file(file_path, parent):
    """Collects ``bench_*.py`` modules that pytest's own collector leaves out."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    # pytest already collects files named on the command line and files matching python_files; collecting them
    # here as well would run every benchmark twice.
    if parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(file_path.name, pat) for pat in parent.config.getini("python_files")):
        return None
    return parent.ihook.pytest_pycollect_makemodule(module_path=file_path, parent=parent)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Adds the torch build and thread count to the JSON's machine_info."""
    machine_info["torch_version"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
