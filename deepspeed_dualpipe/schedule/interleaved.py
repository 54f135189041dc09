"""Interleaved 1F1B (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", section 2.2): virtual pipeline stages.

The model is cut into 2P stages; rank r holds chunk 0 = stage r and chunk 1 = stage P+r, so every
micro-batch runs down the ranks twice, and rank P-1 hands it over to rank 0 (remotely) between the
two passes. Each rank works through its micro-batches in rounds of ``M // max(1, M // P)``: a round
of forwards on chunk 0, then the same micro-batches on chunk 1 ("depth first"), and backwards in the
reverse chunk order. After a warm-up of forwards it alternates one forward and one full backward.
The bubble shrinks to (P-1)(F+B)/v with v = 2 chunks of half a stage each: (P-1)(F+B) in the
costs of one of the 2P model stages, half of 1F1B's on the same model; activations grow by
(P-1)/v stages.

The order of every rank's computations is that of torch.distributed.pipelining's
``ScheduleInterleaved1F1B`` (torch 2.13), which relaxes Megatron's ``M % P == 0`` to
``M % max(1, M // P) == 0``; ``tests/unit/test_torch_orders.py`` checks them equal.
"""

from deepspeed_dualpipe.schedule.layout import LayoutKind
from deepspeed_dualpipe.schedule.base import ProgramSchedule, require_int, set_micro_batches
from deepspeed_dualpipe.schedule.builder import ProgramBuilder

CHUNKS = 2  # virtual stages per rank


def rounds(stages: int, micro_batches: int) -> int:
    return max(1, micro_batches // stages)


class Interleaved1F1BSchedule(ProgramSchedule):
    """Interleaved 1F1B as a DeepSpeed ``PipeSchedule``: any P >= 1, M a multiple of max(1, M // P)."""

    name = "interleaved-1f1b"
    summary = ("Interleaved 1F1B: two virtual stages per rank (r and P+r), as Megatron and "
               "torch.distributed.pipelining")
    lockstep_p2p = True
    layout_kind = LayoutKind.INTERLEAVED
    table2 = "interleaved-1f1b"
    # paired (interleaved-1f1b-overlap): the steady state runs each forward and backward as one overlapped pair

    @classmethod
    def validate(cls, stages: int, micro_batches: int) -> None:
        require_int("stages", stages, 1)
        require_int("micro_batches", micro_batches, 1)
        n = rounds(stages, micro_batches)
        if micro_batches % n:
            fits = [m for m in range(micro_batches, micro_batches + stages + 1) if m % rounds(stages, m) == 0]
            raise ValueError(f"interleaved-1f1b with stages={stages} runs micro-batches in {n} rounds of equal size "
                             f"(max(1, micro_batches // stages)), so micro_batches must be a multiple of {n}, got "
                             f"micro_batches={micro_batches}; {set_micro_batches(fits[0])}")

    @classmethod
    def program(cls, b: ProgramBuilder) -> None:
        P, r, M = b.stages, b.rank, b.micro_batches
        per_round = M // rounds(P, M)
        # Rank r starts its first backward after the forwards of every chunk of one round but the last,
        # plus two per rank downstream of it (the last chunk's forward and backward still travelling).
        # Paired: one more, so that the two halves of a pair are independent micro-batches.
        warmup = min((CHUNKS - 1) * per_round + 2 * (P - 1 - r) + int(cls.paired), CHUNKS * M)
        total = CHUNKS * M

        def forward_chunk(i):  # forwards walk the chunks up, a round at a time
            return (i // per_round) % CHUNKS

        def backward_chunk(i):  # backwards walk them down, a round at a time
            return CHUNKS - 1 - ((i - warmup) // per_round) % CHUNKS

        for i in range(warmup):  # warm-up: forwards only
            b.forward(forward_chunk(i))
        for i in range(warmup, total):  # steady state: one forward, one backward (or the two as one pair)
            if cls.paired:
                b.forward_backward(forward_chunk(i), backward_chunk(i))
            else:
                b.forward(forward_chunk(i))
                b.backward(backward_chunk(i))
        for i in range(total, total + warmup):  # cool-down: the remaining backwards
            b.backward(backward_chunk(i))
