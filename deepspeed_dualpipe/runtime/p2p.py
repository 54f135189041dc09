"""Point-to-point traffic of :class:`~deepspeed_dualpipe.runtime.engine.DualPipeEngine`, and its failures.

NCCL runs a rank's sends and receives in posting order on one stream, and a send blocks until its
receive runs; posted one by one in schedule order, DualPipe's crossing messages would deadlock
(docs/design.md, "Point-to-point on NCCL"). So the send and receive instructions only queue, and
each ``CommitP2P`` posts what is queued as one ``batch_isend_irecv`` (one NCCL group), as
:meth:`~deepspeed_dualpipe.schedule.commit.Handshakes.plan` says -- the same function the verifier
reads, so what is proven is what runs. A receive is waited when the computation that needs it
starts. A send holds detached tensors and lets them go as soon as it completes (:mod:`.sends`); all
are waited at the end of the batch. A channel's tensor shapes travel once, in the first batch.

Waits: on CUDA, ``work.wait()`` makes the compute stream wait and returns at once; a hang is caught
by the process group's ``timeout`` and NCCL's watchdog (docs/gpu.md). Elsewhere (gloo) every wait is
bounded by ``dualpipe.p2p_timeout_s`` and every failure is a :class:`~.errors.PipelineCommError`
(:class:`~.errors.PeerTimeout` or :class:`~.errors.PeerLost`) naming this rank, the peer, what was
awaited and the micro-batch.
"""

import threading
import time
from datetime import timedelta

import torch
from deepspeed import comm as dist
from deepspeed.runtime.pipe.engine import (PIPE_RECV_GRAD_TIMER, PIPE_RECV_INPUT_TIMER, PIPE_SEND_GRAD_TIMER,
                                           PIPE_SEND_OUTPUT_TIMER)

from deepspeed_dualpipe.runtime.errors import PeerTimeout, connection_failed
from deepspeed_dualpipe.schedule import instructions
from deepspeed_dualpipe.runtime.sends import PendingSends
from deepspeed_dualpipe.schedule.commit import SHAPES, Handshakes

_META_SIZE = 64  # int32 slots: count, then (dtype id, ndim, *shape) per tensor
_SENDS = (instructions.SendActivation, instructions.SendGrad)


def as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, )


class PointToPoint:
    """The engine's ``_exec_*`` for sends, receives and commits, and the waits behind them (a mixin).

    Its state is made by :meth:`_init_point_to_point`, which the engine calls once its config is read.
    """

    def _init_point_to_point(self):
        self._timeout = timedelta(seconds=self.dualpipe.p2p_timeout_s)  # every gloo wait's bound
        self._queued = []  # (p2p instruction, tensors) since the last CommitP2P
        self._handshakes = Handshakes()  # which channels have carried their shapes (schedule/commit.py)
        self._shapes = {}  # chunk -> [(shape, dtype)] of its received activations
        self._sent_specs = {}  # chunk -> [(shape, dtype)] announced to the next stage in its metadata
        # The posted sends not yet seen complete, with their tensors (a gloo send whose request is dropped before it
        # completes may never arrive): runtime/sends.py.
        self._send_reqs = PendingSends(self, background=self.device.type == "cpu")

    def _peer(self, peer: int) -> int:
        return self.grid.stage_to_global(stage_id=peer)

    # ----- the instructions: queue ---------------------------------------------------------------
    def _exec_send_activations(self, buffer_id, chunk, micro_batch, peer):
        outputs = as_tuple(self.slots[buffer_id].outputs)
        _check_sendable(outputs, self.stage_id, chunk)
        specs = [(tuple(t.shape), t.dtype) for t in outputs]
        if self._sent_specs.setdefault(chunk, specs) != specs:
            raise ValueError(f"pipeline rank {self.stage_id}, chunk {chunk}: micro-batch {micro_batch}'s outputs have "
                             f"shapes/dtypes {_describe(specs)}, but this channel was set up for "
                             f"{_describe(self._sent_specs[chunk])}; the plugin's schedules need the same activation "
                             f"shapes on every micro-batch and step (pad or bucket your batches)")
        # Detached: a send must not keep the graph of what it sends (a phased chunk's output is a view whose
        # grad_fn reaches back into its last island).
        self._queued.append((instructions.SendActivation(buffer_id, chunk, micro_batch,
                                                         peer), tuple(t.detach() for t in outputs)))

    def _exec_recv_activations(self, buffer_id, chunk, micro_batch, peer):
        # The buffers are allocated at the commit: on a channel's first message, only then are its shapes known.
        self._queued.append((instructions.RecvActivation(buffer_id, chunk, micro_batch, peer), None))

    def _exec_send_grads(self, buffer_id, chunk, micro_batch, peer):
        slot = self.slots[buffer_id]
        self._queued.append((instructions.SendGrad(buffer_id, chunk, micro_batch, peer), slot.input_grads))
        slot.input_grads = slot.inputs = None

    def _exec_recv_grads(self, buffer_id, chunk, micro_batch, peer):
        slot = self.slots[buffer_id]
        slot.output_grads = tuple(torch.empty_like(t) for t in as_tuple(slot.outputs) if t.is_floating_point())
        self._queued.append((instructions.RecvGrad(buffer_id, chunk, micro_batch, peer), slot.output_grads))

    # ----- the commit: one batch_isend_irecv per posting -----------------------------------------
    def _exec_commit_p2p(self):
        with self._timed(PIPE_SEND_OUTPUT_TIMER):  # wall_clock_breakdown: the posting of sends and receives
            self._commit()

    def _commit(self):
        queued, self._queued = self._queued, []
        tensors = {id(ins): t for ins, t in queued}
        for posting in self._handshakes.plan([ins for ins, _ in queued]):
            ops, spans, shapes = [], [], []  # spans: (instruction, first op, end op) of each data transfer
            for ins, kind in posting.ops:
                send = isinstance(ins, _SENDS)
                if kind == SHAPES:
                    meta = _encode_meta(tensors[id(ins)], self.DTYPE_TO_ID, self.device) if send else \
                        torch.zeros(_META_SIZE, dtype=torch.int32, device=self.device)
                    if not send:
                        shapes.append((ins, meta))
                    data = [meta]
                else:
                    data = tensors[id(ins)] if tensors[id(ins)] is not None else self._receive_into(ins)
                spans.append((ins, kind, len(ops), len(ops) + len(data)))
                op = dist.isend if send else dist.irecv
                ops += [dist.P2POp(op, _wire(t.contiguous() if send else t), self._peer(ins.peer)) for t in data]
            requests = self._post(ops, posting.ops[0][0].peer)
            per_op = len(requests) == len(ops)  # gloo: one request per op; NCCL: one for the whole group
            shape_requests = []
            for ins, kind, begin, end in spans:
                mine = requests[begin:end] if per_op else requests
                if isinstance(ins, _SENDS):  # its request and tensors live until it has completed
                    self._send_reqs.add(mine, ins.peer, [op.tensor for op in ops[begin:end]], _sent(ins, kind))
                elif kind == SHAPES:
                    shape_requests += mine
                elif isinstance(ins, instructions.RecvActivation):
                    self.slots[ins.buffer_id].activation_recv = mine
                else:
                    self.slots[ins.buffer_id].grad_recv = mine
            if posting.wait:  # the shapes of a first message: needed now, to allocate its receive
                first = shapes[0][0]
                # only the receives: the sends' requests belong to PendingSends (on gloo, to its thread)
                self._wait_requests(shape_requests, "the shapes of the activations", first.chunk, first.micro_batch,
                                    first.peer)
                for ins, meta in shapes:
                    self._shapes[ins.chunk] = _decode_meta(meta, self.ID_TO_DTYPE)

    def _receive_into(self, ins):
        """Fresh buffers for a received activation, kept in its slot as the stage's inputs."""
        tensors = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in self._shapes[ins.chunk]]
        for t in tensors:
            t.requires_grad_(t.is_floating_point())
        self.slots[ins.buffer_id].inputs = tensors[0] if len(tensors) == 1 else tuple(tensors)
        return tensors

    def _post(self, ops, peer):
        """``batch_isend_irecv``, its requests each waited at most once (a gloo request waited again waits for a
        next message); gloo refuses to post to a peer whose connection is gone: say who and why."""
        try:
            return [_Once(request) for request in dist.batch_isend_irecv(ops)]
        except RuntimeError as error:
            raise connection_failed(self, error, peer, "while posting a batch of sends and receives") from error

    # ----- waits ---------------------------------------------------------------------------------
    def _wait(self, pending, what, chunk, micro_batch, location):
        """Wait for a slot's posted receive (if any); returns ``None``, for the slot to forget it."""
        self._send_reqs.poll()
        if pending is not None:
            # In a recorded step on the step's clock: on CUDA the wait is the stream's (the host returns at
            # once), so only events around it on the stream see how long the peer kept this rank waiting.
            clock = self.step_clock
            start, stamp = time.perf_counter(), (None if clock is None else clock.now())
            with self._timed(PIPE_RECV_INPUT_TIMER if what == "the activation" else PIPE_RECV_GRAD_TIMER):
                self._wait_requests(pending, what, chunk, micro_batch, location[0])
            self._waited += time.perf_counter() - start  # the host's view (trace.start_recording)
            if clock is not None:
                self._wait_stamps.append((stamp, clock.now()))

    def _wait_requests(self, requests, what, chunk, micro_batch, peer, deadline=None, source="from"):
        """Wait for posted requests. On CUDA, on the stream (``wait()`` returns at once; NCCL's watchdog and the
        process group's timeout catch a hang). Elsewhere until ``deadline`` (``time.monotonic()``; default
        ``dualpipe.p2p_timeout_s`` from now), else raise :class:`~.errors.PeerTimeout` (or :class:`~.errors.PeerLost`).

        gloo fails a wait either when its timeout expires or, at once, when the connection to the
        peer drops (the peer crashed, was killed or exited; also every wait after an earlier timeout
        with that peer, since gloo closes the connection on a timeout). The message says which.
        """
        if self.device.type == "cuda":
            for request in requests:
                request.wait()
            return
        start = time.monotonic()
        deadline = start + self._timeout.total_seconds() if deadline is None else deadline
        try:
            for request in requests:
                # At least 1 ms: gloo reads a zero timeout as "the process group's default" (30 min).
                if request.wait(timedelta(seconds=max(deadline - time.monotonic(), 1e-3))) is False:
                    raise RuntimeError("timed out: the wait returned without completing")
        except RuntimeError as error:
            waited = time.monotonic() - start
            awaited = what if micro_batch is None else f"{what} of micro-batch {micro_batch} (chunk {chunk})"
            if time.monotonic() >= deadline - 0.01 or "timed out" in str(error).lower():
                raise PeerTimeout.gave_up(self, error, peer, awaited, source, waited) from error
            raise connection_failed(self, error, peer, f"after {waited:.1f} s of waiting for {awaited} "
                                    f"{source} it") from error

    def _drain_sends(self):
        """Wait for every send of the batch, all within one ``dualpipe.p2p_timeout_s``: a receiver that
        died or never receives fails this like any other wait instead of hanging the end of the batch."""
        if self._queued:
            raise RuntimeError(f"pipeline rank {self.stage_id}: {len(self._queued)} sends/receives queued after the "
                               f"schedule's last CommitP2P were never posted (a schedule without commit points?)")
        with self._timed(PIPE_SEND_GRAD_TIMER):  # wall_clock_breakdown: the end-of-batch wait for the sends
            self._send_reqs.drain()


def _sent(ins, kind) -> str:
    """What a send carries, for its errors."""
    what = "shapes of the activations" if kind == SHAPES else \
        "activation" if isinstance(ins, instructions.SendActivation) else "gradient"
    return f"the {what} of micro-batch {ins.micro_batch} (chunk {ins.chunk}) this rank sent"


class _Once:
    """A posted request that remembers it completed: a group's requests are waited for the shapes, for a
    computation's input and at the end of the batch, and gloo's ``wait`` on a completed request would block."""

    __slots__ = ("request", "done", "_lock")

    def __init__(self, request):
        self.request, self.done, self._lock = request, False, threading.Lock()

    def is_completed(self) -> bool:
        return self.done or self.request.is_completed()

    def wait(self, timeout=None):
        with self._lock:  # two threads must not both wait on one gloo request
            if not self.done:
                completed = self.request.wait() if timeout is None else self.request.wait(timeout)
                self.done = completed is not False
        return self.done


def _wire(t: torch.Tensor) -> torch.Tensor:
    """What travels for ``t``: a bool tensor as its bytes (NCCL has no bool type), the same memory."""
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _check_sendable(outputs, stage: int, chunk: int) -> None:
    for t in outputs:
        if not torch.is_tensor(t):
            raise TypeError(f"pipeline rank {stage}, chunk {chunk}: a stage must return a tensor or a tuple of "
                            f"tensors to send downstream, got {type(t).__name__}")


def _describe(specs) -> str:
    return ", ".join(f"{list(shape)} {str(dtype).replace('torch.', '')}" for shape, dtype in specs)


def _encode_meta(tensors, dtype_to_id, device) -> torch.Tensor:
    values = [len(tensors)]
    for t in tensors:
        values += [dtype_to_id[t.dtype], t.dim(), *t.shape]
    if len(values) > _META_SIZE:
        raise ValueError(f"activation metadata needs {len(values)} slots, more than {_META_SIZE}")
    meta = torch.zeros(_META_SIZE, dtype=torch.int32)
    meta[:len(values)] = torch.tensor(values, dtype=torch.int32)
    return meta.to(device)


def _decode_meta(meta: torch.Tensor, id_to_dtype):
    values, specs, i = meta.tolist(), [], 1
    for _ in range(values[0]):
        dtype, ndim = id_to_dtype[values[i]], values[i + 1]
        specs.append((tuple(values[i + 2:i + 2 + ndim]), dtype))
        i += 2 + ndim
    return specs
