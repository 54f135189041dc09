"""What the engine holds per buffer slot, and between the two chunks of a rank.

A schedule gives every live (chunk, micro-batch) a buffer slot, from its first instruction to its
last (``schedule.builder.assign_buffers``); the engine keeps all per-micro-batch state in that
slot, never once per engine, so interleaved micro-batches cannot overwrite each other.
"""

from dataclasses import dataclass, fields
from typing import Any, Dict, Tuple


@dataclass
class Slot:
    """One micro-batch's state on one chunk of this rank. Every field is ``None`` when not held."""

    inputs: Any = None  # stage inputs: loaded, received or handed over by the other chunk; until the backward
    labels: Any = None  # at a loss stage, until the forward computes the loss
    outputs: Any = None  # stage outputs, until the backward; once sent or handed on, one-element shells of their shapes
    output_edges: Any = None  # once the outputs are handed on: where their gradients enter the graph, until the backward
    loss: Any = None  # at a loss stage, until the backward
    activation_recv: Any = None  # the posted receive of ``inputs``, waited when the forward starts
    output_grads: Any = None  # gradients of ``outputs`` received from downstream, until the backward
    grad_recv: Any = None  # the posted receive of ``output_grads``, waited when the backward starts
    input_grads: Any = None  # gradients of ``inputs``, until sent upstream
    tape: Any = None  # a phased chunk's forward as autograd islands, until the backward
    weight_part: Any = None  # a BackwardInput's deferred weight pass, until its BackwardWeight

    def held(self) -> Dict[str, Any]:
        """The fields that hold something."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class Handoffs:
    """Tensors passed between the two chunks of this rank, keyed by (receiving chunk, micro-batch): where
    DualPipeV's V turns, the forward hands chunk 0's outputs to chunk 1 and the backward hands chunk 1's
    input gradients back to chunk 0."""

    activations: Dict[Tuple[int, int], Any]
    grads: Dict[Tuple[int, int], Any]

    @classmethod
    def empty(cls) -> "Handoffs":
        return cls({}, {})


__all__ = ["Slot", "Handoffs"]
