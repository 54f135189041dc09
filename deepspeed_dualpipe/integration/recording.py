"""Remember the arguments every ``PipelineModule`` was built with.

Rebuilding a user's module for another schedule needs ``partition_method`` and other constructor
arguments that ``PipelineModule`` does not store. This module imports nothing from the plugin, so
any layer may use it.
"""

import functools
import inspect

import torch

INIT_ARGS_ATTR = "_dualpipe_init_args"


def record_pipeline_module_args() -> None:
    """Wrap ``PipelineModule.__init__`` (once) so every instance keeps the arguments it was built with,
    as ``module._dualpipe_init_args = (args, kwargs)``. A one-shot ``layers`` iterable becomes a list,
    which the first build would otherwise consume. Modules built before this runs are not recorded;
    ``import deepspeed_dualpipe`` calls it."""
    from deepspeed.pipe import PipelineModule
    original = PipelineModule.__init__
    if getattr(original, "_dualpipe_records_args", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        layers = bound.arguments.get("layers")
        if layers is not None and not isinstance(layers, (list, tuple, torch.nn.Module)):
            bound.arguments["layers"] = list(layers)
        # Plain instance attribute: not a parameter, buffer or submodule, so no state_dict change.
        object.__setattr__(self, INIT_ARGS_ATTR, (bound.args[1:], dict(bound.kwargs)))
        original(*bound.args, **bound.kwargs)

    __init__._dualpipe_records_args = True
    PipelineModule.__init__ = __init__


def pipeline_module_init_args(module):
    """``(args, kwargs)`` that ``module`` was built with (see :func:`record_pipeline_module_args`)."""
    recorded = getattr(module, INIT_ARGS_ATTR, None)
    if recorded is None:
        raise ValueError(f"cannot rebuild {type(module).__name__} for another pipeline schedule: its constructor "
                         "arguments were not recorded. Import deepspeed_dualpipe before building the PipelineModule.")
    args, kwargs = recorded
    return tuple(args), dict(kwargs)


__all__ = ["INIT_ARGS_ATTR", "record_pipeline_module_args", "pipeline_module_init_args"]
