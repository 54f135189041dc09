"""An emulated interconnect for the bench (``--a2a-wire``): all-to-alls that take wire time, not CPU.

On a CPU machine gloo's all-to-all is CPU work: loopback copies on the same cores that compute, so
overlap cannot hide it, only move it. On GPUs the all-to-all runs over NVLink or RDMA, and what it
costs the ranks is *time on the wire*, during which they can compute. This module emulates that:

- the real all-to-all still runs (gloo moves the bytes, so the data the layers receive is real);
- its completion is released only at ``launch + wire_s``, by one timer thread per process that
  sleeps until then: waiting for it costs no CPU, and the rank can compute meanwhile;
- if gloo takes longer than ``wire_s``, the all-to-all completes when gloo does (so keep the bytes
  small: the bench defaults to 64 KiB in this mode).

Every ``deepspeed.comm.all_to_all_single`` of the process goes through it once :func:`install` has
run (the tape and ``InlineTape`` look that function up at each call). The work handle it returns
supports ``wait()``, ``is_completed()`` and ``get_future()``, whose future completes at the release,
so :class:`~deepspeed_dualpipe.runtime.autograd.tape.Pending` stamps that moment as the completion.

It is an emulation: every all-to-all takes the same ``wire_s`` whatever its size, and concurrent
all-to-alls do not share a link. With sleeping layers for compute
(:mod:`~deepspeed_dualpipe.tools.bench.layers`), what is left to measure is what the plugin controls:
whether the engine's interleaving hides the wire.
"""

import heapq
import itertools
import threading
import time

import torch


class _Timer:
    """One daemon thread that runs callbacks at given ``time.perf_counter`` moments, asleep in between."""

    def __init__(self):
        self._heap, self._cond, self._order = [], threading.Condition(), itertools.count()
        threading.Thread(target=self._loop, name="a2a-wire", daemon=True).start()

    def at(self, when: float, callback) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._order), callback))
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.perf_counter():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.perf_counter())
                _, _, callback = heapq.heappop(self._heap)
            callback()


class WireWork:
    """The work handle of an all-to-all on the emulated wire: done when gloo is done and ``wire_s`` has
    passed since the launch, whichever is later."""

    def __init__(self, work, launched: float, wire_s: float, timer: _Timer):
        self._work = work
        self.release_at = launched + wire_s
        self._released = threading.Event()
        self._future = torch.futures.Future()
        work.get_future().add_done_callback(lambda _: timer.at(self.release_at, self._release))

    def _release(self) -> None:
        self._released.set()
        self._future.set_result(None)

    def wait(self, timeout=None) -> bool:
        self._work.wait() if timeout is None else self._work.wait(timeout)  # raises what gloo raised
        self._released.wait()
        return True

    def is_completed(self) -> bool:
        return self._released.is_set()

    def get_future(self):
        return self._future


_TIMER = None


def install(wire_s: float) -> None:
    """Route every ``deepspeed.comm.all_to_all_single`` of this process over a wire of ``wire_s`` seconds."""
    global _TIMER
    from deepspeed import comm
    if wire_s <= 0:
        raise ValueError(f"--a2a-wire must be a positive time, got {wire_s} s")
    original = comm.all_to_all_single
    if getattr(original, "_wire_s", None) is not None:
        raise RuntimeError("the emulated wire is installed already")
    _TIMER = _TIMER or _Timer()

    def over_the_wire(*args, async_op=False, **kwargs):
        launched = time.perf_counter()
        work = WireWork(original(*args, async_op=True, **kwargs), launched, wire_s, _TIMER)
        if async_op:
            return work
        work.wait()
        return None

    over_the_wire._wire_s = wire_s
    comm.all_to_all_single = over_the_wire


__all__ = ["WireWork", "install"]
