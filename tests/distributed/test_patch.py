"""The DeepSpeed patch end to end: apply it to a copy of the installed DeepSpeed and train through it.

The copy lives in ``tmp_path/site``; the ranks get that directory first on their path (and check
that ``import deepspeed`` really is the copy), then run an unmodified training script: build a
``PipelineModule`` and call plain ``deepspeed.initialize`` with ``pipeline.schedule = "dualpipe"``,
never importing ``deepspeed_dualpipe`` or calling ``install()`` themselves. The patched DeepSpeed
must hand the model to the plugin, which rebuilds it as a ``DualPipeModule`` and trains it with
``DualPipeEngine`` to the numbers of a single process.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import harness
from tests.helpers import models

PATCH = Path(__file__).resolve().parents[2] / "patches" / "deepspeed-0.19.8-dualpipe.patch"
P, MBS, STEPS, SEED = 2, 2, 3, 0


def ds_config():
    return {
        "train_micro_batch_size_per_gpu": MBS,
        "gradient_accumulation_steps": 2 * P,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19.8 clips at 1.0 by default; the reference is plain SGD
        "pipeline": {
            "schedule": "dualpipe"
        },
    }


def _patched_copy(site):
    """``site/deepspeed``: the installed DeepSpeed with the patch applied to its ``__init__.py``.

    Only ``__init__.py`` is copied (the patch touches nothing else); its ``__path__`` points at the
    installed package, so every submodule and DeepSpeed's prebuilt ops are the installed ones (a
    full copy would make DeepSpeed JIT-rebuild its ops for the new source path: minutes).
    """
    import deepspeed  # the installed one: this process never imports the copy

    if shutil.which("patch"):
        cmd = ["patch", "-p1", "--forward", "-i", str(PATCH)]
    elif shutil.which("git"):
        cmd = ["git", "apply", str(PATCH)]
    else:
        pytest.skip("neither `patch` nor `git` is installed: cannot apply the DeepSpeed patch")
    installed = Path(deepspeed.__file__).parent
    (site / "deepspeed").mkdir()
    shutil.copy(installed / "__init__.py", site / "deepspeed" / "__init__.py")
    run = subprocess.run(cmd, cwd=site, capture_output=True, text=True)
    assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout}{run.stderr}"
    init = site / "deepspeed" / "__init__.py"
    init.write_text(f"__path__ = [{str(installed)!r}]  # submodules: the installed ones\n" + init.read_text())


def _train_with_plain_deepspeed_initialize(site):
    """Runs in each rank, as an unmodified training script would."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    assert deepspeed.__file__.startswith(site), f"rank imported {deepspeed.__file__}, not the patched copy in {site}"
    assert hasattr(deepspeed, "_dualpipe_schedule"), "the copy in the rank is not patched"
    assert not getattr(deepspeed.initialize, "_dualpipe_installed", False), "install() must not be needed"

    engines = []

    def initialize(**kwargs):
        result = deepspeed.initialize(**kwargs)  # plain DeepSpeed API, the patch routes it
        engines.append(result[0])
        return result

    batches = harness.make_batches(SEED, STEPS, 1, 2 * P, MBS)
    result = harness.train_pipeline(initialize, ds_config(), models.tied_specs, P, STEPS, batches)
    (engine, ) = engines
    result["engine"] = f"{type(engine).__module__}.{type(engine).__qualname__}"
    result["module"] = f"{type(engine.module).__module__}.{type(engine.module).__qualname__}"
    result["pipeline_module"] = f"{PipelineModule.__module__}"
    return result


@pytest.mark.slow
def test_plain_deepspeed_initialize_trains_dualpipe_through_the_patched_copy(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    _patched_copy(site)

    # Spawned ranks take the parent's sys.path (multiprocessing's spawn preparation) and environment:
    # put the patched copy first in both while they start.
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    results = harness.run_distributed(_train_with_plain_deepspeed_initialize, P, str(site), timeout=120)

    assert [r["engine"] for r in results] == ["deepspeed_dualpipe.runtime.engine.DualPipeEngine"] * P
    assert [r["module"] for r in results] == ["deepspeed_dualpipe.runtime.module.DualPipeModule"] * P
    assert sorted(r["stage"] for r in results) == list(range(P))

    batches = harness.make_batches(SEED, STEPS, 1, 2 * P, MBS)
    reference = harness.train_reference(models.tied_specs, harness.initial_params_from(results), batches, STEPS)
    harness.compare(results, reference)
    assert reference["losses"][0] != reference["losses"][-1]  # training moved
