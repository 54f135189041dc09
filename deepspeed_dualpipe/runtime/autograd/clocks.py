"""The clocks the step drivers record phases with (:mod:`deepspeed_dualpipe.runtime.autograd.steps`).

A recorded phase is ``(label, start, end)`` in seconds: a compute step of one micro-batch, or one of
its all-to-alls from launch to completion. What "completion" means depends on where the work runs:

- :class:`HostClock` (CPU, gloo): ``time.perf_counter``. An all-to-all completes when the backend's
  completion callback fires (:attr:`~deepspeed_dualpipe.runtime.autograd.tape.Pending.completed`),
  not when the engine waits for it; compute steps leave out the time the step blocked in ``wait()``.
- :class:`CudaClock` (NCCL): CUDA events. Compute steps are timed on the compute stream; an
  all-to-all's completion on a side stream made to wait for NCCL's stream (``work.wait()`` under that
  stream), so the event fires when the collective's kernel ends. ``wait()`` on CUDA only makes the
  compute stream wait, and the time it idles there is left out of the step as on the host. Events
  are turned into seconds once, at the end of the recorded pair, with one synchronisation: recording
  on CUDA is for profiling, not for every step.
"""

from __future__ import annotations

import time
from typing import List, Optional

import torch


class HostClock:
    """Timestamps on the host (``time.perf_counter``)."""

    now = staticmethod(time.perf_counter)
    synchronizations = 0

    @staticmethod
    def watch(pending) -> None:
        """Stamp its completion from the backend's callback (a CUDA future would complete when queued)."""
        pending.watch_completion()

    @staticmethod
    def launch(pending) -> float:
        return pending.start

    @staticmethod
    def completion(pending) -> Optional[float]:
        return pending.completed

    def resolve(self, records: List[tuple]) -> List[tuple]:
        return records


class CudaClock:
    """Timestamps as CUDA events, resolved into host-clock seconds by :meth:`resolve`."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._side_stream = None  # made on the first all-to-all watched
        self._base = self.now()
        self._base_host = time.perf_counter()
        self.synchronizations = 0  # how often resolve() waited for the device (once per recorded step)

    def _event(self):
        """A timing event recorded now on the compute stream (a seam: tests give a fake device)."""
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    @property
    def _side(self):
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=self.device)
        return self._side_stream

    def now(self):
        return self._event()

    def watch(self, pending) -> None:
        """Record the all-to-all's completion on the side stream, which waits for NCCL's end event."""
        work = pending._work
        pending.clock = self
        pending.device_launched = self.now()  # just after the launch: NCCL's stream starts after this point
        if work is None:
            pending.device_completed = pending.device_launched
            return
        with torch.cuda.stream(self._side):
            work.wait()  # NCCL: the side stream waits for the collective's end event; the host does not
            done = torch.cuda.Event(enable_timing=True)
            done.record(self._side)
        pending.device_completed = done

    @staticmethod
    def launch(pending):
        return pending.device_launched

    @staticmethod
    def completion(pending):
        return pending.device_completed

    def resolve(self, records: List[tuple]) -> List[tuple]:
        """``(label, start, end)`` records with their events turned into seconds, after one synchronisation:
        a recorded step resolves everything it stamped here once, at its end."""
        self._synchronize()
        self.synchronizations += 1

        def seconds(t):
            if t is None or isinstance(t, (int, float)):
                return t
            return self._base_host + self._base.elapsed_time(t) / 1e3

        return [(label, seconds(start), seconds(end)) for label, start, end in records]


def clock_for(device=None):
    """The clock for work on ``device`` (``None``: the host)."""
    if device is not None and torch.device(device).type == "cuda":
        return CudaClock(device)
    return HostClock()


__all__ = ["HostClock", "CudaClock", "clock_for"]
