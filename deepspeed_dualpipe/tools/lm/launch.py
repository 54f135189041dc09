"""Launch the demo job through DeepSpeed's own ``deepspeed`` launcher: on GPUs (CUDA, NCCL) when the machine has
one per rank, else on CPU (``DS_ACCELERATOR=cpu``, gloo). A ``DS_ACCELERATOR`` already set is left alone.

DeepSpeed's CPU accelerator leaks one ``/dev/shm`` buffer set per master port; every launch here
uses a port of its own and removes that port's buffers once the job has exited.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from deepspeed_dualpipe.testing.launch import free_port
from deepspeed_dualpipe.testing.shm import release_shared_memory

ROOT = Path(__file__).resolve().parents[3]
# examples/train_moe_lm.py in a source checkout; the same job inside the package when installed from a wheel
SCRIPT = ROOT / "examples" / "train_moe_lm.py"
if not SCRIPT.is_file():
    SCRIPT = Path(__file__).resolve().with_name("job.py")


def command(config: str, ranks: int, port: int, extra: Optional[List[str]] = None) -> List[str]:
    launcher = Path(sys.executable).with_name("deepspeed")
    return [
        str(launcher), "--num_gpus",
        str(ranks), "--master_port",
        str(port),
        str(SCRIPT), "--deepspeed_config",
        str(config), *(extra or [])
    ]


def accelerator_env(env: dict, ranks: int, gpus: Optional[int] = None) -> dict:
    """``env`` for the job: DeepSpeed finds CUDA by itself (and the example script then takes NCCL) when there is a
    GPU per rank; otherwise ``DS_ACCELERATOR=cpu``, one thread per rank. ``gpus``: the count, if known."""
    if "DS_ACCELERATOR" not in env:
        if gpus is None:
            import torch
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus >= ranks:
            return env
        if gpus:
            print(
                f"deepspeed_dualpipe: {gpus} GPU(s) for {ranks} ranks: running on CPU (launch fewer ranks, or set "
                f"DS_ACCELERATOR)",
                flush=True)
        env["DS_ACCELERATOR"] = "cpu"
    if env["DS_ACCELERATOR"] == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def launch(config: str,
           ranks: int = 4,
           extra: Optional[List[str]] = None,
           port: Optional[int] = None,
           timeout: Optional[float] = None,
           capture: bool = False,
           cwd=None,
           log=None) -> subprocess.CompletedProcess:
    """Run ``deepspeed --num_gpus ranks examples/train_moe_lm.py --deepspeed_config config [extra]`` in ``cwd``
    (default: this process's), where the job writes ``runs/``; returns when it has exited. Its output goes
    to this process's, or is returned (``capture``), or written to the file ``log``."""
    port = port or free_port()
    config = str(Path(config).resolve())
    env = accelerator_env(dict(os.environ), ranks)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    try:
        if log is not None:
            with open(log, "w") as out:
                return subprocess.run(command(config, ranks, port, extra),
                                      env=env,
                                      cwd=cwd,
                                      timeout=timeout,
                                      stdout=out,
                                      stderr=subprocess.STDOUT,
                                      text=True)
        return subprocess.run(command(config, ranks, port, extra),
                              env=env,
                              cwd=cwd,
                              timeout=timeout,
                              capture_output=capture,
                              text=True)
    finally:
        release_shared_memory(port)
