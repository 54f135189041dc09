"""DualPipe's two copies of every stage stay bit-identical with three data-parallel replicas (6 ranks), experts
included.

Each stage lives on 2 x DP ranks. Reduced over the mirror pair first and then by DeepSpeed over data
parallelism, the two copies would be summed in different orders (each rank buckets its own chunks in
its own order), and with three or more terms floating-point addition is not associative: the copies
drift. The engine reduces each gradient once over all its holders in one order; the comparison with
one process also checks that every copy of a parameter is bit-identical. An MoE model's experts (expert-parallel
1, so each expert is held by 2 x DP ranks) are reduced once over all their copies the same way; reduced over the
mirror pair and then by DeepSpeed over their expert-data-parallel group (planted), they drift.
"""

import contextlib
import functools

import pytest

from tests.helpers import equivalence
from tests.helpers import harness, models

P, DP, STEPS = 2, 3, 4
RUNS = {
    "dualpipe": ("dualpipe", {}, False),
    "dualpipe-clipped": ("dualpipe", {
        "gradient_clipping": equivalence.CLIP
    }, False),
    "dualpipe-pairwise": ("dualpipe", {}, True),  # planted: the old order, mirror pair then data parallelism
    "dualpipe-zero1": ("dualpipe", {
        "zero_optimization": {
            "stage": 1
        },
        "zero_allow_untested_optimizer": True
    }, False),
    "dualpipe-moe": ("dualpipe", {}, False),
    "dualpipe-moe-pairwise": ("dualpipe", {}, "experts"),  # planted: experts over the pair, then DeepSpeed's
}
MOE = functools.partial(models.moe_specs, ep_size=1)


def _pairwise_experts(engine, experts):
    """Planted: the two-stage reduction of experts (the mirror pair alone; DeepSpeed's expert reduction follows)."""
    engine._reduce_buckets(experts, engine.module.mirror_group, 1)
    return False


def _train(name, batches):
    import deepspeed_dualpipe
    from deepspeed_dualpipe.runtime import gradients
    schedule, extra, pairwise = RUNS[name]
    saved, saved_experts = gradients.ZeROOptimizer, gradients.GradientReductions._reduce_expert_copies
    if pairwise is True:  # every optimizer counts as ZeRO: the mirror pair is summed alone, DeepSpeed does the rest
        gradients.ZeROOptimizer = object
    if pairwise == "experts":
        gradients.GradientReductions._reduce_expert_copies = _pairwise_experts
    refusal = []

    def initialize(**kwargs):  # a refusal counts only from here: before the engine exists, before step one
        try:
            return deepspeed_dualpipe.initialize(**kwargs)
        except ValueError as error:
            refusal.append(str(error))
            raise

    try:
        config = equivalence.ds_config(schedule, P, None, **extra)
        specs = MOE if name.startswith("dualpipe-moe") else equivalence.MODELS["tied"]
        return harness.train_pipeline(initialize, config, specs, P, STEPS, batches)
    except ValueError as error:
        return {"refused at initialize": refusal[0]} if refusal else {"failed in a step": str(error)}
    finally:
        gradients.ZeROOptimizer, gradients.GradientReductions._reduce_expert_copies = saved, saved_experts


def _train_all():
    batches = harness.make_batches(equivalence.SEED, STEPS, DP, equivalence.micro_batches(P), equivalence.MBS)
    return {name: _train(name, batches) for name in RUNS}


@functools.lru_cache(maxsize=None)
def _launch():
    return harness.run_distributed(_train_all, P * DP, timeout=1200)


def _compare(name):
    results = [per_rank[name] for per_rank in _launch()]
    batches = harness.make_batches(equivalence.SEED, STEPS, DP, equivalence.micro_batches(P), equivalence.MBS)
    clip = RUNS[name][1].get("gradient_clipping", 0.0)
    from deepspeed_dualpipe.moe import aux_loss_scale
    moe = name.startswith("dualpipe-moe")
    # the reference's loss is the mean over DP x M micro-batches; the aux losses weigh the same
    with aux_loss_scale(1.0 / (DP * equivalence.micro_batches(P))) if moe else contextlib.nullcontext():
        reference = harness.train_reference(MOE if moe else equivalence.MODELS["tied"],
                                            harness.initial_params_from(results),
                                            batches,
                                            STEPS,
                                            clip=clip)
    harness.compare(results, reference)  # also: all 2 x DP copies of every parameter bit-identical
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dualpipe", "dualpipe-clipped"])
def test_six_copies_of_every_stage_stay_bit_identical_and_train_like_one_process(name):
    results = _compare(name)
    assert sorted((r["stage"], r["dp_rank"]) for r in results) == [(s, d) for s in range(P) for d in range(DP)]


@pytest.mark.slow
def test_the_mirror_pair_then_data_parallel_order_lets_the_copies_drift():
    with pytest.raises(AssertionError, match="not bit-identical"):
        _compare("dualpipe-pairwise")


@pytest.mark.slow
def test_six_copies_of_every_expert_stay_bit_identical_and_train_like_one_process():
    results = _compare("dualpipe-moe")
    assert any("deepspeed_experts" in name for r in results for name in r["params"])


@pytest.mark.slow
def test_experts_reduced_over_the_mirror_pair_then_their_data_parallel_group_drift_apart():
    with pytest.raises(AssertionError, match="deepspeed_experts.* not bit-identical"):
        _compare("dualpipe-moe-pairwise")


@pytest.mark.slow
def test_zero_with_three_replicas_is_refused_before_step_one_naming_the_key():
    outcomes = [per_rank["dualpipe-zero1"] for per_rank in _launch()]
    assert all("zero_optimization.stage" in o.get("refused at initialize", "") for o in outcomes), outcomes
