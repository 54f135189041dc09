"""A DeepSpeed pipeline job that switches schedule from its config file alone.

    deepspeed --num_gpus 4 examples/train_pipeline.py --deepspeed_config configs/dualpipe.json

The only plugin-specific line is ``deepspeed_dualpipe.install()``: after it, the script's own
``deepspeed.initialize`` honours ``"pipeline": {"schedule": ...}``.
"""

import argparse
import json

import torch
import torch.nn as nn

import deepspeed
from deepspeed.accelerator import get_accelerator
import deepspeed_dualpipe
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

deepspeed_dualpipe.install()


class Block(nn.Module):
    """A residual MLP block: enough to show pipelining, small enough for a CPU."""

    def __init__(self, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def head(embedding, x):
    return x @ embedding.weight.t() / embedding.weight.size(1)**0.5  # head tied to the token embedding


def lm_loss(logits, labels):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))


def layers(num_layers, hidden, vocab):
    return ([TiedLayerSpec("embed", nn.Embedding, vocab, hidden)] +
            [LayerSpec(Block, hidden)
             for _ in range(num_layers - 2)] + [TiedLayerSpec("embed", nn.Embedding, vocab, hidden, forward_fn=head)])


def batches(seed, count, micro_batch_size, seq_len, vocab):
    """Sequences that count upwards modulo ``vocab``: the next token is learnable."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        start = torch.randint(0, vocab, (micro_batch_size, 1), generator=g)
        tokens = (start + torch.arange(seq_len + 1)) % vocab
        yield tokens[:, :-1], tokens[:, 1:]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--stages", type=int, default=2, help="pipeline ranks P; the rest is data parallelism")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--out", help="write the per-step losses here (JSON)")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    deepspeed.init_distributed(dist_backend="nccl" if get_accelerator().device_name() == "cuda" else "gloo")
    with open(args.deepspeed_config) as f:
        schedule = json.load(f).get("pipeline", {}).get("schedule", "1f1b")
    torch.manual_seed(1234)
    model = PipelineModule(layers=layers(args.layers, args.hidden, args.vocab),
                           num_stages=args.stages,
                           loss_fn=lm_loss,
                           partition_method="uniform")
    engine, *_ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())

    data = batches(engine.grid.get_data_parallel_id(), args.steps * engine.micro_batches,
                   engine.train_micro_batch_size_per_gpu(), args.seq_len, args.vocab)
    losses = [float(engine.train_batch(data_iter=data)) for _ in range(args.steps)]
    if engine.global_rank == 0:
        print(f"{type(engine).__name__} ({schedule}): loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"engine": type(engine).__name__, "losses": losses}, f)


if __name__ == "__main__":
    main()
