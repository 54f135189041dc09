"""Loading: resolve ``latest``, explain a missing or unfinished tag, check the manifest, refuse optimizer
state saved for another pipeline placement."""

import contextlib
import glob
import os
from typing import Optional

from deepspeed.utils import logger

from deepspeed_dualpipe.checkpoint import checksums, marker, moe
from deepspeed_dualpipe.checkpoint.files import (CheckpointError, MANIFEST, describe_layout, same_placement, layout_of,
                                                 read_latest, read_manifest, replaced_dir, staging_dir)


def _deepspeed_engine():
    from deepspeed.runtime.engine import DeepSpeedEngine
    return DeepSpeedEngine


def deepspeed_load_checkpoint():
    """DeepSpeed's ``load_checkpoint`` itself, without the guard that :mod:`.guard` installs over it."""
    method = _deepspeed_engine().load_checkpoint
    return getattr(method, "_dualpipe_original", method)


def _missing_tag(load_dir: str, tag: str) -> CheckpointError:
    latest = read_latest(load_dir)
    hint = f"; 'latest' names {latest!r}" if latest is not None else ""
    if os.path.isdir(staging_dir(load_dir, tag)):
        return CheckpointError(f"checkpoint {tag!r} in {load_dir} was never completed: its save was interrupted "
                               f"(its partial files are in {staging_dir(load_dir, tag)}). Load the last complete "
                               f"checkpoint instead (tag=None loads the one 'latest' names{hint})")
    available = sorted(
        d for d in os.listdir(load_dir)
        if os.path.isdir(os.path.join(load_dir, d)) and not d.startswith(".")) if os.path.isdir(load_dir) else []
    where = f"the checkpoints there are {available}" if available else "there is no checkpoint there"
    return CheckpointError(f"no checkpoint {tag!r} in {load_dir}: {where}{hint}")


def prepare_load(engine, load_dir, tag=None, load_optimizer_states=True, load_module_only=False) -> Optional[str]:
    """Checks to run before DeepSpeed's ``load_checkpoint``; returns the tag to load (None: no ``latest``,
    which DeepSpeed reports as it always has). Raises :class:`CheckpointError` when the checkpoint is missing,
    incomplete, or its optimizer state cannot be loaded into ``engine``'s pipeline placement. Every rank
    reaches the same verdict (it reads the same files), so none is left waiting in a collective."""
    if tag is None:
        tag = read_latest(load_dir, strict=True)
        if tag is None:
            return None
    tag = str(tag)
    path = os.path.join(load_dir, tag)
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"cannot load checkpoint {tag!r}: {load_dir} is not a directory. Check the path (a "
                              f"load without a tag and without 'latest' starts from scratch; one that names a tag "
                              f"does not)")
    if not os.path.isdir(path):
        replaced = replaced_dir(load_dir, tag)
        if not os.path.isdir(replaced):
            raise _missing_tag(load_dir, tag)
        logger.warning(f"deepspeed_dualpipe: {path} is being replaced by a save (or one was interrupted while "
                       f"replacing it); loading the previous version from {replaced}")
        tag, path = os.path.basename(replaced), replaced
    manifest = read_manifest(path)
    if manifest is not None:
        wrong = [
            f"{name} ({'missing' if not os.path.exists(os.path.join(path, name)) else 'size changed'})"
            for name, size in manifest["files"].items()
            if not os.path.exists(os.path.join(path, name)) or os.path.getsize(os.path.join(path, name)) != size
        ]
        if wrong:
            raise CheckpointError(f"checkpoint {path} is damaged: {', '.join(wrong[:5])}"
                                  f"{' and more' if len(wrong) > 5 else ''} differ from the manifest {MANIFEST} "
                                  f"written when it was saved; load another checkpoint")
        _verify_checksums(path, manifest)
    rank_files = glob.glob(os.path.join(path, "*mp_rank_*_model_states.pt"))
    if not rank_files:
        raise CheckpointError(f"{path} has no mp_rank_XX_model_states.pt files: it is not a complete DeepSpeed "
                              f"checkpoint")
    if load_optimizer_states and not load_module_only and engine.optimizer is not None:
        saved, mine, source = _layouts(engine, path)
        if not same_placement(saved, mine):
            raise CheckpointError(
                f"checkpoint {path} was written by {describe_layout(saved)}{source}; this engine runs "
                f"{describe_layout(mine)}. Its optimizer state is stored per pipeline rank, for the parameters "
                f"that rank held, and is not converted to another placement. Pass load_optimizer_states=False to "
                f"load the module weights (every layer, from its layer_XX file), the step counters and the "
                f"learning-rate scheduler only: nothing is lost for an optimizer without per-parameter state "
                f"(SGD without momentum); Adam's moments or SGD's momentum restart from zero (Megatron-DeepSpeed: "
                f"--finetune, which also restarts the iteration count). Or resume with the schedule placement and "
                f"pipeline depth it was saved with.")
    return tag


def _share_of_files(names):
    """The files this rank checks: every rank one share, so the checkpoint is read once in all."""
    import torch.distributed as tdist
    if not (tdist.is_available() and tdist.is_initialized()):
        return names
    rank, world = tdist.get_rank(), tdist.get_world_size()
    return names[rank::world]


def _everyones(found):
    """What every rank found in its share (the same list on every rank, so all reach the same verdict)."""
    import torch.distributed as tdist
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return found
    gathered = [None] * tdist.get_world_size()
    tdist.all_gather_object(gathered, found)
    return [item for share in gathered for item in share]


def _verify_checksums(path: str, manifest: dict) -> None:
    """Every file against its checksum in the manifest; a mismatch raises :class:`CheckpointError` on every rank,
    naming the files. Manifests written before checksums were recorded have none to check."""
    recorded = manifest.get("checksums") or {}
    unknown = sorted({checksums.algorithm_of(v) for v in recorded.values()} - set(checksums.ALGORITHMS))
    if unknown:
        raise CheckpointError(f"checkpoint {path} records checksums of algorithm {unknown[0]!r}, which this "
                              f"Python cannot compute: install the module that provides it (crc32c, xxhash), or "
                              f"delete its 'checksums' entry from {os.path.join(path, MANIFEST)} to load unchecked")
    damaged = []
    for name in _share_of_files(sorted(recorded)):
        file = os.path.join(path, name)
        if checksums.of_file(file, checksums.algorithm_of(recorded[name])) != recorded[name]:
            damaged.append(name)
    damaged = sorted(_everyones(damaged))
    if damaged:
        raise CheckpointError(f"checkpoint {path} is damaged: the content of {', '.join(damaged[:5])}"
                              f"{' and more' if len(damaged) > 5 else ''} differs from the checksum recorded in "
                              f"{MANIFEST} when it was saved (same size, other bytes); load another checkpoint")


def _layouts(engine, path):
    """(the layout ``path`` was saved from, ``engine``'s, and how sure the first is: "" or a caveat)."""
    mine, manifest = layout_of(engine), read_manifest(path)
    if manifest is not None:
        return manifest["layout"], mine, ""
    # Written by DeepSpeed's own save: its 1F1B placement, one mp_rank file per pipeline x tensor rank.
    tensor = mine["tensor_parallel_size"]
    saved = {
        "schedule":
        "1f1b (DeepSpeed's save, assumed)",
        "layout":
        "linear",
        "pipe_parallel_size":
        len([
            f for f in glob.glob(os.path.join(path, "*mp_rank_*_model_states.pt"))
            if not os.path.basename(f).startswith("layer_")  # MoE expert files
        ]) // tensor,
        "tensor_parallel_size":
        tensor
    }
    return saved, mine, ", as far as its files tell"


def load_checkpoint(engine,
                    load_dir,
                    tag=None,
                    load_module_strict=True,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=True,
                    load_module_only=False,
                    custom_load_fn=None):
    """DeepSpeed's ``load_checkpoint`` after :func:`prepare_load`'s checks, for any pipeline engine (the plugin's
    engine calls it too). Runs under ``torch.no_grad()``: DeepSpeed's ``PipelineModule`` broadcasts tied weights
    into parameters as it loads, which autograd would otherwise record."""
    import torch
    with torch.no_grad():
        tag = prepare_load(engine, load_dir, tag, load_optimizer_states, load_module_only)
        across = contextlib.nullcontext()
        if tag is not None and engine.has_moe_layers:  # DeepSpeed's MoE files are read by placement (checkpoint/moe.py)
            path = os.path.join(load_dir, tag)
            saved, mine, source = _layouts(engine, path)
            if not same_placement(saved, mine):
                moe.check_loadable(path, describe_layout(saved) + source, describe_layout(mine))
                across = moe.loading_across_placements(engine, path)
        with across, _unmarked(engine):
            return deepspeed_load_checkpoint()(engine,
                                               load_dir,
                                               tag,
                                               load_module_strict=load_module_strict,
                                               load_optimizer_states=load_optimizer_states,
                                               load_lr_scheduler_states=load_lr_scheduler_states,
                                               load_module_only=load_module_only,
                                               custom_load_fn=custom_load_fn)


@contextlib.contextmanager
def _unmarked(engine):
    """Within the block, ``engine``'s checkpoint engine reads files as DeepSpeed wrote them (:mod:`.marker`)."""
    checkpoint_engine = engine.checkpoint_engine
    patched_before = "load" in vars(checkpoint_engine)
    load = checkpoint_engine.load
    checkpoint_engine.load = lambda *args, **kwargs: marker.unmark(load(*args, **kwargs))
    try:
        yield
    finally:
        if patched_before:
            checkpoint_engine.load = load
        else:
            del checkpoint_engine.load
