"""Op tests: every fast backend's ops (``fastnode::`` C++, ``fastnode_triton::`` Triton) against the reference.

Fresh outputs are poisoned, so an element an op forgets to write fails: ``torch.use_deterministic_algorithms``
makes every ``empty`` (the extension's ``at::empty_like`` included) fill floating memory with NaN, and the Triton
ops' own buffers start as NaN (floats) or 2 (flags). On CPU the Triton kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``, set by ``tests/conftest.py``); the CUDA twins carry ``@pytest.mark.gpu`` and skip without a
GPU (``FASTNODE_TEST_CUDA=1 pytest tests/ops`` on a GPU machine runs them).
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    from fastnode.kernels import _launch

    monkeypatch.setattr(_launch, "POISON", True)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(prev)
