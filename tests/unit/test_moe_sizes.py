"""DualPipeMoE(drop_tokens=False) dispatches one row per token per expert: the buffer of a micro-batch is sized
when the first one is routed, and a warning names the size and the option when it is over the limit."""

import torch

from deepspeed_dualpipe.moe.sizes import dispatch_buffer_bytes, warn_limit
from tests.helpers.moe_layers import B, H, T, moe_block


def test_a_deepseek_v3_sized_layer_needs_15_gb_per_dispatch_buffer():
    assert dispatch_buffer_bytes(256, 4096, 7168, 2) == 256 * 4096 * 7168 * 2 == 15_032_385_536


def test_the_limit_is_the_configured_one_else_none_on_cpu():
    assert warn_limit("cpu", 1000) == 1000 and warn_limit("cpu", None) is None


def test_without_token_dropping_an_oversized_dispatch_buffer_is_warned_about_once_naming_size_and_option(
        warnings_logged):
    torch.manual_seed(0)
    block = moe_block(drop_tokens=False)
    block.moe.dispatch_warn_bytes = 1000
    x = torch.randn(B, T, H)
    block(x)
    block(x)
    experts = block.moe.deepspeed_moe.num_local_experts
    size = dispatch_buffer_bytes(experts, B * T, H, 4)
    assert size > 1000
    assert len(warnings_logged) == 1, [r.getMessage() for r in warnings_logged]
    message = warnings_logged[0].getMessage()
    assert "drop_tokens=False" in message and "drop_tokens=True" in message
    assert f"{experts} experts x {B * T} tokens x hidden {H} x 4 bytes = {size / 2**30:.2f} GiB" in message


def test_with_token_dropping_or_under_the_limit_nothing_is_said(warnings_logged):
    x = torch.randn(B, T, H)
    dropping = moe_block(drop_tokens=True)
    dropping.moe.dispatch_warn_bytes = 1
    dropping(x)
    roomy = moe_block(drop_tokens=False)
    roomy.moe.dispatch_warn_bytes = 10**12
    roomy(x)
    assert not warnings_logged
