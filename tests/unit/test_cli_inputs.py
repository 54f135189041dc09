"""Hostile but fair input to ``python -m deepspeed_dualpipe``: every subcommand refuses a bad argument up front
with one line on stderr and exit status 2, never a traceback, never a launch or a run that cannot succeed.
In-process (``main(argv)``): no process is started for any case."""

import json

import pytest

from deepspeed_dualpipe import cli
from deepspeed_dualpipe.tools.advise.costs import FORMAT

SHAPE = ["-P", "2", "-M", "4"]


def _profiles(tmp_path):
    missing_keys = tmp_path / "missing_keys.json"
    missing_keys.write_text(
        json.dumps({
            "format": FORMAT,
            "schedule": "zbv",
            "stages": 2,
            "micro_batches": 4,
            "ranks": [{
                "pipeline_rank": 0
            }]
        }))
    strings = tmp_path / "strings.json"
    strings.write_text(
        json.dumps({
            "format": FORMAT,
            "schedule": "zbv",
            "stages": "2",
            "micro_batches": "4",
            "ranks": [{
                "pipeline_rank": "0"
            }]
        }))
    sample_strings = tmp_path / "sample_strings.json"
    sample_strings.write_text(
        json.dumps({
            "format": FORMAT,
            "schedule": "zbv",
            "stages": 2,
            "micro_batches": 4,
            "ranks": [{
                "pipeline_rank": 0,
                "compute_cpu_s": {
                    "F:0": ["fast"]
                }
            }]
        }))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{nope")
    return {
        "missing_keys": str(missing_keys),
        "strings": str(strings),
        "sample_strings": str(sample_strings),
        "garbage": str(garbage)
    }


CASES = {
    # the list
    "plot into a missing directory": ["plot", "--schedule", "dualpipe", *SHAPE, "--out", "/nonexistent/x.png"],
    "ablate a missing file": ["ablate", "/missing.json"],
    "advise a profile with missing keys": ["advise", "{missing_keys}"],
    "advise a profile with string values": ["advise", "{strings}"],
    "bench --timeout -5": ["bench", "--timeout", "-5"],
    "overlap --hidden -1": ["overlap", "--hidden", "-1"],
    "overlap --experts 0": ["overlap", "--experts", "0"],
    "simulate -P -2": ["simulate", "-P", "-2", "-M", "4"],
    "simulate --schedules ,": ["simulate", *SHAPE, "--schedules", ","],
    "verify --table-stages -2": ["verify", "--table", "--table-stages", "-2"],
    "bench --width 0": ["bench", "--width", "0"],
    "bench --repeats 0": ["bench", "--repeats", "0"],
    "demo --ranks 0": ["demo", "--ranks", "0"],
    # and more of the same kinds
    "advise a profile with string samples": ["advise", "{sample_strings}"],
    "advise a profile that is not JSON": ["advise", "{garbage}"],
    "advise a missing profile": ["advise", "/missing-profile.json"],
    "advise --memory-budget lots": ["advise", "{missing_keys}", "--memory-budget", "lots"],
    "advise --schedules ,": ["advise", "{missing_keys}", "--schedules", ","],
    "advise --measured missing": ["advise", "{missing_keys}", "--measured", "/missing-dir"],
    "plot into a text file": ["plot", "--schedule", "dualpipe", *SHAPE, "--out", "{tmp}/x.txt"],
    "plot into a directory": ["plot", "--schedule", "dualpipe", *SHAPE, "--out", "{tmp}"],
    "schedule -M 100000": ["schedule", "--schedule", "dualpipe", "-P", "2", "-M", "100000"],
    "schedule -P 65": ["schedule", "--schedule", "dualpipe", "-P", "65", "-M", "130"],
    "schedule an unknown schedule": ["schedule", "--schedule", "nope", *SHAPE],
    "schedule -P x": ["schedule", "--schedule", "dualpipe", "-P", "x", "-M", "4"],
    "simulate -M 0": ["simulate", "-P", "2", "-M", "0"],
    "simulate P x M over the limit": ["simulate", "-P", "64", "-M", "4096"],
    "simulate --cost F=x": ["simulate", *SHAPE, "--cost", "F=x"],
    "simulate an unknown schedule": ["simulate", *SHAPE, "--schedules", "dualpipe,nope"],
    "verify --table-stages 1": ["verify", "--table", "--table-stages", "1"],
    "verify --table-stages ,": ["verify", "--table", "--table-stages", ","],
    "verify without a shape": ["verify"],
    "verify -M -1": ["verify", "-P", "2", "-M", "-1"],
    "bench -P 0": ["bench", "-P", "0"],
    "bench -M 0": ["bench", "-M", "0"],
    "bench --layers 0": ["bench", "--layers", "0"],
    "bench --timeout nan": ["bench", "--timeout", "nan"],
    "bench --schedules ,": ["bench", "--schedules", ","],
    "bench --a2a lots": ["bench", "--a2a", "lots"],
    "overlap --tokens 0": ["overlap", "--tokens", "0"],
    "overlap --blocks 0": ["overlap", "--blocks", "0"],
    "overlap --repeats 0": ["overlap", "--repeats", "0"],
    "overlap --threads -3": ["overlap", "--threads", "-3"],
    "demo --steps 0": ["demo", "--steps", "0"],
    "demo --ranks 1.5": ["demo", "--ranks", "1.5"],
    "demo a missing config": ["demo", "--config", "/missing.json"],
    "measure --ranks 0": ["measure", "--ranks", "0"],
    "measure --rounds 0": ["measure", "--rounds", "0"],
    "measure --timeout -1": ["measure", "--timeout", "-1"],
    "measure --out under a file": ["measure", "--out", "{missing_keys}/runs"],
    "no subcommand": [],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_argument_is_one_line_on_stderr_and_exit_status_2(case, tmp_path, capsys, monkeypatch):
    import deepspeed_dualpipe.tools.lm.launch as launch
    monkeypatch.setattr(launch, "launch", lambda *a, **k: pytest.fail("demo launched ranks"))
    names = dict(_profiles(tmp_path), tmp=str(tmp_path))
    argv = [arg.format(**names) for arg in CASES[case]]
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2, (case, exited.value.code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, (case, err)


def test_the_largest_shape_the_analysis_takes_runs(capsys):
    assert cli.main(["schedule", "--schedule", "zb1p", "-P", "64", "-M", "128", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)
