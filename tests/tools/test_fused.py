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


STEPS = 2
DEMO = ModelConfig(hidden_size=16, num_heads=2, num_layers=4, dense_layers=1, num_experts=2, max_positions=8)


def _train_demo_with_apex(batches):
    """In a rank: the demo model with apex's fused RMSNorm (the stand-in: a custom autograd Function that holds its
    weight) on 2 pipeline ranks under zbv through the real engine; the harness's result, the names of the
    parameters whose gradients a weight pass (W) computed, those of the fused norms, the other Linear layers', and
    what the stand-in saw."""
    import functools
    import deepspeed
    import deepspeed_dualpipe
    from deepspeed_dualpipe.runtime.autograd import split_backward
    from deepspeed_dualpipe.tools.lm.model import layer_specs, lm_loss
    from tests.helpers import harness
    used = apex_stand_in.install()
    deepspeed.init_distributed(dist_backend="gloo")
    engines, in_weight_pass = [], []
    real = split_backward._weight_pass

    def recording(group):
        in_weight_pass.extend(group.params.values())
        return real(group)

    def initialize(**kwargs):
        engines.append(deepspeed_dualpipe.initialize(**kwargs)[0])
        return (engines[-1], )

    split_backward._weight_pass = recording
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "pipeline": {
            "schedule": "zbv"
        }
    }
    result = harness.train_pipeline(initialize, config, functools.partial(layer_specs, DEMO), 2, STEPS, batches,
                                    lm_loss)
    module = engines[0].module
    names = {id(p): harness._global_name(n) for n, p in module.named_parameters()}
    of = lambda kind: sorted({names[id(p)] for m in module.modules() if isinstance(m, kind) for p in m.parameters()})
    deferred = sorted({names[id(p)] for p in in_weight_pass if id(p) in names})
    return result, deferred, of(apex_stand_in.FusedRMSNorm), of(torch.nn.Linear), dict(used)


@pytest.mark.slow
def test_with_apexs_fused_rmsnorm_the_linear_layers_weight_gradients_are_still_deferred_and_it_trains_like_one_process(
        monkeypatch):
    """A fused kernel is a custom autograd Function the split cannot see into: its weight's gradient comes with
    its one backward, in the input pass, while the Linear layers of its island still defer theirs to W."""
    import functools
    from deepspeed_dualpipe.moe import aux_loss_scale
    from deepspeed_dualpipe.tools.lm.model import layer_specs, lm_loss
    from tests.helpers import harness
    batches = harness.make_batches(seed=5, steps=2, dp=1, micro_batches=4, micro_batch_size=2)
    ranks = harness.run_distributed(_train_demo_with_apex, 2, batches)
    assert all(linears for *_, linears, _ in ranks[1:]), "rank 1 holds the blocks (zbv's V: chunks 1 and 2)"
    for _, deferred, norms, linears, used in ranks:
        assert norms and used["norm_backwards"] > 0
        assert not set(norms) & set(deferred), "a fused norm's weight gradient ran in a weight pass (twice)"
        assert set(linears) <= set(deferred), f"Linear weights not deferred: {sorted(set(linears) - set(deferred))}"
    monkeypatch.setitem(sys.modules, "apex", None)  # the one process: torch's RMSNorm
    results = [r for r, *_ in ranks]
    with aux_loss_scale(1 / 4):  # the reference's loss is the mean of 4 micro-batches' losses; the aux losses too
        reference = harness.train_reference(functools.partial(layer_specs, DEMO),
                                            harness.initial_params_from(results),
                                            batches,
                                            STEPS,
                                            loss_fn=lm_loss)
    harness.compare(results, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="apex's fused kernels run on CUDA; this machine has no GPU")
def test_nvidias_apex_on_a_gpu_computes_torchs_rmsnorm():
    FusedRMSNorm = fused.apex_rms_norm()
    if FusedRMSNorm is None:
        pytest.skip("NVIDIA apex is not installed on this GPU machine")
    x = torch.randn(4, 8, 64, device="cuda")
    ours, theirs = fused.ApexRMSNorm(64).cuda(), torch.nn.RMSNorm(64).cuda()
    assert torch.allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
