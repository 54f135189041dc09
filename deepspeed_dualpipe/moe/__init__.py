"""MoE layers whose forward runs as phases, so all-to-alls can overlap another micro-batch's compute.

* :class:`DualPipeMoE` -- drop-in subclass of ``deepspeed.moe.layer.MoE`` (same numbers).
* :class:`MoETransformerBlock` -- a pre-norm decoder block (attention + MoE or dense FFN).
* :func:`attach_aux_loss` / :class:`aux_loss_scale` -- the load-balancing loss without carrying
  it through the pipeline.
"""

from deepspeed_dualpipe.runtime.autograd.aux_loss import attach_aux_loss, aux_loss_scale, get_aux_loss_scale
from deepspeed_dualpipe.moe.block import MoETransformerBlock
from deepspeed_dualpipe.moe.layer import DualPipeMoE
from deepspeed_dualpipe.moe.parts import CausalSelfAttention, RMSNorm, SwiGLU

__all__ = [
    "DualPipeMoE", "MoETransformerBlock", "RMSNorm", "SwiGLU", "CausalSelfAttention", "attach_aux_loss",
    "aux_loss_scale", "get_aux_loss_scale"
]
