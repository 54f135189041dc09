"""Schedules as text: a rank x time picture, and the JSON export."""

from typing import List

from deepspeed_dualpipe.analysis.events import Op, rank_events
from deepspeed_dualpipe.analysis.symbolic import Costs, execute_schedule
from deepspeed_dualpipe.schedule import get_spec, rank_steps


def schedule_json(schedule: str, stages: int, micro_batches: int) -> dict:
    """``{"schedule", "stages", "micro_batches", "ranks": [{"rank", "compute", "instructions"}]}``."""
    layout = get_spec(schedule).layout(stages, micro_batches)
    ranks = []
    for rank, steps in enumerate(rank_steps(schedule, stages, micro_batches)):
        compute = [e.to_json() for e in rank_events(steps, layout, rank) if isinstance(e, Op)]
        instructions = [[{"type": type(ins).__name__, **ins.kwargs} for ins in step] for step in steps]
        ranks.append({"rank": rank, "compute": compute, "instructions": instructions})
    return {"schedule": schedule, "stages": stages, "micro_batches": micro_batches, "ranks": ranks}


def render_text(schedule: str, stages: int, micro_batches: int, costs: Costs = Costs(), cell: int = 0) -> str:
    """Draw every rank's operations at their simulated times, ``cell`` characters per time unit.

    Each operation is written as chunk, op, micro-batch (``1F6`` = forward of chunk 1 on
    micro-batch 6; ``0F3+1B5`` = an overlapped pair), followed by ``-`` for as long as it
    runs; ``.`` is idle time (bubble). By default a cell fits the longest single label.
    """
    cell = cell or len(f"1F{micro_batches - 1}") + 1
    cell += cell % 2  # even, so that half time units fall on whole characters
    execution = execute_schedule(schedule, stages, micro_batches, costs)
    width = round(execution.makespan * cell)
    rows: List[str] = []
    for rank, timeline in enumerate(execution.timelines):
        line = ["."] * width
        for interval in timeline:
            start, end = round(interval.start * cell), round(interval.end * cell)
            label = str(interval.op)
            text = (label + " " if end - start > len(label) else label)[:max(end - start - 1, 1)]
            text = text.ljust(end - start - 1, "-") + "|"
            line[start:end] = text[:end - start]
        rows.append(f"rank {rank:>2} |" + "".join(line))
    ticks = "".join(f"{t:<{cell * 5}}" for t in range(0, int(execution.makespan) + 1, 5))[:width]
    bubbles = execution.bubbles()
    title = (f"{schedule}  P={stages}  M={micro_batches}  costs F={costs.F:g} B={costs.B:g} W={costs.W:g} "
             f"FB={costs.pair:g}  makespan {execution.makespan:g}  bubble/rank {min(bubbles):g}..{max(bubbles):g}")
    legend = "cells: <chunk><op><micro-batch>; F forward, B backward, I input-grad, W weight-grad, a+b overlapped"
    return "\n".join([title, f"time    |{ticks}"] + rows + [legend])
