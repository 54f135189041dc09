"""A stand-in for the parts of Megatron-DeepSpeed (4efb479d) that the MoE adapter reads, for tests without Megatron.

Same names and attributes as ``megatron.model.transformer`` (``ParallelTransformerLayer``,
``ParallelTransformerLayerPipe``, ``get_args``, ``get_bias_dropout_add``, the fused bias-dropout-add functions,
``core.utils.make_viewless_tensor``, ``LayerType``) and ``GPTModelPipe``'s MoE loss methods, with Megatron's
forward written out for the pre-layernorm path: ``(out, bias)`` from attention, bias-dropout-add, post-attention
layernorm, DeepSpeed's MoE, ``moe_loss += aggregated_moe_loss``, bias-dropout-add with a zero MLP bias. The
adapter must reproduce whatever this forward computes: it is the reference, written independently of the
adapter's phases. The real proof is the real job (docs: the Megatron-DeepSpeed recipe).
"""

import enum
import math
import types

import torch
import torch.nn.functional as F
from torch import nn

H, S, B, HEADS, E = 8, 6, 2, 2, 4


class LayerType(enum.Enum):
    encoder = 1
    decoder = 2


ARGS = types.SimpleNamespace(attn_mask=None,
                             use_rotary_position_embeddings=False,
                             rotary_pos_emb=None,
                             tensor_model_parallel_size=1,
                             sequence_parallel=False,
                             moe_loss_coeff=0.1)


def get_args():
    return ARGS


def bias_dropout_add(x, bias, residual, prob, training):
    if bias is not None:
        x = x + bias
    return residual + F.dropout(x, p=prob, training=training)


def get_bias_dropout_add(training):
    return lambda x, bias, residual, prob: bias_dropout_add(x, bias, residual, prob, training)


def bias_dropout_add_fused_train(x, bias, residual, prob):
    return bias_dropout_add(x, bias, residual, prob, True)


def bias_dropout_add_fused_inference(x, bias, residual, prob):
    return bias_dropout_add(x, bias, residual, prob, False)


def _make_viewless_tensor(inp, requires_grad, keep_graph):
    return inp if inp._base is None else inp.clone()


core = types.SimpleNamespace(utils=types.SimpleNamespace(make_viewless_tensor=_make_viewless_tensor))


class SelfAttention(nn.Module):
    """Causal attention on [s, b, h]; returns ``(output, bias)`` as Megatron's (bias added by the caller).
    No ``cpu_offloading`` argument: the layer's first call raises TypeError and it calls again, as in Megatron."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(H, 3 * H)
        self.dense = nn.Linear(H, H, bias=False)
        self.bias = nn.Parameter(0.1 * torch.randn(H))

    def forward(self, hidden, attention_mask, encoder_output=None, inference_params=None, rotary_pos_emb=None):
        s, b, _ = hidden.shape
        q, k, v = self.qkv(hidden).reshape(s, b * HEADS, 3, H // HEADS).unbind(2)
        scores = torch.einsum("sbd,tbd->bst", q, k) / math.sqrt(H // HEADS)
        scores = scores.masked_fill(attention_mask, -10000.0)
        context = torch.einsum("bst,tbd->sbd", scores.softmax(-1), v).reshape(s, b, H)
        return self.dense(context), self.bias


class Expert(nn.Module):
    """Megatron's ParallelMLP returns ``(output, bias)``; DeepSpeed's Experts keep the output only."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(H, 16), nn.Linear(16, H)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x))), None


class ParallelTransformerLayer(nn.Module):

    def __init__(self,
                 layer_number,
                 num_experts=E,
                 use_residual=False,
                 post_layernorm_residual=False,
                 bias_dropout_fusion=False,
                 hidden_dropout=0.0,
                 drop_path_rate=0.0,
                 layer_type=LayerType.encoder):
        from deepspeed.moe.layer import MoE
        super().__init__()
        self.layer_number, self.layer_type = layer_number, layer_type
        self.apply_residual_connection_post_layernorm = post_layernorm_residual
        self.input_layernorm = nn.LayerNorm(H)
        self.self_attention = SelfAttention()
        self.ds_sequence_parallel_fpdt = False
        self.ds_sequence_parallel_fpdt_offloading = False
        self.hidden_dropout, self.bias_dropout_fusion = hidden_dropout, bias_dropout_fusion
        self.drop_path = nn.Dropout(drop_path_rate) if drop_path_rate > 0.0 else None
        self.post_attention_layernorm = nn.LayerNorm(H)
        self.num_experts = num_experts
        self.mlp = MoE(H,
                       Expert(),
                       num_experts=num_experts,
                       ep_size=1,
                       k=2,
                       use_residual=use_residual,
                       capacity_factor=1.0,
                       min_capacity=2,
                       top2_2nd_expert_sampling=False)
        self.bias_dropout_add_exec_handler = torch.enable_grad

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, aggregated_moe_loss=None):
        layernorm_output = self.input_layernorm(hidden_states)
        try:
            attention_output, attention_bias = self.self_attention(layernorm_output,
                                                                   attention_mask,
                                                                   rotary_pos_emb=rotary_pos_emb,
                                                                   cpu_offloading=False)
        except TypeError:
            attention_output, attention_bias = self.self_attention(layernorm_output,
                                                                   attention_mask,
                                                                   rotary_pos_emb=rotary_pos_emb)
        residual = layernorm_output if self.apply_residual_connection_post_layernorm else hidden_states
        if self.bias_dropout_fusion:
            bda = bias_dropout_add_fused_train if self.training else bias_dropout_add_fused_inference
        else:
            bda = get_bias_dropout_add(self.training)
        layernorm_input = bda(attention_output, attention_bias.expand_as(residual), residual, self.hidden_dropout)
        layernorm_output = self.post_attention_layernorm(layernorm_input)
        mlp_output, moe_loss, _ = self.mlp(layernorm_output)
        if aggregated_moe_loss is not None:
            moe_loss += aggregated_moe_loss
        residual = layernorm_output if self.apply_residual_connection_post_layernorm else layernorm_input
        mlp_bias = torch.tensor(0.0, dtype=layernorm_output.dtype).expand_as(residual)
        output = bda(mlp_output, mlp_bias, residual, self.hidden_dropout)
        return core.utils.make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True), \
            moe_loss


class ParallelTransformerLayerPipe(ParallelTransformerLayer):
    """Megatron's input and output conventions: a tensor, ``(hidden, aggregated_moe_loss)``,
    ``(hidden, attention_mask)`` or ``(hidden, attention_mask, aggregated_moe_loss)``."""

    def __init__(self, layer_number, input_aggregated_moe_loss=False, return_aggregated_moe_loss=True, **kwargs):
        self.input_aggregated_moe_loss = input_aggregated_moe_loss
        self.return_aggregated_moe_loss = return_aggregated_moe_loss
        super().__init__(layer_number, **kwargs)

    def forward(self, inputs):
        if not hasattr(self, "_args"):
            self._args = get_args()
        if torch.is_tensor(inputs):
            assert not self.input_aggregated_moe_loss
            output, moe_loss = super().forward(inputs, self._args.attn_mask)
            return (output, moe_loss) if self.return_aggregated_moe_loss else output
        returns_mask, aggregated = False, None
        if len(inputs) == 2 and self.input_aggregated_moe_loss:
            (hidden, aggregated), mask = inputs, self._args.attn_mask
        elif len(inputs) == 2:
            (hidden, mask), returns_mask = inputs, True
        else:
            hidden, mask, aggregated = inputs
        kwargs = {"aggregated_moe_loss": aggregated} if self.input_aggregated_moe_loss else {}
        output, moe_loss = super().forward(hidden, mask, **kwargs)
        return (output, ) + ((mask, ) if returns_mask else ()) + ((moe_loss, ) if self.return_aggregated_moe_loss else
                                                                  ())


class GPTModelPipeLosses:
    """GPTModelPipe's MoE loss handling: a layer that stashes the aggregated loss, and a loss that adds it."""

    def __init__(self):
        self.moe_loss = None

    def _calculate_moe_loss(self, inputs):
        hidden, aggregated_moe_loss = inputs
        self.moe_loss = aggregated_moe_loss * get_args().moe_loss_coeff
        return hidden

    def loss_func(self, output, weights):
        loss = (output * weights).sum()
        if self.moe_loss is not None:
            loss += self.moe_loss
        return loss


def causal_mask():
    return torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)
