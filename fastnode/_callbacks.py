"""torchdiffeq's step callbacks: methods of ``func`` that the solver calls around each step.

``func.callback_step(t0, y0, dt)`` is called before every step attempt, ``func.callback_accept_step(t0, y0, dt)``
and ``func.callback_reject_step(t0, y0, dt)`` after an adaptive step was accepted or rejected; the ``*_adjoint``
variants are called the same way by ``odeint_adjoint``'s backward solve. ``t0`` and ``y0`` are the step's start
(user time, the state shaped like ``y0``), ``dt`` the step size, positive in the direction of integration (as
torchdiffeq passes it). ``callback_step`` receives the controller's proposal, the others the step actually
taken (shortened to land on an output time, ``step_t`` or ``jump_t``).

Per-sample mode: ``t0`` is ``[B]`` and ``dt`` ``[B]``, one entry per sample; every callback is called once per
iteration of the loop with ``dt`` zero for the samples it does not concern (finished samples for
``callback_step``, samples that did not accept, respectively reject, their step for the other two).

In the adjoint's backward solve ``y0`` is the tuple ``(t_adj, y, adj_y, *adj_params)`` as in torchdiffeq:
``t_adj`` is zero (fastnode integrates no time adjoint), ``y`` and ``adj_y`` are shaped like the state and
``adj_params`` is the parameter adjoint accumulated so far (per-sample mode: without the evaluations still
pending in the deferred quadrature). Fixed-grid methods (and Adams) call only ``callback_step``; ``scipy_solver``
calls none. Defining a callback that the method cannot call warns, as in torchdiffeq.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")
ALL = frozenset(NAMES)
STEP_ONLY = frozenset({"callback_step"})


def callbacks_of(solver) -> frozenset:
    """The callbacks a method calls (torchdiffeq's ``valid_callbacks``): all for the adaptive methods,
    ``callback_step`` for the grid methods, what the registry says otherwise (none for ``scipy_solver``)."""
    return getattr(solver, "step_callbacks", ALL if solver.adaptive else STEP_ONLY)


class StepCallbacks:
    """The callbacks of one solve, called with user-facing arguments.

    Args:
        fns: name (without ``_adjoint``) -> the user's callable, for the callbacks the method calls.
        spec: how the state maps to the flat ``[G, N]`` tensor (the forward's state spec).
        sign: user time = ``sign * tau``.
        aug_params: for the adjoint's backward solve, a function returning the parameter adjoint so far;
            ``None`` for a forward solve.
    """

    def __init__(self, fns: dict, spec, sign: float, aug_params: Callable | None = None):
        self.fns = fns
        self.spec = spec
        self.sign = sign
        self.aug_params = aug_params
        self.decisions = "callback_accept_step" in fns or "callback_reject_step" in fns
        self.n_host_syncs = 0  # shared mode reads each step's decision to call one callback, as torchdiffeq does

    @classmethod
    def find(cls, func, spec, sign: float, valid: frozenset, method: str, adjoint: bool = False,
             aug_params: Callable | None = None) -> StepCallbacks | None:
        """The callbacks ``func`` defines (``valid``: those the method calls); warns about the others."""
        suffix = "_adjoint" if adjoint else ""
        defined = {n: getattr(func, n + suffix) for n in NAMES if callable(getattr(func, n + suffix, None))}
        unsupported = sorted(n + suffix for n in defined if n not in valid)
        if unsupported:
            warnings.warn(f"method {method!r} does not call the callbacks {unsupported}", stacklevel=4)
        fns = {n: f for n, f in defined.items() if n in valid}
        return cls(fns, spec, sign, aug_params) if fns else None

    def _args(self, tau: torch.Tensor, y: torch.Tensor, dt: torch.Tensor):
        spec = self.spec
        t = tau.detach() * self.sign  # time dtype, as torchdiffeq passes its times
        dt = dt.detach()
        if not spec.per_sample:
            t, dt = t.reshape(()), dt.reshape(())
        y = y.detach()
        if self.aug_params is None:
            return t, spec.unflatten(y), dt
        n = sum(spec.sizes)
        zero = torch.zeros((), dtype=y.dtype, device=y.device)
        return t, (zero, spec.unflatten(y[:, :n]), spec.unflatten(y[:, n:]), *self.aug_params()), dt

    def step(self, tau: torch.Tensor, y: torch.Tensor, dt: torch.Tensor) -> None:
        """Before a step attempt from ``tau [G]`` at ``y [G, N]`` with proposal ``dt [G]`` (0 where finished)."""
        fn = self.fns.get("callback_step")
        if fn is not None:
            fn(*self._args(tau, y, dt))

    def take_syncs(self) -> int:
        """The host syncs made since the last call (for the solve's statistics)."""
        n, self.n_host_syncs = self.n_host_syncs, 0
        return n

    def decided(self, tau: torch.Tensor, y: torch.Tensor, dt: torch.Tensor, accept: torch.Tensor,
                running: torch.Tensor) -> None:
        """After the step's decision (``accept [G]``, ``running [G]`` before the step)."""
        if not self.decisions:
            return
        acc = accept & running
        rej = ~accept & running
        if not self.spec.per_sample:
            name = "callback_accept_step" if bool(acc.reshape(())) else (
                "callback_reject_step" if bool(rej.reshape(())) else None)
            self.n_host_syncs += 1
            fn = self.fns.get(name) if name else None
            if fn is not None:
                fn(*self._args(tau, y, dt))
            return
        for name, mask in (("callback_accept_step", acc), ("callback_reject_step", rej)):
            fn = self.fns.get(name)
            if fn is not None:
                fn(*self._args(tau, y, torch.where(mask, dt, torch.zeros_like(dt))))
