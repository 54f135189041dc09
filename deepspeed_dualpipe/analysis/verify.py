"""The verifier: symbolic execution of all ranks' instruction streams, no processes.

It proves, for one (schedule, P, M), that:
- the programs the engines post (:func:`~.events.rank_program`: groups of sends and receives
  as posted, shape handshakes included, and the computations between them) cannot deadlock
  under NCCL's rules (:mod:`.symbolic`: one stream per communicator running groups in posting
  order, a send that waits for its receive, a computation that waits for what it receives), in
  the first batch of an engine (with the handshakes) and in the steady state;
- every send has exactly one matching receive (same micro-batch, chunk pair and
  peer), and between any two ranks messages are received in the order they are
  sent (NCCL and gloo match point-to-point messages in posting order);
- each (micro-batch, stage) gets exactly one forward and one backward (B, or I and
  later W), after its forward, with stage order along every micro-batch's path;
- no buffer slot is reused while the micro-batch in it is still needed;
- the collectives of the end of a batch (mirror and tied reductions, the optimizer's norm, the loss: each on its
  communicator, :func:`~.events.collectives_of`) are issued in one order by every pair of ranks that share two
  of those communicators (else a cycle of rendezvous: a deadlock on NCCL).
It reports the peak number of live activations per rank.
"""

from dataclasses import dataclass
from typing import List, Optional

from deepspeed_dualpipe.analysis.events import Collective, Comm, Op, Post, rank_events, schedule_program
from deepspeed_dualpipe.analysis.symbolic import NCCL, Costs, ScheduleError, execute
from deepspeed_dualpipe.schedule import rank_steps
from deepspeed_dualpipe.schedule.layout import Layout


@dataclass
class Verified:
    schedule: str
    stages: int
    micro_batches: int
    peak_activations: List[int]  # live (chunk, micro-batch) activations, per rank
    groups: List[int]  # groups posted per batch, all ranks together: [first batch, steady state]


def verify(schedule: str, stages: int, micro_batches: int, forward_only: bool = False) -> Verified:
    """Verify the named schedule (an engine's first batch and the steady state after it); raises
    :class:`ScheduleError` naming the first violation and the batch."""
    layout, batches = schedule_program(schedule, stages, micro_batches, forward_only, batches=2)
    steps = rank_steps(schedule, stages, micro_batches, forward_only)
    in_order = [rank_events(s, layout, r) for r, s in enumerate(steps)]
    peaks, groups = None, []
    for name, programs in zip(("first batch", "steady state"), batches):
        try:
            peaks = verify_streams(programs, layout, forward_only, instruction_order=in_order)
        except ScheduleError as error:
            raise ScheduleError(f"{schedule} P={stages} M={micro_batches} ({name}): {error}") from None
        groups.append(sum(isinstance(e, Post) for program in programs for e in program))
    return Verified(schedule, stages, micro_batches, peaks, groups)


def verify_table(schedules: List[str], stages: List[int], unbatched: bool = False) -> str:
    """A text table: each schedule at each P and M in {2P, 2P+2, 4P}, proven or not under NCCL's rules.

    ``unbatched`` adds a column for the same streams with every send and receive posted on its own.
    """
    from deepspeed_dualpipe.analysis.events import unbatched as split
    from deepspeed_dualpipe.schedule import get_spec
    width = max(len("schedule"), *map(len, schedules))
    header = f"{'schedule':<{width}} {'P':>3} {'M':>3}  {'first batch':<12} {'steady':<8} {'groups':>11}"
    rules = ("NCCL's rules: one stream per communicator, groups in posting order, a send waits for its receive, "
             "collectives meet in issue order")
    lines = [rules, header + ("  each send/recv alone" if unbatched else "")]
    for name in schedules:
        for P in stages:
            for M in sorted({2 * P, 2 * P + 2, 4 * P}):
                try:
                    get_spec(name).validate(P, M)
                except ValueError:
                    continue
                try:
                    result = verify(name, P, M)
                    cells = ["proven", "proven", f"{result.groups[0]}/{result.groups[1]}"]
                except ScheduleError as error:
                    first = "(first batch)" in str(error)
                    cells = ["DEADLOCK" if first else "proven", "-" if first else "DEADLOCK", "-"]
                row = f"{name:<{width}} {P:>3} {M:>3}  {cells[0]:<12} {cells[1]:<8} {cells[2]:>11}"
                if unbatched:
                    layout, batches = schedule_program(name, P, M, batches=2)
                    outcome = []
                    for programs in batches:
                        try:
                            verify_streams([split(p) for p in programs], layout)
                            outcome.append("proven")
                        except ScheduleError:
                            outcome.append("DEADLOCK")
                    row += f"  {'/'.join(outcome)}"
                lines.append(row)
    return "\n".join(lines)


def verify_streams(programs: List[list],
                   layout: Layout,
                   forward_only: bool = False,
                   semantics: str = NCCL,
                   instruction_order: Optional[List[list]] = None) -> List[int]:
    """Verify per-rank programs (:func:`~.events.rank_program`); returns the peak live activations per rank.

    Buffer slots are checked in ``instruction_order`` (:func:`~.events.rank_events`), where the engine takes
    and releases them (a queued send holds its tensors, not its slot), by default in the programs' order."""
    if len(programs) != layout.ranks:
        raise ScheduleError(f"expected {layout.ranks} rank streams, got {len(programs)}")
    execution = execute(programs, layout, Costs(), forward_only, semantics)
    for rank, events in enumerate(programs):
        _check_complete(rank, [e for e in events if isinstance(e, Op)], layout, forward_only)
        if instruction_order is None:
            _check_buffers(rank, [
                c for e in events if not isinstance(e, Collective) for c in (e.comms if isinstance(e, Post) else [e])
            ])
        else:
            _check_buffers(rank, instruction_order[rank])
    return execution.live_peak


def _check_complete(rank: int, ops: List[Op], layout: Layout, forward_only: bool) -> None:
    counts = {}
    for op in ops:
        for part in op.parts():
            key = (part.op, part.chunk, part.micro_batch)
            counts[key] = counts.get(key, 0) + 1
    for chunk in range(layout.chunks_per_rank):
        for m in layout.micro_batches_of(rank, chunk):
            f, b, i, w = (counts.pop((op, chunk, m), 0) for op in "FBIW")
            expected = (1, 0, 0, 0) if forward_only else None
            ok = (f, b, i, w) == expected if forward_only else (f == 1 and (b, i, w) in ((1, 0, 0), (0, 1, 1)))
            if not ok:
                raise ScheduleError(
                    f"rank {rank}: chunk {chunk}, micro-batch {m} has F x{f}, B x{b}, I x{i}, W x{w}; "
                    f"expected one F and {'nothing else' if forward_only else 'one B, or one I and one W'}")
    if counts:
        raise ScheduleError(f"rank {rank}: operations on chunks it does not hold: {sorted(counts)}")


def _check_buffers(rank: int, events: list) -> None:
    """A slot holds one (chunk, micro-batch) from its first use to its last."""
    spans = {}
    for position, event in enumerate(events):
        parts = event.parts() if isinstance(event, Op) else [event]
        for part in parts:
            if part.buffer is not None:
                key = (part.chunk, part.micro_batch)
                first, _ = spans.setdefault((part.buffer, key), (position, position))
                spans[(part.buffer, key)] = (first, position)
    by_slot = {}
    for (slot, key), span in spans.items():
        by_slot.setdefault(slot, []).append((span, key))
    for slot, uses in by_slot.items():
        uses.sort()
        for (span_a, key_a), (span_b, key_b) in zip(uses, uses[1:]):
            if span_b[0] <= span_a[1]:
                raise ScheduleError(f"rank {rank}: buffer {slot} is overwritten by chunk {key_b[0]} micro-batch "
                                    f"{key_b[1]} while chunk {key_a[0]} micro-batch {key_a[1]} still needs it")


__all__ = ["verify", "verify_table", "verify_streams", "Verified", "ScheduleError", "Comm", "Post", "Collective"]
