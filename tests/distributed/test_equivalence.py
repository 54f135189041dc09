"""Every schedule trains to the numbers of a single process (fp32, 1e-6 relative).

For each (P, data-parallel degree), one launch trains the same model with every schedule in
turn (process start-up dominates the runtime on 2 cores): losses per step and every parameter
after 3 SGD steps must equal a single process running the same model on the same global
batches, and all copies of a parameter (data-parallel replicas, DualPipe's mirror copies, tied
embedding and head) must stay bit-identical.
"""

import functools

import pytest

from tests.helpers import harness
from tests.helpers import models

SCHEDULES = [
    "1f1b", "zb1p", "interleaved-1f1b", "interleaved-1f1b-overlap", "zbv", "dualpipe", "dualpipev", "ds-dualpipev"
]
MBS, STEPS, SEED = 2, 3, 0

MODELS = {
    "tied": models.tied_specs,
    "untied": models.untied_specs,
    "tuple": models.tuple_specs,
    "mask": models.mask_specs
}


def micro_batches(P):
    return 2 * P  # the least that every schedule accepts (DualPipe: even, >= 2P)


CLIP = 0.05  # small enough that every step clips


def ds_config(schedule, P, dualpipe=None, **extra):
    config = {
        "train_micro_batch_size_per_gpu": MBS,
        "gradient_accumulation_steps": micro_batches(P),
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19.8 clips at 1.0 by default; the reference is plain SGD
        "pipeline": {
            "schedule": schedule
        },
        **extra,
    }
    if dualpipe:
        config["dualpipe"] = dualpipe
    return config


RUNS = {  # name -> (schedule, model, dualpipe settings, other config keys)
    **{s: (s, "tied", None, {}) for s in SCHEDULES},
    "dualpipe-untied": ("dualpipe", "untied", None, {}),
    "dualpipe-full-backward": ("dualpipe", "tied", {"split_backward": False}, {}),
    "1f1b-untied": ("1f1b", "untied", None, {}),
    "dualpipe-clipped": ("dualpipe", "tied", None, {"gradient_clipping": CLIP}),
    "dualpipev-clipped": ("dualpipev", "tied", None, {"gradient_clipping": CLIP}),
    "zb1p-clipped": ("zb1p", "tied", None, {"gradient_clipping": CLIP}),
    "interleaved-1f1b-clipped": ("interleaved-1f1b", "tied", None, {"gradient_clipping": CLIP}),
    "zbv-clipped": ("zbv", "tied", None, {"gradient_clipping": CLIP}),
    "dualpipe-zero1": ("dualpipe", "tied", None, {"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}),
    "dualpipev-zero1": ("dualpipev", "tied", None, {"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}),
    "interleaved-1f1b-overlap-clipped": ("interleaved-1f1b-overlap", "tied", None, {"gradient_clipping": CLIP}),
    **{f"{s}-zero1": (s, "tied", None, {"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True})
       for s in ("1f1b", "ds-dualpipev")},  # DeepSpeed's own engines, as the status table claims
    **{f"{s}-bf16": (s, "tied", None, {"bf16": {"enabled": True}})
       for s in ("zb1p", "dualpipe", "dualpipev", "1f1b", "ds-dualpipev")},
    **{f"{s}-tuple": (s, "tuple", None, {}) for s in SCHEDULES},
    **{f"{s}-mask": (s, "mask", None, {}) for s in ("zb1p", "dualpipe", "dualpipev")},
}


def _train_all(P, dp, runs):
    """Runs in every rank: each run's schedule through deepspeed_dualpipe.initialize."""
    import deepspeed_dualpipe

    batches = harness.make_batches(SEED, STEPS, dp, micro_batches(P), MBS)
    evals = harness.make_batches(SEED + 1, 2, dp, micro_batches(P), MBS)
    results = {}
    for name in runs:
        schedule, model, settings, extra = RUNS[name]
        results[name] = harness.train_pipeline(deepspeed_dualpipe.initialize,
                                               ds_config(schedule, P, settings, **extra),
                                               MODELS[model],
                                               P,
                                               STEPS,
                                               batches,
                                               eval_batches=evals)
    return results


@functools.lru_cache(maxsize=None)
def _launch(P, dp):
    runs = tuple(RUNS) if (P, dp) == (2, 1) else tuple(SCHEDULES) + EXTRA.get((P, dp), ())
    return harness.run_distributed(_train_all, P * dp, P, dp, runs, timeout=600)


EXTRA = {
    (2, 2): ("dualpipe-clipped", "dualpipe-zero1", "dualpipe-bf16"),
    (4, 1): ("dualpipe-clipped", "dualpipev-clipped")
}

CLIPPED = [(2, 1, f"{s}-clipped") for s in ("dualpipe", "dualpipev", "zb1p", "interleaved-1f1b", "zbv")]
CLIPPED += [(2, 1, "interleaved-1f1b-overlap-clipped"), (2, 2, "dualpipe-clipped"), (4, 1, "dualpipe-clipped"),
            (4, 1, "dualpipev-clipped")]


def _check(P, dp, run, perturb=None, rtol=1e-6, atol=harness.ATOL):
    results = [per_rank[run] for per_rank in _launch(P, dp)]
    init = harness.initial_params_from(results)
    if perturb is not None:
        init = dict(init)
        init[perturb] = init[perturb].copy()
        init[perturb].flat[0] += 1e-3
    batches = harness.make_batches(SEED, STEPS, dp, micro_batches(P), MBS)
    clip = RUNS[run][3].get("gradient_clipping", 0.0)
    reference = harness.train_reference(MODELS[RUNS[run][1]], init, batches, STEPS, clip=clip)
    harness.compare(results, reference, rtol=rtol, atol=atol)
    return results, reference


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("P, dp", [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_schedule_trains_to_the_losses_and_weights_of_a_single_process(P, dp, schedule):
    results, reference = _check(P, dp, schedule)
    assert reference["losses"][0] != reference["losses"][-1]  # training moved
    assert sorted((r["stage"], r["dp_rank"]) for r in results) == [(s, d) for s in range(P) for d in range(dp)]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["dualpipe-untied", "dualpipe-full-backward", "1f1b-untied"])
def test_untied_models_and_the_full_backward_fallback_match_too(run):
    _check(2, 1, run)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("P, dp", [(2, 1), (4, 1), (2, 2)])
def test_eval_batch_returns_the_mean_loss_of_the_trained_model_on_every_rank(P, dp, schedule):
    results = [per_rank[schedule] for per_rank in _launch(P, dp)]
    evals = harness.make_batches(SEED + 1, 2, dp, micro_batches(P), MBS)
    params = {name: value for r in results for name, value in r["params"].items()}
    expected = harness.evaluate_reference(MODELS[RUNS[schedule][1]], params, evals)
    for r in results:
        assert r["eval_losses"] == pytest.approx(expected, rel=1e-6), (r["rank"], r["eval_losses"], expected)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_stages_that_exchange_tuples_with_integer_tensors_train_to_the_same_numbers(schedule):
    _check(2, 1, f"{schedule}-tuple")


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["zb1p", "dualpipe", "dualpipev"])
def test_stages_that_exchange_bool_tensors_train_to_the_same_numbers(schedule):
    _check(2, 1, f"{schedule}-mask")  # NCCL has no bool type: the engine sends their bytes


@pytest.mark.slow
@pytest.mark.parametrize("P, dp, run", CLIPPED)
def test_gradient_clipping_counts_every_parameter_once(P, dp, run):
    _check(P, dp, run)


@pytest.mark.slow
@pytest.mark.parametrize("P, dp, run", [(2, 1, "dualpipe-zero1"), (2, 1, "dualpipev-zero1"), (2, 2, "dualpipe-zero1"),
                                        (2, 1, "1f1b-zero1"), (2, 1, "ds-dualpipev-zero1")])
def test_zero_stage_1_trains_to_the_same_numbers(P, dp, run):
    _check(P, dp, run)


@pytest.mark.slow
@pytest.mark.parametrize("P, dp, run", [(2, 1, "zb1p-bf16"), (2, 1, "dualpipe-bf16"), (2, 1, "dualpipev-bf16"),
                                        (2, 2, "dualpipe-bf16"), (2, 1, "1f1b-bf16"), (2, 1, "ds-dualpipev-bf16")])
def test_bf16_trains_close_to_the_fp32_single_process(P, dp, run):
    # bf16 keeps 8 bits of mantissa: agreement to ~1e-2 is what precision allows. Copies of a
    # parameter must still be bit-identical, and accumulation happens in fp32.
    _check(P, dp, run, rtol=3e-2, atol=3e-3)


@pytest.mark.slow
def test_dualpipe_holds_every_stage_twice_and_the_copies_agree_bit_for_bit():
    results = [per_rank["dualpipe"] for per_rank in _launch(4, 1)]
    holders = {}
    for r in results:
        for name in r["params"]:
            holders.setdefault(name, []).append(r["stage"])
    assert all(len(stages) == 2 for stages in holders.values()), holders  # compare() checks they are equal
    assert sorted(holders["layer2.fc1.weight"]) == [1, 2]  # stage 1 lives on rank 1 (chunk 0) and rank 2 (chunk 1)


@pytest.mark.slow
def test_the_comparison_can_fail():
    name = "layer3.fc1.weight"
    results = [
        dict(r, params=r["initial_params"], losses=[]) for r in (per_rank["1f1b-untied"] for per_rank in _launch(2, 1))
    ]
    init = harness.initial_params_from(results)
    init[name] = init[name].copy()
    init[name].flat[0] += 1e-3
    reference = harness.train_reference(MODELS["untied"], init, [], 0)
    with pytest.raises(AssertionError, match=r"parameter layer3\.fc1\.weight on rank \d+: max diff 1\.000e-03"):
        harness.compare(results, reference)
    with pytest.raises(AssertionError, match=r"losses differ from reference"):
        _check(2, 1, "1f1b-untied", perturb=name)
