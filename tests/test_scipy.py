"""Nonlinear problems without closed forms, against scipy's DOP853 at tight tolerances (and torchdiffeq's NFE).

Reference: ``solve_ivp(method="DOP853", rtol=1e-12, atol=1e-12)``; re-solving at 1e-13 changes it by
<= 2e-12 relative on these problems, so it is exact at the 1e-6 level checked here.

Bound: fastnode at ``rtol=1e-8, atol=1e-10`` over ``t in [0, 10]`` takes 200-320 accepted steps (dopri5, tsit5)
or 65-105 (dopri8). Each step's estimated local error is <= ``rtol |y|`` and, with local extrapolation, the
propagated solution's is smaller; on these periodic orbits the phase error is not damped, so local errors
add up at worst linearly: ``N * rtol <= 3.2e-6`` relative, and in practice a few times ``rtol`` (measured:
<= 1.1e-7). ``REL_BOUND = 1e-6 = 100 * rtol`` sits between the two.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastnode import last_stats, odeint

from .problems import lotka_volterra, van_der_pol

scipy_integrate = pytest.importorskip("scipy.integrate")

T_END = 10.0
N_OUT = 20
RTOL, ATOL = 1e-8, 1e-10
REL_BOUND = 1e-6

PROBLEMS = {
    "lotka_volterra": (lotka_volterra, {}, [1.0, 1.0]),
    "vdp_mu1": (van_der_pol, {"mu": 1.0}, [2.0, 0.0]),
    "vdp_mu2": (van_der_pol, {"mu": 2.0}, [2.0, 0.0]),
    "vdp_mu5": (van_der_pol, {"mu": 5.0}, [2.0, 0.0]),
}


def _reference(f_np, y0) -> np.ndarray:
    """[N_OUT, 2] DOP853 solution at the output times."""
    t_eval = np.linspace(0.0, T_END, N_OUT)
    sol = scipy_integrate.solve_ivp(f_np, (0.0, T_END), y0, method="DOP853", rtol=1e-12, atol=1e-12, t_eval=t_eval)
    assert sol.success, sol.message
    return sol.y.T


def _times() -> torch.Tensor:
    return torch.tensor(np.linspace(0.0, T_END, N_OUT), dtype=torch.float64)


def _rel_err(ys: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(ys.detach().numpy() - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_against_dop853(name, method):
    make, kw, y0 = PROBLEMS[name]
    f_np, f_torch = make(**kw)
    ref = _reference(f_np, y0)
    ys = odeint(f_torch, torch.tensor(y0, dtype=torch.float64), _times(), rtol=RTOL, atol=ATOL, method=method)
    assert ys.shape == (N_OUT, 2)
    err = _rel_err(ys, ref)
    assert err <= REL_BOUND, f"{method} on {name}: relative error {err:.2e} > {REL_BOUND:.0e}"


@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
def test_per_sample_van_der_pol_batch(method):
    """mu = [1, 2, 5] stacked into one batch; every sample gets its own step size and must match its own
    scipy solution (the stiffest sample, mu = 5, must not degrade the others or be degraded by them)."""
    mus = [1.0, 2.0, 5.0]
    mu_t = torch.tensor(mus, dtype=torch.float64)
    _, f_batch = van_der_pol(mu_t)
    seen_t_shapes = set()

    def func(t, y):
        seen_t_shapes.add(tuple(t.shape))
        return f_batch(t, y)

    y0 = torch.tensor([[2.0, 0.0]] * len(mus), dtype=torch.float64)
    ys = odeint(func, y0, _times(), rtol=RTOL, atol=ATOL, method=method, options={"per_sample": True})
    assert ys.shape == (N_OUT, len(mus), 2)
    assert seen_t_shapes == {(len(mus),)}, f"func saw t of shapes {seen_t_shapes}, expected {{(3,)}}"
    stats = last_stats()
    assert stats.per_sample and stats.success
    n_acc = torch.as_tensor(stats.n_accepted)
    assert n_acc.shape == (len(mus),)
    for b, mu in enumerate(mus):
        ref = _reference(van_der_pol(mu)[0], [2.0, 0.0])
        err = _rel_err(ys[:, b], ref)
        assert err <= REL_BOUND, f"{method} per-sample, sample {b} (mu={mu}): relative error {err:.2e}"
    # Stiffer samples need more steps; with one shared step size they would all take the same number.
    assert n_acc[0] < n_acc[2], f"accepted steps per sample {n_acc.tolist()}: mu=5 should need more than mu=1"


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_nfe_matches_torchdiffeq(name):
    """Same method (dopri5), same tolerances, same I-controller: the number of func evaluations must agree with
    torchdiffeq's within 10% (a regression here means a changed controller, initial step or error norm)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    make, kw, y0 = PROBLEMS[name]
    _, f_torch = make(**kw)
    count = [0]

    def counted(t, y):
        count[0] += 1
        return f_torch(t, y)

    y0_t = torch.tensor(y0, dtype=torch.float64)
    ref = torchdiffeq.odeint(counted, y0_t, _times(), rtol=RTOL, atol=ATOL, method="dopri5")
    nfe_td = count[0]
    ys = odeint(f_torch, y0_t, _times(), rtol=RTOL, atol=ATOL, method="dopri5")
    nfe_fn = last_stats().nfe
    assert abs(nfe_fn - nfe_td) <= 0.1 * nfe_td, f"{name}: fastnode NFE {nfe_fn} vs torchdiffeq {nfe_td}"
    # Same method, same controller: the solutions agree far below the tolerance-level error either has.
    assert _rel_err(ys, ref.numpy()) <= REL_BOUND
