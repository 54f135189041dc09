"""DeepSpeed's own ``engine.load_checkpoint``, checked by the plugin once it is installed.

Users call ``engine.load_checkpoint`` whatever the engine: DeepSpeed's 1F1B ``PipelineEngine``, its
``DualPipeVEngine``, the plugin's. :func:`install` wraps DeepSpeed's method (``DeepSpeedEngine.load_checkpoint``,
which every pipeline engine inherits) so that, for a pipeline engine:

- ``latest`` that is empty or not text, a tag asked for explicitly whose directory is missing, and a damaged
  manifest raise :class:`CheckpointError` naming the file (DeepSpeed would assert, decode or warn and start from
  scratch); without a tag and without ``latest`` DeepSpeed's warning stays;
- a checkpoint with the plugin's manifest is loaded by :func:`~deepspeed_dualpipe.checkpoint.load_checkpoint`:
  sizes and checksums verified, optimizer state of another placement refused before anything is loaded;
- any other checkpoint (DeepSpeed's own save) loads as DeepSpeed loads it.

Everything else about DeepSpeed's method is untouched: it runs it, with the same arguments.
"""

import functools
import inspect
import os

from deepspeed_dualpipe.checkpoint.load import (_deepspeed_engine, deepspeed_load_checkpoint, load_checkpoint as
                                                checked_load, prepare_load)

__all__ = ["install", "uninstall", "installed", "deepspeed_load_checkpoint"]


def _is_pipeline_engine(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine
    return isinstance(engine, PipelineEngine)


def _guarded(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_checkpoint(self, *args, **kwargs):
        if not _is_pipeline_engine(self):
            return original(self, *args, **kwargs)
        from deepspeed_dualpipe.checkpoint.files import read_latest, read_manifest
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        load_dir, tag = arguments["load_dir"], arguments["tag"]
        if tag is None and not self.load_universal_checkpoint():
            tag = read_latest(load_dir, strict=True)  # None: no 'latest', DeepSpeed warns as it always has
        if tag is not None and read_manifest(os.path.join(load_dir, str(tag))) is not None:
            return checked_load(self, **arguments)
        if tag is not None and not os.path.isdir(os.path.join(load_dir, str(tag))):
            prepare_load(self, load_dir, tag, load_optimizer_states=False)  # raises: what is there, what to do
        return original(self, *args, **kwargs)

    load_checkpoint._dualpipe_original = original
    return load_checkpoint


def install() -> None:
    """Guard ``DeepSpeedEngine.load_checkpoint``. Idempotent."""
    engine = _deepspeed_engine()
    if not hasattr(engine.load_checkpoint, "_dualpipe_original"):
        engine.load_checkpoint = _guarded(engine.load_checkpoint)


def uninstall() -> None:
    """Restore DeepSpeed's own ``load_checkpoint``. Idempotent."""
    engine = _deepspeed_engine()
    engine.load_checkpoint = deepspeed_load_checkpoint()


def installed() -> bool:
    return hasattr(_deepspeed_engine().load_checkpoint, "_dualpipe_original")
