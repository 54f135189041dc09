"""``advise --what-if``: every schedule on paper for a cluster and model described in a file."""

import json

import pytest

from deepspeed_dualpipe.cli import main
from deepspeed_dualpipe.analysis.simulate import TABLE2
from deepspeed_dualpipe.analysis.symbolic import Costs
from deepspeed_dualpipe.tools.advise import whatif


def _write(tmp_path, **overrides):
    data = {"stages": 4, "micro_batches": [8], "layers": 16, "F": 0.01, "B": 0.02, "W": 0.01}
    data.update(overrides)
    path = tmp_path / "what-if.json"
    path.write_text(json.dumps(data))
    return path


def test_without_all_to_alls_the_bubble_is_table_2s_formula(tmp_path):
    w = whatif.load_what_if(_write(tmp_path))
    for name, per_rank in (("1f1b", 1), ("zb1p", 1)):
        row = whatif.predict_one(w, name, 8)
        chunk = Costs(F=0.04, B=0.08, W=0.04)  # 16 layers over 4 stages
        idle = TABLE2[name].bubble_of(4, chunk)
        assert row.step_s == pytest.approx(8 * (0.04 + 0.08) + idle), name
        assert row.bubble == pytest.approx(idle / row.step_s), name


def test_an_all_to_all_costs_the_bytes_that_leave_the_rank_over_the_link(tmp_path):
    w = whatif.load_what_if(
        _write(tmp_path, moe_layers=16, a2a_bytes=64e6, link_bandwidth=50e9, ep_size=64, a2a_latency=1e-4))
    assert w.a2a_s == pytest.approx(1e-4 + 64e6 * 63 / 64 / 50e9)
    plain, paired = whatif.chunk_costs(w, "zbv"), whatif.chunk_costs(w, "dualpipev")
    assert plain.F == pytest.approx(2 * (0.01 + 2 * w.a2a_s)) and plain.FB is None  # 16 layers over 8 chunks
    # the overlapped pair hides its all-to-alls under the other micro-batch's compute: less than F + B
    assert paired.pair < paired.F + paired.B


def test_memory_per_rank_is_live_chunks_times_their_layers_and_dualpipe_holds_two_copies(tmp_path):
    w = whatif.load_what_if(_write(tmp_path, activation_bytes_per_layer=1.0, parameter_bytes_per_layer=10.0))
    one, dual = whatif.predict_one(w, "1f1b", 8), whatif.predict_one(w, "dualpipe", 8)
    assert one.activation_bytes == 4 * 4.0  # rank 0 of 1F1B holds P micro-batches of its 4 layers
    assert one.parameter_bytes == 40.0 and dual.parameter_bytes == 80.0


def test_the_command_prints_every_schedule_asked_for(tmp_path, capsys):
    path = _write(tmp_path,
                  stages=16,
                  micro_batches=[32],
                  layers=64,
                  moe_layers=60,
                  a2a_bytes=1e6,
                  link_bandwidth=1e9,
                  ep_size=8)
    assert main(["advise", "--what-if", str(path), "--schedules", "1f1b,dualpipev", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["predictions"]
    assert [(r["schedule"], r["micro_batches"]) for r in rows] == [("1f1b", 32), ("dualpipev", 32)]
    assert all(r["step_s"] > 0 and 0 <= r["bubble"] < 1 for r in rows)


@pytest.mark.parametrize("overrides, message", [({
    "stages": 65
}, "'stages' must be whole numbers from 1 to 64"), ({
    "micro_batches": [2048]
}, "'micro_batches' must be"), ({
    "W": 0.05
}, "'W'"), ({
    "bandwidth": 1
}, "unknown key 'bandwidth'"), ({
    "moe_layers": 4,
    "a2a_bytes": 8
}, "'link_bandwidth'")])
def test_a_bad_description_is_refused_naming_the_file_and_key(tmp_path, overrides, message, capsys):
    path = _write(tmp_path, **overrides)
    with pytest.raises(SystemExit) as exit_:
        main(["advise", "--what-if", str(path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and str(path) in err and message in err and "Traceback" not in err
