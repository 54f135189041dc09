"""The real client: Megatron-DeepSpeed's GPT-MoE pretraining (``pretrain_gpt.py``, ``GPTModelPipe``), unchanged
but for the CPU-enabling patch and the plugin's one-line patch (patches/megatron/), switched to the plugin's
schedules by the DeepSpeed config alone. By default 4 CPU ranks: pipeline 2 x data 2, expert-parallel 2; 4 layers,
2 of them MoE (4 experts, top-2); Megatron's own optimizer (Adam with its param groups) and training loop. Other
layouts (:class:`tests.helpers.megatron.Layout`): tensor parallelism 2 with pipeline 2 (and data 2, expert-parallel
2), pipeline 4, ZeRO-1 with clipping, bf16.

DeepSpeed's own 1F1B is the control. Every plugin schedule must train to its losses ("lm loss" and "moe loss"
reported as Megatron reports them) to rounding, from the same initial weights, with and without activation
checkpointing; Megatron's linear layers run their backward once per forward; a checkpoint saved under one
schedule resumes under another; a bad combination is refused naming the flag. Under tensor parallelism the plugin's
schedules also run in strict mode (NCCL's rules emulated on gloo, collectives included), turned on by the
environment alone, and clip by the true global norm, computed here from every rank's gradients.
"""

import dataclasses
import functools

import pytest

from tests.helpers import megatron
from tests.helpers import megatron_grads as grads
from tests.helpers.a2a_probe import a2a_probe

PLUGIN = ("zb1p", "dualpipe", "dualpipev")
RTOL = 2e-6  # Megatron prints 7 significant digits


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tree, data = megatron.prepare(tmp_path_factory.mktemp("megatron"))
    runs = tmp_path_factory.mktemp("runs")

    @functools.lru_cache(maxsize=None)
    def run(schedule,
            checkpoint_activations=False,
            iters=20,
            extra_args=(),
            pipeline=None,
            env=(),
            layout=megatron.DEFAULT,
            timeout=600):
        name = (f"{layout.name}-{schedule}{'-ckpt' if checkpoint_activations else ''}-"
                f"{abs(hash((iters, extra_args, pipeline, env)))}")
        result = megatron.run(tree,
                              data,
                              runs / name,
                              schedule,
                              iters,
                              dict(pipeline or ()),
                              extra_args,
                              checkpoint_activations,
                              timeout=timeout,
                              env=dict(env),
                              layout=layout)
        return result

    run.dir = runs
    return run


def _trained(result, iters=20):
    assert result["returncode"] == 0 and result["numbers"] == list(range(1, iters + 1)), megatron.tail(result)
    return result["iterations"]


def _same(got, want):
    assert len(got) == len(want), f"{len(got)} iterations logged, {len(want)} wanted"
    for step, (g, w) in enumerate(zip(got, want), start=1):
        for key in ("loss", "lm loss", "moe loss"):
            assert g[key] == pytest.approx(w[key], rel=RTOL), f"iteration {step}, {key}: {g[key]} vs {w[key]}"


@pytest.mark.slow
def test_deepspeeds_1f1b_trains_the_job(job):
    losses = _trained(job("1f1b"))
    assert losses[-1]["lm loss"] < losses[0]["lm loss"] - 1.0, losses


@pytest.mark.slow
@pytest.mark.parametrize("schedule", PLUGIN)
def test_the_unchanged_job_trains_like_1f1b_under_every_plugin_schedule(job, schedule):
    _same(_trained(job(schedule)), _trained(job("1f1b")))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", PLUGIN)
def test_megatrons_linear_runs_its_backward_once_per_forward(job, schedule):
    calls = job(schedule)["calls"]
    assert len(calls) == megatron.WORLD, calls
    for rank in calls:
        assert rank["forward"] > 0 and rank["backward"] == rank["forward"], calls


@pytest.mark.slow
@pytest.mark.parametrize("schedule", PLUGIN)
def test_activation_checkpointing_trains_like_1f1b_without_it(job, schedule):
    # DeepSpeed's own 1F1B fails with checkpointing on for this model: its backward runs once per output
    # tensor, and the reentrant checkpoint of a layer that returns (hidden, moe loss) can run only once.
    _same(_trained(job(schedule, checkpoint_activations=True)), _trained(job("1f1b")))


def _checkpoint(job, schedule):
    """Train 5 iterations of the 20-iteration job under ``schedule`` and save there; returns the directory."""
    directory = job.dir / f"ckpt-{schedule}"
    _trained(job(schedule, extra_args=("--save", str(directory), "--save-interval", "5", "--exit-interval", "5")),
             iters=5)
    return str(directory)


@pytest.mark.slow
def test_a_checkpoint_saved_under_zb1p_resumes_under_deepspeeds_1f1b_exactly(job):
    # Same placement: weights, Adam's moments, the step and the scheduler all carry over.
    resumed = job("1f1b", extra_args=("--load", _checkpoint(job, "zb1p"), "--exit-interval", "10"))
    assert resumed["returncode"] == 0, megatron.tail(resumed)
    assert resumed["numbers"] == list(range(6, 11)), megatron.tail(resumed)  # it went on from iteration 5
    _same(resumed["iterations"], _trained(job("1f1b"))[5:10])  # iterations 6..10 as if never interrupted


@pytest.mark.slow
def test_a_checkpoint_saved_under_dualpipe_loads_its_weights_under_dualpipev(job):
    # Another placement: the optimizer state is per pipeline rank and not converted, so Megatron loads the
    # weights only (--finetune: fresh optimizer, iteration 0). Loaded under dualpipe itself (the control) and
    # under dualpipev, the same weights must train to the same losses; a wrong expert or layer would not.
    directory = _checkpoint(job, "dualpipe")
    runs = {s: job(s, extra_args=("--load", directory, "--finetune", "--exit-interval", "3")) for s in PLUGIN[1:]}
    for result in runs.values():
        assert result["returncode"] == 0 and result["numbers"] == [1, 2, 3], megatron.tail(result)  # --finetune
    _same(runs["dualpipev"]["iterations"], runs["dualpipe"]["iterations"])
    assert runs["dualpipe"]["iterations"][0]["lm loss"] < _trained(job("1f1b"))[0]["lm loss"] - 0.5  # trained weights


@pytest.mark.slow
def test_megatrons_moe_all_to_alls_are_in_flight_while_the_other_micro_batch_of_a_pair_computes(job):
    # Megatron's MoE layers run as phases (integration/megatron_moe.py). When each all-to-all really completed is
    # read from its work handle (tests/helpers/a2a_probe); a planted wait at every launch must show none in flight.
    seen = {}
    for plant in ("", "sync"):
        out = job.dir / f"a2a-{plant or 'overlap'}"
        result = job("dualpipe", iters=2, env=(("A2A_PROBE_OUT", str(out)), ("A2A_PROBE_PLANT", plant)))
        assert result["returncode"] == 0, megatron.tail(result)
        ranks = [a2a_probe.figures(path) for path in sorted(out.glob("rank*.json"))]
        assert len(ranks) == megatron.WORLD and all(r["in_pairs"] > 0 for r in ranks), ranks
        seen[plant] = sum(r["in_flight_when_other_compute_started"] for r in ranks)
    assert seen[""] > 0 and seen["sync"] == 0, seen


@pytest.mark.slow
def test_megatrons_own_zero_bubble_flag_is_refused_under_a_plugin_schedule(job):
    result = job("zb1p", iters=2, extra_args=("--enable-zbh1-pipeline", ))
    assert result["returncode"] != 0
    assert "--enable-zbh1-pipeline cannot be combined with pipeline.schedule='zb1p'" in result["log"], \
        megatron.tail(result)


# ----- tensor parallelism -------------------------------------------------------------------------------------------
# TP 2 x PP 2 on 4 ranks (data 1, so expert-parallel 1) and TP 2 x PP 2 x DP 2 with expert-parallel 2 on 8 ranks.
# The harness adds what Megatron's MoE needs under TP (tests/helpers/megatron.py: --enable-expert-tensor-parallelism,
# pipe_partitioned and grad_partitioned off) and emulates NCCL's flat all-gather on gloo (the probe).
TP2_PP2 = megatron.Layout(tp=2, pp=2, dp=1, ep=1)
TP2_PP2_DP2 = megatron.Layout(tp=2, pp=2, dp=2, ep=2)
TP_ITERS = 6
TP8_ITERS = 4  # 8 ranks on the suite's 2 cores: start-up dominates
# Strict mode from the environment alone, as in any job (integration/strict.py installs it at deepspeed.initialize):
# NCCL's point-to-point rules, and every collective the job issues through torch.distributed (DeepSpeed's
# reductions, Megatron's own tensor-parallel all-reduces) checked for a crossed order across communicators.
STRICT_S = 120  # generous: 4 ranks on 2 shared cores
STRICT = (("DS_DUALPIPE_STRICT_P2P", str(STRICT_S)), )


def _strict(result, layout):
    """``result`` ran under strict mode on every rank and no rank reported a violation."""
    assert result["log"].count("strict mode: rank") == layout.world, megatron.tail(result)
    assert "StrictOrderError" not in result["log"] and "StrictP2PError" not in result["log"], megatron.tail(result)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("schedule", PLUGIN)
def test_under_tensor_parallel_2_x_pipeline_2_every_plugin_schedule_trains_like_1f1b_under_nccls_rules(job, schedule):
    want = _trained(job("1f1b", iters=TP_ITERS, layout=TP2_PP2), TP_ITERS)
    _same(_trained(_strict(job(schedule, iters=TP_ITERS, layout=TP2_PP2, env=STRICT), TP2_PP2), TP_ITERS), want)


@pytest.mark.slow
def test_strict_mode_finds_no_crossed_order_in_deepspeeds_1f1b_and_changes_no_number(job):
    want = _trained(job("1f1b", iters=TP_ITERS, layout=TP2_PP2), TP_ITERS)
    _same(_trained(_strict(job("1f1b", iters=TP_ITERS, layout=TP2_PP2, env=STRICT), TP2_PP2), TP_ITERS), want)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", PLUGIN)
def test_under_tensor_2_x_pipeline_2_x_data_2_with_expert_parallelism_every_plugin_schedule_trains_like_1f1b(
        job, schedule):
    want = _trained(job("1f1b", iters=TP8_ITERS, layout=TP2_PP2_DP2, timeout=1200), TP8_ITERS)
    _same(_trained(job(schedule, iters=TP8_ITERS, layout=TP2_PP2_DP2, timeout=1200), TP8_ITERS), want)


# ----- gradient clipping under tensor parallelism -------------------------------------------------------------------
CLIP_ITERS = 4


def _clipped(job, schedule, layout, timeout=600):
    """Train ``CLIP_ITERS`` iterations with clipping 1.0 and the gradient probe on (tests/helpers/megatron_probe/
    grad_probe.py); returns (result, the probe's directory)."""
    layout = dataclasses.replace(layout, clip=1.0)
    out = job.dir / f"grads-{layout.name}-{schedule}"
    out.mkdir(exist_ok=True)
    env = (("GRAD_PROBE_OUT", str(out)), ("GRAD_PROBE_ITERS", ",".join(str(i) for i in range(1, CLIP_ITERS + 1))))
    result = job(schedule, iters=CLIP_ITERS, layout=layout, env=env, timeout=timeout)
    _trained(result, CLIP_ITERS)
    return result, out


def _check_true_norm_clipping(out, world):
    unused = set()
    for iteration in range(1, CLIP_ITERS + 1):
        records = grads.load(out, iteration)
        assert len(records) == world, f"iteration {iteration}: {len(records)} ranks saved"
        # a linear schedule's last stage holds an unused position embedding (megatron_grads.unused_holders)
        dead = grads.unused_holders(grads.logical(records, "grad"))
        assert {k[0] for k, _ in dead} <= {"tied_modules.embed.position_embeddings.weight"}, dead
        unused |= dead
        copies = grads.logical(records, "grad", leave_out=dead)
        # every copy of a gradient (TP replicas, mirror copies, data-parallel replicas, tied) is the same bits
        assert grads.differing_copies(copies) == [], f"iteration {iteration}"
        assert grads.tp_replicas(copies), "no TP replica to count once"
        applied = grads.applied(records)
        assert all(len(a) == 1 for a in applied) and len({a[0] for a in applied}) == 1, \
            f"iteration {iteration}: each rank must apply one coefficient, the same: {applied}"
        true = grads.coefficient(grads.true_norm(copies), 1.0)
        assert true < 1.0, f"iteration {iteration}: the norm must exceed 1.0 for the check to bite"
        assert applied[0][0] == pytest.approx(true, rel=5e-6), \
            f"iteration {iteration}: applied {applied[0][0]}, true {true} (norm {grads.true_norm(copies)})"
    final = grads.logical(grads.load(out, "final"), "value", leave_out=unused)
    assert grads.differing_copies(final) == [], "copies (TP replicas included) drifted apart in training"
    assert grads.tp_replicas(final), "no TP replica checked"


@pytest.mark.slow
@pytest.mark.parametrize("schedule", PLUGIN)
def test_clipping_under_tensor_parallelism_uses_the_true_global_norm(job, schedule):
    # The coefficient each rank applies (read from the multiply itself) equals the one computed here from every
    # rank's gradients: each TP shard counted (Megatron's own account, from the linear that owns it), each TP
    # replica, mirror copy or data-parallel replica once, every expert of every expert-parallel rank.
    _, out = _clipped(job, schedule, TP2_PP2)
    _check_true_norm_clipping(out, TP2_PP2.world)


@pytest.mark.slow
def test_clipped_plugin_schedules_train_alike_under_tensor_parallelism(job):
    runs = {s: _clipped(job, s, TP2_PP2)[0]["iterations"] for s in PLUGIN}
    for schedule in PLUGIN[1:]:
        _same(runs[schedule], runs[PLUGIN[0]])


@pytest.mark.slow
def test_deepspeeds_1f1b_clips_by_another_norm_under_tensor_parallelism(job):
    # DeepSpeed 0.19.8's clip_grad_norm_ (mpu = the pipeline grid) counts a parameter not marked model-parallel only
    # on the grid's model-parallel rank 0 (pipeline stage 0, TP rank 0) and sums over pipeline x tensor ranks: a later
    # stage's layer norms, biases, gates and final norm, and TP rank 1's expert shards (unmarked, see
    # megatron_grads.tp_shard) are left out, the tied embedding counts on both its stages; the norm is then
    # averaged over data parallelism. Reproduced here from its own gradients; the plugin's schedules do not do this.
    _, out = _clipped(job, "1f1b", TP2_PP2)
    for iteration in range(1, CLIP_ITERS + 1):
        records = grads.load(out, iteration)
        applied = grads.applied(records)
        assert len({a[0] for a in applied}) == 1, applied
        deepspeed = grads.coefficient(grads.deepspeed_norm(records), 1.0)
        copies = grads.logical(records, "grad")
        true = grads.coefficient(grads.true_norm(grads.logical(records, "grad", grads.unused_holders(copies))), 1.0)
        assert applied[0][0] == pytest.approx(deepspeed, rel=1e-6)
        assert applied[0][0] != pytest.approx(true, rel=1e-2), (applied, true)


@pytest.mark.slow
def test_clipping_under_tensor_2_x_pipeline_2_x_data_2_with_expert_parallelism_uses_the_true_global_norm(job):
    _, out = _clipped(job, "dualpipe", TP2_PP2_DP2, timeout=1200)
    _check_true_norm_clipping(out, TP2_PP2_DP2.world)


# ----- other layouts: one plugin schedule each against DeepSpeed's 1F1B ----------------------------------------------
OTHER = {
    "pp4-8layers": (megatron.Layout(pp=4, dp=1, ep=1, layers=8), "dualpipe"),
    # DeepSpeed's ZeRO and bf16 optimizers want the MoE parameters in their own param groups: Megatron's flag
    "pp2-dp2-zero1-clip1": (megatron.Layout(clip=1.0,
                                            config='{"zero_optimization": {"stage": 1}}',
                                            args=("--create-moe-param-group", )), "dualpipe"),
}
BF16 = megatron.Layout(config='{"bf16": {"enabled": true}}', args=("--bf16", "--create-moe-param-group"))
BF16_RTOL = 2e-3  # bf16 keeps 8 significant bits (2**-8 = 0.4%)


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHER)
def test_other_layouts_train_like_1f1b(job, name):
    layout, schedule = OTHER[name]
    _same(_trained(job(schedule, iters=TP_ITERS, layout=layout), TP_ITERS),
          _trained(job("1f1b", iters=TP_ITERS, layout=layout), TP_ITERS))


@pytest.mark.slow
def test_bf16_trains_like_1f1b_to_bf16_rounding(job):
    # Pipeline 2 x data 2 in bf16, under dualpipev. The first iteration (the same weights) matches to fp32
    # rounding. Afterwards any two schedules differ by bf16 rounding (the order in which bf16 gradients are summed:
    # DeepSpeed's 1F1B runs one backward per output tensor, the plugin one for both), zb1p and dualpipe also
    # differ from each other; the lm loss stays within bf16's precision (0.04% apart after 8 iterations). The MoE aux
    # loss (and the total, which includes it) is left out after the first iteration: its top-2 routing flips with
    # such rounding (7% apart after 8 iterations).
    got = _trained(job("dualpipev", iters=TP_ITERS, layout=BF16), TP_ITERS)
    want = _trained(job("1f1b", iters=TP_ITERS, layout=BF16), TP_ITERS)
    _same(got[:1], want[:1])
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert g["lm loss"] == pytest.approx(w["lm loss"], rel=BF16_RTOL), f"iteration {step}: {g} vs {w}"
