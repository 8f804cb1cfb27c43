"""Bad input to ``odeint`` must fail early with a ``ValueError``/``TypeError`` that names the argument.

Every case builds one ``odeint`` call from a valid baseline (``dy/dt = -y``, ``y0: [3]`` float64,
``t: [5]`` on [0, 1]) with one thing broken, and checks the exception type and that the message matches a
regex naming the argument. ``AssertionError`` is never acceptable (asserts vanish under ``python -O``).
"""

from __future__ import annotations

import ast
import math
import pathlib
import warnings

import numpy as np
import pytest
import torch

import fastnode
from fastnode import last_stats, odeint

F64 = torch.float64


def _decay(t, y):
    return -y


def _y0():
    return torch.ones(3, dtype=F64)


def _t():
    return torch.linspace(0.0, 1.0, 5, dtype=F64)


def _call(**kw):
    """``odeint`` on the valid baseline with the entries of ``kw`` replaced."""
    func = kw.pop("func", _decay)
    y0 = kw.pop("y0", None)
    y0 = _y0() if y0 is None else y0
    t = kw.pop("t", None)
    t = _t() if t is None else t
    return odeint(func, y0, t, **kw)


def _tuple_y0():
    return (torch.ones(3, dtype=F64), torch.ones(2, 2, dtype=F64))


def _tuple_decay(t, y):
    return tuple(-v for v in y)


T_NAME = r"\bt\b"
Y0_NAME = r"\by0\b"
FUNC_NAME = r"\bfunc\b"


PS = {"per_sample": True}


def _opt(name: str) -> str:
    return rf"options\['{name}'\]"


# (id, kwargs for _call, exception type, regex naming the argument)
CASES = [
    # --- func ---
    ("func-not-callable-int", {"func": 3}, TypeError, FUNC_NAME),
    ("func-not-callable-tensor", {"func": torch.ones(3, dtype=F64)}, TypeError, FUNC_NAME),
    # --- t ---
    ("t-list", {"t": [0.0, 0.5, 1.0]}, TypeError, T_NAME),
    ("t-float", {"t": 1.0}, TypeError, T_NAME),
    ("t-numpy", {"t": np.linspace(0.0, 1.0, 3)}, TypeError, T_NAME),
    ("t-int64", {"t": torch.tensor([0, 1, 2])}, TypeError, T_NAME),
    ("t-int32", {"t": torch.tensor([0, 1, 2], dtype=torch.int32)}, TypeError, T_NAME),
    ("t-0d", {"t": torch.tensor(1.0, dtype=F64)}, ValueError, T_NAME),
    ("t-2d-shared", {"t": torch.linspace(0, 1, 6, dtype=F64).reshape(2, 3)}, ValueError, T_NAME),
    ("t-empty", {"t": torch.zeros(0, dtype=F64)}, ValueError, T_NAME),
    ("t-repeated", {"t": torch.tensor([0.0, 0.5, 0.5, 1.0], dtype=F64)}, ValueError, T_NAME),
    ("t-repeated-len2", {"t": torch.tensor([0.5, 0.5], dtype=F64)}, ValueError, T_NAME),
    ("t-zigzag", {"t": torch.tensor([0.0, 1.0, 0.5, 2.0], dtype=F64)}, ValueError, T_NAME),
    ("t-zigzag-decreasing-first", {"t": torch.tensor([1.0, 0.0, 0.5], dtype=F64)}, ValueError, T_NAME),
    ("t-nan", {"t": torch.tensor([0.0, math.nan, 1.0], dtype=F64)}, ValueError, T_NAME),
    ("t-nan-first", {"t": torch.tensor([math.nan, 1.0], dtype=F64)}, ValueError, T_NAME),
    ("t-inf", {"t": torch.tensor([0.0, math.inf], dtype=F64)}, ValueError, T_NAME),
    ("t-neg-inf", {"t": torch.tensor([-math.inf, 0.0], dtype=F64)}, ValueError, T_NAME),
    ("t-meta-device", {"t": torch.linspace(0, 1, 5, dtype=F64, device="meta")}, ValueError, T_NAME),
    # more than 64 times: checked by tensor ops, not on the host list
    ("t-long-nan", {"t": torch.linspace(0, 1, 100, dtype=F64).index_fill(0, torch.tensor([70]), math.nan)},
     ValueError, T_NAME),
    ("t-long-inf", {"t": torch.cat([torch.linspace(0, 1, 99, dtype=F64), torch.tensor([math.inf], dtype=F64)])},
     ValueError, T_NAME),
    ("t-long-repeated", {"t": torch.linspace(0, 1, 100, dtype=F64).index_fill(0, torch.tensor([80]), 79 / 99)},
     ValueError, T_NAME),
    ("t-long-f32-zigzag", {"t": torch.linspace(0, 1, 100).flip(0).index_fill(0, torch.tensor([0]), 0.5)},
     ValueError, T_NAME),
    # --- y0 ---
    ("y0-list-of-floats", {"y0": [1.0, 2.0, 3.0]}, TypeError, Y0_NAME),
    ("y0-numpy", {"y0": np.ones(3)}, TypeError, Y0_NAME),
    ("y0-int", {"y0": 1}, TypeError, Y0_NAME),
    ("y0-float", {"y0": 1.0}, TypeError, Y0_NAME),
    ("y0-int64", {"y0": torch.ones(3, dtype=torch.int64)}, TypeError, Y0_NAME),
    ("y0-int32", {"y0": torch.ones(3, dtype=torch.int32)}, TypeError, Y0_NAME),
    ("y0-bool", {"y0": torch.ones(3, dtype=torch.bool)}, TypeError, Y0_NAME),
    ("y0-tuple-non-tensor", {"y0": (torch.ones(3, dtype=F64), 1.0), "func": _tuple_decay}, TypeError, r"y0\[1\]"),
    ("y0-tuple-mixed-dtype",
     {"y0": (torch.ones(3, dtype=F64), torch.ones(3, dtype=torch.float32)), "func": _tuple_decay},
     TypeError, Y0_NAME),
    ("y0-tuple-int-element",
     {"y0": (torch.ones(3, dtype=F64), torch.ones(3, dtype=torch.int64)), "func": _tuple_decay},
     TypeError, r"y0\[1\]"),
    ("y0-empty-tuple", {"y0": ()}, ValueError, Y0_NAME),
    ("y0-nan", {"y0": torch.tensor([1.0, math.nan, 1.0], dtype=F64)}, ValueError, Y0_NAME),
    ("y0-inf", {"y0": torch.tensor([1.0, 1.0, math.inf], dtype=F64)}, ValueError, Y0_NAME),
    ("y0-neg-inf", {"y0": torch.tensor([-math.inf, 1.0, 1.0], dtype=F64)}, ValueError, Y0_NAME),
    ("y0-tuple-nan",
     {"y0": (torch.ones(3, dtype=F64), torch.tensor([1.0, math.nan], dtype=F64)), "func": _tuple_decay},
     ValueError, r"y0\[1\]"),
    # --- func output ---
    ("func-wrong-shape", {"func": lambda t, y: torch.ones(4, dtype=F64)}, ValueError, FUNC_NAME),
    ("func-wrong-shape-broadcastable", {"func": lambda t, y: torch.ones(1, 3, dtype=F64)}, ValueError, FUNC_NAME),
    ("func-wrong-dtype", {"func": lambda t, y: -y.float()}, TypeError, FUNC_NAME),
    ("func-returns-float", {"func": lambda t, y: 1.0}, TypeError, FUNC_NAME),
    ("func-returns-numpy", {"func": lambda t, y: np.ones(3)}, TypeError, FUNC_NAME),
    ("func-returns-list", {"func": lambda t, y: [1.0, 1.0, 1.0]}, TypeError, FUNC_NAME),
    ("func-returns-none", {"func": lambda t, y: None}, TypeError, FUNC_NAME),
    ("func-returns-tuple-for-tensor-state", {"func": lambda t, y: (-y,)}, TypeError, FUNC_NAME),
    ("func-returns-tensor-for-tuple-state", {"y0": _tuple_y0(), "func": lambda t, y: -y[0]}, TypeError, FUNC_NAME),
    ("func-returns-short-tuple", {"y0": _tuple_y0(), "func": lambda t, y: (-y[0],)}, ValueError, FUNC_NAME),
    ("func-returns-long-tuple", {"y0": _tuple_y0(), "func": lambda t, y: (-y[0], -y[1], -y[1])}, ValueError,
     FUNC_NAME),
    ("func-tuple-element-wrong-shape", {"y0": _tuple_y0(), "func": lambda t, y: (-y[0], -y[0])}, ValueError,
     r"func\[1\]"),
    ("func-wrong-shape-fixed-grid", {"func": lambda t, y: torch.ones(4, dtype=F64), "method": "rk4"}, ValueError,
     FUNC_NAME),
    # --- tolerances ---
    ("rtol-negative", {"rtol": -1e-6}, ValueError, r"\brtol\b"),
    ("atol-negative", {"atol": -1e-9}, ValueError, r"\batol\b"),
    ("rtol-nan", {"rtol": math.nan}, ValueError, r"\brtol\b"),
    ("atol-nan", {"atol": float("nan")}, ValueError, r"\batol\b"),
    ("atol-tensor-nan", {"atol": torch.tensor([1e-9, math.nan, 1e-9], dtype=F64)}, ValueError, r"\batol\b"),
    ("rtol-tensor-negative", {"rtol": torch.tensor([1e-6, -1e-6, 1e-6], dtype=F64)}, ValueError, r"\brtol\b"),
    ("atol-requires-grad", {"atol": torch.full((3,), 1e-9, dtype=F64, requires_grad=True)}, ValueError,
     r"\batol\b"),
    ("rtol-scalar-requires-grad", {"rtol": torch.tensor(1e-6, dtype=F64, requires_grad=True)}, ValueError,
     r"\brtol\b"),
    ("atol-bad-shape", {"atol": torch.full((4,), 1e-9, dtype=F64)}, ValueError, r"\batol\b"),
    ("rtol-bad-shape-2d", {"rtol": torch.full((2, 3), 1e-6, dtype=F64)}, ValueError, r"\brtol\b"),
    ("atol-tuple-wrong-length", {"y0": _tuple_y0(), "func": _tuple_decay, "atol": (1e-9, 1e-9, 1e-9)}, ValueError,
     r"\batol\b"),
    ("rtol-tuple-for-tensor-state", {"rtol": (1e-6,)}, TypeError, r"\brtol\b"),
    ("atol-tuple-element-negative", {"y0": _tuple_y0(), "func": _tuple_decay, "atol": (1e-9, -1.0)}, ValueError,
     r"atol\[1\]"),
    ("rtol-string", {"rtol": "1e-6"}, TypeError, r"\brtol\b"),
    ("atol-none", {"atol": None}, TypeError, r"\batol\b"),
    ("atol-bool", {"atol": True}, TypeError, r"\batol\b"),
    # --- method ---
    ("method-unknown", {"method": "rk45x"}, ValueError, r"\bmethod\b"),
    ("method-not-string", {"method": 5}, TypeError, r"\bmethod\b"),
    ("method-callable", {"method": _decay}, TypeError, r"\bmethod\b"),
    # --- options: kind and names ---
    ("options-not-dict-list", {"options": [("safety", 0.9)]}, TypeError, r"\boptions\b"),
    ("options-not-dict-str", {"options": "safety=0.9"}, TypeError, r"\boptions\b"),
    ("option-unknown-adaptive", {"options": {"not_an_option": 1}}, ValueError, r"'not_an_option'"),
    ("option-fixed-only-for-adaptive", {"options": {"step_size": 0.1}}, ValueError, r"'step_size'"),
    ("option-unknown-fixed", {"method": "rk4", "options": {"not_an_option": 1}}, ValueError, r"'not_an_option'"),
    ("option-adaptive-only-for-fixed", {"method": "euler", "options": {"first_step": 0.1}}, ValueError,
     r"'first_step'"),
    # --- options: conflicts ---
    ("step_size-and-grid_constructor",
     {"method": "rk4", "options": {"step_size": 0.1, "grid_constructor": lambda f, y0, t: t}},
     ValueError, r"step_size.*grid_constructor|grid_constructor.*step_size"),
    ("time-in-step_t-and-jump_t", {"options": {"step_t": [0.25, 0.5], "jump_t": [0.5, 0.75]}}, ValueError,
     r"step_t.*jump_t|jump_t.*step_t"),
    ("min_step-above-max_step", {"options": {"min_step": 0.5, "max_step": 0.1}}, ValueError,
     r"min_step.*max_step|max_step.*min_step"),
    # --- options: values ---
    ("safety-zero", {"options": {"safety": 0.0}}, ValueError, _opt("safety")),
    ("safety-above-one", {"options": {"safety": 1.5}}, ValueError, _opt("safety")),
    ("safety-nan", {"options": {"safety": math.nan}}, ValueError, _opt("safety")),
    ("safety-string", {"options": {"safety": "0.9"}}, TypeError, _opt("safety")),
    ("dfactor-zero", {"options": {"dfactor": 0.0}}, ValueError, _opt("dfactor")),
    ("dfactor-negative", {"options": {"dfactor": -0.2}}, ValueError, _opt("dfactor")),
    ("ifactor-below-one", {"options": {"ifactor": 0.5}}, ValueError, _opt("ifactor")),
    ("max_num_steps-zero", {"options": {"max_num_steps": 0}}, ValueError, _opt("max_num_steps")),
    ("max_num_steps-negative", {"options": {"max_num_steps": -5}}, ValueError, _opt("max_num_steps")),
    ("max_num_steps-fractional", {"options": {"max_num_steps": 1.5}}, (ValueError, TypeError),
     _opt("max_num_steps")),
    ("max_num_steps-nan", {"options": {"max_num_steps": math.nan}}, (ValueError, TypeError), _opt("max_num_steps")),
    ("max_num_steps-bool", {"options": {"max_num_steps": True}}, TypeError, _opt("max_num_steps")),
    ("first_step-zero", {"options": {"first_step": 0.0}}, ValueError, _opt("first_step")),
    ("first_step-negative", {"options": {"first_step": -0.1}}, ValueError, _opt("first_step")),
    ("max_step-zero", {"options": {"max_step": 0.0}}, ValueError, _opt("max_step")),
    ("max_step-negative", {"options": {"max_step": -1.0}}, ValueError, _opt("max_step")),
    ("min_step-negative", {"options": {"min_step": -1.0}}, ValueError, _opt("min_step")),
    ("norm-not-callable", {"options": {"norm": "rms"}}, TypeError, _opt("norm")),
    ("dtype-int32", {"options": {"dtype": torch.int32}}, TypeError, _opt("dtype")),
    ("dtype-string", {"options": {"dtype": "float64"}}, TypeError, _opt("dtype")),
    ("dtype-fixed-grid-int64", {"method": "rk4", "options": {"dtype": torch.int64}}, TypeError, _opt("dtype")),
    ("interp-quadratic", {"method": "rk4", "options": {"interp": "quadratic"}}, ValueError, _opt("interp")),
    ("perturb-yes", {"method": "rk4", "options": {"perturb": "yes"}}, TypeError, _opt("perturb")),
    ("per_sample-yes", {"options": {"per_sample": "yes"}}, TypeError, _opt("per_sample")),
    ("per_sample-int", {"options": {"per_sample": 1}}, TypeError, _opt("per_sample")),
    ("per_sample-with-fixed-grid", {"method": "euler", "y0": torch.ones(4, 3, dtype=F64), "options": PS},
     ValueError, r"per_sample"),
    ("on_failure-ignore", {"options": {"on_failure": "ignore"}}, ValueError, _opt("on_failure")),
    ("controller-pid", {"options": {"controller": "pid"}}, ValueError, _opt("controller")),
    ("backend-cuda-magic", {"options": {"backend": "cuda-magic"}}, ValueError, _opt("backend")),
    ("backend-fixed-grid-cuda-magic", {"method": "rk4", "options": {"backend": "cuda-magic"}}, ValueError,
     _opt("backend")),
    ("step_t-string", {"options": {"step_t": "0.5"}}, TypeError, _opt("step_t")),
    ("jump_t-2d", {"options": {"jump_t": torch.ones(2, 2, dtype=F64) * 0.5}}, ValueError, _opt("jump_t")),
    ("jump_t-nan", {"options": {"jump_t": [0.5, math.nan]}}, ValueError, _opt("jump_t")),
    ("step_size-zero", {"method": "rk4", "options": {"step_size": 0.0}}, ValueError, _opt("step_size")),
    ("step_size-negative", {"method": "rk4", "options": {"step_size": -0.1}}, ValueError, _opt("step_size")),
    ("grid_constructor-not-callable", {"method": "rk4", "options": {"grid_constructor": [0.0, 1.0]}}, TypeError,
     _opt("grid_constructor")),
    ("grid-does-not-start-at-t0", {"method": "rk4", "options": {
        "grid_constructor": lambda f, y0, t: torch.linspace(0.1, 1.0, 10, dtype=F64)}}, ValueError,
     _opt("grid_constructor")),
    ("grid-does-not-end-at-t1", {"method": "rk4", "options": {
        "grid_constructor": lambda f, y0, t: torch.linspace(0.0, 0.9, 10, dtype=F64)}}, ValueError,
     _opt("grid_constructor")),
    ("grid-overshoots-t1", {"method": "rk4", "options": {
        "grid_constructor": lambda f, y0, t: torch.linspace(0.0, 1.5, 10, dtype=F64)}}, ValueError,
     _opt("grid_constructor")),
    ("grid-not-monotone", {"method": "rk4", "options": {
        "grid_constructor": lambda f, y0, t: torch.tensor([0.0, 0.6, 0.3, 1.0], dtype=F64)}}, ValueError,
     _opt("grid_constructor")),
    # --- per-sample mode ---
    ("per_sample-y0-0d", {"y0": torch.tensor(1.0, dtype=F64), "options": PS}, ValueError, Y0_NAME),
    ("per_sample-tuple-batch-mismatch",
     {"y0": (torch.ones(4, 2, dtype=F64), torch.ones(5, dtype=F64)), "func": _tuple_decay, "options": PS},
     ValueError, r"y0\[1\]"),
    ("per_sample-t-wrong-rows",
     {"y0": torch.ones(4, 2, dtype=F64), "t": torch.linspace(0, 1, 5, dtype=F64).repeat(3, 1), "options": PS},
     ValueError, T_NAME),
    ("per_sample-t-3d", {"y0": torch.ones(4, 2, dtype=F64), "t": torch.zeros(4, 2, 2, dtype=F64), "options": PS},
     ValueError, T_NAME),
    ("per_sample-t-row-not-monotone",
     {"y0": torch.ones(2, 2, dtype=F64), "t": torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.5, 0.5]], dtype=F64),
      "options": PS},
     ValueError, T_NAME),
    ("per_sample-t-rows-opposite-directions",
     {"y0": torch.ones(2, 2, dtype=F64), "t": torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.5, 0.0]], dtype=F64),
      "options": PS},
     ValueError, T_NAME),
    ("per_sample-norm-returns-scalar",
     {"y0": torch.ones(4, 2, dtype=F64), "options": {"per_sample": True, "norm": lambda e: e.abs().max()}},
     ValueError, _opt("norm")),
    # --- event_fn ---
    ("event_fn-not-callable", {"event_fn": 0.5}, TypeError, r"\bevent_fn\b"),
    ("event_fn-fixed-grid", {"event_fn": lambda t, y: y[0] - 0.5, "method": "rk4"}, ValueError, r"\bevent_fn\b"),
    # Several values are valid (combined as torchdiffeq does: tests/test_dropin.py); none is not.
    ("event_fn-returns-no-value", {"event_fn": lambda t, y: y[:0]}, ValueError, r"\bevent_fn\b"),
    ("event_fn-returns-float", {"event_fn": lambda t, y: 0.5}, TypeError, r"\bevent_fn\b"),
]


@pytest.mark.parametrize("kwargs, exc, pattern", [pytest.param(k, e, p, id=i) for i, k, e, p in CASES])
def test_bad_input_raises_clear_error(kwargs, exc, pattern):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(exc, match=pattern) as info:
            _call(**dict(kwargs))
    assert not isinstance(info.value, AssertionError)
    # Bad input is an error, never (also) a warning.
    assert not [w for w in caught if "option" in str(w.message).lower()], [str(w.message) for w in caught]


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_unknown_option_is_an_error_not_a_warning(method):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would surface as UserWarning, not ValueError
        with pytest.raises(ValueError, match=r"'bogus'"):
            _call(method=method, options={"bogus": 1})


@pytest.mark.parametrize("fn_kind", ["tensor-state", "tuple-state"])
def test_func_errors_raised_before_solving(fn_kind):
    """A wrong func output fails at the first call (no solve attempted on garbage)."""
    calls = []

    def bad(t, y):
        calls.append(t)
        return torch.ones(7, dtype=F64) if fn_kind == "tensor-state" else (y[0],)

    y0 = _y0() if fn_kind == "tensor-state" else _tuple_y0()
    with pytest.raises((ValueError, TypeError), match=FUNC_NAME):
        odeint(bad, y0, _t())
    assert len(calls) == 1


def test_max_num_steps_inf_is_unlimited_or_a_clear_error():
    """``max_num_steps=inf`` may mean "no limit" or be refused, but only with a ValueError/TypeError naming it."""
    try:
        ys = _call(options={"max_num_steps": math.inf})
    except (ValueError, TypeError) as e:
        assert "options['max_num_steps']" in str(e)
    else:
        torch.testing.assert_close(ys[-1], torch.full((3,), math.exp(-1.0), dtype=F64), rtol=1e-6, atol=1e-8)


def test_per_sample_t_wrong_rows_names_both_sizes():
    with pytest.raises(ValueError, match=r"\bt\b") as info:
        odeint(_decay, torch.ones(4, 2, dtype=F64), torch.linspace(0, 1, 5, dtype=F64).repeat(3, 1),
               options={"per_sample": True})
    assert "3" in str(info.value) and "4" in str(info.value)


def test_valid_baseline_runs():
    """The baseline every case breaks must itself be valid (so each failure is due to the one change)."""
    ys = _call()
    assert ys.shape == (5, 3)
    torch.testing.assert_close(ys[-1], torch.full((3,), math.exp(-1.0), dtype=F64), rtol=1e-6, atol=1e-8)
    ys = _call(y0=_tuple_y0(), func=_tuple_decay, atol=(1e-9, 1e-10), rtol=(1e-7, 1e-7))
    assert ys[0].shape == (5, 3) and ys[1].shape == (5, 2, 2)
    _call(method="rk4", options={"grid_constructor": lambda f, y0, t: torch.linspace(0.0, 1.0, 11, dtype=F64)})
    _call(y0=torch.ones(4, 2, dtype=F64), t=torch.linspace(0, 1, 5, dtype=F64).repeat(4, 1),
          options={"per_sample": True})


@pytest.mark.gpu
def test_t_on_other_device():
    y0 = torch.ones(3, dtype=F64, device="cuda")
    with pytest.raises(ValueError, match=T_NAME):
        odeint(_decay, y0, _t())


# ---------------------------------------------------------------------------------------------------------
# No validation through `assert`.
# ---------------------------------------------------------------------------------------------------------

PKG_DIR = pathlib.Path(fastnode.__file__).resolve().parent


def _is_jit_kernel(node) -> bool:
    """Triton ``@triton.jit`` kernels: ``assert`` there is a device assert, not Python input validation."""
    for d in getattr(node, "decorator_list", ()):
        src = ast.unparse(d)
        if "jit" in src or "autotune" in src or "heuristics" in src:
            return True
    return False


def _asserts_in(path: pathlib.Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node, in_kernel):
        in_kernel = in_kernel or (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_jit_kernel(node))
        if isinstance(node, ast.Assert) and not in_kernel:
            found.append(node.lineno)
        # `if __debug__:` blocks vanish under `python -O` just like asserts.
        if isinstance(node, ast.Name) and node.id == "__debug__":
            found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, in_kernel)

    visit(tree, False)
    return found


def test_no_assert_statements_in_package():
    """Asserts (and ``__debug__`` blocks) vanish under ``python -O``: no check in the package may use them.

    A static check over every module of the package (a ``python -O`` subprocess would have to re-import torch
    without cached bytecode: ~10 s, too slow for this file).
    """
    offenders = []
    for path in sorted(PKG_DIR.rglob("*.py")):
        for line in _asserts_in(path):
            offenders.append(f"{path.relative_to(PKG_DIR.parent)}:{line}")
    assert not offenders, "validation must raise ValueError/TypeError, not assert:\n" + "\n".join(offenders)


@pytest.mark.parametrize("T", [5, 100], ids=["host-list", "tensor-ops"])
@pytest.mark.parametrize("decreasing", [False, True], ids=["inc", "dec"])
def test_t_checks_accept_monotone_times_either_way(T, decreasing):
    """Both ways of checking t (a host list up to 64 times, tensor ops beyond) accept strictly monotone times in
    either direction and solve to the closed form."""
    t = torch.linspace(0.0, 1.0, T, dtype=F64)
    t = t.flip(0) if decreasing else t
    ys = odeint(lambda t, y: -y, torch.ones(2, dtype=F64), t, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ys[:, 0], torch.exp(t[0] - t), rtol=1e-7, atol=0)


def test_large_finite_values_are_not_taken_for_non_finite():
    """y0 and func's first value whose sums overflow float32 (each value finite): the cheap finiteness checks (a sum)
    must fall back to the exact ones, not fail the solve."""
    big = torch.tensor([3e38, 3e38], dtype=torch.float32)
    t = torch.tensor([0.0, 1e-30])
    ys = odeint(lambda t, y: torch.full_like(y, 1e38), torch.zeros(4), t)  # a row sum of 4e38
    assert last_stats().status.eq(0).all()
    torch.testing.assert_close(ys[-1], torch.full((4,), 1e8), rtol=1e-6, atol=0)
    ys = odeint(lambda t, y: torch.zeros_like(y), big, t)
    assert torch.equal(ys[-1], big)


def test_repeated_calls_check_what_changed():
    """A call repeating an earlier one's arguments (a training loop's) reuses its checks, but func and y0's values
    are checked every time, a t changed in place or replaced is seen, and each call has its own statistics."""
    t = torch.linspace(0.0, 1.0, 5, dtype=F64)
    y0 = torch.ones(3, dtype=F64)
    a = odeint(lambda t, y: -y, y0, t)
    nfe = last_stats().nfe
    assert torch.equal(odeint(lambda t, y: -y, y0, t), a) and last_stats().nfe == nfe  # its own count
    b = odeint(lambda t, y: -2 * y, y0, t)  # same arguments, another func
    torch.testing.assert_close(a[-1], torch.exp(-t[-1]).expand(3), rtol=1e-6, atol=0)
    torch.testing.assert_close(b[-1], torch.exp(-2 * t[-1]).expand(3), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"y0 contains NaN or inf \(first at index \(1,\)\)"):
        odeint(lambda t, y: -y, torch.tensor([1.0, math.nan, 1.0], dtype=F64), t)
    with pytest.raises(TypeError, match=FUNC_NAME):
        odeint(3, y0, t)
    t.mul_(2.0)  # in place: the new end time is used
    c = odeint(lambda t, y: -y, y0, t)
    torch.testing.assert_close(c[-1], torch.exp(-torch.tensor(2.0, dtype=F64)).expand(3), rtol=1e-6, atol=0)
    t.data = torch.linspace(0.0, 3.0, 5, dtype=F64)  # another storage behind the same tensor
    d = odeint(lambda t, y: -y, y0, t)
    torch.testing.assert_close(d[-1], torch.exp(-torch.tensor(3.0, dtype=F64)).expand(3), rtol=1e-6, atol=0)
    t[1] = 0.0  # not monotone any more: the check runs again
    with pytest.raises(ValueError, match=T_NAME):
        odeint(lambda t, y: -y, y0, t)


def test_repeated_calls_warn_and_free_func():
    """The tolerance floor's warning and message come with every call, and no earlier func is kept alive."""
    import gc
    import weakref

    t = torch.linspace(0.0, 1.0, 3)
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="below the resolution"):
            odeint(lambda t, y: -y, torch.ones(2), t, rtol=1e-12)
        assert any("below the resolution" in m for m in last_stats().messages)

    class Field(torch.nn.Module):
        def forward(self, t, y):
            return -y

    field = Field()
    ref = weakref.ref(field)
    odeint(field, torch.ones(2), t)
    odeint(field, torch.ones(2), t)
    del field
    gc.collect()
    assert ref() is None
