"""Small building blocks of :class:`~deepspeed_dualpipe.moe.block.MoETransformerBlock`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import RMSNorm  # torch >= 2.4 (setup.cfg's floor)

__all__ = ["RMSNorm", "SwiGLU", "CausalSelfAttention"]


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases: the expert (and shared expert) of DeepSeek-V3."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.gate = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on (B, T, H) with torch's ``scaled_dot_product_attention``."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, h // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, h))
