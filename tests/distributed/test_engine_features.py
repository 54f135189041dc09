"""DeepSpeed features the plugin's engine honours, or refuses before step 1 naming the key.

* bool tensors between stages travel as their bytes (NCCL has no bool type; trained in test_equivalence and
  under strict mode, which refuses bool tensors as NCCL does);
* ``wall_clock_breakdown``: DeepSpeed's forward, backward, batch-input and pipe timers run;
* ``DualPipeModule.compile()`` compiles the layers of every chunk, not only the active one;
* ``eval_batch(compute_loss=False)`` returns the mean of the loss stages' outputs instead of crashing;
* dynamic shapes (``PipelineModule(dynamic_shape=True)``) and partitioned activations/gradients
  (``pipeline.pipe_partitioned``/``grad_partitioned``) are refused with the key named.
"""

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers import equivalence
from tests.helpers import harness, models

P, STEPS = 2, 3


class _CountingTimers:
    """DeepSpeed's timers, counting which names were started."""

    def __init__(self, timers):
        self.wrapped, self.started = timers, {}

    def __call__(self, name):
        timer, started = self.wrapped(name), self.started
        if not getattr(timer, "counted", False):
            start = timer.start

            def counted_start(*args, **kwargs):
                started[name] = started.get(name, 0) + 1
                return start(*args, **kwargs)

            timer.start, timer.counted = counted_start, True
        return timer

    def __getattr__(self, name):
        return getattr(self.wrapped, name)


def _train(schedule, specs, extra=None, compile_=False, timers=False):
    import deepspeed_dualpipe
    info = {}

    def initialize(**kwargs):
        out = deepspeed_dualpipe.initialize(**kwargs)
        engine = out[0]
        if compile_:
            engine.module.compile(backend="eager")
            info["compiled"] = [
                all(
                    getattr(f, "_compiled_call_impl", None) is not None for f in funcs
                    if isinstance(f, torch.nn.Module)) for funcs in engine.module.chunk_funcs
            ]
        if timers:
            engine.timers = info["timers"] = _CountingTimers(engine.timers)
        info["engine"] = engine
        return out

    batches = harness.make_batches(equivalence.SEED, STEPS, 1, equivalence.micro_batches(P), equivalence.MBS)
    config = equivalence.ds_config(schedule, P, None, **(extra or {}))
    result = harness.train_pipeline(initialize, config, specs, P, STEPS, batches)
    if timers:
        result["timers"] = dict(info["timers"].started)
    if compile_:
        result["compiled"] = info["compiled"]
    engine = info["engine"]
    evals = harness.make_batches(equivalence.SEED + 1, 1, 1, equivalence.micro_batches(P), equivalence.MBS)
    outputs = engine.eval_batch(iter(evals[0][0]), compute_loss=False)
    result["eval_outputs"] = None if outputs is None else outputs.detach().numpy()
    return result


def _refused_dynamic_shape():
    import deepspeed_dualpipe
    from deepspeed.pipe import PipelineModule
    with torch.no_grad():
        model = PipelineModule(layers=models.tied_specs(), num_stages=P, loss_fn=models.loss_fn, dynamic_shape=True)
    return harness.outcome(lambda: deepspeed_dualpipe.initialize(
        model=model, config=equivalence.ds_config("dualpipe", P), optimizer=harness._sgd))[:2]


def _all():
    out = {f"{s}-mask": _train(s, models.mask_specs) for s in ("zb1p", "dualpipe")}
    out["dualpipe-timers"] = _train("dualpipe", models.tied_specs, {"wall_clock_breakdown": True}, timers=True)
    out["dualpipe-compiled"] = _train("dualpipe", models.tied_specs, compile_=True)
    out["dualpipev-compiled"] = _train("dualpipev", models.tied_specs, compile_=True)
    out["dynamic_shape"] = _refused_dynamic_shape()
    return out


@functools.lru_cache(maxsize=None)
def _launch():
    return harness.run_distributed(_all, P, timeout=900)


def _compare(name, specs):
    results = [per_rank[name] for per_rank in _launch()]
    batches = harness.make_batches(equivalence.SEED, STEPS, 1, equivalence.micro_batches(P), equivalence.MBS)
    reference = harness.train_reference(specs, harness.initial_params_from(results), batches, STEPS)
    harness.compare(results, reference)
    return results


@pytest.mark.slow
def test_wall_clock_breakdown_runs_deepspeeds_timers():
    results = _compare("dualpipe-timers", models.tied_specs)
    for r in results:
        for name in ("fwd_microstep", "bwd_microstep", "pipe_recv_input", "pipe_recv_grad", "pipe_send_output",
                     "pipe_send_grad"):
            assert r["timers"].get(name, 0) > 0, (r["rank"], name, r["timers"])
    assert results[0]["timers"].get("batch_input", 0) > 0  # rank 0 loads the inputs


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev"])
def test_compile_compiles_the_layers_of_every_chunk_and_trains_the_same(schedule):
    results = _compare(f"{schedule}-compiled", models.tied_specs)
    assert all(r["compiled"] == [True, True] for r in results), [r["compiled"] for r in results]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["zb1p", "dualpipe"])
def test_eval_without_loss_returns_the_mean_output_of_each_loss_stage(schedule):
    name = f"{schedule}-mask"
    results = [per_rank[name] for per_rank in _launch()]
    params = {n: v for r in results for n, v in r["params"].items()}
    funcs, named = harness._build_reference(models.mask_specs)
    harness._load(named, params)
    evals = harness.make_batches(equivalence.SEED + 1, 1, 1, equivalence.micro_batches(P), equivalence.MBS)[0][0]
    with torch.no_grad():
        logits = []
        for x, _ in evals:
            out = x
            for f in funcs:
                out = f(out)
            logits.append(out)
    M = len(logits)
    # which micro-batches end on which rank: zb1p all on the last; dualpipe the first half on P-1, the rest on 0
    ends = {P - 1: range(M)} if schedule == "zb1p" else {P - 1: range(M // 2), 0: range(M // 2, M)}
    for r in results:
        if r["stage"] not in ends:
            assert r["eval_outputs"] is None
            continue
        expected = torch.stack([logits[m] for m in ends[r["stage"]]]).mean(0).numpy()
        np.testing.assert_allclose(r["eval_outputs"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_dynamic_shapes_are_refused_at_initialize_naming_the_key():
    for kind, message in (per_rank["dynamic_shape"] for per_rank in _launch()):
        assert kind == "ValueError" and "dynamic_shape" in message, (kind, message)


def test_partitioned_activations_and_gradients_are_refused_naming_the_keys():
    from deepspeed_dualpipe.runtime.engine import DualPipeEngine
    for pipe, grad in ((True, False), (False, True)):
        engine = SimpleNamespace(is_pipe_partitioned=pipe, is_grad_partitioned=grad, dynamic_shape=False)
        with pytest.raises(ValueError, match="pipeline.pipe_partitioned / pipeline.grad_partitioned"):
            DualPipeEngine._refuse_unsupported(engine)
    DualPipeEngine._refuse_unsupported(
        SimpleNamespace(is_pipe_partitioned=False, is_grad_partitioned=False, dynamic_shape=False))
