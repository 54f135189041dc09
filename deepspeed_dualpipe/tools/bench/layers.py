"""Cost-model layers: they sleep instead of computing, so many ranks share few cores.

:class:`SleepLayer`, per layer: a forward sleeps ``F``; the backward sleeps ``B - W`` for the
input gradient and ``W`` for the weight gradient. The two parts sit on two autograd paths,

    out = InputSleep(x) + WeightSleep(weight)          (WeightSleep's value is 0)

so torch's split backward (``stage_backward_input``, which only walks the path to the stage
inputs) sleeps ``B - W`` in the I part and ``stage_backward_weight`` sleeps ``W`` in the W part,
while a full backward walks both and sleeps ``B``. The activation is a real tensor of
``width`` floats per sample, passed unchanged. ``WeightSleep`` keeps the layer's input for its
backward, as a linear layer keeps it for its weight gradient: that is the layer's activation
memory, freed when the weight part (or the full backward) has run.

:class:`SleepMoELayer` is the MoE variant, a phased layer (``forward_steps``)::

    [sleep F/2] -> dispatch all-to-all -> [sleep F/2, "experts"] -> combine all-to-all -> [decode]

Each all-to-all moves a real float tensor of ``a2a_bytes`` over the expert-parallel group
(DeepSpeed's ``ep_size_2`` group, made by :meth:`SleepMoELayer.set_deepspeed_parallelism`, which
DeepSpeed's engine calls on every module that has it). The backward mirrors the forward: each
sleeping island's backward sleeps ``(B - W) / 2`` in its input part and ``W / 2`` in its weight
part, and the tape (or, under DeepSpeed's own engines, autograd through
:class:`~deepspeed_dualpipe.runtime.autograd.tape.InlineTape`) runs the all-to-alls of the gradients.

Only a few floats of each all-to-all's tensor carry data (the activation, at the start of each
rank's share); the rest is left uninitialised, so no layer spends CPU time on anything but the
all-to-all itself. The data makes the round trip dispatch -> experts -> combine unchanged.

Activation memory is what the allocator holds (``deepspeed_dualpipe/runtime/memory.py``): these
layers keep their inputs for the weight gradients as real tensors, and nothing else.

On CUDA a host sleep would hold the CPU, not the GPU stream the engine's kernels and NCCL's all-to-alls
queue behind. There each layer time is spent on the tensor's stream instead, as one spin kernel
(``torch.cuda._sleep``) of as many GPU cycles as that time takes, the rate measured once per process
against CUDA events (:func:`gpu_cycles_per_second`). The host returns at once; ``SLEEPS`` stays empty.
"""

import time
from typing import Callable, Optional

import torch

# (start, end, requested) perf_counter seconds of every sleep in this process: layer time, to
# tell it apart from engine time. The bench clears it before each step.
SLEEPS = []


def _sleep(seconds: float, on: Optional[torch.Tensor] = None) -> None:
    """``seconds`` of layer time: on the host, or on the GPU stream when ``on`` (a tensor the layer works
    on) is a CUDA tensor."""
    if seconds <= 0:
        return
    if on is not None and on.is_cuda:
        with torch.cuda.device(on.device):
            torch.cuda._sleep(cycles_for(seconds, gpu_cycles_per_second()))
        return
    start = time.perf_counter()
    time.sleep(seconds)
    SLEEPS.append((start, time.perf_counter(), seconds))


# ----- GPU time: a spin kernel calibrated against CUDA events ----------------------------------
CALIBRATION_CYCLES = 10_000_000  # a few ms at 1-2 GHz: long next to a launch, short next to a step
_CYCLES_PER_SECOND = {}  # per CUDA device index, measured once


def calibrate(spin: Callable[[int], None],
              seconds_of: Callable[[Callable[[], None]], float],
              cycles: int = CALIBRATION_CYCLES,
              repeats: int = 3) -> float:
    """Cycles per second of ``spin(cycles)``, timed by ``seconds_of(fn)`` (the seconds ``fn`` takes): the
    fastest of ``repeats`` runs after one warm-up (a first launch also pays for loading the kernel)."""
    seconds_of(lambda: spin(cycles))
    seconds = min(seconds_of(lambda: spin(cycles)) for _ in range(repeats))
    if not seconds > 0:
        raise RuntimeError(f"calibrating the GPU spin: {cycles} cycles took {seconds} s (must be > 0)")
    return cycles / seconds


def cycles_for(seconds: float, cycles_per_second: float) -> int:
    """The spin of ``seconds`` at the calibrated rate (at least one cycle)."""
    return max(1, round(seconds * cycles_per_second))


def _cuda_seconds_of(fn: Callable[[], None]) -> float:
    """Seconds ``fn``'s kernels take on the current stream, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def gpu_cycles_per_second() -> float:
    """The current CUDA device's spin rate, measured on its first use in this process."""
    index = torch.cuda.current_device()
    if index not in _CYCLES_PER_SECOND:
        _CYCLES_PER_SECOND[index] = calibrate(torch.cuda._sleep, _cuda_seconds_of)
    return _CYCLES_PER_SECOND[index]


# ----- the sleeping pieces ---------------------------------------------------------------------
class InputSleep(torch.autograd.Function):
    """Identity that sleeps ``forward_s`` forward and ``input_s`` backward."""

    dualpipe_split_safe = True  # designed for torch's split: each part sleeps its own share

    @staticmethod
    def forward(ctx, x, forward_s, input_s):
        ctx.input_s = input_s
        _sleep(forward_s, x)
        return x.clone()  # a new tensor: x may be a stage input that the engine frees

    @staticmethod
    def backward(ctx, grad):
        _sleep(ctx.input_s, grad)
        return grad, None, None


class WeightSleep(torch.autograd.Function):
    """A zero scalar that depends on ``weight``; its backward sleeps ``weight_s``.

    ``keep`` (not differentiated) is saved for the backward, as a weight gradient keeps the
    layer's input."""

    dualpipe_split_safe = True  # designed for torch's split: each part sleeps its own share

    @staticmethod
    def forward(ctx, weight, weight_s, keep=None):
        ctx.weight_s = weight_s
        ctx.shape = weight.shape
        if keep is not None:
            ctx.save_for_backward(keep)
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        _sleep(ctx.weight_s, grad)
        return grad.expand(ctx.shape).contiguous(), None, None


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
        return InputSleep.apply(x, self.forward_s, self.input_s) + \
            WeightSleep.apply(self.weight, self.weight_s, x.detach())


# ----- the MoE variant -------------------------------------------------------------------------
def _shares(numel: int, parts: int, used: int):
    """Where the data sits in an all-to-all tensor of ``numel`` floats split ``parts`` ways: the
    first ``used`` floats of each share."""
    step = numel // parts
    return [slice(j * step, j * step + used) for j in range(parts)]


class _Spread(torch.autograd.Function):
    """The activation ``x`` placed at the start of a new ``numel``-float tensor (rest uninitialised)."""

    dualpipe_split_safe = True  # designed for torch's split: each part sleeps its own share

    @staticmethod
    def forward(ctx, x, numel):
        ctx.shape, ctx.used = x.shape, x.numel()
        out = x.new_empty(numel)
        out[:x.numel()] = x.reshape(-1)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad[:ctx.used].reshape(ctx.shape).clone(), None


class _Experts(torch.autograd.Function):
    """The "experts": sleep; carry the data of every expert-parallel share into a new tensor.
    Backward: sleep, carry the gradient back."""

    dualpipe_split_safe = True  # designed for torch's split: each part sleeps its own share

    @staticmethod
    def forward(ctx, received, parts, used, forward_s, input_s):
        ctx.shares, ctx.input_s = _shares(received.numel(), parts, used), input_s
        _sleep(forward_s, received)
        out = received.new_empty(received.shape)
        for share in ctx.shares:
            out[share] = received[share]
        return out

    @staticmethod
    def backward(ctx, grad):
        _sleep(ctx.input_s, grad)
        grad_in = grad.new_empty(grad.shape)
        for share in ctx.shares:
            grad_in[share] = grad[share]
        return grad_in, None, None, None, None


class _Join(torch.autograd.Function):
    """Adds the zero ``z`` of the weight path to the data of each share, in place: a cheap node
    where the weight path meets the input path (torch's split backward reruns that node's
    backward in the weight part, so it must not be the sleeping one)."""

    dualpipe_split_safe = True  # designed for torch's split: each part sleeps its own share

    @staticmethod
    def forward(ctx, x, z, shares):
        ctx.shares = shares
        for share in shares:
            x[share] += z
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, sum(grad[s].sum() for s in ctx.shares), None


class _Decode(torch.autograd.Function):
    """The activation back out of the combined tensor. Keeps the combined tensor for the backward,
    as an MoE decode keeps it to weight the experts' outputs by the gates."""

    dualpipe_split_safe = True  # designed for torch's split: each part sleeps its own share

    @staticmethod
    def forward(ctx, combined, shape):
        ctx.shape = shape
        ctx.save_for_backward(combined)
        used = 1
        for d in shape:
            used *= d
        return combined[:used].reshape(shape).clone()

    @staticmethod
    def backward(ctx, grad):
        (combined, ) = ctx.saved_tensors
        grad_in = combined.new_empty(combined.shape)
        grad_in[:grad.numel()] = grad.reshape(-1)
        return grad_in, None


class SleepMoELayer(torch.nn.Module):
    """The MoE layer of the cost model: sleep F/2, dispatch all-to-all, sleep F/2, combine all-to-all.

    ``a2a_bytes``: bytes of the float tensor each rank sends in one all-to-all. ``ep_size``: the
    expert-parallel degree (its group is carved out of the data-parallel ranks, as DeepSpeed's MoE
    does). Without a group (``ep_size=1``, or before ``set_deepspeed_parallelism``) the all-to-alls
    are identities.
    """

    ISLANDS = ("pre", "experts", "decode")  # the compute islands of forward_steps, by name

    def __init__(self, forward_s: float, backward_s: float, weight_s: float, a2a_bytes: int, ep_size: int = 2):
        super().__init__()
        if not 0 <= weight_s <= backward_s:
            raise ValueError(f"need 0 <= W <= B, got B={backward_s} W={weight_s}")
        if a2a_bytes < 4 * ep_size:
            raise ValueError(f"a2a_bytes={a2a_bytes} is too small: at least {4 * ep_size} (one float per rank)")
        self.forward_s, self.input_s, self.weight_s = forward_s / 2, (backward_s - weight_s) / 2, weight_s / 2
        self.numel = a2a_bytes // 4 // ep_size * ep_size
        self.ep_size = ep_size
        self.group = None
        self.weight_pre = torch.nn.Parameter(torch.zeros(1))
        self.weight_experts = torch.nn.Parameter(torch.zeros(1))

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Join (creating it if needed) DeepSpeed's expert-parallel group ``ep_size_<E>``, as
        ``deepspeed.moe.layer.MoE`` does. DeepSpeed's engine calls this at initialisation."""
        if self.ep_size == 1:
            return
        from deepspeed.utils import groups
        name = f"ep_size_{self.ep_size}"
        if name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(self.ep_size,
                                                    use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        self.group = groups._get_expert_parallel_group(name)

    def forward(self, x):
        from deepspeed_dualpipe.runtime.autograd.steps import InlineTape, run
        if torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_()  # as SleepLayer: the first layer's backward sleeps too
        return run(self.forward_steps(InlineTape(), x))

    # ----- islands ---------------------------------------------------------------------------
    def _pre(self, x):
        if x.numel() > self.numel // self.ep_size:
            raise ValueError(f"an activation of {x.numel()} floats does not fit in a share of the all-to-all "
                             f"({self.numel // self.ep_size} floats); use a larger --a2a or a smaller --width")
        y = InputSleep.apply(x, self.forward_s, self.input_s) + \
            WeightSleep.apply(self.weight_pre, self.weight_s, x.detach())
        return _Spread.apply(y, self.numel)

    def _experts(self, received, used):
        z = WeightSleep.apply(self.weight_experts, self.weight_s, received.detach())
        parts = self.ep_size if self.group is not None else 1  # no group: the all-to-alls are identities
        out = _Experts.apply(received, parts, used, self.forward_s, self.input_s)
        return _Join.apply(out, z, _shares(received.numel(), parts, used))

    @staticmethod
    def _decode(combined, shape):
        return _Decode.apply(combined, shape)

    def forward_steps(self, tape, x):
        shape, used = tuple(x.shape), x.numel()
        send = tape.compute(self._pre, x, params=[self.weight_pre], name="pre")
        pending = tape.all_to_all(send, self.group, name="dispatch")
        yield pending
        mid = tape.compute(lambda r: self._experts(r, used),
                           pending.wait(),
                           params=[self.weight_experts],
                           name="experts")
        pending = tape.all_to_all(mid, self.group, name="combine")
        yield pending
        return tape.compute(lambda c: self._decode(c, shape), pending.wait(), params=(), name="decode")


def mean_loss(outputs, labels):
    """A loss for the bench: cheap, and every output element gets a gradient."""
    return outputs.mean()
