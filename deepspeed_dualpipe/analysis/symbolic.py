"""Symbolic execution of all ranks' event streams together, with a cost per operation.

Semantics (those of the engine): sends and receives are posted without blocking; a
compute operation starts once its inputs are there -- a received tensor once its
send has been posted (plus ``latency``), a tensor from the same rank once the
operation that makes it has run. The one blocking post is the first activation
receive on a channel: the engine learns the tensor shapes from it. Every rank runs its stream in order. Run with any
costs this finds deadlocks; run with the report's costs it is the simulator.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from deepspeed_dualpipe.analysis.events import Comm, Op, schedule_events
from deepspeed_dualpipe.schedule.layout import Layout


class ScheduleError(ValueError):
    """An instruction stream that cannot run: a deadlock, a missing message or a broken dependency."""


@dataclass(frozen=True)
class Costs:
    """Durations in the notation of the DeepSeek-V3 report's Table 2 (one chunk each).

    ``B`` is a full backward and ``W`` its weight part, so an ``I`` costs ``B - W``;
    ``FB`` is an overlapped forward+backward pair (defaults to ``F + B``: no overlap gain).
    """

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: Optional[float] = None
    latency: float = 0.0

    def __post_init__(self):
        for name in ("F", "B", "W", "latency"):
            if getattr(self, name) < 0:
                raise ValueError(f"cost {name} must be >= 0, got {getattr(self, name)}")
        if self.W > self.B:
            raise ValueError(f"cost W (weight part of the backward) must not exceed B, got W={self.W} > B={self.B}")

    @property
    def pair(self) -> float:
        return self.F + self.B if self.FB is None else self.FB

    def of(self, op: Op) -> float:
        if op.op == "FB":
            return self.pair - (self.W if op.backward.op == "I" else 0.0)
        return {"F": self.F, "B": self.B, "I": self.B - self.W, "W": self.W}[op.op]

    @classmethod
    def parse(cls, text: str) -> "Costs":
        """``"F=1,B=2,W=1,FB=2.5,latency=0"`` -> Costs (names are case-insensitive)."""
        names = {f.lower(): f for f in ("F", "B", "W", "FB", "latency")}
        values = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = item.partition("=")
            if name.strip().lower() not in names or not value:
                raise ValueError(f"bad cost {item!r}: expected NAME=NUMBER with NAME one of F, B, W, FB, latency")
            values[names[name.strip().lower()]] = float(value)
        return cls(**values)


@dataclass
class Interval:
    start: float
    end: float
    op: Op


@dataclass
class Execution:
    """Per-rank timelines and what they imply."""

    layout: Layout
    timelines: List[List[Interval]]
    live_peak: List[int]
    sent: Dict[Tuple[int, int], list] = field(default_factory=dict)  # (src, dst) -> message ids in post order
    received: Dict[Tuple[int, int], list] = field(default_factory=dict)

    @property
    def makespan(self) -> float:
        return max((t[-1].end for t in self.timelines if t), default=0.0)

    def busy(self, rank: int) -> float:
        return sum(i.end - i.start for i in self.timelines[rank])

    def bubbles(self) -> List[float]:
        return [self.makespan - self.busy(r) for r in range(len(self.timelines))]


def _message(payload: str, micro_batch: int, source, target):
    return (payload, micro_batch, source, target)


class _Rank:

    def __init__(self, rank: int, events: list):
        self.rank = rank
        self.events = events
        self.next = 0
        self.clock = 0.0
        self.posted = set()
        self.shaped = set()  # (peer, chunk) activation channels whose shapes are known
        self.done: Dict[Tuple[str, int, int], float] = {}  # (op, chunk, micro_batch) -> end time
        self.live = 0
        self.peak = 0
        self.timeline: List[Interval] = []


def execute(streams: List[list], layout: Layout, costs: Costs = Costs(), forward_only: bool = False) -> Execution:
    """Run every rank's events (from :func:`deepspeed_dualpipe.analysis.events.rank_events`) to the end."""
    ranks = [_Rank(r, events) for r, events in enumerate(streams)]
    arrival: Dict[tuple, float] = {}
    execution = Execution(layout, [r.timeline for r in ranks], [0] * len(ranks))
    progress = True
    while progress:
        progress = False
        for rank in ranks:
            while rank.next < len(rank.events):
                if not _advance(rank, rank.events[rank.next], layout, costs, arrival, execution, forward_only):
                    break
                rank.next += 1
                progress = True
    stuck = [r for r in ranks if r.next < len(r.events)]
    if stuck:
        waits = "; ".join(f"rank {r.rank} waits at {r.events[r.next]} for "
                          f"{_missing(r, r.events[r.next], layout, arrival)}" for r in stuck)
        raise ScheduleError(f"deadlock: {waits}")
    execution.live_peak = [r.peak for r in ranks]
    return execution


def execute_schedule(schedule: str,
                     stages: int,
                     micro_batches: int,
                     costs: Costs = Costs(),
                     forward_only: bool = False) -> Execution:
    """Build the named schedule's streams and execute them: the one path of the verifier, the simulator
    and the renderer."""
    layout, streams = schedule_events(schedule, stages, micro_batches, forward_only)
    return execute(streams, layout, costs, forward_only)


def _advance(rank, event, layout, costs, arrival, execution, forward_only) -> bool:
    """Run one event if it can run now; False if it must wait for another rank."""
    if isinstance(event, Comm):
        source, target = _endpoints(layout, (rank.rank, event.chunk), event)
        if (source if event.direction == "send" else target)[0] != rank.rank or \
                (target if event.direction == "send" else source)[0] != event.peer:
            raise ScheduleError(f"rank {rank.rank}: {event} names peer {event.peer}, but that message runs "
                                f"{source} -> {target}")
        message = _message(event.payload, event.micro_batch, source, target)
        channel = (rank.rank, event.peer) if event.direction == "send" else (event.peer, rank.rank)
        if event.direction == "send":
            producer = ("F", ) if event.payload == "act" else ("B", "I")
            if not any((op, event.chunk, event.micro_batch) in rank.done for op in producer):
                raise ScheduleError(f"rank {rank.rank}: {event} is posted before the tensor it sends is computed")
            if message in arrival:
                raise ScheduleError(f"rank {rank.rank}: {event} is sent twice")
            arrival[message] = rank.clock + costs.latency
            execution.sent.setdefault(channel, []).append(message)
        else:
            if event.payload == "act" and (event.peer, event.chunk) not in rank.shaped:
                # The engine learns a channel's tensor shapes from the first message's metadata,
                # so the first activation receive on a channel waits for its send.
                if message not in arrival:
                    return False
                rank.shaped.add((event.peer, event.chunk))
            rank.posted.add(message)
            execution.received.setdefault(channel, []).append(message)
        return True

    ready = rank.clock
    for part in event.parts():
        needs = _needs(rank, part, layout, arrival, forward_only)
        if needs is None:
            return False
        ready = max(ready, needs)
    start, end = ready, ready + costs.of(event)
    for part in event.parts():
        key = (part.op, part.chunk, part.micro_batch)
        if key in rank.done or (part.op in "BI" and any((o, part.chunk, part.micro_batch) in rank.done for o in "BI")):
            raise ScheduleError(f"rank {rank.rank}: {part} runs twice")
        if part.op == "F":
            rank.live += 1
            rank.peak = max(rank.peak, rank.live)
        rank.done[key] = end
    for part in event.parts():
        if part.op in ("B", "W") or (forward_only and part.op == "F"):
            rank.live -= 1
    rank.timeline.append(Interval(start, end, event))
    rank.clock = end
    return True


def _endpoints(layout, here, comm):
    """(source location, target location) of the message a Comm at location ``here`` carries."""
    other = layout.other_end(*here, comm.micro_batch, comm.direction, comm.payload)
    pair = (here, other) if comm.direction == "send" else (other, here)
    if pair[0] is None or pair[1] is None:
        raise ScheduleError(f"rank {here[0]}: {comm} has no peer: chunk {here[1]} is at the end of the pipe")
    return pair


def _needs(rank, part: Op, layout, arrival, forward_only) -> Optional[float]:
    """When ``part``'s inputs are ready, or None if another rank has yet to send one."""
    here, m = (rank.rank, part.chunk), part.micro_batch
    path = layout.path(m)
    if here not in path:
        raise ScheduleError(f"rank {rank.rank}: {part} runs on a chunk that micro-batch {m} does not visit")
    if part.op == "W":
        if ("I", part.chunk, m) not in rank.done:
            raise ScheduleError(f"rank {rank.rank}: {part} runs before its input-gradient pass {part.chunk}I{m}")
        return 0.0
    if part.op == "F":
        source, payload = layout.upstream(*here, m), "act"
    else:
        if forward_only:
            raise ScheduleError(f"rank {rank.rank}: {part} in a forward-only schedule")
        if ("F", part.chunk, m) not in rank.done:
            raise ScheduleError(f"rank {rank.rank}: {part} runs before its forward {part.chunk}F{m}")
        source, payload = layout.downstream(*here, m), "grad"
    if source is None:
        return 0.0
    if source[0] == rank.rank:  # the neighbouring stage is on this rank: it must have run already
        wanted = ("F", ) if payload == "act" else ("B", "I")
        if not any((op, source[1], m) in rank.done for op in wanted):
            raise ScheduleError(f"rank {rank.rank}: {part} runs before {source[1]}{wanted[0]}{m} on the same rank")
        return 0.0
    message = _message(payload, m, source, here)
    if message not in rank.posted:
        raise ScheduleError(f"rank {rank.rank}: {part} runs without a posted receive of its "
                            f"{'input' if payload == 'act' else 'output gradient'} from rank {source[0]}")
    return arrival.get(message)


def _missing(rank, event, layout, arrival) -> str:
    if isinstance(event, Comm):
        return f"the activation of micro-batch {event.micro_batch} from rank {event.peer}, which is never sent"
    for part in event.parts():
        here, m = (rank.rank, part.chunk), part.micro_batch
        source = layout.upstream(*here, m) if part.op == "F" else layout.downstream(*here, m)
        if source is not None and source[0] != rank.rank:
            payload = "act" if part.op == "F" else "grad"
            if _message(payload, m, source, here) not in arrival:
                what = "activation" if payload == "act" else "gradient"
                return f"the {what} of micro-batch {m} from rank {source[0]}, which is never sent"
    return "an unknown dependency"
