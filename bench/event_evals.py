"""Event location cost: event_fn evaluations per event on a bouncing ball (torchdiffeq's example problem).

A ball under gravity with drag bounces 10 times (each bounce: odeint_event to the ground, restart with the
reflected, damped velocity). Prints event_fn calls per event, func evaluations, the total time and the first
bounce's time against its closed form (drag-free first flight: t = (v0 + sqrt(v0^2 + 2 g h0)) / g).

Run: PYTHONPATH=. python bench/event_evals.py
"""

import math
import time

import torch

from fastnode import last_stats, odeint_event

DT = torch.float64
G = 9.8


class Ball(torch.nn.Module):
    def __init__(self, drag):
        super().__init__()
        self.drag = drag

    def forward(self, t, state):
        _, v = state
        return v, -G - self.drag * v * v.abs()


def run(drag=0.0, bounces=10, rtol=1e-8, atol=1e-8):
    calls = {"n": 0}

    def ground(t, state):
        calls["n"] += 1
        return state[0]

    x0 = torch.tensor(10.0, dtype=DT)
    v0 = torch.tensor(2.0, dtype=DT)
    t0 = torch.tensor(0.0, dtype=DT)
    times, nfe = [], 0
    ball = Ball(drag)
    for _ in range(bounces):
        t0, (_, vs) = odeint_event(ball, (x0, v0), t0, event_fn=ground, rtol=rtol, atol=atol)
        nfe += last_stats().nfe
        times.append(float(t0))
        x0, v0 = torch.zeros((), dtype=DT), -0.9 * vs[-1]
    return times, calls["n"], nfe


if __name__ == "__main__":
    t_first = (2.0 + math.sqrt(4.0 + 2 * G * 10.0)) / G
    for drag in (0.0, 0.1):
        start = time.perf_counter()
        times, n_ev, nfe = run(drag)
        wall = time.perf_counter() - start
        err = f"  first bounce error {abs(times[0] - t_first):.2e}" if drag == 0 else ""
        print(f"drag={drag}: {n_ev} event_fn calls for 10 events ({n_ev / 10:.1f} per event), nfe {nfe}, "
              f"{wall * 1e3:.0f} ms{err}")
