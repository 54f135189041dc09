"""On a GPU: the split backward, the tape and DualPipeMoE compute on CUDA what they compute on CPU, and the
engine's per-instruction path makes no host sync (``torch.cuda.set_sync_debug_mode("error")``).

Marked ``gpu`` (``make gpu-check``, or ``pytest -m gpu``); every test skips, saying why, where CUDA is
missing. CI has no GPU: these run wherever one is at hand. TF32 is off, so CUDA's fp32 matmuls round
like the CPU's and the comparisons can be tight.
"""

import copy
import os
import socket

import pytest
import torch
from torch import nn

from tests.helpers.moe_layers import B, H, MOE_CONFIGS, T, grads, mismatches, moe_block, moe_pair, plain_forward_backward

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
]
RTOL, ATOL = 1e-4, 1e-5  # CUDA and CPU kernels sum in different orders


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _close(got, want):
    bad = []
    for name in want:
        a, b = got[name], want[name]
        if (a is None) != (b is None) or (a is not None and not torch.allclose(a.cpu(), b.cpu(), RTOL, ATOL)):
            bad.append(name)
    return bad


def _mlp():
    return nn.Sequential(nn.Linear(H, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, H))


def test_split_backward_on_cuda_gives_the_gradients_of_a_full_backward_on_cpu():
    from deepspeed_dualpipe.runtime.autograd.split_backward import SplitBackward
    torch.manual_seed(0)
    cpu = _mlp()
    cuda = copy.deepcopy(cpu).cuda()
    x, w = torch.randn(B, T, H), torch.randn(B, T, H)
    x_cpu = x.clone().requires_grad_()
    (cpu(x_cpu) * w).sum().backward()

    x_cuda = x.cuda().requires_grad_()
    out = cuda(x_cuda)
    handle = SplitBackward.input_part(out, w.cuda(), x_cuda, cuda.parameters())
    assert handle.split and all(p.grad is None for p in cuda.parameters())  # the weight part is deferred
    handle.weight_part()
    assert torch.allclose(handle.input_grads[0].cpu(), x_cpu.grad, RTOL, ATOL)
    assert _close(grads(cuda), grads(cpu)) == []


@pytest.mark.parametrize("cfg", MOE_CONFIGS, ids=str)
def test_dualpipe_moe_on_cuda_equals_deepspeeds_moe_on_cuda_and_its_own_numbers_on_cpu(cfg):
    ref, ours = moe_pair(**cfg)
    x, w = torch.randn(B, T, H), torch.randn(B, T, H)
    on_cpu = plain_forward_backward(copy.deepcopy(ours), x, w)
    ref, ours = ref.cuda(), ours.cuda()
    got = plain_forward_backward(ours, x.cuda(), w.cuda())
    assert mismatches(got, plain_forward_backward(ref, x.cuda(), w.cuda())) == []  # bit-equal on one device
    if cfg["k"] == 1 and not cfg["drop_tokens"]:  # no random numbers: no dropout, no token dropping, no sampling
        assert _close(got, on_cpu) == []


def test_the_tape_with_split_backward_on_cuda_gives_the_gradients_of_a_plain_backward_on_cpu():
    from deepspeed_dualpipe.runtime.autograd.steps import Tape, backward_steps, forward_steps, run
    torch.manual_seed(0)
    plain = nn.Sequential(moe_block(k=1, drop_tokens=False), nn.Linear(H, H))  # routing without random numbers
    for module in plain.modules():  # no dropout: CUDA and the CPU draw different random numbers
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    phased = copy.deepcopy(plain).cuda()
    x, w = torch.randn(B, T, H), torch.randn(B, T, H)
    x_cpu = x.clone().requires_grad_()
    (plain(x_cpu) * w).sum().backward()

    x_cuda = x.cuda().requires_grad_()
    tape = Tape()
    y = run(forward_steps(list(phased), x_cuda, tape))
    input_grads, weights = run(backward_steps(tape, y, w.cuda(), split=True))
    weights.weight_part()
    assert torch.allclose(y.detach().cpu(), plain(x).detach(), RTOL, ATOL)
    assert torch.allclose(input_grads[0].cpu(), x_cpu.grad, RTOL, ATOL)
    assert _close(grads(phased), grads(plain)) == []


# ----- no host sync in the per-instruction path ----------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, schedule, results):
    """One rank on its own GPU with NCCL: a warm-up batch, then a batch whose every instruction except the
    optimizer step runs under set_sync_debug_mode("error") (DeepSpeed's step and its loss logging are its own)."""
    os.environ.update(RANK=str(rank),
                      LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    os.environ.pop("DS_ACCELERATOR", None)
    try:
        import deepspeed
        import deepspeed_dualpipe
        from deepspeed.pipe import PipelineModule
        from deepspeed.runtime.pipe.schedule import OptimizerStep
        from deepspeed_dualpipe.runtime.trace import around_each_instruction
        from tests.helpers import harness
        from tests.helpers.models import loss_fn, tied_specs
        torch.cuda.set_device(rank)
        deepspeed.init_distributed(dist_backend="nccl")
        torch.manual_seed(0)
        with torch.no_grad():
            model = PipelineModule(layers=tied_specs(), num_stages=world, loss_fn=loss_fn)
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 2 * max(world, 2),
            "gradient_clipping": 1.0,
            "steps_per_print": 10**9,
            "pipeline": {
                "schedule": schedule
            }
        }
        engine = deepspeed_dualpipe.initialize(model=model, config=config, optimizer=harness._sgd)[0]
        batches = harness.make_batches(0, 2, 1, config["gradient_accumulation_steps"], 2)
        engine.train_batch(iter(batches[0][0]))

        def before(kind, kwargs):
            torch.cuda.set_sync_debug_mode("default" if kind is OptimizerStep else "error")

        with around_each_instruction(engine, before=before, after=lambda k, kw: torch.cuda.set_sync_debug_mode(0)):
            engine.train_batch(iter(batches[1][0]))
        results.put((rank, "ok"))
    except BaseException as error:  # noqa: BLE001 - reported to the test
        results.put((rank, f"{type(error).__name__}: {error}"))


def _run(schedule, world):
    ctx = torch.multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, schedule, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return out


def test_a_one_stage_pipeline_makes_no_host_sync_per_instruction():
    assert _run("zb1p", 1) == {0: "ok"}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL between two ranks)")
@pytest.mark.parametrize("schedule", ["zb1p", "dualpipe", "dualpipev"])
def test_two_stages_on_two_gpus_make_no_host_sync_per_instruction_with_nccl(schedule):
    assert _run(schedule, 2) == {0: "ok", 1: "ok"}
