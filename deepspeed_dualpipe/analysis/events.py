"""Normalise any schedule's instruction stream into plain events.

The plugin's instructions already name their chunk, micro-batch and peer.
DeepSpeed's own (1F1B ``TrainSchedule``, built-in ``DualPipeVSchedule``) name only a
buffer and a phase; their micro-batches follow from the order in which each kind of
instruction walks them, and their peers from the layout. Verification, simulation,
printing and export all work on the events this module produces.
"""

from dataclasses import dataclass, field
from typing import List, Optional

from deepspeed.runtime.pipe import schedule as ds

from deepspeed_dualpipe.schedule import instructions
from deepspeed_dualpipe.schedule import get_spec, rank_steps
from deepspeed_dualpipe.schedule.layout import Layout


@dataclass(frozen=True)
class Op:
    """A compute operation: ``F``, ``B``, ``I``, ``W`` on (chunk, micro_batch), or an ``FB`` pair."""

    op: str
    chunk: int = 0
    micro_batch: int = 0
    forward: Optional["Op"] = None
    backward: Optional["Op"] = None
    buffer: Optional[int] = field(default=None, compare=False)  # the engine's buffer slot

    def parts(self) -> List["Op"]:
        """The plain operations this one performs: itself, or the two halves of a pair."""
        return [self.forward, self.backward] if self.op == "FB" else [self]

    def to_json(self) -> dict:
        if self.op == "FB":
            return {"op": "FB", "forward": self.forward.to_json(), "backward": self.backward.to_json()}
        return {"op": self.op, "chunk": self.chunk, "micro_batch": self.micro_batch}

    def __str__(self) -> str:
        if self.op == "FB":
            return f"{self.forward}+{self.backward}"
        return f"{self.chunk}{self.op}{self.micro_batch}"


@dataclass(frozen=True)
class Comm:
    """A posted send or receive of an activation (``act``) or a gradient (``grad``)."""

    direction: str  # "send" | "recv"
    payload: str  # "act" | "grad"
    chunk: int
    micro_batch: int
    peer: int
    buffer: Optional[int] = field(default=None, compare=False)

    def __str__(self) -> str:
        arrow = "->" if self.direction == "send" else "<-"
        return f"{self.direction}_{self.payload}({self.chunk},{self.micro_batch}){arrow}{self.peer}"


_COMM = {
    ds.SendActivation: ("send", "act"),
    ds.RecvActivation: ("recv", "act"),
    ds.SendGrad: ("send", "grad"),
    ds.RecvGrad: ("recv", "grad"),
}

# DeepSpeed's ForwardPass/BackwardPass cover the plugin's subclasses of them too.
_COMPUTE = [(instructions.BackwardInput, "I"), (instructions.BackwardWeight, "W"), (ds.ForwardPass, "F"),
            (ds.BackwardPass, "B")]


def _comm_kind(ins):
    for cls, kind in _COMM.items():
        if isinstance(ins, cls):
            return kind
    return None


class EventReader:
    """Reads one rank's instructions, in order, as events. DeepSpeed's own instructions name no micro-batch:
    each kind walks the micro-batches of its chunk in order, so the reader counts them."""

    def __init__(self, layout: Layout, rank: int):
        self.layout, self.rank = layout, rank
        self._order = [layout.micro_batches_of(rank, c) for c in range(layout.chunks_per_rank)]
        self._seen = {}

    def _next(self, kind, chunk: int) -> int:
        position = self._seen.get((kind, chunk), 0)
        self._seen[(kind, chunk)] = position + 1
        return self._order[chunk][position]

    def event(self, ins):
        """The :class:`Op` or :class:`Comm` that ``ins`` performs, or None (loads, reductions, the step)."""
        if isinstance(ins, instructions.OverlappedForwardBackward):
            k = ins.kwargs
            return Op("FB",
                      forward=Op("F", k["forward_chunk"], k["forward_micro_batch"], buffer=k["forward_buffer"]),
                      backward=Op(k["backward_op"],
                                  k["backward_chunk"],
                                  k["backward_micro_batch"],
                                  buffer=k["backward_buffer"]))
        plugin = "micro_batch" in ins.kwargs
        chunk = ins.kwargs.get("chunk", ins.kwargs.get("phase", 0))
        kind = _comm_kind(ins)
        if kind is not None:
            if plugin:
                return Comm(*kind, chunk, ins.micro_batch, ins.peer, ins.buffer_id)
            micro_batch = self._next(kind, chunk)
            peer = self.layout.other_end(self.rank, chunk, micro_batch, *kind)[0]
            return Comm(*kind, chunk, micro_batch, peer, ins.buffer_id)
        for cls, op in _COMPUTE:
            if isinstance(ins, cls):
                micro_batch = ins.micro_batch if plugin else self._next(op, chunk)
                return Op(op, chunk, micro_batch, buffer=ins.kwargs.get("buffer_id"))
        return None


def rank_events(steps: List[list], layout: Layout, rank: int) -> List[object]:
    """The compute (:class:`Op`) and communication (:class:`Comm`) events of one rank, in order."""
    reader = EventReader(layout, rank)
    events = (reader.event(ins) for step in steps for ins in step)
    return [e for e in events if e is not None]


def schedule_events(schedule: str, stages: int, micro_batches: int, forward_only: bool = False):
    """``(layout, streams)``: every rank's events for the named schedule, built from its instruction streams.
    Verification, simulation, rendering and export all start here."""
    layout = get_spec(schedule).layout(stages, micro_batches)
    steps = rank_steps(schedule, stages, micro_batches, forward_only)
    return layout, [rank_events(s, layout, r) for r, s in enumerate(steps)]
