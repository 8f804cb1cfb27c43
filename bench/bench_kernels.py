"""Achieved memory bandwidth of each Triton kernel against a device-to-device copy moving the same bytes.

Every step op is memory-bound: it reads ``y`` and the stages with nonzero weights and writes one ``[G, N]`` result.
For each op and size this script counts the bytes the op must move (each input read once, each output written
once), times the op with CUDA events (median over repetitions after warm-up) and times ``Tensor.copy_`` of a buffer
holding half those bytes (a copy reads and writes it, so it moves the same total). The ratio of the two bandwidths
is the share of the copy's bandwidth the kernel reaches (goal on an H100: at least 85% at ``[S=7, B=4096, N=4096]``
float32).

Run on a CUDA machine from the repository root::

    python bench/bench_kernels.py --out bench/results/<device>/kernels.md

Without CUDA it says so and exits. Under ``pytest bench`` (``make bench``) its one test skips without CUDA and, with
one, checks the ops against the torch backend at a small size and measures them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

# [S, B, N]: the large size, then smaller ones (and a tall-thin per-sample state).
SIZES = [(7, 4096, 4096), (7, 1024, 1024), (7, 256, 256), (7, 16384, 64)]
DTYPES = [torch.float32, torch.float64]


def _median_ms(fn, warmup: int = 10, reps: int = 50) -> float:
    """Median time of ``fn()`` in ms, with CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _copy_ms(nbytes: int, device: torch.device) -> float:
    """Median time of copying ``nbytes / 2`` bytes device to device (``nbytes`` moved in total)."""
    n = max(1, nbytes // 2 // 4)
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return _median_ms(lambda: dst.copy_(src))


def _cases(S: int, G: int, N: int, dtype: torch.dtype, device: torch.device) -> list[tuple[str, object, int]]:
    """``(name, fn, bytes moved)`` for each op on a dopri5 step of state ``[G, N]``."""
    from fastnode.kernels import TritonStepOps
    from fastnode.kernels._launch import tableau_constants

    from fastnode.backends.torch_ops import ControllerConfig, RMSNorm
    from fastnode.solvers import SOLVERS

    tab = SOLVERS["dopri5"].tableau
    if tab.num_stages != S:
        raise ValueError(f"S: dopri5 has {tab.num_stages} stages, got {S}")
    es = torch.finfo(dtype).bits // 8
    gn = G * N * es
    ops = TritonStepOps()
    g = torch.Generator(device=device).manual_seed(0)
    y = torch.randn(G, N, generator=g, device=device, dtype=dtype)
    K = torch.randn(S, G, N, generator=g, device=device, dtype=dtype)
    h = torch.full((G,), 1e-3, device=device, dtype=dtype)
    h_ctl = h.double()
    prev = torch.ones(G, dtype=torch.float64, device=device)
    running = torch.ones(G, dtype=torch.bool, device=device)
    theta = torch.full((G,), 0.5, dtype=torch.float64, device=device)
    cfg = ControllerConfig(order=tab.order)
    norm = RMSNorm()
    tc = tableau_constants(tab, device)
    n_a1 = tc.weights(("a", 1))[0].numel()
    n_a5 = tc.weights(("a", S - 2))[0].numel()
    n_b = tc.weights("b")[0].numel()
    n_d = tc.dense()[1].numel()
    return [
        ("stage_input i=1", lambda: ops.stage_input(tab, 1, y, K, h), (2 + n_a1) * gn),
        (f"stage_input i={S - 2}", lambda: ops.stage_input(tab, S - 2, y, K, h), (2 + n_a5) * gn),
        ("solution", lambda: ops.solution(tab, y, K, h), (2 + n_b) * gn),
        ("finish_control", lambda: ops.finish_control(tab, y, K, h, 1e-5, 1e-7, norm, cfg, h_ctl, prev, running),
         (2 + tc.n_be) * gn),
        ("interpolate", lambda: ops.interpolate(tab, y, K, h, theta), (2 + n_d) * gn),
    ]


def measure(sizes=SIZES, dtypes=DTYPES, device: str = "cuda") -> list[dict]:
    """One record per (op, size, dtype, layout): time, bytes, bandwidth and the copy's bandwidth."""
    dev = torch.device(device)
    rows = []
    for S, B, N in sizes:
        for dtype in dtypes:
            # Per-sample layout [G=B, N] and shared layout [G=1, B*N] move the same bytes through different tiles.
            for layout, G, NN in (("per-sample", B, N), ("shared", 1, B * N)):
                for name, fn, nbytes in _cases(S, G, NN, dtype, dev):
                    t = _median_ms(fn)
                    c = _copy_ms(nbytes, dev)
                    rows.append({"op": name, "S": S, "B": B, "N": N, "layout": layout,
                                 "dtype": str(dtype).removeprefix("torch."), "ms": t, "bytes": nbytes,
                                 "GB/s": nbytes / t / 1e6, "copy GB/s": nbytes / c / 1e6, "of copy": c / t})
                torch.cuda.empty_cache()
    return rows


def to_markdown(rows: list[dict], device_name: str) -> str:
    head = ["op", "[S, B, N]", "layout", "dtype", "time (ms)", "GB/s", "copy GB/s", "of copy"]
    lines = [f"# Kernel bandwidth on {device_name}", "",
             "Bytes moved: each input read once, each output written once; copy: `Tensor.copy_` of half those bytes.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['op']} | [{r['S']}, {r['B']}, {r['N']}] | {r['layout']} | {r['dtype']} | {r['ms']:.4f} | "
                     f"{r['GB/s']:.0f} | {r['copy GB/s']:.0f} | {100 * r['of copy']:.0f}% |")
    return "\n".join(lines) + "\n"


def test_kernel_bandwidth():
    """Small-size check and measurement on CUDA (skipped without one)."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("bench_kernels measures CUDA kernels; no CUDA device")
    from fastnode.backends.torch_ops import TorchStepOps
    from fastnode.solvers import SOLVERS

    tab = SOLVERS["dopri5"].tableau
    for name, fn, _ in _cases(7, 33, 257, torch.float64, torch.device("cuda")):
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        assert torch.isfinite(out).all(), name
    y = torch.randn(33, 257, dtype=torch.float64, device="cuda")
    K = torch.randn(7, 33, 257, dtype=torch.float64, device="cuda")
    h = torch.full((33,), 0.1, dtype=torch.float64, device="cuda")
    from fastnode.kernels import TritonStepOps

    torch.testing.assert_close(TritonStepOps().solution(tab, y, K, h), TorchStepOps().solution(tab, y, list(K), h))
    rows = measure(sizes=[(7, 256, 256)], dtypes=[torch.float32])
    assert all(r["ms"] > 0 for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the Markdown table here (and the records next to it as .json)")
    ap.add_argument("--small", action="store_true", help="only the smaller sizes")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py: no CUDA device; the Triton kernels' bandwidth is measured on a GPU only.")
        return 0
    sizes = SIZES[1:] if args.small else SIZES
    rows = measure(sizes=sizes)
    md = to_markdown(rows, torch.cuda.get_device_name())
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
