"""Triton kernels for fastnode's solver arithmetic, installed as ``fastnode.kernels``.

No kernel is registered yet: every StepOps operation runs on the ``torch`` backend
(``fastnode.backends.torch_ops``), which is also the reference the kernels are tested against.
"""
