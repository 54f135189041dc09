"""MoE layers and comparisons shared by the MoE layer tests on one rank and on two."""

import itertools

import torch
from torch import nn

H, B, T, E = 8, 2, 6, 4
RTOL, ATOL = 1e-6, 1e-7
MOE_CONFIGS = [
    dict(k=k, drop_tokens=d, use_residual=r) for k, d, r in itertools.product((1, 2), (True, False), (False, True))
]


def expert(dropout=True):
    # Dropout: random numbers must be drawn in DeepSpeed's order too.
    if not dropout:
        return nn.Sequential(nn.Linear(H, 16), nn.GELU(), nn.Linear(16, H))
    return nn.Sequential(nn.Linear(H, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, H))


def moe_pair(k, drop_tokens, use_residual, ep_size=1, rank=0):
    """DeepSpeed's MoE and a DualPipeMoE holding the same weights (experts differ per rank).

    With ``drop_tokens=False`` the experts have no dropout: DualPipeMoE's dispatch buffers then hold one
    row per token for every expert (no host sync), DeepSpeed's the largest load, so a random layer inside
    the experts would draw its numbers over another shape (the same tokens still meet the same weights)."""
    from deepspeed.moe.layer import MoE
    from deepspeed_dualpipe.moe import DualPipeMoE

    def kw():
        return dict(hidden_size=H,
                    expert=expert(dropout=drop_tokens),
                    num_experts=E,
                    ep_size=ep_size,
                    k=k,
                    capacity_factor=1.0,
                    min_capacity=2,
                    drop_tokens=drop_tokens,
                    use_residual=use_residual)

    torch.manual_seed(0)
    ref, ours = MoE(**kw()), DualPipeMoE(**kw())
    if ep_size > 1:
        ref.set_deepspeed_parallelism()
        ours.set_deepspeed_parallelism()
    with torch.no_grad():
        for p in ref.deepspeed_moe.experts.parameters():
            p.add_(0.1 * rank * torch.randn_like(p))
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def plain_forward_backward(layer, x, w, seed=7):
    """Forward + backward of (out * w).sum() + 0.3 * l_aux; everything that must match."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out, l_aux, counts = layer(x)
    ((out * w).sum() + 0.3 * l_aux).backward()
    return {
        "out": out,
        "l_aux": l_aux,
        "exp_counts": counts,
        "x.grad": x.grad,
        **{
            n: p.grad
            for n, p in layer.named_parameters()
        }
    }


def mismatches(got, want, exact=True):
    """Names whose tensors differ (bit-equal when ``exact``, else within RTOL/ATOL)."""
    bad = []
    assert set(got) == set(want), set(got) ^ set(want)
    for name in want:
        a, b = got[name], want[name]
        if a is None or b is None:
            if a is not b:
                bad.append(f"{name}: one side has no gradient")
        elif a.shape != b.shape or not (torch.equal(a, b) if exact else torch.allclose(a, b, RTOL, ATOL)):
            diff = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else a.shape
            bad.append(f"{name}: max diff {diff}")
    return bad


def moe_equivalence(configs, ep_size, rank):
    torch.manual_seed(100 + rank)  # different tokens on every rank
    x, w = torch.randn(B, T, H), torch.randn(B, T, H)
    bad = []
    for cfg in configs:
        ref, ours = moe_pair(**cfg, ep_size=ep_size, rank=rank)
        # drop_tokens=False: DualPipeMoE dispatches one row per token (no host sync for the capacity), so the
        # experts' bias gradients sum over more (zero) rows than DeepSpeed's and may round differently
        exact = cfg.get("drop_tokens", True)
        bad += [
            f"{cfg}: {m}"
            for m in mismatches(plain_forward_backward(ours, x, w), plain_forward_backward(ref, x, w), exact=exact)
        ]
    return bad


def moe_block(dense=False, ep_size=1, **kw):
    from deepspeed_dualpipe.moe import MoETransformerBlock
    return MoETransformerBlock(H, num_heads=2, num_experts=E, ep_size=ep_size, ffn_hidden_size=12, dense=dense, **kw)


def grads(module):
    return {n: p.grad for n, p in module.named_parameters()}
