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
import itertools

import pytest
import torch
from torch import nn

import harness

H, B, T, E = 8, 2, 6, 4
RTOL, ATOL = 1e-6, 1e-7
MOE_CONFIGS = [dict(k=k, drop_tokens=d, use_residual=r)
               for k, d, r in itertools.product((1, 2), (True, False), (False, True))]


# ----- helpers (module level: the 2-rank tests pickle them) ---------------------------------------
def _expert():
    # Dropout: random numbers must be drawn in DeepSpeed's order too.
    return nn.Sequential(nn.Linear(H, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, H))


def _moe_pair(k, drop_tokens, use_residual, ep_size=1, rank=0):
    """DeepSpeed's MoE and a DualPipeMoE holding the same weights (experts differ per rank)."""
    from deepspeed.moe.layer import MoE
    from deepspeed_dualpipe.moe import DualPipeMoE

    def kw():
        return dict(hidden_size=H, expert=_expert(), num_experts=E, ep_size=ep_size, k=k, capacity_factor=1.0,
                    min_capacity=2, drop_tokens=drop_tokens, use_residual=use_residual)

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


def _plain(layer, x, w, seed=7):
    """Forward + backward of (out * w).sum() + 0.3 * l_aux; everything that must match."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out, l_aux, counts = layer(x)
    ((out * w).sum() + 0.3 * l_aux).backward()
    return {"out": out, "l_aux": l_aux, "exp_counts": counts, "x.grad": x.grad,
            **{n: p.grad for n, p in layer.named_parameters()}}


def _mismatches(got, want, exact=True):
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


def _moe_equivalence(configs, ep_size, rank):
    torch.manual_seed(100 + rank)  # different tokens on every rank
    x, w = torch.randn(B, T, H), torch.randn(B, T, H)
    bad = []
    for cfg in configs:
        ref, ours = _moe_pair(**cfg, ep_size=ep_size, rank=rank)
        bad += [f"{cfg}: {m}" for m in _mismatches(_plain(ours, x, w), _plain(ref, x, w))]
    return bad


def _moe_equivalence_rank(configs):
    import deepspeed.comm as dist
    return _moe_equivalence(configs, ep_size=2, rank=dist.get_rank())


# ----- DualPipeMoE == DeepSpeed's MoE -------------------------------------------------------------
@pytest.mark.parametrize("cfg", MOE_CONFIGS + [dict(k=3, drop_tokens=True, use_residual=False)], ids=str)
def test_dualpipe_moe_is_bit_equal_to_deepspeed_moe_on_one_rank(cfg):
    assert _moe_equivalence([cfg], ep_size=1, rank=0) == []


@pytest.mark.slow
def test_dualpipe_moe_is_bit_equal_to_deepspeed_moe_on_two_expert_parallel_ranks():
    results = harness.run_distributed(_moe_equivalence_rank, 2, MOE_CONFIGS)
    assert results == [[], []]


def test_dualpipe_moe_keeps_deepspeeds_expert_parameter_attributes():
    _, ours = _moe_pair(k=2, drop_tokens=True, use_residual=True)
    experts = list(ours.deepspeed_moe.experts.parameters())
    assert experts and all(p.allreduce is False and p.group_name == "ep_size_1" for p in experts)
    others = [p for p in ours.parameters() if all(p is not q for q in experts)]
    assert others and not any(hasattr(p, "allreduce") for p in others)


# ----- phases == plain forward + backward ---------------------------------------------------------
def _block(dense=False, ep_size=1, **kw):
    from deepspeed_dualpipe.moe import MoETransformerBlock
    return MoETransformerBlock(H, num_heads=2, num_experts=E, ep_size=ep_size, ffn_hidden_size=12, dense=dense, **kw)


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


CHUNKS = {
    "moe block": lambda: [_block()],
    "dense block": lambda: [_block(dense=True)],
    "moe block + linear": lambda: [_block(), nn.Linear(H, H)],
    "embedding + block + linear": lambda: [nn.Embedding(11, H), _block(k=1, drop_tokens=False), nn.Linear(H, H)],
}


@pytest.mark.parametrize("loss_root", [False, True], ids=["output-grads", "scalar-loss"])
@pytest.mark.parametrize("chunk", list(CHUNKS))
def test_phases_with_split_backward_give_the_gradients_of_a_plain_backward(chunk, loss_root):
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
    tape = Tape()
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
    assert _mismatches(_grads(phased), _grads(plain), exact=False) == []


def test_dualpipe_moe_phases_carry_the_aux_loss_gradient_back_to_the_gate():
    """l_aux comes out of the first island: a loss using it reaches back past the last island."""
    from deepspeed_dualpipe.runtime.autograd.steps import Tape, backward_steps, run

    plain, _ = _moe_pair(k=2, drop_tokens=True, use_residual=True)
    _, phased = _moe_pair(k=2, drop_tokens=True, use_residual=True)
    phased.load_state_dict(plain.state_dict())
    x, w = torch.randn(B, T, H), torch.randn(B, T, H)
    want = _plain(plain, x, w)

    x2 = x.clone().requires_grad_()
    tape = Tape()
    torch.manual_seed(7)
    out, l_aux, counts = run(phased.forward_steps(tape, x2))
    (input_grad, ), weights = run(backward_steps(tape, (out * w).sum() + 0.3 * l_aux))
    weights.weight_part()
    got = {"out": out, "l_aux": l_aux, "exp_counts": counts, "x.grad": input_grad, **_grads(phased)}
    assert _mismatches(got, want, exact=False) == []


def test_a_plain_callable_with_undeclared_parameters_gets_its_whole_backward_at_once():
    """A lambda closing over a parameter: the parameters are unknown, so no gradient may be left out."""
    from deepspeed_dualpipe.runtime.autograd.steps import Tape, backward_steps, forward_steps, run

    scale, linear = nn.Parameter(torch.tensor(1.5)), nn.Linear(H, H)
    layers = [lambda x: x * scale, linear]
    x = torch.randn(B, H, requires_grad=True)
    (linear(x * scale) ** 2).sum().backward()
    want = {"x": x.grad, "scale": scale.grad, **_grads(linear)}
    scale.grad = linear.weight.grad = linear.bias.grad = None

    x2 = x.detach().clone().requires_grad_()
    tape = Tape()
    (input_grad, ), weights = run(backward_steps(tape, (run(forward_steps(layers, x2, tape)) ** 2).sum()))
    assert scale.grad is not None and linear.weight.grad is None  # the lambda's island ran whole
    weights.weight_part()
    assert _mismatches({"x": input_grad, "scale": scale.grad, **_grads(linear)}, want, exact=False) == []


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


# ----- interleaving two micro-batches on 2 expert-parallel ranks ----------------------------------
def _interleave_rank(configs):
    import deepspeed.comm as dist
    from deepspeed_dualpipe.runtime.autograd.steps import Tape, backward_steps, forward_steps, interleave, run

    rank, bad, overlapped = dist.get_rank(), [], []
    for cfg in configs:
        blocks = []
        for _ in range(3):
            torch.manual_seed(0)
            blk = _block(ep_size=2, **cfg)
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
                (ga, wa), yb = interleave(backward_steps(tapes[0], ya, dys[0]), forward_steps([blk], ins[1], tapes[1]),
                                          events=events, labels=("A", "B"))
                comms = [(s, e) for label, s, e in events if label.startswith("A:")]
                computes = [s for label, s, e in events if label == "B:compute"]
                overlapped.append(any(s0 <= s <= e0 for s0, e0 in comms for s in computes))
            else:
                ga, wa = run(backward_steps(tapes[0], ya, dys[0]))
                yb = run(forward_steps([blk], ins[1], tapes[1]))
            gb, wb = run(backward_steps(tapes[1], yb, dys[1]))
            wa.weight_part()
            wb.weight_part()
            results.append({"yA": ya, "yB": yb, "gA": ga[0], "gB": gb[0], **_grads(blk)})
        ins = [x.detach().clone().requires_grad_() for x in xs]  # and a plain forward + backward
        ys = [blocks[2](x) for x in ins]
        for y, dy in zip(ys, dys):
            y.backward(dy)
        plain = {"yA": ys[0], "yB": ys[1], "gA": ins[0].grad, "gB": ins[1].grad, **_grads(blocks[2])}
        bad += [f"{cfg} interleaved: {m}" for m in _mismatches(results[1], results[0], exact=False)]
        bad += [f"{cfg} phases vs plain: {m}" for m in _mismatches(results[0], plain, exact=False)]
    return bad, overlapped


@pytest.mark.slow
def test_interleaving_a_backward_with_a_forward_on_two_ranks_matches_running_them_in_turn():
    configs = [dict(k=2, drop_tokens=True), dict(k=1, drop_tokens=False)]
    results = harness.run_distributed(_interleave_rank, 2, configs)
    for bad, overlapped in results:
        assert bad == []
        assert overlapped == [True, True], "B's compute never ran while A's all-to-all was in flight"


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


def test_aux_loss_scale_one_over_m_gives_the_gradient_of_the_mean_of_loss_plus_coef_l_aux():
    from deepspeed_dualpipe.moe import aux_loss_scale

    M, coef = 2, 0.05
    torch.manual_seed(0)
    block = _block(aux_loss_coef=coef)
    reference, no_aux = copy.deepcopy(block), copy.deepcopy(block)
    batch = [(torch.randn(B, T, H), torch.randn(B, T, H)) for _ in range(M)]

    with aux_loss_scale(1 / M):  # what the engine does: each micro-batch's loss divided by M
        for x, w in batch:
            ((block(x) * w).sum() / M).backward()
    with aux_loss_scale(0.0):  # attached aux loss silent; add coef * l_aux by hand
        total = 0
        for x, w in batch:
            y = reference(x)
            total = total + ((y * w).sum() + coef * reference.moe.deepspeed_moe.l_aux) / M
        total.backward()
        sum((no_aux(x) * w).sum() / M for x, w in batch).backward()

    assert _mismatches(_grads(block), _grads(reference), exact=False) == []
    gate = "moe.deepspeed_moe.gate.wg.weight"
    assert not torch.allclose(_grads(block)[gate], _grads(no_aux)[gate], RTOL, ATOL), "aux loss had no effect"
