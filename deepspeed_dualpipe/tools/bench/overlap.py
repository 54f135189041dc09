"""``python -m deepspeed_dualpipe overlap``: does one micro-batch's all-to-all hide under another's compute?

Two ranks, expert parallelism 2: a chunk of real :class:`~deepspeed_dualpipe.moe.MoETransformerBlock`\\ s
whose dispatch and combine are real gloo all-to-alls between the ranks. One DualPipe pair is the
forward of micro-batch A beside the backward of micro-batch B, run two ways:

* sequential: A's forward, then B's backward, every all-to-all waited as soon as it is launched
  (``dualpipe.overlap_moe_a2a: false``); its compute steps and all-to-all waits are timed apart;
* overlapped: :func:`~deepspeed_dualpipe.runtime.autograd.steps.interleave`, as the engine runs a pair.

Overlap efficiency = (sequential - overlapped) / min(compute, all-to-all): 1 means the shorter of
the two is hidden completely, 0 means nothing is.
"""

import statistics
from dataclasses import dataclass

import torch

from deepspeed_dualpipe.runtime.overlap import hidden_all_to_alls


@dataclass(frozen=True)
class OverlapSpec:
    hidden: int
    tokens: int  # per micro-batch and rank
    experts: int
    blocks: int
    repeats: int
    threads: int


def _chunk(spec: OverlapSpec):
    from deepspeed_dualpipe.moe import MoETransformerBlock
    torch.manual_seed(0)
    blocks = [
        MoETransformerBlock(spec.hidden, 4, spec.experts, ep_size=2, k=2, capacity_factor=1.0, aux_loss_coef=0.01)
        for _ in range(spec.blocks)
    ]
    for block in blocks:
        block.moe.set_deepspeed_parallelism()  # what deepspeed.initialize does for every MoE layer
    return blocks


def _pair(blocks, spec: OverlapSpec, overlapped: bool) -> dict:
    """One timed pair; returns its wall time and, run sequentially, its compute and all-to-all times."""
    import time

    from deepspeed import comm as dist
    from deepspeed_dualpipe.runtime.autograd.steps import Tape, backward_steps, forward_steps, interleave, run

    def micro_batch():
        return torch.randn(1, spec.tokens, spec.hidden, requires_grad=True)

    tape_b = Tape()
    out_b = run(forward_steps(blocks, micro_batch(), tape_b))  # B's forward, untimed: its backward is timed
    grad_b = torch.randn_like(out_b)
    events = []
    dist.barrier()
    start = time.perf_counter()
    backward = backward_steps(tape_b, out_b, grad_b, split=True)
    forward = forward_steps(blocks, micro_batch(), Tape())
    if overlapped:
        (_, weights), _ = interleave(backward, forward, events=events, labels=("B", "F"))
    else:
        run(forward, events=events, label="F")
        _, weights = run(backward, events=events, label="B")
    wall = time.perf_counter() - start
    weights.weight_part()  # the deferred W: outside the pair, as in the schedule
    compute = sum(e - s for name, s, e in events if name.endswith(":compute"))
    comm = sum(e - s for name, s, e in events if not name.endswith(":compute"))
    # all-to-alls that completed while the other micro-batch computed: the proof that the halves ran together
    hidden = len(hidden_all_to_alls(events))
    return {"wall": wall, "compute": compute, "comm": comm, "hidden": hidden}


def overlap_rank(spec: OverlapSpec) -> dict:
    torch.set_num_threads(spec.threads)
    blocks = _chunk(spec)
    _pair(blocks, spec, overlapped=False)  # warm-up
    _pair(blocks, spec, overlapped=True)
    seq, ovl = [], []
    for _ in range(spec.repeats):  # interleaved: drift hits both alike
        seq.append(_pair(blocks, spec, overlapped=False))
        ovl.append(_pair(blocks, spec, overlapped=True))
    return {"sequential": seq, "overlapped": ovl}


def _a2a_bytes(spec: OverlapSpec) -> int:
    """Bytes one rank sends per all-to-all: E x capacity x hidden fp32, capacity = k T / E (k=2)."""
    capacity = max(4, 2 * spec.tokens // spec.experts)
    return spec.experts * capacity * spec.hidden * 4


def measure(spec: OverlapSpec, timeout: float = 600.0) -> dict:
    from deepspeed_dualpipe.testing.launch import run_ranks
    per_rank = run_ranks(overlap_rank, 2, spec, timeout=timeout)

    def median(kind, key):  # the slower rank decides a pair's time
        return statistics.median(max(r[kind][i][key] for r in per_rank) for i in range(spec.repeats))

    compute, comm = median("sequential", "compute"), median("sequential", "comm")
    sequential, overlapped = median("sequential", "wall"), median("overlapped", "wall")
    return {
        "hidden": spec.hidden,
        "tokens": spec.tokens,
        "experts": spec.experts,
        "blocks": spec.blocks,
        "all_to_alls_per_pair": 4 * spec.blocks,
        "a2a_bytes": _a2a_bytes(spec),
        "compute_s": compute,
        "a2a_s": comm,
        "sequential_s": sequential,
        "overlapped_s": overlapped,
        "efficiency": (sequential - overlapped) / min(compute, comm),
        # over every rank and timed pair: none can hide sequentially; overlapped, some must
        "hidden_all_to_alls": {
            kind: sum(p["hidden"] for r in per_rank for p in r[kind])
            for kind in ("sequential", "overlapped")
        },
    }


def add_parser(sub) -> None:
    from deepspeed_dualpipe.tools.args import positive_int
    p = sub.add_parser("overlap",
                       help="time one overlapped forward/backward pair with real MoE all-to-alls "
                       "on 2 ranks, against the same pair run sequentially")
    p.add_argument("--hidden", type=positive_int, default=256)
    p.add_argument("--tokens", type=positive_int, default=256, help="tokens per micro-batch and rank")
    p.add_argument("--experts", type=positive_int, default=4)
    p.add_argument("--blocks", type=positive_int, default=2, help="MoE blocks in the chunk")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per rank")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)


def render(r: dict) -> str:
    ms = lambda s: f"{1e3 * s:8.1f} ms"  # noqa: E731
    return "\n".join([
        f"2 ranks, expert parallelism 2: {r['blocks']} MoE blocks, hidden {r['hidden']}, {r['tokens']} tokens per "
        f"micro-batch, {r['experts']} experts; {r['all_to_alls_per_pair']} all-to-alls of {r['a2a_bytes']} bytes "
        f"per rank in a pair", f"  compute alone (pair, sequential run)  {ms(r['compute_s'])}",
        f"  all-to-all alone (waits, sequential)  {ms(r['a2a_s'])}",
        f"  pair sequential                       {ms(r['sequential_s'])}",
        f"  pair overlapped                       {ms(r['overlapped_s'])}",
        f"  overlap efficiency (seq - ovl) / min(compute, a2a) = {r['efficiency']:.2f}"
    ])


def main(args) -> None:
    import json
    spec = OverlapSpec(args.hidden, args.tokens, args.experts, args.blocks, args.repeats, args.threads)
    result = measure(spec)
    print(json.dumps(result, indent=1) if args.json else render(result))
