"""DualPipe's two copies of every stage stay bit-identical with three data-parallel replicas (6 ranks).

Each stage lives on 2 x DP ranks. Reduced over the mirror pair first and then by DeepSpeed over data
parallelism, the two copies would be summed in different orders (each rank buckets its own chunks in
its own order), and with three or more terms floating-point addition is not associative: the copies
drift. The engine reduces each gradient once over all its holders in one order; the comparison with
one process also checks that every copy of a parameter is bit-identical.
"""

import functools

import pytest

from tests.distributed import test_equivalence as equivalence
from tests.helpers import harness

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
}


def _train(name, batches):
    import deepspeed_dualpipe
    from deepspeed_dualpipe.runtime import gradients
    schedule, extra, pairwise = RUNS[name]
    saved = gradients.ZeROOptimizer
    if pairwise:  # every optimizer counts as ZeRO: the mirror pair is summed alone, DeepSpeed does the rest
        gradients.ZeROOptimizer = object
    try:
        config = equivalence.ds_config(schedule, P, None, **extra)
        return harness.train_pipeline(deepspeed_dualpipe.initialize, config, equivalence.MODELS["tied"], P, STEPS,
                                      batches)
    except ValueError as error:
        return str(error)
    finally:
        gradients.ZeROOptimizer = saved


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
    reference = harness.train_reference(equivalence.MODELS["tied"],
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
def test_zero_with_three_replicas_is_refused_before_step_one_naming_the_key():
    messages = [per_rank["dualpipe-zero1"] for per_rank in _launch()]
    assert all(isinstance(m, str) and "zero_optimization.stage" in m for m in messages), messages
