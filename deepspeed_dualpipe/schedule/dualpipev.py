"""DualPipeV: DualPipe cut in half (Sea AI Lab), also in deepseek-ai/DualPipe.

Rank r holds chunk 0 = stage r and chunk 1 = stage 2P-1-r, a V: every micro-batch
enters at rank 0, runs chunk 0 down to rank P-1, turns around there (locally) and
runs chunk 1 back to rank 0, which computes the loss. No parameter is duplicated.
"""

from deepspeed_dualpipe.schedule.layout import LayoutKind
from deepspeed_dualpipe.schedule.base import ProgramSchedule, require_int, set_micro_batches
from deepspeed_dualpipe.schedule.builder import ProgramBuilder
from deepspeed_dualpipe.schedule.dualpipe import eight_steps


class DualPipeVSchedule(ProgramSchedule):
    """DualPipeV as a DeepSpeed ``PipeSchedule``: any P >= 1, M >= 2P."""

    name = "dualpipev"
    summary = "DualPipeV: DualPipe cut in half, V-shaped, no duplicated parameters"
    layout_kind = LayoutKind.V
    paired = True
    split_backward = True
    table2 = "dualpipev"

    @classmethod
    def validate(cls, stages: int, micro_batches: int) -> None:
        require_int("stages", stages, 1)
        require_int("micro_batches", micro_batches, 1)
        if micro_batches < 2 * stages:
            raise ValueError(f"dualpipev with stages={stages} needs micro_batches >= 2*stages = {2 * stages} "
                             f"(each rank holds two stages), got micro_batches={micro_batches}; "
                             f"{set_micro_batches(2 * stages)} or more")

    @classmethod
    def program(cls, b: ProgramBuilder) -> None:
        P, r = b.stages, b.rank
        eight_steps(b, ranks=P, position=r, micro_batches=b.micro_batches, near=0, middle=r == P - 1)
