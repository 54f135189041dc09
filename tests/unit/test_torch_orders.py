"""Interleaved 1F1B and ZB-V run the per-rank compute orders of torch.distributed.pipelining's own
``ScheduleInterleaved1F1B`` and ``ScheduleZBVZeroBubble`` (torch 2.13), as DualPipe's and DualPipeV's
run those of DeepSeek's reference (test_schedules.py).

torch builds a schedule's ``pipeline_order`` for every rank in the class's ``__init__``, from the
stages' sizes alone: stand-in stages that carry those sizes build it without processes."""

from types import SimpleNamespace

import pytest
from torch.distributed.pipelining import schedules as ts

from deepspeed_dualpipe.analysis import torch_format as tf
from deepspeed_dualpipe.schedule import get_spec

TORCH_CLASSES = {"interleaved-1f1b": ts.ScheduleInterleaved1F1B, "zbv": ts.ScheduleZBVZeroBubble}
SHAPES = [(P, M) for P in range(1, 9) for M in range(1, 4 * P + 4)]


def torch_order(name, P, M):
    """torch's compute order per rank (its idle steps, None, left out), or None if torch refuses the shape."""
    layout = get_spec(name).layout(P, 1)
    stages = [
        SimpleNamespace(num_stages=layout.model_stages, group_size=P, group_rank=0, stage_index=s, submod=None)
        for s in (layout.model_stage(0, 0), layout.model_stage(0, 1))
    ]
    try:
        order = TORCH_CLASSES[name](stages, M).pipeline_order
    except ValueError:
        return None
    return {rank: [a for a in row if a is not None] for rank, row in order.items()}


def our_order(name, P, M):
    try:
        get_spec(name).validate(P, M)
    except ValueError:
        return None
    return tf.to_torch_actions(name, P, M)


@pytest.mark.parametrize("name", sorted(TORCH_CLASSES))
def test_every_rank_runs_torchs_compute_order_and_accepts_the_same_shapes(name):
    compared = 0
    for P, M in SHAPES:
        theirs, ours = torch_order(name, P, M), our_order(name, P, M)
        assert (theirs is None) == (ours is None), (name, P, M, "torch accepts" if theirs else "torch refuses")
        if theirs is not None:
            assert ours == theirs, (name, P, M)
            compared += 1
    assert compared >= 100


def test_the_comparison_sees_a_changed_order():
    theirs = torch_order("zbv", 4, 8)
    ours = our_order("zbv", 4, 8)
    row = ours[2]
    i = next(k for k, a in enumerate(row) if a.computation_type == ts._ComputationType.BACKWARD_WEIGHT)
    row[i], row[i + 1] = row[i + 1], row[i]
    assert ours != theirs


def test_interleaved_shapes_torch_refuses_are_refused_with_the_key_to_change():
    assert torch_order("interleaved-1f1b", 4, 9) is None
    with pytest.raises(ValueError, match="multiple of 2.*gradient_accumulation_steps to 10"):
        get_spec("interleaved-1f1b").validate(4, 9)


def test_placements_are_torchs_loop_and_v_styles():
    assert ts.generate_stage_to_rank_mapping(4, 8, style="loop") == {
        get_spec("interleaved-1f1b").layout(4, 8).model_stage(r, c): r
        for r in range(4)
        for c in range(2)
    }
    assert ts.generate_stage_to_rank_mapping(4, 8, style="v") == {
        get_spec("zbv").layout(4, 8).model_stage(r, c): r
        for r in range(4)
        for c in range(2)
    }
