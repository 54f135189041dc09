"""Rebuild a user's ``PipelineModule`` in the form a schedule needs, and point what the script built from it
(``model_parameters``, its optimizer) at the rebuilt module."""

from deepspeed_dualpipe.integration import chunked
from deepspeed_dualpipe.integration.optimizer import remap_optimizer, remap_param_groups


def as_deepspeed_dualpipev(model):
    """``model`` as DeepSpeed's own ``DualPipeVModule`` (schedule ``ds-dualpipev``)."""
    from deepspeed.runtime.pipe.dualpipev import DualPipeVModule
    if isinstance(model, DualPipeVModule):
        return model
    return chunked.rebuild(model, DualPipeVModule)


def as_chunked(model, schedule: str, module_cls):
    """``model`` rebuilt in the chunks ``schedule`` places on each rank (``module_cls``: ``DualPipeModule``)."""
    if isinstance(model, module_cls) and model.schedule == schedule:
        return model
    return chunked.rebuild(model, module_cls, schedule=schedule)


def carry_over(kwargs: dict, original, rebuilt) -> dict:
    """``deepspeed.initialize``'s keyword arguments for ``rebuilt``: ``model_parameters`` (tensors or param
    groups) remapped, and a ``torch.optim.Optimizer`` passed as ``optimizer`` remapped in place."""
    if rebuilt is original:
        return kwargs
    given = kwargs.get("model_parameters")
    if given is not None:
        given = list(given)
    if given:
        groups = given if given and isinstance(given[0], dict) else [{"params": given}]
        remapped = remap_param_groups(groups, original, rebuilt)
        kwargs = {**kwargs, "model_parameters": remapped if isinstance(given[0], dict) else remapped[0]["params"]}
    optimizer = kwargs.get("optimizer")
    if hasattr(optimizer, "param_groups"):
        remap_optimizer(optimizer, original, rebuilt)
    return kwargs


__all__ = ["as_deepspeed_dualpipev", "as_chunked", "carry_over"]
