"""Checkpoints: DeepSpeed's layer-file layout, loadable across schedules, resume exactly; DeepSpeed's own
``engine.load_checkpoint`` (1F1B, DualPipeV) refuses optimizer state of another placement once the plugin is
installed, DeepSpeed's loader without it fails on the plugin's files, and damaged files are refused."""

import functools
import os

import pytest
from deepspeed_dualpipe.checkpoint.guard import deepspeed_load_checkpoint
from tests.helpers import checkpoints, harness
from tests.helpers import models

P, M, MBS = 2, 4, checkpoints.MICRO_BATCH_SIZE
STEPS_BEFORE, STEPS_AFTER = 2, 1


def _save_then_continue(pairs, directory, batches):
    """Runs in every rank: for each (first, second) schedule pair, train under the first, save,
    load into a fresh engine under the second, and train on."""
    import deepspeed.comm as dist
    results = {}
    for first, second in pairs:
        path = os.path.join(directory, f"{first}-to-{second}")
        engine = checkpoints.engine(first, P, M)
        dp = engine.grid.get_data_parallel_id()
        initial = harness.pipeline_params(engine.module)
        losses = [float(engine.train_batch(iter(batches[s][dp]))) for s in range(STEPS_BEFORE)]
        written = []
        save = engine.checkpoint_engine.save
        engine.checkpoint_engine.save = lambda state_dict, path, *a, **k: (written.append(path),
                                                                           save(state_dict, path, *a, **k))[1]
        engine.save_checkpoint(path, tag="step2")
        files = sorted(os.path.basename(f) for f in written if os.path.basename(f).startswith("layer_"))
        resumed = checkpoints.engine(second, P, M)
        # Defaults load the optimizer state: whichever engine's load_checkpoint it is (DeepSpeed's for 1f1b and
        # ds-dualpipev, guarded by the plugin), another placement is refused before anything is loaded.
        refused = harness.outcome(lambda: resumed.load_checkpoint(path, tag="step2"))[:2]
        # DeepSpeed's loader itself (the plugin not installed) must fail on the plugin's chunked files, not load.
        unguarded = harness.outcome(lambda: deepspeed_load_checkpoint()(resumed, path, tag="step2"))[:2] \
            if (first, second) in UNGUARDED else None
        resumed.load_checkpoint(path, tag="step2", load_optimizer_states=False, load_lr_scheduler_states=False)
        losses += [
            float(resumed.train_batch(iter(batches[s][dp]))) for s in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER)
        ]
        results[first, second] = {
            "rank": dist.get_rank(),
            "stage": resumed.stage_id,
            "dp_rank": dp,
            "losses": losses,
            "initial_params": initial,
            "params": harness.pipeline_params(resumed.module),
            "files": files,
            "refused": refused,
            "unguarded": unguarded
        }
    results["damaged"] = _load_damaged(resumed, os.path.join(directory, "dualpipev-to-1f1b"), directory)
    return results


def _load_damaged(engine, path, directory):
    """Runs in every rank: copies of ``path/step2`` with 8 bytes overwritten in place (same size) in a layer
    file, then in an optimizer (mp_rank) file, each loaded with ``engine.load_checkpoint``."""
    import shutil
    import deepspeed.comm as dist
    outcomes = {}
    for name in ("layer_03-model_states.pt", "mp_rank_00_model_states.pt"):
        copy = os.path.join(directory, "damaged-" + name)
        if dist.get_rank() == 0:
            shutil.copytree(path, copy)
            with open(os.path.join(copy, "step2", name), "r+b") as f:
                f.seek(os.path.getsize(f.name) // 2)
                block = f.read(8)
                f.seek(-8, os.SEEK_CUR)
                f.write(bytes(b ^ 0xFF for b in block))
        dist.barrier()
        outcomes[name] = harness.outcome(
            lambda: engine.load_checkpoint(copy, load_optimizer_states=False, load_lr_scheduler_states=False))[:2]
    return outcomes


PAIRS = (("dualpipe", "1f1b"), ("1f1b", "dualpipe"), ("dualpipev", "zb1p"), ("zb1p", "dualpipev"),
         ("dualpipe", "dualpipe"), ("dualpipev", "dualpipev"), ("dualpipev", "1f1b"), ("zb1p", "ds-dualpipev"),
         ("ds-dualpipev", "dualpipev"), ("dualpipe", "ds-dualpipev"))
SAME_PLACEMENT = {("dualpipe", "dualpipe"), ("dualpipev", "dualpipev")}
UNGUARDED = {("dualpipe", "1f1b"), ("dualpipev", "1f1b")}  # chunked optimizer files into DeepSpeed's 1F1B


@functools.lru_cache(maxsize=None)
def _launch(directory):
    batches = harness.make_batches(0, STEPS_BEFORE + STEPS_AFTER, 1, M, MBS)
    return harness.run_distributed(_save_then_continue, P, PAIRS, directory, batches, timeout=300), batches


@pytest.fixture(scope="module")
def launched(checkpoint_dir):
    return _launch(checkpoint_dir)


@pytest.mark.slow
@pytest.mark.parametrize("first, second", PAIRS)
def test_a_checkpoint_written_under_one_schedule_continues_under_another_as_if_uninterrupted(launched, first, second):
    per_rank, batches = launched
    results = [r[first, second] for r in per_rank]
    initial = harness.initial_params_from(results)
    reference = harness.train_reference(models.tied_specs, initial, batches, STEPS_BEFORE + STEPS_AFTER)
    harness.compare(results, reference)


@pytest.mark.slow
def test_checkpoints_use_deepspeeds_layer_files_and_dualpipe_writes_each_stage_once(launched):
    per_rank, _ = launched
    written = {pair: sorted(f for r in per_rank for f in r[pair]["files"]) for pair in PAIRS}  # what each rank wrote
    deepspeed_1f1b = written["1f1b", "dualpipe"]
    # layer 7, the tied head, is a function of the embedding: no file, as in DeepSpeed
    assert [f.split("-")[0] for f in deepspeed_1f1b] == [f"layer_{i:02d}" for i in range(7)]
    for pair, files in written.items():
        assert files == deepspeed_1f1b, (pair, files)  # same files, none written twice (DualPipe: by chunk 0 only)


@pytest.mark.slow
@pytest.mark.parametrize("first, second", PAIRS)
def test_engine_load_checkpoint_refuses_optimizer_state_of_another_placement_whichever_engine_loads(
        launched, first, second):
    per_rank, _ = launched
    for r in per_rank:
        kind, message = r[first, second]["refused"]
        if (first, second) in SAME_PLACEMENT:
            assert kind == "no error", (kind, message)
            continue
        assert kind == "CheckpointError", (first, second, kind, message)
        # DeepSpeed's own DualPipeV engine saves without the plugin's manifest: its placement is told by its files
        written_by = "1f1b (DeepSpeed's save, assumed)" if first == "ds-dualpipev" else first
        assert f"written by schedule {written_by}" in message and f"on {P} pipeline ranks" in message, message
        assert f"this engine runs schedule {second} on {P} pipeline ranks" in message, message
        assert "load_optimizer_states=False" in message and "--finetune" in message, message


@pytest.mark.slow
@pytest.mark.parametrize("first, second", sorted(UNGUARDED))
def test_deepspeeds_loader_without_the_plugin_fails_on_chunked_optimizer_files_instead_of_loading_them(
        launched, first, second):
    per_rank, _ = launched
    for r in per_rank:
        kind, message = r[first, second]["unguarded"]
        # the marker's failure: this tied model's per-rank group sizes would stop it too, models whose sizes
        # match would load another layer's state without it
        assert kind == "KeyError" and "param_groups" in message, (first, second, kind, message)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["layer_03-model_states.pt", "mp_rank_00_model_states.pt"])
def test_a_file_with_8_bytes_overwritten_in_place_is_refused_naming_it(launched, name):
    per_rank, _ = launched
    for r in per_rank:
        kind, message = r["damaged"][name]
        assert kind == "CheckpointError", (kind, message)
        assert name in message and "checksum" in message and "load another checkpoint" in message, message
