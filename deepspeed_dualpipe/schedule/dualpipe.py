"""DualPipe: bidirectional pipeline parallelism (DeepSeek-V3 report, section 3.2.1).

Rank r holds chunk 0 = stage r, used by the forward-direction micro-batches
0 .. M/2-1 that enter at rank 0, and chunk 1 = stage P-1-r, used by the
reverse-direction micro-batches M/2 .. M-1 that enter at rank P-1. The per-rank
order of operations is that of ``DualPipe.step`` in deepseek-ai/DualPipe.
"""

from deepspeed_dualpipe.schedule.layout import LayoutKind
from deepspeed_dualpipe.schedule.base import ProgramSchedule, require_int, set_micro_batches
from deepspeed_dualpipe.schedule.builder import ProgramBuilder


def eight_steps(b: ProgramBuilder, ranks: int, position: int, micro_batches: int, near: int, middle: bool) -> None:
    """The eight steps shared by DualPipe and DualPipeV, for one rank.

    ``ranks``/``position``/``micro_batches`` are counted along one half of the pipe:
    (P/2, min(r, P-1-r), M/2) for DualPipe and (P, r, M) for DualPipeV. ``near`` is the
    chunk whose micro-batches reach this rank first, ``far`` the other one. ``middle``
    marks the rank(s) where both directions meet, which run their first main-step pair
    as a separate forward and backward.
    """
    far = 1 - near
    warmup = ranks - position - 1

    # Step 1: nF0 -- fill the pipe from the near end.
    for _ in range(2 * warmup):
        b.forward(near)

    # Step 2: nF0F1 -- alternate near and far forwards until the far micro-batches arrive.
    b.recv_forward(near)
    for i in range(position + 1):
        b.forward(near, recv=False, send=middle)
        b.recv_forward(near)
        b.forward(far, send=not middle or i < position)
        if not middle:
            b.send_forward(near)

    # Step 3: nB1W1F1 -- zero-bubble backward of far, its weight pass, next far forward.
    for _ in range(warmup):
        b.backward(far, zero_bubble=True)
        b.recv_forward(far)
        b.weight()
        b.forward(far, recv=False)

    # Step 4: nF0B1F1B0 -- the main step: overlapped forward/backward pairs in both directions.
    for i in range(micro_batches - 2 * ranks + position + 1):
        if i == 0 and middle:
            # Run the first pair as a separate forward and backward: a smaller bubble.
            b.forward(near, recv=False, send=False)
            b.send_forward(far)
            b.backward(far, send=False)
            b.send_forward(near)
            b.send_backward(far)
        else:
            b.forward_backward(near, far, recv_forward=i > 0)
        b.forward_backward(far, near)

    # Step 5: nB1F1B0 -- drain far backwards, still paired with far forwards.
    for _ in range(warmup):
        b.backward(far)
        b.forward_backward(far, near)

    # Step 6: nB1B0 -- backwards only; zero bubble switched on halfway.
    zero_bubble = False
    for i in range(position + 1):
        if i == (position + 1) // 2 and position % 2 == 1:
            zero_bubble = True
        b.backward(far, zero_bubble=zero_bubble)
        if i == (position + 1) // 2 and position % 2 == 0:
            zero_bubble = True
        b.backward(near, zero_bubble=zero_bubble)

    # Step 7: nWB0 -- weight passes fill the gaps between the last near backwards.
    for _ in range(warmup):
        b.weight()
        b.backward(near, zero_bubble=True)

    # Step 8: nW -- the remaining weight passes.
    for _ in range(position + 1):
        b.weight()


class DualPipeSchedule(ProgramSchedule):
    """DualPipe as a DeepSpeed ``PipeSchedule``: P even, M even, M >= 2P."""

    name = "dualpipe"
    summary = "DualPipe: bidirectional, mirrored chunks, overlapped F&B pairs"
    layout_kind = LayoutKind.BIDIRECTIONAL
    paired = True
    split_backward = True
    table2 = "dualpipe"
    torch_inexpressible = ("DualPipe duplicates every model stage on two ranks (rank r and its mirror P-1-r, one "
                           "copy per direction), while torch.distributed.pipelining maps each stage index to exactly "
                           "one rank")

    @classmethod
    def validate(cls, stages: int, micro_batches: int) -> None:
        require_int("stages", stages, 2)
        require_int("micro_batches", micro_batches, 1)
        if stages % 2:
            raise ValueError(f"dualpipe needs an even number of pipeline stages (rank r is paired with its mirror "
                             f"P-1-r), got stages={stages}; use {stages - 1} or {stages + 1}")
        if micro_batches % 2 or micro_batches < 2 * stages:
            raise ValueError(f"dualpipe with stages={stages} needs an even number of micro-batches >= 2*stages = "
                             f"{2 * stages} (half enter at each end), got micro_batches={micro_batches}; "
                             f"{set_micro_batches(max(2 * stages, micro_batches + micro_batches % 2))}")

    @classmethod
    def program(cls, b: ProgramBuilder) -> None:
        P, r = b.stages, b.rank
        half = P // 2
        eight_steps(b,
                    ranks=half,
                    position=min(r, P - 1 - r),
                    micro_batches=b.micro_batches // 2,
                    near=0 if r < half else 1,
                    middle=r in (half - 1, half))
