"""fp16 under the plugin's schedules: DeepSpeed's loss scaling, overflow skips and gradient clipping.

What the engine does with fp16 (see ``DualPipeEngine._scale_loss`` and ``_take_model_step``): the
loss stage multiplies ``loss / M`` by the optimizer's current loss scale, so every gradient, here and
on every rank upstream, is scaled; mirror, tied and data-parallel reductions sum those scaled fp16
gradients as DeepSpeed's own reductions do; DeepSpeed's fp16 optimizer (``FP16_UnfusedOptimizer`` at
ZeRO stage 0, ``DeepSpeedZeroOptimizer`` at stage 1) unscales, clips, checks for inf/nan over the
whole pipeline, skips the step and updates the scale.

**How fp16 runs on CPU here.** DeepSpeed's CPU accelerator reports fp16 as unsupported unless oneDNN
has native fp16 kernels (``torch.ops.mkldnn._is_mkldnn_fp16_supported()``, false on this machine),
and ``deepspeed.initialize`` then refuses it ("Type fp16 is not supported on your device"). torch
itself computes float16 on CPU (slowly, which does not matter at this size). The ranks of this test,
and nothing else, replace ``CPU_Accelerator.is_fp16_supported`` with ``True`` before building
engines (:func:`tests.helpers.fp16.enable_fp16_on_cpu`). Nothing else is patched: DeepSpeed's engine, its fp16 and ZeRO
optimizers, loss scalers and overflow checks run unchanged. Overflows come from the gradients
themselves: a huge loss scale, or an inf that the test writes into one gradient on one rank (by
wrapping that engine's ``allreduce_gradients``, :func:`_inject_inf`); the loss scaler is never touched.

**The DeepSpeed baseline.** DeepSpeed 0.19.8's ``engine.backward`` does not scale the loss at ZeRO
stage 0 (there is no fp16 branch before its ``loss.backward()``, yet ``FP16_UnfusedOptimizer.step``
divides by the scale, so its own 1F1B at ZeRO 0 updates by gradient / scale; reported upstream as
deepspeedai/DeepSpeed PR #8393). Its 1F1B at ZeRO stage 1 scales the loss, so that is the baseline
the losses are compared with ("1f1b-zero1", same initial weights through ``seed_layers``). Its ZeRO-0
1F1B serves where only the bookkeeping is compared ("1f1b-inject": steps, skipped steps, samples,
loss scales, the norm reported for a skipped step).

**DeepSpeed's step, as the reference models it.** Both ``FP16_UnfusedOptimizer`` and ZeRO update the
loss scale before they unscale, so a step that doubles the scale applies half its update; the fp32
reference does the same (:func:`_reference`), and skips the steps that overflowed.

**Tolerances.** fp16 stores weights with 11 significant bits (half an ulp: 2**-12 ~ 2.4e-4
relative), and each update comes from fp16 activations and gradients: measured, it is 1-2 % off the
fp32 update in norm. Weights and losses are compared at 1e-3 + 1e-2 * |value| (the absolute part for
values that start at 0, LayerNorm biases); after 3 steps (7 in the huge-scale run) the largest
difference uses 16 % of that. The steps move weights by over 30 times the absolute part, and an
unapplied loss scale fails the comparison (tested). Against DeepSpeed's fp16 1F1B, losses agree to
2e-3 (schedules sum fp16 gradients in different orders; DeepSpeed also sums the batch loss in fp16).
Gradient norms, which a double-counted copy of a parameter would put off by up to sqrt(2), agree
with the fp32 norms to 1e-2.
"""

import functools

import numpy as np
import pytest
import torch

from tests.helpers import harness
from tests.helpers import models
from tests.helpers.fp16 import enable_fp16_on_cpu

P, MBS, SEED = 2, 2, 0
M = 2 * P  # micro-batches: the least every schedule accepts
CLIP = 0.05  # small enough that every step clips
STATIC = {"fp16": {"enabled": True, "loss_scale": 1024.0}}
ZERO1 = {"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}
# Dynamic scaling, as DeepSpeed's config spells it: 2**10 to start, doubled after 2 good steps.
# hysteresis 1: halve at the first overflow (ZeRO's scaler would otherwise wait for a second one).
DYNAMIC = {
    "fp16": {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 10,
        "loss_scale_window": 2,
        "hysteresis": 1,
        "min_loss_scale": 1
    }
}
# 2**20: overflows until the scale is 2**15 (see the test), then trains.
HUGE = {"fp16": {**DYNAMIC["fp16"], "initial_scale_power": 20, "loss_scale_window": 1000}}
INJECT_AT = 1  # the step whose gradients get an inf on global rank 0 only

# name -> (schedule, config keys, steps, inject an inf at INJECT_AT)
RUNS = {
    "1f1b-zero1": ("1f1b", {
        **STATIC,
        **ZERO1
    }, 3, False),  # DeepSpeed's own engine: the baseline
    "dualpipe": ("dualpipe", STATIC, 3, False),
    "dualpipev": ("dualpipev", STATIC, 3, False),
    "zb1p": ("zb1p", STATIC, 3, False),
    "dualpipe-zero1": ("dualpipe", {
        **STATIC,
        **ZERO1
    }, 3, False),
    "dualpipev-zero1": ("dualpipev", {
        **STATIC,
        **ZERO1
    }, 3, False),
    "dualpipe-clipped": ("dualpipe", {
        **STATIC, "gradient_clipping": CLIP
    }, 3, False),
    "dualpipev-clipped": ("dualpipev", {
        **STATIC, "gradient_clipping": CLIP
    }, 3, False),
    "zb1p-clipped": ("zb1p", {
        **STATIC, "gradient_clipping": CLIP
    }, 3, False),
    "dualpipe-zero1-clipped": ("dualpipe", {
        **STATIC,
        **ZERO1, "gradient_clipping": CLIP
    }, 3, False),
    "1f1b-inject": ("1f1b", DYNAMIC, 5, True),  # DeepSpeed's own engine: the bookkeeping baseline
    "dualpipe-inject": ("dualpipe", DYNAMIC, 5, True),
    "dualpipev-inject": ("dualpipev", DYNAMIC, 5, True),
    "zb1p-inject": ("zb1p", DYNAMIC, 5, True),
    "1f1b-zero1-huge": ("1f1b", {
        **HUGE,
        **ZERO1
    }, 7, False),
    "dualpipe-huge": ("dualpipe", HUGE, 7, False),
}
LAUNCHES = {(P, 1): tuple(RUNS), (P, 2): ("dualpipe", "dualpipe-inject")}


def ds_config(schedule, extra):
    return {
        "train_micro_batch_size_per_gpu": MBS,
        "gradient_accumulation_steps": M,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
        "pipeline": {
            "schedule": schedule
        },
        **extra
    }


# ----- inside the ranks ----------------------------------------------------------------------------------
def _inject_inf(engine):
    """On this rank only, at step INJECT_AT: an inf in one gradient just before the first reduction of the dense
    gradients across ranks, as if one of its layers had overflowed there. That is DeepSpeed's data-parallel
    reduction, or, where it comes first and includes the data-parallel replicas, the plugin's reduction over
    every holder of a mirrored stage (dualpipe)."""
    injected = []

    def poison(grads):
        if engine.global_steps == INJECT_AT and not injected:
            injected.append(True)
            next(g for g in grads if g is not None).view(-1)[0] = float("inf")

    allreduce = engine.allreduce_gradients

    def allreduce_with_inf(*args, **kwargs):
        poison([p.grad for p in engine.module.parameters()])
        return allreduce(*args, **kwargs)

    engine.allreduce_gradients = allreduce_with_inf
    reduce_holders = getattr(engine, "_reduce_buckets", None)  # the plugin's engine only
    if reduce_holders is not None:

        def reduce_holders_with_inf(params, *args, **kwargs):
            poison([engine._gradient(p, create=True) for p in params])
            return reduce_holders(params, *args, **kwargs)

        engine._reduce_buckets = reduce_holders_with_inf


def _train(run, dp):
    import deepspeed.comm as dist
    import deepspeed_dualpipe
    from deepspeed.pipe import PipelineModule
    from deepspeed_dualpipe.runtime.autograd.aux_loss import get_aux_loss_scale

    schedule, extra, steps, inject = RUNS[run]
    batches = harness.make_batches(SEED, steps, dp, M, MBS)
    # seed_layers: every layer is initialised from base_seed + its index, whatever the partitioning,
    # so DeepSpeed's 1F1B and the plugin's schedules start from the same weights.
    with torch.no_grad():
        model = PipelineModule(layers=models.tied_specs(),
                               num_stages=P,
                               loss_fn=models.loss_fn,
                               partition_method="uniform",
                               seed_layers=True)
    engine = deepspeed_dualpipe.initialize(model=model, config=ds_config(schedule, extra), optimizer=harness._sgd)[0]
    assert engine.fp16_enabled() and next(engine.module.parameters()).dtype == torch.float16
    if inject and dist.get_rank() == 0:
        _inject_inf(engine)
    aux_scales = [
    ]  # the MoE aux-loss gradient scale (deepspeed_dualpipe.runtime.autograd.aux_loss) at each training forward
    engine.module.register_forward_pre_hook(lambda module, args: aux_scales.append(get_aux_loss_scale())
                                            if torch.is_grad_enabled() else None)
    dp_rank = engine.grid.get_data_parallel_id()
    out = {
        "rank": dist.get_rank(),
        "stage": engine.stage_id,
        "dp_rank": dp_rank,
        "losses": [],
        "scales": [],
        "skipped": [],
        "global_steps": [],
        "samples": [],
        "norms": [],
        "aux_scales": [],
        "params_by_step": [harness.pipeline_params(engine.module)],
        "optimizer": type(engine.optimizer).__name__
    }
    for step in range(steps):
        out["scales"].append(float(engine._get_optimizer_loss_scale()))  # the scale this step runs with
        out["losses"].append(float(engine.train_batch(iter(batches[step][dp_rank]))))
        out["skipped"].append(engine.skipped_steps)
        out["global_steps"].append(engine.global_steps)
        out["samples"].append(engine.global_samples)
        out["norms"].append(float(engine.get_global_grad_norm() or 0.0))
        out["params_by_step"].append(harness.pipeline_params(engine.module))
        out["aux_scales"].append(sorted(set(aux_scales)))
        aux_scales.clear()
    out["scales"].append(float(engine._get_optimizer_loss_scale()))
    out["initial_params"], out["params"] = out["params_by_step"][0], out["params_by_step"][-1]
    return out


def _train_all(dp, runs):
    enable_fp16_on_cpu()
    return {name: _train(name, dp) for name in runs}


@functools.lru_cache(maxsize=None)
def _launch(P_, dp):
    return harness.run_distributed(_train_all, P_ * dp, dp, LAUNCHES[P_, dp], timeout=600)


def _results(run, dp=1):
    return [per_rank[run] for per_rank in _launch(P, dp)]


# ----- the single-process fp32 reference -----------------------------------------------------------------
def _reference(init, batches, factors, clip=0.0):
    """Plain SGD in fp32 on the global batches (as harness.train_reference), the update of step k
    multiplied by ``factors[k]``; also each step's gradient norm before clipping.

    The factors are what DeepSpeed's fp16 optimizers do to the update: 0 on a skipped step, and
    old scale / new scale on a step that grows the scale (both FP16_UnfusedOptimizer and ZeRO update
    the scale before they unscale, so that step is unscaled by the doubled scale: half the update).
    """
    funcs, named = harness._build_reference(models.tied_specs)
    harness._load(named, init)
    params = list(named.values())
    out = {"losses": [], "norms": [], "params_by_step": []}
    for step, batch in enumerate(batches):
        for p in params:
            p.grad = None
        loss = harness._batch_loss(funcs, batch, models.loss_fn)
        loss.backward()
        out["norms"].append(float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))))
        with torch.no_grad():
            for p in params:
                p.sub_(p.grad, alpha=harness.LR * factors[step])
        out["losses"].append(float(loss.detach()))
        out["params_by_step"].append({n: p.detach().numpy().copy() for n, p in named.items()})
    out["params"] = out["params_by_step"][-1]
    return out


def _update_factors(result):
    """Per step, the fraction of the SGD update DeepSpeed's optimizer applies (see :func:`_reference`),
    from the step's skip count and loss scales. The tests check those separately."""
    skipped, scales = [0] + result["skipped"], result["scales"]
    return [0.0 if skipped[k + 1] > skipped[k] else scales[k] / scales[k + 1] for k in range(len(result["losses"]))]


RTOL, ATOL = 1e-2, 1e-3


def _check_against_reference(run, dp=1):
    results = _results(run, dp)
    _, extra, steps, _ = RUNS[run]
    reference = _reference(harness.initial_params_from(results), harness.make_batches(SEED, steps, dp, M, MBS),
                           _update_factors(results[0]), extra.get("gradient_clipping", 0.0))
    harness.compare(results, reference, rtol=RTOL, atol=ATOL)  # also: copies bit-identical, all ranks agree
    return results, reference


def _moved(results):
    """The largest change of any weight over the run: what the tolerance must be far below."""
    first = results[0]
    return max(float(np.abs(first["params"][n] - first["initial_params"][n]).max()) for n in first["params"])


# ----- (a) static loss scale: the numbers of fp32, and of DeepSpeed's own fp16 1F1B -----------------------
@pytest.mark.slow
@pytest.mark.parametrize("run", ["dualpipe", "dualpipev", "zb1p", "dualpipe-zero1", "dualpipev-zero1", "1f1b-zero1"])
def test_fp16_with_a_static_loss_scale_trains_close_to_the_fp32_single_process(run):
    results, reference = _check_against_reference(run)
    assert all(r["scales"] == [1024.0] * 4 and r["skipped"] == [0, 0, 0] for r in results)
    assert _moved(results) > 30 * ATOL  # the steps move the weights far past the tolerance
    assert reference["losses"][0] > reference["losses"][-1]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["dualpipe", "dualpipev-inject", "dualpipe-zero1"])
def test_the_moe_aux_loss_gradient_scale_includes_the_fp16_loss_scale(run):
    # attach_aux_loss hands each MoE aux loss the gradient coefficient * aux_loss_scale, outside the
    # loss: like the loss, it must be scaled (fp16 loss scale / M), or the optimizer's unscaling
    # would shrink the load-balancing gradient by the loss scale.
    for r in _results(run):
        assert r["aux_scales"] == [[s / M] for s in r["scales"][:-1]], (r["rank"], r["aux_scales"], r["scales"])


@pytest.mark.slow
def test_the_fp16_comparison_fails_when_the_loss_scale_is_not_applied():
    # What DeepSpeed 0.19.8's ZeRO-0 1F1B does: unscaled gradients, divided by the scale at the step.
    results = _results("dualpipe")
    batches = harness.make_batches(SEED, 3, 1, M, MBS)
    unscaled = _reference(harness.initial_params_from(results), batches, [1 / 1024] * 3)
    with pytest.raises(AssertionError, match="losses differ from reference"):
        harness.compare(results, unscaled, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["dualpipe", "dualpipev", "zb1p", "dualpipe-zero1", "dualpipev-zero1"])
def test_fp16_losses_equal_those_of_deepspeeds_own_fp16_1f1b(run):
    ours, theirs = _results(run), _results("1f1b-zero1")
    start = harness.initial_params_from(theirs)
    assert all(np.array_equal(a, start[n]) for n, a in harness.initial_params_from(ours).items())  # same start
    np.testing.assert_allclose(ours[0]["losses"], theirs[0]["losses"], rtol=2e-3)
    for key in ("global_steps", "samples", "skipped", "scales"):
        assert ours[0][key] == theirs[0][key], key


@pytest.mark.slow
def test_fp16_with_data_parallelism_reduces_the_scaled_gradients():
    results, _ = _check_against_reference("dualpipe", dp=2)
    assert sorted((r["stage"], r["dp_rank"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["samples"] == [16, 32, 48] and r["skipped"] == [0, 0, 0] for r in results)


# ----- gradient clipping: the global norm counts every parameter once --------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("run", ["dualpipe-clipped", "dualpipev-clipped", "zb1p-clipped", "dualpipe-zero1-clipped"])
def test_fp16_gradient_clipping_counts_every_parameter_once(run):
    # dualpipe holds every stage twice and zb1p the tied embedding twice: counted twice, the norm
    # would be up to sqrt(2) too large, and every step would clip too much.
    results, reference = _check_against_reference(run)
    assert min(reference["norms"]) > 10 * CLIP  # every step clips
    for r in results:
        # FP16_UnfusedOptimizer reports the norm of the scaled gradients; ZeRO divides the scale out.
        unscale = r["scales"][:-1] if r["optimizer"] == "FP16_UnfusedOptimizer" else [1.0] * len(r["norms"])
        norms = [n / s for n, s in zip(r["norms"], unscale)]
        np.testing.assert_allclose(norms, reference["norms"], rtol=1e-2, err_msg=f"rank {r['rank']}")


# ----- (b) an overflow skips the step on every rank, and training goes on ----------------------------------
def _check_skipped(results, steps):
    """Every rank skipped exactly ``steps``, and left its weights bit-for-bit unchanged by them."""
    for r in results:
        taken = [r["skipped"][k] == (r["skipped"][k - 1] if k else 0) for k in range(len(r["skipped"]))]
        assert [k for k, t in enumerate(taken) if not t] == sorted(steps), (r["rank"], r["skipped"])
        for step in steps:
            before, after = r["params_by_step"][step], r["params_by_step"][step + 1]
            assert all(np.array_equal(before[n], after[n]) for n in before), (r["rank"], step)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["dualpipe-inject", "dualpipev-inject", "zb1p-inject"])
def test_an_inf_on_one_rank_skips_the_step_on_every_rank_as_in_deepspeed(run):
    results, _ = _check_against_reference(run)  # training goes on, to the numbers of fp32
    _check_skipped(results, {INJECT_AT})
    deepspeed = _results("1f1b-inject")  # DeepSpeed's own engine, same injection
    _check_skipped(deepspeed, {INJECT_AT})
    for r in results + deepspeed:
        # halved at the overflow, doubled again after loss_scale_window=2 good steps
        assert r["scales"] == [1024, 1024, 512, 512, 512, 1024], (r["rank"], r["scales"])
        assert r["skipped"] == [0, 1, 1, 1, 1], (r["rank"], r["skipped"])
        assert r["global_steps"] == [1, 2, 3, 4, 5] and r["samples"] == [8, 16, 24, 32, 40], r["rank"]
        assert r["norms"][INJECT_AT] == float("inf"), r["rank"]  # what DeepSpeed reports for a skipped step


@pytest.mark.slow
def test_an_inf_before_the_data_parallel_reduction_skips_the_step_on_every_replica():
    results, _ = _check_against_reference("dualpipe-inject", dp=2)
    _check_skipped(results, {INJECT_AT})
    assert sorted((r["stage"], r["dp_rank"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["scales"] == [1024, 1024, 512, 512, 512, 1024] for r in results)


@pytest.mark.slow
def test_a_huge_initial_loss_scale_overflows_and_halves_until_it_fits_then_trains():
    # The fp16 loss is multiplied by the scale, so its own gradient is the scale, and fp16 ends at
    # 65504: 2**20 .. 2**16 overflow, exactly 5 steps, whatever the model. At 2**15 the largest
    # gradient anywhere is about 2e4, a margin of 3.
    results, _ = _check_against_reference("dualpipe-huge")
    _check_skipped(results, range(5))
    assert results[0]["scales"] == [2.0**(20 - k) for k in range(6)] + [2.0**15] * 2
    assert results[0]["global_steps"] == list(range(1, 8))
    deepspeed = _results("1f1b-zero1-huge")  # DeepSpeed's own fp16 1F1B (ZeRO 1, which scales its loss)
    _check_skipped(deepspeed, range(5))
    assert deepspeed[0]["scales"] == results[0]["scales"]
    np.testing.assert_allclose(results[0]["losses"], deepspeed[0]["losses"], rtol=2e-3)
