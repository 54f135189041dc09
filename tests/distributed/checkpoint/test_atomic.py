"""A checkpoint is never left half-written.

Three launches of 2 ranks (dualpipe, P=2: rank 0 holds every stage, so it can report every weight).

1. Train a step and save ``step1``. Train another, then two saves that fail on rank 1:
   - ``full``: rank 1's second file raises ``OSError`` (a full disk). Rank 0 must fail at once (not
     after the timeout) with a ``CheckpointError`` naming rank 1 and its error.
   - ``step2``: rank 1 writes half of its second file and dies (``os._exit``). Rank 0 must fail
     with a ``CheckpointError`` naming rank 1 within ``dualpipe.p2p_timeout_s`` (no hang).
   Neither may touch ``step1`` or ``latest``.
2. A new job loads ``latest`` (no tag): it must get ``step1``'s weights exactly, train on to match
   one process, and save ``step2`` (twice) over the debris of the interrupted one.
3. Global rank 0, which hosts the job's rendezvous store and renames the checkpoint into place,
   dies mid-save: rank 1 must fail at once naming it.

The checks without processes are in ``tests/unit/test_checkpoint_files.py``.
"""

import functools
import os

import numpy as np
import pytest

from tests.helpers import checkpoints, harness, models
from deepspeed_dualpipe.checkpoint import read_latest, staging_dir

P, M, MBS = 2, 4, checkpoints.MICRO_BATCH_SIZE
TIMEOUT_S = 4
SLACK_S = 8  # an error may come this much later than the timeout (2 cores, busy machine)


def _failing_save(engine, failure):
    """Make this rank's second checkpoint file fail: raise OSError, or write half of it and die."""
    save, calls = engine.checkpoint_engine.save, []

    def second_file_fails(state_dict, path, *args, **kwargs):
        if calls:
            if failure == "raises":
                raise OSError(28, "No space left on device", path)
            with open(path, "wb") as f:
                f.write(b"half a checkpoint file")
            os._exit(1)  # hard death: no clean-up, no error reported
        calls.append(path)
        return save(state_dict, path, *args, **kwargs)

    engine.checkpoint_engine.save = second_file_fails
    return save


def _crash_during_save(directory, batches):
    """Runs in every rank; rank 1 does not return."""
    engine = checkpoints.engine("dualpipe", P, M, TIMEOUT_S)
    initial = harness.pipeline_params(engine.module)
    losses = [float(engine.train_batch(iter(batches[0][0])))]
    engine.save_checkpoint(directory, tag="step1")
    saved = harness.pipeline_params(engine.module)
    losses.append(float(engine.train_batch(iter(batches[1][0]))))
    outcomes = {}
    for tag, failure in (("full", "raises"), ("step2", "dies")):
        original = _failing_save(engine, failure) if engine.global_rank == 1 else None
        outcomes[tag] = harness.outcome(lambda: engine.save_checkpoint(directory, tag=tag))
        if original is not None:
            engine.checkpoint_engine.save = original
        outcomes[tag + " latest"] = read_latest(directory)
    return {
        "initial_params": initial,
        "saved_params": saved,
        "losses": losses,
        "outcomes": outcomes,
        "listing": sorted(os.listdir(directory))
    }


def _resume(directory, batches):
    """Runs in every rank of a new job: load 'latest', train a step, save again."""
    import deepspeed.comm as dist
    engine = checkpoints.engine("dualpipe", P, M, TIMEOUT_S)
    load_path, _ = engine.load_checkpoint(directory)  # no tag: 'latest'; optimizer state too (same placement)
    loaded = harness.pipeline_params(engine.module)
    losses = [float(engine.train_batch(iter(batches[1][0])))]
    engine.save_checkpoint(directory, tag="step2")
    engine.save_checkpoint(directory, tag="step2")  # again: the new one replaces the old one
    return {
        "rank": dist.get_rank(),
        "load_path": load_path,
        "loaded_params": loaded,
        "losses": losses,
        "params": harness.pipeline_params(engine.module),
        "listing": sorted(os.listdir(directory)),
        "latest": read_latest(directory)
    }


def _store_host_dies(directory, batches):
    """Runs in every rank: global rank 0, which hosts the job's rendezvous store and commits, dies mid-save."""
    engine = checkpoints.engine("dualpipe", P, M, TIMEOUT_S)
    engine.train_batch(iter(batches[0][0]))
    engine.save_checkpoint(directory, tag="step1")
    if engine.global_rank == 0:
        _failing_save(engine, "dies")
    return harness.outcome(lambda: engine.save_checkpoint(directory, tag="step2"))


@functools.lru_cache(maxsize=None)
def _launch(directory):
    from deepspeed_dualpipe.testing.launch import run_ranks
    batches = harness.make_batches(0, 2, 1, M, MBS)
    crashed, codes = run_ranks(_crash_during_save, 2, directory, batches, dies=(1, ), timeout=120)
    assert codes == {1: 1}, codes
    listing_after_crash = sorted(os.listdir(directory))
    staged = {
        name: os.path.getsize(os.path.join(staging_dir(directory, "step2"), name))
        for name in os.listdir(staging_dir(directory, "step2"))
    }
    resumed = harness.run_distributed(_resume, 2, directory, batches, timeout=120)
    return crashed[0], listing_after_crash, staged, resumed, batches


@pytest.fixture(scope="module")
def launched(checkpoint_dir):
    return _launch(checkpoint_dir)


def _names_rank_1_and_keeps_step1(message):
    assert message.startswith("global rank 0 (pipeline rank 0): checkpoint "), message
    assert "global rank 1" in message, message
    assert "'latest' still names 'step1'" in message, message


@pytest.mark.slow
def test_a_rank_that_dies_mid_save_makes_the_others_fail_within_the_timeout_naming_it(launched):
    survivor = launched[0]
    kind, message, elapsed = survivor["outcomes"]["step2"]
    assert kind == "CheckpointError", (kind, message)
    _names_rank_1_and_keeps_step1(message)
    assert "'step2'" in message and "showed no sign of life" in message and "p2p_timeout_s" in message, message
    assert TIMEOUT_S - 0.5 <= elapsed < TIMEOUT_S + SLACK_S, f"took {elapsed:.1f} s"


@pytest.mark.slow
def test_a_rank_whose_write_fails_makes_the_others_fail_at_once_with_its_error(launched):
    survivor = launched[0]
    kind, message, elapsed = survivor["outcomes"]["full"]
    assert kind == "CheckpointError", (kind, message)
    _names_rank_1_and_keeps_step1(message)
    assert "global rank 1 raised OSError" in message and "No space left on device" in message, message
    assert elapsed < TIMEOUT_S, f"took {elapsed:.1f} s: the failure was not passed on before the timeout"


@pytest.mark.slow
def test_an_interrupted_save_leaves_the_previous_checkpoint_and_latest_untouched(launched):
    survivor, listing, staged, _, _ = launched
    assert survivor["outcomes"]["full latest"] == "step1" and survivor["outcomes"]["step2 latest"] == "step1"
    assert "step1" in listing and "latest" in listing, listing
    assert "step2" not in listing and "full" not in listing, listing  # never under their own names
    assert os.path.basename(staging_dir("", "step2")) in listing, listing
    assert staged.get("layer_05-model_states.pt") == len(b"half a checkpoint file"), staged  # the torn file


@pytest.mark.slow
def test_the_previous_checkpoint_loads_exactly_and_training_continues_as_if_uninterrupted(launched):
    survivor, _, _, resumed, batches = launched
    saved = survivor["saved_params"]  # rank 0 holds every stage under dualpipe at P=2
    for r in resumed:
        assert os.path.basename(os.path.dirname(r["load_path"])) == "step1", r["load_path"]
        for name, value in r["loaded_params"].items():
            assert np.array_equal(value, saved[name]), name
        assert r["losses"] == survivor["losses"][1:], (r["losses"], survivor["losses"])  # the step it lost
    reference = harness.train_reference(models.tied_specs, saved, batches[1:], 1)
    harness.compare(resumed, reference)


@pytest.mark.slow
def test_the_next_saves_clear_the_debris_of_the_interrupted_one_and_replace_a_tag_saved_twice(launched):
    resumed = launched[3]
    listing = resumed[0]["listing"]
    assert resumed[0]["latest"] == "step2"
    assert "step2" in listing and not [name for name in listing if name.startswith(".")], listing


@pytest.mark.slow
def test_when_the_rank_hosting_the_store_dies_mid_save_the_others_fail_at_once(tmp_path):
    from deepspeed_dualpipe.testing.launch import run_ranks
    results, codes = run_ranks(_store_host_dies,
                               2,
                               str(tmp_path),
                               harness.make_batches(0, 1, 1, M, MBS),
                               dies=(0, ),
                               timeout=120)
    assert codes == {0: 1}, codes
    kind, message, elapsed = results[1]
    assert kind == "CheckpointError", (kind, message)
    assert message.startswith("global rank 1 (pipeline rank 1): checkpoint 'step2' "), message
    assert "rendezvous store" in message and "global rank 0" in message and "probably died" in message, message
    assert "'latest' still names 'step1'" in message, message
    assert elapsed < TIMEOUT_S + SLACK_S, f"took {elapsed:.1f} s"
    assert read_latest(str(tmp_path)) == "step1" and "step2" not in os.listdir(tmp_path)
