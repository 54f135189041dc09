"""advise's arithmetic without processes: cutting per-stage memory into other cuts, the recommendation rule,
and the budget's units (the end-to-end path from a real profile is tests/distributed/test_profile.py)."""

import dataclasses

import pytest

from deepspeed_dualpipe.schedule import get_spec
from deepspeed_dualpipe.tools import advise as A


def _model(**changes):
    base = A.ModelCosts(schedule="zbv",
                        stages=2,
                        micro_batches=8,
                        data_parallel=1,
                        clock="wall",
                        forward_s=4.0,
                        backward_s=8.0,
                        weight_s=4.0,
                        weight_measured=True,
                        full_backward_s=8.0,
                        full_measured=True,
                        a2a_forward_s=0.0,
                        a2a_backward_s=0.0,
                        a2a_per_call_s=0.0,
                        moe_layers=0.0,
                        serial_s=0.0,
                        serial_fixed_s=0.0,
                        work_s=None,
                        work_fixed_s=None,
                        effective_cores=None,
                        activation_bytes=40.0,
                        stage_activation_bytes=[10.0, 20.0, 4.0, 6.0],
                        memory_base_bytes=0.0,
                        memory_transient_bytes=0.0,
                        parameter_bytes=100.0,
                        measured_step_s=1.0)
    return dataclasses.replace(base, **changes)


def test_a_coarser_cut_sums_the_stages_it_covers_and_a_finer_one_splits_them():
    m = _model()
    assert A.stage_units(m, 2) == pytest.approx([30.0, 10.0])
    assert A.stage_units(m, 8) == pytest.approx([5.0, 5.0, 10.0, 10.0, 2.0, 2.0, 3.0, 3.0])
    assert A.stage_units(m, 4) == pytest.approx(m.stage_activation_bytes)


def test_peak_memory_walks_each_ranks_stream_with_its_stages_bytes():
    m = _model()
    # 1F1B on 2 ranks: rank 0 holds stage 0 of 2 (30 bytes per micro-batch) for up to 2 micro-batches
    assert A.peak_activation_bytes(m, "zb1p", 2, 8) == 60
    # with a base and a transient on top
    assert A.peak_activation_bytes(dataclasses.replace(m, memory_base_bytes=5.0, memory_transient_bytes=7.0), "zb1p",
                                   2, 8) == 72


def test_without_memory_samples_no_memory_is_predicted():
    assert A.peak_activation_bytes(_model(stage_activation_bytes=[]), "zbv", 2, 8) is None


def test_the_profiled_costs_simulate_to_the_formula_of_the_schedule_in_wall_time():
    m = _model()  # per chunk of ZB-V (4 stages): F=1, B=2, W=1, the design point
    p = A.predict(m, "zbv", 2, 8)
    assert p.step_s == pytest.approx(8 * 4 * 3 / 2 + 1 * (1 + 2 - 2))  # busy per rank + (P-1)(F+B-2W)


def test_predictions_within_one_percent_are_a_tie_won_by_the_least_memory():
    fast = A.Prediction("a", 8, 1.000, 0.0, 90, 10, None)
    close = A.Prediction("b", 8, 1.005, 0.0, 50, 10, None)
    slow = A.Prediction("c", 8, 1.100, 0.0, 10, 10, None)
    assert A.recommend([fast, close, slow], None) is close
    assert A.recommend([fast, close, slow], 70) is close
    assert A.recommend([fast, slow], 70) is slow
    assert A.recommend([fast], 10) is None


@pytest.mark.parametrize("text,value", [("512MiB", 512 << 20), ("24GiB", 24 << 30), ("1000", 1000),
                                        ("2GB", 2 * 10**9)])
def test_memory_budgets_take_units(text, value):
    assert A.parse_budget(text) == value


def test_a_bad_budget_names_the_option():
    with pytest.raises(ValueError, match="--memory-budget 'lots'"):
        A.parse_budget("lots")


def _rank(pipeline_rank, **computations):
    """A profile's rank entry with only what the backward estimate reads: CPU seconds per computation kind."""
    return {"pipeline_rank": pipeline_rank, "compute_cpu_s": {k.replace("_", ":"): v for k, v in computations.items()}}


def test_a_stage_that_ran_both_kinds_prices_the_whole_backward_of_those_that_only_split():
    from deepspeed_dualpipe.schedule import get_spec
    layout = get_spec("dualpipev").layout(2, 4)  # rank 0 holds stages 0 and 3, rank 1 stages 1 and 2
    ranks = [
        _rank(0, I_0=[2.0, 2.0], W_0=[1.0], I_1=[3.0], W_1=[1.0], B_1=[2.0]),  # stage 3 ran both: I + W = 2 B
        _rank(1, B_0=[5.0], FB_0_1=[99.0]),  # stage 1 whole only; a pair is not a lone backward
    ]
    split, full, measured = A.backward_costs(ranks, "compute_cpu_s", layout)
    assert measured
    assert split == pytest.approx((3.0 + 4.0 + 5.0) / 3)  # stage 1 cannot split: it runs whole in every schedule
    assert full == pytest.approx((3.0 / 2 + 2.0 + 5.0) / 3)  # stage 0's I + W over stage 3's ratio, 2
    # no stage ran both: the whole backward is taken to cost what the split one does, and said to be assumed
    split, full, measured = A.backward_costs([_rank(0, I_0=[2.0], W_0=[1.0])], "compute_cpu_s", layout)
    assert (split, full, measured) == (3.0, 3.0, False)


def test_schedules_that_run_whole_backwards_are_priced_with_the_whole_backward():
    m = _model(backward_s=12.0, full_backward_s=8.0)
    assert get_spec("zbv").split_backward and not get_spec("interleaved-1f1b").split_backward
    assert A.chunk_costs(m, "zbv", 2).B == pytest.approx(12.0 / 4)
    assert A.chunk_costs(m, "interleaved-1f1b", 2).B == pytest.approx(8.0 / 4)
    assert A.chunk_costs(m, "1f1b", 2).B == pytest.approx(8.0 / 2)


def test_a_second_profile_fills_in_the_whole_backward_scaled_by_the_forwards():
    split_only = _model(backward_s=12.0, full_backward_s=12.0, full_measured=False)
    whole_only = _model(schedule="interleaved-1f1b",
                        forward_s=2.0,
                        backward_s=4.0,
                        full_backward_s=4.0,
                        weight_s=2.0,
                        weight_measured=False)  # a machine twice as fast that day
    m = A.combine(split_only, [whole_only])
    assert m.full_measured and m.full_backward_s == pytest.approx(8.0) and m.backward_s == 12.0
    back = A.combine(whole_only, [split_only])  # the other way round: the split backward from the ZB-V profile
    assert back.weight_measured and back.backward_s == pytest.approx(6.0) and back.weight_s == pytest.approx(2.0)
    with pytest.raises(ValueError, match="profiles of different runs"):
        A.combine(split_only, [_model(stages=4)])
