"""NVIDIA apex's fused RMSNorm and FusedAdam in the demo where apex is installed, torch's otherwise, and one
line saying which. apex is never installed here: its path runs through a stand-in that records its use."""

import sys

import pytest
import torch

from deepspeed_dualpipe.tools.lm import fused
from deepspeed_dualpipe.tools.lm.model import LocalModel, ModelConfig, layer_specs
from tests.helpers import apex_stand_in

TINY = ModelConfig(hidden_size=16, num_heads=2, num_layers=2, dense_layers=1, num_experts=2, max_positions=8)
CONFIG = {"optimizer": {"type": "Adam", "params": {"lr": 0.003, "betas": [0.9, 0.95], "torch_adam": True}}}


@pytest.fixture
def no_apex(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)  # import apex raises ImportError


@pytest.fixture
def apex(monkeypatch):
    modules = {}
    used = apex_stand_in.install(modules)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    for key in used:
        used[key] = 0
    return used


def _norms(model):
    return [m for m in model.modules() if "RMSNorm" in type(m).__name__]


def test_without_apex_the_model_uses_torchs_rmsnorm_and_says_so(no_apex):
    model = LocalModel(layer_specs(TINY))
    assert _norms(model) and all(type(m) is torch.nn.RMSNorm for m in _norms(model))
    factory, config, text = fused.optimizer(CONFIG, True, "cuda")
    assert factory is None and config is CONFIG
    line = fused.describe(fused.rms_norm(), text)
    assert line == ("[lm] kernels: RMSNorm torch.nn.RMSNorm (NVIDIA apex not found); optimizer the config's "
                    "optimizer (Adam); lm.fused_adam asked for apex FusedAdam, but NVIDIA apex is not installed")


def test_the_unrelated_pypi_package_named_apex_is_not_taken_for_nvidias(monkeypatch):
    modules = {}
    apex_stand_in.install_unrelated(modules)
    monkeypatch.setitem(sys.modules, "apex", modules["apex"])
    monkeypatch.delitem(sys.modules, "apex.normalization", raising=False)
    assert fused.rms_norm() is torch.nn.RMSNorm and fused.apex_fused_adam() is None


def test_with_apex_every_rmsnorm_is_apexs_and_computes_what_torchs_does(apex, monkeypatch):
    torch.manual_seed(0)
    model = LocalModel(layer_specs(TINY))
    norms = _norms(model)
    assert len(norms) == 2 * TINY.num_layers + 1 and all(type(m) is apex_stand_in.FusedRMSNorm for m in norms)
    tokens = torch.randint(0, 256, (2, 8))
    out = model(tokens)
    assert apex["norm_forwards"] == len(norms)
    monkeypatch.setitem(sys.modules, "apex", None)
    torch.manual_seed(0)
    plain = LocalModel(layer_specs(TINY))
    assert torch.allclose(plain(tokens), out, rtol=1e-5, atol=1e-6)
    assert fused.describe(fused.ApexRMSNorm, "x").startswith("[lm] kernels: RMSNorm apex FusedRMSNorm;")


def test_with_apex_on_cuda_fused_adam_replaces_the_configs_optimizer(apex):
    factory, config, text = fused.optimizer(CONFIG, True, "cuda")
    assert "optimizer" not in config and text.startswith("apex FusedAdam")
    optimizer = factory([torch.nn.Parameter(torch.ones(2))])
    assert type(optimizer) is apex_stand_in.FusedAdam and apex["adams"] == 1
    assert optimizer.defaults["lr"] == 0.003 and optimizer.defaults["betas"] == (0.9, 0.95)


def test_fused_adam_is_not_used_on_cpu_or_unless_asked_and_the_line_says_why(apex):
    factory, config, text = fused.optimizer(CONFIG, True, "cpu")
    assert factory is None and config is CONFIG and "runs on CUDA only, and this job runs on cpu" in text
    factory, config, text = fused.optimizer(CONFIG, False, "cuda")
    assert factory is None and text == "the config's optimizer (Adam)"


def _train_demo(with_apex):
    """In a rank: the demo model on 2 pipeline ranks for 2 steps; the losses and what the stand-in saw."""
    import deepspeed
    from deepspeed_dualpipe.tools.lm import data as D
    from deepspeed_dualpipe.tools.lm.train import LMConfig, build_engine
    used = apex_stand_in.install() if with_apex else None
    if not with_apex:
        sys.modules["apex"] = None
    deepspeed.init_distributed(dist_backend="gloo")
    lm = LMConfig(pipeline_stages=2, seq_len=8, model=TINY)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "pipeline": {
            "schedule": "zbv"
        },
        **CONFIG
    }
    engine = build_engine(config, lm)
    train, val = D.split(D.corpus())
    batches = D.Batches(train, val, lm.seq_len, 2, 4)
    losses = [float(engine.train_batch(iter(batches.train_step(s)))) for s in range(2)]
    types = sorted({type(m).__name__ for m in engine.module.modules() if "RMSNorm" in type(m).__name__})
    return losses, types, dict(used) if used else None


@pytest.mark.slow
def test_through_the_real_engine_the_apex_path_trains_to_the_numbers_of_the_torch_path():
    from tests.helpers.harness import run_distributed
    plain = run_distributed(_train_demo, 2, False)
    stood_in = run_distributed(_train_demo, 2, True)
    for (losses, types, _), (apex_losses, apex_types, used) in zip(plain, stood_in):
        assert types == ["RMSNorm"] and apex_types == ["FusedRMSNorm"]
        assert used["norm_forwards"] > 0
        assert apex_losses == pytest.approx(losses, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="apex's fused kernels run on CUDA; this machine has no GPU")
def test_nvidias_apex_on_a_gpu_computes_torchs_rmsnorm():
    FusedRMSNorm = fused.apex_rms_norm()
    if FusedRMSNorm is None:
        pytest.skip("NVIDIA apex is not installed on this GPU machine")
    x = torch.randn(4, 8, 64, device="cuda")
    ours, theirs = fused.ApexRMSNorm(64).cuda(), torch.nn.RMSNorm(64).cuda()
    assert torch.allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
