"""Memory per rank: the bytes of its parameters, and the peak of its activations during one step.

**Parameter memory** is the bytes of the distinct parameters in the rank's module: its stages, so
under DualPipe both mirror copies, and its share of the experts. Gradients and optimizer states
are not counted.

**Peak activation memory** is the largest number of bytes, at any moment of one ``train_batch``, of
distinct tensor storages (a view counts its whole storage, once) that are not parameters or
their gradients and that are held for a backward still to come, that is:

1. saved by autograd for backward: every tensor an operation of the forward keeps (found with
   ``torch.autograd.graph.saved_tensors_hooks``), under every engine, including the autograd
   islands of the plugin's MoE phases and the graphs kept for deferred weight-gradient passes;
   freed when that backward has used it;
2. held by the engine between instructions: the tensors in DeepSpeed's ``engine.pipe_buffers`` or
   the plugin's ``engine.slots`` (stage inputs and outputs, received and outgoing gradients, tapes
   of MoE phases and deferred weight passes), and in the plugin's hand-offs between the two chunks
   of a rank.

It is sampled after every saved tensor and after every instruction (the engine's buffers as of
the last instruction boundary). Not counted: temporaries that live only inside one operation or
one instruction, communication buffers, gradients of parameters, optimizer states, and allocator
overhead. The counting slows the step down, so it runs on a step of its own (not the timed one).
"""

import time
from typing import Dict, Iterable, Optional

import torch

from deepspeed_dualpipe.runtime.trace import around_each_instruction


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameters of ``module``."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in module.parameters()}.values())


def _storage(t: torch.Tensor):
    """(key, bytes) of the storage behind ``t``; None for tensors without one (sparse, meta, empty)."""
    try:
        storage = t.untyped_storage()
        return (t.device.type, storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return None


def _tensors(obj, depth: int = 0, seen=None) -> Iterable[torch.Tensor]:
    """Tensors reachable from ``obj`` through containers and plain objects' attributes (not modules)."""
    if seen is None:
        seen = set()
    if obj is None or depth > 6 or id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, torch.nn.Module)):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, depth + 1, seen)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from _tensors(value, depth + 1, seen)
    elif hasattr(obj, "__dict__"):
        yield from _tensors(vars(obj), depth + 1, seen)


class _Saved:
    """What autograd stores in place of a saved tensor; its end is the end of the tensor's saving."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor, key, meter):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        self.meter._release(self.key)


class ActivationMeter:
    """Counts one engine's activations during :meth:`measure` (see the module's docstring)."""

    def __init__(self, engine):
        self.engine = engine
        self._excluded = set()
        for p in engine.module.parameters():
            for t in (p, p.grad):
                if t is not None and _storage(t) is not None:
                    self._excluded.add(_storage(t)[0])
        self._saved: Dict[tuple, list] = {}  # key -> [references, bytes]
        self._saved_bytes = 0
        self._held: Dict[tuple, int] = {}  # engine-held storages at the last instruction boundary
        self._held_only = 0  # bytes of those not also saved
        self.peak = 0
        self.peak_at: Optional[str] = None
        self._instruction = "start"

    # ----- autograd's saved tensors ---------------------------------------------------------------
    def _pack(self, tensor):
        found = _storage(tensor)
        if found is None or found[0] in self._excluded or found[1] == 0:
            return tensor
        key, nbytes = found
        entry = self._saved.get(key)
        if entry is None:
            self._saved[key] = [1, nbytes]
            self._saved_bytes += nbytes
            self._held_only -= self._held.get(key, 0)
            self._sample()
        else:
            entry[0] += 1
        return _Saved(tensor, key, self)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _release(self, key):
        entry = self._saved.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._saved[key]
            self._saved_bytes -= entry[1]
            self._held_only += self._held.get(key, 0)

    # ----- what the engine holds between instructions ---------------------------------------------
    def _scan(self):
        held: Dict[tuple, int] = {}
        roots = [getattr(self.engine, name, None) for name in ("pipe_buffers", "slots", "handoffs")]
        for t in _tensors(roots):
            found = _storage(t)
            if found is not None and found[0] not in self._excluded:
                held[found[0]] = found[1]
        self._held = held
        self._held_only = sum(n for key, n in held.items() if key not in self._saved)
        self._sample()

    def _sample(self):
        live = self._saved_bytes + self._held_only
        if live > self.peak:
            self.peak, self.peak_at = live, self._instruction

    def _entering(self, kind, kwargs):
        self._instruction = kind.__name__

    def measure(self, step):
        """Run ``step()`` (one ``train_batch``) while counting; returns its result. :attr:`peak` is then set."""
        start = time.perf_counter()
        with around_each_instruction(self.engine, before=self._entering, after=lambda kind, kwargs: self._scan()), \
                torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            result = step()
        self.seconds = time.perf_counter() - start
        self._instruction = "end"
        self._scan()  # what outlives the step (graphs that something still references)
        self.left = self._saved_bytes + self._held_only
        return result
