"""The verifier: symbolic execution of all ranks' instruction streams, no processes.

It proves, for one (schedule, P, M), that:
- the streams cannot deadlock when a computation blocks until its received inputs
  were sent (sends and receives are posted without blocking, as in the engine);
- every send has exactly one matching receive (same micro-batch, chunk pair and
  peer), and between any two ranks messages are received in the order they are
  sent (NCCL and gloo match point-to-point messages in posting order);
- each (micro-batch, stage) gets exactly one forward and one backward (B, or I and
  later W), after its forward, with stage order along every micro-batch's path;
- no buffer slot is reused while the micro-batch in it is still needed.
It reports the peak number of live activations per rank.
"""

from dataclasses import dataclass
from typing import List

from deepspeed_dualpipe.analysis.events import Comm, Op, schedule_events
from deepspeed_dualpipe.analysis.symbolic import Costs, ScheduleError, execute
from deepspeed_dualpipe.schedule.layout import Layout


@dataclass
class Verified:
    schedule: str
    stages: int
    micro_batches: int
    peak_activations: List[int]  # live (chunk, micro-batch) activations, per rank


def verify(schedule: str, stages: int, micro_batches: int, forward_only: bool = False) -> Verified:
    """Verify the named schedule; raises :class:`ScheduleError` naming the first violation."""
    layout, streams = schedule_events(schedule, stages, micro_batches, forward_only)
    peaks = verify_streams(streams, layout, forward_only)
    return Verified(schedule, stages, micro_batches, peaks)


def verify_streams(streams: List[list], layout: Layout, forward_only: bool = False) -> List[int]:
    """Verify per-rank event streams; returns the peak live activations per rank."""
    if len(streams) != layout.ranks:
        raise ScheduleError(f"expected {layout.ranks} rank streams, got {len(streams)}")
    execution = execute(streams, layout, Costs(), forward_only)
    for rank, events in enumerate(streams):
        _check_complete(rank, [e for e in events if isinstance(e, Op)], layout, forward_only)
        _check_buffers(rank, events)
    _check_channels(execution)
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


def _check_channels(execution) -> None:
    for channel in sorted(set(execution.sent) | set(execution.received)):
        sent, received = execution.sent.get(channel, []), execution.received.get(channel, [])
        if sorted(sent) != sorted(received):
            unmatched = set(sent) ^ set(received)
            raise ScheduleError(f"ranks {channel[0]} -> {channel[1]}: unmatched messages {sorted(unmatched)[:3]}")
        if sent != received:
            at = next(i for i, (s, r) in enumerate(zip(sent, received)) if s != r)
            raise ScheduleError(f"ranks {channel[0]} -> {channel[1]}: message {at} is sent as {sent[at]} but "
                                f"received as {received[at]}; point-to-point messages match in posting order")


__all__ = ["verify", "verify_streams", "Verified", "ScheduleError", "Comm"]
