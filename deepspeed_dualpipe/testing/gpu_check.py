"""``make gpu-check``: every ``gpu``-marked test of the tree in one pytest run, then one report.

Without a usable GPU nothing is started (no pytest collection, no DeepSpeed import): the report says why, in
a second. With one, pytest runs the marked tests (DeepSpeed picks CUDA: ``DS_ACCELERATOR`` is dropped) and
writes JUnit XML; the report lists each test's outcome and time, the GPUs it had, and the figures the tests
recorded with pytest's ``record_property`` (docs/gpu.md says what each line means).
"""

import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List, Optional

MARK = re.compile(r"pytest\.mark\.gpu\b")


def gpu_test_files(root: Path) -> List[str]:
    """The test files under ``root/tests`` that mark a test ``gpu`` (paths relative to ``root``)."""
    found = []
    for path in sorted((root / "tests").rglob("test_*.py")):
        if MARK.search(path.read_text(encoding="utf-8", errors="replace")):
            found.append(str(path.relative_to(root)))
    return found


def why_not() -> Optional[str]:
    """Why the GPU tests cannot run here, or None."""
    import torch
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return ("torch.cuda.is_available() is False: no CUDA device visible" +
                (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else " (driver or device missing)"))
    return None


def devices() -> str:
    import torch
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return f"{torch.cuda.device_count()} GPU(s) ({', '.join(names)}; torch {torch.__version__}, CUDA {torch.version.cuda})"


def read_junit(path: str) -> List[dict]:
    """One entry per test case: ``name``, ``outcome`` (passed, failed, skipped), ``seconds``, ``why``, ``figures``."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, why = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                why = (found.get("message") or "").splitlines()[0] if found.get("message") else ""
                break
        figures = {p.get("name"): p.get("value") for p in case.iter("property")}
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        cases.append(dict(name=name, outcome=outcome, seconds=float(case.get("time") or 0), why=why, figures=figures))
    return cases


def render(cases: List[dict], where: str, seconds: float) -> str:
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    lines = [
        f"gpu-check on {where}: {len(cases) - counts['skipped']} ran ({counts['passed']} passed, "
        f"{counts['failed']} failed), {counts['skipped']} skipped, {seconds:.0f} s"
    ]
    for c in cases:
        why = f"  ({c['why']})" if c["why"] else ""
        lines.append(f"  {c['outcome']:<8}{c['seconds']:7.1f}s  {c['name']}{why}")
        lines += [f"      {name} = {value}" for name, value in sorted(c["figures"].items())]
    return "\n".join(lines)


def main(argv: List[str]) -> int:
    root = Path(__file__).resolve().parents[2]
    files = gpu_test_files(root)
    reason = why_not()
    if reason is not None:
        print(f"gpu-check: nothing ran: {reason}.\n  The gpu-marked tests of {', '.join(files)} need a CUDA GPU "
              f"(1 to 8 on one node); run `make gpu-check` on such a machine.")
        return 0
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # DeepSpeed picks CUDA
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "gpu.xml")
        start = time.monotonic()
        rc = subprocess.call([
            sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-o", "junit_family=xunit1",
            f"--junitxml={junit}", *files, *argv
        ],
                             cwd=root,
                             env=env)
        seconds = time.monotonic() - start
        cases = read_junit(junit) if os.path.exists(junit) else []
    print("\n" + render(cases, devices(), seconds))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
