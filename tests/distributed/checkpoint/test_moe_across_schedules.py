"""MoE checkpoints across schedules: DeepSpeed names expert files by pipeline rank and by the count of MoE layers
on that rank, and under DualPipe a rank holds two chunks. A checkpoint of the MoE model (DualPipeMoE blocks,
expert parallelism 2 inside data parallelism 2, P=2) saved under one schedule continues under another as if
uninterrupted; one without the plugin's expert maps (as DeepSpeed's own save writes it) is refused elsewhere,
with a message that says why and what to do, and still loads where it was saved."""

import functools
import os
import re

import pytest

from tests.helpers import harness, models

P, DP, EP, MBS, SEED = 2, 2, 2, 2, 0
M = 2 * P
STEPS_BEFORE, STEPS_AFTER = 2, 1
NUM_EXPERTS = 4


def _config(schedule):
    return {
        "train_micro_batch_size_per_gpu": MBS,
        "gradient_accumulation_steps": M,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
        "pipeline": {
            "schedule": schedule
        }
    }


def _engine(schedule, seed):
    import torch
    import deepspeed_dualpipe
    from deepspeed.pipe import PipelineModule
    torch.manual_seed(seed)
    with torch.no_grad():  # PipelineModule broadcasts tied weights in place (see harness.train_pipeline)
        model = PipelineModule(layers=models.moe_specs(ep_size=EP),
                               num_stages=P,
                               loss_fn=models.loss_fn,
                               partition_method="uniform")
    return deepspeed_dualpipe.initialize(model=model, config=_config(schedule), optimizer=harness._sgd)[0]


def _params(engine):
    """This rank's parameters under global names (local expert i of expert-parallel rank e is e * 2 + i)."""
    from deepspeed.utils import groups
    ep_rank = groups._get_expert_parallel_rank(f"ep_size_{EP}")
    local = NUM_EXPERTS // EP
    return {
        re.sub(r"deepspeed_experts\.(\d+)\.", lambda m: f"deepspeed_experts.{ep_rank * local + int(m[1])}.", n): v
        for n, v in harness.pipeline_params(engine.module).items()
    }


def _save(engine, path):
    from deepspeed_dualpipe import checkpoint
    checkpoint.save_checkpoint(engine, path, tag="step2")  # the plugin's engine.save_checkpoint does the same


def _load(engine, path, **kwargs):
    from deepspeed_dualpipe import checkpoint
    return checkpoint.load_checkpoint(engine,
                                      path,
                                      tag="step2",
                                      load_optimizer_states=False,
                                      load_lr_scheduler_states=False,
                                      **kwargs)


def _save_then_continue(pairs, directory, batches):
    """Runs in every rank: for each (first, second) pair, train under the first, save, load into a fresh engine
    (other initial weights) under the second, and train on."""
    import deepspeed.comm as dist
    results = {}
    for first, second in pairs:
        path = os.path.join(directory, f"{first}-to-{second}")
        engine = _engine(first, seed=1)
        dp = engine.grid.get_data_parallel_id()
        initial = _params(engine)
        losses = [float(engine.train_batch(iter(batches[s][dp]))) for s in range(STEPS_BEFORE)]
        _save(engine, path)
        resumed = _engine(second, seed=2)
        _load(resumed, path)
        losses += [
            float(resumed.train_batch(iter(batches[s][dp]))) for s in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER)
        ]
        results[first, second] = {
            "rank": dist.get_rank(),
            "stage": resumed.stage_id,
            "dp_rank": dp,
            "losses": losses,
            "initial_params": initial,
            "params": _params(resumed)
        }
    return results


def _without_maps(directory):
    """Runs in every rank: a checkpoint written by DeepSpeed's own save under 1f1b (no manifest, no expert maps);
    loading it under dualpipe is refused, under 1f1b it loads."""
    path = os.path.join(directory, "deepspeed-save")
    engine = _engine("1f1b", seed=1)
    saved = _params(engine)
    engine.save_checkpoint(path, tag="step2")  # DeepSpeed's PipelineEngine.save_checkpoint
    refused = harness.outcome(lambda: _load(_engine("dualpipe", seed=2), path))
    same = _engine("1f1b", seed=2)
    _load(same, path)
    return {"refused": refused[:2], "saved": saved, "loaded": _params(same)}


PAIRS = (("dualpipe", "1f1b"), ("1f1b", "dualpipe"), ("dualpipev", "zb1p"), ("zb1p", "dualpipev"), ("dualpipe",
                                                                                                    "dualpipev"))


@functools.lru_cache(maxsize=None)
def _launch(directory):
    batches = harness.make_batches(SEED, STEPS_BEFORE + STEPS_AFTER, DP, M, MBS)
    return harness.run_distributed(_save_then_continue, P * DP, PAIRS, directory, batches, timeout=600), batches


@pytest.fixture(scope="module")
def launched(checkpoint_dir):
    return _launch(checkpoint_dir)


@pytest.mark.slow
@pytest.mark.parametrize("first, second", PAIRS)
def test_an_moe_checkpoint_written_under_one_schedule_continues_under_another_as_if_uninterrupted(
        launched, first, second):
    from deepspeed_dualpipe.moe import aux_loss_scale
    per_rank, batches = launched
    results = [r[first, second] for r in per_rank]
    with aux_loss_scale(1.0 / (DP * M)):  # the aux losses weigh as the losses do (see test_moe_equivalence.py)
        reference = harness.train_reference(functools.partial(models.moe_specs, ep_size=1),
                                            harness.initial_params_from(results), batches, STEPS_BEFORE + STEPS_AFTER)
    harness.compare(results, reference)


@pytest.mark.slow
def test_an_moe_checkpoint_without_expert_maps_is_refused_elsewhere_and_loads_where_it_was_saved(checkpoint_dir):
    import numpy as np
    per_rank = harness.run_distributed(_without_maps, P * DP, checkpoint_dir, timeout=600)
    for rank in per_rank:
        kind, message = rank["refused"]
        assert kind == "CheckpointError", f"{kind}: {message}"
        assert "MoE checkpoint" in message and "written by schedule 1f1b" in message, message
        assert "this engine runs schedule dualpipe on 2 pipeline ranks" in message, message
        assert "save it again with deepspeed_dualpipe" in message, message
        assert all(np.array_equal(rank["saved"][n], v) for n, v in rank["loaded"].items())
