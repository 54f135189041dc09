"""Pipeline instructions for chunked, split-backward and overlapped schedules.

These extend DeepSpeed's ``deepspeed.runtime.pipe.schedule`` vocabulary in its own
idiom: one class per operation, keyword arguments stored as attributes and handed
to the engine's ``_exec_*`` method. Unlike DeepSpeed's 1F1B instructions, each one
names the chunk and micro-batch it works on, and each communication names its peer
(a pipeline rank), so a stream can be verified and simulated on its own.
"""

from deepspeed.runtime.pipe import schedule as ds


class LoadMicroBatch(ds.LoadMicroBatch):
    """Load micro-batch ``micro_batch`` for ``chunk``: inputs at a first stage, labels at a loss stage."""

    def __init__(self, buffer_id, chunk, micro_batch):
        super().__init__(buffer_id, chunk=chunk, micro_batch=micro_batch)


class ForwardPass(ds.ForwardPass):
    """Forward ``chunk`` on ``micro_batch`` (op ``F``)."""

    def __init__(self, buffer_id, chunk, micro_batch):
        super().__init__(buffer_id, chunk=chunk, micro_batch=micro_batch)


class BackwardPass(ds.BackwardPass):
    """Full backward of ``chunk`` on ``micro_batch``: input and weight gradients (op ``B``)."""

    def __init__(self, buffer_id, chunk, micro_batch):
        super().__init__(buffer_id, chunk=chunk, micro_batch=micro_batch)


class BackwardInput(ds.BufferOpInstruction):
    """Backward for input gradients only (op ``I``); the weight part waits for a :class:`BackwardWeight`."""

    def __init__(self, buffer_id, chunk, micro_batch):
        super().__init__(buffer_id, chunk=chunk, micro_batch=micro_batch)


class BackwardWeight(ds.BufferOpInstruction):
    """The deferred weight gradients of an earlier :class:`BackwardInput` (op ``W``)."""

    def __init__(self, buffer_id, chunk, micro_batch):
        super().__init__(buffer_id, chunk=chunk, micro_batch=micro_batch)


class OverlappedForwardBackward(ds.PipeInstruction):
    """Forward of one micro-batch and backward of another as one overlapped pair (op ``FB``).

    The engine may interleave their phases so that the communication of one hides
    under the computation of the other. ``backward_op`` is ``"B"`` (full backward) or
    ``"I"`` (input gradients only).
    """

    def __init__(self,
                 forward_buffer,
                 forward_chunk,
                 forward_micro_batch,
                 backward_buffer,
                 backward_chunk,
                 backward_micro_batch,
                 backward_op="B"):
        super().__init__(forward_buffer=forward_buffer,
                         forward_chunk=forward_chunk,
                         forward_micro_batch=forward_micro_batch,
                         backward_buffer=backward_buffer,
                         backward_chunk=backward_chunk,
                         backward_micro_batch=backward_micro_batch,
                         backward_op=backward_op)


class _P2P(ds.BufferOpInstruction):

    def __init__(self, buffer_id, chunk, micro_batch, peer):
        super().__init__(buffer_id, chunk=chunk, micro_batch=micro_batch, peer=peer)


class SendActivation(_P2P, ds.SendActivation):
    """Post a non-blocking send of ``chunk``'s outputs for ``micro_batch`` to pipeline rank ``peer``."""


class RecvActivation(_P2P, ds.RecvActivation):
    """Post a non-blocking receive of ``chunk``'s inputs for ``micro_batch`` from ``peer``.

    The engine waits for it only when the forward that needs it starts.
    """


class SendGrad(_P2P, ds.SendGrad):
    """Post a non-blocking send of the gradients of ``chunk``'s inputs to ``peer``."""


class RecvGrad(_P2P, ds.RecvGrad):
    """Post a non-blocking receive of the gradients of ``chunk``'s outputs from ``peer``.

    The engine waits for it only when the backward that needs it starts.
    """


class CommitP2P(ds.CommitP2P):
    """Post the sends and receives queued since the last commit as one ``batch_isend_irecv`` (one NCCL group).

    The plugin's send and receive instructions only queue; :func:`~.commit.Handshakes.plan` decides
    how a commit is posted (the shapes of a channel's first message go first). Unlike DeepSpeed's own
    ``CommitP2P``, nothing is waited here: a receive is waited by the computation that needs it, and
    the sends at the end of the batch.
    """


class ReduceMirrorGrads(ds.PipeInstruction):
    """Sum gradients across the mirror pair of ranks (r, P-1-r) that hold copies of the same stages."""


# DeepSpeed's own end-of-batch instructions, re-exported for schedules that use them.
ReduceGrads = ds.ReduceGrads
ReduceTiedGrads = ds.ReduceTiedGrads
OptimizerStep = ds.OptimizerStep

P2P = (SendActivation, RecvActivation, SendGrad, RecvGrad)
COMPUTE = (ForwardPass, BackwardPass, BackwardInput, BackwardWeight, OverlappedForwardBackward)
OP_OF = {ForwardPass: "F", BackwardPass: "B", BackwardInput: "I", BackwardWeight: "W", OverlappedForwardBackward: "FB"}
