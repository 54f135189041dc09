import pytest


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """One directory per test module: its ranks save there once, and its tests read what they left."""
    return str(tmp_path_factory.mktemp("checkpoints"))
