"""Normalise any schedule's instruction stream into plain events.

The plugin's instructions already name their chunk, micro-batch and peer.
DeepSpeed's own (1F1B ``TrainSchedule``, built-in ``DualPipeVSchedule``) name only a
buffer and a phase; their micro-batches follow from the order in which each kind of
instruction walks them, and their peers from the layout. Verification, simulation,
printing and export all work on the events this module produces.

Two readings of a stream: :func:`rank_events` lists its computations and messages in
instruction order; :func:`rank_program` lists what the engine running it actually posts,
:class:`Post` by :class:`Post` (one ``batch_isend_irecv`` or blocking send/receive each), with
its computations between them, and the collectives it issues on other communicators
(:class:`Collective`: the end-of-batch reductions, the optimizer step's norm, the loss). The verifier
checks programs under NCCL's rules.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from deepspeed.runtime.pipe import schedule as ds

from deepspeed_dualpipe.schedule import instructions
from deepspeed_dualpipe.schedule import EngineKind, get_spec, rank_steps
from deepspeed_dualpipe.schedule.commit import SHAPES, Handshakes
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
    payload: str  # "act" | "grad" | "shapes" (the metadata before a channel's first activation)
    chunk: int
    micro_batch: int
    peer: int
    buffer: Optional[int] = field(default=None, compare=False)

    def __str__(self) -> str:
        arrow = "->" if self.direction == "send" else "<-"
        return f"{self.direction}_{self.payload}({self.chunk},{self.micro_batch}){arrow}{self.peer}"


@dataclass(frozen=True)
class Post:
    """What an engine posts at once: one group of sends and receives (one ``batch_isend_irecv``, or one
    blocking send or receive). ``wait``: the engine waits for the group before it goes on."""

    comms: Tuple[Comm, ...]
    wait: bool = False

    def __str__(self) -> str:
        return "[" + ", ".join(map(str, self.comms)) + "]" + (" (waited)" if self.wait else "")


@dataclass(frozen=True)
class Collective:
    """A collective the engine issues on a communicator other than the point-to-point one: a rendezvous of
    ``members`` (pipeline ranks) on the communicator ``communicator``, in issue order there."""

    kind: str  # the instruction (ReduceMirrorGrads, ...) or "AggregateLoss"
    communicator: str  # what the process group is for: mirror, tied, world, pipe
    members: Tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.kind} on the {self.communicator} communicator {list(self.members)}"


def collectives_of(ins, layout: Layout, rank: int) -> List[Collective]:
    """The collectives an end-of-batch instruction issues across pipeline ranks, each on its own communicator:

    - ``ReduceMirrorGrads``: over the ranks that hold copies of this rank's stages (DualPipe's mirror pair);
    - ``ReduceTiedGrads``: over the holders of the first and the last stage (DeepSpeed's group for a tied
      embedding and head, the usual tie; other ties depend on the model);
    - ``OptimizerStep``: the gradient-clipping norm's all-reduce over every rank (with ``gradient_clipping``;
      modelled always, which only adds a rendezvous);
    - ``ReduceGrads``: data parallelism only, each rank with its own replicas, which run the same program.
    The expert all-to-alls inside MoE computations also stay among replicas of one stage (expert parallelism is
    carved from data parallelism), in the order of that same program, so they cannot cross."""
    if isinstance(ins, instructions.ReduceMirrorGrads):
        mine = {layout.model_stage(rank, c) for c in range(layout.chunks_per_rank)}
        found = Collective("ReduceMirrorGrads", "mirror", _holders(layout, mine))
    elif isinstance(ins, ds.ReduceTiedGrads):
        found = Collective("ReduceTiedGrads", "tied", _holders(layout, {0, layout.model_stages - 1}))
    elif isinstance(ins, ds.OptimizerStep):
        found = Collective("OptimizerStep", "world", tuple(range(layout.ranks)))
    else:
        return []
    # a rank outside the group skips it (the tied reduction on a middle stage), and a group of one waits for none
    return [found] if rank in found.members and len(found.members) > 1 else []


def _holders(layout: Layout, stages) -> Tuple[int, ...]:
    return tuple(r for r in range(layout.ranks) if any(
        layout.model_stage(r, c) in stages for c in range(layout.chunks_per_rank)))


def aggregate_loss(layout: Layout) -> Collective:
    """After every batch the engines reduce the loss over the pipeline (the plugin's all-reduce, DeepSpeed's
    broadcast from its last stage)."""
    return Collective("AggregateLoss", "pipe", tuple(range(layout.ranks)))


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


class ProgramReader:
    """Reads one rank's instructions as the program its engine runs: :class:`Op`\\ s and :class:`Post`\\ s.

    - the plugin's engine queues its sends and receives and posts them at each ``CommitP2P`` as
      :meth:`~deepspeed_dualpipe.schedule.commit.Handshakes.plan` says (the engine calls the same
      function); a computation waits for the group holding its receive, the sends are waited at the
      end of the batch;
    - DeepSpeed's 1F1B engine sends and receives each tensor with a blocking ``send``/``recv``, the
      shapes first on a channel's first message;
    - DeepSpeed's DualPipeV engine exchanges a channel's shapes with blocking calls where it meets the
      first send or receive, queues the rest and posts and waits for them at every ``CommitP2P``.

    ``handshakes`` holds which channels have carried their shapes: pass the same one to read a later
    batch of the same engine (the steady state).
    """

    def __init__(self, layout: Layout, rank: int, engine: EngineKind, handshakes: Optional[Handshakes] = None):
        self.reader = EventReader(layout, rank)
        self.engine = engine
        self.handshakes = Handshakes() if handshakes is None else handshakes
        self._queue = []  # (instruction, Comm) queued until the next commit

    def program(self, steps: List[list]) -> List[object]:
        flat = [ins for step in steps for ins in step]
        queued = any(type(ins) is ds.CommitP2P for ins in flat)  # DeepSpeed's DualPipeV
        out = []
        for ins in flat:
            event = self.reader.event(ins)
            if isinstance(ins, ds.CommitP2P):
                out += self._commit(ins)
            elif isinstance(event, Comm):
                out += self._p2p(ins, event, queued)
            elif event is not None:
                out.append(event)
            else:
                out += collectives_of(ins, self.reader.layout, self.reader.rank)
        if self._queue:
            raise ValueError(f"rank {self.reader.rank}: {len(self._queue)} sends/receives are queued after the "
                             f"last CommitP2P and never posted")
        return out + [aggregate_loss(self.reader.layout)]

    def _p2p(self, ins, comm: Comm, queued: bool) -> List[Post]:
        if self.engine is EngineKind.PLUGIN:
            self._queue.append((ins, comm))
            return []
        out = []
        seen = self.handshakes.announced if comm.direction == "send" else self.handshakes.shaped
        if comm.payload == "act" and comm.chunk not in seen:  # DeepSpeed: blocking shapes, once per channel
            seen.add(comm.chunk)
            out.append(Post((_shapes_of(comm), ), wait=True))
        if queued:
            self._queue.append((ins, comm))
        else:
            out.append(Post((comm, ), wait=True))
        return out

    def _commit(self, ins) -> List[Post]:
        queue, self._queue = self._queue, []
        if self.engine is not EngineKind.PLUGIN:  # DeepSpeed's DualPipeV waits for every commit at once
            return [Post(tuple(comm for _, comm in queue), wait=True)] if queue else []
        comm_of = {id(i): comm for i, comm in queue}
        return [
            Post(tuple(_shapes_of(comm_of[id(i)]) if kind == SHAPES else comm_of[id(i)]
                       for i, kind in posting.ops), posting.wait)
            for posting in self.handshakes.plan([i for i, _ in queue])
        ]


def _shapes_of(comm: Comm) -> Comm:
    return Comm(comm.direction, SHAPES, comm.chunk, comm.micro_batch, comm.peer, comm.buffer)


def unbatched(program: List[object]) -> List[object]:
    """``program`` with every send and receive posted as its own group, in the same order: how the plugin's
    engine posted before it had commit points (each p2p instruction its own ``batch_isend_irecv``)."""
    return [p for e in program for p in ([Post((c, ), e.wait) for c in e.comms] if isinstance(e, Post) else [e])]


def rank_program(steps: List[list],
                 layout: Layout,
                 rank: int,
                 engine: EngineKind,
                 handshakes: Optional[Handshakes] = None) -> List[object]:
    """What rank ``rank``'s engine posts and computes, in order (:class:`ProgramReader`)."""
    return ProgramReader(layout, rank, engine, handshakes).program(steps)


def schedule_program(schedule: str, stages: int, micro_batches: int, forward_only: bool = False, batches: int = 1):
    """``(layout, programs)``: every rank's program for ``batches`` consecutive batches of one engine, each
    batch a list (the first carries the shape handshakes, the later ones are the steady state)."""
    spec = get_spec(schedule)
    layout = spec.layout(stages, micro_batches)
    steps = rank_steps(schedule, stages, micro_batches, forward_only)
    handshakes = [Handshakes() for _ in range(stages)]
    programs = [[rank_program(s, layout, r, spec.engine, handshakes[r]) for r, s in enumerate(steps)]
                for _ in range(batches)]
    return layout, programs
