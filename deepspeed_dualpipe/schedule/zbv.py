"""ZB-V (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", section 6): the zero-bubble V schedule.

The model is cut into 2P stages in a V, as in DualPipeV: rank r holds chunk 0 = stage r and
chunk 1 = stage 2P-1-r, every micro-batch enters and leaves at rank 0, and turns (locally) on
rank P-1. Every backward is split into an input-gradient pass I, sent upstream at once, and a
weight pass W that fills what would otherwise be bubbles. With F = I = W per stage the bubble
vanishes once M >= 2P; the paper's bound is (P-1)(F+B-2W) in the costs of one of the 2P model
stages, half of ZB-H1's on the same model (table below, docs/schedules.md). Peak activations per
rank stay at 2P stages' worth, 1F1B's memory.

The order of every rank's computations is that of torch.distributed.pipelining's
``ScheduleZBVZeroBubble`` (torch 2.13): it plans for max(M, 2P-1) micro-batches and drops the
operations on the micro-batches that do not exist, so any M >= 1 runs.
``tests/unit/test_torch_orders.py`` checks the orders equal.
"""

from collections import deque
from typing import Dict, List, Optional, Tuple

from deepspeed_dualpipe.schedule.layout import LayoutKind
from deepspeed_dualpipe.schedule.base import ProgramSchedule
from deepspeed_dualpipe.schedule.builder import ProgramBuilder

Planned = Tuple[str, int, int]  # ("F" | "I" | "W", chunk, micro-batch)
Message = Tuple[str, int, int]  # ("act" | "grad", receiving chunk, micro-batch)


def plan(stages: int, rank: int, micro_batches: int) -> List[Planned]:
    """Rank ``rank``'s operations for ``max(micro_batches, 2P-1)`` micro-batches, in order."""
    P, n = stages, max(2 * stages - 1, micro_batches)
    ops: List[Planned] = []
    forwards, backwards, weights = [0, 0], [0, 0], [0, 0]

    def op(kind, chunk):
        counter = {"F": forwards, "I": backwards, "W": weights}[kind]
        ops.append((kind, chunk, counter[chunk]))
        counter[chunk] += 1

    for _ in range(2 * (P - rank) - 1):  # warm-up 1: chunk 0 forwards fill the way down
        op("F", 0)
    for _ in range(rank):  # warm-up 2: the first chunk 1 forwards come back up
        op("F", 1)
        op("F", 0)
    for _ in range(P - rank):  # warm-up 3: chunk 1 forward, and its backward at once
        op("F", 1)
        op("I", 1)
        op("W", 1)
    while forwards[1] < forwards[0] or forwards[0] < n:  # steady state: F I W on each chunk
        if forwards[0] < n:
            op("F", 0)
        op("I", 0)
        op("W", 0)
        op("F", 1)
        op("I", 1)
        op("W", 1)
    for _ in range(rank):  # cool-down 1: input gradients first, weight passes later
        op("I", 0)
        op("I", 1)
    for _ in range(P - rank):  # cool-down 2: chunk 0's input passes, each with a held-back weight pass
        op("I", 0)
        op("W", 0)
    while weights[1] < backwards[1]:
        op("W", 1)
    while weights[0] < backwards[0]:
        op("W", 0)
    return ops


def _operations(stages: int, rank: int, micro_batches: int) -> List[Planned]:
    """Rank ``rank``'s operations on the micro-batches this batch has."""
    return [op for op in plan(stages, rank, micro_batches) if op[2] < micro_batches]


def _needs(layout, rank: int, kind: str, chunk: int, m: int) -> Optional[Tuple[int, Message]]:
    """(peer, message) that operation ``kind`` on (rank, chunk, m) receives, or None (local, or none)."""
    if kind == "W":
        return None
    source = layout.upstream(rank, chunk, m) if kind == "F" else layout.downstream(rank, chunk, m)
    if source is None or source[0] == rank:
        return None
    return source[0], ("act" if kind == "F" else "grad", chunk, m)


def _sent(layout, rank: int, micro_batches: int) -> Dict[int, List[Message]]:
    """What ``rank`` sends each peer, in the order it sends (each as the receiver names it): an activation
    after each forward, an input gradient after each I (the builder's verbs send right after computing)."""
    sent: Dict[int, List[Message]] = {}
    for kind, chunk, m in _operations(layout.ranks, rank, micro_batches):
        if kind == "W":
            continue
        target = layout.downstream(rank, chunk, m) if kind == "F" else layout.upstream(rank, chunk, m)
        if target is not None and target[0] != rank:
            sent.setdefault(target[0], []).append(("act" if kind == "F" else "grad", target[1], m))
    return sent


class ZeroBubbleVSchedule(ProgramSchedule):
    """ZB-V as a DeepSpeed ``PipeSchedule``: any P >= 1, M >= 1."""

    name = "zbv"
    summary = "ZB-V: zero-bubble V (stages r and 2P-1-r), backward split into I and W"
    lockstep_p2p = True
    layout_kind = LayoutKind.V
    split_backward = True
    table2 = "zbv"

    @classmethod
    def program(cls, b: ProgramBuilder) -> None:
        P, r, M, layout = b.stages, b.rank, b.micro_batches, b.layout
        # Point-to-point messages between two ranks match in posting order, and a rank needs its
        # neighbour's activations and gradients in another order than the neighbour makes them (the
        # neighbour's warm-up forwards run ahead of its first backward). So this rank posts its receives
        # in the order each peer sends, as far ahead as its next computation needs.
        incoming = {peer: deque(_sent(layout, peer, M).get(r, [])) for peer in (r - 1, r + 1) if 0 <= peer < P}
        posted = set()
        for kind, chunk, m in _operations(P, r, M):
            needed = _needs(layout, r, kind, chunk, m)
            while needed is not None and needed[1] not in posted:
                payload, at, micro_batch = message = incoming[needed[0]].popleft()
                (b.recv_forward if payload == "act" else b.recv_backward)(at)
                posted.add(message)
            if kind == "F":
                b.forward(chunk, recv=False)
            elif kind == "I":
                b.backward(chunk, zero_bubble=True, recv=False)
            else:
                b.weight(chunk)
