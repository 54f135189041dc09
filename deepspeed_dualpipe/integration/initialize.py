"""The ways into the plugin from a training script.

1. ``deepspeed_dualpipe.integration.initialize.initialize(...)``: a drop-in for ``deepspeed.initialize``.
2. ``deepspeed_dualpipe.install()``: makes ``deepspeed.initialize`` itself route through (1).
   Only the attribute ``deepspeed.initialize`` is replaced: a script that ran
   ``from deepspeed import initialize`` *before* ``install()`` holds the original function
   and keeps DeepSpeed's behaviour (``pipeline.schedule`` is then ignored, i.e. 1F1B).
3. ``patches/deepspeed-0.19.8-dualpipe.patch``: DeepSpeed's own ``initialize`` delegates to (1)
   when the config names a schedule other than "1f1b"; no script change at all.

The schedule is chosen by ``config["pipeline"]["schedule"]``; the key stays in the config
(DeepSpeed copies ``pipeline`` keys through and ignores those it does not know).
"""

import functools
import inspect

import deepspeed

from deepspeed_dualpipe.checkpoint import guard as load_guard
from deepspeed_dualpipe.config import dualpipe_config
from deepspeed_dualpipe.integration import convert, megatron
from deepspeed_dualpipe.integration.optimizer import check_optimizer
from deepspeed_dualpipe.integration.recording import record_pipeline_module_args
from deepspeed_dualpipe.integration.strict import strict_mode_from_env
from deepspeed_dualpipe.schedule import LayoutKind, get_spec

# Set while initialize runs, so a patched deepspeed.initialize (or an installed wrapper)
# that calls back into us goes straight to DeepSpeed instead of converting the model twice.
_ACTIVE = False
# deepspeed.initialize as it was before install(); None while not installed.
_ORIGINAL_INITIALIZE = None

# --- initialize ---------------------------------------------------------------------------------


def _deepspeed_initialize():
    # After install(), deepspeed.initialize is our wrapper: call what it replaced.
    return _ORIGINAL_INITIALIZE or deepspeed.initialize


def _plugin_classes():
    """(DualPipeModule, DualPipeEngine), imported late: the engine pulls in the whole runtime."""
    from deepspeed_dualpipe.runtime.engine import DualPipeEngine
    from deepspeed_dualpipe.runtime.module import DualPipeModule
    return DualPipeModule, DualPipeEngine


def _find_config(args, kwargs):
    """The config the way deepspeed.initialize finds it, without mutating ``args``."""
    config = kwargs.get("config")
    if config is None:
        config = kwargs.get("config_params")
    if config is None:
        config = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    return config


# deepspeed.initialize's parameters after (args, model), so positional callers keep working.
_DS_PARAMS = list(inspect.signature(deepspeed.initialize).parameters)[2:]


def initialize(args=None, model=None, *positional, **kwargs):
    """Drop-in for ``deepspeed.initialize``: same arguments, same return value
    ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    What happens follows the schedule's facts in the registry (:mod:`deepspeed_dualpipe.schedule.registry`):

    - DeepSpeed's schedule on a linear layout ("1f1b", the default), or ``model`` not a ``PipelineModule``:
      ``deepspeed.initialize`` unchanged.
    - DeepSpeed's schedule on a V layout ("ds-dualpipev"): the model is rebuilt as DeepSpeed's
      ``DualPipeVModule``, for which ``deepspeed.initialize`` builds its ``DualPipeVEngine``.
    - the plugin's schedules (``PLUGIN_SCHEDULES``: "zb1p", "dualpipe", ...): the model is rebuilt
      in chunks (:mod:`.chunked`: the user's class, attributes, weights and random stream kept) and
      ``deepspeed.initialize`` runs with
      ``deepspeed.PipelineEngine`` (looked up by it at call time) set to ``DualPipeEngine``.

    A rebuilt model's ``model_parameters`` and optimizer are pointed at it (:mod:`.optimizer`); whatever the
    path, an optimizer that would not train exactly the model's trainable parameters is refused.
    """
    global _ACTIVE
    if len(positional) > len(_DS_PARAMS):
        raise TypeError(f"initialize() takes at most {len(_DS_PARAMS) + 2} positional arguments")
    for name, value in zip(_DS_PARAMS, positional):
        if name in kwargs:
            raise TypeError(f"initialize() got multiple values for argument {name!r}")
        kwargs[name] = value
    strict_mode_from_env()  # DS_DUALPIPE_STRICT_P2P: NCCL's rules emulated, from here on
    load_guard.install()  # engine.load_checkpoint of every engine checks the plugin's manifest
    ds_initialize = _deepspeed_initialize()
    config = _find_config(args, kwargs)
    from deepspeed.pipe import PipelineModule
    if _ACTIVE or config is None or not isinstance(model, PipelineModule):
        # Nothing for us to do: DeepSpeed reports a missing config or model its own way.
        return ds_initialize(args=args, model=model, **kwargs)

    schedule = dualpipe_config(config).schedule
    spec = get_spec(schedule)
    _check_expert_parallelism(model)
    if not spec.runs_on_plugin_engine and spec.layout_kind is LayoutKind.LINEAR:  # DeepSpeed's 1F1B
        check_optimizer(kwargs.get("optimizer"), model)
        return _weigh_aux_losses_by_gas(ds_initialize(args=args, model=model, **kwargs))

    _ACTIVE = True
    try:
        if not spec.runs_on_plugin_engine:  # DeepSpeed's DualPipeV: its own module class
            rebuilt = convert.as_deepspeed_dualpipev(model)
            kwargs = convert.carry_over(kwargs, model, rebuilt)
            check_optimizer(kwargs.get("optimizer"), rebuilt)
            return _weigh_aux_losses_by_gas(ds_initialize(args=args, model=rebuilt, **kwargs))
        DualPipeModule, DualPipeEngine = _plugin_classes()
        rebuilt = convert.as_chunked(model, schedule, DualPipeModule)
        kwargs = convert.carry_over(kwargs, model, rebuilt)
        if megatron.is_megatron_model(rebuilt):
            megatron.adapt(rebuilt, schedule)
        check_optimizer(kwargs.get("optimizer"), rebuilt)
        with _pipeline_engine(DualPipeEngine):
            return ds_initialize(args=args, model=rebuilt, **kwargs)
    finally:
        _ACTIVE = False


def _check_expert_parallelism(model) -> None:
    """Every ``ep_size`` of the model's MoE layers must divide the data-parallel degree: DeepSpeed
    carves expert-parallel groups out of each stage's data-parallel ranks (else: a bare assertion
    deep inside its group set-up). Layers are looked at in the specs, so every rank decides alike."""
    from deepspeed.pipe import LayerSpec
    topology = getattr(model, "_topo", None)
    if topology is None:  # not built by PipelineModule.__init__: DeepSpeed reports what is wrong with it
        return
    dp = topology.get_dim("data")
    for index, spec in enumerate(model._layer_specs):
        ep_size = spec.module_kwargs.get("ep_size", 1) if isinstance(spec, LayerSpec) else 1
        if isinstance(ep_size, int) and ep_size > 1 and dp % ep_size:
            valid = [d for d in range(1, dp + 1) if dp % d == 0]
            raise ValueError(f"layer {index} ({spec.typename.__name__}) has ep_size={ep_size}, but the data-parallel "
                             f"degree is {dp} (world size {topology.world_size()} / {model.num_stages} pipeline "
                             f"stages): expert-parallel groups are cut from each stage's data-parallel ranks, so "
                             f"ep_size must divide {dp}; use ep_size in {valid} or more ranks")


def _weigh_aux_losses_by_gas(result):
    """DeepSpeed's own engines divide each micro-batch's loss by gradient_accumulation_steps before
    its backward; the MoE aux losses of :class:`~deepspeed_dualpipe.moe.MoETransformerBlock` get their
    gradient outside the loss (see :mod:`deepspeed_dualpipe.runtime.autograd.aux_loss`), so they must be scaled
    alike. (The plugin's engine sets the scale per batch itself.)"""
    from deepspeed_dualpipe.runtime.autograd.aux_loss import aux_loss_scale
    steps = getattr(result[0], "gradient_accumulation_steps", None)
    if callable(steps):
        aux_loss_scale(1.0 / steps())
    return result


class _pipeline_engine:
    """Temporarily bind ``deepspeed.PipelineEngine``, the name deepspeed.initialize builds pipeline
    engines from; restored on exit even when initialize raises."""

    def __init__(self, engine_cls):
        self.engine_cls = engine_cls

    def __enter__(self):
        self.saved = deepspeed.PipelineEngine
        deepspeed.PipelineEngine = self.engine_cls

    def __exit__(self, *exc):
        deepspeed.PipelineEngine = self.saved
        return False


# --- install / uninstall -------------------------------------------------------------------------


def install() -> None:
    """Make ``deepspeed.initialize`` honour ``pipeline.schedule``. Idempotent."""
    global _ORIGINAL_INITIALIZE
    record_pipeline_module_args()
    load_guard.install()
    if _ORIGINAL_INITIALIZE is not None:
        return
    original = deepspeed.initialize

    @functools.wraps(original)
    def dualpipe_initialize(args=None, model=None, *positional, **kwargs):
        return initialize(args, model, *positional, **kwargs)

    dualpipe_initialize._dualpipe_installed = True
    _ORIGINAL_INITIALIZE = original
    deepspeed.initialize = dualpipe_initialize


def uninstall() -> None:
    """Restore the ``deepspeed.initialize`` that :func:`install` replaced, and DeepSpeed's own
    ``load_checkpoint``. Idempotent."""
    global _ORIGINAL_INITIALIZE
    load_guard.uninstall()
    if _ORIGINAL_INITIALIZE is None:
        return
    deepspeed.initialize = _ORIGINAL_INITIALIZE
    _ORIGINAL_INITIALIZE = None


def installed() -> bool:
    return _ORIGINAL_INITIALIZE is not None


__all__ = ["initialize", "install", "uninstall", "installed"]
