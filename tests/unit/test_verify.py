"""The verifier proves schedules sound under NCCL's rules, and catches each kind of broken stream."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepspeed_dualpipe.analysis.events import Collective, Op, Post, schedule_program, unbatched
from deepspeed_dualpipe.analysis.symbolic import BUFFERED, ScheduleError
from deepspeed_dualpipe.schedule import SCHEDULES, get_spec
from deepspeed_dualpipe.analysis.verify import verify, verify_streams
from tests.helpers.shapes import valid_shapes


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_every_registered_schedule_verifies_for_every_valid_shape(schedule):
    # every shape up to P=8; at P=16 the least M and one more (the proof is the same, and 16 costs minutes)
    shapes = list(valid_shapes(schedule, 8)) + [(16, M) for P, M in valid_shapes(schedule, 16) if P == 16][:2]
    for P, M in shapes:
        verify(schedule, P, M)
    assert len(shapes) >= 8
    assert {P for P, _ in shapes} >= {2, 4, 8, 16}


@settings(max_examples=40, deadline=None)
@given(schedule=st.sampled_from(sorted(SCHEDULES)),
       stages=st.integers(1, 10),
       extra=st.integers(0, 12),
       forward_only=st.booleans())
def test_schedules_verify_for_random_shapes_training_and_forward_only(schedule, stages, extra, forward_only):
    micro_batches = 2 * stages + extra
    try:
        get_spec(schedule).validate(stages, micro_batches)
    except ValueError:
        return
    if forward_only and schedule == "ds-dualpipev":
        return  # DeepSpeed's forward-only DualPipeV is its own business
    verify(schedule, stages, micro_batches, forward_only=forward_only)


def test_peak_live_activations_are_those_of_table_2():
    assert verify("1f1b", 4, 12).peak_activations == [4, 3, 2, 1]
    assert verify("zb1p", 4, 12).peak_activations == [4, 4, 4, 4]
    assert verify("dualpipe", 8, 20).peak_activations == [9] * 8  # PP + 1
    assert verify("dualpipev", 4, 12).peak_activations == [9] * 4  # PP + 1 with PP = 2P stages
    assert verify("zbv", 4, 12).peak_activations == [8] * 4  # PP with PP = 2P stages: 1F1B's memory
    assert verify("interleaved-1f1b", 4, 12).peak_activations == [11, 9, 7, 5]  # 3PP/2-1 on rank 0


# ----- mutations: each one breaks a promise, and the verifier names it --------------------------


def streams_of(schedule="dualpipe", stages=4, micro_batches=8, batch=1):
    """Every rank's program (what its engine posts), in the steady state (``batch=1``) or the first batch."""
    layout, batches = schedule_program(schedule, stages, micro_batches, batches=2)
    return batches[batch], layout


def comms(program):
    return [(i, c) for i, e in enumerate(program) if isinstance(e, Post) for c in e.comms]


def index_of(events, predicate):
    return next(i for i, e in enumerate(events) if predicate(e))


def drop_comm(program, predicate):
    """Remove the first posted send or receive that matches (and its group, if it empties)."""
    i, comm = next((i, c) for i, c in comms(program) if predicate(c))
    rest = tuple(c for c in program[i].comms if c is not comm)
    if rest:
        program[i] = dataclasses.replace(program[i], comms=rest)
    else:
        del program[i]


def test_intact_streams_pass():
    streams, layout = streams_of()
    assert verify_streams(streams, layout) == [5, 5, 5, 5]


def test_a_dropped_send_is_named_as_a_message_received_but_never_sent():
    streams, layout = streams_of()
    drop_comm(streams[0], lambda c: c.direction == "send")
    with pytest.raises(ScheduleError,
                       match=r"ranks 0 -> 1: the activation of micro-batch 0 \(\(0, 0\) -> \(1, 0\)\) is received but "
                       "never sent"):
        verify_streams(streams, layout)


def test_sends_reordered_between_two_ranks_break_posting_order_matching():
    streams, layout = streams_of("1f1b")
    sends = [i for i, c in comms(streams[0]) if c.direction == "send"]
    # post the activation of micro-batch 1 before that of micro-batch 0 (both after their forwards)
    first, second = sends[0], sends[1]
    event = streams[0].pop(first)
    streams[0].insert(second, event)
    with pytest.raises(ScheduleError, match="ranks 0 -> 1: message 0 is sent as"):
        verify_streams(streams, layout)


def test_a_send_to_the_wrong_peer_is_named():
    streams, layout = streams_of()
    i, comm = next((i, c) for i, c in comms(streams[1]) if c.direction == "send")
    wrong = dataclasses.replace(comm, peer=3)
    streams[1][i] = dataclasses.replace(streams[1][i],
                                        comms=tuple(wrong if c is comm else c for c in streams[1][i].comms))
    with pytest.raises(ScheduleError, match="rank 1: .* names peer 3"):
        verify_streams(streams, layout)


def test_a_backward_before_its_forward_is_caught():
    streams, layout = streams_of("zb1p")
    events = streams[3]
    f0 = index_of(events, lambda e: isinstance(e, Op) and e.op == "F")
    events.insert(f0, Op("I", 0, 0))
    with pytest.raises(ScheduleError, match="runs before its forward"):
        verify_streams(streams, layout)


def test_a_weight_pass_before_its_input_pass_is_caught():
    streams, layout = streams_of("zb1p")
    events = streams[2]
    w = index_of(events, lambda e: isinstance(e, Op) and e.op == "W")
    i = index_of(events, lambda e: isinstance(e, Op) and e.op == "I" and e.micro_batch == events[w].micro_batch)
    events.insert(i, events.pop(w))
    with pytest.raises(ScheduleError, match="before its input-gradient pass"):
        verify_streams(streams, layout)


def test_a_missing_weight_pass_is_caught():
    streams, layout = streams_of("dualpipev")
    del streams[0][index_of(streams[0], lambda e: isinstance(e, Op) and e.op == "W")]
    with pytest.raises(ScheduleError, match="I x1, W x0"):
        verify_streams(streams, layout)


def test_a_forward_run_twice_is_caught():
    streams, layout = streams_of()
    f = index_of(streams[0], lambda e: isinstance(e, Op) and e.op == "F")
    streams[0].insert(f + 1, streams[0][f])
    with pytest.raises(ScheduleError, match="runs twice"):
        verify_streams(streams, layout)


def test_a_buffer_reused_while_still_needed_is_caught():
    streams, layout = streams_of("zb1p")
    events = streams[0]
    f1 = index_of(events, lambda e: isinstance(e, Op) and e.op == "F" and e.micro_batch == 1)
    f0 = index_of(events, lambda e: isinstance(e, Op) and e.op == "F" and e.micro_batch == 0)
    events[f1] = dataclasses.replace(events[f1], buffer=events[f0].buffer)
    with pytest.raises(ScheduleError, match="buffer 0 is overwritten by chunk 0 micro-batch 1"):
        verify_streams(streams, layout)


def test_a_forward_without_a_posted_receive_is_caught():
    streams, layout = streams_of()
    drop_comm(streams[1], lambda c: c.direction == "recv" and c.payload == "act")
    with pytest.raises(ScheduleError, match="without a posted receive"):
        verify_streams(streams, layout)


# ----- NCCL's rules: what the engine posts, and what it used to post ---------------------------


def test_posting_each_send_and_receive_on_its_own_deadlocks_zb1p_at_p2_m4_under_nccl_rules():
    streams, layout = streams_of("zb1p", 2, 4)
    verify_streams(streams, layout)  # one batch per commit: proven
    with pytest.raises(ScheduleError,
                       match=r"rank 0 is stuck at 0B0: it waits for \[recv_grad\(0,0\)<-1\] to run, which queues "
                       r"behind \[send_act\(0,1\)->1\], whose send_act\(0,1\)->1 needs rank 1's group "
                       r"\[recv_act\(0,1\)<-0\] to start; rank 1 is stuck"):
        verify_streams([unbatched(p) for p in streams], layout)
    # gloo-like buffered sends hide it: the rendezvous is what deadlocks
    verify_streams([unbatched(p) for p in streams], layout, semantics=BUFFERED)


@pytest.mark.parametrize("schedule", ["zb1p", "dualpipe", "dualpipev"])
@pytest.mark.parametrize("P", [2, 4, 8])
def test_unbatched_posting_deadlocks_every_plugin_schedule(schedule, P):
    for batch in (0, 1):
        streams, layout = streams_of(schedule, P, 2 * P, batch)
        with pytest.raises(ScheduleError, match="deadlock under NCCL's rules"):
            verify_streams([unbatched(p) for p in streams], layout)


def test_splitting_the_first_two_way_commit_of_each_rank_into_its_sends_then_its_receives_deadlocks():
    streams, layout = streams_of("zb1p", 2, 4)
    verify_streams(streams, layout)
    for program in streams:
        i = index_of(program, lambda e: isinstance(e, Post) and {c.direction for c in e.comms} == {"send", "recv"})
        sends = tuple(c for c in program[i].comms if c.direction == "send")
        recvs = tuple(c for c in program[i].comms if c.direction == "recv")
        program[i:i + 1] = [Post(sends), Post(recvs)]  # two groups: the send first, then the receive
    with pytest.raises(ScheduleError, match="deadlock under NCCL's rules"):
        verify_streams(streams, layout)


def test_the_first_batch_exchanges_each_channels_shapes_once_and_the_steady_state_waits_for_no_group():
    layout, (first, steady) = schedule_program("dualpipe", 4, 8, batches=2)
    shapes = [c for program in first for e in program if isinstance(e, Post) for c in e.comms if c.payload == "shapes"]
    # every rank sends and receives the shapes of each chunk's activations once (the end ranks of a chunk do not)
    assert sorted(
        (c.direction, c.chunk)
        for c in shapes) == sorted([("send", 0)] * 3 + [("recv", 0)] * 3 + [("send", 1)] * 3 + [("recv", 1)] * 3)
    assert all(not e.wait for program in steady for e in program if isinstance(e, Post))
    assert not any(c.payload == "shapes" for program in steady for e in program if isinstance(e, Post)
                   for c in e.comms)


def test_every_plugin_commit_is_one_group_in_the_steady_state_and_deepspeeds_dualpipev_posts_as_many():
    plugin, deepspeed = verify("dualpipev", 4, 12), verify("ds-dualpipev", 4, 12)
    assert plugin.groups[1] == deepspeed.groups[1]
    assert plugin.groups[0] > plugin.groups[1]  # the handshakes of the first batch


@pytest.mark.parametrize("schedule", ["interleaved-1f1b", "zbv"])
@pytest.mark.parametrize("P", [2, 4])
def test_interleaved_and_zbv_need_lockstep_groups_to_complete_under_nccl(schedule, P, monkeypatch):
    """Their programs place p2p around each computation; only the lockstep pass makes NCCL's groups line up."""
    verify(schedule, P, 2 * P)
    monkeypatch.setattr(get_spec(schedule).train, "lockstep_p2p", False)  # train: the schedule class
    with pytest.raises(ScheduleError, match="deadlock under NCCL's rules"):
        verify(schedule, P, 2 * P)


# ----- collectives: each on its communicator, in issue order, a rendezvous of its members -----------


def collectives(program):
    return [str(e) for e in program if isinstance(e, Collective)]


def test_the_end_of_a_batch_issues_its_collectives_on_their_communicators_in_one_order_on_every_rank():
    streams, _ = streams_of("dualpipe", 4, 8)
    assert collectives(streams[0]) == collectives(streams[3]) == [
        "ReduceMirrorGrads on the mirror communicator [0, 3]", "ReduceTiedGrads on the tied communicator [0, 3]",
        "OptimizerStep on the world communicator [0, 1, 2, 3]", "AggregateLoss on the pipe communicator [0, 1, 2, 3]"
    ]
    assert collectives(streams[1])[0] == "ReduceMirrorGrads on the mirror communicator [1, 2]"
    assert "ReduceTiedGrads" not in " ".join(collectives(streams[1]))  # a middle stage holds no tied module


@pytest.mark.parametrize("schedule, P", [("dualpipe", 4), ("dualpipe", 8), ("1f1b", 4), ("zb1p", 6)])
def test_two_collectives_swapped_on_one_rank_are_a_deadlock_naming_both_communicators(schedule, P):
    streams, layout = streams_of(schedule, P, 2 * P)
    program = streams[0]
    first, second = [i for i, e in enumerate(program) if isinstance(e, Collective)][:2]
    names = str(program[first]), str(program[second])
    program[first], program[second] = program[second], program[first]
    with pytest.raises(ScheduleError, match="issue their collectives on them in different orders") as error:
        verify_streams(streams, layout)
    message = str(error.value)
    assert f"rank 0 waits in {names[1].replace(' on', ' #0 on', 1)}" in message, message
    assert f"rank {P - 1}" in message and names[0].replace(" on", " #0 on", 1) in message, message


def test_a_collective_one_member_never_issues_is_named():
    streams, layout = streams_of("dualpipe", 4, 8)
    streams[3] = [e for e in streams[3] if not (isinstance(e, Collective) and e.kind == "ReduceTiedGrads")]
    with pytest.raises(ScheduleError,
                       match=r"ReduceTiedGrads #0 on the tied communicator \[0, 3\] is issued by "
                       r"ranks \[0\] but never by its members \[3\]"):
        verify_streams(streams, layout)
