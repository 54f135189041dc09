"""``MoETransformerBlock``: a pre-norm decoder block for pipelines, (B, T, H) in and out.

::

    x = x + attention(norm1(x))                      causal, torch's scaled_dot_product_attention
    h = norm2(x)
    x = x + ffn(h)     dense: SwiGLU(h)
                       MoE:   DualPipeMoE over SwiGLU experts (top-k) + shared SwiGLU expert(h)

The MoE's ``l_aux`` is attached to the block's output with
:func:`~deepspeed_dualpipe.runtime.autograd.aux_loss.attach_aux_loss`, so a pipeline that passes only the
hidden states on still trains the router's load balance. ``block.moe.deepspeed_moe.l_aux`` keeps the
last value, detached (for logging).

As phases (:meth:`MoETransformerBlock.forward_steps`), the islands are::

    [attention + norm + gate + dispatch encoding]  dispatch a2a  [experts]  combine a2a
    [shared expert]  [decode + residual]

The shared expert depends only on ``h``; it runs after the combine is launched, so even a
micro-batch running alone computes it while its combine is in flight (and, paired with another
micro-batch, while both are). Where it runs does not change the numbers.

Routing is deterministic by default (``use_rts=False``, ``top2_2nd_expert_sampling=False``, no
noisy gate, as in DeepSeek-V3's top-k): random routing would draw random numbers in a
schedule-dependent order, and a pipeline would then no longer match a single process.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from deepspeed_dualpipe.runtime.autograd.aux_loss import attach_aux_loss
from deepspeed_dualpipe.moe.layer import DualPipeMoE
from deepspeed_dualpipe.moe.parts import CausalSelfAttention, RMSNorm, SwiGLU
from deepspeed_dualpipe.runtime.autograd.steps import InlineTape, run

__all__ = ["MoETransformerBlock", "RMSNorm"]


class MoETransformerBlock(nn.Module):
    """Pre-norm decoder block with a dense SwiGLU MLP or a DualPipeMoE (+ shared expert)."""

    # The islands of forward_steps, by name (``dualpipe.recompute_islands`` may name them): "block" when dense.
    ISLANDS = ("block", "attention+gate", "experts", "shared_expert", "decode+residual")

    def __init__(self,
                 hidden_size: int,
                 num_heads: int,
                 num_experts: int,
                 ep_size: int = 1,
                 k: int = 2,
                 ffn_hidden_size: Optional[int] = None,
                 shared_expert: bool = True,
                 capacity_factor: float = 1.0,
                 min_capacity: int = 4,
                 drop_tokens: bool = True,
                 aux_loss_coef: float = 0.01,
                 dense: bool = False,
                 use_rts: bool = False,
                 top2_2nd_expert_sampling: bool = False,
                 norm_eps: float = 1e-6,
                 norm: Optional[type] = None):
        super().__init__()
        norm = norm or RMSNorm  # any class with RMSNorm's (hidden_size, eps=...) signature
        ffn = ffn_hidden_size or 4 * hidden_size
        self.dense = dense
        self.aux_loss_coef = aux_loss_coef
        self.norm1 = norm(hidden_size, eps=norm_eps)
        self.attn = CausalSelfAttention(hidden_size, num_heads)
        self.norm2 = norm(hidden_size, eps=norm_eps)
        self.mlp = self.moe = self.shared_expert = None
        if dense:
            self.mlp = SwiGLU(hidden_size, ffn)
            return
        self.moe = DualPipeMoE(hidden_size,
                               SwiGLU(hidden_size, ffn),
                               num_experts=num_experts,
                               ep_size=ep_size,
                               k=k,
                               capacity_factor=capacity_factor,
                               eval_capacity_factor=capacity_factor,
                               min_capacity=min_capacity,
                               drop_tokens=drop_tokens,
                               use_rts=use_rts,
                               top2_2nd_expert_sampling=top2_2nd_expert_sampling)
        if shared_expert:
            self.shared_expert = SwiGLU(hidden_size, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run(self.forward_steps(InlineTape(), x))

    # No set_deepspeed_parallelism here on purpose: DeepSpeed's engine calls it on every submodule
    # that has one, so the inner DualPipeMoE gets its expert-parallel group, and a second call
    # would trip TopKGate's "override an existing ep_group" assertion.

    # ----- phases ------------------------------------------------------------------------------
    def _dense(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def _pre_dispatch(self, x):
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        return (x, h) + tuple(self.moe.gate_phase(h))

    def _post(self, combined, slots, gates, x, shared, l_aux):
        y = self.moe.decode_phase(combined, slots, gates, x.shape)
        if shared is not None:
            y = y + shared
        return x + attach_aux_loss(y, l_aux, self.aux_loss_coef)

    def _params(self, *modules):
        return [p for m in modules for p in m.parameters()]

    def forward_steps(self, tape, x: torch.Tensor):
        """The block's forward as phases on ``tape`` (see the module docstring); returns the output."""
        if self.dense:
            yield from ()  # one island, nothing to overlap
            return tape.compute(self._dense, x, params=self.parameters(), name="block")
        moe, group = self.moe, self.moe.a2a_group
        pre = self._params(self.norm1, self.attn, self.norm2, moe.deepspeed_moe.gate)
        x, h, dispatched, l_aux, slots, gates, exp_counts = tape.compute(self._pre_dispatch,
                                                                         x,
                                                                         params=pre,
                                                                         name="attention+gate")
        pending = tape.all_to_all(dispatched, group, name="dispatch")
        yield pending
        expert_out = tape.compute(moe.expert_phase,
                                  pending.wait(),
                                  params=moe.deepspeed_moe.experts.parameters(),
                                  name="experts")
        pending = tape.all_to_all(expert_out, group, name="combine")
        yield pending
        shared = None
        if self.shared_expert is not None:
            shared = tape.compute(self.shared_expert, h, params=self.shared_expert.parameters(), name="shared_expert")
        out = tape.compute(self._post,
                           pending.wait(),
                           slots,
                           gates,
                           x,
                           shared,
                           l_aux,
                           params=(),
                           name="decode+residual")
        # Stored detached: with its graph it would keep this micro-batch's attention and gate island alive
        # until the next forward. The gradient reaches l_aux through attach_aux_loss.
        moe.deepspeed_moe.l_aux, moe.deepspeed_moe.exp_counts = l_aux.detach(), exp_counts
        return out
