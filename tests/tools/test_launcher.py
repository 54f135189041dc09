"""A real DeepSpeed job: the ``deepspeed`` launcher, a script, and a config file from configs/."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepspeed_dualpipe.testing.launch import free_port
from deepspeed_dualpipe.testing.shm import release_shared_memory

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("schedule, engine", [("dualpipe", "DualPipeEngine"), ("dualpipev", "DualPipeEngine")])
def test_the_deepspeed_launcher_trains_with_the_schedule_its_config_names(tmp_path, schedule, engine):
    out = tmp_path / "losses.json"
    launcher = Path(sys.executable).with_name("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    port = free_port()
    command = [
        str(launcher), "--num_gpus", "2", "--master_port",
        str(port),
        str(ROOT / "examples" / "train_pipeline.py"), "--deepspeed_config",
        str(ROOT / "configs" / f"{schedule}.json"), "--steps", "6", "--out",
        str(out)
    ]
    try:
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    finally:
        release_shared_memory(port)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["engine"] == engine
    assert len(result["losses"]) == 6 and result["losses"][-1] < result["losses"][0]


def test_demo_and_ablate_run_on_gpus_when_there_is_one_per_rank_else_on_cpu():
    from deepspeed_dualpipe.tools.lm.launch import accelerator_env
    assert "DS_ACCELERATOR" not in accelerator_env({}, ranks=4, gpus=4)  # DeepSpeed finds CUDA, the script NCCL
    assert accelerator_env({}, ranks=4, gpus=8).get("OMP_NUM_THREADS") is None
    assert accelerator_env({}, ranks=4, gpus=2) == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    assert accelerator_env({}, ranks=2, gpus=0)["DS_ACCELERATOR"] == "cpu"
    assert accelerator_env({"DS_ACCELERATOR": "cuda"}, ranks=4, gpus=0) == {"DS_ACCELERATOR": "cuda"}  # left alone
