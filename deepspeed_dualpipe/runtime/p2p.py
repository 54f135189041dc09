"""Point-to-point traffic of :class:`~deepspeed_dualpipe.runtime.engine.DualPipeEngine`, and its failures.

Sends and receives are non-blocking (``deepspeed.comm`` ``batch_isend_irecv``): a receive is
posted when the schedule says and waited only when the computation that needs it starts; a send
holds detached tensors and lets them go as soon as it completes (:mod:`.sends`), and all are
waited at the end of the batch. A channel's tensor shapes travel once, as metadata before its
first message. Every wait is bounded by ``dualpipe.p2p_timeout_s`` and every failure is a
:class:`~.errors.PipelineCommError` (:class:`~.errors.PeerTimeout` or
:class:`~.errors.PeerLost`) naming this rank, the peer, what was awaited and the micro-batch.
"""

import time
from datetime import timedelta

import torch
from deepspeed import comm as dist

from deepspeed_dualpipe.runtime.errors import PeerTimeout, connection_failed

_META_SIZE = 64  # int32 slots: count, then (dtype id, ndim, *shape) per tensor


def as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, )


class PointToPoint:
    """The engine's ``_exec_*`` for sends and receives, and the waits behind them (a mixin)."""

    def _peer(self, peer: int) -> int:
        return self.grid.stage_to_global(stage_id=peer)

    def _exec_send_activations(self, buffer_id, chunk, micro_batch, peer):
        outputs = as_tuple(self.slots[buffer_id].outputs)
        _check_sendable(outputs, self.stage_id, chunk)
        specs = [(tuple(t.shape), t.dtype) for t in outputs]
        if chunk not in self._sent_specs:
            self._sent_specs[chunk] = specs
            self._isend([_encode_meta(outputs, self.DTYPE_TO_ID, self.device)], peer)
        elif specs != self._sent_specs[chunk]:
            raise ValueError(f"pipeline rank {self.stage_id}, chunk {chunk}: micro-batch {micro_batch}'s outputs have "
                             f"shapes/dtypes {_describe(specs)}, but this channel was set up for "
                             f"{_describe(self._sent_specs[chunk])}; the plugin's schedules need the same activation "
                             f"shapes on every micro-batch and step (pad or bucket your batches)")
        self._isend(outputs, peer)

    def _exec_recv_activations(self, buffer_id, chunk, micro_batch, peer):
        if chunk not in self._shapes:  # first message on this channel: its shapes come first
            meta = torch.zeros(_META_SIZE, dtype=torch.int32, device=self.device)
            self._wait_requests(self._irecv([meta], peer), "the shapes of the activations", chunk, micro_batch, peer)
            self._shapes[chunk] = _decode_meta(meta, self.ID_TO_DTYPE)
        tensors = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in self._shapes[chunk]]
        slot = self.slots[buffer_id]
        slot.activation_recv = self._irecv(tensors, peer)
        for t in tensors:
            t.requires_grad_(t.is_floating_point())
        slot.inputs = tensors[0] if len(tensors) == 1 else tuple(tensors)

    def _exec_send_grads(self, buffer_id, chunk, micro_batch, peer):
        slot = self.slots[buffer_id]
        self._isend(slot.input_grads, peer)
        slot.input_grads = slot.inputs = None

    def _exec_recv_grads(self, buffer_id, chunk, micro_batch, peer):
        slot = self.slots[buffer_id]
        grads = [torch.empty_like(t) for t in as_tuple(slot.outputs) if t.is_floating_point()]
        slot.grad_recv = self._irecv(grads, peer)
        slot.output_grads = tuple(grads)

    def _isend(self, tensors, peer):
        # Detached: a send must not keep the graph of what it sends (a phased chunk's output is a view whose
        # grad_fn reaches back into its last island).
        ops = [dist.P2POp(dist.isend, t.detach().contiguous(), self._peer(peer)) for t in tensors]
        self._send_reqs.add(self._post(ops, peer, "while sending to it"), peer)

    def _irecv(self, tensors, peer):
        return self._post([dist.P2POp(dist.irecv, t, self._peer(peer)) for t in tensors], peer,
                          "while posting a receive from it")

    def _post(self, ops, peer, during):
        """``batch_isend_irecv``; gloo refuses to post to a peer whose connection is gone: say who and why."""
        try:
            return dist.batch_isend_irecv(ops)
        except RuntimeError as error:
            raise connection_failed(self, error, peer, during) from error

    def _wait(self, pending, what, chunk, micro_batch, location):
        """Wait for a slot's posted receive (if any); returns ``None``, for the slot to forget it."""
        self._send_reqs.poll()
        if pending is not None:
            start = time.perf_counter()
            self._wait_requests(pending, what, chunk, micro_batch, location[0])
            self._waited += time.perf_counter() - start

    def _wait_requests(self, requests, what, chunk, micro_batch, peer, deadline=None, source="from"):
        """Wait for one ``batch_isend_irecv``'s requests until ``deadline`` (``time.monotonic()``;
        default ``dualpipe.p2p_timeout_s`` from now), else raise :class:`~.errors.PeerTimeout` (or :class:`~.errors.PeerLost`).

        gloo fails a wait either when its timeout expires or, at once, when the connection to the
        peer drops (the peer crashed, was killed or exited; also every wait after an earlier timeout
        with that peer, since gloo closes the connection on a timeout). The message says which.
        """
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
        self._send_reqs.drain()


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
    meta = torch.zeros(_META_SIZE, dtype=torch.int32, device=device)
    meta[:len(values)] = torch.tensor(values, dtype=torch.int32)
    return meta


def _decode_meta(meta: torch.Tensor, id_to_dtype):
    values, specs, i = meta.tolist(), [], 1
    for _ in range(values[0]):
        dtype, ndim = id_to_dtype[values[i]], values[i + 1]
        specs.append((tuple(values[i + 2:i + 2 + ndim]), dtype))
        i += 2 + ndim
    return specs
