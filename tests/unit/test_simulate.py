"""The simulator reproduces Table 2 of the DeepSeek-V3 report where its formulas are exact."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepspeed_dualpipe.cli import main
from deepspeed_dualpipe.analysis.symbolic import Costs
from deepspeed_dualpipe.analysis.simulate import simulate, table

cost = st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0])


@settings(max_examples=60, deadline=None)
@given(F=cost.filter(bool), B=cost.filter(bool), stages=st.integers(1, 8), extra=st.integers(0, 8))
def test_1f1b_bubble_is_pp_minus_1_times_f_plus_b_for_any_costs(F, B, stages, extra):
    s = simulate("1f1b", stages, stages + extra, Costs(F=F, B=B, W=0))
    assert s.bubble == pytest.approx([(stages - 1) * (F + B)] * stages)


@settings(max_examples=60, deadline=None)
@given(F=cost.filter(bool), stages=st.integers(1, 8), extra=st.integers(0, 8))
def test_zb1p_bubble_is_pp_minus_1_times_f_plus_b_minus_2w_when_input_and_weight_parts_equal_f(F, stages, extra):
    costs = Costs(F=F, B=2 * F, W=F)  # the ZeroBubble paper's setting: T_F = T_B = T_W
    s = simulate("zb1p", stages, stages + extra, costs)
    assert s.bubble == pytest.approx([(stages - 1) * F] * stages)
    assert s.formula_bubble == pytest.approx((stages - 1) * (costs.F + costs.B - 2 * costs.W))


@settings(max_examples=60, deadline=None)
@given(schedule=st.sampled_from(["dualpipe", "dualpipev"]),
       F=cost.filter(bool),
       W=cost,
       overlap=st.floats(0, 1),
       half=st.integers(1, 6),
       extra=st.integers(0, 4))
def test_dualpipe_worst_rank_bubble_equals_the_formula_when_backward_for_input_costs_a_forward(
        schedule, F, W, overlap, half, extra):
    if W > F:
        return  # outside the formula's regime: see the README
    B = F + W
    pair = max(F, B) + overlap * min(F, B)  # an F&B between full overlap and none
    stages = 2 * half if schedule == "dualpipe" else half
    s = simulate(schedule, stages, 2 * stages + 2 * extra, Costs(F=F, B=B, W=W, FB=pair))
    assert max(s.bubble) == pytest.approx(s.formula_bubble)


def test_dualpipe_formula_is_an_approximation_when_the_weight_pass_outweighs_the_forward():
    s = simulate("dualpipe", 8, 32, Costs(F=1, B=3, W=2, FB=3.5))
    assert s.formula_bubble == pytest.approx(1.5)
    assert max(s.bubble) == pytest.approx(4.5)  # the three hidden W of the formula do not all fit


@settings(max_examples=60, deadline=None)
@given(F=cost.filter(bool), B=cost.filter(bool), stages=st.integers(1, 8), extra=st.integers(0, 16))
def test_interleaved_1f1b_bubble_is_megatrons_p_minus_1_times_f_plus_b_over_v_for_any_costs(F, B, stages, extra):
    M = stages + extra
    if M % max(1, M // stages):
        return  # a shape interleaved 1F1B refuses (as torch's does)
    s = simulate("interleaved-1f1b", stages, M, Costs(F=F, B=B, W=0))
    # Megatron: (p-1)(t_f+t_b)/v on p ranks with v chunks of cost t/v each: (P-1)(F+B) in chunk costs
    assert s.bubble == pytest.approx([(stages - 1) * (F + B)] * stages)
    assert s.formula_bubble == pytest.approx((stages - 1) * (F + B))


@settings(max_examples=60, deadline=None)
@given(F=cost.filter(bool), stages=st.integers(1, 8), extra=st.integers(0, 8))
def test_zbv_bubble_is_the_formula_at_the_costs_it_is_built_for(F, stages, extra):
    costs = Costs(F=F, B=2 * F, W=F)  # F = I = W, the ZeroBubble paper's setting
    s = simulate("zbv", stages, 2 * stages + extra, costs)
    assert s.bubble == pytest.approx([s.formula_bubble] * stages)
    assert s.formula_bubble == pytest.approx((stages - 1) * F)  # (PP/2-1)(F+B-2W), PP = 2P


def test_zbv_formula_is_only_the_design_point_when_a_forward_outweighs_an_input_pass():
    s = simulate("zbv", 4, 16, Costs(F=2, B=2, W=1))
    assert s.formula_bubble == pytest.approx(6)
    assert max(s.bubble) == pytest.approx(8)


def test_memory_columns_of_table_2():
    for P in (2, 4, 8):
        M = 4 * P
        assert simulate("1f1b", P, M).peak_activations[0] == P
        assert simulate("dualpipe", P, M).peak_activations == [P + 1] * P
        assert simulate("dualpipev", P, M).peak_activations == [2 * P + 1] * P  # PP + 1 with PP = 2P
        assert simulate("dualpipe", P, M).param_copies == 2
        assert simulate("dualpipev", P, M).param_copies == 1
        assert simulate("1f1b", P, M).param_copies == 1
        assert simulate("zbv", P, M).peak_activations == [2 * P] * P  # PP: 1F1B's memory
        assert simulate("interleaved-1f1b", P, M).peak_activations[0] == 3 * P - 1  # 3PP/2 - 1


def test_overlapping_pairs_shortens_dualpipe_and_latency_lengthens_it():
    base = simulate("dualpipe", 4, 16, Costs(F=1, B=2, W=1)).makespan
    assert simulate("dualpipe", 4, 16, Costs(F=1, B=2, W=1, FB=2)).makespan < base
    assert simulate("dualpipe", 4, 16, Costs(F=1, B=2, W=1, latency=0.5)).makespan > base


def test_costs_parse_and_reject_bad_input():
    assert Costs.parse("F=1,b=2,W=0.5,FB=2.5,latency=0.1") == Costs(1, 2, 0.5, 2.5, 0.1)
    with pytest.raises(ValueError, match="bad cost 'X=1'"):
        Costs.parse("F=1,X=1")
    with pytest.raises(ValueError, match="must not exceed B"):
        Costs.parse("F=1,B=1,W=2")


def test_table_prints_each_schedule_beside_its_formula():
    text = table([simulate(n, 4, 8) for n in ("1f1b", "zb1p", "dualpipe", "interleaved-1f1b", "zbv")])
    assert "(PP-1)(F+B)" in text and "(PP/2-1)(F&B+B-3W)" in text and "PP+1 = 5" in text
    assert "(PP/2-1)(F+B)" in text and "3PP/2-1 = 11" in text and "(PP/2-1)(F+B-2W)" in text


def test_simulate_json_has_the_documented_keys(capsys):
    assert main(
        ["simulate", "-P", "4", "-M", "8", "--cost", "F=1,B=2,W=1,FB=2.5", "--json", "--schedules",
         "1f1b,dualpipe"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["schedules"]) == {"1f1b", "dualpipe"}
    for result in out["schedules"].values():
        assert set(result) == {"makespan", "bubble", "peak_activations", "param_copies"}
        assert len(result["bubble"]) == len(result["peak_activations"]) == 4
    assert out["schedules"]["1f1b"]["bubble"] == [9.0] * 4


def test_schedule_json_has_the_documented_shape(capsys):
    main(["schedule", "--schedule", "dualpipe", "-P", "2", "-M", "4", "--format", "json"])
    out = json.loads(capsys.readouterr().out)
    assert (out["schedule"], out["stages"], out["micro_batches"]) == ("dualpipe", 2, 4)
    rank0 = out["ranks"][0]
    assert rank0["rank"] == 0 and rank0["compute"][0] == {"op": "F", "chunk": 0, "micro_batch": 0}
    assert {"type": "ForwardPass", "buffer_id": 0, "chunk": 0, "micro_batch": 0} in rank0["instructions"][0]
    pairs = [c for r in out["ranks"] for c in r["compute"] if c["op"] == "FB"]
    assert pairs and set(pairs[0]) == {"op", "forward", "backward"}


def test_text_picture_shows_every_rank_and_the_bubble(capsys):
    main(["schedule", "--schedule", "zb1p", "-P", "4", "-M", "8"])
    out = capsys.readouterr().out
    assert "bubble/rank 3..3" in out
    assert [line.split("|")[0].strip() for line in out.splitlines() if line.startswith("rank")] == \
        ["rank  0", "rank  1", "rank  2", "rank  3"]


def test_bad_command_line_input_exits_with_a_message_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as code:
        main(["schedule", "--schedule", "dualpipe", "-P", "3", "-M", "8"])
    assert code.value.code == 2
    assert "error: dualpipe needs an even number of pipeline stages" in capsys.readouterr().err


@pytest.mark.parametrize("P, M", [(2, 4), (4, 8), (4, 16), (8, 32)])
def test_overlapped_interleaved_1f1b_loses_nothing_to_pairing_and_gains_what_the_pairs_gain(P, M):
    plain = simulate("interleaved-1f1b", P, M, Costs(F=1, B=2, W=1))
    paired = simulate("interleaved-1f1b-overlap", P, M, Costs(F=1, B=2, W=1))  # a pair costs F + B
    assert paired.makespan == pytest.approx(plain.makespan)
    assert paired.peak_activations == [n + 1 for n in plain.peak_activations]  # one more warm-up forward
    faster = simulate("interleaved-1f1b-overlap", P, M, Costs(F=1, B=2, W=1, FB=2))
    assert faster.makespan < plain.makespan
