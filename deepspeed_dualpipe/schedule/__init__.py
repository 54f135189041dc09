"""Schedules as plain data: layouts, instructions, the builder's verbs and one file per schedule.

Nothing here starts a process or touches a tensor: a schedule is a pure function
(stages, micro-batches, rank) -> instruction stream, read by the analysis and run by the runtime.
"""

from deepspeed_dualpipe.schedule.layout import Layout, LayoutKind  # noqa: F401
from deepspeed_dualpipe.schedule.registry import (
    DEEPSPEED_SCHEDULES,
    PAIRED_SCHEDULES,
    PLUGIN_SCHEDULES,
    SCHEDULES,  # noqa: F401
    TORCH_EXPRESSIBLE,
    EngineKind,
    ScheduleSpec,
    build_schedule,
    get_spec,
    rank_steps)

__all__ = [
    "SCHEDULES", "PLUGIN_SCHEDULES", "DEEPSPEED_SCHEDULES", "PAIRED_SCHEDULES", "TORCH_EXPRESSIBLE", "EngineKind",
    "Layout", "LayoutKind", "ScheduleSpec", "build_schedule", "get_spec", "rank_steps"
]
