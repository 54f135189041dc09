import ast
import json
import os
import py_compile
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import deepspeed
from deepspeed.pipe import PipelineModule

from deepspeed_dualpipe.integration import chunked, initialize as entry
from deepspeed_dualpipe.integration.recording import INIT_ARGS_ATTR, record_pipeline_module_args

PATCH = Path(__file__).resolve().parents[2] / "patches" / "deepspeed-0.19.8-dualpipe.patch"
DS_INIT = Path(deepspeed.__file__)


class FakeDualPipeModule:
    """Stands in for DualPipeModule: remembers the module it was rebuilt from."""

    built = []

    def __init__(self, source, schedule):
        self.source, self.schedule = source, schedule
        FakeDualPipeModule.built.append(self)


def fake_rebuild(original, base, **extra):
    """Stands in for integration.chunked.rebuild (which needs torch.distributed)."""
    return base(original, **extra)


class FakeDualPipeEngine:
    pass


class FakeDeepSpeed:
    """Stands in for deepspeed.initialize: records each call and the engine name it would use."""

    def __init__(self, raises=None):
        self.calls, self.raises = [], raises

    def __call__(self, args=None, model=None, **kwargs):
        self.calls.append(dict(args=args, model=model, engine=deepspeed.PipelineEngine, **kwargs))
        if self.raises:
            raise self.raises
        return ("engine", "optimizer", "dataloader", "lr_scheduler")


def pipeline_module(*args, recorded=True, **kwargs):
    """A PipelineModule instance without building one (that needs torch.distributed), recorded as if
    it had been built with ``args`` and ``kwargs`` (default: one stand-in layer list)."""
    module = PipelineModule.__new__(PipelineModule)
    if recorded:
        module.__dict__[INIT_ARGS_ATTR] = (args or (["layer"], ), kwargs)
    return module


def ds_config(schedule=None, **extra):
    config = dict(train_batch_size=8, **extra)
    if schedule:
        config["pipeline"] = {"schedule": schedule}
    return config


@pytest.fixture
def fake_ds(monkeypatch):
    fake = FakeDeepSpeed()
    monkeypatch.setattr(deepspeed, "initialize", fake)
    monkeypatch.setattr(entry, "_plugin_classes", lambda: (FakeDualPipeModule, FakeDualPipeEngine))
    monkeypatch.setattr(chunked, "rebuild", fake_rebuild)
    yield fake
    entry.uninstall()


def test_1f1b_calls_deepspeed_initialize_unchanged(fake_ds):
    model, config = pipeline_module(), ds_config("1f1b")
    assert entry.initialize(model=model, config=config,
                            training_data=[1]) == ("engine", "optimizer", "dataloader", "lr_scheduler")
    (call, ) = fake_ds.calls
    assert call["model"] is model and call["config"] is config and call["training_data"] == [1]
    assert call["engine"] is deepspeed.runtime.pipe.engine.PipelineEngine


def test_absent_schedule_is_1f1b(fake_ds):
    model = pipeline_module()
    entry.initialize(model=model, config=ds_config())
    assert fake_ds.calls[0]["model"] is model
    assert fake_ds.calls[0]["engine"] is deepspeed.runtime.pipe.engine.PipelineEngine


def test_a_model_that_is_not_a_pipeline_module_goes_to_deepspeed_unchanged(fake_ds):
    import torch
    model = torch.nn.Linear(2, 2)
    entry.initialize(model=model, config=ds_config("dualpipev"))
    assert fake_ds.calls[0]["model"] is model
    assert fake_ds.calls[0]["engine"] is deepspeed.runtime.pipe.engine.PipelineEngine


@pytest.mark.parametrize("schedule", ["zb1p", "dualpipe", "dualpipev"])
def test_plugin_schedule_converts_the_model_and_swaps_the_engine_only_during_the_call(fake_ds, schedule):
    model, config = pipeline_module(), ds_config(schedule)
    result = entry.initialize(model=model, config=config)
    assert result == ("engine", "optimizer", "dataloader", "lr_scheduler")
    (call, ) = fake_ds.calls
    assert call["engine"] is FakeDualPipeEngine
    assert isinstance(call["model"], FakeDualPipeModule)
    assert (call["model"].source, call["model"].schedule) == (model, schedule)
    assert call["config"]["pipeline"]["schedule"] == schedule  # kept for DeepSpeed to ignore
    assert deepspeed.PipelineEngine is deepspeed.runtime.pipe.engine.PipelineEngine


def test_engine_name_is_restored_when_deepspeed_initialize_raises(fake_ds):
    fake_ds.raises = RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        entry.initialize(model=pipeline_module(), config=ds_config("dualpipev"))
    assert fake_ds.calls[0]["engine"] is FakeDualPipeEngine
    assert deepspeed.PipelineEngine is deepspeed.runtime.pipe.engine.PipelineEngine
    assert not entry._ACTIVE


def test_an_already_converted_model_is_not_converted_again(fake_ds):
    converted = type("Converted", (FakeDualPipeModule, PipelineModule), {})
    model = converted.__new__(converted)  # a PipelineModule and a DualPipeModule, built without dist
    model.schedule = "zb1p"
    entry.initialize(model=model, config=ds_config("zb1p"))
    assert fake_ds.calls[0]["model"] is model


def test_config_is_found_in_args_deepspeed_config_as_a_json_path(fake_ds, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_config("zb1p")))
    args = types.SimpleNamespace(deepspeed_config=str(path))
    entry.initialize(args=args, model=pipeline_module())
    assert fake_ds.calls[0]["engine"] is FakeDualPipeEngine
    assert fake_ds.calls[0]["args"] is args and args.deepspeed_config == str(path)  # args left as given


def test_config_params_is_honoured_like_deepspeed_does(fake_ds):
    entry.initialize(model=pipeline_module(), config_params=ds_config("dualpipe"))
    assert fake_ds.calls[0]["engine"] is FakeDualPipeEngine


def test_positional_arguments_keep_deepspeeds_order(fake_ds):
    opt = object()
    entry.initialize(None, pipeline_module(), opt, config=ds_config("1f1b"))
    assert fake_ds.calls[0]["optimizer"] is opt


def test_a_bad_config_is_rejected_before_deepspeed_is_called(fake_ds):
    with pytest.raises(ValueError, match="pipeline.schedule='dualpip'"):
        entry.initialize(model=pipeline_module(), config=ds_config("dualpip"))
    with pytest.raises(ValueError, match="zero_optimization.stage"):
        entry.initialize(model=pipeline_module(), config=ds_config("dualpipev", zero_optimization={"stage": 3}))
    assert fake_ds.calls == []


def test_ds_dualpipev_rebuilds_the_module_as_deepspeeds_dualpipev_module(fake_ds, monkeypatch):
    import deepspeed.runtime.pipe.dualpipev as ds_dualpipev

    class FakeDualPipeVModule:

        def __init__(self, source):
            self.source = source

    monkeypatch.setattr(ds_dualpipev, "DualPipeVModule", FakeDualPipeVModule)
    model = pipeline_module(["spec"], 2, partition_method="uniform")
    entry.initialize(model=model, config=ds_config("ds-dualpipev"))
    (call, ) = fake_ds.calls
    assert isinstance(call["model"], FakeDualPipeVModule)
    assert call["model"].source is model
    assert call["engine"] is deepspeed.runtime.pipe.engine.PipelineEngine  # DeepSpeed picks DualPipeVEngine


def test_a_module_built_before_the_plugin_was_imported_cannot_be_rebuilt_and_says_so():
    from deepspeed.runtime.pipe.dualpipev import DualPipeVModule
    with pytest.raises(ValueError, match="Import deepspeed_dualpipe before building"):
        chunked.rebuild(pipeline_module(recorded=False), DualPipeVModule)


def test_a_reentrant_call_from_patched_deepspeed_goes_straight_through(fake_ds, monkeypatch):
    # The patched deepspeed.initialize calls entry.initialize, which calls deepspeed.initialize again.
    FakeDualPipeModule.built.clear()

    def patched(args=None, model=None, **kwargs):
        if not isinstance(model, FakeDualPipeModule):
            return entry.initialize(args, model, **kwargs)
        return fake_ds(args=args, model=model, **kwargs)

    monkeypatch.setattr(deepspeed, "initialize", patched)
    entry.install()
    deepspeed.initialize(model=pipeline_module(), config=ds_config("dualpipev"))
    assert len(FakeDualPipeModule.built) == 1 and fake_ds.calls[0]["engine"] is FakeDualPipeEngine


def test_install_routes_deepspeed_initialize_and_uninstall_restores_it(fake_ds):
    entry.install()
    wrapper = deepspeed.initialize
    assert wrapper is not fake_ds and entry.installed()
    entry.install()  # idempotent: no wrapper around the wrapper
    assert deepspeed.initialize is wrapper

    deepspeed.initialize(model=pipeline_module(), config=ds_config("dualpipev"))
    assert fake_ds.calls[-1]["engine"] is FakeDualPipeEngine
    deepspeed.initialize(None, pipeline_module(), config=ds_config("1f1b"))
    assert fake_ds.calls[-1]["engine"] is deepspeed.runtime.pipe.engine.PipelineEngine

    entry.uninstall()
    assert deepspeed.initialize is fake_ds and not entry.installed()
    entry.uninstall()  # idempotent
    assert deepspeed.initialize is fake_ds


def test_record_pipeline_module_args_wraps_init_once():
    record_pipeline_module_args()
    wrapped = PipelineModule.__init__
    record_pipeline_module_args()
    assert PipelineModule.__init__ is wrapped


def test_recorded_args_rebuild_a_real_module_as_dualpipev_module(tmp_path):
    """Builds real PipelineModules in a single-process gloo group (in a subprocess, so no process
    group leaks into other tests)."""
    script = textwrap.dedent("""
        import inspect, torch, deepspeed
        from deepspeed.pipe import PipelineModule, LayerSpec
        from deepspeed.runtime.pipe.dualpipev import DualPipeVModule
        from deepspeed_dualpipe.integration import convert
        from deepspeed_dualpipe.integration.recording import pipeline_module_init_args, record_pipeline_module_args
        record_pipeline_module_args()
        deepspeed.init_distributed(dist_backend="gloo")
        layers = (LayerSpec(torch.nn.Linear, 4, 4) for _ in range(4))  # a one-shot generator
        model = PipelineModule(layers=layers, num_stages=1, partition_method="uniform")
        args, kwargs = pipeline_module_init_args(model)
        got = inspect.signature(PipelineModule.__init__.__wrapped__).bind(None, *args, **kwargs).arguments
        assert got["partition_method"] == "uniform" and len(got["layers"]) == 4, got
        assert "_dualpipe_init_args" not in model.state_dict()
        rebuilt = convert.as_deepspeed_dualpipev(model)
        assert isinstance(rebuilt, DualPipeVModule) and len(rebuilt.phase_funcs[0]) == 2, rebuilt.phase_bounds
        assert convert.as_deepspeed_dualpipev(rebuilt) is rebuilt
        print("OK")
    """)
    env = dict(os.environ,
               DS_ACCELERATOR="cpu",
               RANK="0",
               LOCAL_RANK="0",
               WORLD_SIZE="1",
               LOCAL_SIZE="1",
               MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29500 + os.getpid() % 1000),
               PYTHONPATH=os.pathsep.join([str(PATCH.parent.parent),
                                           os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", script],
                         env=env,
                         capture_output=True,
                         text=True,
                         timeout=120,
                         cwd=tmp_path)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]


# --- the DeepSpeed patch -------------------------------------------------------------------------


@pytest.fixture
def ds_copy(tmp_path):
    (tmp_path / "deepspeed").mkdir()
    shutil.copy(DS_INIT, tmp_path / "deepspeed" / "__init__.py")
    return tmp_path


def test_patch_applies_cleanly_to_the_installed_deepspeed_and_compiles(ds_copy):
    if shutil.which("patch"):
        check = ["patch", "-p1", "--dry-run", "-i", str(PATCH)]
        apply = ["patch", "-p1", "-i", str(PATCH)]
    elif shutil.which("git"):
        check = ["git", "apply", "--check", str(PATCH)]
        apply = ["git", "apply", str(PATCH)]
    else:
        pytest.skip("neither `patch` nor `git` is installed")
    for cmd in (check, apply):
        run = subprocess.run(cmd, cwd=ds_copy, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
    patched = ds_copy / "deepspeed" / "__init__.py"
    py_compile.compile(str(patched), doraise=True)
    assert "deepspeed_dualpipe" in patched.read_text()


@pytest.mark.skipif(not shutil.which("git"), reason="`git` is not installed")
def test_patch_also_applies_with_git_apply(ds_copy):
    run = subprocess.run(["git", "apply", "--check", str(PATCH)], cwd=ds_copy, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.skipif(not shutil.which("patch"), reason="`patch` is not installed")
def test_patched_schedule_lookup_reads_config_like_initialize(ds_copy, tmp_path):
    subprocess.run(["patch", "-p1", "-s", "-i", str(PATCH)], cwd=ds_copy, check=True)
    tree = ast.parse((ds_copy / "deepspeed" / "__init__.py").read_text())
    (fn, ) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_dualpipe_schedule"]
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config
    ns = {"load_ds_config": load_ds_config}
    exec(compile(ast.Module([fn], []), "patched", "exec"), ns)
    lookup = ns["_dualpipe_schedule"]

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_config("zb1p")))
    assert lookup(None, ds_config("dualpipev"), None) == "dualpipev"
    assert lookup(None, None, ds_config("dualpipe")) == "dualpipe"
    assert lookup(types.SimpleNamespace(deepspeed_config=str(path)), None, None) == "zb1p"
    assert lookup(None, ds_config(), None) is None
    assert lookup(None, None, None) is None
    assert lookup(None, "/no/such/file.json", None) is None  # initialize reports it as before


# --- model_parameters of a rebuilt module -----------------------------------------------------------
