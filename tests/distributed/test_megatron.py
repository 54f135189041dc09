"""The real client: Megatron-DeepSpeed's GPT-MoE pretraining (``pretrain_gpt.py``, ``GPTModelPipe``), unchanged
but for the CPU-enabling patch and the plugin's one-line patch (patches/megatron/), switched to the plugin's
schedules by the DeepSpeed config alone. 4 CPU ranks: pipeline 2 x data 2, expert-parallel 2; 4 layers, 2 of
them MoE (4 experts, top-2); Megatron's own optimizer (Adam with its param groups) and training loop.

DeepSpeed's own 1F1B is the control. Every plugin schedule must train to its losses ("lm loss" and "moe loss"
reported as Megatron reports them) to rounding, from the same initial weights, with and without activation
checkpointing; Megatron's linear layers run their backward once per forward; a checkpoint saved under one
schedule resumes under another; a bad combination is refused naming the flag.
"""

import functools

import pytest

from tests.helpers import megatron
from tests.helpers.a2a_probe import a2a_probe

PLUGIN = ("zb1p", "dualpipe", "dualpipev")
RTOL = 2e-6  # Megatron prints 7 significant digits


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tree, data = megatron.prepare(tmp_path_factory.mktemp("megatron"))
    runs = tmp_path_factory.mktemp("runs")

    @functools.lru_cache(maxsize=None)
    def run(schedule, checkpoint_activations=False, iters=20, extra_args=(), pipeline=None, env=()):
        name = f"{schedule}{'-ckpt' if checkpoint_activations else ''}-{abs(hash((iters, extra_args, pipeline, env)))}"
        result = megatron.run(tree,
                              data,
                              runs / name,
                              schedule,
                              iters,
                              dict(pipeline or ()),
                              extra_args,
                              checkpoint_activations,
                              env=dict(env))
        return result

    run.dir = runs
    return run


def _trained(result, iters=20):
    assert result["returncode"] == 0 and len(result["iterations"]) == iters, megatron.tail(result)
    return result["iterations"]


def _same(got, want):
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
    _same(resumed["iterations"], _trained(job("1f1b"))[5:10])  # iterations 6..10 as if never interrupted


@pytest.mark.slow
def test_a_checkpoint_saved_under_dualpipe_loads_its_weights_under_dualpipev(job):
    # Another placement: the optimizer state is per pipeline rank and not converted, so Megatron loads the
    # weights only (--finetune: fresh optimizer, iteration 0). Loaded under dualpipe itself (the control) and
    # under dualpipev, the same weights must train to the same losses; a wrong expert or layer would not.
    directory = _checkpoint(job, "dualpipe")
    runs = {s: job(s, extra_args=("--load", directory, "--finetune", "--exit-interval", "3")) for s in PLUGIN[1:]}
    for result in runs.values():
        assert result["returncode"] == 0 and len(result["iterations"]) == 3, megatron.tail(result)
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
