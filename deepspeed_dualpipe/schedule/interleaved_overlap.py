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

from deepspeed_dualpipe.schedule.interleaved import Interleaved1F1BSchedule


class OverlappedInterleaved1F1BSchedule(Interleaved1F1BSchedule):
    """Interleaved 1F1B with overlapped F&B pairs as a DeepSpeed ``PipeSchedule`` (same shapes as
    interleaved 1F1B: any P >= 1, M a multiple of max(1, M // P))."""

    name = "interleaved-1f1b-overlap"
    summary = ("Interleaved 1F1B whose steady state runs overlapped F&B pairs (Megatron-core's combined 1F1B for "
               "MoE all-to-all overlap; for ablations)")
    paired = True
    table2 = None  # Table 2 has no row for it
    torch_inexpressible = "no mapping to torch's format is defined for it"
