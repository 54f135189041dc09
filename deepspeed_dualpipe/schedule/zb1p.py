"""ZB-H1 (ZeroBubble, Qi et al. 2023): 1F1B with backward split into I and W.

Rank r runs 1F1B, but splits each backward into an input-gradient pass I, which it
sends on at once, and a weight pass W. It postpones its first r weight passes, so that
input gradients travel upstream sooner; they run at the end, where 1F1B leaves rank r
idle. The bubble shrinks from (P-1)(F+B) to (P-1)(F+B-2W); every rank holds at most P
activations, 1F1B's maximum (reached there on rank 0 only).
"""

from deepspeed_dualpipe.schedule.layout import LayoutKind
from deepspeed_dualpipe.schedule.base import ProgramSchedule
from deepspeed_dualpipe.schedule.builder import ProgramBuilder


class ZeroBubbleH1Schedule(ProgramSchedule):
    """ZB-H1 as a DeepSpeed ``PipeSchedule``: any P >= 1, M >= 1."""

    name = "zb1p"
    summary = "ZeroBubble ZB-H1: backward split into I and W, W deferred"
    layout_kind = LayoutKind.LINEAR
    split_backward = True
    table2 = "zb1p"

    @classmethod
    def program(cls, b: ProgramBuilder) -> None:
        P, r, M = b.stages, b.rank, b.micro_batches
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
