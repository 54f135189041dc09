"""DeepSeek-V3's DualPipe and DualPipeV pipeline schedules for DeepSpeed.

Schedules are data: a schedule is a DeepSpeed ``PipeSchedule`` whose instruction
stream can be printed, verified, simulated, drawn and executed.
"""

__version__ = "0.1.0"

from deepspeed_dualpipe.schedules import SCHEDULES, build_schedule  # noqa: E402,F401
