"""The MoE layer on two expert-parallel ranks: DualPipeMoE equals DeepSpeed's MoE, and interleaving one
micro-batch's backward with another's forward gives the numbers of running them in turn."""

import pytest
import torch

from tests.helpers import harness
from tests.helpers.moe_layers import B, H, MOE_CONFIGS, T, moe_block, grads, mismatches, moe_equivalence


def _moe_equivalence_rank(configs):
    import deepspeed.comm as dist
    return moe_equivalence(configs, ep_size=2, rank=dist.get_rank())


@pytest.mark.slow
def test_dualpipe_moe_is_bit_equal_to_deepspeed_moe_on_two_expert_parallel_ranks():
    results = harness.run_distributed(_moe_equivalence_rank, 2, MOE_CONFIGS)
    assert results == [[], []]


# ----- interleaving two micro-batches on 2 expert-parallel ranks ----------------------------------
def _interleave_rank(configs):
    import deepspeed.comm as dist
    from deepspeed_dualpipe.runtime.autograd.steps import Tape, backward_steps, forward_steps, interleave, run

    rank, bad, overlapped = dist.get_rank(), [], []
    for cfg in configs:
        blocks = []
        for _ in range(3):
            torch.manual_seed(0)
            blk = moe_block(ep_size=2, **cfg)
            blk.moe.set_deepspeed_parallelism()  # what deepspeed.initialize does for every MoE
            blocks.append(blk)
        with torch.no_grad():
            for p in blocks[0].moe.deepspeed_moe.experts.parameters():
                p.add_(0.1 * rank * torch.randn_like(p))
        blocks[1].load_state_dict(blocks[0].state_dict())
        blocks[2].load_state_dict(blocks[0].state_dict())
        torch.manual_seed(100 + rank)
        xs = [torch.randn(B, T, H, requires_grad=True) for _ in range(2)]
        dys = [torch.randn(B, T, H) for _ in range(2)]
        results = []
        for blk, together in zip(blocks[:2], (False, True)):
            ins = [x.detach().clone().requires_grad_() for x in xs]
            tapes = [Tape(), Tape()]
            ya = run(forward_steps([blk], ins[0], tapes[0]))
            if together:  # micro-batch A's backward beside micro-batch B's forward
                events = []
                (ga, wa), yb = interleave(backward_steps(tapes[0], ya, dys[0]),
                                          forward_steps([blk], ins[1], tapes[1]),
                                          events=events,
                                          labels=("A", "B"))
                comms = [(s, e) for label, s, e in events if label.startswith("A:")]
                computes = [s for label, s, e in events if label == "B:compute"]
                overlapped.append(any(s0 <= s <= e0 for s0, e0 in comms for s in computes))
            else:
                ga, wa = run(backward_steps(tapes[0], ya, dys[0]))
                yb = run(forward_steps([blk], ins[1], tapes[1]))
            gb, wb = run(backward_steps(tapes[1], yb, dys[1]))
            wa.weight_part()
            wb.weight_part()
            results.append({"yA": ya, "yB": yb, "gA": ga[0], "gB": gb[0], **grads(blk)})
        ins = [x.detach().clone().requires_grad_() for x in xs]  # and a plain forward + backward
        ys = [blocks[2](x) for x in ins]
        for y, dy in zip(ys, dys):
            y.backward(dy)
        plain = {"yA": ys[0], "yB": ys[1], "gA": ins[0].grad, "gB": ins[1].grad, **grads(blocks[2])}
        bad += [f"{cfg} interleaved: {m}" for m in mismatches(results[1], results[0], exact=False)]
        bad += [f"{cfg} phases vs plain: {m}" for m in mismatches(results[0], plain, exact=False)]
    return bad, overlapped


@pytest.mark.slow
def test_interleaving_a_backward_with_a_forward_on_two_ranks_matches_running_them_in_turn():
    configs = [dict(k=2, drop_tokens=True), dict(k=1, drop_tokens=False)]
    results = harness.run_distributed(_interleave_rank, 2, configs)
    for bad, overlapped in results:
        assert bad == []
        assert overlapped == [True, True], "B's compute never ran while A's all-to-all was in flight"
