"""The one hook on a pipeline engine's instructions: callbacks around each, and the timing built on them.

DeepSpeed's ``PipelineEngine`` looks each instruction's ``_exec_*`` up in ``_INSTRUCTION_MAP``;
shadowing that table on the instance reaches DeepSpeed's own engines and the plugin's alike, keeps
DeepSpeed's own ``_exec_schedule`` loop (and its timers) in charge, and removing the shadow restores
the engine. Hooks nest: an inner one wraps whatever table the instance has at that moment.
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass

from deepspeed_dualpipe.runtime.autograd.clocks import HostClock, clock_for


@dataclass
class InstructionTime:
    """When one instruction ran on this rank (``time.perf_counter`` seconds) and how long it waited on peers
    (the plugin's engine counts its waits; DeepSpeed's engines block inside their communication instructions,
    so their ``waited`` is 0)."""

    instruction: object
    start: float
    end: float
    waited: float


def instruction_from(kind, kwargs):
    """An instance of ``kind`` holding ``kwargs``, as ``PipeInstruction.__init__`` would make it."""
    instruction = kind.__new__(kind)
    instruction.name = kind.__name__
    instruction.kwargs = dict(kwargs)
    for key, value in kwargs.items():
        setattr(instruction, key, value)
    return instruction


def _wrap(engine, before, after):
    """Shadow ``engine``'s instruction table with one that calls ``before(kind, kwargs)`` and
    ``after(kind, kwargs)`` around each ``_exec_*`` (``after`` even when it raises); returns the undo."""
    own = vars(engine).get("_INSTRUCTION_MAP")
    table = own if own is not None else type(engine)._INSTRUCTION_MAP

    def wrapped(kind, execute):

        def run(self, **kwargs):
            if before is not None:
                before(kind, kwargs)
            try:
                return execute(self, **kwargs)
            finally:
                if after is not None:
                    after(kind, kwargs)

        return run

    engine._INSTRUCTION_MAP = {kind: wrapped(kind, fn) for kind, fn in table.items()}

    def undo():
        if own is None:
            vars(engine).pop("_INSTRUCTION_MAP", None)
        else:
            engine._INSTRUCTION_MAP = own

    return undo


@contextmanager
def around_each_instruction(engine, before=None, after=None):
    """Within the block, ``before(kind, kwargs)`` and ``after(kind, kwargs)`` run around each instruction
    of ``engine`` (``kind``: the instruction class); ``after`` runs even when the instruction raises."""
    undo = _wrap(engine, before, after)
    try:
        yield engine
    finally:
        undo()


class InstructionClock:
    """Stamps each instruction's start and end, and the engine's waits on peers within it, on one clock (CUDA
    events on the compute stream on CUDA, where the host returns from a launch or a wait at once); nothing is
    read until :meth:`resolve`, once, at the end of the step."""

    def __init__(self, engine, clock):
        self.engine, self.clock = engine, clock
        self._open, self.stamped = [], []  # stamped: (kind, kwargs, start, end, waits, cpu seconds)

    def before(self, kind, kwargs):
        self.engine._waited, self.engine._wait_stamps = 0.0, []  # the engine stamps its waits on the clock
        self._open.append((self.clock.now(), time.thread_time()))

    def after(self, kind, kwargs):
        start, cpu_start = self._open.pop()
        self.stamped.append(
            (kind, kwargs, start, self.clock.now(), self.engine._wait_stamps, time.thread_time() - cpu_start))
        self.engine._wait_stamps = []

    def resolve(self, *phases: list) -> tuple:
        """``(InstructionTime list, CPU seconds of each, each of ``phases`` resolved)``: one resolution (one
        synchronisation on CUDA) for the whole step."""
        records = [("i", start, end) for _, _, start, end, _, _ in self.stamped]
        records += [("w", s, e) for *_, waits, _ in self.stamped for s, e in waits]
        for phase in phases:
            records += phase
        resolved = iter(self.clock.resolve(records))
        spans = [next(resolved)[1:] for _ in self.stamped]
        trace = []
        for (kind, kwargs, _, _, waits, _), (start, end) in zip(self.stamped, spans):
            waited = sum(e - s for _, s, e in (next(resolved) for _ in waits))
            trace.append(InstructionTime(instruction_from(kind, kwargs), start, end, waited))
        out = [[next(resolved) for _ in phase] for phase in phases]
        return trace, [cpu for *_, cpu in self.stamped], out


def start_recording(engine, clock=None) -> list:
    """Record an :class:`InstructionTime` per instruction ``engine`` runs into ``engine.trace`` (returned),
    until :func:`stop_recording`. The plugin's engine also records the steps of its overlapped pairs'
    MoE phases into ``engine.phase_events``. On the host clock each entry is in seconds at once; on CUDA
    (``clock``: default :func:`~.autograd.clocks.clock_for` the engine's device) the instructions, their waits
    on peers and the phases are CUDA events on the stream, read once by :func:`resolve_recording`."""
    stop_recording(engine)
    clock = clock_for(getattr(engine, "device", None)) if clock is None else clock
    timer, trace = InstructionClock(engine, clock), []
    host = isinstance(clock, HostClock)

    def after(kind, kwargs):
        timer.after(kind, kwargs)
        if host:  # seconds already: nothing to resolve
            trace.extend(timer.resolve()[0])
            timer.stamped.clear()

    engine._stop_recording = _wrap(engine, timer.before, after)
    engine._recording = None if host else timer
    engine.trace = trace
    engine.step_clock = clock  # the plugin's engine stamps its waits and phases on it
    if hasattr(engine, "phase_events"):
        engine.phase_events = []
    return trace


def resolve_recording(engine) -> None:
    """Read a CUDA recording's events (one synchronisation): ``engine.trace`` and ``engine.phase_events`` in
    seconds from here on. Nothing to do on the host clock."""
    timer = vars(engine).get("_recording")
    if timer is None:
        return
    phases = getattr(engine, "phase_events", None)
    trace, _, resolved = timer.resolve(*([phases] if phases is not None else []))
    engine.trace.extend(trace)
    timer.stamped.clear()
    if phases is not None:
        phases[:] = resolved[0]


def stop_recording(engine) -> None:
    """Stop what :func:`start_recording` started (nothing if it did not)."""
    undo = vars(engine).pop("_stop_recording", None)
    if undo is not None:
        undo()
    vars(engine).pop("_recording", None)
    if getattr(engine, "step_clock", None) is not None:
        engine.step_clock = None
    engine.trace = None


def phase_records(engine, t0: float) -> list:
    """The engine's recorded MoE phases as ``(label, start, end)`` relative to ``t0`` (labels like
    ``"B3.1:compute"`` or ``"F4.0:dispatch"``: micro-batch 3's backward in chunk 1, ...); recording stops."""
    resolve_recording(engine)
    events = getattr(engine, "phase_events", None) or []
    if hasattr(engine, "phase_events"):
        engine.phase_events = None
    return [(label, start - t0, end - t0) for label, start, end in events]


__all__ = [
    "InstructionClock", "InstructionTime", "instruction_from", "resolve_recording", "around_each_instruction",
    "start_recording", "stop_recording", "phase_records"
]
