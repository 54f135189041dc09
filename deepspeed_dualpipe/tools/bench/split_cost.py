"""The host cost of the split backward: input part + weight part over one whole backward, per chunk.

``python -m deepspeed_dualpipe.tools.bench.split_cost`` builds one chunk of the demo model
(``configs/dualpipe_moe.json``'s blocks: a dense block, then MoE blocks, expert parallelism 1 in one
process) and runs its backward the way the engine does (:func:`~deepspeed_dualpipe.runtime.autograd.steps.backward_steps`
over the forward's tape, one :class:`~deepspeed_dualpipe.runtime.autograd.split_backward.SplitBackward` per island):
whole (``split=False``) and split (the input part, then the weight part), alternating, many times,
and prints the median CPU time of each and their ratio. Forwards are not timed.
"""

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch


def _chunk(config_path: str, blocks: int):
    from deepspeed_dualpipe.moe.block import MoETransformerBlock
    from deepspeed_dualpipe.tools.lm.model import ModelConfig
    with open(config_path) as f:
        cfg = dataclasses.replace(ModelConfig.from_dict(json.load(f)["lm"]["model"]), ep_size=1)
    return [MoETransformerBlock(**cfg.block_kwargs(i)) for i in range(blocks)], cfg


def _init_process_group() -> None:
    """DeepSpeed's MoE layers want a process group: a world of one, on gloo."""
    import deepspeed
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from deepspeed_dualpipe.testing.launch import free_port
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(dist_backend="gloo")


def measure(blocks, x_shape, repeats: int):
    from deepspeed_dualpipe.runtime.autograd.steps import Tape, backward_steps, forward_steps, run
    params = [p for b in blocks for p in b.parameters()]

    def backward(split: bool) -> float:
        x = torch.randn(*x_shape, requires_grad=True)
        tape = Tape()
        out = run(forward_steps(blocks, x, tape))
        grad = torch.randn_like(out)
        start = time.process_time()
        _, handle = run(backward_steps(tape, out, grad, split=split))
        if split:
            handle.weight_part()
        elapsed = time.process_time() - start
        for p in params:
            p.grad = None
        return elapsed

    whole, split = [], []
    for i in range(repeats + 3):
        w, s = backward(False), backward(True)
        if i >= 3:  # warm-up
            whole.append(w)
            split.append(s)
    return statistics.median(whole), statistics.median(split)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/dualpipe_moe.json")
    p.add_argument("--blocks", type=int, default=2, help="blocks in the chunk (the demo's 4 blocks over P=2: 2)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    _init_process_group()
    blocks, cfg = _chunk(args.config, args.blocks)
    with open(args.config) as f:
        config = json.load(f)
    shape = (config["train_micro_batch_size_per_gpu"], config["lm"]["seq_len"], cfg.hidden_size)
    whole, split = measure(blocks, shape, args.repeats)
    result = {"whole_ms": 1e3 * whole, "split_ms": 1e3 * split, "ratio": split / whole, "blocks": args.blocks}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"chunk of {args.blocks} demo blocks, micro-batch {shape}: whole backward {result['whole_ms']:.2f} ms, "
              f"input + weight part {result['split_ms']:.2f} ms CPU (medians of {args.repeats}): ratio "
              f"{result['ratio']:.3f}")


if __name__ == "__main__":
    main()
