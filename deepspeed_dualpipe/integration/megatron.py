"""Megatron-DeepSpeed's models under the plugin's schedules, with its script unchanged.

Applied by :func:`deepspeed_dualpipe.integration.initialize.initialize` when the model's class comes from the
``megatron`` package (``GPTModelPipe``) and the schedule runs on the plugin's engine:

- Megatron's linear layers (``LinearWithGradAccumulationAndAsyncCommunication``) compute their weight
  gradient in their own backward. With ``args.enable_zbh1_pipeline`` they hand it to Megatron's
  ``WeightGradStore`` instead; the plugin routes that store into its own (:mod:`..runtime.autograd.weight_store`),
  so the weight gradients of an input pass run in the schedule's weight pass, and a full backward computes
  them at once.
- ``--enable-zbh1-pipeline`` itself (Megatron's ZB-H1, which replaces DeepSpeed's ``TrainSchedule`` and adds
  its own instructions) cannot be combined with a plugin schedule: refused, naming the flag.
- Its DeepSpeed MoE transformer layers get a phased forward (:mod:`.megatron_moe`), so their all-to-alls
  overlap with another micro-batch's compute in the overlapped pairs.
- Its experts' tensor-parallel shards (``--enable-expert-tensor-parallelism``) get back the
  ``tensor_model_parallel`` marks DeepSpeed's ``Experts`` drops, so global norms count every shard
  (:func:`mark_expert_shards`).

Nothing here imports Megatron at import time; Megatron is found through the model's module.
"""

import sys

import torch
from deepspeed.utils import logger

from deepspeed_dualpipe.integration import megatron_moe
from deepspeed_dualpipe.runtime.autograd import weight_store


def is_megatron_model(model) -> bool:
    return any(c.__module__.split(".")[0] == "megatron" for c in type(model).__mro__)


def adapt(model, schedule: str) -> None:
    """Prepare a Megatron-DeepSpeed model for the plugin's ``schedule`` (see the module docstring)."""
    args = _megatron_args()
    if getattr(args, "enable_zbh1_pipeline", False):
        raise ValueError(f"Megatron's --enable-zbh1-pipeline cannot be combined with pipeline.schedule={schedule!r}: "
                         f"it replaces DeepSpeed's TrainSchedule with Megatron's own ZB-H1 and its instructions. The "
                         f"plugin's schedules split backward themselves (zb1p is ZB-H1): drop the flag")
    store = sys.modules.get("megatron.core.tensor_parallel.weight_grad_store")
    if store is None:
        from importlib import import_module
        store = import_module("megatron.core.tensor_parallel.weight_grad_store")
    store.WeightGradStore.put = classmethod(_put)
    args.enable_zbh1_pipeline = True  # read by Megatron's linear backward only, from here on
    logger.info("deepspeed_dualpipe: Megatron's linear layers defer their weight gradients to the plugin's weight "
                "passes (WeightGradStore routed to deepspeed_dualpipe's weight store)")
    megatron_moe.adapt(model)  # its DeepSpeed MoE transformer layers run as phases (overlapped pairs)
    mark_expert_shards(model)


def mark_expert_shards(model) -> int:
    """Mark the tensor-parallel shards of Megatron's experts as Megatron marks every other shard.

    Megatron's parallel linears mark their sharded weights (and a column-parallel bias) ``tensor_model_parallel``,
    but DeepSpeed's ``Experts`` deep-copies the expert, and a deep-copied ``Parameter`` keeps no attributes. Unmarked,
    an expert shard would count in the global gradient norm (clipping) on tensor-parallel rank 0 only, as if every
    TP rank held the same tensor; it holds a different slice. A linear that Megatron sliced
    (``is_expert_without_slicing`` false) is marked: a column-parallel one's weight and bias along dim 0, a
    row-parallel one's weight along dim 1 (its bias is whole on every TP rank). Returns how many were marked."""
    marked = 0
    for module in model.modules():
        kind = type(module).__name__
        sliced = not getattr(module, "is_expert_without_slicing", True)
        if kind not in ("ColumnParallelLinear", "RowParallelLinear") or not sliced:
            continue
        shards = {"weight": 0, "bias": 0} if kind == "ColumnParallelLinear" else {"weight": 1}
        for leaf, dim in shards.items():
            p = getattr(module, leaf, None)
            if isinstance(p, torch.nn.Parameter) and not hasattr(p, "tensor_model_parallel"):
                # Megatron's attributes; its MLPs build their linears with stride 1
                p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1
                marked += 1
    if marked:
        logger.info(f"deepspeed_dualpipe: {marked} expert tensor-parallel shard(s) marked tensor_model_parallel "
                    f"(DeepSpeed's Experts deep copy drops Megatron's marks), so gradient norms count every shard")
    return marked


def _put(cls, total_input, grad_output, weight, func):
    """Megatron's ``WeightGradStore.put``, routed: deferred to the weight pass inside an input pass, else now."""
    if weight_store.deferring():
        weight_store.defer(lambda: func(total_input, grad_output, weight))
    else:
        func(total_input, grad_output, weight)


def _megatron_args():
    from importlib import import_module
    return import_module("megatron.global_vars").get_args()


__all__ = ["is_megatron_model", "adapt"]
