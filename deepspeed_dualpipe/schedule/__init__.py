"""Schedules as plain data: layouts, instructions, the builder's verbs and one file per schedule.

Nothing here starts a process or touches a tensor: a schedule is a pure function
(stages, micro-batches, rank) -> instruction stream, read by the analysis and run by the runtime.
"""

from deepspeed_dualpipe.schedule.registry import (SCHEDULES, ScheduleSpec, build_schedule, get_spec,  # noqa: F401
                                                  rank_steps)

__all__ = ["SCHEDULES", "ScheduleSpec", "build_schedule", "get_spec", "rank_steps"]
