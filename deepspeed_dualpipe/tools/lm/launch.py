"""Launch the demo job through DeepSpeed's own ``deepspeed`` launcher, on CPU when there is no GPU.

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
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
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
