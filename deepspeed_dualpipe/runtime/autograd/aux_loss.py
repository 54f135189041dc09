"""Give the MoE load-balancing loss its gradient without carrying it through the pipeline.

DeepSpeed's ``MoE`` returns ``l_aux`` beside the output, and a single-process script adds
``coef * l_aux`` to its loss. A pipeline stage can only pass activations on, so the loss computed
at the last stage never sees the ``l_aux`` of earlier stages. :func:`attach_aux_loss` ties
``l_aux`` to the layer's output instead (the way Megatron-core's aux-loss auto-scaler does): the
forward returns the output unchanged, and the backward, whenever a gradient reaches the output,
also hands ``l_aux`` the gradient ``coefficient * scale`` -- exactly what ``coef * l_aux`` added to
the loss would have given it.

``scale`` is what the loss is multiplied by before its backward. DeepSpeed's pipeline divides each
micro-batch's loss by the number of micro-batches ``M``, so the engine sets
``aux_loss_scale(1 / M)`` for the batch; the default 1.0 fits a plain ``loss.backward()``. The scale
is read when the forward runs (the backward may be deferred or interleaved with other work).
"""

from __future__ import annotations

import torch

__all__ = ["attach_aux_loss", "aux_loss_scale", "get_aux_loss_scale"]

_scale = 1.0


def get_aux_loss_scale() -> float:
    """The scale that :func:`attach_aux_loss` applies to forwards run now."""
    return _scale


class aux_loss_scale:
    """Set the aux-loss gradient scale: ``aux_loss_scale(1 / M)`` sets it for good; used as
    ``with aux_loss_scale(1 / M): ...`` it is restored on exit."""

    def __init__(self, scale: float):
        global _scale
        self.previous, _scale = _scale, float(scale)

    def __enter__(self) -> "aux_loss_scale":
        return self

    def __exit__(self, *exc) -> None:
        global _scale
        _scale = self.previous


class _AttachAuxLoss(torch.autograd.Function):
    dualpipe_split_safe = True  # pure: torch's split may run its backward in both parts

    @staticmethod
    def forward(ctx, output, l_aux, weight):
        ctx.weight, ctx.like = weight, (l_aux.shape, l_aux.dtype, l_aux.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        shape, dtype, device = ctx.like
        return grad_output, torch.full(shape, ctx.weight, dtype=dtype, device=device), None


def attach_aux_loss(output: torch.Tensor, l_aux: torch.Tensor, coefficient: float) -> torch.Tensor:
    """``output`` unchanged; its backward also gives ``l_aux`` the gradient ``coefficient * scale``."""
    if not (torch.is_grad_enabled() and isinstance(l_aux, torch.Tensor) and l_aux.requires_grad):
        return output
    return _AttachAuxLoss.apply(output, l_aux, coefficient * _scale)
