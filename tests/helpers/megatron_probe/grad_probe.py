"""The gradient-clipping probe of the Megatron tests, installed by this directory's sitecustomize when
$GRAD_PROBE_OUT is set: around each call of the engine's ``clip_fp32_gradients`` (the plugin's and DeepSpeed's own
1F1B's), it saves per rank ``$GRAD_PROBE_OUT/rank{R}-iter{I}.pt`` with every parameter's name, Megatron and
DeepSpeed flags and gradient just before clipping, the rank's coordinates, and every multiplier the call applied to
the gradients, read from the calls themselves (``torch._foreach_mul_``, ``Tensor.mul_``). At exit it saves
``rank{R}-final.pt``: every parameter's value after training. $GRAD_PROBE_ITERS: the iterations to save (comma
separated; default 1)."""

import atexit
import os

import torch

SEEN = {"engine": None, "calls": 0}


def _owners(module) -> dict:
    """{id(parameter): (its module's class name, its own name there, whether Megatron sliced that linear over TP)}:
    Megatron's own account of what is a TP shard, whatever flags the parameter carries."""
    owners = {}
    for sub in module.modules():
        for leaf, p in sub.named_parameters(recurse=False):
            owners[id(p)] = (type(sub).__name__, leaf, not getattr(sub, "is_expert_without_slicing", True))
    return owners


def _flags(p) -> dict:
    return {
        "tensor_model_parallel": bool(getattr(p, "tensor_model_parallel", False)),
        "partition_dim": int(getattr(p, "partition_dim", -1)),
        "ds_pipe_replicated": bool(getattr(p, "ds_pipe_replicated", False)),
        "allreduce": bool(getattr(p, "allreduce", True)),
        "group_name": getattr(p, "group_name", None),
    }


def _coordinates(engine, params) -> dict:
    from deepspeed.utils import groups
    grid = engine.grid
    expert_groups = sorted({p.group_name for p in params if not getattr(p, "allreduce", True)})
    return {
        "rank": grid.global_rank,
        "pp": grid.get_stage_id(),
        "dp": grid.get_data_parallel_rank(),
        "tp": grid.get_slice_parallel_rank(),
        "ep": {
            name: groups._get_expert_parallel_rank(name)
            for name in expert_groups
        },
        "edp": {
            name: groups._get_expert_data_parallel_rank(name)
            for name in expert_groups
        },
    }


def _probed(clip):
    """``clip`` (an engine's ``clip_fp32_gradients``), saving what it sees and applies at the chosen iterations."""
    wanted = {int(i) for i in os.environ.get("GRAD_PROBE_ITERS", "1").split(",")}
    out = os.environ["GRAD_PROBE_OUT"]

    def probed(self, *args, **kwargs):
        SEEN["engine"] = self
        SEEN["calls"] += 1
        iteration = SEEN["calls"]
        if iteration not in wanted:
            return clip(self, *args, **kwargs)
        named = [(n, p) for n, p in self.module.named_parameters() if p.grad is not None]
        grads = {id(p.grad) for _, p in named}
        owners = _owners(self.module)
        params = [
            dict(name=n, grad=p.grad.detach().float().clone(), owner=owners[id(p)], **_flags(p)) for n, p in named
        ]
        coordinates = _coordinates(self, [p for _, p in named])
        record = {"engine": type(self).__name__, "coordinates": coordinates, "params": params, "multipliers": []}
        foreach_mul, mul = torch._foreach_mul_, torch.Tensor.mul_

        def seen(factor):
            value = factor.detach().float().reshape(-1) if torch.is_tensor(factor) else torch.tensor([float(factor)])
            record["multipliers"].append(value.clone())

        def recording_foreach_mul(tensors, factor, *rest, **kw):
            if any(id(t) in grads for t in tensors):
                seen(factor)
            return foreach_mul(tensors, factor, *rest, **kw)

        def recording_mul(tensor, factor, *rest, **kw):
            # DeepSpeed's clip_grad_norm_ multiplies each p.grad.data (a new view object of the same gradient)
            if any(tensor.data_ptr() == p.grad.data_ptr() for _, p in named):
                seen(factor)
            return mul(tensor, factor, *rest, **kw)

        torch._foreach_mul_, torch.Tensor.mul_ = recording_foreach_mul, recording_mul
        try:
            return clip(self, *args, **kwargs)
        finally:
            torch._foreach_mul_, torch.Tensor.mul_ = foreach_mul, mul
            rank = record["coordinates"]["rank"]
            torch.save(record, os.path.join(out, f"rank{rank}-iter{iteration}.pt"))

    return probed


def install(cls):
    """Probe ``cls.clip_fp32_gradients`` (DeepSpeed's ``DeepSpeedEngine``, the plugin's ``GradientReductions``)."""
    cls.clip_fp32_gradients = _probed(cls.clip_fp32_gradients)
    if not SEEN.get("atexit"):
        SEEN["atexit"] = atexit.register(_final)


def _final():
    engine = SEEN["engine"]
    if engine is None:
        return
    owners = _owners(engine.module)
    params = [
        dict(name=n, value=p.detach().float().clone(), owner=owners[id(p)], **_flags(p))
        for n, p in engine.module.named_parameters()
    ]
    record = {"coordinates": _coordinates(engine, list(engine.module.parameters())), "params": params}
    torch.save(record, os.path.join(os.environ["GRAD_PROBE_OUT"], f"rank{engine.grid.global_rank}-final.pt"))
