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

Nothing here imports Megatron at import time; Megatron is found through the model's module.
"""

import sys

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
