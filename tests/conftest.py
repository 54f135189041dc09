import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

# DeepSpeed's CPU shm op is JIT-built once, at set-up (`make venv`), in TORCH_EXTENSIONS_DIR, and every rank of the
# suite loads that build. A process whose DeepSpeed lives at another path, or that passes other flags, makes torch
# rewrite build.ninja and compile again (~35 s of both cores, inside some test's time limit); the summary says so.
_SHM_OP = Path(os.environ.get("TORCH_EXTENSIONS_DIR", "/nonexistent")) / "deepspeed_shm_comm"


def _read(name: str) -> str:
    try:
        return (_SHM_OP / name).read_text()
    except OSError:
        return ""


def _shm_op_state():
    """(links ninja logged, build.ninja): one link line per completed build, build.ninja rewritten per new flags."""
    rows = [line.split("\t") for line in _read(".ninja_log").splitlines() if not line.startswith("#")]
    return sum(len(row) > 3 and row[3].endswith(".so") for row in rows), _read("build.ninja")


def pytest_sessionstart(session):
    session.config._shm_op_state = _shm_op_state()


def pytest_terminal_summary(terminalreporter, config):
    (links_before, flags_before), (links, flags) = getattr(config, "_shm_op_state", (0, "")), _shm_op_state()
    if links > links_before or flags != flags_before:
        rewritten = "; build.ninja rewritten: other flags or sources" if flags != flags_before else ""
        terminalreporter.write_line(
            f"DeepSpeed's shm op was rebuilt during this run ({links - links_before} completed build(s){rewritten}) "
            f"in {_SHM_OP}; expected never: `make venv` builds it once for the suite (tests/conftest.py)",
            yellow=True)


@pytest.fixture
def warnings_logged():
    """The records DeepSpeed's logger emits at WARNING and above while the test runs."""
    import logging
    from deepspeed.utils import logger
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
