"""On CUDA, an overlapped pair is timed on the GPU: an all-to-all of one micro-batch completes on NCCL's stream
while the other micro-batch's kernels run on the compute stream.

The step drivers time compute steps with CUDA events on the compute stream, and each all-to-all's completion
with an event on a side stream made to wait for NCCL's (runtime/autograd/clocks.py). The same measure as on
CPU (runtime/overlap.py) must find hidden all-to-alls when the two micro-batches' steps are interleaved, and
none when they run in turn or when the interleaving waits for each all-to-all before handing over (planted).

One rank per GPU, up to two; on a one-GPU machine the all-to-all runs over an NCCL group of one rank, which
still runs NCCL's kernel on its own stream. Skipped without CUDA.
"""

import pytest
import torch

from tests.helpers import harness

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="times NCCL's stream against the compute stream: "
                       "needs a CUDA GPU, and this machine has none"),
]

ORDERS = ("interleaved", "in turn", "serialised")
N, MATMULS, STEPS = 4096, 4, 3  # each compute step: 4 fp32 matmuls of 4096 x 4096, a few ms on a GPU
A2A_FLOATS = 1 << 26  # 256 MiB per all-to-all: well under a compute step on NVLink or within one GPU


def _phased(x, w, payload, group):
    """A micro-batch as steps: compute, launch an all-to-all on NCCL, yield; wait for it when resumed."""
    import torch.distributed as dist
    from deepspeed_dualpipe.runtime.autograd.tape import Pending
    for i in range(STEPS):
        for _ in range(MATMULS):
            x = torch.tanh(x @ w)
        recv = torch.empty_like(payload)
        pending = Pending(recv, dist.all_to_all_single(recv, payload, group=group, async_op=True), f"a2a{i}", group)
        yield pending
        pending.wait()
    return x


def _rank(world):
    import torch.distributed as dist
    from deepspeed_dualpipe.runtime.autograd.steps import interleave, run
    from deepspeed_dualpipe.runtime.overlap import hidden_all_to_alls
    from tests.helpers.serialised import serialised_interleave

    device = torch.device("cuda", dist.get_rank())
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    group = dist.new_group(list(range(world)), backend="nccl")
    x, w = torch.randn(N, N, device=device), torch.randn(N, N, device=device) / N**0.5
    payload = torch.randn(A2A_FLOATS, device=device)
    for _ in range(2):  # NCCL's communicator and cuBLAS's handles are made on first use
        interleave(_phased(x, w, payload, group), _phased(x, w, payload, group))
    torch.cuda.synchronize(device)
    hidden, recorded = {}, {}
    for order in ORDERS:
        events, a, b = [], _phased(x, w, payload, group), _phased(x, w, payload, group)
        if order == "interleaved":
            interleave(a, b, events=events, labels=("A", "B"), device=device)
        elif order == "serialised":
            serialised_interleave(a, b, events=events, labels=("A", "B"), device=device)
        else:
            run(a, events=events, label="A", device=device)
            run(b, events=events, label="B", device=device)
        hidden[order] = len(hidden_all_to_alls(events))
        recorded[order] = sum(not label.endswith(":compute") for label, _, _ in events)
    return hidden, recorded


def test_on_cuda_an_all_to_all_completes_on_nccls_stream_while_the_other_micro_batch_computes():
    world = min(2, torch.cuda.device_count())
    for hidden, recorded in harness.run_distributed(_rank, world, world, timeout=300):
        assert recorded == {order: 2 * STEPS for order in ORDERS}, recorded
        assert hidden["interleaved"] > 0, hidden
        assert hidden["in turn"] == 0 and hidden["serialised"] == 0, hidden
