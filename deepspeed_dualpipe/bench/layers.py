"""A cost-model layer: it sleeps instead of computing, so many ranks share few cores.

Per layer: a forward sleeps ``F``; the backward sleeps ``B - W`` for the input gradient and
``W`` for the weight gradient. The two parts sit on two autograd paths,

    out = InputSleep(x) + WeightSleep(weight)          (WeightSleep's value is 0)

so torch's split backward (``stage_backward_input``, which only walks the path to the stage
inputs) sleeps ``B - W`` in the I part and ``stage_backward_weight`` sleeps ``W`` in the W part,
while a full backward walks both and sleeps ``B``. The activation is a real tensor of
``width`` floats per sample, passed unchanged.
"""

import time

import torch

# (start, end) perf_counter seconds of every sleep in this process: layer time, to tell it
# apart from engine time. The bench clears it before each step.
SLEEPS = []


def _sleep(seconds: float) -> None:
    if seconds > 0:
        start = time.perf_counter()
        time.sleep(seconds)
        SLEEPS.append((start, time.perf_counter()))


class InputSleep(torch.autograd.Function):
    """Identity that sleeps ``forward_s`` forward and ``input_s`` backward."""

    @staticmethod
    def forward(ctx, x, forward_s, input_s):
        ctx.input_s = input_s
        _sleep(forward_s)
        return x.clone()  # a new tensor: x may be a stage input that the engine frees

    @staticmethod
    def backward(ctx, grad):
        _sleep(ctx.input_s)
        return grad, None, None


class WeightSleep(torch.autograd.Function):
    """A zero scalar that depends on ``weight``; its backward sleeps ``weight_s``."""

    @staticmethod
    def forward(ctx, weight, weight_s):
        ctx.weight_s = weight_s
        ctx.shape = weight.shape
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        _sleep(ctx.weight_s)
        return grad.expand(ctx.shape).contiguous(), None


class SleepLayer(torch.nn.Module):
    """One layer of the cost model (times in seconds)."""

    def __init__(self, forward_s: float, backward_s: float, weight_s: float):
        super().__init__()
        if not 0 <= weight_s <= backward_s:
            raise ValueError(f"need 0 <= W <= B, got B={backward_s} W={weight_s}")
        self.forward_s, self.input_s, self.weight_s = forward_s, backward_s - weight_s, weight_s
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        if torch.is_grad_enabled() and not x.requires_grad:
            # The model's first layer: its input needs no gradient, so autograd would skip its
            # input-gradient sleep. The simulator charges every chunk a full B; so do we.
            x = x.detach().requires_grad_()
        return InputSleep.apply(x, self.forward_s, self.input_s) + WeightSleep.apply(self.weight, self.weight_s)


def mean_loss(outputs, labels):
    """A loss for the bench: cheap, and every output element gets a gradient."""
    return outputs.mean()
