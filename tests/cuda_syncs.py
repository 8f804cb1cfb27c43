"""Counting the host syncs a piece of CUDA work makes, as torch sees them (``torch.cuda.set_sync_debug_mode``).

torch warns once per synchronizing call (a device-to-host copy, ``.item()``, ``.tolist()``, a blocking copy, ...)
while the sync debug mode is ``"warn"``; the count of those warnings is the number of times the host waited for the
GPU. A solve's count has a fixed part (input checks, set-up, the end) and one per loop iteration (the fetch of the
step's packet): the difference between two solves that differ only in their number of steps isolates the latter.
"""

from __future__ import annotations

import warnings

import torch


def count_syncs(fn) -> tuple[object, int]:
    """``(fn(), number of synchronizing CUDA calls it made)``."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # one record per call, not one per call site
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    n = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    return out, n
