"""Shared test set-up: Triton's CPU interpreter for kernel tests, device/dtype lists, gpu marker skipping."""

import os

# Must be set before triton is imported anywhere (kernel tests run in the interpreter on CPU).
if not os.environ.get("FASTNODE_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
