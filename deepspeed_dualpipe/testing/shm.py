"""Clean up after DeepSpeed's CPU shared-memory all-reduce.

On the CPU accelerator DeepSpeed 0.19.8 creates ``/dev/shm/deepspeed_allreduce_buffer_*`` files
named by the master port, and does not remove them when the processes exit. Many short jobs
(tests, benchmarks) on one machine fill its memory with them; launchers call
:func:`release_shared_memory` once the job's processes have exited.
"""

import glob
import os


def release_shared_memory(master_port) -> int:
    """Remove the shared-memory buffers of the job that used ``master_port``; returns how many."""
    removed = 0
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{master_port}_*"):
        try:
            os.remove(path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed
