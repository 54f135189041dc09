import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

# DeepSpeed's CPU shm op is JIT-built once, at set-up (`make venv`), in TORCH_EXTENSIONS_DIR; every rank of the
# suite loads that build. ninja logs one link line per build: the summary says how many happened during the run
# (a rank that loads the op with other source paths or flags rebuilds it, ~35 s of both cores each time).
_SHM_LOG = Path(os.environ.get("TORCH_EXTENSIONS_DIR", "/nonexistent")) / "deepspeed_shm_comm" / ".ninja_log"


def _shm_op_builds() -> int:
    try:
        rows = [line.split("\t") for line in _SHM_LOG.read_text().splitlines() if not line.startswith("#")]
    except OSError:
        return 0
    return sum(len(row) > 3 and row[3].endswith(".so") for row in rows)  # start, end, mtime, output, hash


def pytest_sessionstart(session):
    session.config._shm_op_builds = _shm_op_builds()


def pytest_terminal_summary(terminalreporter, config):
    built = _shm_op_builds() - getattr(config, "_shm_op_builds", 0)
    if built:
        terminalreporter.write_line(
            f"DeepSpeed's shm op was compiled {built} time(s) during this run, in {_SHM_LOG.parent} "
            "(expected none: `make venv` builds it once; see tests/conftest.py)",
            yellow=True)
