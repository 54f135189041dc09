"""The dispatch buffers of ``DualPipeMoE(drop_tokens=False)``, sized when the first micro-batch is routed.

Without token dropping the capacity is one row per token per expert (``moe/layer.py``: no expert can exceed it,
so nothing waits for the largest load), and each dispatch buffer, as each combine buffer and their gradients,
holds ``num_experts x tokens x hidden`` elements. For a DeepSeek-V3-sized layer (256 experts, 4096 tokens per
micro-batch, hidden 7168, bf16) that is 15 GB per buffer. A warning names the size and the option when it
exceeds ``DualPipeMoE.dispatch_warn_bytes`` (set on the class or a layer), or by default a quarter of the
device's memory (CUDA; on the CPU only a configured limit applies).
"""

from typing import Optional

import torch

DEFAULT_FRACTION = 0.25  # of the device's memory, when no limit is configured


def dispatch_buffer_bytes(num_experts: int, tokens: int, hidden: int, element_size: int) -> int:
    """Bytes of one dispatch buffer ``[num_experts, capacity = tokens, hidden]`` of a micro-batch."""
    return num_experts * tokens * hidden * element_size


def warn_limit(device, configured: Optional[int]) -> Optional[int]:
    """The size above which to warn: ``configured``, else a quarter of a CUDA device's memory, else None."""
    if configured is not None:
        return int(configured)
    device = torch.device(device)
    if device.type == "cuda":
        return int(DEFAULT_FRACTION * torch.cuda.get_device_properties(device).total_memory)
    return None


def dispatch_warning(num_experts: int, tokens: int, hidden: int, element_size: int,
                     limit: Optional[int]) -> Optional[str]:
    """The warning for one micro-batch's dispatch buffer over ``limit`` bytes, or None."""
    size = dispatch_buffer_bytes(num_experts, tokens, hidden, element_size)
    if limit is None or size <= limit:
        return None
    return (f"deepspeed_dualpipe: DualPipeMoE(drop_tokens=False) dispatches with one row per token per expert: "
            f"{num_experts} experts x {tokens} tokens x hidden {hidden} x {element_size} bytes = "
            f"{size / 2**30:.2f} GiB per dispatch buffer (the combine's and both gradients' are as large), over "
            f"the limit of {limit / 2**30:.2f} GiB; use drop_tokens=True with a capacity_factor, or fewer tokens "
            f"per micro-batch (docs/moe.md)")


__all__ = ["DEFAULT_FRACTION", "dispatch_buffer_bytes", "warn_limit", "dispatch_warning"]
