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

from deepspeed_dualpipe.checkpoint.files import (MANIFEST, CheckpointError, check_tag, layout_of, read_latest,
                                                 read_manifest, replaced_dir, staging_dir, write_latest)
from deepspeed_dualpipe.checkpoint.load import load_checkpoint, prepare_load
from deepspeed_dualpipe.checkpoint.save import prepare_save_dir, save_checkpoint

__all__ = [
    "CheckpointError", "save_checkpoint", "prepare_save_dir", "load_checkpoint", "prepare_load", "read_latest",
    "write_latest", "read_manifest", "check_tag", "staging_dir", "replaced_dir", "layout_of", "MANIFEST"
]
