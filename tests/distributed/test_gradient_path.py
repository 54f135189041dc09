"""Deferred weight passes and DeepSpeed's gradient path: nothing is lost, whatever catches the gradients.

torch's ``stage_backward_weight`` adds a W pass's gradients into ``.grad`` by hand, so the hooks
``register_post_accumulate_grad_hook`` installs never fire for them. The configurations that rely on
such hooks train like one process all the same:

* ``bf16.immediate_grad_update: true``: the bf16 optimizer's hooks move each gradient into fp32 as
  autograd accumulates it; after a W the engine does that move itself (the split stays on);
* ZeRO stage 1 with fp16 and ``data_types.grad_accum_dtype: fp32``: ZeRO's hooks must run inside a
  backward, so the engine turns the split off, with a warning naming the keys;
* a hook the user registered: the split is turned off the same way, and the hook fires once per
  micro-batch, as under any plain backward.
"""

import functools

import pytest
import torch

from tests.helpers import equivalence
from tests.helpers.fp16 import enable_fp16_on_cpu
from tests.helpers import harness

P, STEPS = 2, 3
FP16_ZERO1_FP32_ACCUM = {
    "fp16": {
        "enabled": True,
        "loss_scale": 1024.0
    },
    "zero_optimization": {
        "stage": 1
    },
    "zero_allow_untested_optimizer": True,
    "data_types": {
        "grad_accum_dtype": "fp32"
    }
}
BF16_IMMEDIATE = {"bf16": {"enabled": True, "immediate_grad_update": True}}
RUNS = {  # name -> (schedule, config keys, register a counting hook on every parameter)
    **{f"{s}-bf16-immediate": (s, BF16_IMMEDIATE, False)
       for s in ("zb1p", "dualpipe", "dualpipev")},
    **{f"{s}-fp16-zero1-fp32-accum": (s, FP16_ZERO1_FP32_ACCUM, False)
       for s in ("zb1p", "dualpipe")},
    "dualpipe-user-hook": ("dualpipe", {}, True),
    "zb1p-user-hook": ("zb1p", {}, True),
}
TOLERANCE = {"bf16": (3e-2, 3e-3), "fp16": (1e-2, 1e-3), "": (1e-6, harness.ATOL)}  # as the bf16 and fp16 tests


def _train(name):
    import deepspeed_dualpipe
    from deepspeed.utils import logger
    schedule, extra, hook = RUNS[name]
    engines, warnings, calls = [], [], {}

    def initialize(**kwargs):
        out = deepspeed_dualpipe.initialize(**kwargs)
        engine = engines.append(out[0]) or out[0]
        if hook:
            for n, p in engine.module.named_parameters():
                p.register_post_accumulate_grad_hook(lambda p, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
        return out

    logger.warning, warn = (lambda msg, *a, **k: warnings.append(str(msg)) or warn(msg, *a, **k)), logger.warning
    try:
        batches = harness.make_batches(equivalence.SEED, STEPS, 1, equivalence.micro_batches(P), equivalence.MBS)
        config = equivalence.ds_config(schedule, P, None, **extra)
        result = harness.train_pipeline(initialize, config, equivalence.MODELS["tied"], P, STEPS, batches)
    finally:
        logger.warning = warn
    result.update(split=engines[0]._split,
                  calls=sorted(set(calls.values())),
                  warnings=[w for w in warnings if "split_backward is turned off" in w])
    return result


def _train_all(runs):
    enable_fp16_on_cpu()
    return {name: _train(name) for name in runs}


@functools.lru_cache(maxsize=None)
def _launch():
    return harness.run_distributed(_train_all, P, tuple(RUNS), timeout=900)


def _check(name):
    results = [per_rank[name] for per_rank in _launch()]
    batches = harness.make_batches(equivalence.SEED, STEPS, 1, equivalence.micro_batches(P), equivalence.MBS)
    reference = harness.train_reference(equivalence.MODELS["tied"], harness.initial_params_from(results), batches,
                                        STEPS)
    kind = "bf16" if "bf16" in name else "fp16" if "fp16" in name else ""
    rtol, atol = TOLERANCE[kind]
    harness.compare(results, reference, rtol=rtol, atol=atol)
    assert reference["losses"][0] != reference["losses"][-1]
    return results


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["zb1p", "dualpipe", "dualpipev"])
def test_bf16_immediate_grad_update_keeps_the_weight_passes_gradients_and_the_split(schedule):
    results = _check(f"{schedule}-bf16-immediate")
    assert all(r["split"] and not r["warnings"] for r in results)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["zb1p", "dualpipe"])
def test_zero1_fp16_with_fp32_gradient_accumulation_trains_like_one_process_without_the_split(schedule):
    results = _check(f"{schedule}-fp16-zero1-fp32-accum")
    for r in results:
        assert not r["split"], r["rank"]
        assert r["warnings"] and "data_types.grad_accum_dtype" in r["warnings"][0], r["warnings"]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["zb1p", "dualpipe"])
def test_a_users_gradient_hook_fires_once_per_micro_batch_and_turns_the_split_off_loudly(schedule):
    results = _check(f"{schedule}-user-hook")
    for r in results:
        assert not r["split"] and r["warnings"] and "post-accumulate-grad hooks on" in r["warnings"][0], r
        # one call per micro-batch through the parameter's chunk: all M under zb1p; under dualpipe a chunk
        # sees one direction's M/2, the tied embedding and head, held by both chunks of a rank, all M
        M = equivalence.micro_batches(P)
        expected = {STEPS * M} if schedule == "zb1p" else {STEPS * M // 2, STEPS * M}
        assert set(r["calls"]) == expected, (r["rank"], r["calls"])


def test_the_hook_lookup_sees_what_register_post_accumulate_grad_hook_installs():
    from deepspeed_dualpipe.runtime.gradients import _post_accumulate_hooks
    p = torch.nn.Parameter(torch.zeros(2))
    assert not _post_accumulate_hooks(p)
    handle = p.register_post_accumulate_grad_hook(lambda p: None)
    assert list(_post_accumulate_hooks(p)) == [handle.id]
