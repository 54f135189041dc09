"""On GPUs, through the real engine with NCCL: the MoE model at P=2 x DP=2 x EP=2 (real all-to-alls inside the
engine) and a dense model in bf16 with ZeRO-1 train to the numbers of one process, and the MoE run's steps after
the first make no host sync (``torch.cuda.set_sync_debug_mode("error")`` around every instruction but DeepSpeed's
optimizer step).

Written for any node of 1 to 8 GPUs without edits: each test takes the GPUs it needs and skips, saying why,
where there are fewer. ``make gpu-check`` runs them and prints the figures recorded here (docs/gpu.md). The
same runs on CPU with gloo are tests/distributed/test_moe_equivalence.py and test_equivalence.py.
"""

import functools

import pytest
import torch

from tests.helpers import harness, models
from tests.helpers.gpu import needs as _needs, on_gpus as _on_gpus

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
]


def _no_host_sync_after_the_first_step(engine):
    """Every later ``train_batch`` runs each instruction but the optimizer step under sync debug mode "error"
    (the first exchanges the activation shapes, a host wait by design)."""
    from deepspeed.runtime.pipe.schedule import OptimizerStep
    from deepspeed_dualpipe.runtime.trace import around_each_instruction
    real, calls = engine.train_batch, []

    def before(kind, kwargs):
        torch.cuda.set_sync_debug_mode("default" if kind is OptimizerStep else "error")

    def train_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            return real(*args, **kwargs)
        with around_each_instruction(engine, before=before, after=lambda k, kw: torch.cuda.set_sync_debug_mode(0)):
            return real(*args, **kwargs)

    engine.train_batch = train_batch


def _moe_rank():
    import deepspeed_dualpipe
    from deepspeed.utils import groups
    from tests.distributed import test_moe_equivalence as eq

    def initialize(**kwargs):
        engine, *rest = deepspeed_dualpipe.initialize(**kwargs)
        _no_host_sync_after_the_first_step(engine)
        return (engine, *rest)

    batches = harness.make_batches(eq.SEED, eq.STEPS, eq.DP, 2 * eq.P, eq.MBS)
    result = harness.train_pipeline(initialize, eq.ds_config("dualpipe", True, eq.P),
                                    functools.partial(models.moe_specs, ep_size=eq.EP), eq.P, eq.STEPS, batches)
    ep_rank = groups._get_expert_parallel_rank(f"ep_size_{eq.EP}")
    for key in ("initial_params", "params"):
        result[key] = eq._global_expert_names(result[key], ep_rank)
    return result


def _max_loss_error(results, reference):
    return max(abs(a - b) / abs(b) for r in results for a, b in zip(r["losses"], reference["losses"]))


@_needs(4)
def test_dualpipe_moe_at_p2_dp2_ep2_on_four_gpus_trains_like_one_process_without_a_host_sync(record_property):
    from tests.distributed import test_moe_equivalence as eq
    results = _on_gpus(eq.P * eq.DP, _moe_rank)
    reference = eq._reference(eq.P, results)
    record_property("ranks (P x DP, EP)", f"{eq.P} x {eq.DP}, {eq.EP}")
    record_property("losses (rank 0 / one process)", f"{results[0]['losses']} / {reference['losses']}")
    record_property("largest relative loss difference", f"{_max_loss_error(results, reference):.2e}")
    harness.compare(results, reference, rtol=1e-4, atol=1e-5)  # CUDA and CPU kernels sum in other orders


def _bf16_zero1_rank(P, dp):
    import deepspeed_dualpipe
    from tests.distributed import test_equivalence as eq
    config = eq.ds_config("dualpipe",
                          P,
                          None,
                          bf16={"enabled": True},
                          zero_optimization={"stage": 1},
                          zero_allow_untested_optimizer=True)
    batches = harness.make_batches(eq.SEED, eq.STEPS, dp, eq.micro_batches(P), eq.MBS)
    return harness.train_pipeline(deepspeed_dualpipe.initialize, config, eq.MODELS["tied"], P, eq.STEPS, batches)


@_needs(2)
def test_bf16_with_zero_stage_1_trains_close_to_the_fp32_single_process(record_property):
    from tests.distributed import test_equivalence as eq
    P, dp = 2, (2 if torch.cuda.device_count() >= 4 else 1)
    results = _on_gpus(P * dp, _bf16_zero1_rank, P, dp)
    batches = harness.make_batches(eq.SEED, eq.STEPS, dp, eq.micro_batches(P), eq.MBS)
    reference = harness.train_reference(eq.MODELS["tied"], harness.initial_params_from(results), batches, eq.STEPS)
    record_property("ranks (P x DP)", f"{P} x {dp}")
    record_property("largest relative loss difference (bf16 vs fp32)", f"{_max_loss_error(results, reference):.2e}")
    harness.compare(results, reference, rtol=3e-2, atol=3e-3)  # bf16's 8-bit mantissa, as the CPU bf16 test
