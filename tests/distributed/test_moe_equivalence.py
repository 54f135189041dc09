"""An MoE transformer trains under the plugin's schedules to the numbers of a single process.

Model: embedding, a dense block, five blocks of attention + DualPipeMoE (top-2 of 4 experts, a
shared expert, token dropping, aux loss) and a tied head. Two pipeline ranks per stage carry
the same stage for two data-parallel replicas, and their experts are split between them
(expert parallelism 2 inside data parallelism 2): every MoE block's dispatch and combine are
real all-to-alls between the replicas. Under every schedule of the registry, and under dualpipe, dualpipev and
interleaved-1f1b-overlap with the all-to-alls of
the overlapped pairs interleaved with the other micro-batch's compute (``overlap_moe_a2a``) and
without, and with a planted serialisation of the interleaving ("serialised", tests/helpers/serialised.py), the
per-step losses and every parameter after 3 SGD steps equal one process running
the whole model (all 4 experts, no all-to-all) on the same global batches, to 1e-6 relative;
and so they do with selected islands recomputed in the backward (``dualpipe.recompute_islands``).
"""

import functools
import re

import pytest

from tests.helpers import harness
from tests.helpers import models

P, DP, EP, MBS, STEPS, SEED = 2, 2, 2, 2, 3, 0
NUM_EXPERTS = 4

CLIP = 0.5  # small enough that every step clips


def ds_config(schedule, overlap, P):
    return {
        "train_micro_batch_size_per_gpu": MBS,
        "gradient_accumulation_steps": 2 * P,
        "steps_per_print": 10**9,
        "gradient_clipping": CLIP if overlap == "clipped" else 0.0,
        "pipeline": {
            "schedule": schedule
        },
        "dualpipe": {
            "overlap_moe_a2a": overlap is not False,
            "recompute_islands": RECOMPUTED if overlap == "recompute" else []
        }
    }


# Islands recomputed in the backward for the "recompute" runs: every kind the model has, the dense block too.
RECOMPUTED = ["attention+gate", "shared_expert", "block", "decode+residual"]


def _global_expert_names(named, ep_rank):
    """Local expert ``i`` of expert-parallel rank ``e`` is global expert ``e * (E / EP) + i``."""
    local = NUM_EXPERTS // EP

    def rename(name):
        return re.sub(r"deepspeed_experts\.(\d+)\.", lambda m: f"deepspeed_experts.{ep_rank * local + int(m[1])}.",
                      name)

    return {rename(n): v for n, v in named.items()}


def _train(P, runs):
    """Runs in every rank: each (schedule, overlap) in turn, expert names made global."""
    import deepspeed_dualpipe
    from deepspeed.utils import groups
    from deepspeed_dualpipe.runtime.autograd import steps
    from deepspeed_dualpipe.runtime.overlap import hidden_all_to_alls
    from tests.helpers.serialised import serialised_interleave

    batches = harness.make_batches(SEED, STEPS, DP, 2 * P, MBS)
    results = {}
    interleave = steps.interleave
    for schedule, overlap in runs:
        engines = []

        def initialize(**kwargs):
            engine, *rest = deepspeed_dualpipe.initialize(**kwargs)
            engine.phase_events = []  # the plugin's engine records the phases of its overlapped pairs
            engines.append(engine)
            return (engine, *rest)

        steps.interleave = serialised_interleave if overlap == "serialised" else interleave  # the planted defect
        try:
            result = harness.train_pipeline(initialize, ds_config(schedule, overlap, P),
                                            functools.partial(models.moe_specs, ep_size=EP), P, STEPS, batches)
        finally:
            steps.interleave = interleave
        events = engines[0].phase_events
        result["hidden_all_to_alls"] = len(hidden_all_to_alls(events))
        result["recorded_all_to_alls"] = sum(not label.endswith(":compute") for label, _, _ in events)
        ep_rank = groups._get_expert_parallel_rank(f"ep_size_{EP}")
        for key in ("initial_params", "params"):
            result[key] = _global_expert_names(result[key], ep_rank)
        results[schedule, overlap] = result
    return results


@functools.lru_cache(maxsize=None)
def _launch(P, runs):
    return harness.run_distributed(_train, P * DP, P, runs, timeout=600)


def _reference(P, results, clip=0.0):
    from deepspeed_dualpipe.moe import aux_loss_scale
    batches = harness.make_batches(SEED, STEPS, DP, 2 * P, MBS)
    # The reference's loss is the mean over DP x M micro-batches; the aux losses weigh the same.
    with aux_loss_scale(1.0 / (DP * 2 * P)):
        return harness.train_reference(functools.partial(models.moe_specs, ep_size=1),
                                       harness.initial_params_from(results),
                                       batches,
                                       STEPS,
                                       clip=clip)


RUNS_P2 = (("dualpipe", True), ("dualpipe", False), ("dualpipe", "serialised"), ("dualpipev", True),
           ("dualpipev", False), ("interleaved-1f1b-overlap", True), ("interleaved-1f1b-overlap", False),
           ("1f1b", True), ("zb1p", True), ("interleaved-1f1b", True), ("zbv", True), ("ds-dualpipev", True),
           ("dualpipe", "clipped"), ("1f1b", "clipped"), ("dualpipe", "recompute"), ("dualpipev", "recompute"))
DEEPSPEED_CLIPS_DIFFERENTLY = pytest.mark.xfail(
    strict=True,
    reason=(
        "DeepSpeed 0.19.8's own 1F1B engine clips by a gradient norm that differs from one process's for this model "
        "(tied embedding and expert-parallel MoE): a baseline's quirk, recorded here so a fix upstream is noticed"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "schedule, overlap",
    [pytest.param(*run, marks=DEEPSPEED_CLIPS_DIFFERENTLY) if run == ("1f1b", "clipped") else run for run in RUNS_P2])
def test_moe_model_with_expert_parallelism_matches_one_process_at_P2(schedule, overlap):
    """overlap "clipped": overlap on and gradient clipping that clips every step (the norm spans
    the experts of both expert-parallel ranks); "recompute": overlap on, and the islands in
    ``RECOMPUTED`` run their forward again in the backward (``dualpipe.recompute_islands``)."""
    results = [r[schedule, overlap] for r in _launch(2, RUNS_P2)]
    reference = _reference(2, results, clip=CLIP if overlap == "clipped" else 0.0)
    harness.compare(results, reference)
    assert reference["losses"][0] != reference["losses"][-1]


@pytest.mark.slow
def test_in_overlapped_pairs_an_all_to_all_of_one_micro_batch_completes_while_the_other_computes():
    """Measured by runtime/overlap.py from each all-to-all's completion (the backend's callback), not from when
    the engine waited for it. Overlap off, and an engine that interleaves the two micro-batches' steps but waits
    for each all-to-all before handing over (planted), record the same all-to-alls and hide none.

    dualpipev and interleaved-1f1b-overlap are counted over all ranks: at P=2 some of their pairs join the dense
    first chunk (one compute step, no all-to-all) with an MoE chunk, so little of that rank's traffic can complete
    under the other micro-batch."""
    ranks = _launch(2, RUNS_P2)
    for rank in ranks:
        hidden = {run: rank[run]["hidden_all_to_alls"] for run in RUNS_P2 if run[0] != "1f1b"}
        recorded = {run: rank[run]["recorded_all_to_alls"] for run in hidden}
        assert recorded[("dualpipe", True)] == recorded[("dualpipe", False)] == recorded[("dualpipe",
                                                                                          "serialised")] > 0
        assert hidden[("dualpipe", True)] > 0, hidden
        assert hidden[("dualpipe", False)] == hidden[("dualpipev", False)] == 0, hidden
        assert hidden[("interleaved-1f1b-overlap", False)] == 0, hidden
        assert hidden[("dualpipe", "serialised")] == 0, hidden
    for schedule in ("dualpipev", "interleaved-1f1b-overlap"):
        assert sum(rank[schedule, True]["hidden_all_to_alls"] for rank in ranks) > 0, schedule


RUNS_P4 = (("dualpipe", True), ("dualpipev", False), ("interleaved-1f1b-overlap", True))


@pytest.mark.slow
@pytest.mark.parametrize("schedule, overlap", RUNS_P4)
def test_moe_model_with_expert_parallelism_matches_one_process_at_P4(schedule, overlap):
    results = [r[schedule, overlap] for r in _launch(4, RUNS_P4)]
    harness.compare(results, _reference(4, results))
