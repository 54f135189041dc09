"""What every bench rank runs: one engine per run, then timed steps, runs interleaved, then one
untimed step per run that samples the activation memory.

A run is a schedule, plus (for dualpipe/dualpipev with ``--a2a``) whether the MoE all-to-alls of
the overlapped pairs are interleaved with the other micro-batch (``dualpipe.overlap_moe_a2a``).
"""

import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from deepspeed_dualpipe.tools.bench import layers as L
from deepspeed_dualpipe.runtime.trace import start_recording
from deepspeed_dualpipe.runtime.memory import MemoryMeter, parameter_bytes


@dataclass(frozen=True)
class Run:
    label: str  # row name: the schedule, or e.g. "dualpipe (no overlap)"
    schedule: str
    overlap: bool = True
    peer: bool = False  # torch.distributed.pipelining's schedule of that name (tools/bench/torch_peer.py)


@dataclass(frozen=True)
class BenchSpec:
    runs: Tuple[Run, ...]
    stages: int
    micro_batches: int
    layers: int
    F: float  # per layer, seconds
    B: float
    W: float
    width: int  # floats per activation sample
    repeats: int
    warmup: int = 1
    a2a_bytes: int = 0  # > 0: SleepMoELayers, expert parallelism 2 inside data parallelism 2
    a2a_wire_s: float = 0.0  # > 0: every all-to-all on the emulated wire of tools/bench/wire.py
    calibration_repeats: int = 20
    memory_source: Optional[str] = None  # MemoryMeter's cpu= (None: its default)

    @property
    def data_parallel(self) -> int:
        return 2 if self.a2a_bytes else 1

    @property
    def world_size(self) -> int:
        return self.stages * self.data_parallel


# One executed instruction: (class name, start, end, waited on peers, time in layers (sleeping),
# time blocked in all-to-all waits), seconds.
Record = Tuple[str, float, float, float, float, float]

# Every all-to-all of this process: (launched, wait began, wait ended), perf_counter seconds.
ALL_TO_ALLS = []


def _config(spec: BenchSpec, run: Run) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": spec.micro_batches,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
        "pipeline": {
            "schedule": run.schedule
        }
    }
    if not run.overlap:
        config["dualpipe"] = {"overlap_moe_a2a": False}
    return config


def _sgd(params):
    return torch.optim.SGD(params, lr=0.0)  # the weights do not matter; the step still runs


def _layer_specs(spec: BenchSpec):
    from deepspeed.pipe import LayerSpec
    if spec.a2a_bytes:
        return [
            LayerSpec(L.SleepMoELayer, spec.F, spec.B, spec.W, spec.a2a_bytes, ep_size=2) for _ in range(spec.layers)
        ]
    return [LayerSpec(L.SleepLayer, spec.F, spec.B, spec.W) for _ in range(spec.layers)]


def _engine(spec: BenchSpec, run: Run):
    import deepspeed_dualpipe
    from deepspeed.pipe import PipelineModule
    model = PipelineModule(layers=_layer_specs(spec),
                           num_stages=spec.stages,
                           loss_fn=L.mean_loss,
                           partition_method="uniform")
    engine = deepspeed_dualpipe.initialize(model=model, config=_config(spec, run), optimizer=_sgd)[0]
    # DeepSpeed's engines block inside their communication instructions, so no compute instruction waits on a
    # peer there (``waited`` is 0) and a communication instruction's time is waiting and engine time.
    start_recording(engine)
    return engine


class _TimedWork:
    """An async collective's work handle that records how long ``wait()`` blocked."""

    def __init__(self, work, launched):
        self._work, self._launched = work, launched

    def wait(self, *args, **kwargs):
        start = time.perf_counter()
        result = self._work.wait(*args, **kwargs)
        ALL_TO_ALLS.append((self._launched, start, time.perf_counter()))
        return result

    def __getattr__(self, name):
        return getattr(self._work, name)


def _time_all_to_alls() -> None:
    """Record every all-to-all of this process: the tape (and InlineTape) launch them through
    ``deepspeed.comm.all_to_all_single``, looked up at each call, so wrapping it here sees them all."""
    from deepspeed import comm
    original = comm.all_to_all_single
    if getattr(original, "_bench_timed", False):
        return

    def timed(*args, **kwargs):
        launched = time.perf_counter()
        work = original(*args, **kwargs)
        if work is None:  # synchronous: it has finished
            ALL_TO_ALLS.append((launched, launched, time.perf_counter()))
            return work
        return _TimedWork(work, launched)

    timed._bench_timed = True
    comm.all_to_all_single = timed


def _within(intervals, i, start, end):
    """Time of the sorted ``intervals`` (from index ``i``) inside [start, end]; returns (time, next i)."""
    while i < len(intervals) and intervals[i][1] <= start:
        i += 1
    total, j = 0.0, i
    while j < len(intervals) and intervals[j][0] < end:
        total += max(0.0, min(intervals[j][1], end) - max(intervals[j][0], start))
        j += 1
    return total, i


def _records(trace, sleeps, waits) -> List[Record]:
    """The trace as plain tuples, each with the layer time and the all-to-all wait time that fell
    inside it (both are nested in instructions, and all lists are in time order)."""
    out, i, k = [], 0, 0
    waits = sorted(waits)
    for item in trace:
        name, start, end, waited = type(item.instruction).__name__, item.start, item.end, item.waited
        layer, i = _within(sleeps, i, start, end)
        a2a, k = _within(waits, k, start, end)
        out.append((name, start, end, waited, layer, a2a))
    return out


def _step(engine, data) -> dict:
    from deepspeed import comm as dist
    engine.trace.clear()
    L.SLEEPS.clear()
    ALL_TO_ALLS.clear()
    dist.barrier()  # every rank starts the step together
    on_gpu = torch.device(engine.device).type == "cuda"
    if on_gpu:  # the barrier's kernel done: the stream is idle from here
        torch.cuda.synchronize(engine.device)
    cpu, start = time.process_time(), time.perf_counter()
    if on_gpu:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        events[0].record()
    engine.train_batch(data_iter=data)
    if on_gpu:  # the host returned when the work was queued: the step ends when the stream has run it
        events[1].record()
        events[1].synchronize()
        end = start + events[0].elapsed_time(events[1]) / 1e3
    else:
        end = time.perf_counter()
    cpu = time.process_time() - cpu
    waits = [(s, e) for _, s, e in ALL_TO_ALLS]
    return {
        "start": start,
        "end": end,
        "cpu_s": cpu,
        "records": _records(engine.trace, L.SLEEPS, waits),
        "a2a_s": [e - launched for launched, _, e in ALL_TO_ALLS]
    }


# ----- activation memory ---------------------------------------------------------------------
def _memory_step(engine, data, source: Optional[str] = None) -> dict:
    """Two untimed steps, the second measured at the allocator (the first primes the meter) (:class:`~deepspeed_dualpipe.runtime.memory.MemoryMeter`):
    peak activation bytes at instruction boundaries, the high-water mark within instructions, the bytes
    left after the step, and the rank's parameter bytes."""
    meter = MemoryMeter(engine, cpu=source)
    meter.measure(lambda: _step(engine, data), prime=lambda: _step(engine, data))
    return {**meter.result.as_dict(), "parameters": parameter_bytes(engine.module)}


def _peer_memory() -> dict:
    from deepspeed_dualpipe.tools.bench.torch_peer import no_memory
    return no_memory()


# ----- one all-to-all alone ------------------------------------------------------------------
def _calibrate(spec: BenchSpec, stage: int, device="cpu") -> Dict[str, float]:
    """Median seconds of one all-to-all of ``a2a_bytes`` over this rank's expert-parallel group:
    ``alone`` with the other groups idle (one stage after the other), ``concurrent`` with every
    stage's group at once."""
    from deepspeed import comm as dist
    from deepspeed.utils import groups
    group = groups._get_expert_parallel_group("ep_size_2")
    send = torch.randn(spec.a2a_bytes // 4 // 2 * 2, device=device)

    def times():
        out = []
        for _ in range(spec.calibration_repeats):
            recv = torch.empty_like(send)
            start = time.perf_counter()
            dist.all_to_all_single(recv, send, group=group, async_op=True).wait()
            if send.is_cuda:  # the wait above only queued the stream's wait on NCCL's
                torch.cuda.synchronize(send.device)
            out.append(time.perf_counter() - start)
        return statistics.median(out[min(3, len(out) - 1):])

    alone = None
    for turn in range(spec.stages):
        dist.barrier()
        if turn == stage:
            alone = times()
    dist.barrier()
    return {"alone": alone, "concurrent": times()}


def bench_rank(spec: BenchSpec) -> dict:
    """This rank's measured steps per run (warm-up steps left out), its memory per run (see
    :func:`_memory_step`), where it sits (pipeline stage, data-parallel replica) and, with ``a2a_bytes``, the time of
    one all-to-all alone."""
    torch.manual_seed(0)
    sample = (torch.randn(1, spec.width), torch.zeros(1))
    data = itertools.repeat(sample)  # every rank may load; the same micro-batch each time is enough
    engines = {run.label: _engine(spec, run) for run in spec.runs if not run.peer}
    first = next(iter(engines.values()))
    if any(run.peer for run in spec.runs):
        from deepspeed_dualpipe.tools.bench import torch_peer
        peers = {run.label: torch_peer.make_peer(spec, run.schedule, first) for run in spec.runs if run.peer}
        engines = {run.label: engines.get(run.label) or peers[run.label] for run in spec.runs}
    stage, replica = first.grid.get_stage_id(), first.grid.get_data_parallel_id()
    if torch.device(first.device).type == "cuda":
        # the layers' spin rate, measured now on an idle stream: its host wait must not fall inside a step
        with torch.cuda.device(first.device):
            L.gpu_cycles_per_second()
    if spec.a2a_wire_s:
        from deepspeed_dualpipe.tools.bench import wire
        wire.install(spec.a2a_wire_s)
    calibration = _calibrate(spec, stage, first.device) if spec.a2a_bytes else None
    if spec.a2a_bytes:
        _time_all_to_alls()
    steps = {label: [] for label in engines}
    for round_ in range(spec.warmup + spec.repeats):  # interleaved: drift hits every run alike
        for label, engine in engines.items():
            step = _step(engine, data)
            if round_ >= spec.warmup:
                steps[label].append(step)
    memory = {
        run.label: _peer_memory() if run.peer else _memory_step(engines[run.label], data, spec.memory_source)
        for run in spec.runs
    }
    return {"steps": steps, "memory": memory, "stage": stage, "replica": replica, "a2a": calibration}
