"""The StepOps interface: every piece of arithmetic the solver loops do besides calling ``func``.

Shapes: the state is ``y: [G, N]`` where ``G`` is the number of independently controlled groups (1 in shared
mode, the batch size ``B`` in per-sample mode). Times and step sizes are ``[G]`` in the time dtype (float64 by
default); ``h_state`` is the same step in the state dtype. Stages live in a backend-specific stage store ``K``
(``new_stages``/``set_stage``/``stage``). The reference of every op is ``torch_ops.TorchStepOps``; a fast backend
inherits from it and falls back to it, op by op, where its compiled op does not cover a case.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .._options import ControllerConfig
from .._tableau import ButcherTableau

# ``as_named(StepPlan, fields)``: a StepPlan/StepResult/StepEnd from a tuple of its fields (a compiled op's output) in
# one C call; a NamedTuple's own constructor is a Python function. Backends build one of each per step.
as_named = tuple.__new__


class StepPlan(NamedTuple):
    """``step_begin``'s result: a step's set-up for every group."""

    h_ctl: torch.Tensor  # [G] the step clipped to the next stop, 0 where not running (time dtype, no graph)
    h: torch.Tensor  # [G] the stages' step: h_ctl, carrying the output times' graph when they need gradients
    clipped: torch.Tensor  # [G] bool: the step was shortened to land on a stop
    t_new: torch.Tensor  # [G] the time the step reaches
    h_state: torch.Tensor  # [G] h in the state dtype
    t_stage: torch.Tensor  # [S, G] (per-sample) or [S] (shared) every stage's time as func sees it
    t_end_stage: torch.Tensor  # [G] or 0-d: the stages at c = 1 (t_new, the left limit at a jump)


class StepResult(NamedTuple):
    """``finish_control``'s result: the step's solution and the controller's decision."""

    y_new: torch.Tensor  # [G, N]
    ratio: torch.Tensor  # [G] error ratio (time dtype), inf where not finite
    ok: torch.Tensor  # [G] bool: the new state and the last stage are finite
    accept: torch.Tensor  # [G] bool
    h_next: torch.Tensor  # [G] the controller's next step
    prev_ratio: torch.Tensor  # [G] the PI controller's memory


class StepEnd(NamedTuple):
    """``step_end``'s result: what the loop state becomes, and the packet the loop fetches."""

    h: torch.Tensor  # [G] next proposal (a finished group keeps its last one: it seeds the adjoint)
    t: torch.Tensor  # [G] time reached (keeps the output times' graph when they need gradients)
    n_attempted: torch.Tensor  # [G] int64
    n_accepted: torch.Tensor  # [G] int64
    status: torch.Tensor  # [G] int8, fastnode.STATUS_NAMES
    last_nonfinite: torch.Tensor  # [G] bool: the latest rejection came from NaN/inf
    stuck: torch.Tensor  # [G] bool: failed at this step
    crossed: torch.Tensor  # [G] int64 output times passed by the step
    running: torch.Tensor  # [G] bool: still running after the step
    packet: torch.Tensor  # [3] int64: (any running, any stuck, max crossed), the loop's host transfer
    jumped: torch.Tensor | None = None  # [G] bool: landed on a jump_t time (None without jump_t)


class StepOps:
    """The interface of a backend (``name``, capabilities, and one method per op)."""

    name = "abstract"
    supports_autograd = False  # whether gradients flow through the ops (backpropagation through the solver)
    # whether rk_combine, finish_control and interpolate also take a one-group state in another shape than [1, N] (the
    # shape func takes; their solutions keep it, interpolate's M outputs are [M, *shape])
    takes_state_shape = False
    # whether the stage store is a plain list of the stages (``K[i]``, appended in order): the loop then builds it
    # itself, with no call per stage
    stages_are_lists = False
    forced = False  # chosen explicitly by options['backend'] (not by "auto")

    def combiner(self, dtype: torch.dtype) -> Callable:
        """``rk_combine`` for states of ``dtype``, resolved once per solve: a fast backend may hand out its compiled op
        itself, with no Python frame per stage."""
        return self.rk_combine

    def new_stages(self, tableau: ButcherTableau, y: torch.Tensor):
        """An empty stage store for one step of ``tableau`` on ``y: [G, N]``."""
        raise NotImplementedError

    def set_stage(self, K, i: int, k: torch.Tensor):
        """Store stage ``i`` (``k: [G, N]``); returns the store."""
        raise NotImplementedError

    def stage(self, K, i: int) -> torch.Tensor:
        """Stage ``i`` of the store: [G, N]."""
        raise NotImplementedError

    def rk_combine(self, y, K, h, weights) -> torch.Tensor:
        """``y + h * sum_j w_j k_j``: a stage input (``weights = tableau.a[i]``) or the solution (``tableau.b``).

        ``y: [G, N]``, ``K``: the stage store (its first ``len(weights)`` stages are read), ``h: [G]`` (state
        dtype), ``weights``: Python floats (zeros skipped, so a non-finite stage with weight 0 never leaks in).
        Returns [G, N].
        """
        raise NotImplementedError

    def step_error(self, tableau, y, K, h, rtol, atol) -> tuple[torch.Tensor, torch.Tensor]:
        """The new solution and the scaled error before the norm: ``(y_new [G, N], x [G, N])`` with
        ``x = h * sum_j e_j k_j / (atol + rtol * max(|y|, |y_new|))`` (no graph through ``x``)."""
        raise NotImplementedError

    def controller(self, cfg: ControllerConfig, h, ratio, prev_ratio, running):
        """Accept mask [G], next step [G], controller memory [G]; ``ratio`` non-finite means reject."""
        raise NotImplementedError

    def finish_control(self, tableau, y, K, h, rtol, atol, norm: Callable, cfg: ControllerConfig, h_ctl,
                       prev_ratio, running, ratio_floor=None, adjust: Callable | None = None) -> StepResult:
        """A step's whole finish: solution, error ratio, finiteness, accept/reject and the next step size.

        Args:
            y: [G, N] state at the step's start; ``K`` the stage store; ``h``: [G] step (state dtype).
            rtol, atol: floats or [R, N] tensors (R in {1, G}); ``norm``: an ``RMSNorm`` or a callable [G, N] -> [G].
            h_ctl: [G] the same step in the time dtype (0 for groups not running), what the controller scales.
            prev_ratio: [G] controller memory (PI); ``running``: [G] bool.
            ratio_floor: optional [G] lower bound of the error ratio (the adjoint's parameter-error term).
            adjust: optional callable replacing the ratio (a custom adjoint norm).
        """
        raise NotImplementedError

    # Whether ``interpolate`` also takes, with one group (``G = 1``), ``theta: [M]`` and returns the group's dense
    # output at each, ``[M, N]`` (each row as the one-row call with that theta): a step's several output times at once.
    interpolates_many = False

    def interpolate(self, tableau: ButcherTableau, y, K, h, theta) -> torch.Tensor:
        """Dense output at ``t0 + theta * h``: ``y: [G, N]``, ``h``, ``theta``: [G] -> [G, N] (``interpolates_many``:
        also ``G = 1`` with ``theta: [M]`` -> ``[M, N]``)."""
        raise NotImplementedError

    def step_begin(self, t, h, running, t_out, t_end, to_outputs: bool, c, sign: float, state_dtype, squeeze: bool,
                   *, stops=None, end_perturb: int = 0, time_grad: bool = False) -> StepPlan:
        """A step's set-up for every group: clip to the next stop, stage times.

        Args:
            t, h: [G] time and proposed step (time dtype); ``running``: [G] bool.
            t_out: [G, T] increasing output times; ``t_end``: [G]; ``to_outputs``: steps land on every output time
                (else only on ``t_end``).
            c: the tableau's stage times; ``sign``: +1/-1, user time = sign * integration time.
            state_dtype: the dtype of ``h_state`` and the stage times.
            squeeze: shared mode (G = 1): stage times come back as func sees them there, ``[S]`` and 0-d.
            stops: optional [M + 1] sorted ``step_t``/``jump_t`` times ending in ``inf``; steps land on them too.
            end_perturb: -1: the stages at ``c = 1`` see the left limit of ``t_new`` (a jump may sit there).
            time_grad: the output times need gradients: ``StepPlan.h`` and ``t_new`` carry their graph.
        """
        raise NotImplementedError

    def step_end(self, accept, h_next, h, clipped, running, t, t_new, t_end, n_att, n_acc, status, last_nonfinite,
                 new_ok, next_idx, t_out, max_num_steps: int, codes, *, jump_t=None, stop=None, fail=None) -> StepEnd:
        """A step's bookkeeping for every group, after the controller decided.

        Args:
            accept, h_next: [G] the controller's decision and proposal; ``h``: [G] the step proposed before it.
            clipped, running: [G] bool; ``t``, ``t_new``, ``t_end``: [G] times; ``n_att``, ``n_acc``: [G] int64
                attempt/accept counters; ``status``: [G] int8; ``last_nonfinite``, ``new_ok``: [G] bool;
                ``next_idx``: [G] int64 index of the next output time; ``t_out``: [G, T].
            codes: the status codes ``(non_finite, step_underflow, time_overflow, max_steps)``.
            jump_t: optional sorted [J] jump times: ``StepEnd.jumped`` marks the groups that landed on one.
            stop: optional [G] bool, groups that end here (an event fired): not running afterwards.
            fail: optional [G] int8 status codes of failures found outside the op (``fastnode._health``; 0: none):
                a running group with a code fails here with it (stuck, not running afterwards) unless the step
                failed for one of its own reasons.
        """
        raise NotImplementedError

    def initial_step(self, probe: Callable, t0, y0, k0, order: int, rtol, atol, norm: Callable) -> torch.Tensor:
        """The Hairer-Norsett-Wanner starting step (Solving ODEs I, II.4) per group, with no host sync. [G].

        Args:
            probe: ``probe(t [G], y [G, N]) -> [G, N]``, one evaluation of func (no graph).
            t0: [G] start times (time dtype); ``y0``, ``k0``: [G, N] the state and its derivative there.
            order: the method's order; ``rtol``, ``atol``: floats or [R, N] tensors; ``norm``: the error norm.
        """
        raise NotImplementedError

    def adjoint_weights(self, h: torch.Tensor, accept: torch.Tensor, b) -> torch.Tensor:
        """The adjoint's per-sample quadrature weights [S, G]: ``h_g * b_j`` where group g's step was accepted,
        else 0. ``h``: [G]; ``b``: the tableau's [S] solution weights."""
        raise NotImplementedError
