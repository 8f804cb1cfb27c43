"""Time and achieved memory bandwidth of every op, per backend: the ``fastnode::`` C++ ops (``ext``) on CPU (and on
CUDA where the build has them), the ``fastnode_triton::`` ops (``triton``) on CUDA.

Cases are named by op: ``rk_combine`` (a stage input, ``i=1`` and the widest row, and the solution),
``finish_control``, ``step_error`` (Triton), ``interpolate``, ``adjoint_weights`` (C++), ``step_begin`` and
``step_end``. Each op is called directly (``torch.ops.<namespace>.<op>``) with arguments packed once outside the
timed region. The state ops are memory-bound: for them the bytes the op must move (each input read once, each output
written once) give a bandwidth, compared with ``Tensor.copy_`` moving the same bytes on the same device. The
bookkeeping ops (``step_begin``, ``step_end``, ``adjoint_weights``) touch ``[G]`` tensors only: their time is the
figure that matters (launch or call overhead).

Timing: on CUDA, ``reps`` back-to-back calls between one pair of CUDA events (no sync per call), the per-call time
of the median group; on CPU, ``time.perf_counter`` around each call (median). On a GPU only rows moving >= 1 GiB
report a bandwidth (HBM; the smaller sizes fit in L2), against a device-to-device copy of the same bytes.

Run from the repository root::

    python bench/bench_ops.py --out bench/results/<device>/ops.md          # every backend that can run here
    python bench/bench_ops.py --small --reps 5                              # a quick look
    python bench/bench_ops.py --budget 40 --out ...                         # stop after 40 s (make gpu-check)

Under ``pytest bench`` (``make bench``) its test runs every case once at a small size on each backend that can run
here and checks the outputs are finite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# [S, B, N]: S is dopri5's stage count. The first size moves >= 1 GB per op (0.5 GB per [B, N] float32 state), far
# above the H100/H200's 50-60 MB L2: only rows moving >= HBM_BYTES report a bandwidth (HBM); the smaller sizes report
# times (L2-resident, launch-bound: a tall-thin per-sample state).
SIZES = [(7, 16384, 8192), (7, 1024, 1024), (7, 16384, 64)]
SMALL = [(7, 256, 256), (7, 16384, 64)]
HBM_BYTES = 1 << 30
TARGET = 0.85  # each op's bandwidth against a copy of the same bytes
DTYPES = [torch.float32, torch.float64]


def _median_ms(fn, device: torch.device, warmup: int, reps: int, groups: int = 5) -> float:
    """Median time of one ``fn()`` in ms.

    On CUDA: ``reps`` back-to-back calls between one pair of CUDA events, no sync between them (a sync per call
    would time an idle GPU plus the host's dispatch), per-call time of each of ``groups`` such groups, median. On
    CPU: ``time.perf_counter`` around each call, median.
    """
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(groups):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / reps)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


_COPY_MS: dict = {}


def _copy_ms(nbytes: int, device: torch.device, warmup: int, reps: int) -> float:
    """Median time of a device-to-device copy of ``nbytes / 2`` bytes (``nbytes`` moved in total), timed as the ops."""
    key = (nbytes, device, reps)
    if key not in _COPY_MS:
        n = max(1, nbytes // 2 // 4)
        src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        _COPY_MS[key] = _median_ms(lambda: dst.copy_(src), device, warmup, reps)
        del src, dst
    return _COPY_MS[key]


def _ctrl(cfg) -> list[float]:
    return list(cfg.as_floats())


def _inputs(S: int, G: int, N: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    T = 8
    t_out = torch.linspace(0.0, 1.0, T, dtype=torch.float64, device=device).expand(G, T).contiguous()
    return {
        "y": torch.randn(G, N, generator=g, device=device, dtype=dtype),
        "K": torch.randn(S, G, N, generator=g, device=device, dtype=dtype),
        "h": torch.full((G,), 1e-3, device=device, dtype=dtype),
        "h_ctl": torch.full((G,), 1e-3, device=device, dtype=torch.float64),
        "prev": torch.ones(G, dtype=torch.float64, device=device),
        "running": torch.ones(G, dtype=torch.bool, device=device),
        "theta": torch.full((G,), 0.5, dtype=dtype, device=device),
        "t": torch.full((G,), 0.3, dtype=torch.float64, device=device),
        "t_out": t_out,
        "t_end": t_out[:, -1].contiguous(),
        "i64": torch.ones(G, dtype=torch.int64, device=device),
        "i8": torch.zeros(G, dtype=torch.int8, device=device),
    }


def _cases_ext(x: dict, tab, S: int) -> list[tuple[str, object, int]]:
    """``(case, fn, bytes moved or 0)`` for the ``fastnode::`` ops."""
    from fastnode._options import ControllerConfig, RMSNorm

    ops = torch.ops.fastnode
    y, h, running = x["y"], x["h"], x["running"]
    G, N = y.shape
    gn = G * N * y.element_size()
    K = list(x["K"].unbind(0))
    a1, a5 = list(tab.a[1][:1]), list(tab.a[S - 2][: S - 2])
    n_nz = lambda w: sum(1 for v in w if v != 0.0)  # noqa: E731
    ctrl = _ctrl(ControllerConfig(order=tab.order))
    seg = RMSNorm().bounds(N)
    dense = [float(v) for row in tab.dense for v in row]
    P = len(tab.dense[0])
    be = [j for j in range(S) if tab.b[j] != 0.0 or tab.e[j] != 0.0]
    cpu = y.device.type == "cpu"
    out = [
        ("rk_combine i=1", lambda: ops.rk_combine(y, K[:1], h, a1), (2 + n_nz(a1)) * gn),
        (f"rk_combine i={S - 2}", lambda: ops.rk_combine(y, K[: S - 2], h, a5), (2 + n_nz(a5)) * gn),
        ("rk_combine solution", lambda: ops.rk_combine(y, K, h, list(tab.b)), (2 + n_nz(tab.b)) * gn),
        ("finish_control", lambda: ops.finish_control(y, K, h, list(tab.b), list(tab.e), None, 1e-5, None, 1e-7, seg,
                                                      x["h_ctl"], x["prev"], running, None, ctrl),
         (2 + len(be)) * gn),
        ("adjoint_weights", lambda: ops.adjoint_weights(h, running, list(tab.b)), 0),
    ]
    if cpu:  # interpolate, step_begin and step_end are CPU-only in the C++ library
        t, t_out, t_end, i64, i8 = x["t"], x["t_out"], x["t_end"], x["i64"], x["i8"]
        tn = t + 0.01
        out += [
            ("interpolate", lambda: ops.interpolate(y, K, h, x["theta"], dense, P), (2 + S) * gn),
            ("step_begin", lambda: ops.step_begin(t, x["h_ctl"], running, t_out, t_end, True, list(tab.c), 1.0,
                                                  y.dtype, False), 0),
            ("step_end", lambda: ops.step_end(running, x["h_ctl"], x["h_ctl"], ~running, running, t, tn, t_end, i64,
                                              i64, i8, ~running, running, i64, t_out, 10**6, [3, 2, 4, 1]), 0),
        ]
    return out


def _cases_triton(x: dict, tab, S: int) -> list[tuple[str, object, int]]:
    """``(case, fn, bytes moved or 0)`` for the ``fastnode_triton::`` ops."""
    from fastnode.kernels._launch import tableau_constants

    from fastnode._options import ControllerConfig

    ops = torch.ops.fastnode_triton
    y, K, h, running = x["y"], x["K"], x["h"], x["running"]
    dev = y.device
    G, N = y.shape
    gn = G * N * y.element_size()
    tc = tableau_constants(tab, dev)
    w1, w5, wb = tc.weights(("a", 1)), tc.weights(("a", S - 2)), tc.weights("b")
    f64 = torch.float64
    consts = torch.tensor([1e-5, 1e-7, *_ctrl(ControllerConfig(order=tab.order))], dtype=f64, device=dev)
    seg = torch.tensor([0, N], dtype=torch.int64, device=dev)
    c = torch.tensor([float(v) for v in tab.c], dtype=f64, device=dev)
    codes = torch.tensor([3, 2, 4, 1], dtype=torch.int8, device=dev)
    t, t_out, t_end, i64, i8 = x["t"], x["t_out"], x["t_end"], x["i64"], x["i8"]
    tn = t + 0.01
    return [
        ("rk_combine i=1", lambda: ops.rk_combine(y, K, h, *w1), (2 + w1[0].numel()) * gn),
        (f"rk_combine i={S - 2}", lambda: ops.rk_combine(y, K, h, *w5), (2 + w5[0].numel()) * gn),
        ("rk_combine solution", lambda: ops.rk_combine(y, K, h, *wb), (2 + wb[0].numel()) * gn),
        ("finish_control", lambda: ops.finish_control(y, K, h, *tc.finish(), None, None, consts, seg, x["h_ctl"],
                                                      x["prev"], running, None), (2 + tc.n_be) * gn),
        ("step_error", lambda: ops.step_error(y, K, h, *tc.finish(), None, None, consts), (3 + tc.n_be) * gn),
        ("interpolate", lambda: ops.interpolate(y, K, h, x["theta"], *tc.dense()), (2 + tc.n_dense) * gn),
        ("step_begin", lambda: ops.step_begin(t, x["h_ctl"], running, t_out, t_end, True, c, False, y.dtype), 0),
        ("step_end", lambda: ops.step_end(running, x["h_ctl"], x["h_ctl"], ~running, running, t, tn, t_end, i64, i64,
                                          i8, ~running, running, i64, t_out, 10**6, codes), 0),
    ]


def backends_here() -> list[tuple[str, torch.device]]:
    """``(backend, device)`` pairs that can run on this machine: ext on CPU (and CUDA if built), triton on CUDA."""
    from fastnode.backends import ext_ops

    out = []
    if torch.cuda.is_available():  # first: a run cut short by its time budget has the GPU rows
        from fastnode import kernels

        if kernels.unavailable_reason(torch.device("cuda")) is None and not kernels.INTERPRETED:
            out.append(("triton", torch.device("cuda")))
    if ext_ops.available():
        if torch.cuda.is_available() and ext_ops._has_kernel("rk_combine", "CUDA"):
            out.append(("ext", torch.device("cuda")))
        out.append(("ext", torch.device("cpu")))
    return out


def cases(backend: str, S: int, G: int, N: int, dtype: torch.dtype, device: torch.device):
    from fastnode.solvers import SOLVERS

    tab = SOLVERS["dopri5"].tableau
    if tab.num_stages != S:
        raise ValueError(f"S: dopri5 has {tab.num_stages} stages, got {S}")
    x = _inputs(S, G, N, dtype, device)
    return (_cases_ext if backend == "ext" else _cases_triton)(x, tab, S)


def measure(sizes=SIZES, dtypes=DTYPES, pairs=None, warmup: int = 5, reps: int = 30, layouts=("per-sample", "shared"),
            ops=None, budget_s: float | None = None) -> list[dict]:
    """One record per (backend, device, op case, size, dtype, layout): time, and bandwidth against a copy.

    ``budget_s``: stop starting new cases after this many seconds (the rows so far are returned)."""
    rows = []
    t0 = time.monotonic()
    for backend, dev in pairs if pairs is not None else backends_here():
        for S, B, N in sizes:
            for dtype in dtypes:
                # Per-sample [G=B, N] and shared [G=1, B*N] move the same bytes through different tiles.
                for layout, G, NN in (("per-sample", B, N), ("shared", 1, B * N)):
                    if layout not in layouts:
                        continue
                    for name, fn, nbytes in cases(backend, S, G, NN, dtype, dev):
                        if ops is not None and name.split()[0] not in ops:
                            continue
                        if budget_s is not None and time.monotonic() - t0 > budget_s:
                            print(f"bench_ops.py: time budget of {budget_s:.0f} s spent, {len(rows)} rows",
                                  file=sys.stderr)
                            return rows
                        rows.append(_record(backend, dev, name, fn, nbytes, (S, B, N), layout, dtype, warmup, reps))
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
    return rows


def _record(backend, dev, name, fn, nbytes, size, layout, dtype, warmup, reps) -> dict:
    S, B, N = size
    t = _median_ms(fn, dev, warmup, reps)
    row = {"backend": backend, "device": dev.type, "op": name, "S": S, "B": B, "N": N, "layout": layout,
           "dtype": str(dtype).removeprefix("torch."), "ms": t, "bytes": nbytes,
           "hbm": dev.type == "cuda" and nbytes >= HBM_BYTES}
    if nbytes:
        c = _copy_ms(nbytes, dev, warmup, reps)
        row.update({"GB/s": nbytes / t / 1e6, "copy GB/s": nbytes / c / 1e6, "of copy": c / t})
    print(row, file=sys.stderr, flush=True)
    return row


def to_markdown(rows: list[dict], title: str) -> str:
    head = ["backend", "device", "op", "[S, B, N]", "layout", "dtype", "time (ms)", "GB/s", "copy GB/s", "of copy"]
    lines = [f"# Op time and bandwidth: {title}", "",
             "Bytes moved: each input read once, each output written once; copy: `Tensor.copy_` of half those bytes "
             "on the same device, timed the same way. On CUDA: back-to-back calls between one pair of CUDA events "
             f"(no sync per call), median of 5 groups. On a GPU a bandwidth is given only for rows moving >= "
             f"{HBM_BYTES / 2**30:.0f} GiB (HBM, far above L2; target >= {100 * TARGET:.0f}% of the copy); smaller "
             "rows and the bookkeeping ops ([G] tensors only): time only.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        show = r["bytes"] and (r["device"] == "cpu" or r.get("hbm"))
        mark = "" if r["device"] == "cpu" or r["of copy"] >= TARGET else " (below target)" if show else ""
        bw = (f"{r['GB/s']:.1f} | {r['copy GB/s']:.1f} | {100 * r['of copy']:.0f}%{mark}" if show else "- | - | -")
        lines.append(f"| {r['backend']} | {r['device']} | {r['op']} | [{r['S']}, {r['B']}, {r['N']}] | {r['layout']} | "
                     f"{r['dtype']} | {r['ms']:.4f} | {bw} |")
    return "\n".join(lines) + "\n"


def test_every_op_runs():
    """Every case once at a small size on each backend that runs here; outputs finite."""
    pairs = backends_here()
    if not pairs:
        import pytest

        pytest.skip("neither the C++ extension nor CUDA is available")
    names = set()
    for backend, dev in pairs:
        for name, fn, _ in cases(backend, 7, 5, 33, torch.float64, dev):
            out = fn()
            out = out[0] if isinstance(out, tuple) else out
            assert torch.isfinite(out.double()).all(), (backend, name)
            names.add(name.split()[0])
    assert {"rk_combine", "finish_control", "adjoint_weights"} <= names
    rows = measure(sizes=[(7, 8, 16)], dtypes=[torch.float64], pairs=pairs, warmup=1, reps=2)
    assert rows and all(r["ms"] > 0 for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the Markdown table here (and the records next to it as .json)")
    ap.add_argument("--small", action="store_true", help="only the smaller sizes")
    ap.add_argument("--reps", type=int, default=30, help="timed repetitions per case (median)")
    ap.add_argument("--dtype", choices=["float32", "float64"], help="only this state dtype")
    ap.add_argument("--backend", choices=["ext", "triton"], help="only this backend")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="only backends on this device")
    ap.add_argument("--budget", type=float, help="seconds: start no new case after this (the table holds the rest)")
    args = ap.parse_args(argv)
    if args.reps < 1 or (args.budget is not None and args.budget <= 0):
        ap.error("--reps must be >= 1 and --budget > 0")
    pairs = [p for p in backends_here() if args.backend in (None, p[0]) and args.device in (None, p[1].type)]
    if not pairs:
        print("bench_ops.py: no backend runs here (no C++ extension, no CUDA device).")
        return 0
    dtypes = [getattr(torch, args.dtype)] if args.dtype else DTYPES
    rows = measure(sizes=SMALL if args.small else SIZES, dtypes=dtypes, pairs=pairs, reps=args.reps,
                   budget_s=args.budget)
    where = ", ".join(f"{b} on {torch.cuda.get_device_name() if d.type == 'cuda' else 'CPU'}" for b, d in pairs)
    md = to_markdown(rows, f"{where} ({torch.get_num_threads()} CPU threads)")
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)
        args.out.with_suffix(".json").write_text(json.dumps({"backends": where, "torch": torch.__version__,
                                                             "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
