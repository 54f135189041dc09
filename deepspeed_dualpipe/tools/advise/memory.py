"""Activation memory: live micro-batches walked through any schedule's instruction streams, and each model stage's
bytes per live micro-batch fitted from a profile's allocator samples (:mod:`.costs` reads profiles with it,
:mod:`.predict` scales it to other schedules; this module imports neither)."""

from __future__ import annotations

from typing import List

from deepspeed_dualpipe.schedule import get_spec


def live_after_each_instruction(schedule: str, P: int, M: int, rank: int) -> List[List[int]]:
    """Live micro-batch activations of each chunk of ``rank`` after each of its instructions: from a forward to
    the end of its backward (its W, when split), as the verifier counts them."""
    from deepspeed_dualpipe.analysis.events import EventReader, Op
    from deepspeed_dualpipe.schedule import rank_steps
    layout = get_spec(schedule).layout(P, M)
    reader, live, out = EventReader(layout, rank), [0] * layout.chunks_per_rank, []
    for step in rank_steps(schedule, P, M)[rank]:
        for ins in step:
            event = reader.event(ins)
            for part in (event.parts() if isinstance(event, Op) else []):
                live[part.chunk] += 1 if part.op == "F" else -1 if part.op in "BW" else 0
            out.append(list(live))
    return out


def memory_fit(schedule: str, P: int, M: int, rank: dict):
    """``({model stage: bytes per live micro-batch}, base bytes, transient bytes)`` of one rank: a least-squares
    fit of the allocator's bytes at instruction ends to the live activations of each of its chunks; the
    transient is what the rank's high-water mark adds above those ends. None without the samples."""
    import numpy as np
    used, peak = rank.get("memory_after_bytes") or [], rank.get("activation_peak_bytes")
    r = rank["pipeline_rank"]
    live = live_after_each_instruction(schedule, P, M, r)
    if not used or peak is None or len(used) != len(live):
        return None
    X = np.column_stack([np.array(live, dtype=float), np.ones(len(live))])
    solution, *_ = np.linalg.lstsq(X, np.array(used, dtype=float), rcond=None)
    layout = get_spec(schedule).layout(P, M)
    units = {layout.model_stage(r, c): max(float(u), 0.0) for c, u in enumerate(solution[:-1])}
    return units, float(solution[-1]), max(peak - max(used), 0)
