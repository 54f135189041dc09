"""Megatron-DeepSpeed's MoE transformer layers as phases (integration/megatron_moe.py), on a stand-in for Megatron.

Promises (the real job, pretrain_gpt.py under dualpipe and dualpipev, is the proof that this matches Megatron;
these check the adapter's logic without processes):
* an adapted layer run as phases on a tape (islands, split backward, deferred weight part) gives the outputs of
  the layer's own forward, bit for bit, and its gradients, for every input form Megatron's pipeline layer takes
  and the configurations the phases cover (residual MoE, post-layernorm residual, fused bias-dropout-add,
  dropout);
* the MoE loss that GPTModelPipe stashes on the model still carries its gradient to the gates in a phased chunk;
* the layer keeps its class name, parameters and DeepSpeed's expert attributes, and its plain forward is unchanged;
* a configuration the phases do not reproduce is left as it is, with a log line naming the Megatron flag.
"""

import copy
import logging
import types

import pytest
import torch

from tests.helpers import megatron_stand_in as stand_in
from tests.helpers.moe_layers import mismatches

RTOL, ATOL = 1e-6, 1e-7


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    return stand_in.ParallelTransformerLayerPipe(1, **kwargs)


def chunk_of(*funcs):
    return types.SimpleNamespace(chunk_funcs=[list(funcs)])


@pytest.fixture(autouse=True)
def causal_mask(monkeypatch):
    monkeypatch.setattr(stand_in.ARGS, "attn_mask", stand_in.causal_mask())


def inputs_for(form, seed=1):
    """The layer's inputs in one of Megatron's forms, fresh leaves (the same values for the same seed)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(stand_in.S, stand_in.B, stand_in.H, generator=g).requires_grad_()
    aggregated = torch.rand((), generator=g).requires_grad_()
    return {
        "hidden": hidden,
        "(hidden, aggregated)": (hidden, aggregated),
        "(hidden, mask)": (hidden, stand_in.causal_mask()),
        "(hidden, mask, aggregated)": (hidden, stand_in.causal_mask(), aggregated),
    }[form]


def loss_of(outputs, seed=2):
    """A scalar that reads every floating-point output: sum(w * hidden) + 0.3 * MoE loss."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs, )
    g = torch.Generator().manual_seed(seed)
    hidden, extra = outputs[0], [t for t in outputs[1:] if t.is_floating_point()]
    return (hidden * torch.randn(hidden.shape, generator=g)).sum() + sum(0.3 * t for t in extra)


def leaves(inputs):
    return [t for t in (inputs if isinstance(inputs, tuple) else (inputs, )) if t.requires_grad]


def grads(layer, inputs):
    return {
        **{
            f"input{i}": t.grad
            for i, t in enumerate(leaves(inputs))
        },
        **{
            n: p.grad
            for n, p in layer.named_parameters()
        }
    }


def phased_forward_backward(funcs, inputs, loss_fn=loss_of):
    """The chunk ``funcs`` as the plugin's engine runs a phased chunk: forward on a tape, the backward split,
    then the weight part. Returns the outputs."""
    from deepspeed_dualpipe.runtime.autograd.steps import Tape, backward_steps, forward_steps, run
    tape = Tape()
    outputs = run(forward_steps(funcs, inputs, tape))
    input_grads, weights = run(backward_steps(tape, loss_fn(outputs), None, split=True))
    for t, g in zip(leaves(inputs), [g for g in input_grads if g is not None]):
        t.grad = g
    assert weights.split, "no weight gradient was deferred"
    weights.weight_part()
    return outputs


FORMS = {  # layer arguments, input form
    "(hidden, aggregated)": (dict(input_aggregated_moe_loss=True), "(hidden, aggregated)"),
    "tensor": (dict(), "hidden"),
    "tensor, no MoE loss returned": (dict(return_aggregated_moe_loss=False), "hidden"),
    "(hidden, mask)": (dict(), "(hidden, mask)"),
    "(hidden, mask, aggregated)": (dict(input_aggregated_moe_loss=True), "(hidden, mask, aggregated)"),
    "residual MoE (--mlp-type residual)": (dict(input_aggregated_moe_loss=True, use_residual=True),
                                           "(hidden, aggregated)"),
    "post-layernorm residual": (dict(input_aggregated_moe_loss=True, post_layernorm_residual=True),
                                "(hidden, aggregated)"),
    "fused bias-dropout-add": (dict(input_aggregated_moe_loss=True, bias_dropout_fusion=True),
                               "(hidden, aggregated)"),
    "hidden dropout": (dict(input_aggregated_moe_loss=True, hidden_dropout=0.2), "(hidden, aggregated)"),
}


@pytest.mark.parametrize("case", list(FORMS))
def test_an_adapted_layer_as_phases_gives_the_outputs_and_gradients_of_its_own_forward(case):
    from deepspeed_dualpipe.integration import megatron_moe
    layer_kwargs, form = FORMS[case]
    plain, phased = build(**layer_kwargs), build(**layer_kwargs)
    assert megatron_moe.adapt(chunk_of(phased)) == 1

    x = inputs_for(form)
    torch.manual_seed(5)
    want = plain(x)
    loss_of(want).backward()

    x2 = inputs_for(form)
    torch.manual_seed(5)
    got = phased_forward_backward([phased], x2)

    assert type(got) is type(want) and len(got if isinstance(got, tuple) else [got]) == len(
        want if isinstance(want, tuple) else [want])
    for a, b in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want]):
        assert torch.equal(a, b)
    assert mismatches(grads(phased, x2), grads(plain, x), exact=False) == []


def moe_loss_chunk(seed=0):
    """Two MoE layers and GPTModelPipe's MoE loss layer: the last chunk of a Megatron GPT-MoE."""
    owner = stand_in.GPTModelPipeLosses()
    first = build(seed)
    second = build(seed + 1, input_aggregated_moe_loss=True)
    return owner, [first, second, owner._calculate_moe_loss]


def test_the_moe_loss_stashed_on_the_model_reaches_the_gates_in_a_phased_chunk():
    from deepspeed_dualpipe.integration import megatron_moe
    owner, funcs = moe_loss_chunk()
    x = inputs_for("hidden")
    out = x
    for f in funcs:
        out = f(out)
    w = torch.randn_like(out)
    owner.loss_func(out, w).backward()

    owner2, funcs2 = moe_loss_chunk()
    module = chunk_of(*funcs2)
    assert megatron_moe.adapt(module) == 2
    x2 = inputs_for("hidden")
    assert isinstance(module.chunk_funcs[0][2], megatron_moe.PhasedMoELoss)
    phased_forward_backward(module.chunk_funcs[0], x2, loss_fn=lambda out: owner2.loss_func(out, w))

    for plain, phased in zip(funcs[:2], funcs2[:2]):
        gate = phased.mlp.deepspeed_moe.gate.wg.weight.grad
        assert gate is not None and torch.allclose(gate, plain.mlp.deepspeed_moe.gate.wg.weight.grad, RTOL, ATOL)
        assert mismatches(grads(phased, ()), grads(plain, ()), exact=False) == []
    assert torch.allclose(x2.grad, x.grad, RTOL, ATOL)


def test_an_adapted_layer_keeps_its_class_name_parameters_and_deepspeeds_expert_attributes():
    from deepspeed.moe.layer import MoE
    from deepspeed_dualpipe.integration import megatron_moe
    from deepspeed_dualpipe.moe import DualPipeMoE
    plain, layer = build(input_aggregated_moe_loss=True), build(input_aggregated_moe_loss=True)
    params, mlp = {n: p for n, p in layer.named_parameters()}, layer.mlp
    megatron_moe.adapt(chunk_of(layer))

    assert type(layer).__name__ == "ParallelTransformerLayerPipe" and isinstance(
        layer, stand_in.ParallelTransformerLayerPipe) and hasattr(layer, "forward_steps")
    assert layer.mlp is mlp and type(mlp) is DualPipeMoE and isinstance(mlp, MoE)
    assert {n: p for n, p in layer.named_parameters()} == params
    experts = list(mlp.deepspeed_moe.experts.parameters())
    assert experts and all(p.allreduce is False and p.group_name == "ep_size_1" for p in experts)
    x, x2 = inputs_for("(hidden, aggregated)"), inputs_for("(hidden, aggregated)")
    assert all(torch.equal(a, b) for a, b in zip(layer(x2), plain(x)))  # the plain forward: DeepSpeed's MoE


def test_adapting_twice_changes_nothing_more():
    from deepspeed_dualpipe.integration import megatron_moe
    owner, funcs = moe_loss_chunk()
    module = chunk_of(*funcs)
    assert megatron_moe.adapt(module) == 2
    classes, wrapper = [type(f) for f in module.chunk_funcs[0][:2]], module.chunk_funcs[0][2]
    assert megatron_moe.adapt(module) == 2
    assert [type(f) for f in module.chunk_funcs[0][:2]] == classes and module.chunk_funcs[0][2] is wrapper


def test_a_chunk_without_moe_layers_keeps_the_moe_loss_method():
    from deepspeed_dualpipe.integration import megatron_moe
    owner = stand_in.GPTModelPipeLosses()
    module = chunk_of(torch.nn.Identity(), owner._calculate_moe_loss)
    assert megatron_moe.adapt(module) == 0
    assert module.chunk_funcs[0][1] == owner._calculate_moe_loss


class OwnForward(stand_in.ParallelTransformerLayerPipe):

    def forward(self, inputs):
        return super().forward(inputs)


UNPHASED = {  # how the layer is made, the flag its log line names
    "drop path": (lambda: build(drop_path_rate=0.1), "--drop-path-rate > 0"),
    "decoder layer": (lambda: build(layer_type=stand_in.LayerType.decoder), "layer type decoder"),
    "tutel": (lambda: _with(build(), lambda layer: setattr(layer.mlp.deepspeed_moe, "use_tutel", True)),
              "--use-tutel"),
    "tensor parallelism": (lambda: build(), "--tensor-model-parallel-size > 1"),
    "sequence parallelism": (lambda: build(), "--sequence-parallel"),
    "Ulysses attention": (lambda: _with(build(), lambda layer: setattr(layer.self_attention,
                                                                       "enable_ds_sequence_parallel", True)),
                          "--ds-sequence-parallel-size > 1"),
    "its own forward": (lambda: _with(build(), lambda layer: setattr(layer, "__class__", OwnForward)),
                        "does not run Megatron's own"),
}


def _with(layer, change):
    change(layer)
    return layer


@pytest.mark.parametrize("case", list(UNPHASED))
def test_a_configuration_the_phases_do_not_reproduce_is_left_as_it_is_with_the_flag_named(case, monkeypatch):
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import logger
    from deepspeed_dualpipe.integration import megatron_moe
    if case == "tensor parallelism":
        monkeypatch.setattr(stand_in.ARGS, "tensor_model_parallel_size", 2)
    if case == "sequence parallelism":
        monkeypatch.setattr(stand_in.ARGS, "sequence_parallel", True)
    make, flag = UNPHASED[case]
    layer = make()
    cls, owner = type(layer), stand_in.GPTModelPipeLosses()
    module = chunk_of(layer, owner._calculate_moe_loss)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        assert megatron_moe.adapt(module) == 0
    finally:
        logger.removeHandler(handler)
    assert type(layer) is cls and type(layer.mlp) is MoE and not hasattr(layer, "forward_steps")
    assert module.chunk_funcs[0][1] == owner._calculate_moe_loss
    lines = [r.getMessage() for r in records]
    assert any(flag in line and "run as one step" in line for line in lines), lines


def test_inputs_megatron_would_refuse_run_the_layers_own_forward_as_one_island():
    from deepspeed_dualpipe.integration import megatron_moe
    from deepspeed_dualpipe.runtime.autograd.steps import Tape, forward_steps, run
    layer = build(input_aggregated_moe_loss=True)
    megatron_moe.adapt(chunk_of(layer))
    tape = Tape()
    with pytest.raises(AssertionError):  # Megatron's own assertion: a tensor where (hidden, loss) is expected
        run(forward_steps([layer], inputs_for("hidden"), tape))
    assert [i.name for i in tape.islands] == []


def test_a_deepcopy_of_an_adapted_layer_is_still_phased():
    from deepspeed_dualpipe.integration import megatron_moe
    layer = build(input_aggregated_moe_loss=True)
    megatron_moe.adapt(chunk_of(layer))
    twin = copy.deepcopy(layer)
    assert type(twin) is type(layer) and hasattr(twin, "forward_steps")


class ColumnParallelLinear(torch.nn.Module):
    """Megatron's parallel linears as mark_expert_shards sees them: the class name, ``is_expert_without_slicing``."""

    def __init__(self, sliced, marked=False):
        super().__init__()
        self.is_expert_without_slicing = not sliced
        self.weight, self.bias = torch.nn.Parameter(torch.zeros(4, 2)), torch.nn.Parameter(torch.zeros(4))
        if marked:
            self.weight.tensor_model_parallel, self.weight.partition_dim = True, 0


class RowParallelLinear(ColumnParallelLinear):
    pass


def test_the_tensor_parallel_marks_deepspeeds_expert_copy_drops_are_restored_on_sliced_linears_only():
    from deepspeed_dualpipe.integration.megatron import mark_expert_shards
    # DeepSpeed's Experts deep-copies Megatron's expert; a copied Parameter keeps no attributes
    column, row = copy.deepcopy(ColumnParallelLinear(sliced=True, marked=True)), RowParallelLinear(sliced=True)
    whole = ColumnParallelLinear(sliced=False)
    assert not hasattr(column.weight, "tensor_model_parallel")
    assert mark_expert_shards(torch.nn.ModuleList([column, row, whole])) == 3
    assert (column.weight.partition_dim, column.bias.partition_dim, row.weight.partition_dim) == (0, 0, 1)
    assert column.weight.tensor_model_parallel and column.bias.tensor_model_parallel and row.weight.tensor_model_parallel
    # a row-parallel bias is whole on every TP rank; an unsliced expert is whole
    assert not any(hasattr(p, "tensor_model_parallel") for p in (row.bias, whole.weight, whole.bias))
