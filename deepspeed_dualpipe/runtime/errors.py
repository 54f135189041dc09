"""The pipeline's communication errors: a point-to-point operation that failed, never one that hangs.

Every message names this rank, the peer, what was awaited and the micro-batch, and says what to do.
"""


class PipelineCommError(RuntimeError):
    """A pipeline point-to-point operation failed (see :class:`PeerTimeout` and :class:`PeerLost`)."""

    @staticmethod
    def who(engine, stage=None) -> str:
        """Names ``engine``'s own rank, or its peer at pipeline rank ``stage``: "pipeline rank S (global rank G)"."""
        if stage is None:
            return f"pipeline rank {engine.stage_id} (global rank {engine.global_rank})"
        return f"pipeline rank {stage} (global rank {engine._peer(stage)})"


class PeerTimeout(PipelineCommError):
    """A wait outlived ``dualpipe.p2p_timeout_s``: the peer is stuck, mis-scheduled, or gone without closing
    its connection."""

    @classmethod
    def gave_up(cls, engine, error, peer, awaited, source, waited):
        """The wait for ``awaited`` ("the activation of micro-batch 2 (chunk 1)") ``source`` ("from"
        or "by") pipeline rank ``peer`` ran out of time after ``waited`` seconds."""
        return cls(f"{cls.who(engine)} gave up waiting for {awaited} {source} "
                   f"{cls.who(engine, peer)} after {waited:.1f} s (dualpipe.p2p_timeout_s="
                   f"{engine._timeout.total_seconds():g}), schedule {engine.schedule_name}: that rank is stuck, runs "
                   f"a different schedule or died without closing its connection; check its log, or raise "
                   f"dualpipe.p2p_timeout_s if it is only slow (gloo: {error})")


class PeerLost(PipelineCommError):
    """The connection to the peer dropped: gloo reports a crashed, killed or exited process at once,
    without waiting for the timeout."""


def connection_failed(engine, error, peer, during) -> PipelineCommError:
    """gloo's connection to pipeline rank ``peer`` failed ``during`` ("while sending the activation of
    micro-batch 3 (chunk 0) to it"). Usually the peer died (:class:`PeerLost`); when an earlier wait on this
    rank timed out, gloo closed the connection itself, and the cause is that timeout (:class:`PeerTimeout`)."""
    after_timeout = "timeout caused pair closure" in str(error)
    cause = ("an earlier wait on this rank timed out, and gloo closes the connection on a timeout; the first "
             "error is the one to read" if after_timeout else
             "that rank probably died (crashed, was killed or exited); check its log for the first error")
    kind = PeerTimeout if after_timeout else PeerLost
    return kind(f"{kind.who(engine)} lost its connection to {kind.who(engine, peer)} {during}, "
                f"schedule {engine.schedule_name}: {cause} (gloo: {error})")


__all__ = ["PipelineCommError", "PeerTimeout", "PeerLost", "connection_failed"]
