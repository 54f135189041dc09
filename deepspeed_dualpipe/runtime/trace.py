"""The one hook on a pipeline engine's instructions: callbacks around each, and the timing built on them.

DeepSpeed's ``PipelineEngine`` looks each instruction's ``_exec_*`` up in ``_INSTRUCTION_MAP``;
shadowing that table on the instance reaches DeepSpeed's own engines and the plugin's alike, keeps
DeepSpeed's own ``_exec_schedule`` loop (and its timers) in charge, and removing the shadow restores
the engine. Hooks nest: an inner one wraps whatever table the instance has at that moment.
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass


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


def start_recording(engine) -> list:
    """Record an :class:`InstructionTime` per instruction ``engine`` runs into ``engine.trace`` (returned),
    until :func:`stop_recording`. The plugin's engine also records the steps of its overlapped pairs'
    MoE phases into ``engine.phase_events``."""
    stop_recording(engine)
    trace, started = [], {}

    def before(kind, kwargs):
        engine._waited = 0.0  # the plugin's engine adds its waits on peers here
        started[kind] = time.perf_counter()

    def after(kind, kwargs):
        trace.append(
            InstructionTime(instruction_from(kind, kwargs), started.pop(kind), time.perf_counter(),
                            getattr(engine, "_waited", 0.0)))

    engine._stop_recording = _wrap(engine, before, after)
    engine.trace = trace
    if hasattr(engine, "phase_events"):
        engine.phase_events = []
    return trace


def stop_recording(engine) -> None:
    """Stop what :func:`start_recording` started (nothing if it did not)."""
    undo = vars(engine).pop("_stop_recording", None)
    if undo is not None:
        undo()
    engine.trace = None


def phase_records(engine, t0: float) -> list:
    """The engine's recorded MoE phases as ``(label, start, end)`` relative to ``t0`` (labels like
    ``"B3.1:compute"`` or ``"F4.0:dispatch"``: micro-batch 3's backward in chunk 1, ...); recording stops."""
    events = getattr(engine, "phase_events", None) or []
    if hasattr(engine, "phase_events"):
        engine.phase_events = None
    return [(label, start - t0, end - t0) for label, start, end in events]


__all__ = [
    "InstructionTime", "instruction_from", "around_each_instruction", "start_recording", "stop_recording",
    "phase_records"
]
