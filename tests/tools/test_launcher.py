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


def test_make_demo_on_a_machine_with_a_gpu_per_rank_leaves_deepspeed_on_cuda(tmp_path, monkeypatch):
    """The Makefile's environment (its interpreter replaced by one that prints what it got) handed to the
    launcher's choice, on a machine that claims 4 GPUs: nothing forces the CPU."""
    import shutil
    import torch
    from deepspeed_dualpipe.tools.lm.launch import accelerator_env
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho \"DS_ACCELERATOR=${DS_ACCELERATOR-unset} $*\"\n")
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "MAKEFLAGS", "MAKELEVEL")}
    root = Path(__file__).resolve().parents[2]
    made = subprocess.run(["make", "-s", "-C", str(root), "demo", "STAMP=", f"PY={python}"],
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=60)
    assert made.returncode == 0, made.stderr
    line = made.stdout.strip().splitlines()[-1]
    assert "-m deepspeed_dualpipe demo --config configs/dualpipe_moe.json --ranks 4" in line, line
    value = line.split()[0].split("=", 1)[1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    job = accelerator_env({} if value == "unset" else {"DS_ACCELERATOR": value}, ranks=4)
    assert "DS_ACCELERATOR" not in job, f"make demo ran: {line}"
