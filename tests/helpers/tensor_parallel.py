"""A small tensor-parallel model for the equivalence tests (Megatron's scheme, written here for the tests).

- :class:`ColumnParallelLinear`: the weight and bias sharded on the output dimension; forward takes the input
  whole, backward sums the input gradient over the tensor-parallel group (each rank's covers its outputs only);
- :class:`RowParallelLinear`: the weight sharded on the input dimension; forward sums the partial outputs over
  the group, then adds the bias, which every rank holds whole; backward passes the gradient on as is;
- :class:`ParallelMLP`: ``models.ResidualMLP`` with fc1 column- and fc2 row-parallel; its layer norm, like the
  row-parallel bias and the tied embedding, is held whole by every tensor-parallel rank and not marked.

Shards are marked ``tensor_model_parallel`` with their ``partition_dim``, as Megatron marks them, so DeepSpeed's
``is_model_parallel_parameter`` sees them. Each layer draws the full weight from the shared seed and keeps its
slice, so the shards differ and concatenated they are the unsharded layer the single-process reference trains.

Which shard: the layer's tensor-parallel coordinate in DeepSpeed's ``topology`` (a spec argument). The group:
looked up at the first forward from the grid the engine registered in ``deepspeed.utils.groups.mpu`` (a
``PipelineModule``'s grid exists only inside it, after the layers are specified), its slice-parallel group.
``topology=None`` builds the unsharded layer, with no collectives (the reference, one process).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed import comm as dist
from deepspeed.pipe import LayerSpec, TiedLayerSpec

from tests.helpers.models import tied_head


class TensorParallelSlot:
    """This rank's place on the tensor-parallel axis of ``topology``; the group is found when first needed."""

    def __init__(self, topology=None):
        self.size = topology.get_dim("model") if topology is not None else 1
        self.rank = topology.get_coord(dist.get_rank()).model if self.size > 1 else 0
        self._group = None

    def group(self):
        if self._group is None:
            from deepspeed.utils import groups
            grid = groups.mpu
            assert grid is not None, "no DeepSpeed engine has registered its grid yet (deepspeed.initialize)"
            assert grid.get_slice_parallel_rank() == self.rank, "the engine's grid places this rank elsewhere"
            self._group = grid.get_slice_parallel_group()
        return self._group

    def shard(self, full, dim):
        """This rank's slice of ``full`` along ``dim``, as a parameter marked as Megatron marks its shards."""
        if self.size == 1:
            return nn.Parameter(full.detach().clone())
        part = nn.Parameter(full.detach().chunk(self.size, dim)[self.rank].clone())
        part.tensor_model_parallel = True
        part.partition_dim = dim
        return part


class _SumInputGradients(torch.autograd.Function):
    """Identity forward; backward: the input gradient summed over the tensor-parallel group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all_reduce works in place; autograd may hold ``grad`` elsewhere
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOutputs(torch.autograd.Function):
    """Forward: the partial outputs summed over the tensor-parallel group; backward: identity."""

    @staticmethod
    def forward(ctx, partial, group):
        total = partial.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ColumnParallelLinear(nn.Module):

    def __init__(self, in_features, out_features, slot):
        super().__init__()
        full = nn.Linear(in_features, out_features)
        self.slot = slot
        self.weight = slot.shard(full.weight, 0)
        self.bias = slot.shard(full.bias, 0)

    def forward(self, x):
        if self.slot.size > 1:
            x = _SumInputGradients.apply(x, self.slot.group())
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):

    def __init__(self, in_features, out_features, slot):
        super().__init__()
        full = nn.Linear(in_features, out_features)
        self.slot = slot
        self.weight = slot.shard(full.weight, 1)
        self.bias = nn.Parameter(full.bias.detach().clone())  # whole on every rank: added once, after the sum

    def forward(self, x):
        partial = F.linear(x, self.weight)
        if self.slot.size > 1:
            partial = _SumOutputs.apply(partial, self.slot.group())
        return partial + self.bias


class ParallelMLP(nn.Module):
    """Pre-norm residual MLP, x + fc2(gelu(fc1(ln(x)))), fc1 column- and fc2 row-parallel."""

    def __init__(self, hidden, topology=None):
        super().__init__()
        slot = TensorParallelSlot(topology)
        self.ln = nn.LayerNorm(hidden)
        self.fc1 = ColumnParallelLinear(hidden, 2 * hidden, slot)
        self.fc2 = RowParallelLinear(2 * hidden, hidden, slot)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


def specs(topology=None, num_layers=8, hidden=16, vocab=32):
    """``models.tied_specs`` with tensor-parallel blocks: tied embedding and head (whole on every tensor-parallel
    rank), ``num_layers - 2`` :class:`ParallelMLP` blocks. 8 layers split evenly into the 4 stages of every
    two-chunk schedule on 2 pipeline ranks."""
    return ([TiedLayerSpec("embed", nn.Embedding, vocab, hidden)] +
            [LayerSpec(ParallelMLP, hidden, topology) for _ in range(num_layers - 2)] +
            [TiedLayerSpec("embed", nn.Embedding, vocab, hidden, forward_fn=tied_head)])
