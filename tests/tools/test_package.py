"""A real package: ``python -m build`` makes a wheel and an sdist, and the wheel, installed into a fresh virtual
environment (not editable, beside torch 2.13.0's CPU build and DeepSpeed 0.19.8), runs the command line and trains
on 2 ranks through DeepSpeed's launcher, from a directory outside the source tree.

Slow: about 3 minutes on 2 cores, most of it installing torch and DeepSpeed into the fresh environment (pip takes
torch from the machine's local wheel of the CPU build; the test refuses a CUDA build).
"""

import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import deepspeed_dualpipe

ROOT = Path(__file__).resolve().parents[2]
VERSION = deepspeed_dualpipe.__version__
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
    "pipeline": {
        "schedule": "zbv"
    },
    "csv_monitor": {
        "enabled": True,
        "output_path": "monitor"
    },
    "lm": {
        "name": "tiny",
        "out_dir": "out",
        "pipeline_stages": 2,
        "seq_len": 16,
        "steps": 3,
        "eval_interval": 0,
        "eval_batches": 1,
        "trace_step": 1,
        "sample_tokens": 8,
        "model": {
            "hidden_size": 16,
            "num_heads": 2,
            "num_layers": 2,
            "dense_layers": 2,
            "max_positions": 16
        }
    }
}


def _run(args, cwd, timeout=900):
    # Nothing from the source tree: the installed package alone (the test runner may have set PYTHONPATH).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path / "bin"


def test_the_version_lives_in_one_place_and_the_changelog_records_it():
    assert (ROOT / "setup.cfg").read_text().count("version = attr: deepspeed_dualpipe.__version__") == 1
    assert re.search(rf"^## {re.escape(VERSION)} ", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert not re.search(r"\b0\.\d+\.\d+\b", (ROOT / "pyproject.toml").read_text())


@pytest.mark.slow
def test_the_wheel_installed_in_a_fresh_environment_runs_the_cli_and_trains_on_two_ranks(tmp_path, monkeypatch):
    # The fresh environment's DeepSpeed lives at another path, so torch builds its shm op from other source and
    # include paths: in the suite's TORCH_EXTENSIONS_DIR that build would replace the suite's, and the next ranks
    # would compile the op again (~35 s of both cores each time). The fresh environment gets its own folder.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    tools = _venv(tmp_path / "build-env")
    _run([tools / "pip", "install", "--quiet", "build"], tmp_path)
    _run([tools / "python", "-m", "build", "--outdir", tmp_path / "dist", ROOT], tmp_path)
    wheel = tmp_path / "dist" / f"deepspeed_dualpipe-{VERSION}-py3-none-any.whl"
    sdist = tmp_path / "dist" / f"deepspeed_dualpipe-{VERSION}.tar.gz"
    with zipfile.ZipFile(wheel) as w:
        names = set(w.namelist())
    assert "deepspeed_dualpipe/tools/lm/job.py" in names and "deepspeed_dualpipe/schedule/zbv.py" in names
    with tarfile.open(sdist) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    assert {
        "CHANGELOG.md", "configs/dualpipe_moe.json", "examples/train_moe_lm.py", "docs/advise.md",
        "tests/unit/test_verify.py"
    } <= members

    env = _venv(tmp_path / "fresh")
    _run([env / "pip", "install", "--quiet", "torch==2.13.0"], tmp_path)
    torch_build = _run([env / "python", "-c", "import torch; print(torch.__version__, torch.version.cuda)"], tmp_path)
    assert torch_build.split() == ["2.13.0+cpu", "None"], f"pip installed another torch: {torch_build}"
    _run([env / "pip", "install", "--quiet", "deepspeed==0.19.8"], tmp_path)
    _run([env / "pip", "install", "--quiet", wheel], tmp_path)

    outside = tmp_path / "job"  # not the source tree: only the installed package can be imported
    outside.mkdir()
    where = _run([env / "python", "-c", "import deepspeed_dualpipe as d; print(d.__file__, d.__version__)"], outside)
    assert where.split() == [
        str(env.parent / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" /
            "deepspeed_dualpipe" / "__init__.py"), VERSION
    ]
    cli = env / "deepspeed-dualpipe"
    assert "{schedule,simulate,verify,plot,demo,ablate,advise,measure,bench,overlap}" in _run([cli, "--help"], outside)
    assert "rank  1 |" in _run([cli, "schedule", "--schedule", "zbv", "-P", "2", "-M", "4"], outside)
    table = _run([cli, "simulate", "-P", "4", "-M", "8"], outside)
    assert "interleaved-1f1b" in table and "(PP/2-1)(F&B+B-3W)" in table

    (outside / "tiny.json").write_text(json.dumps(TINY))
    log = _run([cli, "demo", "--config", "tiny.json", "--ranks", "2"], outside)
    assert "[lm] kernels: RMSNorm torch.nn.RMSNorm" in log and "demo finished" in log
    metrics = json.loads((outside / "out" / "tiny" / "metrics.json").read_text())
    assert metrics["schedule"] == "zbv" and metrics["pipeline_stages"] == 2 and len(metrics["losses"]) == 3
    assert (outside / "monitor" / "tiny" / "Train_Samples_pipe_bubble_measured.csv").is_file()
