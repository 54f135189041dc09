"""Where each model stage of a schedule lives: the path of a micro-batch.

A micro-batch visits the model's stages in order; each visit happens at a
*location* ``(rank, chunk)``. Every schedule in this package is described by the
path of each micro-batch, from which follow its peers, its first stage (which
loads inputs) and its last stage (which computes the loss).
"""

from dataclasses import dataclass
from enum import Enum
from typing import List, Optional, Tuple

Location = Tuple[int, int]  # (pipeline rank, chunk on that rank)


class LayoutKind(str, Enum):
    """How a schedule places model stages on ranks (a ``str``, so it reads and serialises as its name)."""

    LINEAR = "linear"  # 1F1B, ZB1P: rank r holds stage r
    BIDIRECTIONAL = "bidirectional"  # DualPipe: rank r holds stages r and P-1-r (mirror copies)
    V = "v"  # DualPipeV, ZB-V: rank r holds stages r and 2P-1-r
    INTERLEAVED = "interleaved"  # interleaved 1F1B (virtual stages): rank r holds stages r and P+r

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Layout:
    """Stage placement of one schedule kind for ``ranks`` ranks and ``micro_batches``."""

    kind: LayoutKind
    ranks: int
    micro_batches: int

    def __post_init__(self):
        object.__setattr__(self, "kind", LayoutKind(self.kind))

    @property
    def chunks_per_rank(self) -> int:
        return 1 if self.kind is LayoutKind.LINEAR else 2

    @property
    def model_stages(self) -> int:
        """How many pieces the model is cut into."""
        return 2 * self.ranks if self.kind in (LayoutKind.V, LayoutKind.INTERLEAVED) else self.ranks

    @property
    def param_copies(self) -> int:
        """How many copies of every parameter the pipeline holds."""
        return 2 if self.kind is LayoutKind.BIDIRECTIONAL else 1

    def path(self, micro_batch: int) -> List[Location]:
        """The locations ``micro_batch`` visits, in model-stage order (one list per direction, shared: read only)."""
        return self._indexed_path(self.kind is LayoutKind.BIDIRECTIONAL and micro_batch >= self.micro_batches // 2)[0]

    def _build_path(self, micro_batch: int) -> List[Location]:
        P = self.ranks
        if self.kind is LayoutKind.LINEAR:
            return [(r, 0) for r in range(P)]
        if self.kind is LayoutKind.BIDIRECTIONAL:
            if micro_batch < self.micro_batches // 2:
                return [(r, 0) for r in range(P)]  # forward direction: enters at rank 0
            return [(P - 1 - s, 1) for s in range(P)]  # reverse direction: enters at rank P-1
        if self.kind is LayoutKind.INTERLEAVED:  # down the ranks twice: rank P-1 hands over to rank 0
            return [(r, 0) for r in range(P)] + [(r, 1) for r in range(P)]
        return [(r, 0) for r in range(P)] + [(r, 1) for r in reversed(range(P))]

    def model_stage(self, rank: int, chunk: int) -> int:
        """The model stage held by ``chunk`` of ``rank``."""
        P = self.ranks
        if chunk == 0:
            return rank
        if self.kind is LayoutKind.BIDIRECTIONAL:
            return P - 1 - rank
        return P + rank if self.kind is LayoutKind.INTERLEAVED else 2 * P - 1 - rank

    def _neighbour(self, rank: int, chunk: int, micro_batch: int, step: int) -> Optional[Location]:
        path, position = self._indexed_path(self.kind is LayoutKind.BIDIRECTIONAL
                                            and micro_batch >= self.micro_batches // 2)
        i = position[(rank, chunk)] + step
        return path[i] if 0 <= i < len(path) else None

    def _indexed_path(self, reverse: bool):
        """(path, location -> its index): one per direction, built once (asked for at every send and receive)."""
        cache = self.__dict__.get("_paths")
        if cache is None:
            cache = {}
            object.__setattr__(self, "_paths", cache)
        if reverse not in cache:
            path = self._build_path(self.micro_batches - 1 if reverse else 0)
            cache[reverse] = (path, {location: i for i, location in enumerate(path)})
        return cache[reverse]

    def upstream(self, rank: int, chunk: int, micro_batch: int) -> Optional[Location]:
        """The location feeding activations into ``(rank, chunk)``; None at the first stage."""
        return self._neighbour(rank, chunk, micro_batch, -1)

    def downstream(self, rank: int, chunk: int, micro_batch: int) -> Optional[Location]:
        """The location receiving activations from ``(rank, chunk)``; None at the loss stage."""
        return self._neighbour(rank, chunk, micro_batch, +1)

    def other_end(self, rank: int, chunk: int, micro_batch: int, direction: str, payload: str) -> Optional[Location]:
        """Where a ``direction`` ("send"/"recv") of ``payload`` ("act"/"grad") at (rank, chunk) goes or comes from.

        Activations flow downstream and gradients upstream.
        """
        downstream = (payload == "act") == (direction == "send")
        return (self.downstream if downstream else self.upstream)(rank, chunk, micro_batch)

    def micro_batches_of(self, rank: int, chunk: int) -> List[int]:
        """The micro-batches that pass through ``(rank, chunk)``, in id order."""
        return [
            m for m in range(self.micro_batches)
            if (rank,
                chunk) in self._indexed_path(self.kind is LayoutKind.BIDIRECTIONAL and m >= self.micro_batches // 2)[1]
        ]
