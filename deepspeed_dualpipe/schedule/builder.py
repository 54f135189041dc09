"""Build a rank's instruction stream with the verbs DualPipe is written in.

DeepSeek's reference schedules are written as calls like "forward chunk 0",
"backward chunk 1 with zero bubble", "overlapped forward/backward", "weight pass",
with receives and sends posted around them. :class:`ProgramBuilder` offers the same
verbs and records the DeepSpeed instructions they stand for; :func:`assign_buffers`
then gives every live (chunk, micro-batch) a buffer slot.
"""

import heapq
from collections import deque
from typing import Dict, List, Optional, Tuple

from deepspeed_dualpipe.schedule import instructions
from deepspeed_dualpipe.schedule.commit import insert_commits
from deepspeed_dualpipe.schedule.layout import Layout

Key = Tuple[int, int]  # (chunk, micro_batch): a buffer before slots are assigned

_BUFFER_FIELDS = ("buffer_id", "forward_buffer", "backward_buffer")


class ProgramBuilder:
    """Records one rank's instructions; one step per compute operation and the p2p posted around it."""

    def __init__(self, layout: Layout, rank: int, forward_only: bool = False):
        self.layout = layout
        self.rank = rank
        self.forward_only = forward_only
        self.steps: List[List] = [[]]
        self._order = {c: layout.micro_batches_of(rank, c) for c in range(layout.chunks_per_rank)}
        self._next: Dict[str, List[int]] = {}
        self._weights = deque()  # (chunk, micro_batch) of BackwardInputs whose weight pass is pending

    @property
    def stages(self) -> int:
        """Pipeline ranks."""
        return self.layout.ranks

    @property
    def micro_batches(self) -> int:
        return self.layout.micro_batches

    # ----- bookkeeping -------------------------------------------------------------------------
    def _take(self, counter: str, chunk: int) -> int:
        """The next micro-batch of ``chunk`` for ``counter`` (each op kind walks micro-batches in order)."""
        position = self._next.setdefault(counter, [0] * self.layout.chunks_per_rank)
        micro_batch = self._order[chunk][position[chunk]]
        position[chunk] += 1
        return micro_batch

    def _peek(self, counter: str, chunk: int) -> int:
        position = self._next.get(counter, [0] * self.layout.chunks_per_rank)[chunk]
        return self._order[chunk][position]

    def _emit(self, instruction) -> None:
        # A step is one compute operation, with the loads and receives posted before it and the
        # sends posted after it.
        after_compute = any(isinstance(i, instructions.COMPUTE) for i in self.steps[-1])
        if after_compute and not isinstance(instruction, (instructions.SendActivation, instructions.SendGrad)):
            self.steps.append([])
        self.steps[-1].append(instruction)

    def _remote(self, neighbour):
        """The peer rank of a neighbouring location, or None when it is absent or on this rank."""
        if neighbour is None or neighbour[0] == self.rank:
            return None
        return neighbour[0]

    def _upstream_peer(self, chunk):
        return self._remote(self.layout.upstream(self.rank, chunk, self._order[chunk][0]))

    def _downstream_peer(self, chunk):
        return self._remote(self.layout.downstream(self.rank, chunk, self._order[chunk][0]))

    # ----- communication -----------------------------------------------------------------------
    def recv_forward(self, chunk: int) -> None:
        peer = self._upstream_peer(chunk)
        if peer is not None:
            m = self._take("recv_forward", chunk)
            self._emit(instructions.RecvActivation((chunk, m), chunk, m, peer))

    def send_forward(self, chunk: int) -> None:
        peer = self._downstream_peer(chunk)
        if peer is not None:
            m = self._take("send_forward", chunk)
            self._emit(instructions.SendActivation((chunk, m), chunk, m, peer))

    def recv_backward(self, chunk: int) -> None:
        peer = self._downstream_peer(chunk)
        if peer is not None and not self.forward_only:
            m = self._take("recv_backward", chunk)
            self._emit(instructions.RecvGrad((chunk, m), chunk, m, peer))

    def send_backward(self, chunk: int) -> None:
        peer = self._upstream_peer(chunk)
        if peer is not None and not self.forward_only:
            m = self._take("send_backward", chunk)
            self._emit(instructions.SendGrad((chunk, m), chunk, m, peer))

    # ----- computation -------------------------------------------------------------------------
    def _load(self, chunk: int, micro_batch: int) -> None:
        path = self.layout.path(micro_batch)
        if (self.rank, chunk) in (path[0], path[-1]):
            self._emit(instructions.LoadMicroBatch((chunk, micro_batch), chunk, micro_batch))

    def _forward_op(self, chunk: int):
        m = self._take("forward", chunk)
        self._load(chunk, m)
        return m

    def _backward_op(self, chunk: int, zero_bubble: bool):
        m = self._take("backward", chunk)
        if zero_bubble:
            self._weights.append((chunk, m))
            return instructions.BackwardInput((chunk, m), chunk, m)
        return instructions.BackwardPass((chunk, m), chunk, m)

    def forward(self, chunk: int, recv: bool = True, send: bool = True) -> None:
        """F: receive the input (if asked), forward one micro-batch of ``chunk``, send its output."""
        if recv:
            self.recv_forward(chunk)
        m = self._forward_op(chunk)
        self._emit(instructions.ForwardPass((chunk, m), chunk, m))
        if send:
            self.send_forward(chunk)

    def backward(self, chunk: int, zero_bubble: bool = False, recv: bool = True, send: bool = True) -> None:
        """B, or I when ``zero_bubble`` (its weight pass queued for :meth:`weight`)."""
        if self.forward_only:
            return
        if recv:
            self.recv_backward(chunk)
        self._emit(self._backward_op(chunk, zero_bubble))
        if send:
            self.send_backward(chunk)

    def forward_backward(self, forward_chunk: int, backward_chunk: int, recv_forward: bool = True) -> None:
        """FB: forward one micro-batch and fully backward another as an overlapped pair."""
        if self.forward_only:
            return self.forward(forward_chunk, recv=recv_forward)
        if recv_forward:
            self.recv_forward(forward_chunk)
        self.recv_backward(backward_chunk)
        mf = self._forward_op(forward_chunk)
        backward = self._backward_op(backward_chunk, zero_bubble=False)
        self._emit(
            instructions.OverlappedForwardBackward((forward_chunk, mf), forward_chunk, mf, backward.buffer_id,
                                                   backward.chunk, backward.micro_batch, "B"))
        self.send_forward(forward_chunk)
        self.send_backward(backward_chunk)

    def weight(self, chunk: Optional[int] = None) -> None:
        """W: the oldest pending weight pass (first in, first out), or the oldest of ``chunk``'s
        (ZB-V drains each chunk's weight passes in its own order)."""
        if self.forward_only:
            return
        if chunk is None:
            chunk, m = self._weights.popleft()
        else:
            chunk, m = next(key for key in self._weights if key[0] == chunk)
            self._weights.remove((chunk, m))
        self._emit(instructions.BackwardWeight((chunk, m), chunk, m))

    def pending_weights(self, chunk: Optional[int] = None) -> int:
        return sum(1 for key in self._weights if chunk is None or key[0] == chunk)

    def finish(self, reduce_mirror: bool = False, commits: bool = True) -> List[List]:
        """Close the batch with the gradient reductions and the optimizer step, and add the commit points
        (:func:`~.commit.insert_commits`): the p2p between two computations is posted as one batch.
        ``commits=False`` leaves them out (:mod:`.lockstep` places its own)."""
        if self._weights:
            raise AssertionError(f"rank {self.rank}: weight passes left pending: {list(self._weights)}")
        if not self.forward_only:
            tail = [instructions.ReduceMirrorGrads()] if reduce_mirror else []
            self.steps.append(
                tail + [instructions.ReduceTiedGrads(),
                        instructions.ReduceGrads(),
                        instructions.OptimizerStep()])
        steps = [step for step in self.steps if step]
        return insert_commits(steps) if commits else steps


def assign_buffers(steps: List[List]) -> int:
    """Replace (chunk, micro_batch) keys by buffer slots, reusing a slot once its last use has passed.

    Returns the number of slots. A slot is taken at a key's first instruction and freed after
    its last, so the count is the peak number of micro-batches the rank holds at once.
    """
    flat = [ins for step in steps for ins in step]
    refs = [[(field, ins.kwargs[field]) for field in _BUFFER_FIELDS if field in ins.kwargs] for ins in flat]
    last_use = {key: position for position, fields in enumerate(refs) for _, key in fields}
    slot_of, free, slots = {}, [], 0
    for position, (ins, fields) in enumerate(zip(flat, refs)):
        for field, key in fields:
            if key not in slot_of:
                if free:
                    slot_of[key] = heapq.heappop(free)
                else:
                    slot_of[key], slots = slots, slots + 1
            ins.kwargs[field] = slot_of[key]
            setattr(ins, field, slot_of[key])
        for _, key in fields:
            if last_use[key] == position:
                heapq.heappush(free, slot_of.pop(key))
    return slots
