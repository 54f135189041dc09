"""Ranks on GPUs for the ``gpu``-marked tests: one process per GPU, NCCL, TF32 off; a test skips where the node
has fewer GPUs than it needs."""

import os

import pytest
import torch


def needs(gpus):
    return pytest.mark.skipif(torch.cuda.device_count() < gpus,
                              reason=f"needs {gpus} CUDA GPUs, this node has {torch.cuda.device_count()}")


def _rank(rank, world, port, fn, args, results):
    """One rank on its own GPU with NCCL, TF32 off (CUDA's fp32 matmuls then round like the CPU's)."""
    from deepspeed_dualpipe.testing.launch import rank_env
    os.environ.update(rank_env(rank, world, port))
    os.environ.pop("DS_ACCELERATOR", None)  # DeepSpeed picks CUDA (the test process forces the CPU)
    try:
        import deepspeed
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        deepspeed.init_distributed(dist_backend="nccl", verbose=False)
        results.put((rank, fn(*args)))
    except BaseException as error:  # noqa: BLE001 - reported to the test
        results.put((rank, f"{type(error).__name__}: {error}"))


def on_gpus(world, fn, *args, timeout=300):
    """``fn(*args)`` on ``world`` ranks, one GPU each; the results by rank (a rank's error fails the test)."""
    from deepspeed_dualpipe.testing.launch import free_port
    ctx = torch.multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, fn, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        out = dict(results.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = {r: v for r, v in out.items() if isinstance(v, str)}
    assert not errors, errors
    return [out[r] for r in range(world)]
