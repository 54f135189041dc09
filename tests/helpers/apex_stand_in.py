"""A stand-in for NVIDIA apex (``apex.normalization.FusedRMSNorm``, ``apex.optimizers.FusedAdam``) that records
that it was used: apex itself is built on GPU machines and is never installed here. Its RMSNorm computes what
torch's does, so a model built with it trains to the same numbers; like apex's CUDA path it does so in a custom
autograd Function that holds the weight (``FusedRMSNormAffineFunction``), which autograd cannot see into."""

import sys
import types

import torch

USED = {"norm_forwards": 0, "norm_backwards": 0, "norms": 0, "adam_steps": 0, "adams": 0}


class FusedRMSNormAffineFunction(torch.autograd.Function):
    """One opaque kernel for the forward and one for the backward (input and weight gradients together)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return torch.nn.functional.rms_norm(x, weight.shape, weight, eps)

    @staticmethod
    def backward(ctx, grad_output):
        USED["norm_backwards"] += 1
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
            y = torch.nn.functional.rms_norm(x, weight.shape, weight, ctx.eps)
            grad_x, grad_weight = torch.autograd.grad(y, (x, weight), grad_output)
        return grad_x, grad_weight, None


class FusedRMSNorm(torch.nn.Module):

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(normalized_shape))
        USED["norms"] += 1

    def forward(self, x):
        USED["norm_forwards"] += 1
        return FusedRMSNormAffineFunction.apply(x, self.weight, self.eps)


class FusedAdam(torch.optim.Adam):

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        USED["adams"] += 1

    def step(self, closure=None):
        USED["adam_steps"] += 1
        return super().step(closure)


def install(modules=sys.modules) -> dict:
    """Put the stand-in where ``import apex`` finds it; returns the record of its use."""
    apex = types.ModuleType("apex")
    apex.normalization = types.ModuleType("apex.normalization")
    apex.normalization.FusedRMSNorm = FusedRMSNorm
    apex.optimizers = types.ModuleType("apex.optimizers")
    apex.optimizers.FusedAdam = FusedAdam
    modules.update({"apex": apex, "apex.normalization": apex.normalization, "apex.optimizers": apex.optimizers})
    return USED


def install_unrelated(modules=sys.modules) -> None:
    """The PyPI package named apex: a web toolkit, with neither module."""
    modules["apex"] = types.ModuleType("apex")
    for name in ("apex.normalization", "apex.optimizers"):
        modules.pop(name, None)
