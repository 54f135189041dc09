"""The bench runs end to end at tiny sizes and reports sane numbers (no speed targets: 2 shared cores)."""

import json

import pytest
import torch

from deepspeed_dualpipe.tools.bench import layers as L
from deepspeed_dualpipe.tools.bench import predict
from deepspeed_dualpipe.tools.bench.run import DEFAULT_SCHEDULES, parse_bytes, parse_costs
from deepspeed_dualpipe.cli import main
from deepspeed_dualpipe.runtime.autograd.steps import Tape, backward_steps, forward_steps, run


def test_costs_are_per_layer_times_with_units():
    assert parse_costs("F=5ms,B=10ms,W=5ms") == {"F": 0.005, "B": 0.010, "W": 0.005}
    assert parse_costs("f=1,b=2us,w=0s") == {"F": 1.0, "B": 2e-6, "W": 0.0}
    for bad in ("F=1ms,B=2ms", "F=1ms,B=2ms,W=3ms", "X=1ms,F=1,B=1,W=1"):
        with pytest.raises(ValueError):
            parse_costs(bad)


def test_sizes():
    assert parse_bytes("1048576") == parse_bytes("1MiB") == 1 << 20
    assert parse_bytes("64KiB") == 65536 and parse_bytes("2k") == 2000
    with pytest.raises(ValueError):
        parse_bytes("1 parsec")


def _sleeps():
    """The sleeps asked for (what happened depends on the machine's load)."""
    return [round(requested, 6) for _, _, requested in L.SLEEPS]


def test_moe_layer_sleeps_its_costs_and_round_trips_the_activation():
    """Without a group the all-to-alls are identities: forward F/2 + F/2, input part (B-W)/2 twice,
    weight part W/2 twice, and the activation comes out as it went in, through either path."""
    layer = L.SleepMoELayer(0.02, 0.06, 0.02, 4096)
    x = torch.randn(1, 16)
    L.SLEEPS.clear()
    out = layer(x)  # InlineTape: one autograd graph, as under DeepSpeed's own engines
    assert torch.equal(out, x) and _sleeps() == [0.01, 0.01]
    out.sum().backward()
    assert sorted(_sleeps()[2:]) == [0.01, 0.01, 0.02, 0.02]
    L.SLEEPS.clear()
    tape, x = Tape(), x.clone().requires_grad_()
    out = run(forward_steps([layer, layer], x, tape))
    assert torch.equal(out, x)
    grads, weights = run(backward_steps(tape, out, torch.ones_like(out), split=True))
    assert torch.equal(grads[0], torch.ones_like(x))
    assert _sleeps() == [0.01] * 4 + [0.02] * 4  # forwards, then the input parts only
    L.SLEEPS.clear()
    weights.weight_part()
    assert _sleeps() == [0.01] * 4


def test_a_layer_keeps_its_input_for_the_weight_gradient_and_nothing_else():
    layer, x = L.SleepLayer(0, 0, 0), torch.randn(1, 8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = layer(x)
    assert saved == [x.shape]
    out.sum().backward()


def test_overlapped_pair_prediction():
    # nothing to hide: compute only
    assert predict.overlapped_pair(1, 4.0, 8.0, 0.0) == pytest.approx(12.0)
    # every all-to-all fits under the other micro-batch's step: still compute only
    assert predict.overlapped_pair(2, 4.0, 8.0, 1.0) == pytest.approx(24.0)
    # all-to-alls longer than any step: the comm chain shows
    assert predict.overlapped_pair(1, 2.0, 2.0, 10.0) > 20.0
    # never better than the compute, never worse than running them one after the other
    for a in (0.5, 2.0, 5.0):
        t = predict.overlapped_pair(2, 5.0, 10.0, a)
        assert 30.0 <= t <= 30.0 + 8 * a


def test_moe_costs_charge_two_all_to_alls_per_layer_and_pass():
    c = predict.chunk_costs("dualpipe", 4, 8, 5.0, 10.0, 5.0, a2a=1.0)
    assert (c.F, c.B, c.W) == (14.0, 24.0, 10.0) and c.FB == predict.overlapped_pair(2, 5.0, 10.0, 1.0)
    assert predict.chunk_costs("dualpipe", 4, 8, 5.0, 10.0, 5.0, a2a=1.0, overlap=False).pair == 38.0
    assert predict.chunk_costs("zb1p", 4, 8, 5.0, 10.0, 5.0, a2a=1.0).FB is None


def test_torchs_split_backward_sleeps_the_input_part_in_its_input_pass_and_the_weight_part_in_its_weight_pass():
    """The torch peer's rows are fair only if stage_backward_input sleeps B - W and stage_backward_weight W."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight
    chunk = torch.nn.Sequential(L.SleepLayer(0.001, 0.003, 0.001), L.SleepLayer(0.001, 0.003, 0.001))
    x = torch.randn(1, 8, requires_grad=True)
    out = chunk(x)
    L.SLEEPS.clear()
    grads, groups = stage_backward_input([out], [torch.ones_like(out)], [x], chunk.parameters())
    assert _sleeps() == [0.002, 0.002] and torch.equal(grads[0], torch.ones_like(x))
    L.SLEEPS.clear()
    stage_backward_weight(chunk.parameters(), groups)
    assert _sleeps() == [0.001, 0.001] and all(p.grad is not None for p in chunk.parameters())


def test_the_torch_peer_has_a_row_for_each_named_schedule_that_torch_has():
    from deepspeed_dualpipe.tools.bench import torch_peer
    from deepspeed_dualpipe.tools.bench.run import _runs
    names = ["1f1b", "dualpipe", "dualpipev", "ds-dualpipev"]
    assert torch_peer.available(names) == ["1f1b", "dualpipev"]  # torch has no DualPipe (no mirror copies)
    runs = _runs(names, a2a=True, peer="torch")
    assert [(r.label, r.schedule, r.overlap, r.peer) for r in runs
            if r.peer] == [("torch 1f1b", "1f1b", False, True), ("torch dualpipev", "dualpipev", False, True)]
    assert not any(r.peer for r in _runs(names, a2a=True, peer="none"))


def _check(result, runs, ranks):
    assert list(result["schedules"]) == runs
    for name, row in result["schedules"].items():
        assert row["step_s"] > 0 and row["sim_step_s"] > 0, name
        assert len(row["bubble"]) == ranks and all(0 <= b < 1 for b in row["bubble"]), (name, row["bubble"])
        assert row["ratio_to_1f1b"] > 0, name
        assert row["overhead_ms"] is not None, name
        if row["peer"]:  # torch's rows: no memory measured
            assert row["peak_activation_bytes"] == [None] * ranks and row["activation_ratio"] is None, name
            continue
        assert len(row["peak_activation_bytes"]) == ranks and all(b > 0 for b in row["peak_activation_bytes"]), name
        assert len(row["sim_peak_activations"]) == ranks and row["activation_unit_bytes"] > 0, name
    assert result["schedules"]["1f1b"]["ratio_to_1f1b"] == 1
    assert result["plugin_overhead_ms"] is not None
    assert set(result["scaling"]) == {"4", "8", "16", "32"}


@pytest.mark.slow
def test_bench_json_at_tiny_sizes(capsys):
    assert main([
        "bench", "--schedules", DEFAULT_SCHEDULES, "-P", "2", "-M", "4", "--layers", "4", "--cost",
        "F=2ms,B=4ms,W=2ms", "--repeats", "1", "--width", "64", "--json", "--timeout", "120", "--peer", "none"
    ]) == 0
    result = json.loads(capsys.readouterr().out)
    _check(result, DEFAULT_SCHEDULES.split(","), 2)


# Table 2 of the DeepSeek-V3 report: activation memory per device over 1F1B's at P ranks (zb1p: P micro-batches of
# a stage, as 1F1B; dualpipe: P+1 of its half-size stages' pairs; dualpipev: 2P+1 of its 2P stages).
TABLE2_AT_P4 = {"zb1p": 1.0, "dualpipe": 5 / 4, "dualpipev": 9 / 8}
MEMORY_MARGIN = 1.10  # the README's promise: the busiest rank within 10% of Table 2 (docs/benchmarks.md)


@pytest.mark.slow
def test_the_busiest_ranks_peak_activation_memory_keeps_table_2s_ratio_to_deepspeeds_1f1b(capsys):
    # P=4, M=8, one run: DeepSpeed's own 1F1B and the plugin's schedules, read at the allocator by torch's profiler
    # (tensors only: the same bytes every run, where glibc's malloc also counts freed small chunks it caches).
    assert main([
        "bench", "--schedules", "1f1b," + ",".join(TABLE2_AT_P4), "-P", "4", "-M", "8", "--layers", "8", "--cost",
        "F=1ms,B=2ms,W=1ms", "--repeats", "1", "--memory-source", "profiler", "--json", "--timeout", "300"
    ]) == 0
    peaks = {
        name: row["peak_activation_bytes"]
        for name, row in json.loads(capsys.readouterr().out)["schedules"].items()
    }
    one_f_one_b = peaks["1f1b"]
    # the meter sees 1F1B's staircase: rank 0 holds P micro-batches in flight, the last rank one
    assert one_f_one_b[0] >= 4 * one_f_one_b[3] > 0, peaks
    # Which of two instructions frees a sent activation first can vary by one activation (a send completing);
    # the bound leaves room for that (16 KiB activations: 0.08 of 1F1B's rank 0) and no more.
    for schedule, table2 in TABLE2_AT_P4.items():
        ratio = max(peaks[schedule]) / one_f_one_b[0]
        assert ratio <= MEMORY_MARGIN * table2, f"{schedule}: busiest rank {ratio:.3f} x 1F1B, Table 2 {table2:.3f}"


@pytest.mark.slow
def test_bench_with_all_to_alls_at_tiny_sizes(capsys):
    """P=2 with expert parallelism 2 inside data parallelism 2: 4 ranks, real gloo all-to-alls."""
    assert main([
        "bench", "--schedules", "1f1b,dualpipe", "-P", "2", "-M", "4", "--layers", "4", "--cost", "F=2ms,B=4ms,W=2ms",
        "--repeats", "1", "--width", "64", "--a2a", "16KiB", "--json", "--timeout", "120", "--peer", "none"
    ]) == 0
    result = json.loads(capsys.readouterr().out)
    _check(result, ["1f1b", "dualpipe", "dualpipe (no overlap)"], 2)
    assert result["data_parallel"] == 2 and result["a2a_bytes"] == 16384
    assert result["a2a_alone_s"] > 0 and result["a2a_concurrent_s"] > 0
    assert result["schedules"]["dualpipe"]["sim_pair_s"] is not None
    assert result["schedules"]["dualpipe (no overlap)"]["sim_pair_s"] is None
    assert all(row["a2a_median_s"] > 0 for row in result["schedules"].values())
    assert set(result["a2a_targets"]["dualpipe"]) == {"vs_no_overlap", "vs_1f1b"}
    from deepspeed_dualpipe.tools.bench.report import render
    report = render(result)  # the tables the command prints without --json
    assert "dualpipe (no overlap)" in report and "MoE targets" in report and "memory targets:" in report


class _GlooLikeWork:
    """A work handle whose collective finished at once (as gloo's does for small tensors)."""

    def __init__(self):
        self._future = torch.futures.Future()
        self._future.set_result(None)

    def wait(self, timeout=None):
        return True

    def get_future(self):
        return self._future


def test_the_emulated_wire_releases_an_all_to_all_after_its_wire_time_without_spending_cpu():
    import time
    from deepspeed_dualpipe.runtime.autograd.tape import Pending
    from deepspeed_dualpipe.tools.bench import wire
    timer = wire._Timer()
    launched = time.perf_counter()
    work = wire.WireWork(_GlooLikeWork(), launched, 0.2, timer)
    pending = Pending(torch.zeros(1), work, name="dispatch")
    pending.watch_completion()  # as the step drivers do when they record
    assert not work.is_completed() and pending.completed is None  # gloo is done; the wire is not
    cpu = time.process_time()
    pending.wait()
    cpu = time.process_time() - cpu
    assert work.is_completed() and time.perf_counter() - launched >= 0.2
    assert 0.2 <= pending.completed - launched < 0.3  # stamped by the future the timer completes
    assert cpu < 0.05, f"waiting on the wire spent {cpu:.3f} s of CPU"


def test_wire_time_defaults_to_one_to_one_comm_to_compute():
    from deepspeed_dualpipe.tools.bench.run import parse_time
    assert parse_time("3.75ms") == pytest.approx(0.00375) and parse_time("0.5") == 0.5
    with pytest.raises(ValueError):
        parse_time("fast")


def test_the_report_warns_when_compute_runs_well_over_the_simulators_costs():
    from deepspeed_dualpipe.tools.bench.report import busy_excess, contention_warning
    row = {"sim_step_s": 1.0, "sim_bubble": [0.2, 0.2], "busy_s": [0.9, 1.1]}  # the simulator's busy time: 0.8
    assert busy_excess(row) == pytest.approx(0.25)
    assert contention_warning(0.16, 1.40, 2) is None  # F=20ms, 8 ranks on 2 cores: within 0.05 of the simulator
    warning = contention_warning(0.27, 1.50, 2)  # F=5ms: 0.07 away
    assert "27% longer" in warning and "1.50 of this machine's 2 cores" in warning and "--cost" in warning


@pytest.mark.slow
def test_bench_with_all_to_alls_on_the_emulated_wire_at_tiny_sizes(capsys):
    assert main([
        "bench", "--schedules", "1f1b,dualpipev", "-P", "2", "-M", "4", "--layers", "4", "--cost", "F=2ms,B=4ms,W=2ms",
        "--repeats", "1", "--width", "64", "--a2a-wire", "--json", "--timeout", "300"
    ]) == 0
    result = json.loads(capsys.readouterr().out)
    # torch's DualPipeV runs the same MoE layers, their all-to-alls on the same wire
    _check(result, ["1f1b", "dualpipev", "dualpipev (no overlap)", "torch 1f1b", "torch dualpipev"], 2)
    assert result["schedules"]["torch dualpipev"]["a2a_median_s"] >= 0.0015
    targets = result["peer_targets"]
    assert targets["dualpipev"]["torch dualpipev"]["target"] == 0.90
    from deepspeed_dualpipe.tools.bench.report import render
    assert "against torch.distributed.pipelining" in render(result)
    assert result["a2a_wire_s"] == pytest.approx(0.0015)  # (F + B) / 4
    assert result["a2a_bytes"] == 65536
    assert result["a2a_alone_s"] >= 0.0015 and result["a2a_concurrent_s"] >= 0.0015


@pytest.mark.parametrize("option, value, message", [("--a2a", "lots", "bad size 'lots'"),
                                                    ("--a2a-wire", "soon", "bad time 'soon'")])
def test_a_bad_size_or_time_is_refused_naming_the_option(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", option, value])
    assert exit_.value.code == 2 and f"argument {option}: {message}" in capsys.readouterr().err
