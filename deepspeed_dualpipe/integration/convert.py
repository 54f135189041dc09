"""Rebuild a user's ``PipelineModule`` in the form a schedule needs, from its recorded arguments."""

from deepspeed.utils import logger

from deepspeed_dualpipe.integration.recording import pipeline_module_init_args


def as_deepspeed_dualpipev(model):
    """``model`` as DeepSpeed's own ``DualPipeVModule`` (schedule ``ds-dualpipev``)."""
    from deepspeed.runtime.pipe.dualpipev import DualPipeVModule
    if isinstance(model, DualPipeVModule):
        return model
    logger.info("pipeline.schedule='ds-dualpipev': rebuilding the PipelineModule as DeepSpeed's DualPipeVModule")
    args, kwargs = pipeline_module_init_args(model)
    return DualPipeVModule(*args, **kwargs)  # same constructor as PipelineModule


def as_chunked(model, schedule: str, module_cls):
    """``model`` rebuilt as ``module_cls`` (a ``DualPipeModule``) for one of the plugin's schedules:
    the same layers and settings, cut into the chunks ``schedule`` places on each rank."""
    if isinstance(model, module_cls) and model.schedule == schedule:
        return model
    args, kwargs = pipeline_module_init_args(model)
    return module_cls(*args, schedule=schedule, **kwargs)


def parameters_for(rebuilt, original, kwargs, schedule):
    """``deepspeed.initialize``'s keyword arguments with ``model_parameters`` of the rebuilt module. A script
    that passed ``model.parameters()`` of the module it built meant "all of them", and those belong to the
    module that is now replaced (and that does not hold a mirror chunk): the rebuilt module's own parameters
    take their place. Parameter groups cannot be carried over automatically, so they are an error that says
    what to do."""
    given = kwargs.get("model_parameters")
    if given is None:
        return kwargs
    given = list(given)
    if any(isinstance(g, dict) for g in given):
        raise ValueError(f"pipeline.schedule={schedule!r} rebuilds the PipelineModule, so parameter groups "
                         f"(model_parameters=[{{'params': ...}}, ...]) built from the original module would train "
                         f"nothing; build deepspeed_dualpipe.DualPipeModule(..., schedule={schedule!r}) yourself and "
                         f"make the groups from its parameters, or pass a callable optimizer")
    ids = {id(p) for p in given}
    if ids == {id(p) for p in original.parameters()}:
        return {**kwargs, "model_parameters": list(rebuilt.parameters())}
    if ids == {id(p) for p in original.parameters() if p.requires_grad}:
        return {**kwargs, "model_parameters": [p for p in rebuilt.parameters() if p.requires_grad]}
    raise ValueError(f"pipeline.schedule={schedule!r} rebuilds the PipelineModule, so model_parameters must be all "
                     f"of its parameters (or all trainable ones) to be carried over; for another selection build "
                     f"deepspeed_dualpipe.DualPipeModule(..., schedule={schedule!r}) yourself and pass its parameters")


__all__ = ["as_deepspeed_dualpipev", "as_chunked", "parameters_for"]
