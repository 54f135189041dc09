"""The optimizer a script built, pointed at the module the engine trains, and checked against it.

A script builds its optimizer (or ``model_parameters``) from the ``PipelineModule`` it built. When the plugin
rebuilds that module in chunks, every parameter of the rebuilt module joins the param group its source, the
parameter of the same name, was in: on this rank, or on the pipeline rank that built it (under DualPipe a rank
also holds its mirror's stage; under DualPipeV, other layers altogether). Groups keep their settings (learning
rate, weight decay, Megatron's MoE groups); a group a rank did not have is added with the settings it has
elsewhere. A parameter whose source no rank's optimizer held stays out, as its source did.

Whatever the path, :func:`check_optimizer` then refuses an optimizer that would not train exactly the module's
trainable parameters: training nothing silently must be impossible.
"""

import torch

_SETTINGS_EXCLUDED = ("params", )


def _settings(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in _SETTINGS_EXCLUDED}


def remap_param_groups(groups, original, rebuilt):
    """``groups`` (param groups of ``original``: dicts with ``params``) for ``rebuilt`` (see the module docstring).
    Parameters in a group that are not ``original``'s (a script's extra trainable tensor) stay where they are."""
    names = {id(p): n for n, p in original.named_parameters()}
    held = {names[id(p)]: _settings(g) for g in groups for p in g["params"] if id(p) in names}
    grid = rebuilt._grid
    everyone = [None] * grid.get_pipe_parallel_world_size()
    torch.distributed.all_gather_object(everyone, held, group=grid.get_pipe_parallel_group())
    source = {}
    for name, settings in ((n, s) for ranks_held in everyone for n, s in ranks_held.items()):
        if source.setdefault(name, settings) != settings:
            raise ValueError(f"parameter {name!r} is in param groups with different settings on two pipeline ranks "
                             f"({source[name]} and {settings}); the plugin cannot tell which to give its copy")
    remapped = [dict(g, params=[p for p in g["params"] if id(p) not in names]) for g in groups]
    for name, p in rebuilt.named_parameters():
        settings = source.get(name)
        if settings is None:
            continue
        group = next((g for g in remapped if _settings(g) == settings), None)
        if group is None:
            group = dict(settings, params=[])
            remapped.append(group)
        group["params"].append(p)
    return remapped


def remap_optimizer(optimizer, original, rebuilt) -> None:
    """Point a ``torch.optim.Optimizer`` built from ``original``'s parameters at ``rebuilt``'s, in place."""
    if any(optimizer.state.values()):
        raise ValueError(f"the {type(optimizer).__name__} passed to initialize has already stepped (it holds state), "
                         f"but pipeline.schedule rebuilds the model it was built for; build the optimizer before "
                         f"its first step, or build the model as deepspeed_dualpipe.DualPipeModule yourself")
    optimizer.param_groups = remap_param_groups(optimizer.param_groups, original, rebuilt)
    optimizer.state.clear()


def check_optimizer(optimizer, module) -> None:
    """Raise unless ``optimizer`` holds exactly ``module``'s trainable parameters (extra tensors of the script's
    own may stay). Naming the counts: training nothing, or part of the model, silently is refused."""
    if not hasattr(optimizer, "param_groups"):
        return  # a callable, or None: DeepSpeed builds the optimizer from the module itself
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if id(p) not in held]
    if not missing:
        return
    if len(missing) == len(trainable):
        raise ValueError(f"the {type(optimizer).__name__} passed to deepspeed.initialize holds none of the "
                         f"{len(trainable)} trainable parameters of the model it trains ({type(module).__name__}; it "
                         f"holds {len(held)} other tensors), so no step would change the model. Build the optimizer "
                         f"from the parameters of the module you pass to initialize")
    raise ValueError(
        f"the {type(optimizer).__name__} passed to deepspeed.initialize holds {len(trainable) - len(missing)}"
        f" of the {len(trainable)} trainable parameters of {type(module).__name__}: {len(missing)} are "
        f"in no param group and would never be updated (e.g. {missing[:3]}). Add them to a group, or set "
        f"requires_grad=False on parameters you mean to freeze")


__all__ = ["remap_param_groups", "remap_optimizer", "check_optimizer"]
