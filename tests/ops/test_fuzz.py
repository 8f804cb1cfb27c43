"""Every compiled op, called with wrong arguments, raises a Python error: no signal, no out-of-bounds access.

A subprocess (a crash must not take pytest down) calls each ``fastnode::`` and ``fastnode_triton::`` op first with
the known crashers (an empty stage list, a dense-output width whose product with the stage count wraps, stage
indices past the buffer, no output times, an integer state dtype, norm segments outside the row), then with
``CASES_PER_OP`` seeded random mutations of valid arguments (shapes, dtypes, layouts, sizes, counts, indices,
segments, huge and negative integers). A mutation may leave the call valid; then it just runs. The process must
exit normally; a SIGSEGV or SIGBUS shows as a negative return code.
"""

import os
import subprocess
import sys
from pathlib import Path

CASES_PER_OP = 150

SCRIPT = r"""
import random, sys, warnings
import torch
import fastnode
from fastnode import kernels  # registers the fastnode_triton:: ops
from fastnode.backends import ext_ops

warnings.simplefilter("ignore")
F32, F64, I32, I64, B = torch.float32, torch.float64, torch.int32, torch.int64, torch.bool
G, N, S = 3, 5, 7
b = [35/384, 0.0, 500/1113, 125/192, -2187/6784, 11/84, 0.0]
e = [71/57600, 0.0, -71/16695, 71/1920, -17253/339200, 22/525, -1/40]
ctrl = [5.0, 0.9, 10.0, 0.2, 0.0, 1e9, 0.0, 0.35, 0.2]
f64 = lambda *s: torch.rand(*s, dtype=F64)
tout = torch.linspace(0, 1, 4, dtype=F64).expand(G, 4).contiguous()
ext, tri = torch.ops.fastnode, torch.ops.fastnode_triton


def valid():
    y, K, h = f64(G, N), f64(S, G, N), f64(G)
    run = torch.ones(G, dtype=B)
    idx = torch.arange(S, dtype=I32)
    cases = {}
    if ext_ops.available():
        cases.update({
            "ext.rk_combine": (ext.rk_combine, [y, list(K), h, b]),
            "ext.finish_control": (ext.finish_control, [y, list(K), h, b, e, None, 1e-3, None, 1e-6, [0, N], h,
                                                        f64(G), run, None, ctrl]),
            "ext.interpolate": (ext.interpolate, [y, list(K), h, f64(G), [0.1] * (S * 4), 4]),
            "ext.adjoint_weights": (ext.adjoint_weights, [h, run, b]),
            "ext.step_begin": (ext.step_begin, [f64(G), f64(G), run, tout, tout[:, -1].contiguous(), True,
                                                [0.0, 0.2, 0.3, 0.8, 8 / 9, 1.0, 1.0], 1.0, F32, False]),
            "ext.step_end": (ext.step_end, [run, f64(G), f64(G), run, run, f64(G), f64(G) + 0.1,
                                            tout[:, -1].contiguous(), torch.zeros(G, dtype=I64),
                                            torch.zeros(G, dtype=I64), torch.zeros(G, dtype=torch.int8), run, run,
                                            torch.ones(G, dtype=I64), tout, 100, [3, 2, 4, 1]]),
        })
    be_w = torch.tensor(b + e, dtype=F64)
    consts = torch.tensor([1e-3, 1e-6] + ctrl, dtype=F64)
    seg = torch.tensor([0, N], dtype=I64)
    cases.update({
        "triton.rk_combine": (tri.rk_combine, [y, K, h, torch.tensor(b, dtype=F64), idx]),
        "triton.finish_control": (tri.finish_control, [y, K, h, be_w, idx, 0b0111101, 0b1111101, 6, None, None,
                                                       consts, seg, h, f64(G), run, None]),
        "triton.step_error": (tri.step_error, [y, K, h, be_w, idx, 0b0111101, 0b1111101, 6, None, None, consts]),
        "triton.interpolate": (tri.interpolate, [y, K, h, f64(G), f64(S * 4), idx]),
        "triton.step_begin": (tri.step_begin, [f64(G), f64(G), run, tout, tout[:, -1].contiguous(), True,
                                               f64(S), False, F32]),
        "triton.step_end": (tri.step_end, [run, f64(G), f64(G), run, run, f64(G), f64(G) + 0.1,
                                           tout[:, -1].contiguous(), torch.zeros(G, dtype=I64),
                                           torch.zeros(G, dtype=I64), torch.zeros(G, dtype=torch.int8), run, run,
                                           torch.ones(G, dtype=I64), tout, 100,
                                           torch.tensor([3, 2, 4, 1], dtype=torch.int8)]),
    })
    return cases


def known(cases):
    # The crashers found by hand: each must now raise.
    out = []
    def mut(name, i, v):
        if name in cases:
            fn, args = cases[name]
            args = list(args)
            args[i] = v
            out.append((name, fn, args))
    mut("ext.finish_control", 1, [])                       # no stages (the last stage was read at K[S - 1])
    if "ext.finish_control" in cases:
        fn, args = cases["ext.finish_control"]
        out.append(("ext.finish_control", fn, [args[0], [], args[2], [], []] + list(args[5:])))
    if "ext.interpolate" in cases:                          # S * P wraps: 8 * (4 + 2**61) = 32 mod 2**64
        fn, args = cases["ext.interpolate"]
        out.append(("ext.interpolate", fn, [args[0], args[1] + args[1][:1], args[2], args[3], [0.1] * 32,
                                            4 + 2**61]))
    mut("ext.interpolate", 5, -(2**62))
    mut("triton.rk_combine", 4, torch.tensor([0, 2**30], dtype=I32))   # a stage index past the buffer
    mut("triton.rk_combine", 4, torch.tensor([-5, 1], dtype=I32))
    mut("triton.interpolate", 5, torch.tensor([0, 1, 2, 3, 4, 5, 2**30], dtype=I32))
    mut("triton.finish_control", 4, torch.tensor([0, 1, 2, 3, 4, 5, 2**30], dtype=I32))
    mut("triton.step_error", 4, torch.tensor([0, 1, 2, 3, 4, 5, -(2**30)], dtype=I32))
    mut("triton.finish_control", 11, torch.tensor([0, 2**40], dtype=I64))     # a segment past the row
    mut("triton.finish_control", 11, torch.tensor([3, 1], dtype=I64))
    mut("triton.step_begin", 3, torch.empty(G, 0, dtype=F64))                # no output times
    mut("triton.step_begin", 8, torch.int32)                                 # an integer state dtype
    return out


def mutate(x, rng):
    kinds = ["shape", "dtype", "empty", "scalar", "strided", "int", "list", "none", "values"]
    k = rng.choice(kinds)
    if isinstance(x, torch.Tensor):
        if k == "shape":
            return torch.zeros(*[rng.choice([0, 1, 2, 3, 4, 5, 7, 9]) for _ in range(rng.choice([1, 2, 3]))],
                               dtype=x.dtype)
        if k == "dtype":
            return x.to(rng.choice([F32, F64, I32, I64, B, torch.int8, torch.float16]))
        if k == "empty":
            return x.new_empty((0,) + tuple(x.shape[1:]))
        if k == "scalar":
            return x.reshape(-1)[:1].reshape(()) if x.numel() else torch.tensor(0, dtype=x.dtype)
        if k == "strided" and x.dim() >= 1 and x.shape[-1] > 1:
            return x[..., ::2]
        if k == "values" and x.numel():
            if x.dtype.is_floating_point:
                return x * rng.choice([float("nan"), float("inf"), -1.0, 1e300, 0.0])
            if x.dtype != B:
                return torch.randint(-(2**31), 2**31 - 1, x.shape, dtype=I64).to(x.dtype)
        return None
    if isinstance(x, bool):
        return not x
    if isinstance(x, int):
        return rng.choice([-1, 0, 1, 7, 2**31, 2**40, 2**62, -(2**62)])
    if isinstance(x, float):
        return rng.choice([float("nan"), float("inf"), -1.0, 0.0])
    if isinstance(x, list):
        if k == "empty":
            return []
        if k == "list" or not x:
            return x + x
        if isinstance(x[0], torch.Tensor):
            return x[: rng.randrange(len(x))]
        return [rng.choice([2**62, -(2**62), 0, -1, float("nan")]) if isinstance(v, (int, float)) else v for v in x]
    if isinstance(x, torch.dtype):
        return rng.choice([torch.int32, torch.int64, torch.bool, torch.float16, torch.complex64])
    if x is None:
        return torch.zeros(rng.choice([1, 2, 3]), rng.choice([1, 5, 6]), dtype=rng.choice([F32, F64]))
    return None


def call(fn, args):
    try:
        fn(*args)
        return "ran"
    except Exception:  # any Python error is the contract; a crash never gets here
        return "raised"


cases = valid()
stats = {"ran": 0, "raised": 0}
for name, fn, args in known(cases):
    res = call(fn, args)
    if res != "raised":
        print(f"known crasher accepted: {name}", flush=True)
        sys.exit(3)
    stats[res] += 1
n_known = sum(stats.values())
rng = random.Random(int(sys.argv[1]))
per_op = int(sys.argv[2])
for name, (fn, args) in sorted(cases.items()):
    for _ in range(per_op):
        a = list(args)
        for _ in range(rng.choice([1, 1, 2])):
            i = rng.randrange(len(a))
            m = mutate(a[i], rng)
            if m is not None or a[i] is not None:
                a[i] = m
        stats[call(fn, a)] += 1
print(f"ops {len(cases)} known {n_known} cases {sum(stats.values())} raised {stats['raised']} ran {stats['ran']}")
"""


def test_wrong_arguments_raise_and_never_crash():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", SCRIPT, "0", str(CASES_PER_OP)], check=False, capture_output=True,
                         text=True, timeout=900, env=env, cwd=Path(__file__).resolve().parents[2])
    why = f"exit {res.returncode} (negative: killed by a signal)\n{res.stdout}\n{res.stderr[-3000:]}"
    assert res.returncode == 0, why
    line = res.stdout.strip().splitlines()[-1]
    counts = dict(zip(line.split()[::2], map(int, line.split()[1::2])))
    assert counts["ops"] >= 6 and counts["known"] >= 9
    assert counts["cases"] == counts["known"] + counts["ops"] * CASES_PER_OP
    assert counts["raised"] > counts["cases"] // 2  # most mutations are wrong arguments, and they were caught
