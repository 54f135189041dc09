"""What overlapped in an overlapped pair, read from the phases the step drivers record.

The engine records the phases of its overlapped pairs into ``engine.phase_events`` (set it to ``[]``),
with overlap on or off (:func:`~deepspeed_dualpipe.runtime.autograd.steps.interleave` or two
:func:`~deepspeed_dualpipe.runtime.autograd.steps.run`\\ s). Each phase is ``(label, start, end)``:
``"B3.1:compute"`` is a compute step of micro-batch 3's backward on chunk 1, without the time it blocked
waiting for its own all-to-all; ``"F4.0:dispatch"`` is an all-to-all of micro-batch 4's forward on chunk
0, from its launch to when it actually completed (the backend's completion callback, or a CUDA event on
the communication side; see :mod:`~deepspeed_dualpipe.runtime.autograd.clocks`), not to when the engine
waited for it.

An all-to-all is *hidden* when it completed while the other micro-batch of its pair was computing:
proof that the two ran at the same time. Overlap off runs one half after the other and waits for each
all-to-all as it is launched, so none can be; an engine that interleaved the halves but waited for each
all-to-all before handing over would not show any either.
"""

from typing import Iterable, List, Tuple

Phase = Tuple[str, float, float]

__all__ = ["hidden_all_to_alls", "hidden_seconds", "pairs"]


def _owner(label: str) -> str:
    return label.rsplit(":", 1)[0]


def _is_compute(label: str) -> bool:
    return label.endswith(":compute")


def pairs(phases: Iterable[Phase]) -> List[List[Phase]]:
    """The phases grouped by pair: consecutive phases of at most two owners (micro-batch halves)."""
    groups, owners = [], set()
    for phase in phases:
        owner = _owner(phase[0])
        if not groups or (owner not in owners and len(owners) == 2):
            groups.append([])
            owners = set()
        owners.add(owner)
        groups[-1].append(phase)
    return groups


def _beside_other_computes(phases: Iterable[Phase]):
    """Each all-to-all that completed, with the compute phases ``(start, end)`` of the other micro-batch of its pair."""
    for pair in pairs(phases):
        computes = [(_owner(label), start, end) for label, start, end in pair if _is_compute(label)]
        for label, start, end in pair:
            if not _is_compute(label) and end is not None:
                owner = _owner(label)
                yield (label, start, end), [(s, e) for other, s, e in computes if other != owner]


def hidden_all_to_alls(phases: Iterable[Phase]) -> List[Phase]:
    """The all-to-alls that completed while the other micro-batch of their pair computed."""
    return [a2a for a2a, others in _beside_other_computes(phases) if any(s < a2a[2] <= e for s, e in others)]


def hidden_seconds(phases: Iterable[Phase]) -> float:
    """All-to-all time (launch to completion) during which the other micro-batch of the pair computed."""
    return sum(
        max(0.0,
            min(end, e) - max(start, s)) for (_, start, end), others in _beside_other_computes(phases)
        for s, e in others)
