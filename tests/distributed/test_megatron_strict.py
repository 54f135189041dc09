"""Megatron-DeepSpeed's unchanged GPT-MoE pretraining (tests/helpers/megatron.py) in strict mode, switched on by
the environment alone (``DS_DUALPIPE_STRICT_P2P``: the plugin installs it when the script calls
``deepspeed.initialize``). Point-to-point follows NCCL's rules, and every collective the job issues through
``torch.distributed`` (DeepSpeed's reductions and expert all-to-alls, Megatron's own tensor-parallel all-reduces in
its mappings, at tensor-parallel 2 x pipeline 2) is checked for a crossed order across communicators. DeepSpeed's 1F1B is the control; each schedule
trains to the losses it reaches without strict mode, and no rank reports a violation.
"""

import functools

import pytest

from tests.helpers import megatron

STRICT_S = 120  # generous: 4 ranks on 2 shared cores
ITERS = 4
# tensor-parallel 2 x pipeline 2: Megatron's own TP all-reduces beside the pipeline's p2p and the mirror reduction
LAYOUT = megatron.Layout(tp=2, pp=2, dp=1, ep=1)
SCHEDULES = ("1f1b", "dualpipe", "dualpipev")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tree, data = megatron.prepare(tmp_path_factory.mktemp("megatron"))
    runs = tmp_path_factory.mktemp("runs")

    @functools.lru_cache(maxsize=None)
    def run(schedule, strict):
        env = {"DS_DUALPIPE_STRICT_P2P": str(STRICT_S)} if strict else {}
        return megatron.run(tree, data, runs / f"{schedule}-{strict}", schedule, ITERS, env=env, layout=LAYOUT)

    return run


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_megatron_trains_under_strict_mode_from_the_environment_with_no_violation(job, schedule):
    strict = job(schedule, True)
    assert strict["returncode"] == 0 and len(strict["iterations"]) == ITERS, megatron.tail(strict)
    assert strict["log"].count("strict mode: rank") == LAYOUT.world, megatron.tail(strict)
    assert "StrictOrderError" not in strict["log"] and "StrictP2PError" not in strict["log"]
    plain = job(schedule, False)
    assert plain["returncode"] == 0, megatron.tail(plain)
    assert strict["iterations"] == plain["iterations"]
