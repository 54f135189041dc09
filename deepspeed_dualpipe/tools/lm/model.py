"""A small DeepSeek-V3-style decoder as a list of DeepSpeed ``LayerSpec``s.

    token embedding -> + learned positions -> block 0 .. block N-1 -> RMSNorm -> output head (tied)

(RMSNorm: NVIDIA apex's fused one where apex is installed, else torch's; see :mod:`.fused`.)

The first ``dense_layers`` blocks have a dense feed-forward, the rest a mixture of experts
(top-k routed experts plus one shared expert). Every layer maps one float tensor
``(batch, seq, hidden)`` to another, so any cut between layers is a pipeline stage boundary;
only the embedding takes the int64 token ids. Embedding and head are one ``TiedLayerSpec``
key: they share the weight matrix, and a pipeline keeps them on stage 0 and the last stage
(rank 0 alone under DualPipe, which holds both).

The blocks are :class:`deepspeed_dualpipe.moe.block.MoETransformerBlock` (attention, then a dense
SwiGLU or DeepSpeed's MoE over SwiGLU experts plus a shared expert). Its attention has no
positional encoding, so a learned position embedding follows the token embedding.
"""

import functools
import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec

from deepspeed_dualpipe.tools.lm.data import VOCAB
from deepspeed_dualpipe.moe.block import MoETransformerBlock as Block
from deepspeed_dualpipe.tools.lm.fused import rms_norm

# ---------------------------------------------------------------------------------------------
# Embedding, head, loss
# ---------------------------------------------------------------------------------------------


class TokenEmbedding(nn.Module):
    """Byte ids (int64) -> vectors; its ``weight`` is also the output head (see :func:`tied_head`)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        # std 1/sqrt(hidden): after the final RMSNorm the initial logits are ~N(0, 1).
        self.weight = nn.Parameter(torch.randn(vocab_size, hidden_size) / math.sqrt(hidden_size))

    def forward(self, tokens):
        return F.embedding(tokens, self.weight)


class LearnedPositions(nn.Module):
    """Adds a learned vector per position (the blocks' attention has no positions of its own)."""

    def __init__(self, max_positions: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(max_positions, hidden_size) / math.sqrt(hidden_size))

    def forward(self, x):
        if x.size(1) > self.weight.size(0):
            raise ValueError(f"sequence of {x.size(1)} positions, the model has {self.weight.size(0)} (max_positions)")
        return x + self.weight[:x.size(1)]


def tied_head(embedding: TokenEmbedding, x):
    """Logits over the byte vocabulary with the embedding matrix (module-level: specs stay picklable)."""
    return x @ embedding.weight.t()


def lm_loss(logits, labels):
    """Mean next-byte cross-entropy (nats) over all positions."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1))


# ---------------------------------------------------------------------------------------------
# The model as LayerSpecs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the model: the ``"lm": {"model": {...}}`` section of the DeepSpeed config."""

    hidden_size: int = 64
    num_heads: int = 4
    num_layers: int = 4  # transformer blocks
    dense_layers: int = 1  # the first blocks are dense, the rest MoE
    num_experts: int = 4
    top_k: int = 2
    ep_size: int = 1
    ffn_hidden_size: Optional[int] = None  # dense blocks; default 4 * hidden
    expert_hidden_size: Optional[int] = None  # each routed/shared expert; default 2 * hidden
    shared_expert: bool = True
    capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_tokens: bool = True
    aux_loss_coef: float = 0.01
    all_dense: bool = False  # every block dense (the dense-first baseline)
    max_positions: int = 256  # learned position embeddings; 0: none (attention that has its own, e.g. RoPE)

    @classmethod
    def from_dict(cls, values: Dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"lm.model: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> Dict:
        return asdict(self)

    def block_kwargs(self, index: int) -> Dict:
        dense = self.all_dense or index < self.dense_layers
        ffn = (self.ffn_hidden_size or 4 * self.hidden_size) if dense else \
            (self.expert_hidden_size or 2 * self.hidden_size)
        return dict(hidden_size=self.hidden_size,
                    num_heads=self.num_heads,
                    num_experts=self.num_experts,
                    ep_size=self.ep_size,
                    k=self.top_k,
                    ffn_hidden_size=ffn,
                    shared_expert=self.shared_expert,
                    capacity_factor=self.capacity_factor,
                    min_capacity=self.min_capacity,
                    drop_tokens=self.drop_tokens,
                    aux_loss_coef=self.aux_loss_coef,
                    dense=dense)


# PipelineModule(partition_method=PARTITION): balance the blocks over the stages; the embedding
# joins the first stage, the final norm and the head the last.
PARTITION = "type:Block$"


def seed_layer(seed) -> None:
    """``PipelineModule(seed_layers=True, seed_fn=seed_layer)``: every layer starts from its own seed
    (``base_seed + layer index``), so initial weights do not depend on how the model is partitioned.

    DeepSpeed's default seeding chokes on the numpy index that ``type:`` partitioning produces."""
    import random
    seed = int(seed)
    random.seed(seed)
    torch.manual_seed(seed)


def layer_specs(cfg: ModelConfig) -> List:
    """embedding, positions, ``num_layers`` blocks, final RMSNorm, tied head: ``num_layers + 4`` specs
    (``num_layers + 3`` without learned positions)."""
    positions = [LayerSpec(LearnedPositions, cfg.max_positions, cfg.hidden_size)] if cfg.max_positions else []
    norm = rms_norm()  # NVIDIA apex's fused RMSNorm where it is installed (tools/lm/fused.py)
    return ([TiedLayerSpec("embed", TokenEmbedding, VOCAB, cfg.hidden_size)] + positions +
            [LayerSpec(Block, norm=norm, **cfg.block_kwargs(i)) for i in range(cfg.num_layers)] + [
                LayerSpec(norm, cfg.hidden_size),
                TiedLayerSpec("embed", TokenEmbedding, VOCAB, cfg.hidden_size, forward_fn=tied_head)
            ])


# ---------------------------------------------------------------------------------------------
# One process, every layer: for generation and for tests
# ---------------------------------------------------------------------------------------------


class LocalModel(nn.Module):
    """All layers of :func:`layer_specs` in one process, parameters named as a ``PipelineModule`` names them
    (``"<layer index>.<param>"``, tied modules ``"tied_modules.<key>.<param>"``), so any pipeline rank's
    ``state_dict`` entries load into it by name."""

    def __init__(self, specs: List):
        super().__init__()
        self.tied_modules = nn.ModuleDict()
        self.funcs = []
        for index, spec in enumerate(specs):
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in self.tied_modules:
                    self.tied_modules[spec.key] = spec.build()
                module = self.tied_modules[spec.key]
                self.funcs.append(module if spec.forward_fn is None else functools.partial(spec.forward_fn, module))
            else:
                module = spec.build()
                self.add_module(str(index), module)
                self.funcs.append(module)

    def forward(self, tokens):
        x = tokens
        for f in self.funcs:
            x = f(x)
        return x

    @torch.no_grad()
    def generate(self,
                 prompt: List[int],
                 new_tokens: int,
                 context: int,
                 temperature: float = 0.8,
                 seed: int = 0) -> List[int]:
        """Sample ``new_tokens`` bytes after ``prompt`` (a ``temperature`` of 0 is greedy), seeing at most the
        last ``context`` bytes, with a generator seeded by ``seed``."""
        g = torch.Generator().manual_seed(seed)
        tokens = list(prompt)
        for _ in range(new_tokens):
            logits = self(torch.tensor([tokens[-context:]], dtype=torch.int64))[0, -1].float()
            if temperature <= 0:
                tokens.append(int(logits.argmax()))
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                tokens.append(int(torch.multinomial(probs, 1, generator=g)))
        return tokens[len(prompt):]
