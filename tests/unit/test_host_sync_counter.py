"""The host-sync counter behind tests/distributed/test_host_syncs.py sees every kind of call it names."""

import torch

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


def test_clipping_by_a_clamped_coefficient_needs_no_host_sync_where_a_branch_would():
    grads = [torch.ones(3), torch.ones(2)]
    coefficient = 0.1 / (torch.stack(torch._foreach_norm(grads, 2)).pow(2).sum().sqrt() + 1e-6)
    with count_host_syncs() as counts:
        torch._foreach_mul_(grads, coefficient.clamp(max=1.0))
    assert sum(counts.values()) == 0
    with count_host_syncs() as counts:
        if coefficient < 1:  # the old clipping: a branch on the coefficient
            pass
    assert counts["__bool__"] == 1
