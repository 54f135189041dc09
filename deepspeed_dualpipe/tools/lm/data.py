"""The demo's corpus: the text of ``pydoc_data.topics`` (ships with every CPython), as bytes.

- :func:`corpus` is the topics' text, in sorted topic order, UTF-8 encoded: one byte per token,
  vocabulary 256, nothing to download.
- :func:`split` cuts it into blocks of ``block_size`` bytes and sends every ``val_every``-th
  block to validation: both halves see every part of the text, and the split depends on
  nothing but the text and the two numbers.
- :class:`Batches` hands out (inputs, labels) micro-batches of ``seq_len`` bytes, the labels
  being the next byte of each input. Training windows are drawn at random from a generator
  seeded by (seed, step), so a step's global batch is the same whatever the pipeline,
  data-parallel or schedule layout; data-parallel rank ``d`` of ``D`` takes its share of it.
  Validation windows are fixed, evenly spaced and non-overlapping.
"""

import hashlib
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch

VOCAB = 256
MicroBatch = Tuple[torch.Tensor, torch.Tensor]  # (inputs, labels), int64 [batch, seq_len] each


def corpus() -> bytes:
    """The text of every ``pydoc_data.topics`` entry, sorted by topic name, as UTF-8 bytes."""
    from pydoc_data.topics import topics
    return "".join(topics[name] for name in sorted(topics)).encode("utf-8")


def fingerprint(data: bytes) -> str:
    """A short hash of ``data``: the corpus differs between Python versions, the metrics record which."""
    return hashlib.sha256(data).hexdigest()[:16]


def split(data: bytes, block_size: int = 4096, val_every: int = 10) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, val) byte tensors (int64): block ``i`` goes to validation when ``i % val_every == val_every - 1``."""
    if block_size < 1 or val_every < 2:
        raise ValueError(f"need block_size >= 1 and val_every >= 2, got {block_size} and {val_every}")
    train, val = [], []
    for i, start in enumerate(range(0, len(data), block_size)):
        (val if i % val_every == val_every - 1 else train).append(data[start:start + block_size])
    as_tensor = lambda parts: torch.tensor(list(b"".join(parts)), dtype=torch.int64)  # noqa: E731
    return as_tensor(train), as_tensor(val)


def windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> MicroBatch:
    """Inputs ``tokens[s:s+seq_len]`` and labels ``tokens[s+1:s+1+seq_len]`` for every start ``s``."""
    index = starts.unsqueeze(1) + torch.arange(seq_len + 1)
    rows = tokens[index]
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


@dataclass
class Batches:
    """Micro-batches for one data-parallel rank.

    ``micro_batch_size`` samples per micro-batch, ``micro_batches`` micro-batches per step
    (DeepSpeed's ``gradient_accumulation_steps``), ``dp_size`` data-parallel ranks.
    """

    train: torch.Tensor
    val: torch.Tensor
    seq_len: int
    micro_batch_size: int
    micro_batches: int
    dp_rank: int = 0
    dp_size: int = 1
    seed: int = 1234

    def __post_init__(self):
        for name, tokens in (("train", self.train), ("val", self.val)):
            if len(tokens) <= self.seq_len:
                raise ValueError(
                    f"the {name} split has {len(tokens)} bytes, fewer than seq_len + 1 = {self.seq_len + 1}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank {self.dp_rank} is not in 0..{self.dp_size - 1}")

    @property
    def global_batch(self) -> int:
        """Samples per step over all data-parallel ranks."""
        return self.micro_batch_size * self.micro_batches * self.dp_size

    def _mine(self, inputs: torch.Tensor, labels: torch.Tensor) -> List[MicroBatch]:
        """This data-parallel rank's micro-batches of a global batch (rank-major, then micro-batch)."""
        per_rank = self.micro_batch_size * self.micro_batches
        inputs = inputs[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        labels = labels[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        return list(zip(inputs.split(self.micro_batch_size), labels.split(self.micro_batch_size)))

    def train_step(self, step: int) -> List[MicroBatch]:
        """This rank's ``micro_batches`` training micro-batches of step ``step`` (random windows)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.train) - self.seq_len, (self.global_batch, ), generator=g)
        return self._mine(*windows(self.train, starts, self.seq_len))

    def val_batches(self, count: int) -> List[List[MicroBatch]]:
        """``count`` validation batches (each ``micro_batches`` micro-batches for this rank), the same on every call.

        Windows are evenly spaced over the whole validation split, non-overlapping when it is long enough.
        """
        total = count * self.global_batch
        span = len(self.val) - self.seq_len - 1
        starts = torch.linspace(0, span, total).long() if total > 1 else torch.zeros(1, dtype=torch.long)
        inputs, labels = windows(self.val, starts, self.seq_len)
        size = self.global_batch
        return [self._mine(inputs[i * size:(i + 1) * size], labels[i * size:(i + 1) * size]) for i in range(count)]

    def train_iter(self, step: int) -> Iterator[MicroBatch]:
        return iter(self.train_step(step))


def decode(tokens) -> str:
    """Bytes to text, undecodable bytes replaced (a sampled byte sequence may cut a character)."""
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def encode(text: str) -> List[int]:
    return list(text.encode("utf-8"))
