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

Plus checks without processes: ``latest`` is replaced atomically, and a load names what is wrong
with a missing, unfinished or damaged checkpoint, or with optimizer state for another placement.
"""

import functools
import json
import os
import types

import numpy as np
import pytest

import harness
import models
from deepspeed_dualpipe.checkpoint import (MANIFEST, CheckpointError, check_tag, prepare_load, read_latest,
                                           replaced_dir, staging_dir, write_latest, prepare_save_dir)

P, M, MBS = 2, 4, 2
TIMEOUT_S = 4
SLACK_S = 8  # an error may come this much later than the timeout (2 cores, busy machine)


def _engine():
    config = {"train_micro_batch_size_per_gpu": MBS, "gradient_accumulation_steps": M, "steps_per_print": 10**9,
              "gradient_clipping": 0.0, "pipeline": {"schedule": "dualpipe"},
              "dualpipe": {"p2p_timeout_s": TIMEOUT_S}}
    return harness.tied_engine(config, P)


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
    engine = _engine()
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
    return {"initial_params": initial, "saved_params": saved, "losses": losses, "outcomes": outcomes,
            "listing": sorted(os.listdir(directory))}


def _resume(directory, batches):
    """Runs in every rank of a new job: load 'latest', train a step, save again."""
    import deepspeed.comm as dist
    engine = _engine()
    load_path, _ = engine.load_checkpoint(directory)  # no tag: 'latest'; optimizer state too (same placement)
    loaded = harness.pipeline_params(engine.module)
    losses = [float(engine.train_batch(iter(batches[1][0])))]
    engine.save_checkpoint(directory, tag="step2")
    engine.save_checkpoint(directory, tag="step2")  # again: the new one replaces the old one
    return {"rank": dist.get_rank(), "load_path": load_path, "loaded_params": loaded, "losses": losses,
            "params": harness.pipeline_params(engine.module), "listing": sorted(os.listdir(directory)),
            "latest": read_latest(directory)}


def _store_host_dies(directory, batches):
    """Runs in every rank: global rank 0, which hosts the job's rendezvous store and commits, dies mid-save."""
    engine = _engine()
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
    staged = {name: os.path.getsize(os.path.join(staging_dir(directory, "step2"), name))
              for name in os.listdir(staging_dir(directory, "step2"))}
    resumed = harness.run_distributed(_resume, 2, directory, batches, timeout=120)
    return crashed[0], listing_after_crash, staged, resumed, batches


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    return _launch(str(tmp_path_factory.mktemp("atomic")))


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
    results, codes = run_ranks(_store_host_dies, 2, str(tmp_path), harness.make_batches(0, 1, 1, M, MBS), dies=(0, ),
                               timeout=120)
    assert codes == {0: 1}, codes
    kind, message, elapsed = results[1]
    assert kind == "CheckpointError", (kind, message)
    assert message.startswith("global rank 1 (pipeline rank 1): checkpoint 'step2' "), message
    assert "rendezvous store" in message and "global rank 0" in message and "probably died" in message, message
    assert "'latest' still names 'step1'" in message, message
    assert elapsed < TIMEOUT_S + SLACK_S, f"took {elapsed:.1f} s"
    assert read_latest(str(tmp_path)) == "step1" and "step2" not in os.listdir(tmp_path)


# ----- without processes -------------------------------------------------------------------------------------------


def test_latest_is_replaced_atomically_and_leaves_no_temporary_file(tmp_path):
    write_latest(str(tmp_path), "step1")
    write_latest(str(tmp_path), "step2")
    assert read_latest(str(tmp_path)) == "step2"
    assert sorted(os.listdir(tmp_path)) == ["latest"]


def test_tags_that_are_not_one_directory_name_are_refused():
    for tag in ("a/b", "..", "", staging_dir("", "x")):
        with pytest.raises(ValueError, match="cannot be used"):
            check_tag(tag)
    assert check_tag(7) == "7"


def test_the_next_save_undoes_an_interrupted_replacement_and_clears_every_staging_directory(tmp_path):
    old = replaced_dir(str(tmp_path), "step1")
    os.makedirs(old)
    open(os.path.join(old, "layer_00-model_states.pt"), "w").close()
    os.makedirs(staging_dir(str(tmp_path), "step1"))
    os.makedirs(staging_dir(str(tmp_path), "other"))  # debris of another interrupted save
    prepare_save_dir(str(tmp_path), "step2")
    assert os.listdir(tmp_path / "step1") == ["layer_00-model_states.pt"]
    assert sorted(os.listdir(tmp_path)) == sorted(["step1", os.path.basename(staging_dir("", "step2"))])
    assert os.listdir(staging_dir(str(tmp_path), "step2")) == []  # a fresh, empty staging directory


def _fake_engine(schedule="dualpipe", kind="bidirectional", P=4, boundaries=(0, 2, 4, 6, 8)):
    module = types.SimpleNamespace(schedule=schedule, layout_kind=kind, parts=list(boundaries), _num_layers=8)
    grid = types.SimpleNamespace(get_slice_parallel_world_size=lambda: 1, get_data_parallel_world_size=lambda: 1)
    return types.SimpleNamespace(module=module, grid=grid, num_stages=P, optimizer=object())


def _checkpoint(directory, tag="step1", ranks=2, layout=None, files=None):
    path = os.path.join(directory, tag)
    os.makedirs(path)
    for r in range(ranks):
        with open(os.path.join(path, f"mp_rank_{r:02d}_model_states.pt"), "wb") as f:
            f.write(b"x" * (r + 1))
    if layout is not None:
        with open(os.path.join(path, MANIFEST), "w") as f:
            json.dump({"format": 1, "tag": tag, "layout": layout, "files": files or {}}, f)
    write_latest(directory, tag)
    return path


def test_loading_a_tag_whose_save_was_interrupted_says_so_and_names_latest(tmp_path):
    _checkpoint(str(tmp_path))
    os.makedirs(staging_dir(str(tmp_path), "step2"))
    with pytest.raises(CheckpointError, match=r"'step2' .* was never completed: its save was interrupted.*"
                                              r"'latest' names 'step1'"):
        prepare_load(_fake_engine(), str(tmp_path), "step2")
    with pytest.raises(CheckpointError, match=r"no checkpoint 'step3' .* the checkpoints there are \['step1'\]"):
        prepare_load(_fake_engine(), str(tmp_path), "step3")


def test_a_damaged_checkpoint_is_refused_by_its_manifest(tmp_path):
    layout = {"schedule": "dualpipe", "layout": "bidirectional", "pipe_parallel_size": 4, "tensor_parallel_size": 1,
              "stage_boundaries": [0, 2, 4, 6, 8]}
    _checkpoint(str(tmp_path), layout=layout, files={"mp_rank_00_model_states.pt": 1,
                                                      "mp_rank_01_model_states.pt": 5,
                                                      "layer_00-model_states.pt": 3})
    with pytest.raises(CheckpointError, match=r"damaged: mp_rank_01_model_states.pt \(size changed\), "
                                              r"layer_00-model_states.pt \(missing\)"):
        prepare_load(_fake_engine(), str(tmp_path))


def test_optimizer_state_loads_only_into_the_placement_it_was_saved_from(tmp_path):
    layout = {"schedule": "dualpipe", "layout": "bidirectional", "pipe_parallel_size": 4, "tensor_parallel_size": 1,
              "stage_boundaries": [0, 2, 4, 6, 8]}
    _checkpoint(str(tmp_path), ranks=4, layout=layout)
    assert prepare_load(_fake_engine(), str(tmp_path)) == "step1"  # same placement
    other = _fake_engine("dualpipev", "v", 2)
    with pytest.raises(CheckpointError, match="not converted to another placement"):
        prepare_load(other, str(tmp_path))
    assert prepare_load(other, str(tmp_path), load_optimizer_states=False) == "step1"
    assert prepare_load(other, str(tmp_path), load_module_only=True) == "step1"
    # A checkpoint of DeepSpeed's own save (no manifest) is taken as 1F1B at the depth its files tell.
    deepspeed_made = str(tmp_path / "deepspeed")
    _checkpoint(deepspeed_made, ranks=2)
    assert prepare_load(_fake_engine("1f1b", "linear", 2, (0, 4, 8)), deepspeed_made) == "step1"
    with pytest.raises(CheckpointError, match=r"1f1b \(DeepSpeed's save, assumed\) on 2 pipeline ranks"):
        prepare_load(_fake_engine("zb1p", "linear", 4), deepspeed_made)


def test_a_tag_caught_between_the_two_renames_of_its_replacement_loads_its_previous_version(tmp_path):
    os.rename(_checkpoint(str(tmp_path)), replaced_dir(str(tmp_path), "step1"))
    assert prepare_load(_fake_engine(), str(tmp_path), load_optimizer_states=False) == \
        os.path.basename(replaced_dir("", "step1"))
