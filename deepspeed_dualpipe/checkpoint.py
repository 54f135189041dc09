"""Checkpoints that are never half-written, and loads that say what they cannot do.

DeepSpeed's ``save_checkpoint`` writes straight into ``save_dir/tag`` and rank 0 rewrites
``latest`` as soon as its own files are written, so a rank that dies in the middle of a save
leaves a half-written ``tag`` that ``latest`` may already name; its barriers also wait forever for
a dead rank. :func:`save_checkpoint` writes the same files (DeepSpeed's layout: one
``layer_XX-model_states.pt`` per layer, one ``mp_rank_XX_model_states.pt`` per pipeline rank, ZeRO
files when ZeRO is on) in three phases:

1. every rank writes into a staging directory ``save_dir/.dualpipe-partial-<tag>`` and flushes
   its files to disk (``fsync``);
2. once every rank has written, one rank adds ``dualpipe_checkpoint.json`` (the pipeline layout
   and a manifest of the files with their sizes), renames the staging directory to
   ``save_dir/<tag>`` and only then replaces ``latest`` (written to a temporary file and renamed
   over it, ``os.replace``);
3. every rank waits for that commit before it returns.

A checkpoint is therefore either complete under its tag or absent; ``latest`` always names a
complete one. The waits do not use DeepSpeed's collectives (a barrier on a dead peer hangs):
they go through the job's rendezvous store (``torch.distributed``'s default store). Each rank
beats a heartbeat while it saves; a rank that shows no sign of life for ``dualpipe.p2p_timeout_s``
(it died, or never called ``save_checkpoint``) makes every other rank raise
:class:`CheckpointError` naming it, and a rank that raises while saving makes the others raise at
once. A slow but living writer is waited for, however long its files take.

:func:`prepare_load` runs before DeepSpeed's ``load_checkpoint``. It resolves ``latest``, explains
a tag that is missing or was never completed, checks the manifest, and refuses to load optimizer
state into a different pipeline placement: the optimizer state is stored per pipeline rank, for
that rank's parameters. Layer files are indexed by global layer, so module weights load under any
schedule and any pipeline depth that can cut the model; optimizer state is not converted.

``DualPipeEngine.save_checkpoint`` / ``load_checkpoint`` call these. For DeepSpeed's own
engines (``1f1b``, ``ds-dualpipev``) call :func:`save_checkpoint` / :func:`load_checkpoint` with
the engine as first argument to get the same guarantees.
"""

import glob
import itertools
import json
import os
import shutil
import threading
import time
from typing import Optional

from deepspeed.utils import logger

STAGING_PREFIX = ".dualpipe-partial-"
REPLACED_PREFIX = ".dualpipe-replaced-"
MANIFEST = "dualpipe_checkpoint.json"
FORMAT_VERSION = 1
DEFAULT_TIMEOUT_S = 300.0

_SAVES = itertools.count()  # per process; every rank saves the same sequence of checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint that could not be saved, or cannot be loaded as asked; the message says why and what to do."""


# ----- names and small file operations -----------------------------------------------------------------------------


def staging_dir(save_dir: str, tag: str) -> str:
    """Where a save of ``tag`` writes before it is committed."""
    return os.path.join(save_dir, STAGING_PREFIX + tag)


def replaced_dir(save_dir: str, tag: str) -> str:
    """Where an existing ``tag`` is moved for the instant in which a new save of the same tag replaces it."""
    return os.path.join(save_dir, REPLACED_PREFIX + tag)


def check_tag(tag) -> str:
    tag = str(tag)
    if not tag or tag in (".", "..") or "/" in tag or os.sep in tag or tag.startswith((STAGING_PREFIX,
                                                                                      REPLACED_PREFIX)):
        raise ValueError(f"checkpoint tag {tag!r} cannot be used: a tag names one directory inside save_dir (no "
                         f"path separators, not '.' or '..', not starting with {STAGING_PREFIX!r} or "
                         f"{REPLACED_PREFIX!r}, which the atomic save uses)")
    return tag


def read_latest(directory: str) -> Optional[str]:
    """The tag that ``directory/latest`` names, or None without one."""
    try:
        with open(os.path.join(directory, "latest")) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not every platform/file system opens directories
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_latest(save_dir: str, tag: str) -> None:
    """Point ``save_dir/latest`` at ``tag`` atomically: a reader sees the old tag or the new one, never a torn file."""
    temporary = os.path.join(save_dir, f".latest.tmp-{os.getpid()}")
    with open(temporary, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(save_dir, "latest"))
    _fsync_dir(save_dir)


def read_manifest(checkpoint_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(checkpoint_dir, MANIFEST)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _manifest_files(directory: str) -> dict:
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory)
            if relative != MANIFEST:
                files[relative] = os.path.getsize(path)
    return dict(sorted(files.items()))


# ----- where parameters live -----------------------------------------------------------------------------------------


def layout_of(engine) -> dict:
    """The placement of the model on ``engine``'s pipeline ranks: what decides which parameters (and so
    which optimizer state) each ``mp_rank_XX`` file holds."""
    module = engine.module
    schedule, kind = getattr(module, "schedule", None), getattr(module, "layout_kind", None)
    if schedule is None:
        try:
            from deepspeed.runtime.pipe.dualpipev import DualPipeVModule
        except ImportError:  # pragma: no cover - DeepSpeed without its DualPipeV
            DualPipeVModule = ()
        schedule, kind = ("ds-dualpipev", "ds-v") if isinstance(module, DualPipeVModule) else ("1f1b", "linear")
    grid = engine.grid
    return {"schedule": schedule, "layout": kind, "pipe_parallel_size": int(engine.num_stages),
            "tensor_parallel_size": int(grid.get_slice_parallel_world_size()),
            "data_parallel_size": int(grid.get_data_parallel_world_size()),
            "stage_boundaries": [int(p) for p in module.parts], "num_layers": int(module._num_layers)}


def _describe_layout(layout: dict) -> str:
    text = f"schedule {layout['schedule']} on {layout['pipe_parallel_size']} pipeline ranks"
    if layout.get("stage_boundaries") is not None:
        text += f" (stages start at layers {layout['stage_boundaries'][:-1]})"
    return text


def _same_placement(saved: dict, mine: dict) -> bool:
    keys = ["layout", "pipe_parallel_size", "tensor_parallel_size"]
    if saved.get("stage_boundaries") is not None:
        keys.append("stage_boundaries")
    return all(saved.get(k) == mine.get(k) for k in keys)


# ----- the rendezvous: waits that end ------------------------------------------------------------------------------


class _SaveRendezvous:
    """Barriers of one save through the job's rendezvous store, with heartbeats, never through collectives."""

    def __init__(self, engine, save_dir, tag, timeout_s):
        import torch.distributed as tdist
        from torch.distributed import distributed_c10d
        self.engine, self.save_dir, self.tag, self.timeout = engine, save_dir, tag, float(timeout_s)
        self.rank, self.world = tdist.get_rank(), tdist.get_world_size()
        base = distributed_c10d._get_default_store()
        prefix = f"dualpipe_checkpoint/{next(_SAVES)}/"
        self.store = tdist.PrefixStore(prefix, base)
        try:
            beat_store = tdist.PrefixStore(prefix, base.clone())  # its own connection for the heartbeat thread
        except Exception:  # noqa: BLE001 - a store without clone(): share the connection (it is locked)
            beat_store = self.store
        self._beat_store, self._stop = beat_store, threading.Event()
        self._beat_interval = max(0.05, min(1.0, self.timeout / 8))
        self._seen = {}  # rank -> (last heartbeat count, time.monotonic() it changed)
        self._thread = threading.Thread(target=self._beat, name="dualpipe-checkpoint-heartbeat", daemon=True)

    def __enter__(self):
        self._store_op(lambda: self.store.add(f"beat/{self.rank}", 1))
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        return False

    def _beat(self):
        while not self._stop.wait(self._beat_interval):
            try:
                self._beat_store.add(f"beat/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store is gone: the main thread reports it
                return

    # -- messages ------------------------------------------------------------------------------
    def who(self) -> str:
        stage = getattr(self.engine, "stage_id", None)
        return f"global rank {self.rank}" + (f" (pipeline rank {stage})" if stage is not None else "")

    def not_saved(self, reason: str) -> CheckpointError:
        latest = read_latest(self.save_dir)
        previous = (f"'latest' still names {latest!r}, which is complete and loads" if latest is not None else
                    "there is no 'latest' file in it")
        return CheckpointError(f"{self.who()}: checkpoint {self.tag!r} in {self.save_dir} was not saved: {reason}. "
                               f"Nothing was committed: {previous}. Partial files may remain in "
                               f"{staging_dir(self.save_dir, self.tag)}; the next save_checkpoint removes them.")

    def report_failure(self, error: BaseException) -> None:
        """Tell the other ranks this one failed, so they stop waiting for it at once."""
        self._report(f"global rank {self.rank} raised {type(error).__name__}: {error}; the other ranks stopped "
                     f"waiting for it")

    def _report(self, reason: str) -> None:
        try:
            self.store.set("failed", reason)
        except Exception:  # noqa: BLE001 - the store is gone too: the others time out on our heartbeat
            pass

    # -- waiting ------------------------------------------------------------------------------
    def _store_op(self, op):
        try:
            return op()
        except CheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - the store's host (global rank 0 or the launcher) is gone
            raise self.not_saved(f"the rendezvous store of the job failed ({type(error).__name__}: {error}); its "
                                 f"host, usually global rank 0 or the launcher, probably died") from error

    def _stale_ranks(self):
        """Ranks whose heartbeat has not moved for the timeout. Rank 0 watches every rank (and tells the
        others); the others watch rank 0, which hosts the commit."""
        now, stale = time.monotonic(), []
        for r in (range(self.world) if self.rank == 0 else [0]):
            count = int(self.store.add(f"beat/{r}", 0))  # 0 until that rank's first beat; never blocks
            last = self._seen.get(r)
            if last is None or last[0] != count:
                self._seen[r] = (count, now)  # alive (or first looked at) now
            if now - self._seen[r][1] > self.timeout:
                stale.append((r, count))
        return stale

    def barrier(self, phase: str, what: str) -> None:
        """Wait until every rank has reached ``phase``; ``what`` is what the others wait for ("finish writing")."""
        self._store_op(lambda: self.store.add(f"{phase}/arrived", 1))
        pause, next_look = 0.005, 0.0
        while True:
            arrived = int(self._store_op(lambda: self.store.add(f"{phase}/arrived", 0)))
            if arrived >= self.world:
                return
            if self._store_op(lambda: self.store.check(["failed"])):
                raise self.not_saved(self._store_op(lambda: self.store.get("failed")).decode())
            stale = None
            if time.monotonic() >= next_look:  # heartbeats move once per interval: look no more often
                stale, next_look = self._store_op(self._stale_ranks), time.monotonic() + self._beat_interval
            if stale:
                names = ", ".join(f"global rank {r}" + ("" if count else " (it never started the save)")
                                  for r, count in stale)
                reason = (f"{names} showed no sign of life for {self.timeout:g} s (dualpipe.p2p_timeout_s) while "
                          f"{arrived} of {self.world} ranks waited for every rank to {what}; it probably died (check "
                          f"its log for the first error), is stuck, or did not call save_checkpoint")
                if self.rank == 0:
                    self._report(reason + " (noticed by global rank 0)")
                raise self.not_saved(reason)
            time.sleep(pause)
            pause = min(pause * 1.5, 0.25)

    # -- tag ------------------------------------------------------------------------------------
    def agree_on_tag(self) -> None:
        if self.rank == 0:
            self._store_op(lambda: self.store.set("tag", self.tag))

    def check_tag(self) -> None:
        first = self._store_op(lambda: self.store.get("tag")).decode()
        if first != self.tag:
            raise ValueError(f"save_checkpoint was called with tag {self.tag!r} on global rank {self.rank} but "
                             f"{first!r} on global rank 0; every rank must pass the same tag")


# ----- saving ------------------------------------------------------------------------------------------------------


def _is_committer(engine) -> bool:
    """The rank that renames the staging directory and writes ``latest``: global rank 0, or each node's
    local rank 0 when every node writes to its own storage."""
    if engine.use_node_local_storage():
        return engine.local_rank == 0
    return engine.global_rank == 0


def _prepare(save_dir: str, tag: str) -> None:
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


def _write_files(engine, save_dir, staging_tag, client_state, exclude_frozen_parameters):
    """This rank's part of DeepSpeed's ``save_checkpoint``, into ``save_dir/staging_tag``, flushed to disk."""
    from deepspeed.runtime.checkpoint_engine import CheckpointCommitInfo

    checkpoint_engine, written = engine.checkpoint_engine, []
    patched_before = "save" in vars(checkpoint_engine)
    save = checkpoint_engine.save

    def recording_save(state_dict, path, *args, **kwargs):
        result = save(state_dict, path, *args, **kwargs)
        written.append(path)
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
            engine._save_moe_checkpoint(save_dir, staging_tag, client_state=client_state,
                                        exclude_frozen_parameters=exclude_frozen_parameters)
        else:
            engine._save_checkpoint(save_dir, staging_tag, client_state=client_state,
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
        _fsync_file(path)
    return written


def _commit(engine, save_dir: str, tag: str, save_latest: bool) -> None:
    """Add the manifest, rename the staging directory to ``tag``, then point ``latest`` at it."""
    staging, final, replaced = staging_dir(save_dir, tag), os.path.join(save_dir, tag), replaced_dir(save_dir, tag)
    manifest = {"format": FORMAT_VERSION, "tag": tag, "layout": layout_of(engine), "files": _manifest_files(staging)}
    with open(os.path.join(staging, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(staging)
    if os.path.exists(final):  # saving a tag again: swap the new one in (the old one is removed after the save)
        os.rename(final, replaced)
        os.rename(staging, final)
    else:
        os.rename(staging, final)
    _fsync_dir(save_dir)
    if save_latest:
        write_latest(save_dir, tag)


def save_checkpoint(engine, save_dir, tag=None, client_state=None, save_latest=True, exclude_frozen_parameters=False,
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

    with _SaveRendezvous(engine, save_dir, tag, timeout_s) as rendezvous:
        committer = _is_committer(engine)
        try:
            check_tag(tag)
            if committer:
                _prepare(save_dir, tag)
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


# ----- loading -----------------------------------------------------------------------------------------------------


def _missing_tag(load_dir: str, tag: str) -> CheckpointError:
    latest = read_latest(load_dir)
    hint = f"; 'latest' names {latest!r}" if latest is not None else ""
    if os.path.isdir(staging_dir(load_dir, tag)):
        return CheckpointError(f"checkpoint {tag!r} in {load_dir} was never completed: its save was interrupted "
                               f"(its partial files are in {staging_dir(load_dir, tag)}). Load the last complete "
                               f"checkpoint instead (tag=None loads the one 'latest' names{hint})")
    available = sorted(d for d in os.listdir(load_dir) if os.path.isdir(os.path.join(load_dir, d))
                       and not d.startswith(".")) if os.path.isdir(load_dir) else []
    where = f"the checkpoints there are {available}" if available else "there is no checkpoint there"
    return CheckpointError(f"no checkpoint {tag!r} in {load_dir}: {where}{hint}")


def prepare_load(engine, load_dir, tag=None, load_optimizer_states=True, load_module_only=False) -> Optional[str]:
    """Checks to run before DeepSpeed's ``load_checkpoint``; returns the tag to load (None: no ``latest``,
    which DeepSpeed reports as it always has). Raises :class:`CheckpointError` when the checkpoint is missing,
    incomplete, or its optimizer state cannot be loaded into ``engine``'s pipeline placement. Every rank
    reaches the same verdict (it reads the same files), so none is left waiting in a collective."""
    if tag is None:
        tag = read_latest(load_dir)
        if tag is None:
            return None
    tag = str(tag)
    path = os.path.join(load_dir, tag)
    if not os.path.isdir(path):
        replaced = replaced_dir(load_dir, tag)
        if not os.path.isdir(replaced):
            raise _missing_tag(load_dir, tag)
        logger.warning(f"deepspeed_dualpipe: {path} is being replaced by a save (or one was interrupted while "
                       f"replacing it); loading the previous version from {replaced}")
        tag, path = os.path.basename(replaced), replaced
    manifest = read_manifest(path)
    if manifest is not None:
        wrong = [f"{name} ({'missing' if not os.path.exists(os.path.join(path, name)) else 'size changed'})"
                 for name, size in manifest["files"].items()
                 if not os.path.exists(os.path.join(path, name)) or os.path.getsize(os.path.join(path, name)) != size]
        if wrong:
            raise CheckpointError(f"checkpoint {path} is damaged: {', '.join(wrong[:5])}"
                                  f"{' and more' if len(wrong) > 5 else ''} differ from the manifest {MANIFEST} "
                                  f"written when it was saved; load another checkpoint")
    rank_files = glob.glob(os.path.join(path, "*mp_rank_*_model_states.pt"))
    if not rank_files:
        raise CheckpointError(f"{path} has no mp_rank_XX_model_states.pt files: it is not a complete DeepSpeed "
                              f"checkpoint")
    if load_optimizer_states and not load_module_only and engine.optimizer is not None:
        mine = layout_of(engine)
        if manifest is not None:
            saved, source = manifest["layout"], ""
        else:  # written by DeepSpeed's own save: its 1F1B placement, one mp_rank file per pipeline x tensor rank
            tensor = mine["tensor_parallel_size"]
            saved = {"schedule": "1f1b (DeepSpeed's save, assumed)", "layout": "linear",
                     "pipe_parallel_size": len(rank_files) // tensor, "tensor_parallel_size": tensor}
            source = ", as far as its files tell"
        if not _same_placement(saved, mine):
            raise CheckpointError(
                f"checkpoint {path} was written by {_describe_layout(saved)}{source}; this engine runs "
                f"{_describe_layout(mine)}. Its optimizer state is stored per pipeline rank, for the parameters "
                f"that rank held, and is not converted to another placement. Pass load_optimizer_states=False to "
                f"load the module weights (every layer, from its layer_XX file), the step counters and the "
                f"learning-rate scheduler only: nothing is lost for an optimizer without per-parameter state "
                f"(SGD without momentum); Adam's moments or SGD's momentum restart from zero. Or resume with the "
                f"schedule placement and pipeline depth it was saved with.")
    return tag


def load_checkpoint(engine, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                    load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
    """``engine.load_checkpoint(...)`` after :func:`prepare_load`'s checks, for any pipeline engine. Runs under
    ``torch.no_grad()``: DeepSpeed's ``PipelineModule`` broadcasts tied weights into parameters as it loads, which
    autograd would otherwise record."""
    import torch
    kwargs = dict(load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
                  load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
                  custom_load_fn=custom_load_fn)
    from deepspeed_dualpipe.engine import DualPipeEngine
    with torch.no_grad():
        if isinstance(engine, DualPipeEngine):  # its load_checkpoint runs the checks itself
            return engine.load_checkpoint(load_dir, tag, **kwargs)
        tag = prepare_load(engine, load_dir, tag, load_optimizer_states, load_module_only)
        return engine.load_checkpoint(load_dir, tag, **kwargs)


__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "prepare_load", "layout_of", "read_latest",
           "write_latest", "staging_dir", "MANIFEST"]
