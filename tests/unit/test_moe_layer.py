"""The MoE layer override (issue 4, layer side): DualPipeMoE, MoETransformerBlock and the phases.

Promises:
* DualPipeMoE is DeepSpeed's MoE with the same numbers: outputs, l_aux, exp_counts and every
  gradient bit-equal, on 1 rank and on 2 expert-parallel ranks, for k 1/2, token dropping on/off,
  residual MoE;
* running a chunk as phases (islands, split backward, deferred weight part) gives the gradients
  of a plain forward + backward;
* interleaving one micro-batch's backward with another's forward (all-to-alls of both in flight)
  gives the same numbers as running them one after the other;
* the aux loss attached to the output gets the gradient of (loss + coef * l_aux) / M.
"""

import copy

import pytest
import torch
from torch import nn

from tests.helpers.moe_layers import (ATOL, B, H, MOE_CONFIGS, RTOL, T, grads, mismatches, moe_block, moe_equivalence,
                                      moe_pair, plain_forward_backward)


# ----- DualPipeMoE == DeepSpeed's MoE -------------------------------------------------------------
@pytest.mark.parametrize("cfg", MOE_CONFIGS + [dict(k=3, drop_tokens=True, use_residual=False)], ids=str)
def test_dualpipe_moe_is_bit_equal_to_deepspeed_moe_on_one_rank(cfg):
    assert moe_equivalence([cfg], ep_size=1, rank=0) == []


def test_without_token_dropping_the_capacity_needs_no_all_reduce_and_no_device_sync(monkeypatch):
    # DeepSpeed's gate all-reduces the largest expert load over the expert-parallel group and the layer
    # then reads it with int(): a host sync, queued behind the other micro-batch's all-to-all. DualPipeMoE
    # dispatches one row per token to every expert instead, a capacity known from the shapes.
    from deepspeed.moe import sharded_moe
    reduced = []
    monkeypatch.setattr(sharded_moe.dist, "all_reduce", lambda tensor, **kw: reduced.append(tensor.device))
    monkeypatch.setattr(sharded_moe.pg_utils, "is_parallel", lambda group: True)  # as with ep_size > 1
    ref, ours = moe_pair(k=2, drop_tokens=False, use_residual=False)
    x = torch.randn(B, T, H)
    ref(x)
    assert len(reduced) == 1  # DeepSpeed's
    reduced.clear()
    dispatched = ours.gate_phase(x)[0]
    assert reduced == [] and dispatched.shape[1] == B * T  # capacity: every token
    gate = ours.deepspeed_moe.gate
    assert (gate.drop_tokens, gate.capacity_factor, gate.eval_capacity_factor, gate.min_capacity) == (False, 1.0, 1.0,
                                                                                                      2)


def test_dualpipe_moe_keeps_deepspeeds_expert_parameter_attributes():
    _, ours = moe_pair(k=2, drop_tokens=True, use_residual=True)
    experts = list(ours.deepspeed_moe.experts.parameters())
    assert experts and all(p.allreduce is False and p.group_name == "ep_size_1" for p in experts)
    others = [p for p in ours.parameters() if all(p is not q for q in experts)]
    assert others and not any(hasattr(p, "allreduce") for p in others)


# ----- phases == plain forward + backward ---------------------------------------------------------
CHUNKS = {
    "moe block": lambda: [moe_block()],
    "dense block": lambda: [moe_block(dense=True)],
    "moe block + linear": lambda: [moe_block(), nn.Linear(H, H)],
    "embedding + block + linear":
    lambda: [nn.Embedding(11, H), moe_block(k=1, drop_tokens=False),
             nn.Linear(H, H)],
}

RECOMPUTE_ALL = ("block", "attention+gate", "experts", "shared_expert", "decode+residual", "Linear", "Embedding")


@pytest.mark.parametrize("recompute", [(), RECOMPUTE_ALL, ("attention+gate", )],
                         ids=["stored", "recompute-all", "recompute-attention"])
@pytest.mark.parametrize("loss_root", [False, True], ids=["output-grads", "scalar-loss"])
@pytest.mark.parametrize("chunk", list(CHUNKS))
def test_phases_with_split_backward_give_the_gradients_of_a_plain_backward(chunk, loss_root, recompute):
    from deepspeed_dualpipe.runtime.autograd.steps import Tape, backward_steps, forward_steps, run

    torch.manual_seed(0)
    plain = nn.Sequential(*CHUNKS[chunk]())
    phased = copy.deepcopy(plain)
    ints = isinstance(plain[0], nn.Embedding)
    x = torch.randint(0, 11, (B, T)) if ints else torch.randn(B, T, H, requires_grad=True)
    w = torch.randn(B, T, H)

    y = plain(x)
    (y * w).sum().backward()

    x2 = x.clone() if ints else x.detach().clone().requires_grad_()
    tape = Tape(recompute=recompute)
    y2 = run(forward_steps(list(phased), x2, tape))
    assert torch.equal(y2, y)
    roots, root_grads = ((y2 * w).sum(), None) if loss_root else (y2, w)
    input_grads, weights = run(backward_steps(tape, roots, root_grads, split=True))
    # Deferred everywhere, except an island whose inputs are all integers (the embedding): torch can
    # reach its weights only by a full backward (see split_backward.py).
    early = [n for n, p in phased.named_parameters() if p.grad is not None]
    assert weights.split and early == (["0.weight"] if ints else []), "weight gradients were not deferred"
    weights.weight_part()

    assert input_grads == (None, ) if ints else torch.allclose(input_grads[0], x.grad, RTOL, ATOL)
    assert mismatches(grads(phased), grads(plain), exact=False) == []


def test_a_recomputed_island_keeps_only_its_inputs_until_the_backward():
    """Attention's q, k, v and probabilities (saved by its ops) are gone after the forward of a recomputed
    attention+gate island; stored, they live until the backward."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from deepspeed_dualpipe.runtime.autograd.steps import Tape, backward_steps, forward_steps, run

    for recompute, kept in ((("attention+gate", ), False), ((), True)):
        torch.manual_seed(0)
        block = moe_block()
        seen = []
        hook = block.attn.qkv.register_forward_hook(lambda m, i, o: seen.append(StorageWeakRef(o.untyped_storage())))
        tape, x = Tape(recompute=recompute), torch.randn(B, T, H, requires_grad=True)
        y = run(forward_steps([block], x, tape))
        hook.remove()
        assert (not seen[0].expired()) is kept, recompute
        run(backward_steps(tape, y, torch.ones_like(y)))[1].weight_part()


def test_dualpipe_moe_phases_carry_the_aux_loss_gradient_back_to_the_gate():
    """l_aux comes out of the first island: a loss using it reaches back past the last island."""
    from deepspeed_dualpipe.runtime.autograd.steps import Tape, backward_steps, run

    plain, _ = moe_pair(k=2, drop_tokens=True, use_residual=True)
    _, phased = moe_pair(k=2, drop_tokens=True, use_residual=True)
    phased.load_state_dict(plain.state_dict())
    x, w = torch.randn(B, T, H), torch.randn(B, T, H)
    want = plain_forward_backward(plain, x, w)

    x2 = x.clone().requires_grad_()
    tape = Tape()
    torch.manual_seed(7)
    out, l_aux, counts = run(phased.forward_steps(tape, x2))
    (input_grad, ), weights = run(backward_steps(tape, (out * w).sum() + 0.3 * l_aux))
    weights.weight_part()
    got = {"out": out, "l_aux": l_aux, "exp_counts": counts, "x.grad": input_grad, **grads(phased)}
    assert mismatches(got, want, exact=False) == []


def test_a_plain_callable_with_undeclared_parameters_gets_its_whole_backward_at_once():
    """A lambda closing over a parameter: the parameters are unknown, so no gradient may be left out."""
    from deepspeed_dualpipe.runtime.autograd.steps import Tape, backward_steps, forward_steps, run

    scale, linear = nn.Parameter(torch.tensor(1.5)), nn.Linear(H, H)
    layers = [lambda x: x * scale, linear]
    x = torch.randn(B, H, requires_grad=True)
    (linear(x * scale)**2).sum().backward()
    want = {"x": x.grad, "scale": scale.grad, **grads(linear)}
    scale.grad = linear.weight.grad = linear.bias.grad = None

    x2 = x.detach().clone().requires_grad_()
    tape = Tape()
    (input_grad, ), weights = run(backward_steps(tape, (run(forward_steps(layers, x2, tape))**2).sum()))
    assert scale.grad is not None and linear.weight.grad is None  # the lambda's island ran whole
    weights.weight_part()
    assert mismatches({"x": input_grad, "scale": scale.grad, **grads(linear)}, want, exact=False) == []


def test_tape_refuses_inputs_computed_outside_an_island():
    from deepspeed_dualpipe.runtime.autograd.steps import Tape

    tape = Tape()
    y = tape.compute(torch.sin, torch.randn(3, requires_grad=True))
    with pytest.raises(ValueError, match="inside a tape.compute island"):
        tape.compute(torch.cos, y * 2)


def test_a_failed_all_to_all_names_itself_and_its_ranks():
    from deepspeed_dualpipe.runtime.autograd.steps import Pending

    class Broken:

        def wait(self):
            raise RuntimeError("Connection closed by peer")

    with pytest.raises(RuntimeError, match=r"all-to-all 'dispatch' over ranks .* failed .*Connection closed by peer"):
        Pending(torch.zeros(1), Broken(), name="dispatch").wait()


# ----- aux loss -----------------------------------------------------------------------------------
def test_attach_aux_loss_returns_the_output_and_gives_l_aux_coefficient_times_scale():
    from deepspeed_dualpipe.moe import attach_aux_loss, aux_loss_scale, get_aux_loss_scale

    out, l_aux = torch.randn(3, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    y = attach_aux_loss(out, l_aux, 0.5)
    assert torch.equal(y, out)
    y.sum().backward()
    assert l_aux.grad.item() == 0.5 and torch.equal(out.grad, torch.ones(3))
    with aux_loss_scale(0.25):
        assert get_aux_loss_scale() == 0.25
    assert get_aux_loss_scale() == 1.0


def _block_and_l_aux(block, x):
    """What a single-process script with DeepSpeed's MoE computes: the block by hand, and the MoE's returned l_aux."""
    x = x + block.attn(block.norm1(x))
    h = block.norm2(x)
    out, l_aux, _ = block.moe(h)
    return x + (out + block.shared_expert(h)), l_aux


def test_the_block_by_hand_is_the_block():
    block, x = moe_block(), torch.randn(B, T, H)
    assert torch.equal(_block_and_l_aux(block, x)[0], block(x))


def test_the_l_aux_a_layer_leaves_behind_holds_no_graph():
    from tests.helpers.moe_layers import moe_pair
    block, x = moe_block(), torch.randn(B, T, H, requires_grad=True)
    block(x)
    assert block.moe.deepspeed_moe.l_aux.grad_fn is None  # it would keep this micro-batch's graph alive
    _, layer = moe_pair(k=2, drop_tokens=True, use_residual=True)
    out, l_aux, _ = layer(torch.randn(B * T, H, requires_grad=True))
    assert l_aux.grad_fn is not None and layer.deepspeed_moe.l_aux.grad_fn is None
    assert torch.equal(layer.deepspeed_moe.l_aux, l_aux.detach())


def test_aux_loss_scale_one_over_m_gives_the_gradient_of_the_mean_of_loss_plus_coef_l_aux():
    from deepspeed_dualpipe.moe import aux_loss_scale

    M, coef = 2, 0.05
    torch.manual_seed(0)
    block = moe_block(aux_loss_coef=coef)
    reference, no_aux = copy.deepcopy(block), copy.deepcopy(block)
    batch = [(torch.randn(B, T, H), torch.randn(B, T, H)) for _ in range(M)]

    with aux_loss_scale(1 / M):  # what the engine does: each micro-batch's loss divided by M
        for x, w in batch:
            ((block(x) * w).sum() / M).backward()
    with aux_loss_scale(0.0):  # attached aux loss silent; add coef * l_aux by hand, the l_aux the MoE returns
        total = 0
        for x, w in batch:
            y, l_aux = _block_and_l_aux(reference, x)
            total = total + ((y * w).sum() + coef * l_aux) / M
        total.backward()
        sum((no_aux(x) * w).sum() / M for x, w in batch).backward()

    assert mismatches(grads(block), grads(reference), exact=False) == []
    gate = "moe.deepspeed_moe.gate.wg.weight"
    assert not torch.allclose(grads(block)[gate], grads(no_aux)[gate], RTOL, ATOL), "aux loss had no effect"
