"""ZB-H1 (ZeroBubble, Qi et al. 2023): 1F1B with backward split into I and W.

Rank r runs 1F1B, but splits each backward into an input-gradient pass I, sent on at
once, and a weight pass W that it holds back: r of them, the number of steps by which
its first backward arrives earlier than on the last rank... wait, later. The held-back
W passes fill the cool-down bubble, so the bubble shrinks from (P-1)(F+B) to
(P-1)(F+B-2W) with the same peak activation memory as 1F1B on rank 0.
"""

from deepspeed_dualpipe.schedules.base import ProgramSchedule
from deepspeed_dualpipe.schedules.builder import ProgramBuilder


class ZeroBubbleH1Schedule(ProgramSchedule):
    """ZB-H1 as a DeepSpeed ``PipeSchedule``: any P >= 1, M >= 1."""

    name = "zb1p"
    layout_kind = "linear"

    def program(self, b: ProgramBuilder) -> None:
        P, r, M = self.stages, self.stage_id, self.micro_batches
        split = r > 0  # rank 0 has no bubble to fill: its W would follow its I at once
        warmup = min(P - 1 - r, M)
        held_back = min(r, M - warmup)

        # Warm-up: forwards only, as in 1F1B.
        for _ in range(warmup):
            b.forward(0)
        # Steady state: one forward, one backward; the first `held_back` weight passes wait.
        for i in range(M - warmup):
            b.forward(0)
            b.backward(0, zero_bubble=split)
            if split and i >= held_back:
                b.weight()
        # Cool-down: the remaining backwards, each with a weight pass, then the held-back ones.
        for _ in range(warmup):
            b.backward(0, zero_bubble=split)
            if split:
                b.weight()
        while b.pending_weights():
            b.weight()
