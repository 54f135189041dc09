"""Saved tensors that can be released after the input pass of a split backward.

Autograd keeps every tensor a forward op saves until the node that saved it is freed. A split
backward keeps the graph from its input pass (I) to its weight pass (W), so the tensors that only
the input gradients read (a sigmoid's output, attention's probabilities, a norm's statistics)
would stay alive until W, which never reads them. A forward recorded under :func:`releasable`
saves each tensor in a :class:`Box` instead; during the input pass :func:`attributing` notes which
node unpacked which box, and :func:`release` empties the boxes of the nodes the weight pass will
not run. A box holds a detached tensor (storing the tensor itself would close a reference cycle
through its ``grad_fn`` for an op that saves its own output); autograd re-attaches the graph when
it unpacks.

Nothing is released that was not unpacked by a node in the input pass, so a node whose saved
tensors are unknown (not run in I) keeps them all. Unpacking an emptied box raises (it would mean
the weight pass ran a node it was not expected to run).

Under saved-tensor hooks, autograd hands a custom ``autograd.Function`` a new tensor for every saved
one, parameters included, so a Function that sets the ``.grad`` of a weight it saved (Megatron's
linear accumulates its weight gradient by hand) would write to an alias nobody reads. A
:class:`Policy` therefore records a kind of forward (a chunk, an island) only once one forward of that
kind, run without hooks, has shown a graph without such a Function (:func:`custom_function`); a graph
that holds one is not split anyway, so recording it would release nothing.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Iterable, List, Optional, Tuple

import torch

__all__ = ["Box", "releasable", "attributing", "release", "custom_function", "Policy"]

_attribution: Optional[List[Tuple[object, "Box"]]] = None  # (node, box) while an input pass is attributed


class Box:
    """One saved tensor (detached), until :meth:`empty`."""

    __slots__ = ("tensor", )

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def empty(self) -> int:
        """Drop the tensor; returns its bytes (0 if already empty)."""
        t, self.tensor = self.tensor, None
        return 0 if t is None else t.untyped_storage().nbytes()


def _pack(tensor: torch.Tensor) -> Box:
    return Box(tensor.detach())


def _unpack(box: Box) -> torch.Tensor:
    if box.tensor is None:
        raise RuntimeError("deepspeed_dualpipe: a saved tensor was released after the input pass of a split "
                           "backward, but autograd needs it again (a node outside the weight pass ran after the "
                           "input pass). Please report this; dualpipe.split_backward: false avoids it")
    if _attribution is not None:
        _attribution.append((torch._C._current_autograd_node(), box))
    return box.tensor


def releasable():
    """Within the block, tensors saved for backward go into :class:`Box`\\ es (no-op without grad)."""
    if not torch.is_grad_enabled():
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


@contextlib.contextmanager
def attributing():
    """Collect ``(node, box)`` for every box unpacked within the block (an input pass)."""
    global _attribution
    previous, _attribution = _attribution, []
    try:
        yield _attribution
    finally:
        _attribution = previous


def release(unpacked: Iterable[Tuple[object, Box]], keep: set) -> int:
    """Empty the boxes unpacked by nodes not in ``keep``; returns the bytes released."""
    return sum(box.empty() for node, box in unpacked if node is not None and node not in keep)


def custom_function(roots, stop=frozenset()) -> Optional[str]:
    """The name of a custom autograd Function in the graph below the nodes ``roots`` (not entering ``stop``)
    whose backward must run once, or None. A Function class that sets ``dualpipe_split_safe = True`` (pure,
    cheap, no side effects) does not count."""
    seen = set(stop)
    todo = deque(roots)
    while todo:
        node = todo.popleft()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            forward_cls = getattr(node, "_forward_cls", None)
            if not getattr(forward_cls, "dualpipe_split_safe", False):
                return getattr(forward_cls, "__name__", type(node).__name__)
        todo.extend(nxt for nxt, _ in node.next_functions)
    return None


class Policy:
    """Which kinds of forward (keys: a chunk, an island's name) are recorded under :func:`releasable`: none
    until :meth:`learn` has seen one forward of the kind, unrecorded, whose graph holds no custom Function."""

    def __init__(self):
        self._allowed = {}

    def recording(self, key):
        return releasable() if self._allowed.get(key) else contextlib.nullcontext()

    def learn(self, key, outputs) -> None:
        if key not in self._allowed and torch.is_grad_enabled():
            tensors = outputs if isinstance(outputs, (tuple, list)) else (outputs, )
            roots = [t.grad_fn for t in tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None]
            self._allowed[key] = custom_function(roots) is None
