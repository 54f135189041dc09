"""A measured training step: per-instruction timings of every rank, as pictures, a trace and numbers.

Each rank records ``(instruction, start, end, waited)`` for every instruction of one
``train_batch`` (:func:`deepspeed_dualpipe.runtime.trace.start_recording`, for any engine). Times are
seconds since a barrier that all ranks left together. Rank 0 gathers the records and turns them
into:

- a timeline picture in the style of ``python -m deepspeed_dualpipe plot`` (the measured
  counterpart of the simulated one), time in units of the mean forward of one chunk;
- a Chrome trace (``chrome://tracing``, https://ui.perfetto.dev): one process per rank,
  compute on one thread, communication and the rest on another;
- the measured bubble of each rank (step time minus compute time) and the mean per-chunk
  costs (F, B, I, W, pairs) that the simulator can be re-run with.
"""

import json
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional

from deepspeed_dualpipe.analysis import events as E
from deepspeed_dualpipe.analysis.measured import simulator_costs  # noqa: F401 (TL.simulator_costs, as before)
from deepspeed_dualpipe.analysis.symbolic import Execution, Interval
from deepspeed_dualpipe.schedule.layout import Layout


@dataclass
class Record:
    """One executed instruction on one rank: plain data, picklable, times relative to the step's start."""

    name: str  # instruction class name
    kwargs: dict
    start: float
    end: float
    waited: float  # time spent waiting on a peer inside the instruction (plugin engine only)
    op: Optional[E.Op]  # the compute operation it ran, None for the rest


def records(trace, t0: float, layout: Layout, rank: int) -> List[Record]:
    """The engine's ``trace`` (InstructionTime list) as :class:`Record`\\ s, times relative to ``t0``,
    each compute instruction resolved to its :class:`~deepspeed_dualpipe.analysis.events.Op` (DeepSpeed's own
    instructions name no micro-batch: it follows from their order, as in the simulator)."""
    reader = E.EventReader(layout, rank)
    out = []
    for item in trace:
        ins = item.instruction
        event = reader.event(ins) if hasattr(ins, "kwargs") else None
        out.append(
            Record(
                type(ins).__name__, dict(getattr(ins, "kwargs", {})), item.start - t0, item.end - t0, item.waited,
                event if isinstance(event, E.Op) else None))
    return out


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------


def span(per_rank: List[List[Record]]) -> float:
    """From the barrier to the last instruction's end on any rank."""
    return max((r.end for rank in per_rank for r in rank), default=0.0)


def busy(rank: List[Record]) -> float:
    """Compute time of one rank: its compute instructions, minus their waits on peers."""
    return sum(r.end - r.start - r.waited for r in rank if r.op is not None)


def bubbles(per_rank: List[List[Record]]) -> List[float]:
    """Per rank, the fraction of the step it did not compute."""
    total = span(per_rank)
    return [1.0 - busy(rank) / total if total > 0 else 0.0 for rank in per_rank]


def mean_costs(per_rank: List[List[Record]]) -> Dict[str, float]:
    """Mean duration (s) of each kind of compute operation over all ranks: F, B, I, W and the pairs
    (``FB`` = forward + full backward, ``FI`` = forward + input part)."""
    durations: Dict[str, List[float]] = {}
    for rank in per_rank:
        for r in rank:
            if r.op is None:
                continue
            kind = "F" + r.op.backward.op if r.op.op == "FB" else r.op.op
            durations.setdefault(kind, []).append(r.end - r.start - r.waited)
    return {kind: statistics.fmean(values) for kind, values in durations.items()}


# ---------------------------------------------------------------------------------------------
# Pictures and traces
# ---------------------------------------------------------------------------------------------


def execution(per_rank: List[List[Record]], layout: Layout, unit: float) -> Execution:
    """The measured compute intervals as an :class:`Execution` (time in units of ``unit`` seconds)."""
    # The engine waits for a received tensor as the computation starts: draw the computing part only.
    timelines = [[
        Interval(min(r.start + r.waited, r.end) / unit, r.end / unit, r.op) for r in rank if r.op is not None
    ] for rank in per_rank]
    return Execution(layout, timelines, [0] * len(per_rank))


def plot(per_rank: List[List[Record]], layout: Layout, out: str, title: str) -> str:
    """Draw the measured step like the simulated timelines; time in units of the mean forward."""
    from deepspeed_dualpipe.analysis.plot import plot_execution
    unit = mean_costs(per_rank).get("F") or max(span(per_rank), 1e-9) / 40
    return plot_execution(execution(per_rank, layout, unit), out,
                          f"{title}\ntime in units of one chunk's mean forward ({unit * 1e3:.2f} ms)")


def chrome_trace(per_rank: List[List[Record]],
                 metadata: Optional[dict] = None,
                 names: Optional[List[str]] = None,
                 phases: Optional[List[List[tuple]]] = None) -> dict:
    """A Chrome/Perfetto trace: ``{"traceEvents": [...]}``, microseconds, one process per rank
    (named ``names[rank]``, default "rank N"). With ``phases`` (per rank, from :func:`phase_records`),
    three more threads show the overlapped pairs from inside: their compute steps, and the
    all-to-alls of the backward and of the forward micro-batch while they are in flight."""
    events = []
    for rank, steps in enumerate(phases or []):
        for tid, name in ((2, "pair: compute steps"), (3, "pair: backward's all-to-alls"),
                          (4, "pair: forward's all-to-alls")):
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}})
        for label, start, end in steps:
            compute = label.endswith(":compute")
            events.append({
                "name": label,
                "cat": "compute" if compute else "all-to-all",
                "ph": "X",
                "ts": round(start * 1e6, 3),
                "dur": round((end - start) * 1e6, 3),
                "pid": rank,
                "tid": 2 if compute else 3 if label.startswith("B") else 4,
                "args": {}
            })
    for rank, rows in enumerate(per_rank):
        name = names[rank] if names else f"rank {rank}"
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": name}})
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": "compute"}})
        events.append({
            "name": "thread_name",
            "ph": "M",
            "pid": rank,
            "tid": 1,
            "args": {
                "name": "communication and the rest"
            }
        })
        for r in rows:
            args = {k: v for k, v in r.kwargs.items() if isinstance(v, (int, float, str, bool))}
            if r.waited:
                args["waited_us"] = round(r.waited * 1e6, 1)
            events.append({
                "name": str(r.op) if r.op is not None else r.name,
                "cat": _category(r),
                "ph": "X",
                "ts": round(r.start * 1e6, 3),
                "dur": round((r.end - r.start) * 1e6, 3),
                "pid": rank,
                "tid": 0 if r.op is not None else 1,
                "args": {
                    "instruction": r.name,
                    **args
                }
            })
            if r.waited and r.op is not None:
                events.append({
                    "name": "wait",
                    "cat": "wait",
                    "ph": "X",
                    "ts": round(r.start * 1e6, 3),
                    "dur": round(r.waited * 1e6, 3),
                    "pid": rank,
                    "tid": 1,
                    "args": {}
                })
    trace = {"traceEvents": events, "displayTimeUnit": "ms"}
    if metadata:
        trace["otherData"] = metadata
    return trace


def _category(r: Record) -> str:
    if r.op is not None:
        return "compute"
    if r.name.startswith(("Send", "Recv")):
        return "p2p"
    return "other"


def write_chrome_trace(per_rank: List[List[Record]],
                       out: str,
                       metadata: Optional[dict] = None,
                       names: Optional[List[str]] = None,
                       phases: Optional[List[List[tuple]]] = None) -> str:
    with open(out, "w") as f:
        json.dump(chrome_trace(per_rank, metadata, names, phases), f)
    return out
