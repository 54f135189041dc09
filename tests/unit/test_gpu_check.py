"""``make gpu-check``: every gpu-marked test of the tree, one report; without a GPU, at once, why nothing ran."""

import subprocess
import sys
import time
from pathlib import Path

import torch

from deepspeed_dualpipe.testing import gpu_check

ROOT = Path(__file__).resolve().parents[2]

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.gpu.test_engine_gpu" name="test_moe" time="41.5">
  <properties><property name="ranks" value="4"/><property name="max loss error" value="3e-06"/></properties>
</testcase>
<testcase classname="tests.gpu.test_cuda" name="test_two" time="0.0"><skipped message="needs two CUDA GPUs"/></testcase>
<testcase classname="tests.tools.test_memory" name="test_meter" time="2.0"><failure message="assert 1 == 2"/></testcase>
</testsuite></testsuites>"""


def test_every_file_that_marks_a_test_gpu_is_run_not_only_tests_gpu():
    files = gpu_check.gpu_test_files(ROOT)
    for path in ("tests/gpu/test_cuda.py", "tests/distributed/test_overlap_cuda.py", "tests/tools/test_memory.py",
                 "tests/tools/test_fused.py"):
        assert path in files


def test_without_a_gpu_it_says_in_seconds_that_nothing_ran_and_why():
    if torch.cuda.is_available():
        return  # a GPU machine runs the real thing
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "deepspeed_dualpipe/testing/gpu_check.py")],
                          capture_output=True,
                          text=True,
                          timeout=120)
    assert done.returncode == 0 and time.monotonic() - start < 90  # no pytest, no DeepSpeed: torch's import only
    assert done.stdout.startswith("gpu-check: nothing ran: torch ") and "CPU-only build" in done.stdout
    assert "tests/distributed/test_overlap_cuda.py" in done.stdout


def test_the_report_lists_each_test_its_outcome_and_the_figures_it_recorded(tmp_path):
    path = tmp_path / "gpu.xml"
    path.write_text(JUNIT)
    report = gpu_check.render(gpu_check.read_junit(str(path)), "4 GPU(s) (H100)", 300).splitlines()
    assert report[0] == "gpu-check on 4 GPU(s) (H100): 2 ran (1 passed, 1 failed), 1 skipped, 300 s"
    assert report[1].split() == ["passed", "41.5s", "tests.gpu.test_engine_gpu::test_moe"]
    assert report[2:4] == ["      max loss error = 3e-06", "      ranks = 4"]
    assert "skipped" in report[4] and report[4].endswith("(needs two CUDA GPUs)")
    assert report[5].split()[0] == "failed"
