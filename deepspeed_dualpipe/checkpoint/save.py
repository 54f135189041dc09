"""Saving: every rank writes into a staging directory, one rank renames it into place, then ``latest``."""

import json
import os
import shutil
from contextlib import contextmanager

from deepspeed.utils import logger

from deepspeed_dualpipe.checkpoint.files import (CHECKSUMS_PREFIX, DEFAULT_TIMEOUT_S, FORMAT_VERSION, MANIFEST,
                                                 REPLACED_PREFIX, STAGING_PREFIX, fsync_dir, fsync_file,
                                                 manifest_files, check_tag, layout_of, replaced_dir, staging_dir,
                                                 write_latest)
from deepspeed_dualpipe.checkpoint import checksums, marker, moe
from deepspeed_dualpipe.checkpoint.rendezvous import SaveRendezvous


def _is_committer(engine) -> bool:
    """The rank that renames the staging directory and writes ``latest``: global rank 0, or each node's
    local rank 0 when every node writes to its own storage."""
    if engine.use_node_local_storage():
        return engine.local_rank == 0
    return engine.global_rank == 0


def prepare_save_dir(save_dir: str, tag: str) -> None:
    """Make ``save_dir`` and clear what interrupted earlier saves left behind: saves are sequential, so any
    staging directory there now belongs to a save that never committed."""
    os.makedirs(save_dir, exist_ok=True)
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if name.startswith(REPLACED_PREFIX) and os.path.isdir(path):
            final = os.path.join(save_dir, name[len(REPLACED_PREFIX):])
            if os.path.isdir(final):
                shutil.rmtree(path)  # a replacement that finished, all but its clean-up
            else:
                os.rename(path, final)  # a replacement interrupted between its two renames: restore the old one
        elif name.startswith(STAGING_PREFIX) and os.path.isdir(path):
            shutil.rmtree(path)
    os.makedirs(staging_dir(save_dir, tag))


@contextmanager
def _universal_checkpoint_info(module, client_state: dict):
    """Megatron-DeepSpeed's universal-checkpoint metadata through DeepSpeed 0.19.8's MoE save. DeepSpeed reads
    ``module.universal_checkpoint_info`` as a dict and refuses that key in ``client_state``; Megatron's
    ``GPTModelPipe`` defines a method of that name and passes the dict in ``client_state``, so DeepSpeed's own
    save fails either way. For the save, the dict becomes the module attribute DeepSpeed writes under that key,
    and leaves ``client_state``: the file holds the same entry. Yields the ``client_state`` to pass."""
    key = "universal_checkpoint_info"
    attribute = getattr(module, key, None)
    if key not in client_state and not callable(attribute):
        yield client_state
        return
    client_state = dict(client_state)
    info = client_state.pop(key, None)
    if info is None:
        info = attribute()
    shadowed = key in vars(module)
    previous = vars(module).get(key)
    object.__setattr__(module, key, info)
    try:
        yield client_state
    finally:
        if shadowed:
            object.__setattr__(module, key, previous)
        else:
            del vars(module)[key]


def _hashing_save(checkpoint_engine):
    """A ``save(state_dict, path)`` that writes like DeepSpeed's torch checkpoint engine and returns the file's
    checksum, computed from the bytes as they pass (None: another checkpoint engine; checked after writing)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    save = checkpoint_engine.save
    if type(checkpoint_engine) is not TorchCheckpointEngine or "save" in vars(checkpoint_engine):
        return lambda state_dict, path: (save(state_dict, path), None)[1]

    def save_and_hash(state_dict, path):
        import torch
        with open(path, "wb") as f:
            writer = checksums.HashingWriter(f)
            torch.save(state_dict, writer, _use_new_zipfile_serialization=checkpoint_engine.zipfile_serialization)
        return writer.digest()

    return save_and_hash


def _write_files(engine, save_dir, staging_tag, client_state, exclude_frozen_parameters):
    """This rank's part of DeepSpeed's ``save_checkpoint``, into ``save_dir/staging_tag``, flushed to disk, with
    a checksum of each file (``.dualpipe-checksums-<rank>.json``, merged into the manifest by the commit)."""
    from deepspeed.runtime.checkpoint_engine import CheckpointCommitInfo

    checkpoint_engine, written = engine.checkpoint_engine, {}
    patched_before = "save" in vars(checkpoint_engine)
    save, layout = checkpoint_engine.save, layout_of(engine)
    hashing_save = _hashing_save(checkpoint_engine)

    def recording_save(state_dict, path, *args, **kwargs):
        if args or kwargs:  # a checkpoint engine of another signature: DeepSpeed's save, checked after writing
            result, digest = save(marker.mark(state_dict, layout), path, *args, **kwargs), None
        else:
            result, digest = None, hashing_save(marker.mark(state_dict, layout), path)
        written[path] = digest
        return result

    checkpoint_engine.save = recording_save
    try:
        if engine._optimizer_has_ckpt_event_prologue():
            engine.optimizer.checkpoint_event_prologue()
        info = CheckpointCommitInfo(tag=staging_tag, save_dir=save_dir, save_latest=False)
        checkpoint_engine.create(info)
        engine._create_checkpoint_file(save_dir, staging_tag, False)
        if engine.has_moe_layers:
            engine.save_non_zero_checkpoint = False  # as DeepSpeed: the MoE path writes the non-expert file itself
            with _universal_checkpoint_info(engine.module, client_state) as state:
                engine._save_moe_checkpoint(save_dir,
                                            staging_tag,
                                            client_state=state,
                                            exclude_frozen_parameters=exclude_frozen_parameters)
            moe.write_map(engine, os.path.join(save_dir, staging_tag))  # expert files, readable by any placement
        else:
            engine._save_checkpoint(save_dir,
                                    staging_tag,
                                    client_state=client_state,
                                    exclude_frozen_parameters=exclude_frozen_parameters)
        if engine.save_zero_checkpoint:
            engine._create_zero_checkpoint_files(save_dir, staging_tag)
            engine._save_zero_checkpoint(save_dir, staging_tag)
        if engine._optimizer_has_ckpt_event_epilogue():
            engine.optimizer.checkpoint_event_epilogue()
        checkpoint_engine.commit(info)
    finally:
        if patched_before:
            checkpoint_engine.save = save
        else:
            del checkpoint_engine.save
    for path in written:
        fsync_file(path)
    staging = os.path.join(save_dir, staging_tag)
    sums = {os.path.relpath(path, staging): digest for path, digest in written.items() if digest is not None}
    with open(os.path.join(staging, f"{CHECKSUMS_PREFIX}{engine.global_rank}.json"), "w") as f:
        json.dump(sums, f)
        f.flush()
        os.fsync(f.fileno())
    return list(written)


def _checksums(staging: str, files) -> dict:
    """Every file's checksum: as its writer recorded it, else (a file written another way) read now."""
    recorded = {}
    for name in os.listdir(staging):
        if name.startswith(CHECKSUMS_PREFIX):
            with open(os.path.join(staging, name)) as f:
                recorded.update(json.load(f))
            os.remove(os.path.join(staging, name))
    return {name: recorded.get(name) or checksums.of_file(os.path.join(staging, name)) for name in files}


def _commit(engine, save_dir: str, tag: str, save_latest: bool) -> None:
    """Add the manifest, rename the staging directory to ``tag``, then point ``latest`` at it."""
    staging, final, replaced = staging_dir(save_dir, tag), os.path.join(save_dir, tag), replaced_dir(save_dir, tag)
    files = manifest_files(staging)
    manifest = {
        "format": FORMAT_VERSION,
        "tag": tag,
        "layout": layout_of(engine),
        "files": files,
        "checksums": _checksums(staging, files)
    }
    with open(os.path.join(staging, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(staging)
    if os.path.exists(final):  # saving a tag again: swap the new one in (the old one is removed after the save)
        os.rename(final, replaced)
        os.rename(staging, final)
    else:
        os.rename(staging, final)
    fsync_dir(save_dir)
    if save_latest:
        write_latest(save_dir, tag)


def save_checkpoint(engine,
                    save_dir,
                    tag=None,
                    client_state=None,
                    save_latest=True,
                    exclude_frozen_parameters=False,
                    timeout_s=None):
    """``engine.save_checkpoint(...)`` (same arguments, same files), atomic: see the module's docstring.

    Every rank must call it. ``timeout_s`` (default ``dualpipe.p2p_timeout_s`` of a ``DualPipeEngine``, else
    300 s) is how long a rank may show no sign of life before the others give up with
    :class:`CheckpointError`. Returns True, as DeepSpeed's does.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    if not save_dir:
        raise ValueError(f"save_dir must be a non-empty string, got {save_dir!r}")
    if timeout_s is None:
        timeout_s = getattr(getattr(engine, "dualpipe", None), "p2p_timeout_s", DEFAULT_TIMEOUT_S)
    client_state = {} if client_state is None else client_state
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    if engine.checkpoint_engine.is_decoupled() or engine.zero_nvme_offload_optimizer():
        logger.warning("deepspeed_dualpipe: this checkpoint engine writes asynchronously (or offloads to NVMe); the "
                       "save is DeepSpeed's own and is not atomic")
        return DeepSpeedEngine.save_checkpoint(engine, save_dir, tag, client_state, save_latest,
                                               exclude_frozen_parameters)

    with SaveRendezvous(engine, save_dir, tag, timeout_s) as rendezvous:
        committer = _is_committer(engine)
        try:
            check_tag(tag)
            if committer:
                prepare_save_dir(save_dir, tag)
            rendezvous.agree_on_tag()
        except BaseException as error:
            rendezvous.report_failure(error)
            raise
        rendezvous.barrier("start", "join the save")
        try:
            rendezvous.check_tag()
            _write_files(engine, save_dir, STAGING_PREFIX + tag, client_state, exclude_frozen_parameters)
        except BaseException as error:
            rendezvous.report_failure(error)
            raise
        rendezvous.barrier("written", "finish writing its files")
        if committer:
            try:
                _commit(engine, save_dir, tag, save_latest)
            except BaseException as error:
                rendezvous.report_failure(error)
                raise
        rendezvous.barrier("committed", "commit the checkpoint (global rank 0 renames it into place)")
    if committer:  # a tag saved again: its previous version, out of the way since the commit
        shutil.rmtree(replaced_dir(save_dir, tag), ignore_errors=True)
    if engine.global_rank == 0:
        logger.info(f"deepspeed_dualpipe: saved checkpoint {os.path.join(save_dir, tag)}")
    return True
