"""Several event functions in one, as torchdiffeq combines them.

An ``event_fn`` may return more values than one per solve (per sample): the solve then stops at the first
zero crossing of any of them. As torchdiffeq does, each component is multiplied by its sign at the start
(so all start non-negative) and the minimum is taken: the combination crosses zero when the first component
does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class CombinedEventFn:
    """``event_fn`` with vector values combined into one per solve (``[B]`` per sample).

    The signs are taken at the first call, which every solve makes at ``(t0, y0)``; an ``event_fn`` that
    returns one value per solve (per sample) passes through unchanged.

    Example:
        >>> import torch
        >>> ev = CombinedEventFn(lambda t, y: torch.stack([y[0] - 2.0, 1.0 - y[1]]), batch=1, per_sample=False)
        >>> float(ev(torch.tensor(0.0), torch.tensor([0.0, 0.0])))  # signs (-1, +1): min(2, 1)
        1.0
    """

    def __init__(self, fn: Callable, batch: int, per_sample: bool):
        self.fn = fn
        self.batch = batch
        self.per_sample = per_sample
        self.signs = None
        self.checked = False

    def __call__(self, t, y):
        v = self.fn(t, y)
        if not self.checked:
            self.checked = True
            if isinstance(v, torch.Tensor) and v.numel() > self.batch:
                if self.per_sample and (v.dim() == 0 or v.shape[0] != self.batch):
                    raise ValueError(f"event_fn returned shape {tuple(v.shape)}; per sample it must return [B] or "
                                     f"[B, ...] with B={self.batch}")
                with torch.no_grad():
                    self.signs = torch.sign(v.detach()).reshape(self.batch, -1)
        if self.signs is None or not isinstance(v, torch.Tensor):
            return v
        c = (v.reshape(self.batch, -1) * self.signs).amin(dim=1)
        return c if self.per_sample else c.reshape(())


def combine_event_fn(event_fn, batch: int, per_sample: bool):
    """Wrap ``event_fn`` (once: a wrapped function is returned as it is)."""
    if event_fn is None or isinstance(event_fn, CombinedEventFn) or not callable(event_fn):
        return event_fn
    return CombinedEventFn(event_fn, batch, per_sample)
