"""Checkpoints: DeepSpeed's layer-file layout, loadable across schedules, resume exactly."""

import functools
import os

import pytest
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
            "files": files
        }
    return results


PAIRS = (("dualpipe", "1f1b"), ("1f1b", "dualpipe"), ("dualpipev", "zb1p"), ("zb1p", "dualpipev"),
         ("dualpipe", "dualpipe"), ("dualpipev", "dualpipev"), ("ds-dualpipev", "dualpipev"), ("dualpipe",
                                                                                               "ds-dualpipev"))


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
