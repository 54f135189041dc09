"""The verifier proves schedules sound, and catches each kind of broken stream."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepspeed_dualpipe.analysis.events import Comm, Op, rank_events
from deepspeed_dualpipe.analysis.symbolic import ScheduleError
from deepspeed_dualpipe.schedule import SCHEDULES, get_spec, rank_steps
from deepspeed_dualpipe.analysis.verify import verify, verify_streams
from tests.helpers.shapes import valid_shapes


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_every_registered_schedule_verifies_for_every_valid_shape(schedule):
    max_stages = 16 if schedule in ("dualpipe", "dualpipev", "interleaved-1f1b", "interleaved-1f1b-overlap",
                                    "zbv") else 8
    shapes = list(valid_shapes(schedule, max_stages))
    for P, M in shapes:
        verify(schedule, P, M)
    assert len(shapes) >= 8


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


def streams_of(schedule="dualpipe", stages=4, micro_batches=8):
    layout = get_spec(schedule).layout(stages, micro_batches)
    steps = rank_steps(schedule, stages, micro_batches)
    return [rank_events(s, layout, r) for r, s in enumerate(steps)], layout


def index_of(events, predicate):
    return next(i for i, e in enumerate(events) if predicate(e))


def test_intact_streams_pass():
    streams, layout = streams_of()
    assert verify_streams(streams, layout) == [5, 5, 5, 5]


def test_a_dropped_send_is_a_deadlock_that_names_the_waiting_rank():
    streams, layout = streams_of()
    del streams[0][index_of(streams[0], lambda e: isinstance(e, Comm) and e.direction == "send")]
    with pytest.raises(
            ScheduleError,
            match=
            "rank 1 waits at recv_act.0,0.<-0 for the activation of micro-batch 0 from rank 0, which is never sent"):
        verify_streams(streams, layout)


def test_sends_reordered_between_two_ranks_break_posting_order_matching():
    streams, layout = streams_of("1f1b")
    sends = [i for i, e in enumerate(streams[0]) if isinstance(e, Comm) and e.direction == "send"]
    # post the activation of micro-batch 1 before that of micro-batch 0 (both after their forwards)
    first, second = sends[0], sends[1]
    event = streams[0].pop(first)
    streams[0].insert(second, event)
    with pytest.raises(ScheduleError, match="ranks 0 -> 1: message 0 is sent as"):
        verify_streams(streams, layout)


def test_a_send_to_the_wrong_peer_is_named():
    streams, layout = streams_of()
    i = index_of(streams[1], lambda e: isinstance(e, Comm) and e.direction == "send")
    streams[1][i] = dataclasses.replace(streams[1][i], peer=3)
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


def test_zbv_posts_receives_in_the_order_its_neighbours_send():
    """ZB-V's warm-up runs a rank's forwards ahead of its first backward, so its neighbour needs them in
    another order than it sends them; receiving each just before use would mismatch messages."""
    streams, layout = streams_of("zbv", 2, 4)
    rank1 = streams[1]
    receives = [i for i, e in enumerate(rank1) if isinstance(e, Comm) and e.direction == "recv"]
    naive = [e for e in rank1 if not (isinstance(e, Comm) and e.direction == "recv")]
    for i in receives:  # move every receive to just before the computation that needs it
        event = rank1[i]
        user = next(k for k, e in enumerate(naive) if isinstance(e, Op) and any(
            p.chunk == event.chunk and p.micro_batch == event.micro_batch and (p.op == "F") == (event.payload == "act")
            for p in e.parts()))
        naive.insert(user, event)
    streams[1] = naive
    with pytest.raises(ScheduleError, match="point-to-point messages match in posting order"):
        verify_streams(streams, layout)


def test_a_forward_without_a_posted_receive_is_caught():
    streams, layout = streams_of()
    del streams[1][index_of(streams[1], lambda e: isinstance(e, Comm) and e.direction == "recv")]
    with pytest.raises(ScheduleError, match="without a posted receive"):
        verify_streams(streams, layout)
