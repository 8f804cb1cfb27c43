"""Validation of user input and its normalisation into the solver's flat ``[G, N]`` form.

Every check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (wrong value) naming the argument;
nothing here uses ``assert``. The checks that look at tensor values (NaN in ``y0``, monotone ``t``) cost a
device-to-host transfer each, once per call, before the loop starts.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class StateSpec:
    """How the user's state maps onto the flat ``[G, N]`` tensor."""

    is_tuple: bool
    shapes: list  # per tensor, the full user shape
    per_sample: bool
    batch: int  # G
    sizes: list  # per tensor, flattened size per group
    dtype: torch.dtype  # the real dtype: a complex tensor is carried as its real view (re, im pairs)
    device: torch.device
    cplx: tuple = ()  # per tensor: complex (its flat part holds 2 reals per entry); empty when none is

    def _is_cplx(self, i: int) -> bool:
        return bool(self.cplx) and self.cplx[i]

    # The dtype the solver integrates in: float16/bfloat16 states are integrated in float32 (stage sums, solution,
    # error estimate, finiteness), func sees and returns ``dtype``. ``odeint_adjoint`` keeps ``dtype``.
    work_dtype: torch.dtype | None = None

    @property
    def work(self) -> torch.dtype:
        return self.dtype if self.work_dtype is None else self.work_dtype

    @property
    def is_empty(self) -> bool:
        """The state has no elements (a zero-size tensor, or a tuple of them)."""
        return self.batch * sum(self.sizes) == 0

    @functools.cached_property
    def segments(self) -> list[tuple[int, int]]:
        out, start = [], 0
        for n in self.sizes:
            out.append((start, start + n))
            start += n
        return out

    def flatten(self, value, what: str) -> torch.Tensor:
        """User-shaped tensor(s) -> [G, N]; ``what`` names the source in errors."""
        parts = value if self.is_tuple else (value,)
        if self.is_tuple and not isinstance(value, (tuple, list)):
            raise TypeError(f"{what} must return a tuple of {len(self.shapes)} tensors (like y0), "
                            f"got {type(value).__name__}")
        if len(parts) != len(self.shapes):
            raise ValueError(f"{what} returned {len(parts)} tensors, expected {len(self.shapes)} (like y0)")
        flat = []
        for i, (p, shape) in enumerate(zip(parts, self.shapes)):
            name = f"{what}[{i}]" if self.is_tuple else what
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
            if tuple(p.shape) != tuple(shape):
                raise ValueError(f"{name} has shape {tuple(p.shape)}, expected {tuple(shape)} (the shape of y0)")
            want = _complex_of(self.dtype) if self._is_cplx(i) else self.dtype
            if p.dtype != want:
                raise TypeError(f"{name} has dtype {p.dtype}, expected {want} (the dtype of y0)")
            if p.device != self.device:
                raise ValueError(f"{name} is on {p.device}, expected {self.device} (the device of y0)")
            if self._is_cplx(i):
                p = torch.view_as_real(p.resolve_conj())
            flat.append(p if p.dim() == 2 and p.shape[0] == self.batch else p.reshape(self.batch, -1))
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)

    def unflatten(self, y: torch.Tensor, lead: Sequence[int] = ()):
        """[*lead, G, N] -> user-shaped tensor(s) with leading dims ``lead``."""
        lead = tuple(lead)
        if not self.is_tuple and not self.cplx:
            shape = (*lead, *self.shapes[0])
            return y if y.shape == shape else y.reshape(shape)
        out = []
        for i, ((s, e), shape) in enumerate(zip(self.segments, self.shapes)):
            if self._is_cplx(i):
                out.append(torch.view_as_complex(y[..., s:e].reshape((*lead, *shape, 2)).contiguous()))
            else:
                out.append(y[..., s:e].reshape((*lead, *shape)))
        return tuple(out) if self.is_tuple else out[0]


def check_func(func) -> None:
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}")


def check_y0(y0, per_sample: bool) -> StateSpec:
    is_tuple = isinstance(y0, (tuple, list))
    parts = tuple(y0) if is_tuple else (y0,)
    if is_tuple and len(parts) == 0:
        raise ValueError("y0 is an empty tuple; it needs at least one tensor")
    dtype = device = None
    for i, p in enumerate(parts):
        name = f"y0[{i}]" if is_tuple else "y0"
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (or y0 a tuple of tensors), got {type(p).__name__}")
        if not (p.is_floating_point() or p.dtype in (torch.complex64, torch.complex128)):
            raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/float64, or complex64/"
                            f"complex128), got {p.dtype}")
        real = p.real.dtype if p.is_complex() else p.dtype
        if dtype is None:
            dtype, device = real, p.device
        elif real != dtype or p.device != device:
            raise TypeError(f"all tensors of y0 must share (real) dtype and device: y0[0] is {dtype} on {device}, "
                            f"{name} is {p.dtype} on {p.device}")
    if per_sample:
        for i, p in enumerate(parts):
            if p.dim() < 1:
                raise ValueError("options['per_sample']=True needs a batch dimension: y0 (each tensor of a tuple) "
                                 f"must have at least 1 dimension, y0{f'[{i}]' if is_tuple else ''} is 0-d")
        batch = parts[0].shape[0]
        for i, p in enumerate(parts):
            if p.shape[0] != batch:
                raise ValueError(f"per-sample mode: every tensor of y0 needs the same batch size (dim 0); "
                                 f"y0[0] has {batch}, y0[{i}] has {p.shape[0]}")
        if batch == 0:
            raise ValueError("y0 has batch size 0")
        sizes = [(p[0].numel() if p.shape[0] else 0) * (2 if p.is_complex() else 1) for p in parts]
    else:
        batch = 1
        sizes = [p.numel() * (2 if p.is_complex() else 1) for p in parts]
    check_y0_values(parts, is_tuple)
    cplx = tuple(p.is_complex() for p in parts) if any(p.is_complex() for p in parts) else ()
    return StateSpec(is_tuple, [tuple(p.shape) for p in parts], per_sample, batch, sizes, dtype, device, cplx)


def check_y0_values(parts, is_tuple: bool) -> None:
    """Raise if a tensor of y0 holds NaN or inf (naming the first such index)."""
    for i, p in enumerate(parts):
        if p.numel() and not _all_finite(p):
            name = f"y0[{i}]" if is_tuple else "y0"
            bad = (~torch.isfinite(p)).nonzero()[0].tolist()
            raise ValueError(f"{name} contains NaN or inf (first at index {tuple(bad)})")


def _all_finite(p: torch.Tensor) -> bool:
    """Whether every value of ``p`` is finite. A NaN or inf anywhere makes the sum non-finite, so a finite sum proves
    it with one cheap reduction; only a non-finite sum (a bad value, or an overflow of finite ones) is checked value
    by value."""
    if not p.is_complex() and math.isfinite(p.detach().sum().item()):
        return True
    return bool(torch.isfinite(p).all())


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def check_t(t, spec: StateSpec, time_dtype: torch.dtype, event: bool) -> tuple[torch.Tensor, float]:
    """Return ``(tau, sign)``: times in the integration direction (increasing) as [T] or [G, T]."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a 1-D floating torch.Tensor of times, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"t must have a floating dtype (times are kept in {time_dtype}), got {t.dtype}; "
                        "use e.g. torch.tensor([0., 1.])")
    if t.device != spec.device:
        raise ValueError(f"t is on {t.device} but y0 is on {spec.device}; put both on the same device")
    allowed = (1, 2) if spec.per_sample else (1,)
    if t.dim() not in allowed:
        if spec.per_sample:
            raise ValueError(f"t must be 1-D [T] or, per sample, 2-D [B, T]; got shape {tuple(t.shape)}")
        raise ValueError(f"t must be 1-D [T]; got shape {tuple(t.shape)} (per-sample times [B, T] need "
                         "options['per_sample']=True)")
    if t.dim() == 2 and t.shape[0] != spec.batch:
        raise ValueError(f"per-sample t has {t.shape[0]} rows but y0 has batch size {spec.batch}")
    if t.shape[-1] < 1:
        raise ValueError("t must hold at least one time")
    has_nan, has_inf, inc, dec = _t_flags(t)
    if has_nan:
        raise ValueError("t contains NaN")
    if has_inf:
        raise ValueError("t contains inf")
    tt = t.to(torch.promote_types(time_dtype, t.dtype))
    sign = 1.0
    if tt.shape[-1] > 1:
        if not (inc or dec):
            raise ValueError("t must be strictly increasing or strictly decreasing (every row, in the same "
                             "direction); found repeated or out-of-order times")
        sign = 1.0 if inc else -1.0
    if event and tt.shape[-1] != 1:
        # As torchdiffeq: with event_fn only t[0] is used.
        tt = tt[..., :1]
    return (tt if sign > 0 else -tt), sign


# A 1-D CPU ``t`` up to this many times is checked on its values in Python (one copy to a list, then no tensor op):
# the tensor checks cost about 30 us per call, most of it dispatch, and odeint is called once per training step.
_SMALL_T = 64


def _t_flags(t: torch.Tensor) -> tuple[bool, bool, bool, bool]:
    """``(any NaN, any inf, strictly increasing, strictly decreasing)`` of ``t`` ([T] or [B, T], every row), with
    one device-to-host transfer. The comparisons are exact in any floating dtype, so they agree with the time
    dtype's (widening is exact)."""
    if t.ndim == 1 and t.is_cpu and t.shape[0] <= _SMALL_T:
        v = t.tolist()
        finite = all(map(math.isfinite, v))
        return (not finite and any(map(math.isnan, v)), not finite and any(map(math.isinf, v)),
                all(map(operator.lt, v, v[1:])), all(map(operator.gt, v, v[1:])))
    a, b = t[..., :-1], t[..., 1:]
    flags = torch.stack([torch.isnan(t).any(), torch.isinf(t).any(), (b > a).all(), (b < a).all()])
    return tuple(bool(x) for x in flags.tolist())


def _tol_number(x, label: str) -> float:
    """A tolerance given as a number: non-negative, not NaN."""
    if math.isnan(x) or x < 0:
        raise ValueError(f"{label} must be non-negative, got {x}")
    return float(x)


def check_tol(name: str, tol, spec: StateSpec) -> torch.Tensor | float:
    """Scalar tolerance -> float; tensor/tuple tolerance -> broadcastable [G or 1, N] tensor in the state dtype."""
    if type(tol) is float or type(tol) is int:  # the common case, with no further dispatch
        return _tol_number(tol, name)

    def one(x, shape, label):
        if isinstance(x, bool) or not isinstance(x, (numbers.Real, torch.Tensor)):
            raise TypeError(f"{label} must be a non-negative number or tensor, got {type(x).__name__}")
        if isinstance(x, torch.Tensor):
            if x.requires_grad:
                raise ValueError(f"{label} is a tensor that requires grad; tolerances are not differentiable, "
                                 "pass a detached tensor")
            if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
                raise TypeError(f"{label} must be a real tensor, got {x.dtype}")
            if bool(torch.isnan(x).any()) or bool((x < 0).any()):
                raise ValueError(f"{label} must be non-negative and not NaN")
            if x.numel() == 1:
                return float(x.reshape(()).item())
            try:
                xb = torch.broadcast_to(x.to(spec.device, spec.work), shape)
            except RuntimeError:
                raise ValueError(f"{label} has shape {tuple(x.shape)}, which does not broadcast to the state "
                                 f"shape {tuple(shape)}") from None
            return xb
        return _tol_number(x, label)

    if isinstance(tol, (tuple, list)):
        if not spec.is_tuple:
            raise TypeError(f"{name} is a tuple but y0 is a single tensor; pass a number or a tensor")
        if len(tol) != len(spec.shapes):
            raise ValueError(f"{name} has {len(tol)} entries but y0 has {len(spec.shapes)} tensors")
        vals = [one(x, s, f"{name}[{i}]") for i, (x, s) in enumerate(zip(tol, spec.shapes))]
    else:
        vals = [one(tol, s, name) for s in spec.shapes] if spec.is_tuple else [one(tol, spec.shapes[0], name)]
    if all(isinstance(v, float) for v in vals) and len(set(vals)) == 1:
        return vals[0]
    cols = []
    for i, (v, n) in enumerate(zip(vals, spec.sizes)):
        if isinstance(v, float):
            cols.append(torch.full((spec.batch, n), v, dtype=spec.work, device=spec.device))
        else:
            if spec._is_cplx(i):  # one tolerance for the real and imaginary part of each entry
                v = v.unsqueeze(-1).expand(*v.shape, 2)
            cols.append(v.reshape(spec.batch, n))
    return torch.cat(cols, dim=1)


LOW_PRECISION = (torch.float16, torch.bfloat16)


def tolerance_floor(rtol, dtype: torch.dtype):
    """``(rtol, message)``: ``rtol`` raised to ``eps(dtype) / 4`` where it is below (``message`` None if not):
    func's values carry a relative rounding of ``eps / 2``, so a smaller rtol asks for accuracy the error
    estimate cannot see (float32's default ``1e-7`` is above its floor ``3e-8``)."""
    floor = torch.finfo(dtype).eps / 4
    if isinstance(rtol, float):
        if rtol >= floor:
            return rtol, None
        low, new = rtol, floor
    else:
        low = float(rtol.min())
        if low >= floor:
            return rtol, None
        new = rtol.clamp_min(floor)
    name = str(dtype).replace("torch.", "")
    msg = (f"rtol={low:g} is below the resolution of {name} states (eps={torch.finfo(dtype).eps:g}); "
           f"using rtol={floor:g} where it was smaller")
    return new, msg


def check_tol_pair(rtol, atol, names: tuple[str, str] = ("rtol", "atol")) -> None:
    """Raise if some component has ``rtol == atol == 0``: its error test ``|err| <= atol + rtol * |y|`` can never
    pass (any rounding is an error), so the solve could only shrink the step until it underflows."""
    if isinstance(rtol, float) and isinstance(atol, float):
        both = rtol == 0.0 and atol == 0.0
    else:
        r = rtol if isinstance(rtol, torch.Tensor) else torch.tensor(rtol)
        a = atol if isinstance(atol, torch.Tensor) else torch.tensor(atol)
        both = bool(((r.to(a.device) == 0) & (a == 0)).any())
    if both:
        raise ValueError(f"{names[0]} and {names[1]} are both 0 (for some component of the state): no step can meet "
                         "an error tolerance of 0; give a positive rtol or atol")


class FlatFunc:
    """``func`` seen by the solver: flat ``[G, N]`` state, integration time ``tau`` (``t = sign * tau``).

    Counts evaluations and validates every output (type, shape, dtype) so a wrong ``func`` fails with a
    clear message at its first call.
    """

    callbacks = None  # fastnode._callbacks.StepCallbacks when func defines torchdiffeq's step callbacks

    def __init__(self, func: Callable, spec: StateSpec, sign: float):
        self.func = func
        self.spec = spec
        self.sign = sign
        self.nfe = 0
        # Fast path for the common single-tensor state: an output of exactly y0's shape and dtype is viewed
        # as [G, N] with no further checks (anything else goes through spec.flatten and its clear errors).
        self._shape = None if spec.is_tuple else torch.Size(spec.shapes[0])
        self._plain = not spec.is_tuple and not spec.cplx  # func sees a view of the flat state (no unflatten call)
        # ``shape``: func's shape of a state that a solve may keep as it is (one real tensor, not widened, not 0-d, not
        # [1, N] already), else None. ``shaped``: the current solve keeps it so (``solve_adaptive``), and func's
        # output is then returned in its own shape, not viewed as [G, N].
        self.shape = (self._shape if self._plain and spec.work == spec.dtype and not spec.per_sample
                      and len(self._shape) >= 1 and not (len(self._shape) == 2 and self._shape[0] == 1) else None)
        self.shaped = False
        self._flat = (spec.batch, spec.sizes[0]) if not spec.is_tuple else None
        self._device = spec.device
        self._wide = spec.work if spec.work != spec.dtype else None

    def user_time(self, tau: torch.Tensor, perturb: int = 0) -> torch.Tensor:
        """tau: [..., G] -> what func receives: [...] (shared) or [..., B] (per-sample), in the state dtype.

        The loop converts all stage times of a step in one call and indexes the result per stage.
        """
        t = tau.to(self.spec.dtype)
        if self.sign < 0:
            t = -t
        if perturb:
            # One-sided evaluation at a discontinuity: the next representable time in the direction
            # perturb * (integration direction), in the dtype func sees.
            t = torch.nextafter(t, torch.full_like(t, perturb * self.sign * math.inf))
        return t if self.spec.per_sample else t.squeeze(-1)

    def __call__(self, tau: torch.Tensor, y: torch.Tensor, perturb: int = 0, t_user=None) -> torch.Tensor:
        """``tau: [G]`` integration time, or ``t_user`` already converted by ``user_time``."""
        self.nfe += 1
        if t_user is None:
            t_user = self.user_time(tau, perturb)
        if self._wide is not None:
            y = y.to(self.spec.dtype)
        if self._plain:
            out = self.func(t_user, y if y.shape == self._shape else y.reshape(self._shape))
        else:
            out = self.func(t_user, self.spec.unflatten(y))
        if (type(out) is torch.Tensor and out.shape == self._shape and out.dtype == self.spec.dtype
                and out.device == self._device):
            if self.shaped:
                flat = out
            else:
                flat = out.view(self._flat) if out.is_contiguous() else out.reshape(self._flat)
        else:
            flat = self.spec.flatten(out, "func")
            if self.shaped:
                flat = flat.reshape(self._shape)
        if self._wide is not None:
            flat = flat.to(self._wide)
        return flat if self.sign > 0 else -flat

    def probe(self, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """An evaluation that is not a stage of any step (the initial-step probe), shaped as ``y`` ([G, N])."""
        out = self(tau, y)
        return out if out.shape == y.shape else out.reshape(y.shape)
