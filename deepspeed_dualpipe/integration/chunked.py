"""Rebuild a user's ``PipelineModule`` in chunks for one of the plugin's schedules, keeping the user's module.

What survives the rebuild:

- **the user's class**: the rebuilt module is an instance of a subclass of the user's class, with its name,
  so its methods work, ``isinstance`` holds and DeepSpeed's checks that key on the class name still match;
- **the user's attributes**, set in the constructor or afterwards by the script (Megatron's
  ``_megatron_batch_fn``); methods of the old instance that the layer list or ``loss_fn`` hold are rebound
  to the new one, so what they record (Megatron's ``moe_loss``) is read where DeepSpeed reads it;
- **the user's initial weights**: every layer starts from the tensors the user's module built for it, fetched
  from the pipeline rank that built it (the user's partition), so each schedule starts where 1F1B would;
- **the user's random stream**: building the chunks does not advance it.

The old module's tensors are released afterwards, so the model is not held twice.
"""

import types

import torch
from deepspeed import comm as dist
from deepspeed.runtime.pipe.module import PipelineModule
from deepspeed.utils import logger

from deepspeed_dualpipe.integration.recording import pipeline_module_init_args

_CLASSES = {}  # (base, user class) -> the rebuilt class
# Attributes nn.Module and PipelineModule keep for themselves: never carried from the old instance.
_OWN = {"_parameters", "_buffers", "_modules", "training", "_dualpipe_init_args"}


def chunked_class(user_cls, base):
    """``user_cls`` cut in chunks by ``base`` (``DualPipeModule``): a subclass of both, named as ``user_cls``."""
    if user_cls in base.__mro__:  # a plain PipelineModule
        return base
    if issubclass(user_cls, base):  # built for the plugin already
        return user_cls
    key = (base, user_cls)
    if key not in _CLASSES:
        _CLASSES[key] = type(
            user_cls.__name__, (base, user_cls), {
                "__module__": user_cls.__module__,
                "__qualname__": user_cls.__qualname__,
                "__doc__": user_cls.__doc__,
                "dualpipe_user_class": user_cls,
            })
    return _CLASSES[key]


def rebuild(original, base, **extra):
    """``original`` rebuilt as ``chunked_class(type(original), base)`` (``base``: the plugin's ``DualPipeModule``,
    with ``extra`` = ``schedule=...``, or DeepSpeed's ``DualPipeVModule``); see the module docstring."""
    args, kwargs = pipeline_module_init_args(original)
    cls = chunked_class(type(original), base)
    rebuilt = cls.__new__(cls)
    rebind = _rebinder(original, rebuilt)
    args, kwargs = rebind(args), rebind(kwargs)
    # The base's own __init__, else PipelineModule's: never the user's, which would build the layer list again.
    init = next(c.__init__ for c in base.__mro__ if "__init__" in vars(c) and issubclass(c, PipelineModule))
    with _random_stream_kept():
        init(rebuilt, *args, **extra, **kwargs)
    carry_weights(original, rebuilt)
    _release(original)
    for name, value in vars(original).items():
        if name not in _OWN and name not in vars(rebuilt):
            object.__setattr__(rebuilt, name, rebind(value))
    for name, module in original.named_children():  # the user's own submodules, outside the layer list
        if not _is_layer(name) and name not in rebuilt._modules:
            rebuilt.add_module(name, module)
    logger.info(f"deepspeed_dualpipe: rebuilt {cls.__name__} as a {base.__name__} from the module the script "
                f"built (its weights carried over, its tensors released)")
    return rebuilt


def _rebinder(old, new):
    """A function mapping methods bound to ``old`` (also inside lists, tuples, dicts and partials) to ``new``."""

    def rebind(value):
        if isinstance(value, types.MethodType) and value.__self__ is old:
            return types.MethodType(value.__func__, new)
        if isinstance(value, list):
            return [rebind(v) for v in value]
        if isinstance(value, tuple):
            return tuple(rebind(v) for v in value)
        if isinstance(value, dict):
            return {k: rebind(v) for k, v in value.items()}
        return value

    return rebind


class _random_stream_kept:
    """Restore torch's random state (CPU and accelerator) after building: the rebuild draws its own
    initial weights, which are then replaced by the user's, so the user's stream must not move."""

    def __enter__(self):
        from deepspeed.accelerator import get_accelerator
        self.accelerator = get_accelerator()
        self.cpu = torch.random.get_rng_state()
        self.device = self.accelerator.get_rng_state() if self.accelerator.device_name() != "cpu" else None

    def __exit__(self, *exc):
        torch.random.set_rng_state(self.cpu)
        if self.device is not None:
            self.accelerator.set_rng_state(self.device)
        return False


def _owner(module, name: str) -> int:
    """The pipeline rank whose ``module`` holds the state entry ``name`` (a tied module: its first layer's)."""
    head = name.split(".")[0]
    if head == "tied_modules":
        key = name.split(".")[1]
        return module.stage_owner(
            min(i for i, spec in enumerate(module._layer_specs) if getattr(spec, "key", None) == key))
    return module.stage_owner(int(head))


def carry_weights(original, rebuilt) -> None:
    """Copy every state entry (parameters and buffers) of ``rebuilt`` from the pipeline rank whose ``original``
    holds it. Entries are matched by name: layers are named by global index on every rank. Every rank of the
    pipeline goes through the same names in the same order, each a send from its owner to the ranks that need
    it, so no rank waits on one that waits on it (also under NCCL's in-order point-to-point)."""
    grid = rebuilt._grid
    group = grid.get_pipe_parallel_group()
    mine = {n: t for n, t in original.state_dict().items() if _is_layer(n.split(".")[0])}
    needed = {n: t for n, t in rebuilt.state_dict().items() if _is_layer(n.split(".")[0])}
    wanted = [None] * grid.get_pipe_parallel_world_size()
    torch.distributed.all_gather_object(wanted, sorted(needed), group=group)
    me = grid.get_stage_id()
    for name in sorted(set().union(*wanted)):
        owner = _owner(original, name)
        for stage, names in enumerate(wanted):
            if name not in names:
                continue
            if stage == owner == me:
                with torch.no_grad():
                    needed[name].copy_(mine[name])
            elif me == owner:
                dist.send(mine[name].contiguous(), grid.stage_to_global(stage_id=stage))
            elif me == stage:
                received = torch.empty_like(needed[name])
                dist.recv(received, grid.stage_to_global(stage_id=owner))
                with torch.no_grad():
                    needed[name].copy_(received)


def _is_layer(name: str) -> bool:
    """Submodules PipelineModule builds from the layer list: layers by index, and the tied modules."""
    return name.isdigit() or name == "tied_modules"


def _release(original) -> None:
    """Free the tensors of the replaced module's layers: only the rebuilt module is trained from here on."""
    with torch.no_grad():
        for name, module in original.named_children():
            if _is_layer(name):
                for tensor in list(module.parameters()) + list(module.buffers()):
                    tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)


__all__ = ["chunked_class", "rebuild", "carry_weights"]
