"""Compiles every kernel for an sm_90 (H100) target with Triton's own compiler and ptxas; no GPU needed.

Triton's interpreter accepts code the compiler rejects (and runs float64 math the compiler lowers differently), so
the CPU tests alone would not catch a kernel that fails to build on a GPU. Run as a module in a process where
``TRITON_INTERPRET`` is unset (the kernels must be defined as compiled kernels)::

    python -m tests.backends.compile_sm90

Prints one line per kernel and exits non-zero on the first failure.
"""

from __future__ import annotations

import sys


def signatures() -> list:
    """``(kernel, signature, constexprs)`` for each kernel in the specialisations the solver uses most."""
    from fastnode.kernels.finish_control import _control_kernel, _step_error_kernel
    from fastnode.kernels.interpolate import _interpolate_kernel
    from fastnode.kernels.rk_combine import _rk_combine_kernel

    out = []
    for dt in ("fp32", "fp64"):
        p = "*" + dt
        dims = {"G": "i32", "N": "i32", "stride_s": "i32"}
        out.append((_rk_combine_kernel,
                    {"y_ptr": p, "k_ptr": p, "h_ptr": p, "w_ptr": "*fp64", "idx_ptr": "*i32", "out_ptr": p, **dims,
                     "NW": "constexpr", "BLOCK_G": "constexpr", "BLOCK_N": "constexpr"},
                    {"NW": 5, "BLOCK_G": 2, "BLOCK_N": 1024}))
        finish_sig = {"y_ptr": p, "k_ptr": p, "h_ptr": p, "w_ptr": "*fp64", "idx_ptr": "*i32", "rtol_ptr": p,
                      "atol_ptr": p, "consts_ptr": "*fp64", "seg_ptr": "*i64", "ynew_ptr": p, "x_ptr": p,
                      "part_ptr": "*fp64",
                      "fin_ptr": "*u8", **dims, "rtol_rs": "i32", "atol_rs": "i32", "s_last": "i32",
                      **{k: "constexpr" for k in ("U", "BMASK", "EMASK", "LAST", "NSEG", "RTOL_T", "ATOL_T",
                                                  "WRITE_X", "BLOCK_G", "BLOCK_N")}}
        # dopri5 (last stage among the weighted ones) and dopri8 (last stage read apart), tensor tolerances.
        out.append((_step_error_kernel, finish_sig, {"U": 6, "BMASK": 0b11111, "EMASK": 0b111111, "LAST": 5,
                                                      "NSEG": 2, "RTOL_T": False, "ATOL_T": True,
                                                      "WRITE_X": False, "BLOCK_G": 2, "BLOCK_N": 1024}))
        out.append((_step_error_kernel, finish_sig, {"U": 9, "BMASK": 0b111111111, "EMASK": 0b111111111,
                                                      "LAST": -1, "NSEG": 1, "RTOL_T": True, "ATOL_T": False,
                                                      "WRITE_X": False, "BLOCK_G": 1024, "BLOCK_N": 2}))
        # step_error (a user norm): the scaled error written out, no partial sums
        out.append((_step_error_kernel, finish_sig, {"U": 7, "BMASK": 0b111111, "EMASK": 0b1111111, "LAST": 6,
                                                      "NSEG": 0, "RTOL_T": False, "ATOL_T": False,
                                                      "WRITE_X": True, "BLOCK_G": 2, "BLOCK_N": 1024}))
        out.append((_interpolate_kernel,
                    {"y_ptr": p, "k_ptr": p, "h_ptr": p, "th_ptr": p, "d_ptr": "*fp64", "idx_ptr": "*i32",
                     "out_ptr": p, **dims, "NU": "constexpr", "P": "constexpr", "BLOCK_G": "constexpr",
                     "BLOCK_N": "constexpr"},
                    {"NU": 6, "P": 4, "BLOCK_G": 2, "BLOCK_N": 1024}))
    control_sig = {k: "*fp64" for k in ("part_ptr", "consts_ptr", "hctl_ptr", "prev_ptr", "floor_ptr", "ratio_ptr",
                                        "hnext_ptr", "pout_ptr")}
    control_sig.update({"fin_ptr": "*u8", "seg_ptr": "*i64", "run_ptr": "*u8", "ok_ptr": "*u8", "acc_ptr": "*u8",
                        "G": "i32", "n_cb": "i32", "NSEG": "constexpr", "HAS_FLOOR": "constexpr",
                        "BLOCK": "constexpr", "CBLOCK": "constexpr"})
    order = ["part_ptr", "fin_ptr", "seg_ptr", "consts_ptr", "hctl_ptr", "prev_ptr", "run_ptr", "floor_ptr",
             "ratio_ptr", "ok_ptr", "acc_ptr", "hnext_ptr", "pout_ptr", "G", "n_cb", "NSEG", "HAS_FLOOR", "BLOCK",
             "CBLOCK"]
    from fastnode.kernels.step_begin import _step_begin_kernel
    from fastnode.kernels.step_end import _step_end_kernel

    f64, u8, i64 = "*fp64", "*u8", "*i64"
    begin = {"t_ptr": f64, "h_ptr": f64, "run_ptr": u8, "tout_ptr": f64, "tend_ptr": f64, "c_ptr": f64,
             "hctl_ptr": f64, "clip_ptr": u8, "tnew_ptr": f64, "hs_ptr": "*fp32", "ts_ptr": "*fp32",
             "te_ptr": "*fp32", "G": "i32", "T": "i32", "S": "i32", "TO_OUT": "constexpr", "NEG": "constexpr",
             "LOGT": "constexpr", "BLOCK": "constexpr"}
    out.append((_step_begin_kernel, begin, {"TO_OUT": True, "NEG": True, "LOGT": 4, "BLOCK": 1024}))
    end = {"acc_ptr": u8, "hnext_ptr": f64, "h_ptr": f64, "clip_ptr": u8, "run_ptr": u8, "t_ptr": f64,
           "tnew_ptr": f64, "tend_ptr": f64, "natt_ptr": i64, "nacc_ptr": i64, "status_ptr": "*i8", "lnf_ptr": u8,
           "ok_ptr": u8, "nidx_ptr": i64, "tout_ptr": f64, "codes_ptr": "*i8", "hkeep_ptr": f64, "tfut_ptr": f64,
           "natt_out": i64, "nacc_out": i64, "status_out": "*i8", "lnf_out": u8, "stuck_ptr": u8,
           "crossed_ptr": i64, "rn_ptr": u8, "packet_ptr": i64, "G": "i32", "T": "i32", "max_num_steps": "i32",
           "LOGT": "constexpr", "BLOCK": "constexpr"}
    out.append((_step_end_kernel, end, {"LOGT": 4, "BLOCK": 1024}))
    ctl = {k: control_sig[k] for k in order}
    # per-sample (many groups, few column tiles) and shared (one group, many column tiles)
    out.append((_control_kernel, ctl, {"NSEG": 2, "HAS_FLOOR": True, "BLOCK": 256, "CBLOCK": 4}))
    out.append((_control_kernel, ctl, {"NSEG": 1, "HAS_FLOOR": False, "BLOCK": 1, "CBLOCK": 256}))
    return out


def main() -> int:
    import triton
    from fastnode.kernels import INTERPRETED
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRETED:
        print("TRITON_INTERPRET=1 is set: the kernels are interpreted functions, nothing to compile")
        return 2
    target = GPUTarget("cuda", 90, 32)
    for fn, sig, consts in signatures():
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)
        if not compiled.asm.get("cubin"):
            print(f"{fn.__name__}: no cubin")
            return 1
        print(f"{fn.__name__} {sig.get('y_ptr', '')} {consts}: sm_90 cubin "
              f"{len(compiled.asm['cubin'])} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
