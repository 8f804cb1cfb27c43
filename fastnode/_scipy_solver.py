"""``method="scipy_solver"``: ``scipy.integrate.solve_ivp`` behind the ``odeint`` interface (no gradients).

torchdiffeq 0.2.5's semantics: ``options["solver"]`` names the ``solve_ivp`` method (default ``"LSODA"``;
``"RK45"``, ``"DOP853"``, ``"Radau"``, ``"BDF"``, ...), ``min_step`` and ``max_step`` are passed through, and so
are ``rtol``/``atol``. ``func`` is called under ``torch.no_grad()`` with ``t`` a 0-d tensor and ``y`` shaped like
``y0`` (tuples and complex states as everywhere else); scipy integrates in float64 on the host and the outputs
come back in ``y0``'s dtype and device.

The solution carries no gradient. torchdiffeq returns it silently detached; here, when ``y0``, ``t`` or the
parameters of an ``nn.Module`` ``func`` require grad, the outputs are attached to them through a node whose
backward raises a clear error instead of producing zero or missing gradients. ``odeint_adjoint`` with
``scipy_solver`` does give gradients (its backward solves the augmented system, as torchdiffeq does).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import _stats as st

SCIPY_OPTIONS = frozenset({"solver", "min_step", "max_step"})
_SCIPY_METHODS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")


class _NoGradient(torch.autograd.Function):
    """Identity on the solution whose backward says why there is no gradient."""

    @staticmethod
    def forward(ctx, out, *inputs):
        return out.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("method='scipy_solver' gives no gradients (scipy integrates outside autograd); use a "
                           "torch method (e.g. 'dopri5') or fastnode.odeint_adjoint, or call it under torch.no_grad()")


def _tol(v, name: str, n: int):
    """A float, or a float64 vector over the flat state (tensor tolerances)."""
    if isinstance(v, float):
        return v
    arr = v.detach().reshape(-1).to("cpu", torch.float64).numpy()
    if arr.size != n:
        raise ValueError(f"{name} must have one entry per state component for scipy_solver")
    return arr


def check_scipy_options(options: dict) -> tuple[str, float, float]:
    from ._options import num as _num

    solver = options.get("solver", "LSODA")
    if not isinstance(solver, str) or solver not in _SCIPY_METHODS:
        raise ValueError(f"options['solver'] must be one of {_SCIPY_METHODS} (scipy.integrate.solve_ivp's methods), "
                         f"got {solver!r}")
    min_step = _num(options, "min_step", 0.0, lo=0.0)
    max_step = _num(options, "max_step", float("inf"), lo=0.0, lo_open=True)
    return solver, min_step, max_step


def solve_scipy(p, y0_flat: torch.Tensor, y0_user, t_user) -> torch.Tensor:
    """``[T, 1, N]`` outputs of ``solve_ivp`` on the flat state (``p``: the prepared call)."""
    from scipy.integrate import solve_ivp

    solver, min_step, max_step = check_scipy_options(p.options)
    f, tau, stats = p.f, p.tau, p.stats
    stats.backend = "scipy"
    if tau.numel() == 1:
        out = y0_flat.detach().unsqueeze(0).clone()
    else:
        dev, dt = y0_flat.device, y0_flat.dtype
        tdt = tau.dtype

        def rhs(tt, yy):
            with torch.no_grad():
                tau_t = torch.tensor([tt], dtype=tdt, device=dev)
                y = torch.as_tensor(yy, device=dev).to(dt).reshape(1, -1)
                return f(tau_t, y).reshape(-1).to("cpu", torch.float64).numpy()

        tau_np = tau.detach().to("cpu", torch.float64).numpy()
        n = y0_flat.shape[1]
        # min_step/max_step only when given: solve_ivp warns that min_step does nothing for its RK methods.
        steps = {k: v for k, v in (("min_step", min_step), ("max_step", max_step)) if k in p.options}
        sol = solve_ivp(rhs, (float(tau_np[0]), float(tau_np[-1])), y0_flat.detach().reshape(-1).cpu().double().numpy(),
                        method=solver, t_eval=tau_np, rtol=_tol(p.rtol, "rtol", n), atol=_tol(p.atol, "atol", n),
                        **steps)
        stats.n_host_syncs += sol.nfev + 1
        if sol.status != 0 or sol.y.shape[1] != tau_np.size:
            msg = f"ODE solve failed: scipy.integrate.solve_ivp ({solver}): {sol.message}"
            stats.status = torch.tensor([st.STEP_UNDERFLOW])
            stats.messages.append(msg)
            raise st.SolverError(msg, status=stats.status, samples=[0], times=[float(sol.t[-1]) * f.sign])
        out = torch.from_numpy(np.ascontiguousarray(sol.y.T)).to(device=dev, dtype=dt).unsqueeze(1)
    stats.status = torch.zeros(1, dtype=torch.int64)
    inputs = [x for x in (y0_flat, t_user) if isinstance(x, torch.Tensor) and x.requires_grad]
    if isinstance(p.func, nn.Module):
        inputs += [q for q in p.func.parameters() if q.requires_grad]
    if torch.is_grad_enabled() and inputs:
        out = _NoGradient.apply(out, *inputs)
    return out
