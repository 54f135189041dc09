"""Strict mode for any job, from the environment: ``DS_DUALPIPE_STRICT_P2P=<seconds>`` on every rank.

The test launcher installs strict mode itself (``run_ranks(..., strict_p2p=...)``); a job started by another
launcher (DeepSpeed's, running Megatron-DeepSpeed's unchanged ``pretrain_gpt.py``) gets it here, when the script
calls ``deepspeed.initialize``: every rank reaches that call at the same point of its program and
``torch.distributed`` runs by then, so every rank starts counting its operations from the same place.
"""

import os
import sys

from deepspeed_dualpipe.testing import strict_p2p


def strict_mode_from_env() -> None:
    """Install strict mode (:mod:`deepspeed_dualpipe.testing.strict_p2p`) if the environment asks for it; once."""
    if not os.environ.get(strict_p2p.ENV) or strict_p2p.installed():
        return
    import torch.distributed
    import deepspeed.comm
    if not torch.distributed.is_initialized():
        raise RuntimeError(f"{strict_p2p.ENV} is set, but torch.distributed is not initialised when "
                           f"deepspeed.initialize is called: call deepspeed.init_distributed() first")
    if deepspeed.comm.comm.cdb is None:  # DeepSpeed's wrapper of the running process group (what it would build)
        deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)
    strict_p2p.install_from_env()
    # printed, not logged: a job's launcher may silence DeepSpeed's logger on the ranks, and a run that is slower
    # on purpose should say so
    print(
        f"deepspeed_dualpipe: strict mode: rank {torch.distributed.get_rank()} runs under NCCL's rules, emulated "
        f"on gloo ({strict_p2p.ENV}={os.environ[strict_p2p.ENV]} s)",
        file=sys.stderr,
        flush=True)
