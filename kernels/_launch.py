"""Launch helpers shared by the kernels: tile shapes, argument checks and device-resident constants.

Every kernel works on 2-D tiles ``[BLOCK_G, BLOCK_N]`` of a ``[G, N]`` state (rows are groups, columns the
flattened state), so one layout serves the shared mode (``G = 1``, one long row) and the per-sample mode (``G = B``
rows, often only a few columns each) without wasting lanes on either.

Constants (Butcher coefficients, tolerances, controller settings, norm segments) live in small float64/int64 device
tensors that are built once per (value, device) and cached: a compiled Triton kernel takes a Python float argument
as float32, so passing coefficients as scalars would silently round the float64 arithmetic, and a cached tensor
costs no host-to-device copy after its first use.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import custom_op, triton_op

# Set before the kernels were defined: the kernels then run in Triton's interpreter (CPU tensors, tests).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float32, torch.float64)

# NOTE: on a GPU a tile of 2048 elements (8 warps, 8 per thread: two 16-byte loads of float32) keeps enough
# loads in flight per SM for streaming kernels. In the interpreter every program instance costs about a
# millisecond of Python, so tiles there are as large as the problem allows.
_GPU_TILE = 2048
_GPU_MAX_COLS = 1024
_INTERP_TILE = 1 << 16
_INTERP_MAX_COLS = 1 << 14
# The finish's second kernel adds each row's per-tile partial sums CBLOCK tiles at a time.
_GPU_CBLOCK = 256
_INTERP_CBLOCK = 1 << 12


# Tests set this: fresh outputs then start as NaN (floats) or 2 (flags), so an element a kernel fails to write shows.
POISON = False


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer (poisoned when :data:`POISON` is set)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan") if dtype.is_floating_point else 2)
    return t


def register_op(name: str):
    """Registers an op body with ``torch.library``: ``triton_op`` compiled, ``custom_op`` in the interpreter.

    ``triton_op`` makes the kernels visible to ``torch.compile`` (its body is traced through ``wrap_triton``) and
    registers the body as the fake implementation. In Triton's interpreter ``wrap_triton`` cannot record a kernel, so
    a traced body would lose it: there the op is an opaque ``custom_op`` whose fake implementation is the same body
    (which only allocates its outputs on fake tensors, see :func:`launches`).
    """

    def deco(fn):
        if INTERPRETED:
            op = custom_op(name, mutates_args=())(fn)
            op.register_fake(fn)
        else:
            op = triton_op(name, mutates_args=())(fn)
        op.__doc__ = fn.__doc__  # help() and the doctests see the op's own documentation
        return op

    return deco


def launches(x: torch.Tensor) -> bool:
    """Whether an op body launches its kernels on ``x`` (every op body is also its fake implementation).

    Compiled Triton kernels go through ``torch.library.wrap_triton``, which records them when tracing with fake
    tensors. In Triton's interpreter ``wrap_triton`` hands back the raw kernel, which would run on fake tensors: there
    the fake pass only allocates the outputs.
    """
    return not (INTERPRETED and is_fake(x))


def tiles(G: int, N: int, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_G, BLOCK_N, num_warps)`` for a ``[G, N]`` state on ``device``."""
    tile, max_cols = (_GPU_TILE, _GPU_MAX_COLS) if device.type == "cuda" else (_INTERP_TILE, _INTERP_MAX_COLS)
    block_n = min(triton.next_power_of_2(max(N, 1)), max_cols)
    block_g = max(1, min(triton.next_power_of_2(max(G, 1)), tile // block_n))
    num_warps = 8 if block_g * block_n >= 2048 else 4
    return block_g, block_n, num_warps


def control_tiles(G: int, n_cb: int, device: torch.device) -> tuple[int, int]:
    """``(BLOCK, CBLOCK)``: groups per program and column tiles reduced per iteration in the controller kernel."""
    cblock_max, tile = (_GPU_CBLOCK, 1024) if device.type == "cuda" else (_INTERP_CBLOCK, _INTERP_TILE)
    cblock = min(triton.next_power_of_2(max(n_cb, 1)), cblock_max)
    block = max(1, min(triton.next_power_of_2(max(G, 1)), tile // cblock))
    return block, cblock


# Groups per program (one lane each); the interpreter takes them all in one program.
_GPU_BLOCK = 1024
_INTERP_BLOCK = 1 << 16


def _block(G: int, device: torch.device) -> int:
    return min(triton.next_power_of_2(max(G, 1)), _GPU_BLOCK if device.type == "cuda" else _INTERP_BLOCK)


def _logt(T: int) -> int:
    return max(1, (max(T, 1)).bit_length())  # enough halvings of [0, T)


@triton.jit
def _count_le(tout_ptr, rows64, m, x, T, LOGT: tl.constexpr):
    # Per row: how many of t_out[row, :T] (increasing) are <= x (searchsorted right), by binary search.
    lo = tl.zeros_like(rows64)
    hi = tl.zeros_like(rows64) + T
    for _ in tl.static_range(LOGT):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(tout_ptr + rows64 * T + tl.minimum(mid, T - 1), mask=m & active, other=0.0)
        go = active & (v <= x)
        lo = tl.where(go, mid + 1, lo)
        hi = tl.where(active & ~go, mid, hi)
    return lo


def check_state(y: torch.Tensor, op: str) -> None:
    """``y`` must be a contiguous ``[G, N]`` float32/float64 tensor."""
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise ValueError(f"fastnode_triton.{op}: y must be a [G, N] tensor, got {getattr(y, 'shape', type(y))}")
    if y.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fastnode_triton.{op}: y must be float32 or float64, got {y.dtype}")
    if not y.is_contiguous():
        raise ValueError(f"fastnode_triton.{op}: y must be contiguous")


def check_stages(K: torch.Tensor, y: torch.Tensor, op: str) -> None:
    """``K`` must be a contiguous ``[S, G, N]`` stage buffer like ``y``."""
    if not isinstance(K, torch.Tensor) or K.dim() != 3 or K.shape[1:] != y.shape:
        raise ValueError(f"fastnode_triton.{op}: K must be [S, G, N] with [G, N] = {tuple(y.shape)}, "
                         f"got {tuple(getattr(K, 'shape', ()))}")
    if K.dtype != y.dtype or K.device != y.device or not K.is_contiguous():
        raise ValueError(f"fastnode_triton.{op}: K must be contiguous with y's dtype and device")


def check_backward_stages(K: torch.Tensor, g: torch.Tensor, read: bool, op: str) -> None:
    """A backward op's ``K`` must be an ``[S, G, N]`` buffer like the gradient ``g``; contiguous when it is read."""
    if not isinstance(K, torch.Tensor) or K.dim() != 3 or K.shape[1:] != g.shape or K.dtype != g.dtype:
        raise ValueError(f"fastnode_triton.{op}: K must be [S, G, N] like g {tuple(g.shape)}")
    if read and not K.is_contiguous():
        raise ValueError(f"fastnode_triton.{op}: K must be contiguous")


def check_rows(x: torch.Tensor, G: int, dtype: torch.dtype, name: str, op: str, device: torch.device) -> None:
    """``x`` must be a contiguous ``[G]`` tensor of ``dtype`` on ``device``."""
    if not isinstance(x, torch.Tensor) or x.shape != (G,):
        raise ValueError(f"fastnode_triton.{op}: {name} must be [G] with G = {G}, got {tuple(getattr(x, 'shape', ()))}")
    if x.dtype != dtype or x.device != device or not x.is_contiguous():
        raise ValueError(f"fastnode_triton.{op}: {name} must be a contiguous {dtype} tensor on {device}, "
                         f"got {x.dtype} on {x.device}")


def check_weights(w: torch.Tensor, idx: torch.Tensor, S: int, name: str, op: str, device: torch.device) -> None:
    """``w``: [M] float64 weights of the stages ``idx``: [M] int32 (each in ``[0, S)``), on ``device``."""
    if w.dim() != 1 or idx.shape != w.shape or w.dtype != torch.float64 or idx.dtype != torch.int32:
        raise ValueError(f"fastnode_triton.{op}: {name} weights must be float64 [M] with int32 [M] stage indices")
    if w.device != device or idx.device != device:
        raise ValueError(f"fastnode_triton.{op}: {name} weights must be on {device}")
    if w.shape[0] > S:
        raise ValueError(f"fastnode_triton.{op}: {w.shape[0]} {name} weights for {S} stages")


# Index-valued arguments (stage indices, norm segments) whose values were checked: (data_ptr, numel, stride, version,
# bounds) -> the tensor, kept alive so that its memory cannot be reused by another tensor while the entry stands.
_CHECKED: dict = {}
_CHECKED_MAX = 256


def _checked_once(x: torch.Tensor, bounds: tuple, check) -> None:
    """Runs ``check(values on the host)`` once per tensor contents: the backends pass cached constant tensors, so on
    a GPU the one device-to-host read happens on their first use only. Fake tensors (tracing) are not checked."""
    if x.numel() == 0 or is_fake(x):
        return
    key = (x.data_ptr(), x.numel(), x.stride(), x._version, x.device, bounds)
    if key in _CHECKED:
        return
    check(x.detach().cpu())
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED[key] = x


def check_indices(idx: torch.Tensor, S: int, name: str, op: str) -> None:
    """Every stage index in ``idx`` lies in ``[0, S)`` (a kernel reads stage ``idx[m]`` of the buffer)."""

    def check(v):
        lo, hi = int(v.min()), int(v.max())
        if lo < 0 or hi >= S:
            raise ValueError(f"fastnode_triton.{op}: {name} holds stage indices in [{lo}, {hi}], outside [0, {S})")

    _checked_once(idx, (S,), check)


def check_segments(segments: torch.Tensor, N: int, op: str) -> None:
    """``segments``: a non-empty int64 tensor of (start, end) column pairs with ``0 <= start < end <= N``."""
    if (not isinstance(segments, torch.Tensor) or segments.dim() != 1 or segments.numel() == 0
            or segments.numel() % 2 or segments.dtype != torch.int64):
        raise ValueError(f"fastnode_triton.{op}: segments must be an int64 tensor of (start, end) pairs")

    def check(v):
        pairs = v.view(-1, 2)
        if not bool(((pairs[:, 0] >= 0) & (pairs[:, 0] < pairs[:, 1]) & (pairs[:, 1] <= N)).all()):
            raise ValueError(f"fastnode_triton.{op}: segments must be (start, end) pairs with 0 <= start < end <= "
                             f"N = {N}, got {v.tolist()}")

    _checked_once(segments, (N,), check)


_CONSTS: dict = {}
_CONSTS_MAX = 256


def device_constants(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached device tensor holding ``values`` (built once per values, dtype and device)."""
    key = (values, dtype, device)
    hit = _CONSTS.get(key)
    if hit is None:
        if len(_CONSTS) >= _CONSTS_MAX:  # tolerances swept in a loop: keep the cache bounded
            _CONSTS.clear()
        hit = _CONSTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return hit


class TableauConstants:
    """A tableau's nonzero weights as device tensors: per stage row, solution, error and dense output.

    Zero weights are left out (as the reference skips them: a non-finite stage with weight 0 must not leak in),
    so every weight group is a pair ``(w: [M] float64, idx: [M] int32)``. One float64 and one int32 tensor hold
    all groups; the pairs are views into them (one host-to-device copy per tableau and device).
    """

    def __init__(self, tableau, device: torch.device):
        S = tableau.num_stages
        groups: dict = {}
        flat_w: list[float] = []
        flat_i: list[int] = []

        def add(key, pairs):
            groups[key] = (len(flat_w), len(pairs))
            flat_w.extend(float(w) for _, w in pairs)
            flat_i.extend(int(j) for j, _ in pairs)

        for i in range(S):
            add(("a", i), [(j, w) for j, w in enumerate(tableau.a[i][:i]) if w != 0.0])
        add("b", [(j, w) for j, w in enumerate(tableau.b) if w != 0.0])
        if tableau.e is not None:
            add("e", [(j, w) for j, w in enumerate(tableau.e) if w != 0.0])
        # The finish reads every stage with a nonzero solution or error weight once (see finish_control).
        e = tableau.e if tableau.e is not None else [0.0] * S
        union = [j for j in range(S) if tableau.b[j] != 0.0 or e[j] != 0.0]
        self.be_off = len(flat_w)
        flat_w.extend(float(tableau.b[j]) for j in union)
        flat_w.extend(float(e[j]) for j in union)
        groups["be_idx"] = (len(flat_i), len(union))
        flat_i.extend(union)
        self.n_be = len(union)
        self.b_mask = sum(1 << u for u, j in enumerate(union) if tableau.b[j] != 0.0)
        self.e_mask = sum(1 << u for u, j in enumerate(union) if e[j] != 0.0)
        self.last_pos = union.index(S - 1) if S - 1 in union else -1
        self.P = 0
        if tableau.dense is not None:
            self.P = len(tableau.dense[0])
            used = [j for j in range(S) if any(v != 0.0 for v in tableau.dense[j])]
            self.dense_off = len(flat_w)
            flat_w.extend(float(v) for j in used for v in tableau.dense[j])
            groups["dense_idx"] = (len(flat_i), len(used))
            flat_i.extend(used)
            self.n_dense = len(used)
        self.W = torch.tensor(flat_w, dtype=torch.float64, device=device)
        self.I = torch.tensor(flat_i, dtype=torch.int32, device=device)
        self._groups = groups

    def weights(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w, idx)`` of group ``key``: ``("a", i)``, ``"b"`` or ``"e"``."""
        off, n = self._groups[key]
        return self.W[off : off + n], self.I[off : off + n]

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
        """``(be_w, be_idx, b_mask, e_mask, last_pos)``: the arguments of ``fastnode_triton::finish_control``."""
        off, n = self._groups["be_idx"]
        return (self.W[self.be_off : self.be_off + 2 * n], self.I[off : off + n], self.b_mask, self.e_mask,
                self.last_pos)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d: [U * P] float64, idx: [U] int32)``: the dense-output rows of the ``U`` stages that have one."""
        off, n = self._groups["dense_idx"]
        return self.W[self.dense_off : self.dense_off + n * self.P], self.I[off : off + n]


_TABLEAUS: dict = {}


def tableau_constants(tableau, device: torch.device) -> TableauConstants:
    """The cached :class:`TableauConstants` of ``tableau`` on ``device``."""
    key = (id(tableau), device)
    hit = _TABLEAUS.get(key)
    if hit is None or hit[0] is not tableau:
        hit = _TABLEAUS[key] = (tableau, TableauConstants(tableau, device))
    return hit[1]


@triton.jit
def row_tile(G, N, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's ``[BLOCK_G, BLOCK_N]`` tile of a row-major ``[G, N]`` array, programs ordered row tile major.

    Returns ``(cb, rows, cols, rmask, cmask, mask, offs)``: the column tile's index (for per-column-tile partial
    sums), the tile's row and column indices, their bounds masks, the 2-D mask and the elements' offsets.
    """
    pid = tl.program_id(0)
    n_cb = tl.cdiv(N, BLOCK_N)
    cb = pid % n_cb
    rows = (pid // n_cb) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < G
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    # NOTE: int64 offsets: S * G * N exceeds 2**31 for large batches of large states.
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    return cb, rows, cols, rmask, cmask, mask, offs
