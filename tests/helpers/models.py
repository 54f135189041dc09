"""Tiny deterministic language models expressed as DeepSpeed LayerSpec lists.

Used by the equivalence tests: the same spec list is handed to a
``PipelineModule`` (split into stages) and to ``harness.train_reference``
(one process, all layers in order), so both sides build identical layers.

Everything is fp32 and dropout-free so the only differences between the
pipelined and the single-process run are floating-point reduction orders.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec


class ResidualMLP(nn.Module):
    """Pre-norm residual MLP block: x + fc2(gelu(fc1(ln(x))))."""

    def __init__(self, hidden):
        super().__init__()
        self.ln = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


def tied_head(module, x):
    # Module-level (not a lambda) so specs stay picklable; the embedding
    # matrix doubles as the output projection.
    return x @ module.weight.t()


def loss_fn(logits, labels):
    """Token-level cross-entropy over the vocabulary (mean over all tokens)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def specs(num_layers=8, hidden=16, vocab=32, tied=True):
    """Embedding + (num_layers - 2) residual MLP blocks + head = num_layers specs.

    num_layers=8 splits uniformly into 2, 4 and 8 stages (one layer per stage
    at 8).  With ``tied=False`` embedding and head are ordinary LayerSpecs.
    With ``tied=True`` the head reuses the embedding weight through a
    ``TiedLayerSpec`` with the same key, so the first and last stage share a
    parameter (the case where DeepSpeed all-reduces the tied gradient).
    """
    assert num_layers >= 2
    if tied:
        layers = [TiedLayerSpec("embed", nn.Embedding, vocab, hidden)]
    else:
        layers = [LayerSpec(nn.Embedding, vocab, hidden)]
    layers += [LayerSpec(ResidualMLP, hidden) for _ in range(num_layers - 2)]
    if tied:
        layers.append(TiedLayerSpec("embed", nn.Embedding, vocab, hidden, forward_fn=tied_head))
    else:
        layers.append(LayerSpec(nn.Linear, hidden, vocab, bias=False))
    return layers


def tied_specs():
    return specs(tied=True)


def untied_specs():
    return specs(tied=False)


class EmbedWithStream(nn.Module):
    """tokens -> (hidden, skip stream, positions): a tuple of two float tensors and an int64 one."""

    def __init__(self, vocab, hidden):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)

    def forward(self, tokens):
        h = self.embed(tokens)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens).contiguous()
        return h, h * 0.5, positions


class TupleBlock(nn.Module):
    """A block that reads and writes every tensor of the tuple, so gradients flow through both floats."""

    def __init__(self, hidden):
        super().__init__()
        self.mlp = ResidualMLP(hidden)
        self.mix = nn.Linear(hidden, hidden)

    def forward(self, inputs):
        h, skip, positions = inputs
        h = self.mlp(h) + 0.1 * self.mix(skip) + 0.01 * positions.unsqueeze(-1).float()
        return h, skip + 0.1 * h, positions


class TupleHead(nn.Module):

    def __init__(self, hidden, vocab):
        super().__init__()
        self.out = nn.Linear(hidden, vocab)

    def forward(self, inputs):
        h, skip, _ = inputs
        return self.out(h + skip)


def tuple_specs(num_layers=8, hidden=16, vocab=32):
    """Stages exchange (float, float, int64) tuples: the engine must send all, and grads for the floats."""
    return ([LayerSpec(EmbedWithStream, vocab, hidden)] +
            [LayerSpec(TupleBlock, hidden) for _ in range(num_layers - 2)] + [LayerSpec(TupleHead, hidden, vocab)])


# --- a small DeepSeek-V3-style MoE model ---------------------------------------------------------


class EmbedWithMask(nn.Module):
    """tokens -> (hidden, mask): a float tensor and a bool one (which NCCL cannot send as such)."""

    def __init__(self, vocab, hidden):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)

    def forward(self, tokens):
        return self.embed(tokens), tokens % 3 != 0


class MaskBlock(nn.Module):
    """A block whose output depends on the mask it passes on."""

    def __init__(self, hidden):
        super().__init__()
        self.mlp = ResidualMLP(hidden)

    def forward(self, inputs):
        h, mask = inputs
        return self.mlp(h) * torch.where(mask, 1.0, 0.5).unsqueeze(-1), mask


class MaskHead(nn.Module):

    def __init__(self, hidden, vocab):
        super().__init__()
        self.out = nn.Linear(hidden, vocab)

    def forward(self, inputs):
        return self.out(inputs[0])


def mask_specs(num_layers=8, hidden=16, vocab=32):
    """Stages exchange (float, bool) tuples."""
    return ([LayerSpec(EmbedWithMask, vocab, hidden)] + [LayerSpec(MaskBlock, hidden) for _ in range(num_layers - 2)] +
            [LayerSpec(MaskHead, hidden, vocab)])


def moe_specs(ep_size=1, num_layers=8, hidden=16, vocab=32, num_experts=4):
    """Embedding + a dense block + (num_layers - 3) MoE blocks (top-2 of ``num_experts`` routed
    experts, a shared expert, token dropping) + tied head = num_layers specs.

    ``ep_size`` experts-parallel ranks each build ``num_experts / ep_size`` of the experts; the
    single-process reference builds them all (``ep_size=1``).
    """
    from deepspeed_dualpipe.moe import MoETransformerBlock

    def block(dense):
        return LayerSpec(MoETransformerBlock,
                         hidden,
                         2,
                         num_experts,
                         ep_size=ep_size,
                         k=2,
                         ffn_hidden_size=2 * hidden,
                         capacity_factor=1.0,
                         min_capacity=2,
                         aux_loss_coef=0.1,
                         dense=dense)

    return ([TiedLayerSpec("embed", nn.Embedding, vocab, hidden),
             block(True)] + [block(False) for _ in range(num_layers - 3)] +
            [TiedLayerSpec("embed", nn.Embedding, vocab, hidden, forward_fn=tied_head)])
