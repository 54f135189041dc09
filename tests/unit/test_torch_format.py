"""The export to torch.distributed.pipelining's action format, checked by torch's own code."""

import types

import pytest
from torch.distributed.pipelining import schedules as ts

from deepspeed_dualpipe.analysis import torch_format as tf
from deepspeed_dualpipe.schedule import get_spec


def _accepts(name, P, M):
    try:
        get_spec(name).validate(P, M)
    except ValueError:
        return False
    return True


CASES = [(name, P, M) for name in tf.TORCH_EXPRESSIBLE for P in (1, 2, 4, 8) for M in (P, 2 * P, 2 * P + 3, 4 * P)
         if _accepts(name, P, M)]


def _placement(name, P, M):
    layout = get_spec(name).layout(P, M)
    return {layout.model_stage(r, c): r for r in range(P) for c in range(layout.chunks_per_rank)}


def _flatten(actions):
    """Pairs run as their forward then their backward (what torch's runtime does with sub_actions)."""
    return {r: [s for a in row for s in (a.sub_actions or (a, ))] for r, row in actions.items()}


@pytest.mark.parametrize("name,P,M", CASES)
def test_torch_validator_accepts_every_expressible_schedule(name, P, M):
    assert tf.validate_with_torch(name, P, M) == _placement(name, P, M)


@pytest.mark.parametrize("name,P,M", [(n, P, M) for n, P, M in CASES if P > 1])
def test_torch_lowers_compute_actions_to_sends_and_receives_without_deadlock(name, P, M):
    """torch's validator checks each stage alone; its comms lowering checks the data flow between stages."""
    placement = _placement(name, P, M)
    stages = get_spec(name).layout(P, M).model_stages
    ts._add_send_recv(tf.to_torch_actions(name, P, M), lambda s: placement[s], stages)


def test_torch_lowering_rejects_a_cross_stage_deadlock_that_its_validator_accepts():
    F, B = ts._ComputationType.FORWARD, ts._ComputationType.FULL_BACKWARD
    a = ts._Action
    # rank 0 waits for micro-batch 0's gradient before sending micro-batch 1, which rank 1 needs first
    actions = {
        0: [a(0, F, 0), a(0, B, 0), a(0, F, 1), a(0, B, 1)],
        1: [a(1, F, 0), a(1, F, 1), a(1, B, 0), a(1, B, 1)]
    }
    ts._validate_schedule(actions, 2, 2, 2)
    with pytest.raises(AssertionError, match="Malformed compute schedule"):
        ts._add_send_recv(actions, lambda s: s, 2)


@pytest.mark.parametrize("name,P,M", [(n, P, M) for n, P, M in CASES if P in (2, 4)])
def test_csv_round_trips_through_torchs_own_load_csv(name, P, M, tmp_path):
    path = tmp_path / "schedule.csv"
    path.write_text(tf.to_torch_csv(name, P, M), newline="")
    stub = types.SimpleNamespace(pipeline_order={},
                                 _validate_and_set_stage_mapping=lambda order: ts._validate_schedule(
                                     order, P,
                                     get_spec(name).layout(P, M).model_stages, M))
    ts.PipelineScheduleMulti._load_csv(stub, str(path))
    expected = tf.to_torch_actions(name, P, M)
    assert stub.pipeline_order == expected
    assert tf.from_torch_csv(tf.to_torch_csv(name, P, M)) == expected


def test_csv_is_what_torchs_own_dump_csv_writes(tmp_path):
    actions = tf.to_torch_actions("dualpipev", 4, 8)
    path = tmp_path / "dumped.csv"
    ts.PipelineScheduleMulti._dump_csv(types.SimpleNamespace(pipeline_order=actions), str(path))
    with open(path, newline="") as dumped:
        assert dumped.read() == tf.to_torch_csv("dualpipev", 4, 8)


def test_overlapped_pairs_become_overlap_f_b_with_forward_then_backward():
    pairs = [
        a for row in tf.to_torch_actions("dualpipev", 4, 8).values() for a in row
        if a.computation_type == ts._ComputationType.OVERLAP_F_B
    ]
    assert pairs
    for pair in pairs:
        forward, backward = pair.sub_actions
        assert forward.computation_type == ts._ComputationType.FORWARD
        assert backward.computation_type in (ts._ComputationType.FULL_BACKWARD, ts._ComputationType.BACKWARD_INPUT)
        assert ts._Action.from_str(str(pair)) == pair


def test_zb1p_splits_backward_into_input_and_weight_actions():
    kinds = {a.computation_type for row in tf.to_torch_actions("zb1p", 4, 8).values() for a in row}
    assert {ts._ComputationType.BACKWARD_INPUT, ts._ComputationType.BACKWARD_WEIGHT} <= kinds


@pytest.mark.parametrize("name,P,M", [("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipev", 4, 8), ("ds-dualpipev", 2, 6)])
def test_sends_and_receives_complete_in_torchs_comms_simulator(name, P, M):
    actions = tf.to_torch_actions(name, P, M, with_comms=True)
    stages = get_spec(name).layout(P, M).model_stages
    ts._validate_schedule(actions, P, stages, M)
    kinds = {a.computation_type for row in actions.values() for a in row}
    assert {
        ts._ComputationType.SEND_F, ts._ComputationType.RECV_F, ts._ComputationType.SEND_B, ts._ComputationType.RECV_B
    } <= kinds
    placement = _placement(name, P, M)
    ts._simulate_comms_compute(_flatten(actions), lambda s: placement[s], stages)


def test_torchs_comms_simulator_rejects_a_missing_send():
    actions = _flatten(tf.to_torch_actions("1f1b", 2, 4, with_comms=True))
    actions[0].remove(ts._Action(0, ts._ComputationType.SEND_F, 2))
    with pytest.raises(ValueError, match="not progressing"):
        ts._simulate_comms_compute(actions, lambda s: s, 2)


def test_torch_validator_rejects_a_schedule_missing_one_backward():
    actions = tf.to_torch_actions("1f1b", 4, 8)
    actions[2].remove(ts._Action(2, ts._ComputationType.FULL_BACKWARD, 5))
    with pytest.raises(AssertionError, match="expected 8 total backwards"):
        ts._validate_schedule(actions, 4, 4, 8)


def test_torch_validator_rejects_a_weight_pass_before_its_input_pass():
    actions = tf.to_torch_actions("zb1p", 2, 4)
    row = actions[1]
    i = row.index(ts._Action(1, ts._ComputationType.BACKWARD_INPUT, 0))
    w = row.index(ts._Action(1, ts._ComputationType.BACKWARD_WEIGHT, 0))
    row[i], row[w] = row[w], row[i]
    with pytest.raises(AssertionError, match="without first running Backward Input"):
        ts._validate_schedule(actions, 2, 2, 4)


@pytest.mark.parametrize("convert", [tf.to_torch_actions, tf.to_torch_csv, tf.validate_with_torch])
def test_dualpipe_is_rejected_because_each_stage_lives_on_two_ranks(convert):
    with pytest.raises(ValueError, match=r"'dualpipe'.*two ranks.*exactly one rank"):
        convert("dualpipe", 4, 8)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="unknown schedule"):
        tf.to_torch_actions("gpipe", 2, 4)


def test_missing_torch_symbol_raises_runtime_error_naming_it(monkeypatch):
    monkeypatch.delattr(ts, "_validate_schedule")
    with pytest.raises(RuntimeError, match="_validate_schedule"):
        tf.validate_with_torch("1f1b", 2, 4)
