"""The option vocabulary: ``options`` dicts checked once and parsed into typed configs.

``odeint``'s ``options`` become an ``AdaptiveConfig`` (controller, first step, step budget, failure mode, stops)
or a ``FixedConfig`` (grid, interpolation, perturbation); the error norm becomes an ``RMSNorm`` (data a fast
backend can fuse) or a wrapped user callable. Every check raises ``TypeError``/``ValueError`` naming the option.
The helpers ``num``, ``flag`` and ``choice`` read one option each and are shared by the package's modules.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ._problem import check_tol, check_tol_pair
from .solvers import get_solver

ADAPTIVE_OPTIONS = {
    "first_step", "safety", "ifactor", "dfactor", "max_num_steps", "step_t", "jump_t", "min_step", "max_step",
    "norm", "dtype", "per_sample", "backend", "on_failure", "controller", "pi_alpha", "pi_beta", "on_stiff",
    "compile", "steps_per_sync",
}
# options['compile']: True means torch.compile's default mode; a string is passed on as torch.compile's mode.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
FIXED_OPTIONS = {"step_size", "grid_constructor", "interp", "perturb", "dtype", "backend", "per_sample"}


# ---- the controller and the error norm ----


@dataclass(frozen=True)
class ControllerConfig:
    """Step-size controller settings (torchdiffeq's I-controller by default)."""

    order: int
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    min_step: float = 0.0
    max_step: float = float("inf")
    kind: str = "i"  # "i" or "pi"
    pi_alpha: float = 0.7  # PI exponents, divided by the order
    pi_beta: float = 0.4

    _floats: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_floats", (float(self.order), self.safety, self.ifactor, self.dfactor, self.min_step,
                                             self.max_step, 1.0 if self.kind == "pi" else 0.0, self.pi_alpha,
                                             self.pi_beta))

    def as_floats(self) -> tuple[float, ...]:
        """The settings in the order the compiled ``finish_control`` ops take them (``fastnode::`` and
        ``fastnode_triton::``): order, safety, ifactor, dfactor, min_step, max_step, is_pi, pi_alpha, pi_beta.
        Made once per config (the fused finish asks every step)."""
        return self._floats


def rms_norm(x: torch.Tensor, segments: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Per-row RMS of ``x: [G, N]``; with ``segments`` the max over segments of each segment's RMS. Returns [G]."""
    if segments is None or len(segments) == 1:
        return x.square().mean(dim=1).sqrt()
    parts = [x[:, s:e].square().mean(dim=1).sqrt() for s, e in segments if e > s]
    return torch.stack(parts, dim=0).amax(dim=0)


class RMSNorm:
    """The solver's built-in error norm as data, so a fast backend can fuse it into the step's finish.

    ``RMSNorm(segments)(x)`` is ``rms_norm(x, segments)``: per row of ``x: [G, N]``, the max over the column
    segments ``[(start, end), ...]`` of each segment's RMS (``None``: one segment, the whole row). A user's norm
    stays a plain callable; backends then compute the scaled error fused and call it.
    """

    __slots__ = ("_bounds", "segments")

    def __init__(self, segments: list[tuple[int, int]] | None = None):
        self.segments = None if segments is None or len(segments) <= 1 else [(int(s), int(e)) for s, e in segments]
        self._bounds = (-1, None)  # (n, bounds(n)): the fused finish asks every step with the same n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.segments)

    def bounds(self, n: int) -> tuple[int, ...]:
        """Flat ``[s0, e0, s1, e1, ...]`` of the non-empty segments of a row of ``n`` columns."""
        if self._bounds[0] != n:
            segs = self.segments or [(0, n)]
            self._bounds = (n, tuple(v for s, e in segs if e > s for v in (s, e)))
        return self._bounds[1]

    def __repr__(self) -> str:
        return f"RMSNorm({self.segments})"


def make_norm(options: dict, spec) -> Callable:
    """The error norm on the flat scaled error ``[G, N] -> [G]`` (``spec``: the ``StateSpec``).

    Default: RMS over the state; for tuple states the max over tensors of each tensor's RMS (torchdiffeq's
    mixed norm). A user ``norm`` receives the error shaped like the state (a tuple for tuple states; with
    the batch dimension in per-sample mode, where it must return ``[B]``).
    """
    user = options.get("norm")
    segments = spec.segments if spec.is_tuple else None
    if user is None:
        return RMSNorm(segments)
    if not callable(user):
        raise TypeError(f"options['norm'] must be callable (norm(error) -> scalar), got {type(user).__name__}")

    def norm(x):
        v = user(spec.unflatten(x))
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
        if v.numel() != spec.batch:
            raise ValueError(f"options['norm'] returned {v.numel()} values, expected "
                             f"{'one per sample (' + str(spec.batch) + ')' if spec.per_sample else 'a scalar'}")
        return v.reshape(spec.batch).abs()

    return norm


# ---- reading one option ----


def num(options: dict, key: str, default, *, lo=None, hi=None, lo_open=False, integer=False):
    """``options[key]`` as a float (or int) in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); ``default`` if absent."""
    v = options.get(key, default)
    if v is None:
        return default
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"options['{key}'] must be a scalar, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"options['{key}'] must be a number, got {type(v).__name__}")
    if math.isnan(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise ValueError(f"options['{key}'] must be in {rng}, got {v}")
    if integer:
        if math.isinf(v):
            return 2**63 - 1  # no limit
        if int(v) != v:
            raise TypeError(f"options['{key}'] must be an integer, got {v}")
        return min(int(v), 2**63 - 1)  # counters are int64: anything larger is no limit as well
    return float(v)


def flag(options: dict, key: str, default: bool) -> bool:
    """``options[key]``, which must be a bool."""
    v = options.get(key, default)
    if not isinstance(v, bool):
        raise TypeError(f"options['{key}'] must be True or False, got {v!r}")
    return v


def choice(options: dict, key: str, default, choices):
    """``options[key]``, which must be one of ``choices``."""
    v = options.get(key, default)
    if v not in choices:
        raise ValueError(f"options['{key}'] must be one of {choices}, got {v!r}")
    return v


def check_options(options, adaptive: bool, method: str, name: str = "options", extra: frozenset = frozenset(),
                  valid: frozenset | None = None) -> dict:
    """A copy of ``options`` after checking every key; ``name`` is the argument named in errors, ``extra`` keys
    that are also valid (``adjoint_options`` takes ``norm`` even for a fixed-grid method), ``valid`` the method's
    own option set where it is neither a Runge-Kutta grid nor an adaptive method (Adams, scipy)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"{name} must be a dict, got {type(options).__name__}")
    if valid is None:
        valid = ADAPTIVE_OPTIONS if adaptive else FIXED_OPTIONS
    valid = valid | extra
    where = "" if name == "options" else f" in {name}"
    for k in options:
        if k not in valid:
            kind = "adaptive" if adaptive else "fixed-grid"
            raise ValueError(f"unknown option {k!r}{where} for the {kind} method {method!r}; valid options: "
                             f"{', '.join(sorted(valid))}")
    return dict(options)


def time_dtype_of(options: dict) -> torch.dtype:
    """``options['dtype']``: the dtype time is kept in (float64 by default)."""
    dt = options.get("dtype", torch.float64)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise TypeError(f"options['dtype'] (the dtype time is kept in) must be a floating torch.dtype, got {dt!r}")
    return dt


def check_times_option(options: dict, key: str, sign: float, time_dtype, device) -> torch.Tensor | None:
    """``options[key]`` (``step_t``/``jump_t``) as sorted integration times [M], or None."""
    v = options.get(key)
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        for x in v:
            if isinstance(x, bool) or not isinstance(x, (numbers.Real, torch.Tensor)):
                raise TypeError(f"options['{key}'] must hold numbers (times), got an element {x!r} of type "
                                f"{type(x).__name__}")
        try:
            v = torch.tensor([float(x) for x in v], dtype=time_dtype)
        except (TypeError, ValueError, RuntimeError) as exc:  # e.g. a tensor element with several values
            raise TypeError(f"options['{key}'] must be a sequence of numbers (times): {exc}") from None
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"options['{key}'] must be a 1-D tensor or sequence of times, got {type(v).__name__}")
    if v.dtype == torch.bool or v.is_complex():
        raise TypeError(f"options['{key}'] must hold real times, got a tensor of dtype {v.dtype}")
    if v.dim() != 1:
        raise ValueError(f"options['{key}'] must be 1-D, got shape {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"options['{key}'] contains NaN or inf")
    v = (v.detach().to(device=device, dtype=time_dtype) * sign)
    return torch.sort(v).values


# ---- solver configs ----


@dataclass(frozen=True)
class AdaptiveConfig:
    """Parsed adaptive-solver options (everything ``solve_adaptive`` takes besides the problem)."""

    ctrl: ControllerConfig
    first_step: float | torch.Tensor | None
    max_num_steps: int
    on_failure: str
    step_t: torch.Tensor | None  # sorted integration times steps land on
    jump_t: torch.Tensor | None  # sorted integration times of discontinuities
    on_stiff: str = "raise"  # "raise", "warn" or "ignore": what a stiffness detection does (fastnode._health)
    compile: str | None = None  # torch.compile mode of the compiled step (fastnode._compiled); None: eager
    steps_per_sync: int | None = None  # compiled steps per host transfer; None: adaptive

    @property
    def has_jumps(self) -> bool:
        return self.jump_t is not None and self.jump_t.numel() > 0

    def stop_grid(self) -> torch.Tensor | None:
        """Every stop (``step_t`` and ``jump_t``) sorted, with ``inf`` appended; None when there are none. [M + 1]."""
        stops = [x for x in (self.step_t, self.jump_t) if x is not None and x.numel()]
        if not stops:
            return None
        grid = torch.cat(stops).sort().values
        return torch.cat([grid, grid.new_full((1,), math.inf)])


_PLAIN = (str, int, float, bool, type(None))


def plain_options_key(options: dict | None) -> tuple | None:
    """A hashable key of ``options`` made only of plain values (numbers, strings, None; ``1`` and ``1.0`` and ``True``
    kept apart), or None when some value is not plain (a tensor, a list, a callable)."""
    if not options:
        return ()
    if not all(type(k) is str and type(v) in _PLAIN for k, v in options.items()):
        return None
    return tuple(sorted((k, type(v), v) for k, v in options.items()))


# Parsed configs of plain options: an AdaptiveConfig is frozen and then holds no tensor, so a training loop's repeated
# call reuses it instead of parsing a dozen options again.
_CONFIGS: dict = {}


def parse_adaptive_options(options: dict, tableau, sign: float, tdt, device) -> AdaptiveConfig:
    """``options`` (already key-checked) -> ``AdaptiveConfig``; ``sign``: the direction of integration."""
    opts = plain_options_key(options)
    if opts is None:
        return _parse_adaptive(options, tableau, sign, tdt, device)
    key = (tableau.order, sign, tdt, device, opts)
    cfg = _CONFIGS.get(key)
    if cfg is None:
        cfg = _parse_adaptive(options, tableau, sign, tdt, device)
        if len(_CONFIGS) >= 256:
            _CONFIGS.clear()
        _CONFIGS[key] = cfg
    return cfg


def _parse_adaptive(options: dict, tableau, sign: float, tdt, device) -> AdaptiveConfig:
    min_step = num(options, "min_step", 0.0, lo=0.0)
    max_step = num(options, "max_step", float("inf"), lo=0.0, lo_open=True)
    if max_step < min_step:
        raise ValueError(f"options['max_step'] ({max_step}) is smaller than options['min_step'] ({min_step})")
    ctrl = ControllerConfig(
        order=tableau.order,
        safety=num(options, "safety", 0.9, lo=0.0, hi=1.0, lo_open=True),
        ifactor=num(options, "ifactor", 10.0, lo=1.0),
        dfactor=num(options, "dfactor", 0.2, lo=0.0, hi=1.0, lo_open=True),
        min_step=min_step,
        max_step=max_step,
        kind=choice(options, "controller", "i", ("i", "pi")),
        pi_alpha=num(options, "pi_alpha", 0.7, lo=0.0),
        pi_beta=num(options, "pi_beta", 0.4, lo=0.0),
    )
    first_step = options.get("first_step")
    if first_step is not None:
        first_step = num(options, "first_step", None, lo=0.0, lo_open=True)
    max_num_steps = num(options, "max_num_steps", 2**31 - 1, lo=1, integer=True)
    on_failure = choice(options, "on_failure", "raise", ("raise", "return"))
    step_t = check_times_option(options, "step_t", sign, tdt, device)
    jump_t = check_times_option(options, "jump_t", sign, tdt, device)
    if step_t is not None and jump_t is not None and step_t.numel() and jump_t.numel():
        common = set(step_t.tolist()) & set(jump_t.tolist())
        if common:
            raise ValueError(f"options['step_t'] and options['jump_t'] both contain the time(s) "
                             f"{sorted(x * sign for x in common)}; a time may be in only one of them")
    on_stiff = choice(options, "on_stiff", "raise", ("raise", "warn", "ignore"))
    mode, per_sync = parse_compile_options(options)
    return AdaptiveConfig(ctrl, first_step, max_num_steps, on_failure, step_t, jump_t, on_stiff, mode, per_sync)


def parse_compile_options(options: dict) -> tuple[str | None, int | None]:
    """``options['compile']`` (False/None, True, or a ``torch.compile`` mode) and ``options['steps_per_sync']``
    (a positive integer, or ``None``/``"auto"`` for the adaptive choice) -> ``(mode or None, k or None)``."""
    v = options.get("compile", False)
    if v is None or v is False:
        mode = None
    elif v is True:
        mode = "default"
    elif isinstance(v, str):
        if v not in COMPILE_MODES:
            raise ValueError(f"options['compile'] must be True, False or one of {COMPILE_MODES}, got {v!r}")
        mode = v
    else:
        raise TypeError(f"options['compile'] must be True, False or a torch.compile mode string, got "
                        f"{type(v).__name__}")
    k = options.get("steps_per_sync")
    if k is None or k == "auto":
        return mode, None
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"options['steps_per_sync'] must be a positive integer or 'auto', got {k!r}")
    if k < 1:
        raise ValueError(f"options['steps_per_sync'] must be a positive integer or 'auto', got {k}")
    if mode is None:
        raise ValueError("options['steps_per_sync'] applies to compiled solves only; set options['compile'] too")
    return mode, int(k)


@dataclass(frozen=True)
class FixedConfig:
    """Parsed fixed-grid options: the grid's source (``step_size`` or ``grid_constructor``, else the output times),
    the interpolation between grid points and the one-sided evaluation at grid points (``perturb``)."""

    step_size: float | None
    grid_constructor: Callable | None
    interp: str
    perturb: bool


def parse_fixed_options(options: dict) -> FixedConfig:
    """``options`` (already key-checked) -> ``FixedConfig``."""
    step_size = options.get("step_size")
    gc = options.get("grid_constructor")
    interp = choice(options, "interp", "linear", ("linear", "cubic"))
    perturb = flag(options, "perturb", False)
    if step_size is not None and gc is not None:
        raise ValueError("options['step_size'] and options['grid_constructor'] are mutually exclusive")
    if step_size is not None:
        step_size = num(options, "step_size", None, lo=0.0, lo_open=True)
    elif gc is not None and not callable(gc):
        raise TypeError(f"options['grid_constructor'] must be callable, got {type(gc).__name__}")
    return FixedConfig(step_size, gc, interp, perturb)


# ---- adjoint options ----


@dataclass
class AdjointConfig:
    """``odeint_adjoint``'s backward solve, checked once when ``odeint_adjoint`` is called.

    ``method``/``solver``: the backward method (``solver.adaptive``, ``solver.tableau``). ``adaptive``: its
    parsed adaptive options in the backward direction (None for a fixed-grid method); ``step_size`` (None: the
    output times are the grid) and ``perturb`` for a fixed-grid one. ``rtol``/``atol``: as ``check_tol`` gives
    them for the state (a float or ``[G, N]``). ``norm``: ``"seminorm"`` (the default), ``"mixed"`` or a callable.
    """

    method: str
    solver: type
    adaptive: AdaptiveConfig | None
    step_size: float | None
    perturb: bool
    time_dtype: torch.dtype
    backend: str
    rtol: torch.Tensor | float
    atol: torch.Tensor | float
    norm: str | Callable
    grid_constructor: Callable | None = None  # fixed-grid backward: called per output interval
    options: dict | None = None  # the checked backward options (Adams and scipy backward solves read them)


def parse_adjoint_options(p, options: dict | None, adjoint_method: str | None, adjoint_options: dict | None,
                          adjoint_rtol, adjoint_atol) -> AdjointConfig:
    """Check ``odeint_adjoint``'s backward arguments against the checked forward call ``p`` (``Problem``).

    Args:
        p: the forward call, as ``prepare`` returns it.
        options: the forward ``options`` as given (``adjoint_options`` default to them, without ``norm``).
        adjoint_method, adjoint_options, adjoint_rtol, adjoint_atol: as given to ``odeint_adjoint``.
    """
    method = p.method if adjoint_method is None else adjoint_method
    solver = get_solver(method)
    opts = _backward_options(p.method, options, method, solver.adaptive, adjoint_options)
    norm = _adjoint_norm(opts.pop("norm", "seminorm"), p.per_sample)
    gc = opts.get("grid_constructor") if not solver.adaptive else None
    if not solver.adaptive:
        if gc is not None and not callable(gc):
            raise TypeError(f"adjoint_options['grid_constructor'] must be callable, got {type(gc).__name__}")
        if gc is not None and opts.get("step_size") is not None:
            raise ValueError("adjoint_options['step_size'] and adjoint_options['grid_constructor'] are mutually "
                             "exclusive")
        if callable(norm):
            raise ValueError(f"adjoint_options['norm'] has no effect with the fixed-grid adjoint_method "
                             f"{method!r} (no error control); leave it out")
    if "per_sample" in opts and flag(opts, "per_sample", False) != p.per_sample:
        raise ValueError(f"adjoint_options['per_sample'] ({opts['per_sample']}) must match "
                         f"options['per_sample'] ({p.per_sample}): the backward solve uses the forward's step mode")
    if adjoint_options is not None and opts.get("on_failure", "raise") != "raise":
        raise ValueError("adjoint_options['on_failure'] must be 'raise': a backward solve that fails has no "
                         "gradient to return")
    opts.pop("per_sample", None)
    opts.pop("on_failure", None)
    tdt = time_dtype_of(opts) if "dtype" in opts else p.tau.dtype
    adaptive, step_size, perturb = None, None, False
    if solver.adaptive:
        adaptive = parse_adaptive_options(opts, solver.tableau, -p.sign, tdt, p.spec.device)
    else:
        if opts.get("step_size") is not None:
            step_size = num(opts, "step_size", None, lo=0.0, lo_open=True)
        perturb = flag(opts, "perturb", False)
    rtol = p.rtol if adjoint_rtol is None else check_tol("adjoint_rtol", adjoint_rtol, p.spec)
    atol = p.atol if adjoint_atol is None else check_tol("adjoint_atol", adjoint_atol, p.spec)
    if solver.adaptive:
        check_tol_pair(rtol, atol, ("adjoint_rtol", "adjoint_atol"))
    return AdjointConfig(method, solver, adaptive, step_size, perturb, tdt, opts.get("backend", "auto"), rtol, atol,
                         norm, gc, opts)


def _backward_options(fwd_method: str, options: dict | None, method: str, adaptive: bool,
                      adjoint_options: dict | None) -> dict:
    """A checked copy of ``adjoint_options``, or of ``options`` without ``norm`` when they are not given."""
    if method != fwd_method and options is not None and adjoint_options is None:
        raise ValueError(f"adjoint_method ({method!r}) differs from method ({fwd_method!r}), so adjoint_options "
                         "cannot be inherited from options; pass adjoint_options as well (e.g. adjoint_options={})")
    if adjoint_options is None:
        return {k: v for k, v in (options or {}).items() if k != "norm"}
    return check_options(adjoint_options, adaptive, method, name="adjoint_options", extra=frozenset({"norm"}),
                         valid=getattr(get_solver(method), "valid_options", None))


def _adjoint_norm(norm, per_sample: bool):
    """``adjoint_options['norm']``: ``"seminorm"`` (the default; ``"default"`` names it too), ``"mixed"``
    (torchdiffeq's default adjoint norm) or a callable; the last two not per sample."""
    if isinstance(norm, str):
        if norm not in ("seminorm", "mixed", "default"):
            raise ValueError(f"adjoint_options['norm'] must be 'seminorm', 'mixed' or a callable, got {norm!r}")
        norm = "seminorm" if norm == "default" else norm
    elif not callable(norm):
        raise TypeError(f"adjoint_options['norm'] must be 'seminorm', 'mixed' or a callable, got "
                        f"{type(norm).__name__}")
    if per_sample and norm != "seminorm":
        raise ValueError(f"adjoint_options['norm'] {'as a callable' if callable(norm) else repr(norm)} is not "
                         "supported with options['per_sample']=True: per-sample error control uses each sample's own "
                         "(y, adj_y) error (a seminorm)")
    return norm
