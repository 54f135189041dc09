"""A client's model written the way Megatron-DeepSpeed writes ``GPTModelPipe``, without Megatron.

``ClientPipe`` subclasses ``PipelineModule`` and sets attributes before its ``super().__init__``; its layer
list holds a bound method of itself that caches a side loss on the instance (as ``_calculate_moe_loss``
does), its ``loss_fn`` is a bound method that adds that loss and records what ``get_additional_losses``
reports; scripts set attributes on it after construction. Its blocks use ``CountingLinear``, a custom
autograd Function that computes its own weight gradient and can defer it through the plugin's weight
store (Megatron's ``LinearWithGradAccumulationAndAsyncCommunication`` with its ``WeightGradStore``), and
counts its forward and backward calls.
"""

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from deepspeed_dualpipe.runtime.autograd import weight_store
from tests.helpers.models import tied_head

CALLS = {"forward": 0, "backward": 0}  # CountingLinear's calls in this process


class CountingLinear(torch.autograd.Function):
    """``x @ weight.t()``; the weight gradient is deferred to the weight pass when the plugin asks for it."""

    @staticmethod
    def forward(ctx, x, weight):
        CALLS["forward"] += 1
        ctx.save_for_backward(x, weight)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad_output):
        CALLS["backward"] += 1
        x, weight = ctx.saved_tensors
        grad_input = grad_output @ weight

        def weight_gradient():
            g = grad_output.reshape(-1, grad_output.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            weight.grad = g if weight.grad is None else weight.grad + g

        if weight_store.deferring():
            weight_store.defer(weight_gradient)
            return grad_input, None
        weight_gradient()  # accumulated by hand, as Megatron's gradientUpdateFunction does
        return grad_input, None


class CustomLinearBlock(nn.Module):
    """x + W2 gelu(W1 norm(x)), both projections through :class:`CountingLinear`."""

    def __init__(self, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.w1 = nn.Parameter(0.02 * torch.randn(2 * hidden, hidden))  # GPT-style init: activations stay O(1)
        self.w2 = nn.Parameter(0.02 * torch.randn(hidden, 2 * hidden))

    def forward(self, x):
        return x + CountingLinear.apply(F.gelu(CountingLinear.apply(self.norm(x), self.w1)), self.w2)


class ClientPipe(PipelineModule):

    def __init__(self, num_stages, hidden=16, vocab=32, num_layers=8, activation_checkpoint_interval=0):
        self.hidden = hidden  # set before PipelineModule.__init__, as GPTModelPipe sets parallel_output
        layers = [TiedLayerSpec("embed", nn.Embedding, vocab, hidden)]
        layers += [LayerSpec(CustomLinearBlock, hidden) for _ in range(num_layers - 3)]
        layers += [self._side_loss, TiedLayerSpec("embed", nn.Embedding, vocab, hidden, forward_fn=tied_head)]
        super().__init__(layers=layers,
                         num_stages=num_stages,
                         loss_fn=self.loss_func,
                         partition_method="uniform",
                         activation_checkpoint_interval=activation_checkpoint_interval,
                         checkpointable_layers=["CustomLinearBlock"])  # as GPTModelPipe: the blocks only
        self.side_loss = None
        self.last_lm_loss = self.last_side_loss = None

    def _side_loss(self, x):
        self.side_loss = 0.01 * x.pow(2).mean()  # cached on the instance, read by loss_func
        return x

    def loss_func(self, logits, labels):
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        self.last_lm_loss, self.last_side_loss = lm.detach(), self.side_loss.detach()
        return lm + self.side_loss

    def get_additional_losses(self):
        return OrderedDict({"lm loss": self.last_lm_loss, "side loss": self.last_side_loss})

    def describe(self):
        return f"{type(self).__name__} of {len(self._layer_specs)} layers, hidden {self.hidden}"


def param_groups(module, lr=0.1):
    """Two groups, as Megatron makes them: weights with decay, and 1-D tensors (norms, biases) without."""
    decay = [p for p in module.parameters() if p.dim() > 1]
    no_decay = [p for p in module.parameters() if p.dim() <= 1]
    return [{
        "params": decay,
        "lr": lr,
        "weight_decay": 0.01,
        "name": "decay"
    }, {
        "params": no_decay,
        "lr": lr / 2,
        "weight_decay": 0.0,
        "name": "no_decay"
    }]
