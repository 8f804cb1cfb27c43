"""Whether the adjoint's vector-Jacobian products must keep ``func``'s autograd graph (``retain_graph``).

``func`` may use tensors computed outside it from the parameters (torchcde's spline coefficients): then the graph
of each evaluation reaches nodes that belong to the caller, which every later evaluation (and the caller's own
backward) traverses again, so a vector-Jacobian product must not free them: torchdiffeq always passes
``retain_graph=True``. Retaining costs nothing when the graph dies with the evaluation, except where saved-tensor
hooks hold outputs (they then form reference cycles that only the garbage collector frees). So fastnode retains
only while it does not know, and from then on only if needed (``GraphRetention``).
"""

from __future__ import annotations

import torch


def _graph_nodes(out: torch.Tensor) -> list:
    """The autograd nodes ``out`` depends on, leaves (``AccumulateGrad``) excluded."""
    root = out.grad_fn
    if root is None:
        return []
    seen, stack, nodes = {id(root)}, [root], [root]
    while stack:
        for nxt, _ in stack.pop().next_functions:
            if nxt is None or id(nxt) in seen or type(nxt).__name__ == "AccumulateGrad":
                continue
            seen.add(id(nxt))
            stack.append(nxt)
            nodes.append(nxt)
    return nodes


def _sequence_mark() -> int:
    """This thread's next autograd sequence number: nodes made from now on in this thread get one at least as large."""
    with torch.enable_grad():
        return (torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr() + 1


class GraphRetention:
    """Decides ``retain_graph`` for the backward solve's evaluations of ``func``.

    Two tests, at the first evaluations: a node whose autograd sequence number (per thread, increasing) is below
    the mark taken just before ``func`` ran was made before it: outside. On CPU the backward runs in the thread
    that made the caller's graph, so no such node means none is outside, decided at the first evaluation. On
    other devices the engine runs the backward in its own thread (another sequence), so the graphs of the first
    two evaluations are also compared: a node found in both was made outside ``func``.

    Example:
        >>> import torch
        >>> w = torch.ones(2, requires_grad=True)
        >>> ext = w * 2  # made outside func
        >>> keep = GraphRetention()
        >>> y = torch.ones(2, requires_grad=True)
        >>> mark = keep.mark()
        >>> out = ext * y
        >>> keep.observe(out, mark)
        >>> keep.retain
        True
    """

    def __init__(self):
        self.decided = None  # None until known
        self._first = None  # the first evaluation's nodes, held (so their identities stay valid) until the second

    @property
    def retain(self) -> bool:
        return self.decided is not False

    def mark(self) -> int | None:
        """Call just before evaluating ``func`` (only costs while undecided)."""
        return _sequence_mark() if self.decided is None else None

    def observe(self, out: torch.Tensor, mark: int | None) -> None:
        """After an evaluation of ``func`` (``out``), before its vector-Jacobian product asks ``retain``."""
        if self.decided is not None or mark is None or not isinstance(out, torch.Tensor) or out.grad_fn is None:
            return
        nodes = _graph_nodes(out)
        if any(n._sequence_nr() < mark for n in nodes):
            self.decided = True
        elif out.device.type == "cpu":
            self.decided = False
        elif self._first is None:
            self._first = nodes
        else:
            first = {id(n) for n in self._first}
            self.decided = any(id(n) in first for n in nodes)
            self._first = None
