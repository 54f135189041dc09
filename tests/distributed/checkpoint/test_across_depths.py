"""Checkpoints across pipeline depths: written with P ranks, continued with another P.

Layer files (``layer_XX-model_states.pt``) are indexed by global layer, so the module weights load
at any depth that can cut the model; the optimizer state lives in the per-pipeline-rank
``mp_rank_XX`` files and is not converted, so loading it into another placement is refused with a
``CheckpointError`` that says to pass ``load_optimizer_states=False`` (nothing is lost with plain SGD).

One launch of 4 ranks. The global batch is the same at every depth: 2 x M micro-batches, split
over 2 data-parallel ranks at P=2 and taken by one at P=4. Each case trains 2 steps at the first
depth, saves, loads at the other depth into a fresh engine and trains 1 more step; losses and
parameters must match one process training the same 3 steps (harness.train_reference, 1e-6).
"""

import functools
import os

import pytest

from tests.helpers import checkpoints, harness, models

# M micro-batches per data-parallel rank at P=2 (DP=2); 2M at P=4 (DP=1)
WORLD, M, MBS = 4, 4, checkpoints.MICRO_BATCH_SIZE
STEPS_BEFORE, STEPS_AFTER = 2, 1
CASES = (("1f1b", 2, "dualpipe", 4), ("dualpipev", 2, "1f1b", 4), ("dualpipe", 4, "dualpipev", 2))


def _train(engine, batch):
    """One step on this rank's share of the global batch (``batch[dp]``: M micro-batches per DP=2 rank)."""
    if engine.grid.get_data_parallel_world_size() == 2:
        share = batch[engine.grid.get_data_parallel_id()]
    else:
        share = batch[0] + batch[1]
    return float(engine.train_batch(iter(share)))


def _outcome(action):
    return harness.outcome(action)[:2]


def _resize(cases, directory, batches):
    """Runs in every rank: for each case, train at the first depth, save, continue at the second."""
    import deepspeed.comm as dist
    from deepspeed_dualpipe import checkpoint
    results = {}
    for first, p_first, second, p_second in cases:
        path = os.path.join(directory, f"{first}{p_first}-to-{second}{p_second}")
        engine = checkpoints.engine(first, p_first, 2 * M // (WORLD // p_first))
        initial = harness.pipeline_params(engine.module)
        losses = [_train(engine, batches[s]) for s in range(STEPS_BEFORE)]
        engine.save_checkpoint(path, tag="step2")  # 1f1b: DeepSpeed's own save
        resumed = checkpoints.engine(second, p_second, 2 * M // (WORLD // p_second))
        # Defaults load the optimizer state: refused, before anything is loaded, on every rank alike.
        refused = _outcome(lambda: checkpoint.load_checkpoint(resumed, path))
        load_path, _ = checkpoint.load_checkpoint(resumed, path, load_optimizer_states=False)  # tag: 'latest'
        steps = resumed.global_steps
        losses += [_train(resumed, batches[s]) for s in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER)]
        # The atomic save, on any engine (1f1b: DeepSpeed's PipelineEngine through the module's function).
        checkpoint.save_checkpoint(resumed, path, tag="step3")
        results[first, p_first, second, p_second] = {
            "rank": dist.get_rank(),
            "stage": resumed.stage_id,
            "losses": losses,
            "initial_params": initial,
            "params": harness.pipeline_params(resumed.module),
            "refused": refused,
            "load_path": load_path,
            "global_steps": steps,
            "manifest": checkpoint.read_manifest(os.path.join(path, "step3")),
            "latest": checkpoint.read_latest(path)
        }
    return results


@functools.lru_cache(maxsize=None)
def _launch(directory):
    batches = harness.make_batches(0, STEPS_BEFORE + STEPS_AFTER, 2, M, MBS)
    return harness.run_distributed(_resize, WORLD, CASES, directory, batches, timeout=240), batches


@pytest.fixture(scope="module")
def launched(checkpoint_dir):
    return _launch(checkpoint_dir)


def _name(case):
    return "{}-P{}-to-{}-P{}".format(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=_name)
def test_a_checkpoint_continues_at_another_pipeline_depth_as_if_uninterrupted(launched, case):
    per_rank, batches = launched
    results = [r[case] for r in per_rank]
    reference = harness.train_reference(models.tied_specs, harness.initial_params_from(results), batches,
                                        STEPS_BEFORE + STEPS_AFTER)
    harness.compare(results, reference)
    for r in results:
        assert os.path.basename(os.path.dirname(r["load_path"])) == "step2", r["load_path"]
        assert r["global_steps"] == STEPS_BEFORE, r["global_steps"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=_name)
def test_optimizer_state_is_refused_at_another_depth_with_an_error_that_says_what_to_do(launched, case):
    per_rank, _ = launched
    first, p_first, second, p_second = case
    for r in per_rank:
        kind, message = r[case]["refused"]
        assert kind == "CheckpointError", (kind, message)
        assert f"on {p_first} pipeline ranks" in message and f"{second} on {p_second} pipeline ranks" in message, \
            message
        assert "load_optimizer_states=False" in message and "not converted" in message, message


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=_name)
def test_the_continued_run_saves_atomically_with_a_manifest_of_its_placement(launched, case):
    per_rank, _ = launched
    _, _, second, p_second = case
    for r in per_rank:
        manifest = r[case]["manifest"]
        assert r[case]["latest"] == "step3"
        assert manifest["tag"] == "step3"
        assert {k: manifest["layout"][k] for k in ("schedule", "pipe_parallel_size", "data_parallel_size")} == \
            {"schedule": second, "pipe_parallel_size": p_second, "data_parallel_size": WORLD // p_second}
        files = sorted(manifest["files"])
        assert files == [f"layer_{i:02d}-model_states.pt" for i in range(7)] + \
            [f"mp_rank_{i:02d}_model_states.pt" for i in range(p_second)], files
