"""The ways into the plugin, through the real engine on several ranks."""

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
