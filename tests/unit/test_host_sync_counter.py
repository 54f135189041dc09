"""The host-sync counter behind tests/distributed/test_host_syncs.py sees every kind of call it names."""

import pytest
import torch

from deepspeed_dualpipe.runtime.gradients import GradientReductions
from deepspeed_dualpipe.testing.host_syncs import count_host_syncs


def test_every_host_reading_call_is_counted_and_nothing_after_the_context():
    t = torch.tensor([0.5, 2.0])
    with count_host_syncs() as counts:
        if t[0] < 1:  # a branch on a tensor: __bool__
            pass
        t[0].item(), t.tolist(), t.cpu(), t.numpy(), int(t[1]), float(t[0])
        torch.cuda.synchronize() if torch.cuda.is_available() else None
    assert {
        k: counts[k]
        for k in ("__bool__", "item", "tolist", "cpu", "numpy", "__int__", "__float__")
    } == dict.fromkeys(("__bool__", "item", "tolist", "cpu", "numpy", "__int__", "__float__"), 1)
    t[0].item()
    assert sum(counts.values()) == 7 + (1 if torch.cuda.is_available() else 0)


class _OneRankClipping:
    """Just what the engine's ``clip_fp32_gradients`` reads, on one rank: a module, the clip value, every
    gradient counted (the counting rule is the distributed tests' business), the engine's own squared norm."""

    def __init__(self, module, clip):
        self.module, self.device, self._clip = module, torch.device("cpu"), clip

    def gradient_clipping(self):
        return self._clip

    def _counts_in_norm(self, p):
        return True

    _squared_norm = GradientReductions._squared_norm


def test_the_engines_gradient_clipping_needs_no_host_sync(monkeypatch):
    from deepspeed_dualpipe.runtime import gradients
    monkeypatch.setattr(gradients.dist, "all_reduce", lambda tensor, *args, **kwargs: None)  # one rank: the sum
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    grads = [p.grad.clone() for p in module.parameters()]
    with count_host_syncs() as counts:
        coefficient = GradientReductions.clip_fp32_gradients(_OneRankClipping(module, 0.1))
    assert sum(counts.values()) == 0, dict(counts)
    norm = torch.cat([g.flatten() for g in grads]).norm()
    assert float(coefficient) == pytest.approx(0.1 / (float(norm) + 1e-6))  # it clipped: the path was taken
    for p, g in zip(module.parameters(), grads):
        torch.testing.assert_close(p.grad, g * coefficient)
