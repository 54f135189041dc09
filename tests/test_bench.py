"""The bench runs end to end at tiny sizes and reports sane numbers (no speed targets: 2 shared cores)."""

import json

import pytest

from deepspeed_dualpipe.bench.run import DEFAULT_SCHEDULES, parse_costs
from deepspeed_dualpipe.cli import main


def test_costs_are_per_layer_times_with_units():
    assert parse_costs("F=5ms,B=10ms,W=5ms") == {"F": 0.005, "B": 0.010, "W": 0.005}
    assert parse_costs("f=1,b=2us,w=0s") == {"F": 1.0, "B": 2e-6, "W": 0.0}
    for bad in ("F=1ms,B=2ms", "F=1ms,B=2ms,W=3ms", "X=1ms,F=1,B=1,W=1"):
        with pytest.raises(ValueError):
            parse_costs(bad)


@pytest.mark.slow
def test_bench_json_at_tiny_sizes(capsys):
    assert main(["bench", "--schedules", DEFAULT_SCHEDULES, "-P", "2", "-M", "4", "--layers", "4", "--cost",
                 "F=2ms,B=4ms,W=2ms", "--repeats", "1", "--width", "64", "--json", "--timeout", "120"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["schedules"]) == DEFAULT_SCHEDULES.split(",")
    for name, row in result["schedules"].items():
        assert row["step_s"] > 0 and row["sim_step_s"] > 0, name
        assert len(row["bubble"]) == 2 and all(0 <= b < 1 for b in row["bubble"]), (name, row["bubble"])
        assert row["ratio_to_1f1b"] > 0, name
        assert row["overhead_ms"] is not None, name
    assert result["schedules"]["1f1b"]["ratio_to_1f1b"] == 1
    assert result["plugin_overhead_ms"] is not None
    assert set(result["scaling"]) == {"4", "8", "16", "32"}
