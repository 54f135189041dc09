"""Every schedule trains to the numbers of a single process (fp32, 1e-6 relative).

For each (P, data-parallel degree), one launch trains the same model with every schedule in
turn (process start-up dominates the runtime on 2 cores): losses per step and every parameter
after 3 SGD steps must equal a single process running the same model on the same global
batches, and all copies of a parameter (data-parallel replicas, DualPipe's mirror copies, tied
embedding and head) must stay bit-identical. The launches without data parallelism run in strict
mode and serve tests/distributed/test_strict_p2p.py too (tests/helpers/equivalence.py).
"""

import pytest

from tests.helpers import harness
from tests.helpers.equivalence import MBS, MODELS, RUNS, SCHEDULES, SEED, STEPS, micro_batches
from tests.helpers.equivalence import launch as _launch

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
