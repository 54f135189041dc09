"""Memory per rank, read from the allocator: parameter bytes, and the activation bytes of one step.

The one meter of the project: the monitor and ``dualpipe.profile_step`` (through
:func:`.profile.record_step`), ``measure``, ``bench``, ``ablate`` and the demo all read memory with it.
It keeps no tensor of its own and tracks no list of tensors: it reads what the allocator holds.

- **CUDA**: ``torch.cuda.memory_allocated()`` before the step and after every instruction, and
  ``torch.cuda.max_memory_allocated()`` within each instruction (its peak is reset before each).
- **CPU** (``"malloc"``, where the C library is glibc): torch's CPU allocator takes its blocks
  from ``malloc``; glibc's ``mallinfo2()`` gives the bytes in use over every thread and arena
  (``uordblks + hblkhd``), read before the step and after every instruction. It counts what other
  threads free (gloo frees an all-to-all's buffers on its own threads) and also the few KiB of the
  autograd graph and of C++ objects that a step creates. No high-water mark within instructions.
- **CPU** (``"profiler"``, elsewhere): torch's profiler with ``profile_memory=True`` records the CPU
  allocator's own events (``[memory]``, each a signed ``nbytes`` at a time); their running sum is
  the bytes in use. Each instruction is marked with a ``record_function`` range, so the sum can be
  read at its end and its maximum within it. It sees only this thread: what another thread frees
  stays counted (the figures come out high with all-to-alls). The allocator learns a block's size
  only while a profiler records, so a block allocated before would be freed unseen (or, where an
  earlier session left a stale size at its address, with that size): :meth:`MemoryMeter.prime`
  starts the profiler one step early (that step runs as usual; its events are not used), so that
  what the measured step frees of what the step before left is counted. Tensors that outlive more
  than one step and are freed in the measured one may still be miscounted.

Instructions are sampled through the one hook on an engine's instructions,
:func:`~deepspeed_dualpipe.runtime.trace.around_each_instruction`, so DeepSpeed's engines and the
plugin's are measured alike.

What the figures mean (all relative to the moment the step starts, when the rank holds its
parameters and optimizer state, and gradients only if the engine keeps them between steps):

- ``peak``: the most bytes in use after any instruction, less the gradient bytes allocated since
  the start (gradients are not activations). This is the activation figure the targets use;
- ``high_water``: the allocator's most bytes within any instruction (temporaries inside an
  operation included), less the gradient bytes held when that instruction began: an upper bound
  (``None`` where it is not read: ``"malloc"``);
- ``left``: bytes still in use after the step, less the gradients still held: what a step leaves
  behind beyond parameters, gradients and optimizer state.

Measuring slows a step down (the hooks, and the profiler's recording of every operation), so it
runs on a step of its own, not a timed one.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import gc
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

from deepspeed_dualpipe.runtime.trace import around_each_instruction

_MARK = "deepspeed_dualpipe.instruction"
_STEP = "deepspeed_dualpipe.measured_step"


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameters of ``module``."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in module.parameters()}.values())


def gradient_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct gradient storages of ``module``'s parameters."""
    storages = {}
    for p in module.parameters():
        if p.grad is not None:
            storage = p.grad.untyped_storage()
            storages[(p.grad.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=None)
def _mallinfo2():
    try:
        function = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None
    function.restype = _MallInfo2
    return function


def malloc_bytes() -> Optional[int]:
    """Bytes ``malloc`` has handed out and not had back, over all threads (glibc ``mallinfo2``); ``None``
    where the C library does not say."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def default_cpu_source() -> str:
    """How the meter reads the CPU allocator here: ``"malloc"`` where glibc says, else ``"profiler"``."""
    return "malloc" if _mallinfo2() is not None else "profiler"


@dataclass
class Sample:
    """One instruction: its name, its ``chunk`` and ``micro_batch`` when it names them (else ``None``),
    the activation bytes after it and the high-water mark within it (see the module docstring)."""

    instruction: str
    chunk: Optional[int]
    micro_batch: Optional[int]
    after: int
    high_water: int


@dataclass
class StepMemory:
    """What :meth:`MemoryMeter.measure` found for one step (bytes)."""

    device: str  # how it was read: "cuda", "malloc" or "profiler"
    peak: int = 0
    peak_at: Optional[str] = None  # the instruction after which ``peak`` was reached, e.g. "BackwardInput(1, 3)"
    high_water: Optional[int] = 0
    left: int = 0
    samples: List[Sample] = field(default_factory=list)

    @property
    def upper_bound(self) -> int:
        """``high_water`` where it was read (temporaries inside operations included), else ``peak``."""
        return self.peak if self.high_water is None else max(self.high_water, self.peak)

    def as_dict(self) -> dict:
        return {
            "device": self.device,
            "peak": self.peak,
            "peak_at": self.peak_at,
            "high_water": self.high_water,
            "left": self.left
        }


def _label(kind, kwargs) -> Tuple[str, Optional[int], Optional[int]]:
    chunk = kwargs.get("chunk", kwargs.get("forward_chunk"))
    micro_batch = kwargs.get("micro_batch", kwargs.get("forward_micro_batch"))
    return kind.__name__, chunk, micro_batch


class MemoryMeter:
    """Measures one engine's step at the allocator (see the module docstring).

    ``meter.measure(lambda: engine.train_batch(data))`` runs the step and returns its result;
    ``meter.result`` is then a :class:`StepMemory`. ``module``: whose gradients are subtracted
    (default ``engine.module``). ``cpu``: how to read the CPU allocator (``"malloc"`` or
    ``"profiler"``; default :func:`default_cpu_source`). With the profiler, call :meth:`prime` before
    the step that precedes the measured one (or pass ``prime=`` to :meth:`measure`); without it the
    tensors that step leaves to the measured one are freed unseen, and the figures come out too high.
    """

    def __init__(self,
                 engine,
                 module: Optional[torch.nn.Module] = None,
                 device: Optional[torch.device] = None,
                 cpu: Optional[str] = None):
        self.engine = engine
        self.module = module if module is not None else engine.module
        if device is None:
            device = getattr(engine, "device", None)
        self.device = torch.device(device if device is not None else "cpu")
        self.cpu = cpu or default_cpu_source()
        if self.cpu not in ("malloc", "profiler"):
            raise ValueError(f"MemoryMeter(cpu={self.cpu!r}): 'malloc' or 'profiler'")
        if self.cpu == "malloc" and malloc_bytes() is None:
            raise ValueError("MemoryMeter(cpu='malloc') needs glibc's mallinfo2 (glibc >= 2.33); use 'profiler'")
        self.result: Optional[StepMemory] = None
        self.seconds = 0.0
        self._profiler = None

    def prime(self) -> None:
        """CPU profiler: start recording the allocator now, so the next :meth:`measure` sees what is freed of
        what is allocated from here on (a no-op elsewhere)."""
        if self.device.type == "cpu" and self.cpu == "profiler" and self._profiler is None:
            from torch.profiler import ProfilerActivity, profile
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()

    def measure(self, step: Callable[[], object], prime: Optional[Callable[[], object]] = None):
        """Run ``step()`` and measure it; ``prime()``, if given, runs first, primed (see :meth:`prime`)."""
        if prime is not None:
            self.prime()
            prime()
        start = time.perf_counter()
        if self.device.type == "cuda":
            result, memory = self._measure_cuda(step)
        elif self.device.type == "cpu" and self.cpu == "malloc":
            result, memory = self._measure_malloc(step)
        elif self.device.type == "cpu":
            result, memory = self._measure_cpu(step)
        else:
            raise NotImplementedError(f"MemoryMeter reads the CUDA or the CPU allocator, not {self.device.type!r}")
        self.seconds = time.perf_counter() - start
        self.result = memory
        return result

    # ----- CUDA: the caching allocator's own counters ------------------------------------------
    def _measure_cuda(self, step):
        cuda = torch.cuda
        cuda.synchronize(self.device)
        base, grads0 = cuda.memory_allocated(self.device), gradient_bytes(self.module)
        samples, began = [], {}

        def before(kind, kwargs):
            began["grads"] = gradient_bytes(self.module) - grads0
            cuda.reset_peak_memory_stats(self.device)

        def after(kind, kwargs):
            grads = gradient_bytes(self.module) - grads0
            high = cuda.max_memory_allocated(self.device) - base - began.pop("grads", 0)
            samples.append(Sample(*_label(kind, kwargs), cuda.memory_allocated(self.device) - base - grads, high))

        with around_each_instruction(self.engine, before=before, after=after):
            result = step()
        cuda.synchronize(self.device)
        left = cuda.memory_allocated(self.device) - base - (gradient_bytes(self.module) - grads0)
        return result, _summary("cuda", samples, left)

    # ----- CPU: glibc's malloc counters ----------------------------------------------------------------
    def _measure_malloc(self, step):
        gc.collect()  # what is alive, not garbage that a collection would free
        base, grads0 = malloc_bytes(), gradient_bytes(self.module)
        samples = []

        def after(kind, kwargs):
            grads = gradient_bytes(self.module) - grads0
            samples.append(Sample(*_label(kind, kwargs), malloc_bytes() - base - grads, None))

        with around_each_instruction(self.engine, after=after):
            result = step()
        gc.collect()
        left = malloc_bytes() - base - (gradient_bytes(self.module) - grads0)
        return result, _summary("malloc", samples, left)

    # ----- CPU: the profiler's allocator events --------------------------------------------------
    def _measure_cpu(self, step):
        from torch.profiler import record_function
        self.prime()  # unprimed, the profiler starts here
        prof, self._profiler = self._profiler, None
        grads0 = gradient_bytes(self.module)
        labels, grads_before, grads_after, marks = [], [], [], []

        def before(kind, kwargs):
            labels.append(_label(kind, kwargs))
            grads_before.append(gradient_bytes(self.module) - grads0)
            mark = record_function(_MARK)
            mark.__enter__()
            marks.append(mark)

        def after(kind, kwargs):
            marks.pop().__exit__(None, None, None)
            grads_after.append(gradient_bytes(self.module) - grads0)

        try:
            with record_function(_STEP), around_each_instruction(self.engine, before=before, after=after):
                result = step()
            grads_end = gradient_bytes(self.module) - grads0
        finally:
            prof.__exit__(None, None, None)
        events = list(prof.profiler.kineto_results.events())
        step_start = min(e.start_ns() for e in events if e.name() == _STEP)
        cpu = torch._C._autograd.DeviceType.CPU
        memory = sorted((e.start_ns(), e.nbytes()) for e in events
                        if e.name() == "[memory]" and e.device_type() == cpu and e.start_ns() >= step_start)
        times = [t for t, _ in memory]
        live, total = [], 0
        for _, nbytes in memory:
            total += nbytes
            live.append(total)
        ranges = sorted((e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name() == _MARK)
        if len(ranges) != len(labels):
            raise RuntimeError(f"MemoryMeter: {len(labels)} instructions ran but the profiler recorded {len(ranges)}")

        def live_at(t):  # bytes in use once every event up to time t has happened
            i = bisect.bisect_right(times, t)
            return live[i - 1] if i else 0

        samples = []
        for (begin, end), label, g_before, g_after in zip(ranges, labels, grads_before, grads_after):
            i, j = bisect.bisect_right(times, begin), bisect.bisect_right(times, end)
            within = max(live[i:j], default=live_at(begin))
            within = max(within, live_at(begin))
            samples.append(Sample(*label, live_at(end) - g_after, within - g_before))
        return result, _summary("profiler", samples, total - grads_end)


def _summary(device: str, samples: List[Sample], left: int) -> StepMemory:
    memory = StepMemory(device, left=left, samples=samples)
    for s in samples:
        if memory.peak_at is None or s.after > memory.peak:
            where = "" if s.chunk is None else f"({s.chunk}, {s.micro_batch})"
            memory.peak, memory.peak_at = s.after, f"{s.instruction}{where}"
        if s.high_water is None or memory.high_water is None:
            memory.high_water = None
        else:
            memory.high_water = max(memory.high_water, s.high_water)
    return memory


__all__ = [
    "MemoryMeter", "StepMemory", "Sample", "parameter_bytes", "gradient_bytes", "malloc_bytes", "default_cpu_source"
]
