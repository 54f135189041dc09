"""1F1B on the plugin's engine (PipeDream-Flush, Narayanan et al. 2021): DeepSpeed's own 1F1B order, run by
``DualPipeEngine`` instead of DeepSpeed's ``PipelineEngine``.

Rank r runs min(P-1-r, M) warm-up forwards, then alternates one forward and one full backward, and drains the
remaining backwards. The computations are those of DeepSpeed's ``TrainSchedule`` ("1f1b"), which stays the
baseline; this one lets a ratio compare schedules on the same engine (``bench``: ``x plugin-1f1b``).
"""

from deepspeed_dualpipe.schedule.base import ProgramSchedule
from deepspeed_dualpipe.schedule.builder import ProgramBuilder
from deepspeed_dualpipe.schedule.layout import LayoutKind


class Plugin1F1BSchedule(ProgramSchedule):
    """1F1B as a program of the builder's verbs: any P >= 1, M >= 1."""

    name = "plugin-1f1b"
    summary = "1F1B on the plugin's engine: DeepSpeed's 1F1B order, for ratios against the same engine"
    layout_kind = LayoutKind.LINEAR
    table2 = "1f1b"

    @classmethod
    def program(cls, b: ProgramBuilder) -> None:
        P, r, M = b.stages, b.rank, b.micro_batches
        warmup = min(P - 1 - r, M)
        for _ in range(warmup):
            b.forward(0)
        for _ in range(M - warmup):
            b.forward(0)
            b.backward(0)
        for _ in range(warmup):
            b.backward(0)
