"""The files of a checkpoint: names, ``latest``, the manifest, the pipeline layout it was saved from."""

import json
import os
from typing import Optional

STAGING_PREFIX = ".dualpipe-partial-"
REPLACED_PREFIX = ".dualpipe-replaced-"
MANIFEST = "dualpipe_checkpoint.json"
CHECKSUMS_PREFIX = ".dualpipe-checksums-"  # one per writing rank in the staging directory, merged into the manifest
FORMAT_VERSION = 1
DEFAULT_TIMEOUT_S = 300.0


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
    if not tag or tag in (".", "..") or "/" in tag or os.sep in tag or tag.startswith(
        (STAGING_PREFIX, REPLACED_PREFIX)):
        raise ValueError(f"checkpoint tag {tag!r} cannot be used: a tag names one directory inside save_dir (no "
                         f"path separators, not '.' or '..', not starting with {STAGING_PREFIX!r} or "
                         f"{REPLACED_PREFIX!r}, which the atomic save uses)")
    return tag


def read_latest(directory: str, strict: bool = False) -> Optional[str]:
    """The tag that ``directory/latest`` names, or None without one. ``strict`` (a load about to use it): a
    ``latest`` that is empty, not text, or names no single directory raises :class:`CheckpointError` naming it."""
    path = os.path.join(directory, "latest")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        tag = None
    if strict:
        fix = (f"write the tag of a complete checkpoint into it (one of the directories in {directory}), "
               f"or pass tag= explicitly")
        if tag is None or "\x00" in tag:
            raise CheckpointError(f"{path} is not text ({len(raw)} bytes that are not a tag): {fix}")
        if not tag:
            raise CheckpointError(f"{path} is empty: {fix}")
        try:
            check_tag(tag)
        except ValueError:
            raise CheckpointError(f"{path} names {tag[:80]!r}, which is not a checkpoint tag: {fix}") from None
    return tag or None


def fsync_dir(path: str) -> None:
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


def fsync_file(path: str) -> None:
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
    fsync_dir(save_dir)


def read_manifest(checkpoint_dir: str) -> Optional[dict]:
    """The manifest of a checkpoint, or None without one (DeepSpeed's own save); a manifest that is not the
    plugin's JSON raises :class:`CheckpointError` naming it."""
    path = os.path.join(checkpoint_dir, MANIFEST)
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is damaged ({type(error).__name__}: {error}): the checkpoint cannot be "
                              f"checked; load another checkpoint, or delete {path} to load it as DeepSpeed would, "
                              f"unchecked") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not isinstance(
            manifest.get("layout"), dict):
        raise CheckpointError(f"{path} is damaged (not a manifest with 'files' and 'layout'): the checkpoint cannot "
                              f"be checked; load another checkpoint, or delete {path} to load it as DeepSpeed would, "
                              f"unchecked")
    return manifest


def manifest_files(directory: str) -> dict:
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory)
            if relative != MANIFEST and not name.startswith(CHECKSUMS_PREFIX):
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
    return {
        "schedule": schedule,
        "layout": kind,
        "pipe_parallel_size": int(engine.num_stages),
        "tensor_parallel_size": int(grid.get_slice_parallel_world_size()),
        "data_parallel_size": int(grid.get_data_parallel_world_size()),
        "stage_boundaries": [int(p) for p in module.parts],
        "num_layers": int(module._num_layers)
    }


def describe_layout(layout: dict) -> str:
    text = f"schedule {layout['schedule']} on {layout['pipe_parallel_size']} pipeline ranks"
    if layout.get("stage_boundaries") is not None:
        text += f" (stages start at layers {layout['stage_boundaries'][:-1]})"
    return text


def same_placement(saved: dict, mine: dict) -> bool:
    keys = ["layout", "pipe_parallel_size", "tensor_parallel_size"]
    if saved.get("stage_boundaries") is not None:
        keys.append("stage_boundaries")
    return all(saved.get(k) == mine.get(k) for k in keys)
