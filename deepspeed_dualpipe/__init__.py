"""DeepSeek-V3's DualPipe and DualPipeV pipeline schedules for DeepSpeed.

Schedules are data: a schedule is a DeepSpeed ``PipeSchedule`` whose instruction
stream can be printed, verified, simulated, drawn and executed.
"""

__version__ = "0.1.0"

from deepspeed_dualpipe.schedule import SCHEDULES, build_schedule  # noqa: E402,F401
from deepspeed_dualpipe.integration.initialize import initialize, install, installed, uninstall  # noqa: E402,F401
from deepspeed_dualpipe.integration.initialize import record_pipeline_module_args  # noqa: E402

# Remember every PipelineModule's constructor arguments, so that initialize() can rebuild a
# user's model for the schedule its config names.
record_pipeline_module_args()


def __getattr__(name):
    # The engine and module pull in DeepSpeed's runtime: import them on first use only.
    if name in ("DualPipeModule", "DualPipeEngine"):
        from deepspeed_dualpipe.runtime.engine import DualPipeEngine
        from deepspeed_dualpipe.runtime.module import DualPipeModule
        return {"DualPipeModule": DualPipeModule, "DualPipeEngine": DualPipeEngine}[name]
    raise AttributeError(name)
