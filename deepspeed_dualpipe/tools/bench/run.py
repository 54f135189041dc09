"""``python -m deepspeed_dualpipe bench``: every schedule through the real engine, beside the simulator."""

import json
import statistics
from typing import Dict, List

from deepspeed_dualpipe.tools.bench import predict
from deepspeed_dualpipe.tools.bench.report import a2a_targets, memory_targets, peer_targets, render
from deepspeed_dualpipe.tools.units import parse_bytes, parse_time
from deepspeed_dualpipe.schedule import PAIRED_SCHEDULES, SCHEDULES, get_spec

DEFAULT_SCHEDULES = ",".join(SCHEDULES)  # every schedule the registry holds
# ``--a2a`` without a size. On the 2 shared cores this was written on, one all-to-all of 1 MiB over
# gloo between two ranks took 3.2-5 ms with every stage's at once (1.2-4 ms alone), about
# (F + B) / 4 = 3.75 ms of the default costs: a layer's four all-to-alls (dispatch, combine and their
# gradients) then take as long as its computation F + B, the report's 1:1. The bench prints the
# time measured on yours.
DEFAULT_A2A_BYTES = 1 << 20
# ``--a2a-wire`` without ``--a2a``: small enough that gloo moves it well within the wire time.
WIRE_A2A_BYTES = 64 << 10


def parse_costs(text: str) -> Dict[str, float]:
    """``"F=5ms,B=10ms,W=5ms"`` -> seconds per layer (units s, ms, us; none means seconds)."""
    costs = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = item.partition("=")
        try:
            if name.strip().upper() not in ("F", "B", "W"):
                raise ValueError(name)
            costs[name.strip().upper()] = parse_time(value)
        except ValueError:
            raise ValueError(f"bad cost {item!r}: expected F=, B= or W= a time such as 5ms") from None
    missing = {"F", "B", "W"} - set(costs)
    if missing:
        raise ValueError(f"--cost needs F, B and W; missing {', '.join(sorted(missing))}")
    if costs["W"] > costs["B"]:
        raise ValueError("--cost: W (the weight part of the backward) must not exceed B")
    return costs


def add_parser(sub) -> None:
    from deepspeed_dualpipe.tools.args import name_list, positive_float, positive_int
    p = sub.add_parser("bench", help="time every schedule through the real engine with cost-model layers")
    p.add_argument("--schedules", type=name_list, default=DEFAULT_SCHEDULES)
    p.add_argument("--stages", "-P", type=positive_int, default=4, help="pipeline ranks P")
    p.add_argument("--micro-batches", "-M", type=positive_int, default=16)
    p.add_argument("--layers", type=positive_int, default=8, help="layers of the whole model (a multiple of 2P)")
    p.add_argument("--cost",
                   default="F=5ms,B=10ms,W=5ms",
                   help="per-layer times F, B (full backward), W (its "
                   "weight part)")
    p.add_argument("--width", type=positive_int, default=4096, help="floats per activation (sent between stages)")
    p.add_argument("--a2a",
                   type=parse_bytes,
                   nargs="?",
                   const=DEFAULT_A2A_BYTES,
                   default=0,
                   metavar="BYTES",
                   help="MoE layers: a dispatch and a combine all-to-all of BYTES per rank in every layer, over "
                   "expert parallelism 2 inside data parallelism 2 (2P ranks); dualpipe and dualpipev also run "
                   f"without overlap. Without BYTES: {DEFAULT_A2A_BYTES} (1 MiB)")
    p.add_argument("--a2a-wire",
                   type=parse_time,
                   nargs="?",
                   const=-1.0,
                   default=0.0,
                   metavar="TIME",
                   help="MoE layers whose all-to-alls run on an emulated interconnect: gloo still moves the bytes, "
                   "but each all-to-all completes only TIME after its launch, released by a sleeping timer (wire "
                   "time that costs no CPU, as over NVLink or RDMA; tools/bench/wire.py). Without TIME: (F+B)/4, "
                   f"so a layer's 4 all-to-alls take as long as its compute (1:1). Implies --a2a "
                   f"{WIRE_A2A_BYTES} unless --a2a is given")
    p.add_argument("--memory-source",
                   choices=("malloc", "profiler"),
                   default=None,
                   help="how the memory step reads the CPU allocator (deepspeed_dualpipe/runtime/memory.py): "
                   "malloc (glibc's mallinfo2: every thread, and small C++/Python objects too; the default where "
                   "glibc has it) or profiler (torch's allocator events: tensors only, this thread only)")
    p.add_argument("--peer",
                   choices=("torch", "none"),
                   default="torch",
                   help="torch: also run torch.distributed.pipelining's schedule of each named schedule that this "
                   "torch has (1f1b, zb1p, interleaved-1f1b, zbv, dualpipev), as rows 'torch NAME' timed between "
                   "the plugin's (tools/bench/torch_peer.py); none: the plugin's rows only")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--timeout", type=positive_float, default=600.0, help="seconds before the ranks are given up on")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)


def _runs(names: List[str], a2a: bool, peer: str = "none"):
    from deepspeed_dualpipe.tools.bench.rank import Run
    runs = []
    for name in names:
        runs.append(Run(name, name))
        if a2a and name in PAIRED_SCHEDULES:
            runs.append(Run(f"{name} (no overlap)", name, overlap=False))
    if peer == "torch":
        from deepspeed_dualpipe.tools.bench import torch_peer
        # torch runs a pair's halves one after the other: its all-to-alls are never hidden.
        runs += [Run(torch_peer.peer_label(n), n, overlap=False, peer=True) for n in torch_peer.available(names)]
    return tuple(runs)


def bench(args, launch=None) -> dict:
    """The bench's result (what ``--json`` prints). ``launch(fn, world_size, spec, timeout=)``: how the ranks are
    started (default: gloo ranks on the CPU, :func:`~deepspeed_dualpipe.testing.launch.run_ranks`; tests/gpu starts
    them on NCCL, one GPU each, where the layers spend their time on the GPU stream)."""
    # Imported here: the CLI builds its parser without loading torch's process machinery.
    from deepspeed_dualpipe.tools.bench import measure
    from deepspeed_dualpipe.testing.launch import run_ranks
    from deepspeed_dualpipe.tools.bench.rank import BenchSpec, bench_rank
    from deepspeed_dualpipe.runtime.module import PLUGIN_SCHEDULES
    names = [n.strip() for n in args.schedules.split(",") if n.strip()]
    costs = parse_costs(args.cost)
    for name in names:  # fail here, not in P processes
        get_spec(name).validate(args.stages, args.micro_batches)
        predict.layers_per_chunk(name, args.stages, args.layers)
    a2a_bytes = getattr(args, "a2a", 0) or 0
    wire_s = getattr(args, "a2a_wire", 0.0) or 0.0
    if wire_s < 0:  # --a2a-wire without a time: 1:1 comm:compute
        wire_s = (costs["F"] + costs["B"]) / 4
    if wire_s and not a2a_bytes:
        a2a_bytes = max(WIRE_A2A_BYTES, 8 * args.width)
    if a2a_bytes and 4 * args.width > a2a_bytes // 2:
        raise ValueError(f"--a2a {a2a_bytes}: each rank's share ({a2a_bytes // 2} bytes) must hold an activation "
                         f"({4 * args.width} bytes, --width {args.width}); use --a2a >= {8 * args.width}")
    runs = _runs(names, bool(a2a_bytes), getattr(args, "peer", "none"))
    spec = BenchSpec(runs,
                     args.stages,
                     args.micro_batches,
                     args.layers,
                     costs["F"],
                     costs["B"],
                     costs["W"],
                     args.width,
                     args.repeats,
                     a2a_bytes=a2a_bytes,
                     a2a_wire_s=wire_s,
                     memory_source=getattr(args, "memory_source", None))
    per_rank = (launch or run_ranks)(bench_rank, spec.world_size, spec, timeout=args.timeout)
    alone = measure.all_to_all_alone(per_rank)
    # The simulator charges each all-to-all its time with every stage's at once: in a pipeline's
    # steady state all stages run their layers, and so their all-to-alls, at the same time. On the
    # emulated wire that is the wire time plus what the timer adds, as measured.
    a2a_s = alone.get("concurrent", 0.0)
    results = {}
    for run in runs:
        row = measure.summarize(per_rank, run.label, plugin=run.schedule in PLUGIN_SCHEDULES and not run.peer)
        row.update(
            predict.predicted(run.schedule,
                              args.stages,
                              args.micro_batches,
                              args.layers,
                              **costs,
                              a2a=a2a_s,
                              overlap=run.overlap,
                              width=args.width,
                              a2a_bytes=a2a_bytes))
        row["schedule"], row["overlap"], row["peer"] = run.schedule, run.overlap, run.peer
        results[run.label] = row
    base = results.get("1f1b")
    for row in results.values():
        row["ratio_to_1f1b"] = row["step_s"] / base["step_s"] if base else None
        row["sim_ratio_to_1f1b"] = row["sim_step_s"] / base["sim_step_s"] if base else None
        row.update(memory_targets(row, base, args.stages))
    ours = [r for r in results.values() if r["schedule"] in PLUGIN_SCHEDULES and not r["peer"]]
    plugin = [r["overhead_ms"] for r in ours]
    plugin_mean = [r["overhead_mean_ms"] for r in ours]
    result = {
        "stages":
        args.stages,
        "micro_batches":
        args.micro_batches,
        "layers":
        args.layers,
        "costs_s":
        costs,
        "width":
        args.width,
        "repeats":
        args.repeats,
        "data_parallel":
        spec.data_parallel,
        "a2a_bytes":
        a2a_bytes,
        "a2a_wire_s":
        wire_s or None,
        "schedules":
        results,
        "plugin_overhead_ms":
        statistics.median(plugin) if plugin else None,
        "plugin_overhead_mean_ms":
        statistics.median(plugin_mean) if plugin_mean else None,
        "scaling":
        predict.scaling(names,
                        layers_per_stage=args.layers // args.stages,
                        micro_batches_per_rank=max(2, args.micro_batches // args.stages),
                        **costs)
    }
    result["memory_source"] = next(iter(per_rank[0]["memory"].values()))["device"]
    if a2a_bytes:
        result["a2a_alone_s"] = alone.get("alone")
        result["a2a_concurrent_s"] = alone.get("concurrent")
        result["a2a_sim_s"] = a2a_s
        result["a2a_targets"] = a2a_targets(results)
    result["peer_targets"] = peer_targets(results)
    return result


def main(args) -> None:
    result = bench(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(render(result))
