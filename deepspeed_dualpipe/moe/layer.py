"""``DualPipeMoE``: DeepSpeed's MoE layer, with its forward cut into phases.

Drop-in for ``deepspeed.moe.layer.MoE``: same constructor, same submodules (so the same
``state_dict`` keys, loadable either way), the same return value (``l_aux`` with its graph; the
copy left in ``deepspeed_moe.l_aux`` is detached), same gate (DeepSpeed's ``TopKGate`` and its gating
functions: capacity, token dropping, random token selection, ``l_aux``), same expert-parallel
groups (``set_deepspeed_parallelism``, which ``deepspeed.initialize`` calls on every MoE), same
expert parameter attributes (``allreduce=False``, ``group_name``), so DeepSpeed's engine and
optimizer treat it as its own. ``forward`` returns what DeepSpeed's does, bit for bit.

What it adds is :meth:`DualPipeMoE.forward_steps`, the forward as phases::

    gate + dispatch encoding -> dispatch all-to-all -> experts -> combine all-to-all
    -> [residual MLP] -> decode (+ residual mix)

each compute phase an island of the tape, each all-to-all launched async and waited only when
the generator is resumed (see :mod:`deepspeed_dualpipe.runtime.autograd.steps`). The phase functions
(:meth:`gate_phase`, :meth:`expert_phase`, :meth:`residual_phase`, :meth:`decode_phase`) are
public so a block can fuse them into its own islands (e.g. attention + gate).

Random numbers (RTS, the gumbel second expert, dropout in experts) are drawn in DeepSpeed's
order: gate, experts, residual MLP.

Not covered (``forward`` then falls back to DeepSpeed's own, ``forward_steps`` raises):
tensor-parallel non-expert layers (``groups.mpu`` with tensor parallelism: DeepSpeed drops and
re-gathers duplicate tokens with extra collectives) and Tutel. DeepSpeed's wall-clock breakdown
timers (``wall_clock_breakdown``) are not updated by the phased path.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import _route_slots, _sparse_decode, _sparse_encode
from deepspeed.utils import groups, logger
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

from deepspeed_dualpipe.moe.sizes import dispatch_warning, warn_limit
from deepspeed_dualpipe.runtime.autograd.steps import InlineTape, run

__all__ = ["DualPipeMoE"]


@contextmanager
def _capacity_of_every_token(gate, tokens: int):
    """For a gate with ``drop_tokens=False``: route with DeepSpeed's token-dropping path at capacity ``tokens``
    (``capacity_factor`` 0 and ``min_capacity`` = tokens), which drops nothing and needs no all-reduce."""
    if gate.drop_tokens:
        yield
        return
    saved = gate.capacity_factor, gate.eval_capacity_factor, gate.min_capacity
    gate.drop_tokens, gate.capacity_factor, gate.eval_capacity_factor, gate.min_capacity = True, 0.0, 0.0, tokens
    try:
        yield
    finally:
        gate.drop_tokens = False
        gate.capacity_factor, gate.eval_capacity_factor, gate.min_capacity = saved


class DualPipeMoE(MoE):
    """``deepspeed.moe.layer.MoE`` whose forward can run as overlappable phases."""

    ISLANDS = ("gate", "experts", "residual", "decode")  # the compute islands of forward_steps, by name
    # drop_tokens=False: warn when one micro-batch's dispatch buffer exceeds this many bytes (None: a quarter of
    # the CUDA device's memory; moe/sizes.py). Checked once, on the first micro-batch routed.
    dispatch_warn_bytes: Optional[int] = None
    _dispatch_sized = False

    def _size_dispatch(self, tokens: torch.Tensor, num_experts: int) -> Optional[str]:
        self._dispatch_sized = True
        limit = warn_limit(tokens.device, self.dispatch_warn_bytes)
        message = dispatch_warning(num_experts, tokens.shape[0], tokens.shape[1], tokens.element_size(), limit)
        if message is not None:
            logger.warning(message)
        return message

    # ----- what DeepSpeed's MoE offers ---------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None):
        """``(output, l_aux, exp_counts)``, as ``deepspeed.moe.layer.MoE.forward``."""
        if self.unsupported_reason() is not None:
            return super().forward(hidden_states, used_token)
        return run(self.forward_steps(InlineTape(), hidden_states, used_token))

    # ----- phases ------------------------------------------------------------------------------
    def unsupported_reason(self) -> Optional[str]:
        """Why the phased path cannot reproduce DeepSpeed's forward here (``None``: it can)."""
        if self.deepspeed_moe.use_tutel:
            return "Tutel dispatch (use_tutel=True)"
        if bwc_tensor_model_parallel_world_size(groups.mpu) > 1:
            return "tensor-parallel non-expert layers (DeepSpeed's drop_tokens/gather_tokens collectives)"
        return None

    @property
    def a2a_group(self):
        """The expert-parallel group of the all-to-alls; ``None`` when ``ep_size == 1``."""
        moe = self.deepspeed_moe
        if moe.ep_size == 1:
            return None
        if moe.ep_group is None:
            raise RuntimeError(f"DualPipeMoE with ep_size={moe.ep_size} has no expert-parallel group yet: call "
                               f"set_deepspeed_parallelism() (deepspeed.initialize does it)")
        return moe.ep_group

    def gate_phase(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None):
        """Route the tokens and lay them out per expert.

        Returns ``(dispatched [E, C, M], l_aux, slots, gates, exp_counts)``. No device sync: DeepSpeed's
        gate computes the capacity on the host from the shapes. With ``drop_tokens=False`` DeepSpeed
        takes the largest expert load over the expert-parallel group instead (an all-reduce, then
        ``int()`` of a device tensor: a host sync, queued behind the other micro-batch's all-to-all);
        here the capacity is the token count, which no expert can exceed, so the same tokens reach the
        same experts in the same places and nothing waits, at the price of dispatch buffers of ``C = T``
        rows per expert.
        """
        moe = self.deepspeed_moe
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        if not moe.gate.drop_tokens and not self._dispatch_sized:
            self._size_dispatch(tokens, moe.num_local_experts * moe.ep_size)
        with _capacity_of_every_token(moe.gate, tokens.shape[0]):
            l_aux, capacity, num_experts, indices, locations, gates, exp_counts = moe.gate(
                tokens, used_token, True, False)
        capacity = int(capacity)  # a host tensor (see above)
        slots = _route_slots(indices, locations, num_experts, capacity)
        return _sparse_encode(tokens, slots, num_experts, capacity), l_aux, slots, gates, exp_counts

    def expert_phase(self, dispatched: torch.Tensor) -> torch.Tensor:
        """This rank's experts on the tokens the dispatch brought ([E, C, M] in and out)."""
        moe = self.deepspeed_moe
        d_model = dispatched.shape[-1]
        grouped = dispatched.reshape(moe.ep_size, moe.num_local_experts, -1, d_model)
        return moe.experts(grouped).reshape(moe.ep_size * moe.num_local_experts, -1, d_model)

    def residual_phase(self, hidden_states: torch.Tensor):
        """Residual MoE: the dense MLP's output and the softmaxed mixing coefficients."""
        output_mlp = self.mlp(hidden_states)
        if isinstance(output_mlp, tuple):
            output_mlp = output_mlp[0]  # a bias returned beside the output is ignored, as in DeepSpeed
        return output_mlp, F.softmax(self.coefficient(hidden_states), dim=-1)

    def decode_phase(self,
                     combined: torch.Tensor,
                     slots: torch.Tensor,
                     gates: torch.Tensor,
                     shape,
                     residual=None) -> torch.Tensor:
        """Gather each token's expert outputs, weight them by the gates, mix in the residual."""
        d_model = combined.shape[-1]
        num_tokens = slots.shape[-1]
        output = _sparse_decode(combined.view(-1, d_model), slots, gates, num_tokens).reshape(shape)
        if residual is not None:
            output_mlp, coef = residual
            output = output * coef[..., 0:1] + output_mlp * coef[..., 1:]
        return output

    def forward_steps(self, tape, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None):
        """The forward as phases on ``tape``; returns ``(output, l_aux, exp_counts)``."""
        reason = self.unsupported_reason()
        if reason is not None:
            raise NotImplementedError(f"DualPipeMoE cannot run as phases with {reason}")
        moe, group = self.deepspeed_moe, self.a2a_group
        gate = (lambda h: self.gate_phase(h, used_token))  # the token mask is a constant, not an input
        dispatched, l_aux, slots, gates, exp_counts = tape.compute(gate,
                                                                   hidden_states,
                                                                   params=moe.gate.parameters(),
                                                                   name="gate")
        pending = tape.all_to_all(dispatched, group, name="dispatch")
        yield pending
        expert_out = tape.compute(self.expert_phase, pending.wait(), params=moe.experts.parameters(), name="experts")
        pending = tape.all_to_all(expert_out, group, name="combine")
        yield pending
        residual = None
        if self.use_residual:  # computed while the combine is in flight
            params = list(self.mlp.parameters()) + list(self.coefficient.parameters())
            residual = tape.compute(self.residual_phase, hidden_states, params=params, name="residual")
        decode = (lambda c, s, g, r: self.decode_phase(c, s, g, hidden_states.shape, r))
        output = tape.compute(decode, pending.wait(), slots, gates, residual, params=(), name="decode")
        # Where DeepSpeed's MOELayer leaves them, but l_aux detached: with its graph it would keep the last
        # micro-batch's gate island alive until the next forward. The returned l_aux carries the graph.
        moe.l_aux, moe.exp_counts = l_aux.detach(), exp_counts
        return output, l_aux, exp_counts
