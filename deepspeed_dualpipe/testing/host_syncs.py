"""Count host synchronisations: the calls that make the CPU wait for the device (on a GPU, a full drain).

``count_host_syncs()`` is a context manager that counts, while it is open, the calls of the tensor
methods that read a value on the host (``item``, ``tolist``, ``cpu``, ``numpy``, and ``bool()``,
``int()``, ``float()`` of a tensor) and of the accelerator's ``synchronize``. On CPU nothing waits, but
the same calls would on a GPU: counting them in a CPU test bounds what a GPU run would stall on.
"""

import contextlib
from collections import Counter

import torch

METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


@contextlib.contextmanager
def count_host_syncs():
    """Yields a ``Counter`` {call name: count} that fills while the context is open."""
    from deepspeed.accelerator import get_accelerator
    counts = Counter()
    accelerator = get_accelerator()
    saved = {name: getattr(torch.Tensor, name) for name in METHODS}
    saved_sync = (accelerator.synchronize, torch.cuda.synchronize)

    def counting(name, original):

        def call(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        return call

    try:
        for name, original in saved.items():
            setattr(torch.Tensor, name, counting(name, original))
        accelerator.synchronize = counting("synchronize", saved_sync[0])
        torch.cuda.synchronize = counting("synchronize", saved_sync[1])
        yield counts
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
        accelerator.synchronize, torch.cuda.synchronize = saved_sync


__all__ = ["count_host_syncs", "METHODS"]
