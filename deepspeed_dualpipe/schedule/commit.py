"""How the plugin's engine posts point-to-point operations: one batch per commit point.

NCCL's rules (docs/design.md, "Point-to-point on NCCL"): a rank's sends and receives run on
its communicator's stream in the order they were posted, each blocks that stream until the
peer's matching operation runs, and the operations of one ``batch_isend_irecv`` form one group
that progresses together. So the plugin never posts a send or a receive on its own: the
instructions between two computations are queued and posted together at a
:class:`~.instructions.CommitP2P`, the way DeepSeek's reference commits each step's
communication. :meth:`Handshakes.plan` is the one description of what a commit posts; the
engine executes it and the verifier (``analysis/events.py``) reads it, so both see the same
groups, handshakes included.
"""

from dataclasses import dataclass
from typing import List, Tuple

from deepspeed_dualpipe.schedule import instructions

SHAPES = "shapes"  # the metadata of a channel's first message: tensor count, dtypes and shapes
DATA = "data"


@dataclass(frozen=True)
class Posting:
    """One ``batch_isend_irecv``: ``ops`` are ``(instruction, SHAPES or DATA)`` in posting order.

    ``wait``: the host waits for the group before it goes on (it has received shapes it needs to
    allocate the next receive).
    """

    ops: Tuple[Tuple[object, str], ...]
    wait: bool = False


class Handshakes:
    """Which activation channels have carried their shapes, and :meth:`plan`, which posts a commit.

    A receiver must know the shapes of the activations it receives before it can post the receive.
    The first time a commit carries a channel's activation (its chunk's first message), the shapes
    take its place in the commit's group and the activation follows alone in a second group, after
    the receiver has waited for the first. Sender and receiver both know which message is the
    first, so their groups line up. Kept for the engine's lifetime: the steady state posts exactly
    one group per commit and never waits on the host.
    """

    def __init__(self):
        self.announced = set()  # chunks whose activation shapes this rank has sent
        self.shaped = set()  # chunks whose activation shapes this rank has received

    def plan(self, queued) -> List[Posting]:
        """The groups that post ``queued`` (the p2p instructions since the last commit), in order."""
        group, after, wait = [], [], False
        for ins in queued:
            first_recv = isinstance(ins, instructions.RecvActivation) and ins.chunk not in self.shaped
            first_send = isinstance(ins, instructions.SendActivation) and ins.chunk not in self.announced
            if first_recv or first_send:
                (self.shaped if first_recv else self.announced).add(ins.chunk)
                group.append((ins, SHAPES))
                after.append((ins, DATA))
                wait = wait or first_recv
            else:
                group.append((ins, DATA))
        return [Posting(tuple(group), wait)] + ([Posting(tuple(after))] if after else [])


def insert_commits(steps: List[List]) -> List[List]:
    """Add a :class:`~.instructions.CommitP2P` wherever queued p2p instructions meet the next instruction
    that is not one (a load, a computation or the end-of-batch reductions), and after the last ones."""
    pending = False
    out = []
    for step in steps:
        new = []
        for ins in step:
            is_p2p = isinstance(ins, instructions.P2P)
            if pending and not is_p2p:
                new.append(instructions.CommitP2P())
                pending = False
            new.append(ins)
            pending = pending or is_p2p
        out.append(new)
    if pending:
        out.append([instructions.CommitP2P()])
    return out


__all__ = ["Posting", "Handshakes", "insert_commits", "SHAPES", "DATA"]
