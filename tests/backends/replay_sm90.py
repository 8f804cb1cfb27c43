"""Every Triton launch the tests make, compiled for sm_90 with the runtime's own specialisation; no GPU needed.

Two halves:

1. Recording (``FASTNODE_RECORD_LAUNCHES=<file>`` while the tests run in Triton's interpreter, see
   ``tests/conftest.py``): each launch's kernel, arguments and launch options go to ``<file>`` (JSON lines, one per
   distinct launch). A tensor argument is kept as its dtype and the alignment of its address modulo 16 (what the
   runtime specialises pointers on); integers, floats and flags by value (the runtime specialises integers on
   ``== 1``, divisibility by 16 and their range: int32 or int64).
2. Replay (``python -m tests.backends.replay_sm90 <file>`` in a process where ``TRITON_INTERPRET`` is unset): each
   recorded launch goes through the compiled kernel's own ``warmup`` (the launcher's binder and specialisation, the
   compiler and ptxas) against an sm_90 target, with CPU tensors of the recorded dtype and alignment standing in for
   the GPU ones. Nothing runs; every launch must produce a cubin.

Unlike ``compile_sm90.py``'s hand-written signatures, this covers exactly what the tests launch, with the
``num_warps``, constexprs and integer specialisations the launchers choose. It runs with the installed Triton; the
GPU machine's Triton (3.6) differs only where its compiler does.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

_SEEN: set = set()


def _encode(v):
    import torch

    if isinstance(v, torch.Tensor):
        return {"t": "tensor", "dtype": str(v.dtype).removeprefix("torch."), "align": v.data_ptr() % 16}
    if v is None:
        return {"t": "none"}
    if isinstance(v, bool):
        return {"t": "bool", "v": v}
    if isinstance(v, int):
        return {"t": "int", "v": v}
    if isinstance(v, float):
        return {"t": "float", "v": v}
    raise TypeError(f"unrecorded launch argument of type {type(v).__name__}")


def install_recorder(path: str) -> None:
    """Patches the interpreter's launch so that each distinct launch is appended to ``path``."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run
    out = Path(path).resolve()  # tests may change the working directory

    def recording_run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        rec = {"kernel": f"{fn.__module__}:{fn.__name__}", "args": [_encode(a) for a in args],
               "kwargs": {k: _encode(v) for k, v in sorted(kwargs.items())}}
        line = json.dumps(rec, sort_keys=True)
        if line not in _SEEN:
            _SEEN.add(line)
            with open(out, "a") as fh:
                fh.write(line + "\n")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    _gpu_launch_geometry()


def _gpu_launch_geometry() -> None:
    """The launchers pick tiles, warps and blocks by device type: make them pick the CUDA ones for CPU tensors too,
    so that what is recorded is what a GPU would launch (the interpreter runs any tile)."""
    import torch

    from fastnode.kernels import _launch

    cuda = torch.device("cuda")
    for fname in ("tiles", "control_tiles", "_block"):
        orig = getattr(_launch, fname)

        def as_cuda(*args, _orig=orig):
            return _orig(*args[:-1], cuda)

        for name, mod in list(sys.modules.items()):
            if (name.startswith("fastnode.kernels") or name == "kernels") and getattr(mod, fname, None) is orig:
                setattr(mod, fname, as_cuda)


def _decode(e):
    import torch

    kind = e["t"]
    if kind == "tensor":
        dtype = getattr(torch, e["dtype"])
        size = torch.empty((), dtype=dtype).element_size()
        raw = torch.empty(64 + 16, dtype=torch.uint8)
        skip = (e["align"] - raw.data_ptr()) % 16
        if skip % size:
            raise ValueError(f"an address {e['align']} mod 16 is impossible for {dtype}")
        t = raw[skip: skip + 64].view(dtype)
        assert t.data_ptr() % 16 == e["align"]
        return t
    return None if kind == "none" else e["v"]


class _Sm90Driver:
    """Stands in for the CUDA driver: the target is an H100/H200 (sm_90); device and stream are never used."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def replay(path: str) -> tuple[int, int, list[str]]:
    """Compiles every launch of ``path`` for sm_90: ``(launches, distinct binaries, failures)``."""
    from triton.runtime.driver import driver

    from fastnode import kernels

    if kernels.INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels are interpreted functions, nothing to compile")
    prev = getattr(driver, "_active", None)  # None without a GPU: restored as it was (reset_active would fail)
    driver.set_active(_Sm90Driver())
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    binaries, failures = set(), []
    try:
        for rec in {json.dumps(r, sort_keys=True): r for r in records}.values():
            mod, name = rec["kernel"].split(":")
            jit = getattr(importlib.import_module(mod), name)
            args = [_decode(a) for a in rec["args"]]
            kwargs = {k: _decode(v) for k, v in rec["kwargs"].items()}
            try:
                compiled = jit.warmup(*args, grid=(1,), **kwargs)
                if not compiled.asm.get("cubin"):
                    raise RuntimeError("no cubin")
                binaries.add(compiled.hash)
            except Exception as exc:  # noqa: BLE001  (every failing launch is reported, not only the first)
                failures.append(f"{rec['kernel']} {rec['kwargs']}: {type(exc).__name__}: {str(exc)[:500]}")
    finally:
        driver.set_active(prev)
    return len(records), len(binaries), failures


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tests.backends.replay_sm90 LAUNCHES.jsonl", file=sys.stderr)
        return 2
    import triton

    n, nbin, failures = replay(argv[0])
    for f in failures:
        print("FAILED", f)
    print(f"replay_sm90: {n} recorded launches, {nbin} distinct sm_90 binaries, {len(failures)} failures "
          f"(triton {triton.__version__})")
    return 1 if failures or n == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
