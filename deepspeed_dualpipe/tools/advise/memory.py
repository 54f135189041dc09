"""Activation memory: each model stage's bytes per live micro-batch, fitted from a profile's allocator samples,
and walked through any schedule's instruction streams."""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

from deepspeed_dualpipe.schedule import get_spec

if TYPE_CHECKING:
    from deepspeed_dualpipe.tools.advise.costs import ModelCosts


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


def stage_units(m: ModelCosts, K: int) -> List[float]:
    """Bytes per live micro-batch of each of ``K`` model stages, from the profiled cut's (by overlap of layer
    ranges: a stage of a coarser cut holds the finer cut's stages it covers)."""
    fine = m.stage_activation_bytes
    K0 = len(fine)
    out = []
    for t in range(K):
        lo, hi = t / K, (t + 1) / K
        out.append(sum(u * max(0.0, min(hi, (s + 1) / K0) - max(lo, s / K0)) * K0 for s, u in enumerate(fine)))
    return out


def peak_activation_bytes(m: ModelCosts, schedule: str, P: int, M: int) -> Optional[int]:
    """The largest rank's bytes at any instruction end of ``schedule``, with each stage's bytes per live
    micro-batch, plus the profiled base and transient."""
    if not m.stage_activation_bytes:
        return None
    layout = get_spec(schedule).layout(P, M)
    units = stage_units(m, layout.model_stages)
    peaks = []
    for r in range(P):
        per_chunk = [units[layout.model_stage(r, c)] for c in range(layout.chunks_per_rank)]
        live = live_after_each_instruction(schedule, P, M, r)
        peaks.append(max(sum(u * n for u, n in zip(per_chunk, counts)) for counts in live))
    return int(m.memory_base_bytes + m.memory_transient_bytes + max(peaks))
