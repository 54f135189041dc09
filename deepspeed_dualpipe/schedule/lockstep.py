"""Commit points for schedules whose own p2p placement NCCL cannot complete: every rank in lockstep.

A schedule written as "receive, compute, send" around each operation (interleaved 1F1B, ZB-V) posts
groups that do not line up across ranks: rank 0's group pairs a send to rank 1 with a receive that
rank 1 posts in a later group, behind a send that waits for rank 0's later group, and under NCCL's
rules (docs/design.md, "Point-to-point on NCCL") the two streams wait on each other. Megatron and
torch.distributed.pipelining avoid this by exchanging in lockstep: at each time step every rank posts
one group holding what it sends and what its neighbours send it at that step.

:func:`lockstep` places the p2p of every rank's program that way. It times the programs (each
computation starts when the rank is free and its inputs were sent; F=1, B=2, I=W=1, FB=3), stamps
each message with the time its sender finished the computation that produced it, and posts, on both
ends, all messages of one stamp as one group: on the sender after that computation, on the receiver
before its first computation that starts at or after the stamp. Groups are posted in stamp order on
every rank and pair exactly across ranks, so by induction on the stamps every group completes: when
all groups before stamp t have, every computation that starts before t can run, so every rank posts
its group t. The verifier proves the result (``verify --table``); the order of computations does
not change.
"""

from collections import defaultdict
from typing import Dict, List, Tuple

from deepspeed_dualpipe.schedule import instructions

COST = {
    instructions.ForwardPass: 1,
    instructions.BackwardPass: 2,
    instructions.BackwardInput: 1,
    instructions.BackwardWeight: 1,
    instructions.OverlappedForwardBackward: 3,
}
_KIND = {
    instructions.SendActivation: "act",
    instructions.RecvActivation: "act",
    instructions.SendGrad: "grad",
    instructions.RecvGrad: "grad",
}
_SENDS = (instructions.SendActivation, instructions.SendGrad)

Message = Tuple[str, int, int, int]  # (kind, sender, receiver, index among this pair's messages of this kind)


class _Rank:
    """One rank's program cut into units: the instructions before a computation (loads, not p2p), the
    computation, the sends that follow it and the receives that precede it."""

    def __init__(self, rank: int, steps: List[List]):
        self.units, self.tail = [], []  # unit: [before, compute, receives (Message), sends (instruction, Message)]
        before, receives, early_sends, counts = [], [], [], defaultdict(int)
        for ins in (ins for step in steps for ins in step):
            if isinstance(ins, instructions.P2P):
                kind = _KIND[type(ins)]
                pair = (rank, ins.peer) if isinstance(ins, _SENDS) else (ins.peer, rank)
                message = (kind, *pair, counts[(kind, *pair)])
                counts[(kind, *pair)] += 1
                if isinstance(ins, _SENDS):
                    (self.units[-1][3] if self.units else early_sends).append((ins, message))
                else:
                    receives.append((ins, message))
            elif isinstance(ins, instructions.COMPUTE):
                self.units.append([before, ins, receives, []])
                before, receives = [], []
            else:
                before.append(ins)
        if receives:
            raise AssertionError(f"rank {rank}: receives after its last computation: {receives}")
        self.tail = before
        self.early_sends = early_sends  # sends before any computation (stamp 0)


def _times(ranks: List[_Rank]) -> Tuple[Dict[Message, int], List[List[int]]]:
    """Each message's stamp (its sender's end time) and each unit's start, by list scheduling."""
    stamp: Dict[Message, int] = {}
    for r in ranks:
        for _, message in r.early_sends:
            stamp[message] = 0
    starts = [[] for _ in ranks]
    free = [0] * len(ranks)
    progress = True
    while progress:
        progress = False
        for rank, r in enumerate(ranks):
            while len(starts[rank]) < len(r.units):
                _, compute, receives, sends = r.units[len(starts[rank])]
                if any(message not in stamp for _, message in receives):
                    break
                start = max([free[rank]] + [stamp[message] for _, message in receives])
                free[rank] = start + COST[type(compute)]
                starts[rank].append(start)
                for _, message in sends:
                    stamp[message] = free[rank]
                progress = True
    stuck = [rank for rank, r in enumerate(ranks) if len(starts[rank]) < len(r.units)]
    if stuck:
        raise AssertionError(f"ranks {stuck} wait for messages nobody sends: the schedule itself is inconsistent")
    return stamp, starts


def lockstep(programs: List[List[List]]) -> List[List[List]]:
    """Every rank's steps (as the builder records them, without commits) with their p2p re-placed in
    lockstep groups, each closed by a :class:`~.instructions.CommitP2P`."""
    ranks = [_Rank(rank, steps) for rank, steps in enumerate(programs)]
    stamp, starts = _times(ranks)
    out = []
    for rank, r in enumerate(ranks):
        groups = defaultdict(list)  # stamp -> [(order key, instruction)]
        for ins, message in r.early_sends:
            groups[0].append((message, ins))
        for _, _, receives, sends in r.units:
            for ins, message in receives + sends:
                groups[stamp[message]].append((message, ins))
        pending = sorted(groups)

        def post_until(time, steps):
            while pending and pending[0] <= time:
                group = sorted(groups[pending.pop(0)], key=lambda item: item[0])  # the same order on both ends
                steps.append([ins for _, ins in group] + [instructions.CommitP2P()])

        steps = []
        for (before, compute, _, _), start in zip(r.units, starts[rank]):
            post_until(start, steps)
            steps.append(before + [compute])
        post_until(float("inf"), steps)
        if r.tail:
            steps.append(r.tail)
        out.append(steps)
    return out


__all__ = ["lockstep", "COST"]
