"""The ways into the plugin, through the real engine on several ranks."""

import functools

import numpy as np
import pytest
from deepspeed.pipe import PipelineModule

from tests.helpers import harness


def _optimizer_holds_the_engines_parameters(schedule, selection):
    """Runs in each of 2 ranks: a script passes ``model.parameters()`` (or the trainable ones) of the
    PipelineModule it built; the plugin rebuilds the module, so the optimizer must get the new one's."""
    import torch
    import deepspeed_dualpipe
    from tests.helpers import models
    torch.manual_seed(0)
    with torch.no_grad():
        model = PipelineModule(layers=models.tied_specs(),
                               num_stages=2,
                               loss_fn=models.loss_fn,
                               partition_method="uniform")
    given = model.parameters() if selection == "all" else [p for p in model.parameters() if p.requires_grad]
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
        "pipeline": {
            "schedule": schedule
        }
    }
    engine = deepspeed_dualpipe.initialize(model=model, model_parameters=given, config=config,
                                           optimizer=harness._sgd)[0]
    in_optimizer = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    return sorted(id(p) in in_optimizer for p in engine.module.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("schedule, selection", [("dualpipe", "all"), ("dualpipev", "trainable")])
def test_model_parameters_of_the_original_module_become_the_rebuilt_modules(schedule, selection):
    for held in harness.run_distributed(_optimizer_holds_the_engines_parameters, 2, schedule, selection):
        assert held and all(held), f"{held.count(False)} of {len(held)} parameters are not trained"


# --- a client's PipelineModule subclass (tests/helpers/client.py), through every schedule ----------------------

SCHEDULES = ("1f1b", "zb1p", "interleaved-1f1b", "zbv", "dualpipe", "dualpipev", "ds-dualpipev")
STEPS, MBS = 3, 2


def _client_config(schedule, micro_batches):
    return {
        "train_micro_batch_size_per_gpu": MBS,
        "gradient_accumulation_steps": micro_batches,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
        "pipeline": {
            "schedule": schedule
        }
    }


def _train_client(P, schedules, checkpoint_interval, batches):
    """Runs in every rank: the script builds ClientPipe and its optimizer from it (param groups), sets an
    attribute, and initializes under each schedule; reports what survived and what training did."""
    import torch
    import deepspeed_dualpipe
    from tests.helpers import client
    results = {}
    for schedule in schedules:
        torch.manual_seed(1234)
        with torch.no_grad():
            # 4 layers per rank: under dualpipev (2P stages) the side-loss layer stays beside the head and loss
            model = client.ClientPipe(P, num_layers=4 * P, activation_checkpoint_interval=checkpoint_interval)
        model.batch_fn = harness.make_batches  # set by the script after construction, as Megatron does
        optimizer = torch.optim.SGD(client.param_groups(model), lr=0.1)
        engine, *_ = deepspeed_dualpipe.initialize(model=model,
                                                   optimizer=optimizer,
                                                   config=_client_config(schedule, 2 * P))
        module = engine.module
        drawn = torch.rand(3).tolist()  # the script's random stream after initialize
        groups = {id(p): g["name"] for g in optimizer.param_groups for p in g["params"]}
        dp = engine.grid.get_data_parallel_id()
        initial = harness.pipeline_params(module)
        client.CALLS.update(forward=0, backward=0)
        losses, additional = [], []
        for step in range(STEPS):
            losses.append(float(engine.train_batch(iter(batches[step][dp]))))
            additional.append({k: float(v) for k, v in (engine.agg_additional_losses or {}).items()})
        results[schedule] = {
            "class": (type(module).__name__, isinstance(module, client.ClientPipe), module.describe()),
            "batch_fn kept":
            module.batch_fn is harness.make_batches,
            "side loss on the engine's module":
            module.last_side_loss is not None,
            "groups right":
            all(
                groups.get(id(p)) == ("decay" if p.dim() > 1 else "no_decay") for p in module.parameters()
                if p.requires_grad),
            "drawn":
            drawn,
            "rank":
            engine.global_rank,
            "stage":
            engine.stage_id,
            "dp_rank":
            dp,
            "initial_params":
            initial,
            "losses":
            losses,
            "additional":
            additional,
            "params":
            harness.pipeline_params(module),
            "calls":
            dict(client.CALLS)
        }
    return results


@functools.lru_cache(maxsize=None)
def _client_runs(P, checkpoint_interval, schedules=SCHEDULES):
    batches = harness.make_batches(7, STEPS, 1, 2 * P, MBS)  # M = 2P, as DualPipe needs
    return harness.run_distributed(_train_client, P, P, schedules, checkpoint_interval, batches, timeout=400)


def _union(results, key):
    merged = {}
    for r in results:
        merged.update(r[key])
    return merged


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES[1:])
def test_the_clients_subclass_survives_with_its_methods_attributes_and_random_stream(schedule):
    per_rank = _client_runs(2, 0)
    for ranks in per_rank:
        r, base = ranks[schedule], ranks["1f1b"]
        assert r["class"] == ("ClientPipe", True, base["class"][2]), r["class"]
        assert r["batch_fn kept"]
        assert r["drawn"] == base["drawn"], "initialize moved the script's random stream"
    # the bound method in the layer list records on the engine's module, where its loss_fn reads it
    assert any(ranks[schedule]["side loss on the engine's module"] for ranks in per_rank)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES[1:])
def test_every_schedule_starts_from_the_weights_the_script_built(schedule):
    per_rank = _client_runs(2, 0)
    built = _union([ranks["1f1b"] for ranks in per_rank], "initial_params")
    started = harness.initial_params_from([ranks[schedule] for ranks in per_rank])
    assert set(started) == set(built)
    assert all(np.array_equal(started[n], built[n]) for n in built), "initial weights differ from the script's"


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES[1:])
def test_a_client_optimizer_with_param_groups_trains_the_rebuilt_module_like_1f1b(schedule):
    per_rank = _client_runs(2, 0)
    for ranks in per_rank:
        assert ranks[schedule]["groups right"], "a parameter of the engine's module is in the wrong param group"
    results = [ranks[schedule] for ranks in per_rank]
    base = [ranks["1f1b"] for ranks in per_rank]
    harness.compare(results, {"losses": base[0]["losses"], "params": _union(base, "params")})


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES[1:])
def test_additional_losses_are_reported_as_deepspeeds_1f1b_reports_them(schedule):
    per_rank = _client_runs(2, 0)
    for ranks in per_rank:
        got, want = ranks[schedule]["additional"], ranks["1f1b"]["additional"]
        assert [sorted(step) for step in got] == [["lm loss", "side loss"]] * STEPS, got
        for step_got, step_want in zip(got, want):
            assert step_got == pytest.approx(step_want, rel=1e-6), (got, want)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_custom_autograd_function_runs_its_backward_once_per_forward(schedule):
    for ranks in _client_runs(2, 0):
        calls = ranks[schedule]["calls"]
        assert calls["forward"] > 0 and calls["backward"] == calls["forward"], calls


@pytest.mark.slow
@pytest.mark.parametrize("P", [2, 4])
def test_activation_checkpointing_trains_like_1f1b_without_it(P):
    plugin = ("zb1p", "interleaved-1f1b", "zbv", "dualpipe", "dualpipev")
    per_rank = _client_runs(P, 1, plugin)
    base = [ranks["1f1b"] for ranks in _client_runs(P, 0, ("1f1b", ))]
    for schedule in plugin:
        harness.compare([ranks[schedule] for ranks in per_rank], {
            "losses": base[0]["losses"],
            "params": _union(base, "params")
        })


def _optimizer_of_another_model(schedule):
    """Runs in every rank: the script hands initialize an optimizer built from a different module."""
    import torch
    import deepspeed_dualpipe
    from tests.helpers import client
    torch.manual_seed(0)
    with torch.no_grad():
        model = client.ClientPipe(2)
    stray = torch.optim.SGD(torch.nn.Linear(4, 4).parameters(), lr=0.1)
    return harness.outcome(
        lambda: deepspeed_dualpipe.initialize(model=model, optimizer=stray, config=_client_config(schedule, 4)))[:2]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe"])
def test_an_optimizer_that_would_train_nothing_is_refused_naming_the_counts(schedule):
    for kind, message in harness.run_distributed(_optimizer_of_another_model, 2, schedule):
        assert kind == "ValueError", (kind, message)
        assert "holds none of the" in message and "trainable parameters" in message, message
