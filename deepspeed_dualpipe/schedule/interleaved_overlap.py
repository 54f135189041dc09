"""Overlapped interleaved 1F1B: interleaved 1F1B whose steady state runs overlapped F&B pairs.

This is Megatron-core's "combined 1F1B" (``overlap_moe_expert_parallel_comm``), the schedule it uses to
hide the expert-parallel all-to-alls of one micro-batch under the computation of another. Megatron
needs virtual pipeline stages for it whenever there is more than one pipeline rank, and so does this
schedule: in plain 1F1B a rank's steady-state forward and backward are tied to the same neighbours
in the same round, so a pair that sends both results only at its end would wait a full pair for
each neighbour and halve the rate.

It is :class:`~deepspeed_dualpipe.schedule.interleaved.Interleaved1F1BSchedule` (stages r and P+r on
rank r, rounds of micro-batches) with two changes:
- every rank runs one more warm-up forward, so that the forward and the backward of each
  steady-state pair belong to different micro-batches (Megatron does the same);
- each steady-state forward and backward is one ``OverlappedForwardBackward`` (the builder's
  ``forward_backward`` verb), run by the engine as DualPipe's pairs are: with phased (MoE) chunks,
  each all-to-all of one micro-batch hides under the other's compute (``dualpipe.overlap_moe_a2a``).

Unidirectional, no zero-bubble weight split, one copy of the parameters: beside DualPipe it separates
the gain of pairing from the gain of feeding micro-batches from both ends.
"""

from deepspeed_dualpipe.schedule.builder import ProgramBuilder
from deepspeed_dualpipe.schedule.interleaved import CHUNKS, Interleaved1F1BSchedule, rounds


class OverlappedInterleaved1F1BSchedule(Interleaved1F1BSchedule):
    """Interleaved 1F1B with overlapped F&B pairs as a DeepSpeed ``PipeSchedule`` (same shapes as
    interleaved 1F1B: any P >= 1, M a multiple of max(1, M // P))."""

    name = "interleaved-1f1b-overlap"

    def program(self, b: ProgramBuilder) -> None:
        P, r, M = self.stages, self.stage_id, self.micro_batches
        per_round = M // rounds(P, M)
        total = CHUNKS * M
        # interleaved 1F1B's warm-up, plus one: the pair's two halves are then independent micro-batches
        warmup = min((CHUNKS - 1) * per_round + 2 * (P - 1 - r) + 1, total)

        def forward_chunk(i):  # forwards walk the chunks up, a round at a time
            return (i // per_round) % CHUNKS

        def backward_chunk(i):  # backwards walk them down, a round at a time
            return CHUNKS - 1 - ((i - warmup) // per_round) % CHUNKS

        for i in range(warmup):  # warm-up: forwards only
            b.forward(forward_chunk(i))
        for i in range(warmup, total):  # steady state: a forward and a backward as one overlapped pair
            b.forward_backward(forward_chunk(i), backward_chunk(i))
        for i in range(total, total + warmup):  # cool-down: the remaining backwards
            b.backward(backward_chunk(i))
