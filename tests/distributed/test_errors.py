"""Bad input gets a clear error that names the key, the rank or the micro-batch, never a hang."""

import pytest
import torch

from tests.helpers import harness
from tests.helpers import models

P, MBS, TIMEOUT_S = 2, 2, 3


def _config(schedule="dualpipe", micro_batches=4):
    return {
        "train_micro_batch_size_per_gpu": MBS,
        "gradient_accumulation_steps": micro_batches,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
        "pipeline": {
            "schedule": schedule
        },
        "dualpipe": {
            "p2p_timeout_s": TIMEOUT_S
        }
    }


def _engine(config):
    return harness.tied_engine(config, P, seed=0)


def _outcome(action):
    """(exception type name, message) of ``action()``."""
    return harness.outcome(action)[:2]


def _scenario(name):
    """Runs in every rank; returns (exception type, message) per step of the scenario."""
    import deepspeed.comm as dist
    batches = harness.make_batches(0, 2, 1, 4, MBS)[0][0]
    if name == "odd micro-batches, then data that is not (inputs, labels)":
        first = _outcome(lambda: _engine(_config(micro_batches=3)))
        engine = _engine(_config())
        second = _outcome(lambda: engine.train_batch(iter([x for x, _ in batches])))
        return dist.get_rank(), [first, second]
    if name == "ep_size does not divide the data-parallel degree":
        from deepspeed.pipe import PipelineModule
        import deepspeed_dualpipe
        with torch.no_grad():
            model = PipelineModule(layers=models.moe_specs(ep_size=2),
                                   num_stages=P,
                                   loss_fn=models.loss_fn,
                                   partition_method="uniform")
        return dist.get_rank(), [
            _outcome(
                lambda: deepspeed_dualpipe.initialize(model=model, config=_config(schedule), optimizer=harness._sgd))
            for schedule in ("dualpipe", "1f1b")
        ]
    engine = _engine(_config())
    if name == "labels missing":
        return dist.get_rank(), [_outcome(lambda: engine.train_batch(iter([(x, None) for x, _ in batches])))]
    if name == "shape changes between steps":
        longer = harness.make_batches(1, 1, 1, 4, MBS, seq_len=harness.SEQ_LEN + 2)[0][0]
        return dist.get_rank(), [
            _outcome(lambda: engine.train_batch(iter(batches))),
            _outcome(lambda: engine.train_batch(iter(longer)))
        ]
    raise AssertionError(name)


def _run(name):
    return dict(harness.run_distributed(_scenario, P, name, timeout=120))


@pytest.mark.slow
def test_a_bad_micro_batch_count_fails_at_initialize_and_data_that_is_not_a_pair_is_named():
    outcomes = _run("odd micro-batches, then data that is not (inputs, labels)")
    for rank in range(P):
        kind, message = outcomes[rank][0]
        assert kind == "ValueError" and "micro_batches=3" in message and "gradient_accumulation_steps" in message
    kind, message = outcomes[0][1]  # rank 0 loads inputs first
    assert kind == "ValueError" and "not an (inputs, labels) pair" in message and "pipeline rank 0" in message


@pytest.mark.slow
def test_labels_missing_on_a_loss_rank_is_named_and_the_other_rank_does_not_hang():
    outcomes = _run("labels missing")
    kinds = {rank: outcome[0][0] for rank, outcome in outcomes.items()}
    messages = " ".join(outcome[0][1] for outcome in outcomes.values())
    assert "ValueError" in kinds.values() and "has no labels" in messages
    assert set(kinds.values()) <= {"ValueError", "PeerTimeout", "PeerLost"}  # the peer gives up within the timeout


@pytest.mark.slow
def test_activation_shapes_that_change_between_steps_are_an_error_that_names_the_shapes():
    outcomes = _run("shape changes between steps")
    assert all(outcome[0] == ("no error", "") for outcome in outcomes.values())  # step 1 is fine
    second = {rank: outcome[1] for rank, outcome in outcomes.items()}
    messages = " ".join(message for _, message in second.values())
    assert any(kind == "ValueError" for kind, _ in second.values())
    assert "was set up for" in messages and f"{harness.SEQ_LEN + 2}" in messages


@pytest.mark.slow
def test_an_ep_size_that_does_not_divide_the_data_parallel_degree_is_named_before_any_step():
    for outcomes in _run("ep_size does not divide the data-parallel degree").values():
        for kind, message in outcomes:  # the plugin's schedules and DeepSpeed's own 1F1B alike
            assert kind == "ValueError", message
            assert "has ep_size=2, but the data-parallel degree is 1" in message and "ep_size in [1]" in message
