"""``measure`` trains the demo model under several schedules in one launch and writes what ``advise --measured``
reads; ``advise`` then puts its predictions beside those measurements."""

import json
import re
import statistics
import types

import pytest

from deepspeed_dualpipe.cli import main
from deepspeed_dualpipe.tools.lm import measure

TINY = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 4,
    "steps_per_print": 10**9,
    "gradient_clipping": 0.0,
    "optimizer": {
        "type": "Adam",
        "params": {
            "lr": 0.003,
            "torch_adam": True
        }
    },
    "csv_monitor": {
        "enabled": True,
        "output_path": "monitor"
    },
    "dualpipe": {
        "profile_step": 1
    },
    "lm": {
        "pipeline_stages": 2,
        "seq_len": 16,
        "model": {
            "hidden_size": 16,
            "num_heads": 2,
            "num_layers": 2,
            "dense_layers": 2,
            "max_positions": 16
        }
    }
}


def test_each_schedule_gets_its_own_config_without_monitors_or_profile_keys():
    config = measure._config_for(TINY, "1f1b")
    assert config["pipeline"]["schedule"] == "1f1b" and "dualpipe" not in config and "csv_monitor" not in config
    config = measure._config_for(TINY, "zbv")
    assert config["pipeline"]["schedule"] == "zbv" and config["dualpipe"] == {}
    assert TINY["dualpipe"] == {"profile_step": 1}  # the caller's config is left alone


@pytest.mark.slow
def test_measure_then_advise_beside_it(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "measure"
    result = measure.main(
        types.SimpleNamespace(config=str(config), ranks=2, schedules="1f1b,zbv", rounds=2, out=str(out), timeout=600))
    written = json.loads((out / "measured.json").read_text())
    assert written["schedules"] == result["schedules"] and set(written["schedules"]) == {"1f1b", "zbv"}
    for name, entry in written["schedules"].items():
        assert len(entry["steps_s"]) == 2 and entry["step_s"] > 0 and entry["activation_bytes"] > 0
        assert entry["micro_batches"] == 4 and entry["parameter_bytes"] > 0
    assert written["schedules"]["1f1b"]["profile"] is None  # DeepSpeed's own engine: no profile
    profile = written["schedules"]["zbv"]["profile"]
    assert main(["advise", profile, "--measured", str(out), "--micro-batches", "4"]) == 0
    text = capsys.readouterr().out
    # each measured run's row beside its prediction shows the figures measure wrote, and the pick names one of them
    table = text.split("predicted beside measured", 1)[1]
    for name, entry in written["schedules"].items():
        assert entry["step_s"] == statistics.median(entry["steps_s"]), entry
        cells = next(line for line in table.splitlines() if line.startswith(name + " ")).split()
        assert cells[:3] == [name, name, "4"] and cells[4] == f"{1e3 * entry['step_s']:.0f}", (cells, entry)
        assert f"{entry['activation_bytes'] / 2**20:.2f}" in cells[6:], (cells, entry)
    pick = re.search(r"advise's pick at M=4: (\S+) \(measured (\d+) ms\)", table)
    assert pick and f"{1e3 * written['schedules'][pick[1]]['step_s']:.0f}" == pick[2], table
