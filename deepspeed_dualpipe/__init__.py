"""DeepSeek-V3's DualPipe and DualPipeV pipeline schedules for DeepSpeed.

Schedules are data: a schedule is a DeepSpeed ``PipeSchedule`` whose instruction
stream can be printed, verified, simulated, drawn and executed.

Layers, each importing only those below it::

    tools/        the apps behind ``python -m deepspeed_dualpipe`` (demo LM, ablations, benchmarks)
    integration/  initialize/install, recording and conversion of the user's PipelineModule
    runtime/      DualPipeEngine, its p2p and gradient work, DualPipeModule, trace, autograd/
    checkpoint/   atomic saves and cross-schedule loads (used by the runtime)
    analysis/     events, symbolic execution, verifier, simulator, rendering (no processes)
    schedule/     layouts, instructions and the schedules themselves (pure data)
"""

__version__ = "0.3.0"

from deepspeed_dualpipe.schedule import SCHEDULES, build_schedule  # noqa: E402,F401
from deepspeed_dualpipe.integration.initialize import initialize, install, installed, uninstall  # noqa: E402,F401
from deepspeed_dualpipe.integration.recording import record_pipeline_module_args  # noqa: E402

# Remember every PipelineModule's constructor arguments, so that initialize() can rebuild a
# user's model for the schedule its config names.
record_pipeline_module_args()
# DeepSpeed's own engine.load_checkpoint checks the plugin's manifest from now on (checkpoint/guard.py).
from deepspeed_dualpipe.checkpoint import guard as _load_guard  # noqa: E402

_load_guard.install()


def __getattr__(name):
    # The engine and module pull in DeepSpeed's runtime: import them on first use only.
    if name == "DualPipeEngine":
        from deepspeed_dualpipe.runtime.engine import DualPipeEngine
        return DualPipeEngine
    if name == "DualPipeModule":
        from deepspeed_dualpipe.runtime.module import DualPipeModule
        return DualPipeModule
    raise AttributeError(name)
