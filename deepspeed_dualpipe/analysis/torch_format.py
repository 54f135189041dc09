"""Export schedules to ``torch.distributed.pipelining``'s action format.

torch describes a pipeline schedule as ``{rank: [_Action, ...]}``, where an
``_Action(stage_index, computation_type, microbatch_index)`` prints as ``2F0``.
Its ``stage_index`` is the *model stage*, so each of our events maps as:

==========================  ============================================
our event on (rank, chunk)  torch action, stage = layout.model_stage(rank, chunk)
==========================  ============================================
``F`` / ``B``               ``FORWARD`` / ``FULL_BACKWARD``
``I`` / ``W``               ``BACKWARD_INPUT`` / ``BACKWARD_WEIGHT``
``FB`` pair                 ``_Action(-1, OVERLAP_F_B, None, (forward, backward))``,
                            printed ``(0F3;1B1)OVERLAP_F_B`` (torch's own
                            ``ScheduleDualPipeV`` composes pairs the same way)
send/recv of ``act``        ``SEND_F`` / ``RECV_F`` (stage of the local chunk)
send/recv of ``grad``       ``SEND_B`` / ``RECV_B`` (stage of the local chunk)
==========================  ============================================

torch assigns every stage index to exactly one rank, so DualPipe, which keeps a
copy of every stage on two ranks (one per direction), cannot be expressed.
torch's pipelining helpers are private; they are imported in :func:`_torch` only.
"""

import csv
import io
from types import SimpleNamespace
from typing import Dict, List

from deepspeed_dualpipe.analysis.events import Comm, rank_events
from deepspeed_dualpipe.schedule import TORCH_EXPRESSIBLE, get_spec, rank_steps

_NEEDED = ("_Action", "_ComputationType", "_validate_schedule", "_format_pipeline_order", "PipelineScheduleMulti")


def _torch() -> SimpleNamespace:
    """torch's private pipelining symbols, or a RuntimeError naming the first one missing."""
    try:
        from torch.distributed.pipelining import schedules as ts
    except ImportError as error:
        raise RuntimeError(f"torch.distributed.pipelining.schedules is unavailable: {error}") from error
    for symbol in _NEEDED:
        if not hasattr(ts, symbol):
            raise RuntimeError(f"torch.distributed.pipelining.schedules.{symbol} is missing in this torch version")
    kind = ts._ComputationType
    for member in ("FORWARD", "FULL_BACKWARD", "BACKWARD_INPUT", "BACKWARD_WEIGHT", "OVERLAP_F_B", "SEND_F", "RECV_F",
                   "SEND_B", "RECV_B"):
        if not hasattr(kind, member):
            raise RuntimeError(f"torch.distributed.pipelining.schedules._ComputationType.{member} is missing")
    if "sub_actions" not in ts._Action._fields:
        raise RuntimeError("torch.distributed.pipelining.schedules._Action.sub_actions is missing")
    return SimpleNamespace(Action=ts._Action,
                           OVERLAP_F_B=kind.OVERLAP_F_B,
                           validate=ts._validate_schedule,
                           format=ts._format_pipeline_order,
                           compute={
                               "F": kind.FORWARD,
                               "B": kind.FULL_BACKWARD,
                               "I": kind.BACKWARD_INPUT,
                               "W": kind.BACKWARD_WEIGHT
                           },
                           comm={
                               ("send", "act"): kind.SEND_F,
                               ("recv", "act"): kind.RECV_F,
                               ("send", "grad"): kind.SEND_B,
                               ("recv", "grad"): kind.RECV_B
                           })


def _check_expressible(schedule: str):
    spec = get_spec(schedule)  # ValueError for unknown names
    if spec.torch_inexpressible is not None:  # the schedule's own fact (docs/design.md, "Adding a schedule")
        raise ValueError(f"schedule {schedule!r} cannot be expressed in torch.distributed.pipelining's "
                         f"format: {spec.torch_inexpressible}; expressible schedules: {', '.join(TORCH_EXPRESSIBLE)}")
    return spec


def to_torch_actions(schedule: str, stages: int, micro_batches: int, with_comms: bool = False) -> Dict[int, list]:
    """Every rank's actions in torch's format: ``{rank: [_Action, ...]}``.

    Compute only by default; ``with_comms`` also places ``SEND_F``/``RECV_F``/
    ``SEND_B``/``RECV_B`` where this schedule posts its sends and receives. An
    ``FB`` pair becomes one ``OVERLAP_F_B`` action holding the forward and the
    backward as ``sub_actions`` (torch's runtime runs them one after the other).
    """
    layout = _check_expressible(schedule).layout(stages, micro_batches)
    T = _torch()
    steps = rank_steps(schedule, stages, micro_batches)

    def action(kind, chunk, micro_batch, rank):
        return T.Action(layout.model_stage(rank, chunk), kind, micro_batch)

    actions = {}
    for rank in range(stages):
        actions[rank] = []
        for event in rank_events(steps[rank], layout, rank):
            if isinstance(event, Comm):
                if with_comms:
                    kind = T.comm[(event.direction, event.payload)]
                    actions[rank].append(action(kind, event.chunk, event.micro_batch, rank))
            elif event.op == "FB":
                pair = tuple(action(T.compute[p.op], p.chunk, p.micro_batch, rank) for p in event.parts())
                actions[rank].append(T.Action(-1, T.OVERLAP_F_B, None, pair))
            else:
                actions[rank].append(action(T.compute[event.op], event.chunk, event.micro_batch, rank))
    return actions


def to_torch_csv(schedule: str, stages: int, micro_batches: int) -> str:
    """The compute-only CSV that torch's ``PipelineScheduleMulti._load_csv`` reads: row ``r`` is rank ``r``."""
    out = io.StringIO()
    writer = csv.writer(out)  # the same dialect torch's ``_dump_csv`` writes
    for _, row in sorted(to_torch_actions(schedule, stages, micro_batches).items()):
        writer.writerow([str(a) for a in row])
    return out.getvalue()


def from_torch_csv(text: str) -> Dict[int, List[object]]:
    """Parse a compute-only CSV into ``{rank: [_Action, ...]}`` with torch's ``_Action.from_str``.

    torch's own reader, ``PipelineScheduleMulti._load_csv``, is a method that needs a
    built schedule (stages, process group) and a file, so only its per-action parser is reused.
    """
    T = _torch()
    return {rank: [T.Action.from_str(s) for s in row] for rank, row in enumerate(csv.reader(io.StringIO(text)))}


def validate_with_torch(schedule: str, stages: int, micro_batches: int) -> Dict[int, int]:
    """Run torch's ``_validate_schedule`` on the compute actions; return its stage -> rank map.

    torch's AssertionError (with its formatted pipeline table) propagates on failure.
    """
    layout = _check_expressible(schedule).layout(stages, micro_batches)
    actions = to_torch_actions(schedule, stages, micro_batches)
    return _torch().validate(actions, stages, layout.model_stages, micro_batches)


def format_torch_order(schedule: str, stages: int, micro_batches: int, with_comms: bool = False) -> str:
    """torch's own step x rank table (``_format_pipeline_order``) of the converted schedule."""
    return _torch().format(to_torch_actions(schedule, stages, micro_batches, with_comms))
