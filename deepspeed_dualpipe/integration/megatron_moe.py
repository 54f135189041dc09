"""Megatron-DeepSpeed's MoE transformer layers as phases, so DualPipe's overlapped pairs hide their all-to-alls.

Megatron-DeepSpeed (checked at 4efb479d) builds every layer of ``GPTModelPipe`` as a
``ParallelTransformerLayerPipe``; in an MoE layer ``layer.mlp`` is DeepSpeed's ``MoE``, whose forward
runs its dispatch and combine all-to-alls synchronously. :func:`adapt` gives each such layer of a
rebuilt module a phased forward (``forward_steps``, see :mod:`deepspeed_dualpipe.runtime.autograd.steps`)::

    [input layernorm + self-attention + residual + post-attention layernorm + gate + dispatch encoding]
    -> dispatch all-to-all -> [experts] -> combine all-to-all -> [residual MoE's MLP, if any]
    -> [decode + residual + aux-loss accumulation]

It computes what the layer's own ``forward`` computes, with the same Megatron and DeepSpeed functions in
the same order: the ``(hidden, aggregated_moe_loss)`` tuples that carry the MoE loss between stages
included. The layer keeps its module, parameters and class name; what changes:

- ``layer.mlp`` becomes a :class:`~deepspeed_dualpipe.moe.DualPipeMoE`: the same object, parameters,
  expert-parallel group and parameter attributes (``allreduce=False``, ``group_name``), with its class
  swapped (``DualPipeMoE`` adds methods, no state), so its plain ``forward`` is DeepSpeed's to the bit;
- the layer's class becomes a subclass of its own, with the same name (DeepSpeed's
  ``_is_checkpointable`` keys on it), that adds ``forward_steps``;
- ``GPTModelPipe._calculate_moe_loss`` in a phased chunk becomes one island that *returns* the loss it
  stashes on the model (``model.moe_loss``, added to the loss by ``loss_func``). Run on a tape as it is,
  it would compute that loss from its island's detached input, and the MoE loss would silently get no
  gradient.

Layers whose configuration the phases do not reproduce are left as they are (one compute step, their
own forward; still correct, nothing to overlap), each kind with one log line naming the Megatron flag.
Megatron is never imported here: its functions are read from the module that defines the layer's class.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any, Callable, Dict, List, Optional

import torch
from deepspeed.moe.layer import MoE
from deepspeed.utils import log_dist

from deepspeed_dualpipe.moe.layer import DualPipeMoE

__all__ = ["adapt", "unphased_reason", "MegatronMoELayerSteps"]

PIPE_LAYER = "ParallelTransformerLayerPipe"  # Megatron's pipeline layer class ...
LAYER = "ParallelTransformerLayer"  # ... and the class whose forward holds the math
MOE_LOSS_METHOD = "_calculate_moe_loss"  # GPTModelPipe's layer that stashes the aggregated MoE loss

_PHASED_CLASSES: Dict[type, type] = {}


# ----- finding the layers ------------------------------------------------------------------------
def _megatron_class(cls: type, name: str) -> Optional[type]:
    """The class named ``name`` in ``cls``'s MRO (Megatron's own, not one :func:`adapt` made)."""
    return next((c for c in cls.__mro__ if c.__name__ == name and not issubclass(c, MegatronMoELayerSteps)), None)


def is_megatron_moe_layer(func: Any) -> bool:
    """A Megatron ``ParallelTransformerLayerPipe`` whose ``mlp`` is DeepSpeed's MoE."""
    return (isinstance(func, torch.nn.Module) and _megatron_class(type(func), PIPE_LAYER) is not None
            and _megatron_class(type(func), LAYER) is not None and isinstance(getattr(func, "mlp", None), MoE))


def _megatron(layer) -> types.ModuleType:
    """The module that defines Megatron's ``ParallelTransformerLayer`` (``megatron.model.transformer``): its
    ``get_args``, bias-dropout-add functions and ``core`` are the ones the layer's forward calls."""
    return sys.modules[_megatron_class(type(layer), LAYER).__module__]


def unphased_reason(layer) -> Optional[str]:
    """Why the phases would not compute what ``layer``'s forward computes, naming the Megatron flag (``None``: they
    would)."""
    cls = type(layer)
    mro = cls.__mro__
    pipe, base = _megatron_class(cls, PIPE_LAYER), _megatron_class(cls, LAYER)
    between = mro[mro.index(pipe) + 1:mro.index(base)]
    if (cls.forward is not vars(pipe).get("forward") or "forward" not in vars(base)
            or any("forward" in vars(c) for c in between)):
        return f"its class {cls.__qualname__} does not run Megatron's own ParallelTransformerLayer(Pipe).forward"
    if type(layer.mlp) not in (MoE, DualPipeMoE):
        return f"its mlp is a {type(layer.mlp).__qualname__}, not DeepSpeed's MoE"
    args = _megatron(layer).get_args()
    checks = [
        (getattr(args, "tensor_model_parallel_size", 1) > 1, "--tensor-model-parallel-size > 1 (DeepSpeed's MoE "
         "drops and gathers duplicate tokens across tensor-parallel ranks with extra collectives)"),
        (getattr(args, "sequence_parallel", False), "--sequence-parallel"),
        (getattr(layer.self_attention, "enable_ds_sequence_parallel", False), "--ds-sequence-parallel-size > 1 "
         "(DeepSpeed-Ulysses attention)"),
        (getattr(layer, "ds_sequence_parallel_fpdt", False), "--ds-sequence-parallel-fpdt"),
        (layer.drop_path is not None, "--drop-path-rate > 0"),
        (layer.layer_type.name != "encoder", f"layer type {layer.layer_type.name} (decoder or Retro layers: "
         "--retro-add-retriever)"),
        (layer.mlp.deepspeed_moe.use_tutel, "--use-tutel"),
    ]
    return next((f"it runs with {flag}" for failed, flag in checks if failed), None)


# ----- the phases --------------------------------------------------------------------------------
class MegatronMoELayerSteps:
    """Mixed into a Megatron MoE ``ParallelTransformerLayerPipe``'s class by :func:`adapt`: its forward as phases.

    The compute islands follow Megatron's ``ParallelTransformerLayer.forward`` (the self-attention encoder
    path, pre- or post-layernorm residual) and ``ParallelTransformerLayerPipe.forward`` (its input and
    output forms) line by line; the MoE's own parts are DualPipeMoE's phases.
    """

    ISLANDS = ("attention+gate", "experts", "residual", "decode+residual")  # compute islands, by name

    def forward_steps(self, tape, inputs):
        """The layer's forward as steps on ``tape``: returns what ``forward(inputs)`` returns."""
        megatron = _megatron(self)
        if not hasattr(self, "_args"):  # as ParallelTransformerLayerPipe.forward
            self._args = megatron.get_args()
        unpacked = self._dualpipe_unpack(inputs)
        if unpacked is None:  # inputs Megatron's forward refuses or treats otherwise: its own forward decides
            yield from ()
            return tape.compute(self, inputs, params=list(self.parameters()), name="layer")
        hidden_states, attention_mask, aggregated_moe_loss, returns_mask = unpacked
        rotary_pos_emb = self._args.rotary_pos_emb if self._args.use_rotary_position_embeddings else None
        bias_dropout_add = self._dualpipe_bias_dropout_add(megatron)
        moe, group = self.mlp, self.mlp.a2a_group
        experts = list(moe.deepspeed_moe.experts.parameters())
        residual_moe = list(moe.mlp.parameters()) + list(moe.coefficient.parameters()) if moe.use_residual else []
        aside = {id(p) for p in experts + residual_moe}

        def attention_and_gate(hidden_states):
            layernorm_output = self.input_layernorm(hidden_states)
            attention_output, attention_bias = self._dualpipe_attention(layernorm_output, attention_mask,
                                                                        rotary_pos_emb)
            residual = layernorm_output if self.apply_residual_connection_post_layernorm else hidden_states
            if attention_bias is not None:
                attention_bias = attention_bias.expand_as(residual)
            with self.bias_dropout_add_exec_handler():
                layernorm_input = bias_dropout_add(attention_output, attention_bias, residual, self.hidden_dropout)
            layernorm_output = self.post_attention_layernorm(layernorm_input)
            residual = layernorm_output if self.apply_residual_connection_post_layernorm else layernorm_input
            dispatched = tuple(moe.gate_phase(layernorm_output))
            # Returned as views: torch's split of this island's backward detaches its outputs in place, and
            # these two are also saved inside it (the layernorm's input), where its weight part reads them.
            return (layernorm_output.view_as(layernorm_output), residual.view_as(residual)) + dispatched

        layernorm_output, residual, dispatched, l_aux, slots, gates, exp_counts = tape.compute(
            attention_and_gate,
            hidden_states,
            params=[p for p in self.parameters() if id(p) not in aside],
            name="attention+gate")
        pending = tape.all_to_all(dispatched, group, name="dispatch")
        yield pending
        expert_output = tape.compute(moe.expert_phase, pending.wait(), params=experts, name="experts")
        pending = tape.all_to_all(expert_output, group, name="combine")
        yield pending
        residual_mlp = None
        if moe.use_residual:  # computed while the combine is in flight, as DualPipeMoE does
            residual_mlp = tape.compute(moe.residual_phase, layernorm_output, params=residual_moe, name="residual")
        shape, dtype, device = layernorm_output.shape, layernorm_output.dtype, layernorm_output.device

        def decode_and_residual(combined, slots, gates, residual, l_aux, aggregated_moe_loss, residual_mlp):
            mlp_output = moe.decode_phase(combined, slots, gates, shape, residual_mlp)
            moe_loss = l_aux
            if aggregated_moe_loss is not None:  # Megatron adds in place, into l_aux's dtype
                moe_loss = torch.add(l_aux, aggregated_moe_loss).to(l_aux.dtype)
            mlp_bias = torch.tensor(0.0, device=device, dtype=dtype).expand_as(residual)
            with self.bias_dropout_add_exec_handler():
                output = bias_dropout_add(mlp_output, mlp_bias, residual, self.hidden_dropout)
            output = megatron.core.utils.make_viewless_tensor(inp=output,
                                                              requires_grad=output.requires_grad,
                                                              keep_graph=True)
            return output, moe_loss

        output, moe_loss = tape.compute(decode_and_residual,
                                        pending.wait(),
                                        slots,
                                        gates,
                                        residual,
                                        l_aux,
                                        aggregated_moe_loss,
                                        residual_mlp,
                                        params=(),
                                        name="decode+residual")
        # Where DeepSpeed's MOELayer leaves them; detached, so the last micro-batch's islands are not kept alive.
        moe.deepspeed_moe.l_aux, moe.deepspeed_moe.exp_counts = moe_loss.detach(), exp_counts
        if torch.is_tensor(inputs):
            return (output, moe_loss) if self.return_aggregated_moe_loss else output
        return (output, ) + ((attention_mask, ) if returns_mask else ()) + \
            ((moe_loss, ) if self.return_aggregated_moe_loss else ())

    def _dualpipe_unpack(self, inputs):
        """``(hidden, attention_mask, aggregated_moe_loss or None, returns_mask)`` as ParallelTransformerLayerPipe
        reads ``inputs``; ``None`` where its forward would fail or read them otherwise."""
        if torch.is_tensor(inputs):
            if self.input_aggregated_moe_loss:
                return None  # Megatron asserts
            return inputs, self._args.attn_mask, None, False
        if not isinstance(inputs, tuple) or len(inputs) not in (2, 3):
            return None
        if len(inputs) == 3:
            hidden_states, attention_mask, aggregated_moe_loss = inputs
            returns_mask = False
        elif self.input_aggregated_moe_loss:
            (hidden_states, aggregated_moe_loss), attention_mask, returns_mask = inputs, self._args.attn_mask, False
        else:
            (hidden_states, attention_mask), aggregated_moe_loss, returns_mask = inputs, None, True
        return hidden_states, attention_mask, aggregated_moe_loss if self.input_aggregated_moe_loss else None, \
            returns_mask

    def _dualpipe_attention(self, layernorm_output, attention_mask, rotary_pos_emb):
        try:  # as ParallelTransformerLayer.forward calls it (cpu_offloading is for FPDT attention only)
            return self.self_attention(layernorm_output,
                                       attention_mask,
                                       inference_params=None,
                                       rotary_pos_emb=rotary_pos_emb,
                                       cpu_offloading=self.ds_sequence_parallel_fpdt_offloading)
        except TypeError:
            return self.self_attention(layernorm_output,
                                       attention_mask,
                                       inference_params=None,
                                       rotary_pos_emb=rotary_pos_emb)

    def _dualpipe_bias_dropout_add(self, megatron) -> Callable:
        if self.bias_dropout_fusion:
            return megatron.bias_dropout_add_fused_train if self.training else \
                megatron.bias_dropout_add_fused_inference
        return megatron.get_bias_dropout_add(self.training)


class PhasedMoELoss:
    """``GPTModelPipe._calculate_moe_loss`` for a phased chunk: one island that returns the hidden states *and*
    the loss the method stashes on the model, which is then stashed as the island's output (known to the tape,
    so ``loss_func``'s ``loss += self.moe_loss`` carries its gradient back). Called plainly, it is the method."""

    ISLANDS = ("moe_loss", )

    def __init__(self, method):
        self.method = method

    def __call__(self, inputs):
        return self.method(inputs)

    def forward_steps(self, tape, inputs):
        owner = self.method.__self__

        def calculate(inputs):
            return self.method(inputs), owner.moe_loss

        yield from ()
        hidden, owner.moe_loss = tape.compute(calculate, inputs, params=(), name="moe_loss")
        return hidden

    def __repr__(self):
        return f"PhasedMoELoss({self.method!r})"


def _phased_class(cls: type) -> type:
    """``cls`` with :class:`MegatronMoELayerSteps` mixed in, named as ``cls``."""
    if issubclass(cls, MegatronMoELayerSteps):
        return cls
    if cls not in _PHASED_CLASSES:
        _PHASED_CLASSES[cls] = type(
            cls.__name__, (MegatronMoELayerSteps, cls), {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
                "dualpipe_megatron_class": cls,
            })
    return _PHASED_CLASSES[cls]


def _make_phased(layer) -> None:
    if type(layer.mlp) is MoE:
        layer.mlp.__class__ = DualPipeMoE  # the same module: DualPipeMoE adds methods, no state
    layer.__class__ = _phased_class(type(layer))


# ----- the entry point ---------------------------------------------------------------------------
def _chunks(module) -> List[list]:
    funcs = getattr(module, "chunk_funcs", None)
    return funcs if funcs is not None else [module.forward_funcs]


def adapt(module) -> int:
    """Give every Megatron MoE transformer layer of ``module`` (a ``PipelineModule``, rebuilt in chunks by the
    plugin: its ``chunk_funcs``) a phased forward; returns how many layers were adapted. Layers left as they
    are get one log line per reason. Idempotent: layers adapted already are counted again."""
    adapted, unphased = 0, {}
    for funcs in _chunks(module):
        phased = False
        for func in funcs:
            if not is_megatron_moe_layer(func):
                continue
            if isinstance(func, MegatronMoELayerSteps):
                adapted, phased = adapted + 1, True
                continue
            reason = unphased_reason(func)
            if reason is not None:
                unphased.setdefault(reason, []).append(getattr(func, "layer_number", "?"))
                continue
            _make_phased(func)
            adapted += 1
            phased = True
        if phased:  # the chunk runs on a tape now: the MoE loss must leave its island as an output
            for i, func in enumerate(funcs):
                if isinstance(func, types.MethodType) and func.__func__.__name__ == MOE_LOSS_METHOD:
                    funcs[i] = PhasedMoELoss(func)
    for reason, layers in unphased.items():
        log_dist(
            f"deepspeed_dualpipe: Megatron MoE layers {layers} run as one step, without overlapping their "
            f"all-to-alls: {reason}", [0],
            level=logging.WARNING)
    if adapted:
        log_dist(
            f"deepspeed_dualpipe: {adapted} Megatron MoE layers on this rank run as phases (attention+gate | "
            f"dispatch | experts | combine); overlapped pairs hide their all-to-alls", [0])
    return adapted
