"""The schedules: DeepSpeed PipeSchedules whose per-rank order is DeepSeek's reference order."""

import pytest
from deepspeed.runtime.pipe import schedule as ds

from deepspeed_dualpipe.analysis.events import Op, rank_events
from deepspeed_dualpipe.analysis.render import schedule_json
from deepspeed_dualpipe.schedule import PLUGIN_SCHEDULES, SCHEDULES, build_schedule, get_spec, rank_steps
from tests.helpers.reference_order import check_oracle_invariants, reference_compute_order
from tests.helpers.shapes import valid_shapes


def test_reference_oracle_is_self_consistent():
    assert check_oracle_invariants() > 0


@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev"])
def test_every_rank_runs_the_compute_order_of_deepseeks_reference(schedule):
    checked = 0
    for P, M in valid_shapes(schedule):
        document = schedule_json(schedule, P, M)
        for rank in document["ranks"]:
            assert rank["compute"] == reference_compute_order(schedule, P, M, rank["rank"]), (P, M, rank["rank"])
            checked += 1
    assert checked > 100


def test_1f1b_is_deepspeeds_own_train_schedule_unchanged():
    ours = build_schedule("1f1b", micro_batches=8, stages=4, stage_id=2)
    theirs = ds.TrainSchedule(micro_batches=8, stages=4, stage_id=2)
    assert type(ours) is ds.TrainSchedule
    assert [repr(s) for s in ours.steps()] == [repr(s) for s in theirs.steps()]


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_schedules_are_deepspeed_pipe_schedules_of_pipe_instructions(schedule):
    sched = build_schedule(schedule, micro_batches=8, stages=4, stage_id=1)
    assert isinstance(sched, ds.PipeSchedule)
    steps = list(sched.steps())
    assert steps and all(isinstance(i, ds.PipeInstruction) for step in steps for i in step)
    assert isinstance(steps[-1][-1], ds.OptimizerStep)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_the_facts_a_schedule_states_are_what_its_instructions_do(schedule):
    spec, M = get_spec(schedule), 8
    kinds = {type(i).__name__ for steps in rank_steps(schedule, 4, M) for step in steps for i in step}
    assert spec.split_backward == ("BackwardWeight" in kinds), kinds
    assert spec.paired == ("OverlappedForwardBackward" in kinds), kinds
    if spec.runs_on_plugin_engine:
        assert spec.layout(4, M).kind is spec.train.layout_kind and spec.summary


@pytest.mark.parametrize("schedule", PLUGIN_SCHEDULES)
def test_a_program_is_a_function_of_its_builder_alone(schedule):
    """Rank r's steps do not depend on which ranks were built before, nor on an instance of the schedule."""
    cls, P, M = get_spec(schedule).train, 4, 8
    layout = get_spec(schedule).layout(P, M)
    alone = [repr(step) for step in cls.rank_program(layout, 2, False)]
    for rank in (3, 0, 2):
        build_schedule(schedule, micro_batches=M, stages=P, stage_id=rank)
    assert [repr(step) for step in cls.rank_program(layout, 2, False)] == alone


@pytest.mark.parametrize("schedule", PLUGIN_SCHEDULES)
def test_buffer_slots_cover_every_instruction(schedule):
    for rank in range(4):
        sched = build_schedule(schedule, micro_batches=10, stages=4, stage_id=rank)
        slots = [
            v for step in sched.steps() for i in step for k, v in i.kwargs.items()
            if k.endswith("buffer") or k == "buffer_id"
        ]
        assert slots and max(slots) < sched.num_pipe_buffers()


def test_dualpipe_feeds_half_the_micro_batches_from_each_end():
    steps = rank_steps("dualpipe", 4, 8)
    layout = get_spec("dualpipe").layout(4, 8)
    first_forward = {r: next(e for e in rank_events(s, layout, r) if isinstance(e, Op)) for r, s in enumerate(steps)}
    assert (first_forward[0].chunk, first_forward[0].micro_batch) == (0, 0)  # forward direction enters at rank 0
    assert (first_forward[3].chunk, first_forward[3].micro_batch) == (1, 4)  # reverse direction enters at rank 3
    loads = {(r, i.chunk, i.micro_batch)
             for r, s in enumerate(steps)
             for step in s
             for i in step if isinstance(i, ds.LoadMicroBatch)}
    assert {(0, 0, m) for m in range(4)} <= loads and {(3, 1, m) for m in range(4, 8)} <= loads
    assert any(type(i).__name__ == "ReduceMirrorGrads" for i in steps[0][-1])


def test_weight_passes_follow_their_input_passes_first_in_first_out():
    layout = get_spec("dualpipev").layout(4, 8)
    ops = [e for e in rank_events(rank_steps("dualpipev", 4, 8)[1], layout, 1) if isinstance(e, Op)]
    inputs = [(o.chunk, o.micro_batch) for o in ops if o.op == "I"]
    weights = [(o.chunk, o.micro_batch) for o in ops if o.op == "W"]
    assert inputs == weights and len(inputs) > 1


@pytest.mark.parametrize(
    "schedule, stages, micro_batches, words",
    [
        ("dualpipe", 3, 12, ["even", "stages=3"]),
        ("dualpipe", 4, 9, ["even", "micro_batches=9"]),
        # the hint names DeepSpeed's key and the flag a Megatron user sets instead
        ("dualpipe", 4, 6,
         [">= 2*stages = 8", "micro_batches=6", "gradient_accumulation_steps to 8", "--global-batch-size to 8 x"]),
        ("dualpipev", 4, 7,
         [">= 2*stages = 8", "micro_batches=7", "gradient_accumulation_steps to 8", "--global-batch-size to 8 x"]),
        ("ds-dualpipev", 2, 3, ["micro_batches=3"]),
        ("interleaved-1f1b", 4, 9, ["multiple of 2", "micro_batches=9", "gradient_accumulation_steps to 10"]),
        ("zbv", 2, 0, ["micro_batches", ">= 1"]),
        ("zb1p", 0, 4, ["stages", ">= 1"]),
        ("1f1b", 2, 0, ["micro_batches", ">= 1"]),
        ("dualpipe", 4, 8.0, ["micro_batches", "integer"]),
    ])
def test_invalid_shapes_raise_value_errors_that_name_the_value(schedule, stages, micro_batches, words):
    with pytest.raises(ValueError) as error:
        build_schedule(schedule, micro_batches=micro_batches, stages=stages, stage_id=0)
    for word in words:
        assert word in str(error.value)


def test_unknown_schedule_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid schedules: " + ", ".join(SCHEDULES)):
        get_spec("gpipe")


def test_interleaved_1f1b_hands_each_micro_batch_from_the_last_rank_back_to_rank_0():
    layout = get_spec("interleaved-1f1b").layout(4, 8)
    assert layout.path(3) == [(r, 0) for r in range(4)] + [(r, 1) for r in range(4)]
    assert [layout.model_stage(1, c) for c in (0, 1)] == [1, 5]
    sends = [(i.chunk, i.peer) for step in rank_steps("interleaved-1f1b", 4, 8)[3] for i in step
             if type(i).__name__ == "SendActivation"]
    assert set(sends) == {(0, 0)}  # chunk 0 of the last rank feeds chunk 1 of rank 0, remotely


def test_zbv_turns_on_the_last_rank_and_computes_the_loss_on_rank_0():
    layout = get_spec("zbv").layout(4, 8)
    assert layout.path(0)[-1] == (0, 1) and (3, 0) in layout.path(0) and (3, 1) in layout.path(0)
    kinds = {type(i).__name__ for step in rank_steps("zbv", 4, 8)[3] for i in step}
    assert {"BackwardInput", "BackwardWeight"} <= kinds and "BackwardPass" not in kinds


def test_rank_outside_the_pipeline_is_rejected():
    with pytest.raises(ValueError, match="stage_id must be a pipeline rank in 0..3"):
        build_schedule("dualpipe", micro_batches=8, stages=4, stage_id=4)


def _compute_ops(schedule, P, M, rank):
    layout = get_spec(schedule).layout(P, M)
    return [e for e in rank_events(rank_steps(schedule, P, M)[rank], layout, rank) if isinstance(e, Op)]


@pytest.mark.parametrize("P, M", [(1, 2), (2, 4), (4, 8), (4, 16), (3, 9)])
def test_overlapped_interleaved_1f1b_is_interleaved_1f1b_with_its_steady_state_in_pairs(P, M):
    """The same forwards and backwards, each in interleaved 1F1B's order; one more warm-up forward per rank, so
    that each steady-state pair joins a forward and a backward of different micro-batches (Megatron-core's
    combined 1F1B)."""
    for rank in range(P):
        plain = _compute_ops("interleaved-1f1b", P, M, rank)
        ours = _compute_ops("interleaved-1f1b-overlap", P, M, rank)
        parts = [part for op in ours for part in op.parts()]
        assert [p for p in parts if p.op == "F"] == [p for p in plain if p.op == "F"]
        assert [p for p in parts if p.op == "B"] == [p for p in plain if p.op == "B"]
        pairs = [op for op in ours if op.op == "FB"]
        warmup = next(i for i, op in enumerate(ours) if op.op != "F")
        # interleaved 1F1B's steady state starts with a forward: its leading forwards are the warm-up plus one
        assert warmup == next(i for i, op in enumerate(plain) if op.op != "F")
        assert len(pairs) == 2 * M - warmup and all(op.op == "FB" for op in ours[warmup:warmup + len(pairs)])
        assert all(p.forward.micro_batch != p.backward.micro_batch for p in pairs)
