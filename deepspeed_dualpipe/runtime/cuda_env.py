"""Start-up warnings about the CUDA environment a schedule's overlap depends on.

``CUDA_DEVICE_MAX_CONNECTIONS`` is how many hardware work queues the device gives the process's streams
(CUDA's default 8). Megatron-DeepSpeed setups export it as 1, so that its tensor-parallel communication kernels
are queued before the GEMMs that follow them. With one queue every stream is behind the same queue: a kernel
queued on the compute stream behind a stream-side wait (an all-to-all's ``work.wait()``) blocks NCCL's kernels
queued later on another stream, and the overlapped pairs of DualPipe, DualPipeV and interleaved 1F1B-overlap
run their all-to-alls in issue order instead of under the other micro-batch's compute.
"""

import os
from typing import Mapping, Optional

from deepspeed.utils import logger

from deepspeed_dualpipe.schedule.registry import get_spec

VARIABLE = "CUDA_DEVICE_MAX_CONNECTIONS"


def has_overlapped_pairs(schedule: str) -> bool:
    """True if ``schedule`` runs overlapped forward-backward pairs: its class's ``paired`` fact, which
    tests/unit/test_schedules.py checks against every rank's instructions (no schedule is rebuilt here)."""
    return get_spec(schedule).paired


def connections_warning(env: Mapping[str, str], pairs: bool) -> Optional[str]:
    """The warning for ``env`` when the schedule has overlapped ``pairs``, or None."""
    if not pairs or env.get(VARIABLE, "").strip() != "1":
        return None
    return (f"deepspeed_dualpipe: {VARIABLE}=1 puts every CUDA stream behind one hardware queue, so the "
            f"all-to-alls of this schedule's overlapped pairs run in issue order instead of under the other "
            f"micro-batch's compute; unset it (CUDA's default, 8) or set it to 8 or more for the plugin's "
            f"schedules (docs/gpu.md)")


def warn_about_connections(engine, env: Mapping[str, str] = os.environ) -> Optional[str]:
    """At start-up, on CUDA: log :func:`connections_warning` for ``engine``'s schedule (returned, or None)."""
    import torch
    if torch.device(engine.device).type != "cuda" or env.get(VARIABLE) is None:
        return None
    message = connections_warning(env, has_overlapped_pairs(engine.schedule_name))
    if message is not None:
        logger.warning(message)
    return message


__all__ = ["VARIABLE", "has_overlapped_pairs", "connections_warning", "warn_about_connections"]
