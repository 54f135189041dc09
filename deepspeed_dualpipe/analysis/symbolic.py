"""Symbolic execution of all ranks' programs together, with a cost per operation.

A program (:func:`~deepspeed_dualpipe.analysis.events.rank_program`) is what one rank's engine
does, in order: computations (:class:`~.events.Op`) and posted groups of sends and receives
(:class:`~.events.Post`). The rules are NCCL's (``semantics=NCCL``, the default):

- a rank's groups run one after the other, in posting order, on its communicator's stream (one
  FIFO per rank: ``batch_isend_irecv`` uses the process group's communicator, which DeepSpeed binds
  to the device, so all of a rank's peers share it);
- a group starts once the previous group has completed and everything the rank computed or
  waited for before posting it is done (the stream waits for the compute stream);
- a send completes only once the matching receive's group has started, and vice versa
  (rendezvous: no buffering, true of any message larger than NCCL's buffers); the k-th send from
  a to b matches b's k-th receive from a; a group completes when all its operations have;
- a computation starts after the previous one, after every group the rank waited for before it,
  and after the group holding each tensor it receives (the wait where the data is used);
- a posted group with ``wait`` holds back everything the rank does after it until it completes;
- a collective (:class:`~.events.Collective`: the end-of-batch reductions, the optimizer's norm, the loss) runs
  on a communicator of its own, in issue order there: the k-th one a rank issues on a communicator meets the
  k-th of every other member (a rendezvous); it starts once the rank has computed everything before it and its
  point-to-point groups have completed (the engine drains its sends first), and holds back everything after it
  until all members have joined (the host waits for it). Ranks that share two communicators and issue their
  collectives on them in different orders form a cycle: a deadlock, as on NCCL.

``semantics=BUFFERED`` is the idealised model of the simulator: groups do not queue behind each
other, sends never block, and a received tensor is there ``latency`` after its send was posted.
Run with any costs, NCCL's rules find deadlocks; run with the report's costs, the simulator.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from deepspeed_dualpipe.analysis.events import Collective, Comm, Op, Post, schedule_program
from deepspeed_dualpipe.schedule.layout import Layout

NCCL = "nccl"
BUFFERED = "buffered"


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
    groups: int = 0  # groups posted, all ranks together

    @property
    def makespan(self) -> float:
        return max((t[-1].end for t in self.timelines if t), default=0.0)

    def busy(self, rank: int) -> float:
        return sum(i.end - i.start for i in self.timelines[rank])

    def bubbles(self) -> List[float]:
        return [self.makespan - self.busy(r) for r in range(len(self.timelines))]


def _message(payload: str, micro_batch: int, source, target):
    return (payload, micro_batch, source, target)


def _describe_message(message) -> str:
    payload, m, source, target = message
    what = {"act": "activation", "grad": "gradient", "shapes": "activation shapes"}[payload]
    return f"the {what} of micro-batch {m} ({source} -> {target})"


class _Graph:
    """Times as the longest path through a dependency graph; a node in a cycle never resolves (a deadlock)."""

    def __init__(self):
        self.deps: List[List[Tuple[int, float]]] = []
        self.duration: List[float] = []

    def node(self, deps=(), duration: float = 0.0) -> int:
        self.deps.append(list(deps))
        self.duration.append(duration)
        return len(self.deps) - 1

    def solve(self) -> List[Optional[float]]:
        n = len(self.deps)
        waiting = [len(d) for d in self.deps]
        dependents = [[] for _ in range(n)]
        for node, deps in enumerate(self.deps):
            for dep, _ in deps:
                dependents[dep].append(node)
        value: List[Optional[float]] = [None] * n
        ready = [node for node in range(n) if waiting[node] == 0]
        while ready:
            node = ready.pop()
            value[node] = max((value[d] + w for d, w in self.deps[node]), default=0.0) + self.duration[node]
            for nxt in dependents[node]:
                waiting[nxt] -= 1
                if waiting[nxt] == 0:
                    ready.append(nxt)
        return value


@dataclass
class _Group:
    rank: int
    post: Post
    start: int = -1  # graph nodes
    end: int = -1
    matches: List[Tuple[Comm, Optional["_Group"]]] = field(default_factory=list)


@dataclass
class _Item:
    """One entry of a rank's program and the graph nodes that say when it can run."""

    event: object
    group: Optional[_Group] = None
    start: int = -1  # compute: start and end; a waited group: the node after which the rank goes on
    end: int = -1
    waits: List[_Group] = field(default_factory=list)  # the groups a computation waits for (NCCL)
    arrivals: List[tuple] = field(default_factory=list)  # the receives it waits for (BUFFERED)
    meeting: Optional["_Meeting"] = None  # a collective's rendezvous


@dataclass
class _Meeting:
    """One collective: the k-th on its communicator, joined by every member's item."""

    collective: Collective
    index: int
    items: Dict[int, "_Item"] = field(default_factory=dict)  # rank -> its item
    node: int = -1  # when every member has joined

    def __str__(self) -> str:
        c = self.collective
        return f"{c.kind} #{self.index} on the {c.communicator} communicator {list(c.members)}"


def execute(programs: List[list],
            layout: Layout,
            costs: Costs = Costs(),
            forward_only: bool = False,
            semantics: str = NCCL) -> Execution:
    """Run every rank's program (:func:`~deepspeed_dualpipe.analysis.events.rank_program`) to the end.

    Raises :class:`ScheduleError` naming the first broken rule: a message sent and received differently,
    a computation before its inputs, or a deadlock (with what each stuck rank waits for).
    """
    if semantics not in (NCCL, BUFFERED):
        raise ValueError(f"semantics must be {NCCL!r} or {BUFFERED!r}, got {semantics!r}")
    execution = Execution(layout, [[] for _ in programs], [0] * len(programs))
    items = [_read(rank, program, layout, forward_only, execution) for rank, program in enumerate(programs)]
    _match(execution)
    graph = _Graph()
    zero = graph.node()
    meetings = _meet(items)
    for meeting in meetings:
        meeting.node = graph.node()
    arrivals = {}  # id(recv Comm in a group) -> node: when it is there (BUFFERED)
    for rank_items in items:
        floor, previous = zero, None
        for item in rank_items:
            group = item.group
            if group is not None:
                fifo = [(previous.end, 0.0)] if previous is not None and semantics == NCCL else []
                group.start = graph.node([(floor, 0.0)] + fifo)
                group.end = graph.node()
                previous = group
                if item.event.wait:
                    floor = item.start = graph.node([(floor, 0.0), (group.end, 0.0)])
            elif item.meeting is not None:
                drained = [(previous.end, 0.0)] if previous is not None and semantics == NCCL else []
                item.start = graph.node([(floor, 0.0)] + drained)
                item.end = floor = item.meeting.node
            else:
                waits = [(g.end, 0.0) for g in item.waits] if semantics == NCCL else []
                item.start = graph.node([(floor, 0.0)] + waits)
                item.end = floor = graph.node([(item.start, 0.0)], costs.of(item.event))
    for meeting in meetings:
        graph.deps[meeting.node] = [(item.start, 0.0) for item in meeting.items.values()]
    for rank_items in items:
        for item in rank_items:
            if item.group is not None:
                _connect(graph, item.group, costs, semantics, arrivals)
    if semantics == BUFFERED:
        for rank_items in items:
            for item in rank_items:
                if item.group is None and item.meeting is None:
                    graph.deps[item.start] += [(arrivals[key], 0.0) for key in item.arrivals]
    value = graph.solve()
    if any(v is None for v in value):
        raise ScheduleError(_crossed(items, value) or _deadlock(items, value))
    for rank, rank_items in enumerate(items):
        for item in rank_items:
            if item.group is None and item.meeting is None:
                execution.timelines[rank].append(Interval(value[item.start], value[item.end], item.event))
    execution.groups = sum(1 for rank_items in items for item in rank_items if item.group is not None)
    return execution


def execute_schedule(schedule: str,
                     stages: int,
                     micro_batches: int,
                     costs: Costs = Costs(),
                     forward_only: bool = False,
                     semantics: str = BUFFERED) -> Execution:
    """Build the named schedule's programs in the steady state (the shapes known) and execute them: the path of
    the simulator and the renderer (idealised communication by default)."""
    layout, batches = schedule_program(schedule, stages, micro_batches, forward_only, batches=2)
    return execute(batches[-1], layout, costs, forward_only, semantics)


def _connect(graph, group: _Group, costs: Costs, semantics: str, arrivals) -> None:
    """A group ends when each of its operations has met its match (NCCL), or when its receives have arrived."""
    deps = [(group.start, 0.0)]
    for comm, other in group.matches:
        if semantics == NCCL:
            deps.append((other.start, costs.latency))
        elif comm.direction == "recv":
            arrival = graph.node([(other.start, costs.latency), (group.start, 0.0)])
            arrivals[id(comm), id(group)] = arrival
            deps.append((arrival, 0.0))
    graph.deps[group.end] = deps


def _read(rank: int, program: list, layout: Layout, forward_only: bool, execution: Execution) -> List[_Item]:
    """Check one rank's program in its own order; returns its items with the groups each computation waits for."""
    items, done, live, peak = [], {}, 0, 0
    posted = {}  # message -> group holding its receive
    for event in program:
        if isinstance(event, Post):
            group = _Group(rank, event)
            for comm in event.comms:
                message, channel = _post(rank, comm, layout, done)
                (execution.sent if comm.direction == "send" else execution.received).setdefault(channel, []).append(
                    (message, comm, group))
                if comm.direction == "recv":
                    posted[message] = group
            items.append(_Item(event, group))
            continue
        if isinstance(event, Collective):
            if rank not in event.members:
                raise ScheduleError(f"rank {rank}: issues {event}, which it is not a member of")
            items.append(_Item(event))
            continue
        if not isinstance(event, Op):
            raise ScheduleError(f"rank {rank}: {event!r} is neither a computation nor a posted group")
        item = _Item(event)
        for part in event.parts():
            wait = _needs(rank, part, layout, done, forward_only)
            if wait is not None:
                if wait not in posted:
                    raise ScheduleError(f"rank {rank}: {part} runs without a posted receive of its "
                                        f"{'input' if wait[0] == 'act' else 'output gradient'} from rank "
                                        f"{wait[2][0]}")
                group = posted[wait]
                item.waits.append(group)
                comm = next(c for c in group.post.comms if c.direction == "recv" and _is(c, wait))
                item.arrivals.append((id(comm), id(group)))
        for part in event.parts():
            key = (part.op, part.chunk, part.micro_batch)
            if key in done or (part.op in "BI" and any((o, part.chunk, part.micro_batch) in done for o in "BI")):
                raise ScheduleError(f"rank {rank}: {part} runs twice")
            if part.op == "F":
                live += 1
                peak = max(peak, live)
            done[key] = True
        for part in event.parts():
            if part.op in ("B", "W") or (forward_only and part.op == "F"):
                live -= 1
        items.append(item)
    execution.live_peak[rank] = peak
    return items


def _is(comm: Comm, message) -> bool:
    return comm.payload == message[0] and comm.micro_batch == message[1]


def _post(rank: int, comm: Comm, layout: Layout, done) -> tuple:
    """(message, channel) of a posted send or receive, checked against the layout and this rank's progress."""
    payload = "act" if comm.payload == "shapes" else comm.payload
    source, target = _endpoints(layout, (rank, comm.chunk),
                                Comm(comm.direction, payload, comm.chunk, comm.micro_batch, comm.peer))
    if (source if comm.direction == "send" else target)[0] != rank or \
            (target if comm.direction == "send" else source)[0] != comm.peer:
        raise ScheduleError(f"rank {rank}: {comm} names peer {comm.peer}, but that message runs "
                            f"{source} -> {target}")
    if comm.direction == "send":
        producer = ("F", ) if payload == "act" else ("B", "I")
        if not any((op, comm.chunk, comm.micro_batch) in done for op in producer):
            raise ScheduleError(f"rank {rank}: {comm} is posted before the tensor it sends is computed")
    channel = (rank, comm.peer) if comm.direction == "send" else (comm.peer, rank)
    return _message(comm.payload, comm.micro_batch, source, target), channel


def _match(execution: Execution) -> None:
    """Pair the k-th send from a to b with b's k-th receive from a (NCCL matches in posting order)."""
    for channel in sorted(set(execution.sent) | set(execution.received)):
        sent, received = execution.sent.get(channel, []), execution.received.get(channel, [])
        sent_ids, received_ids = [m for m, _, _ in sent], [m for m, _, _ in received]
        if len(set(sent_ids)) != len(sent_ids):
            twice = next(m for m in sent_ids if sent_ids.count(m) > 1)
            raise ScheduleError(f"rank {channel[0]}: {_describe_message(twice)} is sent twice")
        if sorted(sent_ids) != sorted(received_ids):
            never_received = [m for m in sent_ids if m not in received_ids]
            never_sent = [m for m in received_ids if m not in sent_ids]
            problem = (f"{_describe_message(never_sent[0])} is received but never sent"
                       if never_sent else f"{_describe_message(never_received[0])} is sent but never received")
            raise ScheduleError(f"ranks {channel[0]} -> {channel[1]}: {problem}")
        if sent_ids != received_ids:
            at = next(i for i, (s, r) in enumerate(zip(sent_ids, received_ids)) if s != r)
            raise ScheduleError(f"ranks {channel[0]} -> {channel[1]}: message {at} is sent as {sent_ids[at]} but "
                                f"received as {received_ids[at]}; point-to-point messages match in posting order")
        for (_, send, send_group), (_, recv, recv_group) in zip(sent, received):
            send_group.matches.append((send, recv_group))
            recv_group.matches.append((recv, send_group))
        execution.sent[channel], execution.received[channel] = sent_ids, received_ids


def _meet(items) -> List[_Meeting]:
    """Pair every rank's k-th collective on a communicator with the other members' k-th (issue order)."""
    meetings, by_communicator = [], {}
    for rank, rank_items in enumerate(items):
        seen = {}
        for item in rank_items:
            if not isinstance(item.event, Collective):
                continue
            c = item.event
            key = (c.communicator, c.members)
            index = seen.get(key, 0)
            seen[key] = index + 1
            row = by_communicator.setdefault(key, [])
            if index == len(row):
                row.append(_Meeting(c, index))
                meetings.append(row[-1])
            meeting = row[index]
            if meeting.collective.kind != c.kind:
                raise ScheduleError(f"rank {rank} issues {c.kind} as collective #{index} on the {c.communicator} "
                                    f"communicator {list(c.members)}, where rank {min(meeting.items)} issues "
                                    f"{meeting.collective.kind}")
            meeting.items[rank] = item
            item.meeting = meeting
    for meeting in meetings:
        absent = [r for r in meeting.collective.members if r not in meeting.items]
        if absent:
            raise ScheduleError(f"{meeting} is issued by ranks {sorted(meeting.items)} but never by its members "
                                f"{absent}")
    return meetings


def _crossed(items, value) -> Optional[str]:
    """A cycle through collectives alone (every stuck rank waits in one): where each waits, and for whom."""
    waiting = {}
    for rank, rank_items in enumerate(items):
        if all(value[n] is not None for i in rank_items for n in (i.start, i.end) if n >= 0):
            continue
        item = next((i for i in rank_items
                     if i.meeting is not None and value[i.start] is not None and value[i.meeting.node] is None), None)
        if item is None:
            return None  # this rank is stuck elsewhere: a point-to-point deadlock
        waiting[rank] = item.meeting
    lines = []
    for rank, meeting in waiting.items():
        absent = [r for r, other in meeting.items.items() if value[other.start] is None]
        lines.append(f"rank {rank} waits in {meeting} for " + ", ".join(f"rank {r}, which waits in {waiting[r]} first"
                                                                        for r in absent if r in waiting))
    return ("deadlock under NCCL's rules: ranks that share two communicators issue their collectives on them in "
            "different orders (each communicator runs in issue order on its own stream, a collective is a rendezvous "
            "of its members): " + "; ".join(lines)) if lines else None


def _deadlock(items, value) -> str:
    """Where each stuck rank stands, and the chain of groups that holds it."""
    lines = []
    for rank, rank_items in enumerate(items):
        stuck = next((i for i in rank_items if (i.group is None or i.event.wait) and value[i.start] is None), None)
        if stuck is None:
            stuck = next((i for i in rank_items if i.group is not None and value[i.group.end] is None), None)
            if stuck is None:
                continue
        if stuck.group is not None:
            blocked = stuck.group
            where = f"its group {stuck.event}"
        else:
            blocked = next((g for g in stuck.waits if value[g.end] is None), None)
            where = f"{stuck.event}"
            if blocked is None:
                lines.append(f"rank {rank} is stuck at {where}")
                continue
        lines.append(f"rank {rank} is stuck at {where}: {_why(blocked, rank_items, value)}")
    return ("deadlock under NCCL's rules (one stream per communicator, groups in posting order, a send waits "
            "for its receive): " + "; ".join(lines))


def _why(group: _Group, rank_items, value) -> str:
    if value[group.start] is None:
        ahead = next((i.group for i in rank_items if i.group is not None and value[i.group.end] is None), None)
        if ahead is not None and ahead is not group:
            return (f"it waits for {group.post} to run, which queues behind {ahead.post}, " + _unmet(ahead, value))
        return f"{group.post} cannot start before an earlier computation"
    return f"it waits for {group.post}, " + _unmet(group, value)


def _unmet(group: _Group, value) -> str:
    unmet = [(comm, other) for comm, other in group.matches if value[other.start] is None]
    return "; ".join(f"whose {comm} needs rank {other.rank}'s group {other.post} to start" for comm, other in unmet)


def _endpoints(layout, here, comm):
    """(source location, target location) of the message a Comm at location ``here`` carries."""
    other = layout.other_end(*here, comm.micro_batch, comm.direction, comm.payload)
    pair = (here, other) if comm.direction == "send" else (other, here)
    if pair[0] is None or pair[1] is None:
        raise ScheduleError(f"rank {here[0]}: {comm} has no peer: chunk {here[1]} is at the end of the pipe")
    return pair


def _needs(rank, part: Op, layout, done, forward_only):
    """The message ``part`` receives (None if none), after checking what it needs from this rank has run."""
    here, m = (rank, part.chunk), part.micro_batch
    path = layout.path(m)
    if here not in path:
        raise ScheduleError(f"rank {rank}: {part} runs on a chunk that micro-batch {m} does not visit")
    if part.op == "W":
        if ("I", part.chunk, m) not in done:
            raise ScheduleError(f"rank {rank}: {part} runs before its input-gradient pass {part.chunk}I{m}")
        return None
    if part.op == "F":
        source, payload = layout.upstream(*here, m), "act"
    else:
        if forward_only:
            raise ScheduleError(f"rank {rank}: {part} in a forward-only schedule")
        if ("F", part.chunk, m) not in done:
            raise ScheduleError(f"rank {rank}: {part} runs before its forward {part.chunk}F{m}")
        source, payload = layout.downstream(*here, m), "grad"
    if source is None:
        return None
    if source[0] == rank:  # the neighbouring stage is on this rank: it must have run already
        wanted = ("F", ) if payload == "act" else ("B", "I")
        if not any((op, source[1], m) in done for op in wanted):
            raise ScheduleError(f"rank {rank}: {part} runs before {source[1]}{wanted[0]}{m} on the same rank")
        return None
    return _message(payload, m, source, here)
