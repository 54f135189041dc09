"""What one ``train_batch`` did on this rank: per-computation times, waits, hidden all-to-alls, memory.

:func:`record_step` runs one step under the one instruction hook (:func:`.trace.around_each_instruction`) and
returns a :class:`RankStep`, plain picklable data that the monitor (:mod:`.monitor`) gathers to the
rank DeepSpeed writes from and that ``dualpipe.profile_step`` writes to a profile file for
``python -m deepspeed_dualpipe advise`` (docs/advise.md).

Memory is read at the allocator by the project's one meter (:class:`.memory.MemoryMeter`): the
bytes in use after every instruction, and the most within any instruction (temporaries included),
above what the rank held when the step began, less the gradient bytes the step allocated (gradients
are not activations). On CUDA from the caching allocator's counters; on CPU from the allocator events
of torch's profiler (``cpu="profiler"``, the reading that sees within instructions), which slows the
step down. A job may plug in its own meter as ``engine.memory_meter``: any object with
``measure(step) -> step's result`` that then holds the peak in ``peak`` or ``result.peak`` (bytes).
"""

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from deepspeed_dualpipe.analysis.events import EventReader, Op
from deepspeed_dualpipe.runtime.autograd.clocks import clock_for
from deepspeed_dualpipe.runtime.memory import MemoryMeter, StepMemory, parameter_bytes
from deepspeed_dualpipe.runtime.overlap import hidden_seconds
from deepspeed_dualpipe.runtime.trace import InstructionClock, around_each_instruction

_P2P = ("SendActivation", "RecvActivation", "SendGrad", "RecvGrad")


@dataclass
class RankStep:
    """One ``train_batch`` on one rank (seconds; bytes). Keys of ``compute``: ``"F:c"``, ``"B:c"``,
    ``"I:c"``, ``"W:c"`` for chunk ``c``, and ``"FB:f:b"`` / ``"FI:f:b"`` for an overlapped pair of a
    forward on chunk ``f`` and a backward on chunk ``b``; each holds one duration per computation, waits
    on peers left out. ``a2a`` holds, per ``"F:c"`` / ``"B:c"`` (B also for I), the all-to-all time of each
    computation that ran alone (not in a pair), and ``a2a_count`` how many all-to-alls it made."""

    global_rank: int
    pipeline_rank: int
    data_parallel_rank: int
    schedule: str
    stages: int
    micro_batches: int
    wall_s: float  # the whole train_batch, as the caller saw it
    step_s: float  # first instruction's start to the last one's end
    busy_s: float  # compute instructions less their waits on peers
    waited_s: float  # waiting on peers (received tensors), inside any instruction
    hidden_s: float  # all-to-all time in flight while the other micro-batch of a pair computed
    compute: Dict[str, List[float]] = field(default_factory=dict)
    a2a: Dict[str, List[float]] = field(default_factory=dict)
    a2a_count: Dict[str, List[int]] = field(default_factory=dict)  # all-to-alls of each of those computations
    compute_cpu: Dict[str, List[float]] = field(default_factory=dict)  # the same, in this thread's CPU seconds
    cpu_s: float = 0.0  # this thread's CPU seconds over the whole train_batch
    process_cpu_s: float = 0.0  # the whole process's (communication threads included)
    p2p_s: List[float] = field(default_factory=list)  # each send/receive instruction (posting)
    other_s: Dict[str, float] = field(default_factory=dict)  # the rest, total per instruction name
    other_cpu_s: Dict[str, float] = field(default_factory=dict)  # the same in this thread's CPU seconds
    instructions: int = 0
    parameter_bytes: int = 0
    activation_peak_bytes: Optional[int] = None
    memory_after_bytes: List[int] = field(default_factory=list)  # bytes in use after each instruction (see above)
    device: str = "cpu"
    cores: int = 1  # CPU cores this process may run on
    local_ranks: int = 1  # ranks on this machine, sharing those cores

    @property
    def bubble(self) -> float:
        return 1.0 - self.busy_s / self.step_s if self.step_s > 0 else 0.0


def _key(op: Op) -> str:
    if op.op == "FB":
        return f"F{op.backward.op}:{op.forward.chunk}:{op.backward.chunk}"
    return f"{op.op}:{op.chunk}"


def _a2a_per_computation(phases):
    """In-flight all-to-all seconds and count of each phased computation, keyed ``"F:c"`` / ``"B:c"``."""
    per_label: Dict[str, list] = {}
    for label, start, end in phases:
        owner = label.rsplit(":", 1)[0]  # "F3.0": the forward of micro-batch 3 on chunk 0
        entry = per_label.setdefault(owner, [0.0, 0])
        if not label.endswith(":compute"):
            entry[0] += end - start
            entry[1] += 1
    seconds: Dict[str, List[float]] = {}
    counts: Dict[str, List[int]] = {}
    for owner, (total, count) in per_label.items():
        key = f"{owner[0]}:{owner.rsplit('.', 1)[1]}"
        seconds.setdefault(key, []).append(total)
        counts.setdefault(key, []).append(count)
    return seconds, counts


def summarize(engine, trace, pair_phases, alone_phases, wall_s: float, cpu=None, cpu_s: float = 0.0) -> RankStep:
    """The :class:`RankStep` of a recorded ``train_batch`` (``trace``: InstructionTime list; the phases of the
    overlapped pairs and of the computations that ran alone, as ``(label, start, end)``; ``cpu``: the calling
    thread's CPU seconds of each instruction, and ``cpu_s`` of the whole step)."""
    from deepspeed_dualpipe.schedule import get_spec
    P, M = engine.num_stages, engine.micro_batches
    reader = EventReader(get_spec(engine.schedule_name).layout(P, M), engine.stage_id)
    step = RankStep(engine.global_rank, engine.stage_id, engine.grid.get_data_parallel_id(), engine.schedule_name, P,
                    M, wall_s, 0.0, 0.0, 0.0, hidden_seconds(pair_phases))
    if trace:
        step.step_s = trace[-1].end - trace[0].start
    step.cpu_s = cpu_s
    for item, cpu_seconds in zip(trace, cpu if cpu is not None else [0.0] * len(trace)):
        name, seconds = type(item.instruction).__name__, item.end - item.start
        step.waited_s += item.waited
        event = reader.event(item.instruction)
        if isinstance(event, Op):
            step.busy_s += seconds - item.waited
            step.compute.setdefault(_key(event), []).append(seconds - item.waited)
            step.compute_cpu.setdefault(_key(event), []).append(cpu_seconds)
        elif name in _P2P:
            step.p2p_s.append(seconds - item.waited)
        else:
            step.other_s[name] = step.other_s.get(name, 0.0) + seconds
            step.other_cpu_s[name] = step.other_cpu_s.get(name, 0.0) + cpu_seconds
    step.instructions = len(trace)
    step.a2a, step.a2a_count = _a2a_per_computation(alone_phases)  # a pair's all-to-alls wait for the other half
    step.parameter_bytes = parameter_bytes(engine.module)
    step.device = torch.device(engine.device).type
    step.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # ranks on this machine: what launchers export (DeepSpeed's LOCAL_SIZE, torchrun's LOCAL_WORLD_SIZE)
    step.local_ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return step


def record_step(engine, run: Callable[[], object], memory: bool = False, clock=None):
    """``(run(), RankStep)``: one ``train_batch`` recorded through the instruction hook; with ``memory``, its
    activation memory read by ``engine.memory_meter`` (default: the allocator, :func:`step_meter`). It nests
    inside a recording already running (the demo's timeline), and leaves that one's phase events in place.
    ``clock``: what stamps the step (default :func:`~.autograd.clocks.clock_for` its device)."""
    meter = getattr(engine, "memory_meter", None) if memory else None
    if memory and meter is None:
        meter = step_meter(engine)
    clock = clock_for(engine.device) if clock is None else clock
    timer = InstructionClock(engine, clock)
    outer = engine.phase_events  # a list while another recording runs
    engine.phase_events = [] if outer is None else outer
    first_phase = len(engine.phase_events)
    outer_clock = getattr(engine, "step_clock", None)  # a recording's (trace.start_recording), if one runs
    engine.run_events, engine.step_clock = [], clock
    start, cpu_start, process_start = time.perf_counter(), time.thread_time(), time.process_time()
    try:
        with around_each_instruction(engine, timer.before, timer.after):
            result = meter.measure(run) if meter is not None else run()
        pairs, alone = engine.phase_events[first_phase:], engine.run_events
        trace, cpu, (pairs, alone) = timer.resolve(pairs, alone)  # on CUDA: the step's one synchronisation
        engine.phase_events[first_phase:] = pairs  # an outer recording reads them in seconds
        wall, cpu_total = time.perf_counter() - start, time.thread_time() - cpu_start
        process_cpu = time.process_time() - process_start
    finally:
        engine.phase_events, engine.run_events, engine.step_clock = outer, None, outer_clock
    step = summarize(engine, trace, pairs, alone, wall, cpu, cpu_total)
    step.process_cpu_s = process_cpu
    if meter is not None:
        step.memory_after_bytes, step.activation_peak_bytes = read_meter(meter)
    return result, step


def step_meter(engine) -> Optional[MemoryMeter]:
    """The allocator meter of a recorded step: on CPU through torch's profiler, the reading that also sees
    the temporaries inside each instruction (``advise`` fits the ends and adds what lies above them). None
    on a device whose allocator it cannot read (the step is then recorded without memory)."""
    if torch.device(engine.device).type not in ("cpu", "cuda"):
        return None
    return MemoryMeter(engine, cpu="profiler")


def read_meter(meter) -> tuple:
    """``(bytes after each instruction, peak bytes)`` of a meter that has measured a step: a
    :class:`~.memory.MemoryMeter` (its samples, and its upper bound), or a job's own meter (``after``, and
    ``peak`` or ``result.peak``)."""
    result = getattr(meter, "result", None)
    if isinstance(result, StepMemory):
        return [s.after for s in result.samples], result.upper_bound
    peak = getattr(meter, "peak", None)
    return list(getattr(meter, "after", None) or []), peak if peak is not None else getattr(result, "peak", None)


__all__ = ["RankStep", "read_meter", "record_step", "step_meter", "summarize"]
